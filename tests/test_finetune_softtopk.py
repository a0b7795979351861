"""SoftTop-k: the forward is the hard top-k SLA2 output; the router gradient is exact at the hard mask."""

import math

import pytest
import torch
from finetune_support import one_thread  # noqa: F401

import sla2cli.finetune.softtopk as softtopk
from sla2cli.finetune import routing_gradient, soft_topk_attention, soft_topk_mask
from sla2cli.finetune.softtopk import soft_topk_threshold
from sla2cli.sla2 import SLA2Attention, SLA2Config, route, sla2_reference
from sla2cli.sla2.feature_maps import FEATURE_MAPS


def dense_masked(q, k, v, alpha, mask, block_q, block_k, feature_map, feature_q=None, feature_k=None,
                 mix_scale=None):
    """SLA2 with a fractional block mask M, written densely: the sparse branch weights key block j by
    M_ij, the linear branch by 1 − M_ij. At a 0/1 mask it is SLA2 exactly. Learned feature maps map q, k
    before φ; `mix_scale` makes α per query from log Σ M·exp(s) and log Σ (1 − M)·φq·φk."""
    N, D = q.shape[-2:]
    phi = FEATURE_MAPS[feature_map]
    qb, kb = torch.arange(N) // block_q, torch.arange(N) // block_k
    m = mask[:, :, qb][:, :, :, kb]
    s = q @ k.transpose(-1, -2) / math.sqrt(D)
    shift = s.amax(-1, keepdim=True)
    e = torch.exp(s - shift)
    o_s = (m * e) @ v / (m * e).sum(-1, keepdim=True)
    fq = q if feature_q is None else torch.einsum("bhnd,hdr->bhnr", q, feature_q)
    fk = k if feature_k is None else torch.einsum("bhnd,hdr->bhnr", k, feature_k)
    w = (1 - m) * (phi(fq) @ phi(fk).transpose(-1, -2))
    o_l = (w @ v) / w.sum(-1, keepdim=True)
    a = alpha[:, qb][None, :, :, None] if alpha.dim() == 2 else alpha[None, :, None, None]
    if mix_scale is not None:
        lse = torch.log((m * e).sum(-1, keepdim=True)) + shift
        a = torch.sigmoid(torch.logit(a) + mix_scale[None, :, None, None] * (lse - torch.log(w.sum(-1, keepdim=True))))
    return a * o_s + (1 - a) * o_l


SHAPES = [  # N, block_q, block_k, D, topk, feature map, α per query block
    (37, 8, 4, 5, 0.3, "softmax", False),
    (50, 16, 8, 6, 0.2, "elu", True),
    (33, 4, 16, 3, 0.4, "softmax", True),
    (64, 16, 16, 8, 0.5, "relu", False),
]
LEARNED = [(0, False), (3, True), (6, False), (4, True)]  # feature rank (0: none), α per query


