"""The Triton SLA2 backend: router, forward launch and the autograd Function, behind `sla2_triton`.

`sla2_triton` has `sla2_reference`'s signature. The forward runs three Triton kernels plus a handful of
small torch ops on pooled (N/64-sized) tensors for the router's scores and top-k. The backward recomputes
the reference under autograd with the forward's routing, so gradients are exactly the reference's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton

from ..sla2.reference import sla2_reference
from ..sla2.routing import Routing, keep_count, num_blocks
from .sla2_triton import FEATURE_IDS, _pool_kernel, _sla2_fwd_kernel, _stats_kernel

# The stats kernel folds this many programs' worth of key blocks into one partial total, aiming at a few
# waves of programs on a large GPU so the totals need only a short torch reduction afterwards.
STATS_TARGET_PROGRAMS = 1024
STATS_MAX_GROUP = 16


@dataclass
class LinearStats:
    """Per-key-block statistics of the linear branch (h: B·H×n_k×D×D, z: B·H×n_k×D) and their totals."""

    h: torch.Tensor
    z: torch.Tensor
    h_total: torch.Tensor
    z_total: torch.Tensor


def _d_pad(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _precisions(dtype: torch.dtype) -> tuple[str, str]:
    """fp32 inputs get exact fp32 products; 16-bit inputs use the tensor cores (tf32 for fp32 operands)."""
    return ("ieee", "ieee") if dtype == torch.float32 else ("tf32", "tf32")


def pool_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Block means of a (strided) B×H×N×D tensor in fp32: B·H×n_b×D."""
    B, H, N, D = x.shape
    nb = num_blocks(N, block)
    out = torch.empty(B * H, nb, D, device=x.device, dtype=torch.float32)
    _pool_kernel[(nb, B * H)](x, out, *x.stride(), H, N, D, nb, BLOCK=block, D_PAD=_d_pad(D), num_warps=4)
    return out


