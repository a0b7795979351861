"""The Triton SLA2 backend: router, forward launch and the autograd Function, behind `sla2_triton`.

`sla2_triton` has `sla2_reference`'s signature. The forward is four Triton launches (statistics; router;
the unkept sums; fused attention) and no torch op between them on the inference path (QAT's low-bit
sparse branch adds the quantisation of K and V: two torch reductions and one launch); the backward is
three (per query block; the unkept sums of its statistics gradients; per key block) plus the unkept sums
of the forward again and a torch-built reverse index of the routing.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton

from ..sla2.quant import FP8_E4M3_MAX, straight_through_qat
from ..sla2.reference import check_features, requires_grad, sla2_reference
from ..sla2.routing import Routing, keep_count, num_blocks
from .sla2_triton import (
    FEATURE_IDS,
    _quantise_kernel,
    _route_kernel,
    _scales_kernel,
    _sla2_fwd_kernel,
    _stats_kernel,
    _unkept_sum_kernel,
)
from .sla2_triton_bwd import _bwd_key_kernel, _bwd_query_kernel

ROUTE_CHUNK = 64  # key blocks scored per step by the router
PROJ_ROWS = 16  # rows of the router's projections read per step
UNKEPT_TILES = (64, 256, 32)  # rows (blocks), statistics columns, blocks summed per step of `unkept_sums`


def _d_pad(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products; otherwise the products that still take fp32 operands (fp16's
    fp32 sums and statistics gradients) may use tf32."""
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


