"""The Triton SLA2 backend: router, forward launch and the autograd Function, behind `sla2_triton`.

`sla2_triton` has `sla2_reference`'s signature. The forward is three Triton launches (statistics; router,
which also sums the statistics into totals; fused attention) and no torch op between them on the
inference path; the backward is two
(per query block, per key block) plus a torch-built reverse index of the routing.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import triton

from ..sla2.reference import feature_inputs, sla2_reference
from ..sla2.routing import Routing, keep_count, num_blocks
from .sla2_triton import FEATURE_IDS, _route_kernel, _sla2_fwd_kernel, _stats_kernel, _totals_kernel
from .sla2_triton_bwd import _bwd_key_kernel, _bwd_query_kernel

ROUTE_CHUNK = 64  # key blocks scored per step by the router
LINEAR_UNROLL = 4  # kept blocks' h_j read per step of the fused kernel's separate linear loop


@dataclass
class LinearStats:
    """Per-key-block statistics of the linear branch and their totals (sums of the stored values).

    h: B·H×n_k×R×D in the input's dtype, z: B·H×n_k×R fp32; h_total: B·H×R×D and z_total: B·H×R, fp32;
    R = D, or a learned feature map's rank. Until `finished` the totals are still to be summed: the router
    does that in its own launch (`route_pooled(stats=...)`), or `finish_totals`.
    """

    h: torch.Tensor
    z: torch.Tensor
    h_total: torch.Tensor
    z_total: torch.Tensor
    finished: bool = True


def _d_pad(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products; otherwise fp32 operands (φ(Q)·H only) may use tf32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _row_align(*tensors: torch.Tensor) -> int:
    """The largest power of two (≤ 16) dividing every token stride: lets Triton vectorise row loads."""
    align = 16
    while align > 1 and any(t.stride(2) % align for t in tensors):
        align //= 2
    return align


def _stats_warps(block_k: int, d_pad: int) -> int:
    """Warps of the statistics kernel. Measured on an H200 (bench/RESULTS.md): fewer warps leave room for
    two programs per multiprocessor; 2 for tiles up to 64×128, 4 above (8 was 1.3-1.5x slower)."""
    return 2 if block_k * d_pad <= 64 * 128 else 4


def _span(size: int, n_prog: int) -> int:
    return min(512, max(16, triton.next_power_of_2(triton.cdiv(size, n_prog))))


def _parts(n_parts: int, span: int) -> int:
    """Key blocks per load of the totals: about 4096 elements a load, so the loop over blocks is short."""
    return max(1, min(triton.next_power_of_2(n_parts), 4096 // span))


def linear_stats(k: torch.Tensor, v: torch.Tensor, block_k: int, feature_map: str,
                 fk: torch.Tensor | None = None, *, totals: bool = True,
                 num_warps: int | None = None) -> tuple[LinearStats, torch.Tensor]:
    """One pass over K and V: the linear branch's statistics and the block means of k (B·H×n_k×D, fp32).
    `fk` (B×H×N×R): what φ reads instead of k (a learned feature map's k·W_k). `totals` False leaves the
    totals to the router's launch (no launch or torch op of their own)."""
    B, H, N, D = k.shape
    R = D if fk is None else fk.shape[-1]
    n_k = num_blocks(N, block_k)
    d_pad = _d_pad(D)
    dev = k.device
    h = torch.empty(B * H, n_k, R, D, device=dev, dtype=k.dtype)
    z = torch.empty(B * H, n_k, R, device=dev, dtype=torch.float32)
    k_bar = torch.empty(B * H, n_k, D, device=dev, dtype=torch.float32)
    h_total = torch.empty(B * H, R, D, device=dev, dtype=torch.float32)
    z_total = torch.empty(B * H, R, device=dev, dtype=torch.float32)
    f = k if fk is None else fk
    _stats_kernel[(n_k, B * H)](
        k, v, f, h, z, k_bar, *k.stride(), *v.stride(), *f.stride(), H, N, n_k, D=D, R=R, ROW_ALIGN=_row_align(k, v),
        BLOCK_K=block_k, D_PAD=d_pad, R_PAD=_d_pad(R), FEATURE=FEATURE_IDS[feature_map], LEARNED=fk is not None,
        PREC=_precision(k.dtype), num_warps=num_warps or _stats_warps(block_k, max(d_pad, _d_pad(R))))
    stats = LinearStats(h, z, h_total, z_total, finished=False)
    if totals:
        finish_totals(stats)
    return stats, k_bar


def finish_totals(stats: LinearStats, n_prog: int = 64) -> None:
    """Sum the stored statistics into the totals in a launch of their own (when no router runs)."""
    BH, n_k, R = stats.z.shape
    D = stats.h.shape[-1]
    span = _span(R * D, n_prog)
    _totals_kernel[(n_prog, BH)](stats.h, stats.z, stats.h_total, stats.z_total, n_k, R=R, D=D, SPAN=span,
                                 PARTS=_parts(n_k, span), num_warps=4)
    stats.finished = True


def route_pooled(q: torch.Tensor, k_bar: torch.Tensor, *, topk: float, block_q: int, block_k: int,
                 proj_q: torch.Tensor | None, proj_k: torch.Tensor | None,
                 stats: LinearStats | None = None) -> torch.Tensor:
    """The reference router's kept blocks (B×H×n_q×kk, ascending, int32) from `linear_stats`' key-block
    means, in one Triton launch.

    (q̄ W_qᵀ)·(k̄_j W_kᵀ) = q̄·(k̄_j W_kᵀ W_q), so the projections meet in one D×D matrix applied to the n_k
    key-block means (no torch op at all without projections), and 1/√D is applied in-kernel. k is not
    centred: that shifts each query block's scores by one constant and changes no decision (the scores the
    kernel writes to scratch differ from the reference's by a constant per row). Unfinished `stats` get
    their totals in the same launch.
    """
    B, H, N, D = q.shape
    n_q, n_k = num_blocks(N, block_q), k_bar.shape[1]
    kk = keep_count(topk, n_k)
    if proj_q is not None or proj_k is not None:
        autocast = torch.is_autocast_enabled(q.device.type)  # the routing decisions in fp32, also under autocast
        with torch.autocast(q.device.type, enabled=False) if autocast else contextlib.nullcontext():
            m = proj_k.detach().float().T if proj_k is not None else None
            if proj_q is not None:
                m = proj_q.detach().float() if m is None else m @ proj_q.detach().float()
            k_bar = k_bar @ m
    scores = torch.empty(B, H, n_q, n_k, device=q.device, dtype=torch.float32)
    indices = torch.empty(B, H, n_q, kk, device=q.device, dtype=torch.int32)
    totals = stats is not None and not stats.finished
    parts = (stats.h, stats.z, stats.h_total, stats.z_total) if totals else (scores,) * 4
    R = stats.z.shape[-1] if totals else D
    span = _span(R * D, n_q)
    _route_kernel[(n_q, B * H)](
        q, k_bar, scores, indices, *parts, *q.stride(), H, N, n_q, n_k, kk, n_k, 1.0 / math.sqrt(D), D=D, R=R,
        ROW_ALIGN=_row_align(q), BLOCK_Q=block_q, D_PAD=_d_pad(D), NK_PAD=triton.next_power_of_2(n_k),
        CHUNK=ROUTE_CHUNK, TOTALS=totals, SPAN=span, PARTS=_parts(n_k, span), num_warps=2)
    if totals:
        stats.finished = True
    return indices


def _linear_first(block_q: int, block_k: int, d: int) -> bool:
    """Sum the kept blocks' h_j in a loop of its own before the attention loop (instead of inside it)?

    Measured on an H200 (bench/RESULTS.md) with that loop reading LINEAR_UNROLL blocks a step: faster
    everywhere (e.g. 1.30 -> 1.26 ms at 1×12×32768×128, 128/128; 0.239 -> 0.207 at 1×12×16416×64, 128/64;
    0.633 -> 0.591 at D = 80) except 128/128 blocks at D = 64 (0.161 -> 0.169).
    """
    return not (block_q >= 128 and block_k >= 128 and d == _d_pad(d) <= 64)


def _num_warps(block_q: int) -> int:
    """Measured on an H100 (bench/RESULTS.md): 8 warps for 128-row query blocks, 4 for 64-row ones."""
    return 8 if block_q >= 128 else 4


def _alloc_like_layout(q: torch.Tensor) -> torch.Tensor:
    """Heads inner to tokens (JiT's B×N×H×D) keep that layout, so the caller's transpose back is free."""
    B, H, N, D = q.shape
    if q.stride(2) > q.stride(1):
        return torch.empty(B, N, H, D, device=q.device, dtype=q.dtype).transpose(1, 2)
    return torch.empty(B, H, N, D, device=q.device, dtype=q.dtype)


def _alpha_strides(alpha: torch.Tensor, H: int, n_q: int) -> tuple[int, int]:
    """α's strides over heads and query blocks as the kernels read it, in its own dtype (0: one α per head)."""
    if alpha.dim() == 1 and alpha.shape[0] == H:
        return alpha.stride(0), 0
    if alpha.shape != (H, n_q):
        raise ValueError(f"alpha must have shape ({H},) or ({H}, {n_q}), got {tuple(alpha.shape)}")
    return alpha.stride(0), alpha.stride(1)


def sla2_forward(q, k, v, alpha, indices, stats: LinearStats | None, *, block_q: int, block_k: int,
                 feature_map: str, save: bool = False, num_warps: int | None = None,
                 num_stages: int | None = None, linear_first: bool | None = None, fq: torch.Tensor | None = None,
                 mix_scale: torch.Tensor | None = None, unroll: int | None = None):
    """Launch the fused kernel; `stats` None means every key block is kept (output = O_sparse).

    Returns O, or with `save` (O, O_sparse, lse) for the backward: B·H×N×D and B·H×N (log2 units).
    `linear_first` picks the loop order (None: `_linear_first`'s choice), `unroll` the kept blocks a step of
    its separate loop reads (None: `LINEAR_UNROLL`). `fq` (B×H×N×R): what φ reads instead of q (a learned
    feature map's q·W_q); `mix_scale` (H,): α per query. α and the mix scale are read as they are (any
    float dtype, through their strides): no torch op before the launch.
    """
    B, H, N, D = q.shape
    R = D if fq is None else fq.shape[-1]
    f = q if fq is None else fq
    mix = alpha if mix_scale is None else mix_scale
    n_q, n_k, kk = num_blocks(N, block_q), num_blocks(N, block_k), indices.shape[-1]
    out = _alloc_like_layout(q)
    idx = indices if indices.dtype == torch.int32 and indices.is_contiguous() else indices.to(torch.int32).contiguous()
    linear = stats is not None
    o_s = torch.empty(B * H, N, D, device=q.device, dtype=q.dtype) if save else out
    lse = torch.empty(B * H, N, device=q.device, dtype=torch.float32) if save else out
    extra = {} if num_stages is None else {"num_stages": num_stages}
    if linear and not stats.finished:
        finish_totals(stats)
    _sla2_fwd_kernel[(n_q, B * H)](
        q, k, v, f, out, idx, alpha, mix, *((stats.h, stats.z, stats.h_total, stats.z_total) if linear else (out,) * 4),
        o_s, lse, *q.stride(), *k.stride(), *v.stride(), *f.stride(), *out.stride(), *_alpha_strides(alpha, H, n_q),
        mix.stride(0), H, N, n_q, n_k, kk, 1.0 / math.sqrt(D) * math.log2(math.e), D=D, R=R,
        ROW_ALIGN=_row_align(q, k, v, out), BLOCK_Q=block_q, BLOCK_K=block_k, D_PAD=_d_pad(D), R_PAD=_d_pad(R),
        FEATURE=FEATURE_IDS[feature_map], LEARNED=fq is not None, LINEAR=linear, MIX=mix_scale is not None,
        PREC=_precision(q.dtype), SAVE=save,
        LIN_FIRST=_linear_first(block_q, block_k, D) if linear_first is None else linear_first,
        UNROLL=unroll or LINEAR_UNROLL, num_warps=num_warps or _num_warps(block_q), **extra)
    return (out, o_s, lse) if save else out


def reverse_index(indices: torch.Tensor, n_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each key block, the query blocks that kept it, as CSR: offsets (B·H·n_k + 1) and query blocks."""
    B, H, n_q, kk = indices.shape
    key = (indices.reshape(B * H, n_q * kk).long()
           + torch.arange(B * H, device=indices.device)[:, None] * n_k).flatten()
    order = torch.argsort(key, stable=True)
    query_blocks = ((order % (n_q * kk)) // kk).to(torch.int32)
    offsets = torch.zeros(B * H * n_k + 1, device=indices.device, dtype=torch.int32)
    offsets[1:] = torch.cumsum(torch.bincount(key, minlength=B * H * n_k), 0)
    return offsets, query_blocks


def sla2_backward(grad_out, q, k, v, alpha, indices, stats: LinearStats | None, o_s, lse, *, block_q: int,
                  block_k: int, feature_map: str, fq=None, fk=None, mix_scale=None):
    """dq, dk, dv (B×H×N×D), dF_Q, dF_K (B×H×N×R, fp32; None without a learned feature map `fq`, `fk`), dα
    (alpha's shape) and d`mix_scale` (None without it) of the SLA2 forward on the same routing."""
    B, H, N, D = q.shape
    R = D if fq is None else fq.shape[-1]
    learned, mix = fq is not None, mix_scale is not None
    n_q, n_k, kk = num_blocks(N, block_q), num_blocks(N, block_k), indices.shape[-1]
    a, a_strides = alpha.detach(), _alpha_strides(alpha, H, n_q)
    idx = indices if indices.dtype == torch.int32 and indices.is_contiguous() else indices.to(torch.int32).contiguous()
    linear = stats is not None
    dev = q.device
    dq, dk, dv = (torch.empty(B, H, N, D, device=dev, dtype=q.dtype) for _ in range(3))
    delta = torch.empty(B * H, N, device=dev, dtype=torch.float32)
    d_alpha = torch.zeros(B * H, n_q, device=dev, dtype=torch.float32)
    d_h = torch.empty(B * H, n_q, R, D, device=dev, dtype=torch.float32) if linear else delta
    d_z = torch.empty(B * H, n_q, R, device=dev, dtype=torch.float32) if linear else delta
    d_fq, d_fk = ((torch.zeros(B, H, N, R, device=dev, dtype=torch.float32) for _ in range(2)) if learned
                  else (delta, delta))
    d_mix = torch.zeros(B * H, n_q, device=dev, dtype=torch.float32) if mix else delta
    a_row = torch.empty(B * H, N, device=dev, dtype=torch.float32) if mix else delta
    c = mix_scale.detach() if mix else delta
    fq_, fk_ = (fq, fk) if learned else (q, k)
    common = dict(D=D, R=R, BLOCK_Q=block_q, BLOCK_K=block_k, D_PAD=_d_pad(D), R_PAD=_d_pad(R),
                  FEATURE=FEATURE_IDS[feature_map], LEARNED=learned, LINEAR=linear, MIX=mix, PREC=_precision(q.dtype),
                  num_warps=8 if _d_pad(D) >= 128 else 4, num_stages=1)
    scales = (1.0 / math.sqrt(D) * math.log2(math.e), 1.0 / math.sqrt(D))
    stat_args = (stats.h, stats.z, stats.h_total, stats.z_total) if linear else (delta,) * 4
    _bwd_query_kernel[(n_q, B * H)](
        q, k, v, fq_, grad_out, o_s, lse, idx, a, c, *stat_args, dq, d_fq, d_h, d_z, d_alpha, d_mix, a_row, delta,
        *q.stride(), *k.stride(), *v.stride(), *fq_.stride(), *grad_out.stride(), *a_strides, c.stride(0), H, N, n_q,
        n_k, kk, *scales, **common)
    offsets, query_blocks = reverse_index(idx, n_k)
    d_h_total = d_h.sum(1) if linear else delta
    d_z_total = d_z.sum(1) if linear else delta
    _bwd_key_kernel[(n_k, B * H)](
        q, k, v, fk_, grad_out, lse, delta, a, a_row, offsets, query_blocks, d_h, d_z, d_h_total, d_z_total, dk, dv,
        d_fk, *q.stride(), *k.stride(), *v.stride(), *fk_.stride(), *grad_out.stride(), *a_strides, H, N, n_q, n_k,
        *scales, **common)
    d_alpha = d_alpha.view(B, H, n_q).sum(0)
    if alpha.dim() == 1:
        d_alpha = d_alpha.sum(-1)
    d_mix = d_mix.view(B, H, n_q).sum((0, 2)).to(mix_scale.dtype) if mix else None
    return dq, dk, dv, (d_fq if learned else None), (d_fk if learned else None), d_alpha.to(alpha.dtype), d_mix


class _SLA2Function(torch.autograd.Function):
    """Triton forward and backward on one routing (no gradient flows through the hard top-k). `fq`, `fk`:
    a learned feature map's inputs q·W_q, k·W_k (None: φ reads q, k); `mix_scale`: α per query (None)."""

    @staticmethod
    def forward(ctx, q, k, v, fq, fk, alpha, mix_scale, indices, stats, block_q, block_k, feature_map):
        ctx.block_q, ctx.block_k, ctx.feature_map, ctx.stats = block_q, block_k, feature_map, stats
        options = dict(block_q=block_q, block_k=block_k, feature_map=feature_map, fq=fq, mix_scale=mix_scale)
        if not any(ctx.needs_input_grad[:7]):
            return sla2_forward(q, k, v, alpha, indices, stats, **options)
        out, o_s, lse = sla2_forward(q, k, v, alpha, indices, stats, save=True, **options)
        ctx.save_for_backward(q, k, v, fq, fk, alpha, mix_scale, indices, o_s, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, fq, fk, alpha, mix_scale, indices, o_s, lse = ctx.saved_tensors
        dq, dk, dv, d_fq, d_fk, d_alpha, d_mix = sla2_backward(
            grad_out, q, k, v, alpha, indices, ctx.stats, o_s, lse, block_q=ctx.block_q, block_k=ctx.block_k,
            feature_map=ctx.feature_map, fq=fq, fk=fk, mix_scale=mix_scale)
        linear = ctx.stats is not None
        grads = (dq, dk, dv, d_fq, d_fk, d_alpha if linear else None, d_mix if linear else None)
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:7])) + (None,) * 5


def sla2_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, topk: float, alpha: torch.Tensor,
                block_q: int = 64, block_k: int = 64, proj_q: torch.Tensor | None = None,
                proj_k: torch.Tensor | None = None, feature_map: str = "softmax", qat: bool = False,
                routing: Routing | None = None, return_stats: bool = False, **learned):
    """`sla2_reference` computed by the Triton kernels, learned parts (feature_q, feature_k, mix_scale)
    included. QAT and `return_stats` have no kernel yet: the reference serves them, so the backend stays a
    drop-in for every call."""
    learned = {name: t for name, t in learned.items() if t is not None}
    if qat or return_stats:
        return sla2_reference(q, k, v, topk=topk, alpha=alpha, block_q=block_q, block_k=block_k, proj_q=proj_q,
                              proj_k=proj_k, feature_map=feature_map, qat=qat, routing=routing,
                              return_stats=return_stats, **learned)
    if not 0.0 < topk <= 1.0:
        raise ValueError(f"topk must be in (0, 1], got {topk}")
    if feature_map not in FEATURE_IDS:
        raise ValueError(f"unknown feature map {feature_map!r}; choose one of: {', '.join(FEATURE_IDS)}")
    B, H, N, D = q.shape
    n_q, n_k = num_blocks(N, block_q), num_blocks(N, block_k)
    kk = routing.kept_per_query_block if routing is not None else keep_count(topk, n_k)
    stats = None
    fq = fk = None
    if "feature_q" in learned or "feature_k" in learned:
        fq, fk = feature_inputs(q, k, learned.get("feature_q"), learned.get("feature_k"))
    if kk < n_k:
        stats, k_bar = linear_stats(k, v, block_k, feature_map, fk, totals=routing is not None)
    if routing is not None:
        indices = routing.indices
    elif stats is not None:
        indices = route_pooled(q, k_bar, topk=topk, block_q=block_q, block_k=block_k, proj_q=proj_q, proj_k=proj_k,
                               stats=stats)
    else:
        indices = torch.arange(n_k, device=q.device, dtype=torch.int32).expand(B, H, n_q, n_k)
    mix_scale = learned.get("mix_scale")
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, fq, fk, alpha,
                                                                                        mix_scale))):
        return sla2_forward(q, k, v, alpha, indices, stats, block_q=block_q, block_k=block_k, feature_map=feature_map,
                            fq=fq, mix_scale=mix_scale)  # inference: no autograd Function to set up
    return _SLA2Function.apply(q, k, v, fq, fk, alpha, mix_scale, indices, stats, block_q, block_k, feature_map)
