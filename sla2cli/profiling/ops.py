"""The SLA2 forward as one `torch.library` custom op, with the FLOP formula of what it executes.

`sla2cli::sla2_attention` computes exactly `sla2_attention` (any backend). It is registered with
`torch.utils.flop_counter`, and `FVCORE_HANDLES` gives fvcore the same formula (and one for SDPA, which
fvcore does not count by itself), so both counters agree. `through_custom_op()` routes gradient-free
`SLA2Attention` forwards through the op; training never goes through it.

Convention (the one `torch.utils.flop_counter` uses for matrix products and SDPA): FLOPs = 2 per
multiply-add of a matrix product; softmax, feature maps, pooling, norms and element-wise work are not
counted. Blocks are counted whole (a partial last block is padded, as both backends execute it) at the
logical head dim D.
"""

# No `from __future__ import annotations`: custom_op reads the schema from real annotations.

import math
from contextlib import contextmanager
from typing import Optional

import torch
from torch.utils.flop_counter import flop_registry, register_flop_formula

from ..sla2 import attention as _attention
from ..sla2.attention import sla2_attention
from ..sla2.routing import keep_count, num_blocks

OP_NAME = "sla2cli::sla2_attention"


def sla2_flops(batch: int, heads: int, tokens: int, head_dim: int, *, topk: float, block_q: int = 64,
               block_k: int = 64, router_projections: bool = True, backend: str = "torch",
               feature_rank: int = 0) -> dict[str, int]:
    """FLOPs one SLA2 forward executes, by part: router, sparse (kept blocks only), linear, and total.

    router:  q̄ W_qᵀ and k̄ W_kᵀ on pooled blocks, then the n_q×n_k block scores; the Triton kernels fold the
             projections into one D×D matrix W_kᵀW_q per head applied to the n_k key-block means only.
    sparse:  q·kᵀ and P·v over the kk kept key blocks of every query block.
    linear:  with a learned feature map of rank r, q·W_q and k·W_k (N×D×r each; r = D without one);
             h_j = φ(K_j)ᵀV_j for every key block, the unkept blocks' statistics summed as one masked
             product (n_q×n_k×r(D+1)), and φ(Q_i)·[h, z] of those sums.
    """
    B, H, N, D = batch, heads, tokens, head_dim
    n_q, n_k = num_blocks(N, block_q), num_blocks(N, block_k)
    kk = keep_count(topk, n_k)
    R = feature_rank or D
    reference = backend != "triton"  # QAT's low-bit branch executes the Triton path's products
    router = 2 * B * H * n_q * n_k * D
    if router_projections:
        router += 2 * B * H * (n_q + n_k) * D * D if reference else 2 * H * D ** 3 + 2 * B * H * n_k * D * D
    sparse = 4 * B * H * (n_q * block_q) * (kk * block_k) * D
    linear = 0
    if kk < n_k:
        linear = 2 * B * H * (n_k * block_k) * R * D + 2 * B * H * (n_q * block_q) * R * (D + 1)
        if feature_rank:
            linear += 2 * B * H * (n_q * block_q + n_k * block_k) * D * R
        linear += 2 * B * H * n_q * n_k * R * (D + 1)
    return {"router": router, "sparse": sparse, "linear": linear, "total": router + sparse + linear,
            "kept_blocks": kk, "key_blocks": n_k}


def dense_attention_flops(batch: int, heads: int, tokens_q: int, tokens_k: int, head_dim: int,
                          head_dim_v: int | None = None) -> int:
    """softmax(q kᵀ) v: 2·B·H·N·S·D for q kᵀ plus 2·B·H·N·S·D_v for P v (4·B·H·N²·D when square)."""
    return 2 * batch * heads * tokens_q * tokens_k * (head_dim + (head_dim_v or head_dim))


