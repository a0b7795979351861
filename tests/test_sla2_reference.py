"""The torch reference against a direct float64 dense-masked implementation of the SLA2 maths."""

import math

import pytest
import torch
import torch.nn.functional as F

from sla2cli.sla2 import keep_count, reference, sla2_attention
from sla2cli.sla2.feature_maps import FEATURE_MAPS


def dense_masked_sla2(q, k, v, *, topk, alpha, block_q, block_k, proj_q, proj_k, feature_map):
    """The issue's maths written token by token with full N×N masks, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, N, D = q.shape
    q_id, k_id = torch.arange(N) // block_q, torch.arange(N) // block_k
    n_q, n_k = int(q_id.max()) + 1, int(k_id.max()) + 1
    q_bar = torch.stack([q[:, :, q_id == i].mean(-2) for i in range(n_q)], dim=2)
    k_centred = k - k.mean(-2, keepdim=True)
    k_bar = torch.stack([k_centred[:, :, k_id == j].mean(-2) for j in range(n_k)], dim=2)
    scores = (q_bar @ proj_q.double().T) @ (k_bar @ proj_k.double().T).transpose(-1, -2) / math.sqrt(D)
    kk = min(n_k, max(1, math.floor(topk * n_k + 0.5)))
    block_mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(kk, -1).indices, True)
    mask = block_mask[:, :, q_id][:, :, :, k_id]
    s = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~mask, float("-inf"))
    o_sparse = torch.softmax(s, -1) @ v
    if kk == n_k:
        return o_sparse
    phi = FEATURE_MAPS[feature_map]
    a_lin = (phi(q) @ phi(k).transpose(-1, -2)) * (~mask)
    den = a_lin.sum(-1, keepdim=True)
    o_linear = torch.where(den > 0, (a_lin @ v) / den.clamp_min(1e-300), 0.0)
    alpha = alpha.double()
    a = (alpha[:, None].expand(H, n_q) if alpha.dim() == 1 else alpha)[:, q_id][None, :, :, None]
    return a * o_sparse + (1 - a) * o_linear


def _inputs(B, H, N, D, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, generator=g, dtype=dtype) for _ in range(3))
    proj_q = torch.eye(D) + 0.3 * torch.randn(D, D, generator=g)
    proj_k = torch.eye(D) + 0.3 * torch.randn(D, D, generator=g)
    return q, k, v, proj_q, proj_k, g


@pytest.mark.parametrize("N,block_q,block_k,topk,feature_map,per_block_alpha", [
    (150, 64, 64, 0.3, "softmax", False),
    (150, 32, 16, 0.25, "elu", True),
    (97, 16, 32, 0.5, "relu", False),
    (128, 64, 32, 0.05, "softmax", True),
    (77, 128, 64, 0.6, "softmax", False),
])
def test_reference_matches_dense_masked_float64(N, block_q, block_k, topk, feature_map, per_block_alpha):
    B, H, D = 2, 3, 16
    q, k, v, proj_q, proj_k, g = _inputs(B, H, N, D, seed=N + block_q)
    n_q = -(-N // block_q)
    alpha = torch.rand((H, n_q) if per_block_alpha else (H,), generator=g, dtype=torch.float64)
    kw = dict(topk=topk, alpha=alpha, block_q=block_q, block_k=block_k, proj_q=proj_q, proj_k=proj_k,
              feature_map=feature_map)
    expected = dense_masked_sla2(q, k, v, **kw)
    got64 = sla2_attention(q.double(), k.double(), v.double(), backend="torch", **kw)
    assert (got64 - expected).abs().max() < 1e-10
    got32 = sla2_attention(q, k, v, backend="torch", **kw)
    assert got32.dtype == torch.float32
    assert ((got32.double() - expected).norm() / expected.norm()) < 1e-5


def test_chunking_does_not_change_the_result(monkeypatch):
    q, k, v, proj_q, proj_k, g = _inputs(1, 2, 200, 16, seed=3)
    kw = dict(topk=0.3, alpha=torch.tensor([0.2, 0.7]), block_q=32, block_k=32, proj_q=proj_q, proj_k=proj_k)
    whole = sla2_attention(q, k, v, backend="torch", **kw)
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 1)  # one query block per chunk
    assert torch.equal(sla2_attention(q, k, v, backend="torch", **kw), whole)


def test_topk_one_is_dense_attention():
    q, k, v, proj_q, proj_k, _ = _inputs(2, 2, 130, 32, seed=5)
    out = sla2_attention(q, k, v, topk=1.0, alpha=torch.tensor([0.1, 0.3]), block_q=64, block_k=64,
                         proj_q=proj_q, proj_k=proj_k, backend="torch")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("topk,n_k,expected", [(0.05, 5, 1), (0.1, 5, 1), (0.15, 5, 1), (0.3, 5, 2),
                                                (1.0, 5, 5), (0.05, 512, 26), (0.001, 3, 1), (0.5, 3, 2)])
def test_keep_count_is_rounded_and_never_zero(topk, n_k, expected):
    assert keep_count(topk, n_k) == expected


def test_stats_report_kept_map_and_captured_mass():
    q, k, v, _, _, _ = _inputs(1, 2, 96, 16, seed=7)
    out, stats = sla2_attention(q, k, v, topk=0.34, alpha=torch.tensor([0.5, 0.5]), block_q=32, block_k=32,
                                return_stats=True, backend="torch")
    assert stats.kept.shape == (1, 2, 3, 3) and stats.kept.sum(-1).eq(1).all()
    # captured mass recomputed directly from the dense softmax
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 4.0, -1)
    token_mask = stats.kept[:, :, torch.arange(96) // 32][:, :, :, torch.arange(96) // 32]
    mass = (p * token_mask).sum(-1).view(1, 2, 3, 32).mean(-1)
    torch.testing.assert_close(stats.captured_mass.double(), mass, atol=1e-5, rtol=1e-5)
    assert stats.kept_fraction == pytest.approx(1 / 3)


def test_qat_is_close_in_forward_and_straight_through_in_backward():
    q, k, v, proj_q, proj_k, _ = _inputs(1, 2, 128, 32, seed=11)
    kw = dict(topk=0.5, alpha=torch.tensor([0.6, 0.8]), block_q=32, block_k=32)
    exact = sla2_attention(q, k, v, backend="torch", **kw)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    fake = sla2_attention(qs, ks, vs, qat=True, backend="torch", **kw)
    rel = (fake - exact).norm() / exact.norm()
    assert 1e-5 < rel < 0.05  # quantisation changes the forward, a little
    fake.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (qs, ks, vs))


def test_gradients_reach_alpha_and_inputs():
    q, k, v, proj_q, proj_k, _ = _inputs(1, 2, 100, 16, seed=13)
    alpha = torch.tensor([0.3, 0.6], requires_grad=True)
    q.requires_grad_()
    out = sla2_attention(q, k, v, topk=0.3, alpha=alpha, block_q=32, block_k=32, backend="torch")
    out.square().sum().backward()
    assert alpha.grad.abs().min() > 0 and q.grad.abs().sum() > 0


def test_mismatched_shapes_are_rejected():
    q = torch.randn(1, 2, 10, 8)
    with pytest.raises(ValueError, match="share one"):
        sla2_attention(q, q[:, :, :5], q, topk=0.5, alpha=torch.ones(2))
