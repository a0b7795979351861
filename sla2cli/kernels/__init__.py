"""Triton kernels for SLA2; importing this registers them as the "triton" backend (`sla2cli.sla2.backends`).

The backend serves CUDA tensors with head dims up to 128 (fp32, fp16, bf16) and the feature maps the kernels
implement, and QAT with the low-bit sparse branch where the GPU has FP8 (`lowbit_problem`). `return_stats`
has no kernel: `sla2_triton` hands it (and QAT elsewhere) to the reference, so "auto" picks the reference.
Without Triton this import fails; `sla2cli.sla2.backends` then keeps the reference.
"""

from __future__ import annotations

import torch

from ..sla2.backends import Backend, register
from .function import lowbit_problem, sla2_triton
from .sla2_triton import FEATURE_IDS

MAX_HEAD_DIM = 128

BACKEND = Backend("triton", sla2_triton, devices=frozenset({"cuda"}),
                  dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}), max_head_dim=MAX_HEAD_DIM,
                  feature_maps=frozenset(FEATURE_IDS), qat=True, return_stats=False, reference_fallback=True,
                  qat_problem=lowbit_problem)

register(BACKEND)