@torch.library.custom_op(OP_NAME, mutates_args=())
def sla2_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor,
                      proj_q: Optional[torch.Tensor], proj_k: Optional[torch.Tensor], topk: float, block_q: int,
                      block_k: int, feature_map: str, qat: bool, backend: str,
                      feature_q: Optional[torch.Tensor] = None, feature_k: Optional[torch.Tensor] = None,
                      mix_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`sla2_attention` as one opaque op (forward only; use it where no gradient is needed)."""
    return sla2_attention(q, k, v, topk=topk, alpha=alpha, block_q=block_q, block_k=block_k, proj_q=proj_q,
                          proj_k=proj_k, feature_map=feature_map, qat=qat, backend=backend, feature_q=feature_q,
                          feature_k=feature_k, mix_scale=mix_scale)


@sla2_attention_op.register_fake
def _(q, k, v, alpha, proj_q, proj_k, topk, block_q, block_k, feature_map, qat, backend, feature_q=None,
      feature_k=None, mix_scale=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@register_flop_formula(torch.ops.sla2cli.sla2_attention)
def _sla2_flop_formula(q_shape, k_shape, v_shape, alpha_shape, proj_q_shape, proj_k_shape, topk, block_q, block_k,
                       feature_map, qat, backend, feature_q_shape=None, *args, out_shape=None, **kwargs) -> int:
    B, H, N, D = q_shape
    return sla2_flops(B, H, N, D, topk=topk, block_q=block_q, block_k=block_k,
                      router_projections=proj_q_shape is not None, backend=backend,
                      feature_rank=feature_q_shape[-1] if feature_q_shape is not None else 0)["total"]


# Older torch releases count SDPA on CUDA but not its fused CPU kernel; give it the same formula there.
_CPU_SDPA = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
if _CPU_SDPA is not None and _CPU_SDPA not in flop_registry:
    @register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flop_formula(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        batch = math.prod(query_shape[:-2])
        return dense_attention_flops(batch, 1, query_shape[-2], key_shape[-2], query_shape[-1], value_shape[-1])


@contextmanager
def through_custom_op():
    """Within the block, gradient-free `SLA2Attention` forwards run as `sla2cli::sla2_attention`."""
    previous = _attention.set_inference_op(torch.ops.sla2cli.sla2_attention)
    try:
        yield
    finally:
        _attention.set_inference_op(previous)


# --- fvcore handles. fvcore counts one per multiply-add (its "flops" are MACs); `flops.py` doubles its
# totals, so these return half of the FLOP formulas above and the two counters agree exactly.

def _fv_shape(value) -> list[int]:
    return value.type().sizes()


def _fvcore_sdpa(inputs, outputs) -> int:
    q, k, v = (_fv_shape(x) for x in inputs[:3])
    batch = math.prod(q[:-2])
    return dense_attention_flops(batch, 1, q[-2], k[-2], q[-1], v[-1]) // 2


def _fvcore_sla2(inputs, outputs) -> int:
    B, H, N, D = _fv_shape(inputs[0])
    topk, block_q, block_k, feature_map, qat, backend = (x.toIValue() for x in inputs[6:12])
    has_proj = inputs[4].type().kind() != "NoneType"
    rank = _fv_shape(inputs[12])[-1] if len(inputs) > 12 and inputs[12].type().kind() != "NoneType" else 0
    return sla2_flops(B, H, N, D, topk=topk, block_q=block_q, block_k=block_k, router_projections=has_proj,
                      backend=backend, feature_rank=rank)["total"] // 2


def _fvcore_einsum(inputs, outputs) -> int:
    """fvcore charges a one-operand einsum (a permutation, as in unpatchify) its size; torch counts 0."""
    from fvcore.nn.jit_handles import einsum_flop_jit
    if len(list(inputs[1].node().inputs())) < 2:
        return 0
    return einsum_flop_jit(inputs, outputs)


FVCORE_HANDLES = {
    "aten::scaled_dot_product_attention": _fvcore_sdpa,
    OP_NAME: _fvcore_sla2,
    "aten::einsum": _fvcore_einsum,
}