@pytest.mark.parametrize("rank,per_query", LEARNED)
@pytest.mark.parametrize("N,block_q,block_k,D,topk,feature_map,per_block", SHAPES)
def test_routing_gradient_is_the_exact_derivative_at_the_hard_mask(N, block_q, block_k, D, topk, feature_map,
                                                                  per_block, rank, per_query):
    torch.manual_seed(N + rank)
    q, k, v = (torch.randn(2, 3, N, D, dtype=torch.float64) * 1.5 for _ in range(3))
    learned = {}
    if rank:
        learned = {name: torch.randn(3, D, rank, dtype=torch.float64) / math.sqrt(D)
                   for name in ("feature_q", "feature_k")}
        if feature_map == "relu":  # positive maps of positive inputs: no all-zero linear denominator
            learned = {name: w.abs() for name, w in learned.items()}
    if per_query:
        learned["mix_scale"] = torch.rand(3, dtype=torch.float64) + 0.5
    if feature_map == "relu":
        q, k = q.abs() + 0.1, k.abs() + 0.1  # no query with an all-zero linear denominator
    n_q = -(-N // block_q)
    alpha = torch.rand(3, n_q, dtype=torch.float64) if per_block else torch.rand(3, dtype=torch.float64)
    routing = route(q, k, topk=topk, block_q=block_q, block_k=block_k)
    reference = sla2_reference(q, k, v, topk=topk, alpha=alpha, block_q=block_q, block_k=block_k,
                               feature_map=feature_map, routing=routing, **learned)
    mask = routing.mask.double().requires_grad_(True)
    dense = dense_masked(q, k, v, alpha, mask, block_q, block_k, feature_map, **learned)
    torch.testing.assert_close(dense, reference, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(dense)
    (dense * grad_out).sum().backward()
    got = routing_gradient(q, k, v, alpha, routing.mask, grad_out, block_q=block_q, block_k=block_k,
                           feature_map=feature_map, **learned)
    torch.testing.assert_close(got, mask.grad, rtol=1e-8, atol=1e-8 * mask.grad.abs().max().item())


def test_routing_gradient_does_not_depend_on_chunking(monkeypatch):
    torch.manual_seed(0)
    q, k, v, g = (torch.randn(1, 2, 70, 4, dtype=torch.float64) for _ in range(4))
    routing = route(q, k, topk=0.25, block_q=16, block_k=16)
    alpha = torch.rand(2, dtype=torch.float64)
    whole = routing_gradient(q, k, v, alpha, routing.mask, g, block_q=16, block_k=16, feature_map="softmax")
    monkeypatch.setattr(softtopk, "CHUNK_ELEMENTS", 1)  # one query block at a time
    chunked = routing_gradient(q, k, v, alpha, routing.mask, g, block_q=16, block_k=16, feature_map="softmax")
    torch.testing.assert_close(whole, chunked, rtol=1e-12, atol=1e-12)


def test_soft_mask_keeps_kk_per_row_and_ranks_like_the_hard_top_k():
    torch.manual_seed(0)
    scores = torch.randn(3, 5, 11, dtype=torch.float64)
    for kk, tau in ((1, 0.1), (3, 1.0), (10, 0.05)):
        soft = soft_topk_mask(scores, kk, tau)
        torch.testing.assert_close(soft.sum(-1), torch.full((3, 5), float(kk), dtype=torch.float64))
        hard = scores.topk(kk, dim=-1).indices.sort(-1).values
        assert torch.equal(soft.topk(kk, dim=-1).indices.sort(-1).values, hard)
    with pytest.raises(ValueError):
        soft_topk_threshold(scores, 11)


def test_soft_mask_gradient_includes_the_threshold_derivative():
    """The mask is σ(S/τ + λ(S)) with λ defined by Σ = kk: compare with finite differences of that."""
    torch.manual_seed(1)
    scores = torch.randn(4, 7, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda s: soft_topk_mask(s, 2, 0.5), scores)

    def exact(s):
        x = s / 0.5
        return torch.sigmoid(x + soft_topk_threshold(x, 2))

    eps = 1e-6
    for (r, c) in ((0, 0), (2, 5)):
        bumped = scores.clone()
        bumped[r, c] += eps
        torch.testing.assert_close(jac[:, :, r, c], (exact(bumped) - exact(scores)) / eps, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(jac.sum(1), torch.zeros_like(jac.sum(1)), atol=1e-12, rtol=0)  # rows keep kk


def _core(head_dim=8, heads=2, topk=0.25, **kw):
    torch.manual_seed(3)
    core = SLA2Attention(heads, head_dim, SLA2Config(topk=topk, block_q=16, block_k=16, **kw))
    with torch.no_grad():
        core.proj_q.add_(0.1 * torch.randn_like(core.proj_q))
        core.alpha_logit.copy_(torch.randn_like(core.alpha_logit))
    return core


@pytest.mark.parametrize("prefix_tokens", [0, 6])
def test_forward_is_the_hard_top_k_output_and_gradients_reach_router_and_alpha(prefix_tokens):
    core = _core()
    core.prefix_tokens = prefix_tokens  # in-context tokens: their own block, in training as in inference
    q, k, v = (torch.randn(2, 2, 100, 8) for _ in range(3))
    out = soft_topk_attention(core, q, k, v, topk=0.25, tau=0.1)
    assert torch.equal(out, core(q, k, v))
    out.square().sum().backward()
    for p in (core.proj_q, core.proj_k, core.alpha_logit):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_gradients_reach_q_k_v_when_they_require_it():
    core = _core()
    q, k, v = (torch.randn(1, 2, 40, 8, requires_grad=True) for _ in range(3))
    soft_topk_attention(core, q, k, v, topk=0.25, tau=0.1).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))


def test_nothing_to_route_when_every_block_is_kept():
    core = _core(topk=1.0)
    q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
    out = soft_topk_attention(core, q, k, v, topk=1.0, tau=0.1)
    assert torch.equal(out, sla2_reference(q, k, v, topk=1.0, alpha=core.alpha, block_q=16, block_k=16))
    assert not out.requires_grad  # neither α (no linear branch) nor the router takes part


def test_the_router_gradient_lowers_a_relaxed_loss():
    """A small step against the router gradient lowers the loss of SLA2 under the soft mask itself."""
    torch.manual_seed(5)
    core = _core(topk=0.3)
    q, k, v = (torch.randn(1, 2, 96, 8, dtype=torch.float64) for _ in range(3))
    core.double()
    target = torch.nn.functional.scaled_dot_product_attention(q, k, v)

    def relaxed_loss():
        r = route(q, k, topk=0.3, block_q=16, block_k=16, proj_q=core.proj_q, proj_k=core.proj_k)
        soft = soft_topk_mask(r.scores, r.kept_per_query_block, 0.5)
        return (dense_masked(q, k, v, core.alpha, soft, 16, 16, "softmax") - target).square().sum()

    loss = relaxed_loss()
    loss.backward()
    grad = core.proj_q.grad.clone()
    with torch.no_grad():
        core.proj_q.sub_(1e-3 * grad / grad.norm())
    assert relaxed_loss() < loss
