"""The SLA2 router: which key blocks each query block attends to with exact softmax.

Scores compare block means of q with block means of mean-centred k, each through a learnable D×D
projection shared by the heads (identity at conversion). Each query block keeps its kk best key
blocks, kk = min(n_k, max(1, floor(topk·n_k + 0.5))), so no query block ever keeps zero blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def num_blocks(n: int, block: int) -> int:
    return -(-n // block)


def keep_count(topk: float, n_k: int) -> int:
    """Key blocks kept per query block (never zero, never more than exist)."""
    return min(n_k, max(1, math.floor(topk * n_k + 0.5)))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def block_mean(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over each block of `block` tokens (B×H×N×D → B×H×n_b×D); a partial last block averages its real tokens."""
    n = x.shape[-2]
    nb = num_blocks(n, block)
    sums = F.pad(x, (0, 0, 0, nb * block - n)).unflatten(-2, (nb, block)).sum(-2)
    counts = torch.full((nb, 1), float(block), dtype=x.dtype, device=x.device)
    counts[-1] = n - (nb - 1) * block
    return sums / counts


@dataclass
class Routing:
    """The router's decision: `indices` (B×H×n_q×kk, ascending) and the same as a boolean `mask` (B×H×n_q×n_k)."""

    scores: torch.Tensor
    indices: torch.Tensor
    mask: torch.Tensor

    @property
    def kept_per_query_block(self) -> int:
        return self.indices.shape[-1]


def route(q: torch.Tensor, k: torch.Tensor, *, topk: float, block_q: int, block_k: int,
          proj_q: torch.Tensor | None = None, proj_k: torch.Tensor | None = None) -> Routing:
    """Score pooled query blocks against pooled, mean-centred key blocks and keep the top kk per row."""
    if not 0.0 < topk <= 1.0:
        raise ValueError(f"topk must be in (0, 1], got {topk}")
    dtype = compute_dtype(q)
    qf, kf = q.to(dtype), k.to(dtype)
    q_bar = block_mean(qf, block_q)
    k_bar = block_mean(kf - kf.mean(dim=-2, keepdim=True), block_k)
    if proj_q is not None:
        q_bar = q_bar @ proj_q.to(dtype).T
    if proj_k is not None:
        k_bar = k_bar @ proj_k.to(dtype).T
    scores = q_bar @ k_bar.transpose(-1, -2) / math.sqrt(q.shape[-1])
    kk = keep_count(topk, scores.shape[-1])
    indices = scores.detach().topk(kk, dim=-1).indices.sort(dim=-1).values
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, indices, True)
    return Routing(scores=scores, indices=indices, mask=mask)