def linear_stats(k: torch.Tensor, v: torch.Tensor, block_k: int, feature_map: str) -> tuple[LinearStats, torch.Tensor]:
    """One pass over K and V: the linear branch's statistics and the block means of k (B·H×n_k×D, fp32)."""
    B, H, N, D = k.shape
    n_k = num_blocks(N, block_k)
    group = max(1, min(STATS_MAX_GROUP, (B * H * n_k) // STATS_TARGET_PROGRAMS))
    n_parts = -(-n_k // group)
    stat_dtype = torch.float32 if k.dtype == torch.float32 else k.dtype
    h = torch.empty(B * H, n_k, D, D, device=k.device, dtype=stat_dtype)
    z = torch.empty(B * H, n_k, D, device=k.device, dtype=torch.float32)
    h_part = torch.empty(B * H, n_parts, D, D, device=k.device, dtype=torch.float32)
    z_part = torch.empty(B * H, n_parts, D, device=k.device, dtype=torch.float32)
    k_bar = torch.empty(B * H, n_k, D, device=k.device, dtype=torch.float32)
    d_pad = _d_pad(D)
    _stats_kernel[(n_parts, B * H)](
        k, v, h, z, h_part, z_part, k_bar, *k.stride(), *v.stride(), H, N, D, n_k, n_parts,
        GROUP=group, BLOCK_K=block_k, D_PAD=d_pad, FEATURE=FEATURE_IDS[feature_map],
        PREC=_precisions(k.dtype)[1], num_warps=8 if d_pad >= 128 else 4)
    stats = LinearStats(h=h, z=z, h_total=h_part.sum(1), z_total=z_part.sum(1))
    return stats, k_bar


def route_pooled(q: torch.Tensor, k_bar: torch.Tensor, *, topk: float, block_q: int, block_k: int,
                 proj_q: torch.Tensor | None, proj_k: torch.Tensor | None) -> Routing:
    """The reference router's decision from pooled blocks: k̄_j − mean(k) equals the mean of centred k."""
    B, H, N, D = q.shape
    q_bar = pool_blocks(q, block_q).view(B, H, -1, D)
    k_bar = k_bar.view(B, H, -1, D)
    n_k = k_bar.shape[-2]
    counts = torch.full((n_k, 1), float(block_k), device=q.device)
    counts[-1] = N - (n_k - 1) * block_k
    k_bar = k_bar - (k_bar * counts).sum(-2, keepdim=True) / N
    if proj_q is not None:
        q_bar = q_bar @ proj_q.detach().float().T
    if proj_k is not None:
        k_bar = k_bar @ proj_k.detach().float().T
    scores = q_bar @ k_bar.transpose(-1, -2) / math.sqrt(D)
    indices = scores.topk(keep_count(topk, n_k), dim=-1).indices.sort(dim=-1).values
    return Routing(scores=scores, indices=indices, mask=None)


def _alpha_table(alpha: torch.Tensor, H: int, n_q: int) -> torch.Tensor:
    alpha = alpha.detach().float()
    if alpha.dim() == 1:
        return alpha[:, None].expand(H, n_q)
    if alpha.shape != (H, n_q):
        raise ValueError(f"alpha must have shape ({H},) or ({H}, {n_q}), got {tuple(alpha.shape)}")
    return alpha


def _num_warps(block_q: int, d_pad: int) -> int:
    return 8 if block_q * d_pad >= 128 * 64 else 4


def sla2_forward(q, k, v, alpha, indices, stats: LinearStats | None, *, block_q: int, block_k: int,
                 feature_map: str, num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """Launch the fused kernel; `stats` None means every key block is kept (output = O_sparse)."""
    B, H, N, D = q.shape
    n_q, n_k, kk = num_blocks(N, block_q), num_blocks(N, block_k), indices.shape[-1]
    # Heads inner to tokens (JiT's B×N×H×D) keep that layout so the caller's transpose back is free.
    if q.stride(2) > q.stride(1):
        out = torch.empty(B, N, H, D, device=q.device, dtype=q.dtype).transpose(1, 2)
    else:
        out = torch.empty(B, H, N, D, device=q.device, dtype=q.dtype)
    a = _alpha_table(alpha, H, n_q)
    idx = indices.to(torch.int32).contiguous()
    linear = stats is not None
    dummy = out  # never read when LINEAR is off
    prec, lin_prec = _precisions(q.dtype)
    d_pad = _d_pad(D)
    extra = {} if num_stages is None else {"num_stages": num_stages}
    _sla2_fwd_kernel[(n_q, B * H)](
        q, k, v, out, idx, a, stats.h if linear else dummy, stats.z if linear else dummy,
        stats.h_total if linear else dummy, stats.z_total if linear else dummy,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *a.stride(),
        H, N, D, n_q, n_k, kk, 1.0 / math.sqrt(D) * math.log2(math.e),
        BLOCK_Q=block_q, BLOCK_K=block_k, D_PAD=d_pad, FEATURE=FEATURE_IDS[feature_map], LINEAR=linear,
        PREC=prec, LIN_PREC=lin_prec, num_warps=num_warps or _num_warps(block_q, d_pad), **extra)
    return out


class _SLA2Function(torch.autograd.Function):
    """Triton forward; backward by recomputing the reference on the same routing (exact reference gradients)."""

    @staticmethod
    def forward(ctx, q, k, v, alpha, routing, stats, block_q, block_k, feature_map):
        ctx.save_for_backward(q, k, v, alpha)
        ctx.routing, ctx.block_q, ctx.block_k, ctx.feature_map = routing, block_q, block_k, feature_map
        return sla2_forward(q, k, v, alpha, routing.indices, stats, block_q=block_q, block_k=block_k,
                            feature_map=feature_map)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, alpha = ctx.saved_tensors
        routing = ctx.routing
        if routing.mask is None:
            mask = torch.zeros(routing.scores.shape, dtype=torch.bool, device=q.device)
            routing = Routing(routing.scores, routing.indices, mask.scatter_(-1, routing.indices, True))
        inputs = [t.detach().requires_grad_(need) for t, need in zip((q, k, v, alpha), ctx.needs_input_grad[:4])]
        with torch.enable_grad():
            out = sla2_reference(*inputs[:3], topk=1.0, alpha=inputs[3], block_q=ctx.block_q, block_k=ctx.block_k,
                                 feature_map=ctx.feature_map, routing=routing)
            wanted = [t for t in inputs if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad_out)) if wanted else iter(())
        return tuple(next(grads) if t.requires_grad else None for t in inputs) + (None,) * 5


def sla2_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, topk: float, alpha: torch.Tensor,
                block_q: int = 64, block_k: int = 64, proj_q: torch.Tensor | None = None,
                proj_k: torch.Tensor | None = None, feature_map: str = "softmax", qat: bool = False,
                routing: Routing | None = None, return_stats: bool = False):
    """`sla2_reference` computed by the Triton kernels. QAT and `return_stats` have no kernel yet: the
    reference serves them, so the backend stays a drop-in for every call."""
    if qat or return_stats:
        return sla2_reference(q, k, v, topk=topk, alpha=alpha, block_q=block_q, block_k=block_k, proj_q=proj_q,
                              proj_k=proj_k, feature_map=feature_map, qat=qat, routing=routing,
                              return_stats=return_stats)
    if not 0.0 < topk <= 1.0:
        raise ValueError(f"topk must be in (0, 1], got {topk}")
    if feature_map not in FEATURE_IDS:
        raise ValueError(f"unknown feature map {feature_map!r}; choose one of: {', '.join(FEATURE_IDS)}")
    B, H, N, D = q.shape
    n_q, n_k = num_blocks(N, block_q), num_blocks(N, block_k)
    kk = routing.kept_per_query_block if routing is not None else keep_count(topk, n_k)
    stats = None
    if kk < n_k:
        stats, k_bar = linear_stats(k, v, block_k, feature_map)
        if routing is None:
            routing = route_pooled(q, k_bar, topk=topk, block_q=block_q, block_k=block_k, proj_q=proj_q,
                                   proj_k=proj_k)
    elif routing is None:
        every = torch.arange(n_k, device=q.device).expand(B, H, n_q, n_k)
        routing = Routing(scores=torch.zeros(B, H, n_q, n_k, device=q.device), indices=every,
                          mask=torch.ones(B, H, n_q, n_k, dtype=torch.bool, device=q.device))
    return _SLA2Function.apply(q, k, v, alpha, routing, stats, block_q, block_k, feature_map)
