"""Triton kernels for SLA2; importing this registers them as the "triton" backend of `sla2_attention`.

The backend serves CUDA tensors with head dims up to 128 (fp32, fp16, bf16). Without Triton nothing is
registered and `backend="auto"` keeps using the PyTorch reference.
"""

from __future__ import annotations

import torch

from ..sla2.attention import register_backend

try:
    from .function import sla2_triton
except ImportError:  # Triton missing: the reference stays the only backend
    sla2_triton = None

MAX_HEAD_DIM = 128


def available(q: torch.Tensor) -> bool:
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and q.shape[-1] <= MAX_HEAD_DIM)


if sla2_triton is not None:
    register_backend("triton", sla2_triton, available)
