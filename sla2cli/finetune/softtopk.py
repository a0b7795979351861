"""SoftTop-k: the router's hard top-k decision in the forward, a soft mask's gradient in the backward.

The forward is exactly what inference computes: each query block keeps the kk key blocks with the
highest router scores S. For the backward the kept-block mask M (1 = kept) is relaxed to

    M̃_ij = σ(S_ij / τ + λ_i),   λ_i by bisection so that Σ_j M̃_ij = kk,

so the soft mask keeps kk blocks per row on average, like the hard one. λ_i depends on S through that
constraint; its implicit derivative is included, so the gradient keeps Σ_j M̃_ij fixed.

The loss's derivative with respect to M is taken exactly at the hard mask (straight-through): with a
fractional mask the sparse branch is Σ_j M_ij·(softmax mass and values of block j) renormalised, and the
linear branch sums the blocks weighted by 1 − M_ij. `routing_gradient` evaluates ∂L/∂M_ij for every
block pair, kept or not, block-wise (the scores of one chunk of query blocks at a time, like a
flash-attention backward: never N×N at once).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..sla2.attention import SLA2Attention, sla2_attention
from ..sla2.feature_maps import FEATURE_MAPS
from ..sla2.reference import CHUNK_ELEMENTS, _alpha_per_block, _blocks, _valid, feature_inputs, query_alpha
from ..sla2.routing import Routing, compute_dtype, route

BISECTION_STEPS = 60
CUDA_CHUNK_SCALE = 4  # a GPU takes 4x larger chunks of query blocks: fewer, fuller kernel launches


def soft_topk_threshold(x: torch.Tensor, kk: int) -> torch.Tensor:
    """λ per row (last dim) with Σ_j σ(x_j + λ) = kk, found by bisection in float64 (no gradient).

    σ(x_j + λ) ≤ kk/n for every j at λ = logit(kk/n) − max x, and ≥ kk/n at λ = logit(kk/n) − min x,
    so the root lies between; 60 halvings leave an interval far below float32 resolution.
    """
    n = x.shape[-1]
    if not 0 < kk < n:
        raise ValueError(f"a soft top-k needs 0 < kk < n, got kk={kk}, n={n}")
    x64 = x.detach().double()
    base = math.log(kk / (n - kk))
    lo = base - x64.amax(-1, keepdim=True)
    hi = base - x64.amin(-1, keepdim=True)
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        over = torch.sigmoid(x64 + mid).sum(-1, keepdim=True) > kk
        hi = torch.where(over, mid, hi)
        lo = torch.where(over, lo, mid)
    return (0.5 * (lo + hi)).to(x.dtype)


def soft_topk_mask(scores: torch.Tensor, kk: int, tau: float) -> torch.Tensor:
    """σ(S/τ + λ) with rows summing to kk; differentiable in S, λ's implicit derivative included."""
    x = scores / tau
    lam0 = soft_topk_threshold(x, kk)
    m0 = torch.sigmoid(x.detach() + lam0)
    w = m0 * (1 - m0)
    # λ(S) has ∂λ/∂x_l = −w_l / Σw (differentiating Σσ(x + λ) = kk); this has λ0's value and that gradient.
    shift = (w * (x - x.detach())).sum(-1, keepdim=True) / w.sum(-1, keepdim=True).clamp_min(1e-30)
    return torch.sigmoid(x + lam0 - shift)


