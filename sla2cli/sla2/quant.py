"""Fake quantisation for SLA2's QAT: the forward sees INT8 Q/K and FP8 P/V, the backward sees full precision.

The quantisers return the values the low-bit kernels compute with (dequantised, in x's dtype). The
backward is not theirs: `straight_through_qat` gives an SLA2 forward's low-bit value with the gradients of
the same forward in full precision (the paper's QAT), for the reference and the kernels alike.
"""

from __future__ import annotations

from typing import Callable

import torch

INT8_MAX = 127.0
FP8_E4M3_MAX = 448.0


def straight_through_qat(sla2: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options):
    """`sla2(q, k, v, qat=True, **options)`'s value with the gradients of `sla2(q, k, v, **options)`: the
    low-bit forward, the full-precision backward. With `return_stats`, the low-bit forward's statistics."""
    stats = options.pop("return_stats", False)
    exact = sla2(q, k, v, **options)
    with torch.no_grad():
        low = sla2(q, k, v, qat=True, return_stats=stats, **options)
    out = exact + ((low[0] if stats else low) - exact).detach()
    return (out, low[1]) if stats else out


def int8_per_block(x: torch.Tensor, block_dims: tuple[int, ...]) -> torch.Tensor:
    """Symmetric INT8 with one scale per block; `block_dims` are the dims a scale covers (tokens, channels).
    Scaled by the reciprocal (one division per block, as the kernels do it), not a division per element."""
    scale = x.detach().abs().amax(dim=block_dims, keepdim=True).clamp_min(1e-12) / INT8_MAX
    return (x * scale.reciprocal()).round().clamp(-INT8_MAX, INT8_MAX) * scale


def fp8_e4m3(x: torch.Tensor, reduce_dims: tuple[int, ...]) -> torch.Tensor:
    """FP8 e4m3 with one scale (max |x| / 448) over `reduce_dims`."""
    scale = x.detach().abs().amax(dim=reduce_dims, keepdim=True).clamp_min(1e-12) / FP8_E4M3_MAX
    return (x * scale.reciprocal()).to(torch.float8_e4m3fn).to(x.dtype) * scale


def fp8_online_probabilities(s: torch.Tensor) -> torch.Tensor:
    """softmax(s) over the last two dims (kept blocks × their keys), with each block's probabilities in FP8
    as a flash kernel forms them: relative to the running row max after that block, exp(s − m_t) ∈ [0, 1]
    scaled by the format's max and rounded, then weighted by exp(m_t − m_last) and divided by the exact
    normaliser. Quantising the normalised probabilities instead would need the row's final max (a second
    pass over the scores). Blocks are visited in their order along dim −2."""
    m = s.amax(-1).cummax(-1).values  # the running max after each block: ...×T
    p_block = torch.exp(s - m[..., None])
    weight = torch.exp(m - m[..., -1:])
    norm = (p_block.sum(-1) * weight).sum(-1)
    rounded = (p_block * FP8_E4M3_MAX).to(torch.float8_e4m3fn).to(s.dtype) / FP8_E4M3_MAX
    return (rounded * (weight / norm[..., None])[..., None]).flatten(-2)
