"""Fake quantisation for SLA2's QAT: the forward sees INT8 Q/K and FP8 P/V, the backward sees full precision.

Every function returns x + (quantise(x) − x).detach(): a straight-through estimator, so gradients flow
to the original tensors unchanged while the forward value matches what the low-bit kernel computes
(`sla2_reference` with `qat` goes further: its whole output is straight-through, the kernels' way).
"""

from __future__ import annotations

import torch

INT8_MAX = 127.0
FP8_E4M3_MAX = 448.0


def _straight_through(x: torch.Tensor, quantised: torch.Tensor) -> torch.Tensor:
    return x + (quantised - x).detach()


def int8_per_block(x: torch.Tensor, block_dims: tuple[int, ...]) -> torch.Tensor:
    """Symmetric INT8 with one scale per block; `block_dims` are the dims a scale covers (tokens, channels)."""
    scale = x.detach().abs().amax(dim=block_dims, keepdim=True).clamp_min(1e-12) / INT8_MAX
    return _straight_through(x, (x / scale).round().clamp(-INT8_MAX, INT8_MAX) * scale)


def fp8_e4m3(x: torch.Tensor, reduce_dims: tuple[int, ...]) -> torch.Tensor:
    """FP8 e4m3 with one scale (max |x| / 448) over `reduce_dims`."""
    scale = x.detach().abs().amax(dim=reduce_dims, keepdim=True).clamp_min(1e-12) / FP8_E4M3_MAX
    quantised = (x / scale).to(torch.float8_e4m3fn).to(x.dtype) * scale
    return _straight_through(x, quantised)


def fp8_online_probabilities(s: torch.Tensor) -> torch.Tensor:
    """softmax(s) over the last two dims (kept blocks × their keys), with each block's probabilities in FP8
    as a flash kernel forms them: relative to the running row max after that block, exp(s − m_t) ∈ [0, 1]
    scaled by the format's max and rounded, then weighted by exp(m_t − m_last) and divided by the exact
    normaliser. Quantising the normalised probabilities instead would need the row's final max (a second
    pass over the scores). Blocks are visited in their order along dim −2. Straight-through."""
    m = s.detach().amax(-1).cummax(-1).values  # the running max after each block: ...×T
    p_block = torch.exp(s.detach() - m[..., None])
    weight = torch.exp(m - m[..., -1:])
    norm = (p_block.sum(-1) * weight).sum(-1)
    rounded = (p_block * FP8_E4M3_MAX).to(torch.float8_e4m3fn).to(s.dtype) / FP8_E4M3_MAX
    quantised = rounded * (weight / norm[..., None])[..., None]
    return _straight_through(torch.softmax(s.flatten(-2), -1), quantised.flatten(-2))