@torch.no_grad()
def routing_gradient(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, kept: torch.Tensor,
                     grad_out: torch.Tensor, *, block_q: int, block_k: int, feature_map: str,
                     feature_q: torch.Tensor | None = None, feature_k: torch.Tensor | None = None,
                     mix_scale: torch.Tensor | None = None) -> torch.Tensor:
    """∂L/∂M_ij at the hard mask `kept` (B×H×n_q×n_k), for the SLA2 output O and ∂L/∂O = `grad_out`.

    Sparse branch, for query token t of block i and key u of block j (P the branch's probabilities
    extended to every key, exp(s_tu − lse over kept keys)): ∂L/∂M_ij += α_t Σ_t Σ_u P_tu (g_t·v_u − g_t·O_s,t).
    Linear branch (O_l,t = Σ_j (1−M_ij) φq_t h_j / Σ_j (1−M_ij) φq_t·z_j, φq of the learned features):
    ∂L/∂M_ij −= (1−α_t) Σ_t [g_t·(φq_t h_j) − (φq_t·z_j)(g_t·O_l,t)] / (φq_t·z_rest).
    With α per query (`mix_scale` c) α_t moves with M too: lse_sparse by P_t(block j) and log den by
    −φq_t·z_j/den_t, so ∂L/∂M_ij += Σ_t g_t·(O_s,t − O_l,t)·α_t(1−α_t)·c·(P_t(j) + φq_t·z_j/den_t).
    """
    B, H, N, D = q.shape
    dtype = compute_dtype(q)
    scale = 1.0 / math.sqrt(D)
    n_q, n_k = kept.shape[-2:]
    phi = FEATURE_MAPS[feature_map]
    qf, kf, vf, g = (t.detach().to(dtype) for t in (q, k, v, grad_out))
    fq, fk = feature_inputs(qf, kf, None if feature_q is None else feature_q.detach(),
                            None if feature_k is None else feature_k.detach())
    R = fk.shape[-1]
    alpha_table = _alpha_per_block(alpha.detach(), n_q, dtype)  # H×n_q
    key_block = torch.arange(N, device=q.device) // block_k

    k_valid = _valid(N, block_k, q.device).to(dtype)
    phi_k = phi(_blocks(fk, block_k)) * k_valid[..., None]
    h = torch.einsum("bhntr,bhnte->bhnre", phi_k, _blocks(vf, block_k))  # B×H×n_k×R×D
    z = phi_k.sum(-2)  # B×H×n_k×R

    q_blocks, g_blocks = _blocks(qf, block_q), _blocks(g, block_q)  # zero padding: padded rows add nothing
    fq_blocks = _blocks(fq, block_q)
    out = torch.empty(B, H, n_q, n_k, dtype=dtype, device=q.device)
    budget = CHUNK_ELEMENTS * (CUDA_CHUNK_SCALE if q.is_cuda else 1)
    chunk = max(1, budget // (B * H * block_q * max(N, R * D)))
    to_blocks = lambda per_key: F.pad(per_key, (0, n_k * block_k - N)).unflatten(-1, (n_k, block_k)).sum(-1)  # noqa: E731
    for i0 in range(0, n_q, chunk):
        i1 = min(n_q, i0 + chunk)
        qb, gb, kept_c = q_blocks[:, :, i0:i1], g_blocks[:, :, i0:i1], kept[:, :, i0:i1]

        kept_keys = kept_c[..., key_block][..., None, :]  # B×H×c×1×N
        # the score-sized (c·b_q×N) temporaries dominate this function's time: each is made once, then reused
        s = torch.einsum("bhcqd,bhnd->bhcqn", qb * scale, kf)
        masked = s.masked_fill(~kept_keys, float("-inf"))
        lse = torch.logsumexp(masked, dim=-1, keepdim=True)
        p = s.sub_(lse).exp_()
        o_s = torch.einsum("bhcqn,bhnd->bhcqd", masked.sub_(lse).exp_(), vf)
        masked = s = None

        unkept = (~kept_c).to(dtype)
        h_rest = torch.einsum("bhcn,bhnre->bhcre", unkept, h)
        z_rest = unkept @ z
        phi_q = phi(fq_blocks[:, :, i0:i1])
        den = torch.einsum("bhcqr,bhcr->bhcq", phi_q, z_rest)
        ok = den > 0
        inv = torch.where(ok, 1.0 / torch.where(ok, den, 1.0), 0.0)
        o_l = torch.einsum("bhcqr,bhcre->bhcqe", phi_q, h_rest) * inv[..., None]

        a = alpha_table[None, :, i0:i1, None].expand(B, -1, -1, block_q)  # B×H×c×b_q: α per query token
        if mix_scale is not None:
            c = mix_scale.detach().to(dtype)[None, :, None, None]
            a = query_alpha(a, c, lse[..., 0], den)
        g_s, g_l = gb * a[..., None], gb * (1 - a[..., None])
        ds = torch.einsum("bhcqd,bhnd->bhcqn", g_s, vf).sub_((g_s * o_s).sum(-1, keepdim=True)).mul_(p)
        sparse = to_blocks(ds.sum(-2))  # B×H×c×n_k
        ds = None

        g_scaled = g_l * inv[..., None]
        outer = torch.einsum("bhcqr,bhcqe->bhcre", phi_q, g_scaled)
        weight = torch.einsum("bhcqr,bhcq->bhcr", phi_q, (g_scaled * o_l).sum(-1))
        linear = torch.einsum("bhcre,bhnre->bhcn", outer, h) - torch.einsum("bhcr,bhnr->bhcn", weight, z)
        grad = sparse - linear
        if mix_scale is not None:
            g_mix = (gb * (o_s - o_l)).sum(-1) * a * (1 - a) * c * ok  # B×H×c×b_q: ∂L/∂(lse − log den)
            grad = grad + to_blocks(torch.einsum("bhcq,bhcqn->bhcn", g_mix, p))
            grad = grad + torch.einsum("bhcq,bhcqr,bhnr->bhcn", g_mix * inv, phi_q, z)
        out[:, :, i0:i1] = grad
    return out


class _RouterGradient(torch.autograd.Function):
    """Identity on the SLA2 output; its backward sends ∂L/∂M (at the hard mask) into the soft mask."""

    @staticmethod
    def forward(ctx, out, soft_mask, q, k, v, alpha, kept, block_q, block_k, feature_map, learned):
        ctx.save_for_backward(q, k, v, alpha, kept)
        ctx.blocks = (block_q, block_k, feature_map)
        ctx.learned = learned
        return out.clone()

    @staticmethod
    def backward(ctx, grad_out):
        grad_mask = None
        if ctx.needs_input_grad[1]:
            q, k, v, alpha, kept = ctx.saved_tensors
            block_q, block_k, feature_map = ctx.blocks
            grad_mask = routing_gradient(q, k, v, alpha, kept, grad_out, block_q=block_q, block_k=block_k,
                                         feature_map=feature_map, **ctx.learned)
        return (grad_out, grad_mask) + (None,) * 9


def soft_topk_attention(core: SLA2Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, topk: float,
                        tau: float) -> torch.Tensor:
    """`core`'s SLA2 output at `topk` (the hard forward), with SoftTop-k gradients to its router.

    Gradients reach α and (when they require it) q, k, v through the backend's own backward, and the
    router projections W_q, W_k through the soft mask of the scores.
    """
    c = core.config
    q, k, v = (core.to_block_order(x) for x in (q, k, v))
    routing: Routing = route(q, k, topk=topk, block_q=c.block_q, block_k=c.block_k, proj_q=core.proj_q,
                             proj_k=core.proj_k)
    alpha = core.alpha
    learned = core.learned_parts()
    out = sla2_attention(q, k, v, topk=topk, alpha=alpha, block_q=c.block_q, block_k=c.block_k,
                         proj_q=core.proj_q, proj_k=core.proj_k, feature_map=c.feature_map, qat=c.qat,
                         backend=core.backend, routing=routing, **learned)
    kk, n_k = routing.kept_per_query_block, routing.mask.shape[-1]
    if kk < n_k and torch.is_grad_enabled() and routing.scores.requires_grad:
        soft = soft_topk_mask(routing.scores, kk, tau)
        out = _RouterGradient.apply(out, soft, q.detach(), k.detach(), v.detach(), alpha.detach(), routing.mask,
                                    c.block_q, c.block_k, c.feature_map,
                                    {name: t.detach() for name, t in learned.items()})
    return core.from_block_order(out)