def _weights(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """A learned feature map (H×D×R, any float dtype, read through its strides) as the kernels take it; without
    one, a placeholder 3-d view of x that they never read."""
    return x[0] if w is None else w


def linear_stats(k: torch.Tensor, v: torch.Tensor, block_k: int, feature_map: str,
                 wk: torch.Tensor | None = None, *, v_max: bool = False,
                 num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One pass over K and V: the linear branch's statistics s_j = [h_j, z_j] per key block (B·H×n_k×(R·D + R)
    in k's dtype; R = D, or a learned feature map's rank), the block means of k (B·H×n_k×D, fp32) and, with
    `v_max`, each block's max |v| per channel (B·H×n_k×D, fp32: what `quantise_kv` scales V by; else None).
    `wk` (H×D×R): a learned feature map W_k; φ then reads k·W_k, computed in the kernel."""
    B, H, N, D = k.shape
    R = D if wk is None else wk.shape[-1]
    n_k = num_blocks(N, block_k)
    d_pad = _d_pad(D)
    stats = torch.empty(B * H, n_k, R * D + R, device=k.device, dtype=k.dtype)
    k_bar = torch.empty(B * H, n_k, D, device=k.device, dtype=torch.float32)
    v_abs_max = torch.empty_like(k_bar) if v_max else None
    w = _weights(k, wk)
    _stats_kernel[(n_k, B * H)](
        k, v, w, stats, k_bar, k_bar if v_abs_max is None else v_abs_max, *k.stride(), *v.stride(), *w.stride(),
        H, N, n_k, D=D, R=R, ROW_ALIGN=_row_align(k, v), BLOCK_K=block_k, D_PAD=d_pad, R_PAD=_d_pad(R),
        FEATURE=FEATURE_IDS[feature_map], LEARNED=wk is not None, PREC=_precision(k.dtype), V_MAX=v_max,
        num_warps=num_warps or _stats_warps(block_k, max(d_pad, _d_pad(R))))
    return stats, k_bar, v_abs_max


def sums_dtype(dtype: torch.dtype) -> torch.dtype:
    """The unkept sums and the per-query-block statistics gradients: bf16 for bf16 inputs (accumulated in
    fp32, rounded once: what the fused kernels' 16-bit products take), fp32 otherwise (fp16's range could
    overflow a sum of thousands of blocks, or lose small gradients)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def unkept_sums(stats: torch.Tensor, kept: torch.Tensor, *, per_key_block: bool = False,
                precision: str | None = None) -> torch.Tensor:
    """Σ over the blocks a routing did not keep, as one product with the complement of `kept`, accumulated
    in fp32 and returned in `sums_dtype(stats.dtype)`.

    `stats`: B·H×n_k×C per key block (the forward's s_j), or with `per_key_block` B·H×n_q×C per query block
    (the backward's ds_i); `kept`: the routing's B×H×n_q×n_k mask. Returns per query block Σ_{j not kept}
    s_j (B·H×n_q×C), or with `per_key_block` per key block Σ_{i that did not keep it} ds_i (B·H×n_k×C).
    """
    B, H, n_q, n_k = kept.shape
    flags = kept.view(torch.uint8).flatten(0, 1)
    s_bh, s_q, s_k = flags.stride()
    rows, red, s_row, s_red = (n_k, n_q, s_k, s_q) if per_key_block else (n_q, n_k, s_q, s_k)
    C = stats.shape[-1]
    out = torch.empty(B * H, rows, C, device=stats.device, dtype=sums_dtype(stats.dtype))
    tile_m, tile_n, tile_k = UNKEPT_TILES
    _unkept_sum_kernel[(triton.cdiv(rows, tile_m), triton.cdiv(C, tile_n), B * H)](
        flags, stats.contiguous(), out, s_bh, s_row, s_red, rows, red, C, TILE_M=tile_m, TILE_N=tile_n, TILE_K=tile_k,
        PREC=precision or _precision(stats.dtype), num_warps=4)
    return out


def route_pooled(q: torch.Tensor, k_bar: torch.Tensor, *, topk: float, block_q: int, block_k: int,
                 proj_q: torch.Tensor | None, proj_k: torch.Tensor | None) -> Routing:
    """The reference router's kept blocks (indices B×H×n_q×kk, ascending, int32, and the kept mask) from
    `linear_stats`' key-block means, in one Triton launch and no torch op.

    (q̄ W_qᵀ)·(k̄_j W_kᵀ) = (q̄ W_qᵀ W_k)·k̄_j, so the kernel maps each pooled query through both projections
    (in fp32, also under autocast; one absent projection is the identity) and 1/√D is applied in-kernel. k
    is not centred: that shifts each query block's scores by one constant and changes no decision, so the
    returned scores differ from the reference router's by a constant per row.
    """
    B, H, N, D = q.shape
    n_q, n_k = num_blocks(N, block_q), k_bar.shape[1]
    kk = keep_count(topk, n_k)
    proj = proj_q is not None or proj_k is not None
    if proj and (proj_q is None or proj_k is None):
        eye = torch.eye(D, device=q.device)
        proj_q, proj_k = (eye if p is None else p for p in (proj_q, proj_k))
    # the kernel reads both D×D projections through one pair of strides (contiguous parameters: no copy)
    pq, pk = (proj_q.detach().contiguous(), proj_k.detach().contiguous()) if proj else (k_bar, k_bar)
    scores = torch.empty(B, H, n_q, n_k, device=q.device, dtype=torch.float32)
    indices = torch.empty(B, H, n_q, kk, device=q.device, dtype=torch.int32)
    kept = torch.empty(B, H, n_q, n_k, device=q.device, dtype=torch.bool)
    _route_kernel[(n_q, B * H)](
        q, k_bar, pq, pk, scores, indices, kept.view(torch.uint8), *q.stride(), *pq.stride()[-2:], H, N, n_q, n_k, kk,
        1.0 / math.sqrt(D), D=D, ROW_ALIGN=_row_align(q), BLOCK_Q=block_q, D_PAD=_d_pad(D),
        NK_PAD=triton.next_power_of_2(n_k), CHUNK=ROUTE_CHUNK, PROJ=proj, PROJ_ROWS=PROJ_ROWS, num_warps=2)
    return Routing(scores=scores, indices=indices, mask=kept)


def _num_warps(block_q: int, d: int) -> int:
    """Warps of the fused kernel. Measured on an H200 (bench/RESULTS.md): 8 for 128-row query blocks of
    padded head dim 128 (4 is twice as slow there), 4 elsewhere (8 is 10-25% slower at D = 64)."""
    return 8 if block_q >= 128 and _d_pad(d) >= 128 else 4


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


class LowBit(NamedTuple):
    """K and V as the low-bit sparse branch reads them (`quantise_kv`)."""

    k: torch.Tensor  # INT8, B·H×N_pad×D_pad: K minus its mean over tokens, one scale per key block
    k_scale: torch.Tensor  # fp32, B·H×n_k
    v_t: torch.Tensor  # FP8 e4m3, B·H×D_pad×N_pad: V transposed, one scale per channel
    v_scale: torch.Tensor  # fp32, B·H×D


def lowbit_problem(q: torch.Tensor, block_q: int, block_k: int) -> str | None:
    """Why the low-bit sparse branch cannot run these inputs (None: it can): it needs FP8 tensor cores
    (compute capability 8.9 or newer) and blocks the FP8 and INT8 products take (at least 32 keys per block,
    head dims over 16)."""
    if q.is_cuda and torch.cuda.get_device_capability(q.device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(q.device)
        return f"FP8 needs compute capability 8.9 or newer; this GPU has {major}.{minor}"
    if block_k < 32 or block_q < 16:
        return f"the low-bit products need blocks of at least 16 queries and 32 keys, not {block_q}/{block_k}"
    if q.shape[-1] <= 16:
        return f"the low-bit products need head dims over 16, not {q.shape[-1]}"
    return None


def quantise_kv(k: torch.Tensor, v: torch.Tensor, block_k: int, k_bar: torch.Tensor | None = None,
                v_max: torch.Tensor | None = None) -> LowBit:
    """K in INT8 after subtracting its mean over tokens (softmax ignores it, INT8's range does not) with one
    scale per key block, V in FP8 e4m3 with one scale per channel: the scales of `sla2.quant`, as the
    QAT reference applies them. K's mean and V's channel maxima come from `linear_stats`' block means `k_bar`
    and block maxima `v_max` where both are given (one small launch), else from torch passes over K and V;
    then one launch."""
    B, H, N, D = k.shape
    n_k, d_pad = num_blocks(N, block_k), _d_pad(D)
    n_pad = n_k * block_k
    if k_bar is None or v_max is None:
        k_mean = k.mean(-2, dtype=torch.float32).reshape(B * H, D)
        v_scale = (torch.linalg.vector_norm(v, float("inf"), dim=-2, dtype=torch.float32).clamp_min(1e-12)
                   / FP8_E4M3_MAX).reshape(B * H, D)
    else:
        k_mean = torch.empty(B * H, D, device=k.device, dtype=torch.float32)
        v_scale = torch.empty_like(k_mean)
        _scales_kernel[(B * H,)](k_bar, v_max, k_mean, v_scale, N, n_k, D=D, BLOCK_K=block_k, D_PAD=d_pad,
                                 CHUNK=32, V_DIV=FP8_E4M3_MAX, num_warps=4)
    low = LowBit(torch.empty(B * H, n_pad, d_pad, device=k.device, dtype=torch.int8),
                 torch.empty(B * H, n_k, device=k.device, dtype=torch.float32),
                 torch.empty(B * H, d_pad, n_pad, device=k.device, dtype=torch.float8_e4m3fn), v_scale)
    _quantise_kernel[(n_k, B * H)](
        k, v, k_mean, low.v_scale, low.k, low.k_scale, low.v_t, *k.stride(), *v.stride(), H, N, n_k, D=D,
        ROW_ALIGN=_row_align(k, v), BLOCK_K=block_k, D_PAD=d_pad, num_warps=4)
    return low


def _indices(routing: Routing) -> torch.Tensor:
    idx = routing.indices
    return idx if idx.dtype == torch.int32 and idx.is_contiguous() else idx.to(torch.int32).contiguous()


def sla2_forward(q, k, v, alpha, routing: Routing, stats: torch.Tensor | None, *, block_q: int, block_k: int,
                 feature_map: str, save: bool = False, num_warps: int | None = None,
                 num_stages: int | None = None, wq: torch.Tensor | None = None,
                 mix_scale: torch.Tensor | None = None, low_bit: LowBit | None = None):
    """The unkept sums and the fused kernel; `stats` (`linear_stats`) None means every key block is kept
    (output = O_sparse). With `low_bit` (`quantise_kv`) the sparse branch runs in INT8 / FP8.

    Returns O, or with `save` (O, O_sparse, lse) for the backward: B·H×N×D and B·H×N (log2 units).
    `wq` (H×D×R): a learned feature map W_q (φ then reads q·W_q, computed in the kernel); `mix_scale` (H,):
    α per query. α, W_q and the mix scale are read as they are (any float dtype, through their strides): no
    torch op before the launches.
    """
    B, H, N, D = q.shape
    R = D if wq is None else wq.shape[-1]
    w = _weights(q, wq)
    mix = alpha if mix_scale is None else mix_scale
    n_q, kk = num_blocks(N, block_q), routing.indices.shape[-1]
    out = _alloc_like_layout(q)
    o_s = torch.empty(B * H, N, D, device=q.device, dtype=q.dtype) if save else out
    lse = torch.empty(B * H, N, device=q.device, dtype=torch.float32) if save else out
    rest = unkept_sums(stats, routing.mask, precision=_precision(q.dtype)) if stats is not None else out
    extra = {} if num_stages is None else {"num_stages": num_stages}
    low = low_bit or LowBit(out, out, out, out)
    _sla2_fwd_kernel[(n_q, B * H)](
        q, k, v, w, out, _indices(routing), alpha, mix, rest, o_s, lse, *low, *q.stride(), *k.stride(),
        *v.stride(), *w.stride(), *out.stride(), *_alpha_strides(alpha, H, n_q), mix.stride(0), H, N, n_q,
        num_blocks(N, block_k), kk, 1.0 / math.sqrt(D) * math.log2(math.e), D=D, R=R,
        ROW_ALIGN=_row_align(q, k, v, out), BLOCK_Q=block_q, BLOCK_K=block_k, D_PAD=_d_pad(D), R_PAD=_d_pad(R),
        FEATURE=FEATURE_IDS[feature_map], LEARNED=wq is not None, LINEAR=stats is not None, MIX=mix_scale is not None,
        PREC=_precision(q.dtype), SAVE=save, QUANT=low_bit is not None,
        num_warps=num_warps or _num_warps(block_q, D), **extra)
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


def sla2_backward(grad_out, q, k, v, alpha, routing: Routing, stats: torch.Tensor | None, o_s, lse, *,
                  block_q: int, block_k: int, feature_map: str, wq=None, wk=None, mix_scale=None,
                  num_warps: int | None = None, num_stages: int = 1):
    """dq, dk, dv (B×H×N×D), dW_q, dW_k (the learned feature maps' shapes and dtypes; None without them), dα
    (alpha's shape) and d`mix_scale` (None without it) of the SLA2 forward on the same routing. `num_warps`
    and `num_stages` are the two kernels' launch settings (None: 8 warps at padded head dim 128, else 4)."""
    B, H, N, D = q.shape
    R = D if wq is None else wq.shape[-1]
    learned, mix = wq is not None, mix_scale is not None
    n_q, n_k, kk = num_blocks(N, block_q), num_blocks(N, block_k), routing.indices.shape[-1]
    a, a_strides = alpha.detach(), _alpha_strides(alpha, H, n_q)
    idx = _indices(routing)
    linear = stats is not None
    dev = q.device
    prec = _precision(q.dtype)
    dq, dk, dv = (torch.empty(B, H, N, D, device=dev, dtype=q.dtype) for _ in range(3))
    delta = torch.empty(B * H, N, device=dev, dtype=torch.float32)
    d_alpha = torch.zeros(B * H, n_q, device=dev, dtype=torch.float32)
    rest = unkept_sums(stats, routing.mask, precision=prec) if linear else delta
    d_stats = (torch.empty(B * H, n_q, R * D + R, device=dev, dtype=sums_dtype(q.dtype)) if linear
               else delta)
    d_fq, d_fk = ((torch.zeros(B, H, N, R, device=dev, dtype=torch.float32) for _ in range(2)) if learned
                  else (delta, delta))
    d_mix = torch.zeros(B * H, n_q, device=dev, dtype=torch.float32) if mix else delta
    a_row = torch.empty(B * H, N, device=dev, dtype=torch.float32) if mix else delta
    c = mix_scale.detach() if mix else delta
    w_q, w_k = _weights(q, wq), _weights(k, wk)
    common = dict(D=D, R=R, BLOCK_Q=block_q, BLOCK_K=block_k, D_PAD=_d_pad(D), R_PAD=_d_pad(R),
                  FEATURE=FEATURE_IDS[feature_map], LEARNED=learned, LINEAR=linear, MIX=mix, PREC=prec,
                  num_warps=num_warps or (8 if _d_pad(D) >= 128 else 4), num_stages=num_stages)
    scales = (1.0 / math.sqrt(D) * math.log2(math.e), 1.0 / math.sqrt(D))
    _bwd_query_kernel[(n_q, B * H)](
        q, k, v, w_q, grad_out, o_s, lse, idx, a, c, rest, dq, d_fq, d_stats, d_alpha, d_mix, a_row, delta,
        *q.stride(), *k.stride(), *v.stride(), *w_q.stride(), *grad_out.stride(), *a_strides, c.stride(0), H, N, n_q,
        kk, *scales, **common)
    offsets, query_blocks = reverse_index(idx, n_k)
    d_rest = unkept_sums(d_stats, routing.mask, per_key_block=True, precision=prec) if linear else delta
    _bwd_key_kernel[(n_k, B * H)](
        q, k, v, w_k, grad_out, lse, delta, a, a_row, offsets, query_blocks, d_rest, dk, dv,
        d_fk, *q.stride(), *k.stride(), *v.stride(), *w_k.stride(), *grad_out.stride(), *a_strides, H, N, n_q, n_k,
        *scales, **common)
    d_alpha = d_alpha.view(B, H, n_q).sum(0)
    if alpha.dim() == 1:
        d_alpha = d_alpha.sum(-1)
    d_mix = d_mix.view(B, H, n_q).sum((0, 2)).to(mix_scale.dtype) if mix else None
    d_wq = d_wk = None
    if learned:  # F = x·W: dx += dF·Wᵀ, dW = Σ xᵀ·dF, in fp32
        dq, d_wq = _through_features(q, dq, wq, d_fq)
        dk, d_wk = _through_features(k, dk, wk, d_fk)
    return dq, dk, dv, d_wq, d_wk, d_alpha.to(alpha.dtype), d_mix


def _through_features(x: torch.Tensor, dx: torch.Tensor, w: torch.Tensor, d_f: torch.Tensor):
    """dx and dW of a feature input F = x·W (B×H×N×R) from its gradient d_f (fp32)."""
    dx = (dx.float() + torch.einsum("bhnr,hdr->bhnd", d_f, w.float())).to(dx.dtype)
    return dx, torch.einsum("bhnd,bhnr->hdr", x.float(), d_f).to(w.dtype)


class _SLA2Function(torch.autograd.Function):
    """Triton forward and backward on one routing (no gradient flows through the hard top-k). `wq`, `wk`:
    a learned feature map W_q, W_k (None: φ reads q, k); `mix_scale`: α per query (None)."""

    @staticmethod
    def forward(ctx, q, k, v, wq, wk, alpha, mix_scale, routing, stats, block_q, block_k, feature_map):
        ctx.block_q, ctx.block_k, ctx.feature_map = block_q, block_k, feature_map
        ctx.routing, ctx.stats = routing, stats
        options = dict(block_q=block_q, block_k=block_k, feature_map=feature_map, wq=wq, mix_scale=mix_scale)
        if not any(ctx.needs_input_grad[:7]):
            return sla2_forward(q, k, v, alpha, routing, stats, **options)
        out, o_s, lse = sla2_forward(q, k, v, alpha, routing, stats, save=True, **options)
        ctx.save_for_backward(q, k, v, wq, wk, alpha, mix_scale, o_s, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, wq, wk, alpha, mix_scale, o_s, lse = ctx.saved_tensors
        dq, dk, dv, d_wq, d_wk, d_alpha, d_mix = sla2_backward(
            grad_out, q, k, v, alpha, ctx.routing, ctx.stats, o_s, lse, block_q=ctx.block_q, block_k=ctx.block_k,
            feature_map=ctx.feature_map, wq=wq, wk=wk, mix_scale=mix_scale)
        linear = ctx.stats is not None
        grads = (dq, dk, dv, d_wq, d_wk, d_alpha if linear else None, d_mix if linear else None)
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:7])) + (None,) * 5


def sla2_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, topk: float, alpha: torch.Tensor,
                block_q: int = 64, block_k: int = 64, proj_q: torch.Tensor | None = None,
                proj_k: torch.Tensor | None = None, feature_map: str = "softmax", qat: bool = False,
                routing: Routing | None = None, return_stats: bool = False, **learned):
    """`sla2_reference` computed by the Triton kernels, learned parts (feature_q, feature_k, mix_scale)
    included. QAT runs the low-bit sparse branch where `lowbit_problem` allows, and trains as the reference
    does (the low-bit forward's value, the full-precision kernels' gradients). `return_stats`, and QAT where
    the low-bit branch cannot run, go to the reference, so the backend stays a drop-in for every call."""
    learned = {name: t for name, t in learned.items() if t is not None}
    options = dict(topk=topk, alpha=alpha, block_q=block_q, block_k=block_k, proj_q=proj_q, proj_k=proj_k,
                   feature_map=feature_map, routing=routing, **learned)
    if return_stats or (qat and lowbit_problem(q, block_q, block_k)):
        return sla2_reference(q, k, v, qat=qat, return_stats=return_stats, **options)
    if qat and requires_grad(q, k, v, alpha, proj_q, proj_k, *learned.values(), routing and routing.scores):
        return straight_through_qat(sla2_triton, q, k, v, **options)
    if not 0.0 < topk <= 1.0:
        raise ValueError(f"topk must be in (0, 1], got {topk}")
    if feature_map not in FEATURE_IDS:
        raise ValueError(f"unknown feature map {feature_map!r}; choose one of: {', '.join(FEATURE_IDS)}")
    B, H, N, D = q.shape
    n_q, n_k = num_blocks(N, block_q), num_blocks(N, block_k)
    kk = routing.kept_per_query_block if routing is not None else keep_count(topk, n_k)
    stats = k_bar = v_max = None  # None: every key block kept (no linear branch; quantise_kv passes over K, V)
    wq, wk = learned.get("feature_q"), learned.get("feature_k")
    check_features(wq, wk)
    if kk < n_k:
        stats, k_bar, v_max = linear_stats(k, v, block_k, feature_map, wk, v_max=qat)
        if routing is None:
            routing = route_pooled(q, k_bar, topk=topk, block_q=block_q, block_k=block_k, proj_q=proj_q,
                                   proj_k=proj_k)
    elif routing is None:  # every block kept: equal scores, an all-true mask, as views of single values
        shape = (B, H, n_q, n_k)
        routing = Routing(scores=torch.zeros((), device=q.device).expand(shape),
                          indices=torch.arange(n_k, device=q.device, dtype=torch.int32).expand(shape),
                          mask=torch.ones((), device=q.device, dtype=torch.bool).expand(shape))
    routing = Routing(routing.scores, _indices(routing), routing.mask)  # int32 once, for forward and backward
    mix_scale = learned.get("mix_scale")
    if not requires_grad(q, k, v, wq, wk, alpha, mix_scale):
        return sla2_forward(q, k, v, alpha, routing, stats, block_q=block_q, block_k=block_k, feature_map=feature_map,
                            wq=wq, mix_scale=mix_scale,  # inference: no autograd Function to set up
                            low_bit=quantise_kv(k, v, block_k, k_bar, v_max) if qat else None)
    return _SLA2Function.apply(q, k, v, wq, wk, alpha, mix_scale, routing, stats, block_q, block_k, feature_map)
