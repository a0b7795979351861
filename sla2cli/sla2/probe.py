"""Recording the q, k, v a model's attention layers see when every layer runs dense (and its output).

Calibration, `stats --measure` and fine-tuning all compare SLA2 with dense attention on the dense
model's own activations (layer-local: errors of earlier layers do not compound).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..models.jit import DenseAttention
from .layers import transformer_blocks


@contextmanager
def dense_cores(model: nn.Module):
    """Temporarily give every block dense attention (the teacher), restoring the cores afterwards."""
    saved = {}
    for i, block in enumerate(transformer_blocks(model)):
        if hasattr(block.attn, "core"):
            saved[i] = block.attn.core
            block.attn.core = DenseAttention()
    try:
        yield model
    finally:
        for i, core in saved.items():
            transformer_blocks(model)[i].attn.core = core


@torch.no_grad()
def record_dense_qkv(model: nn.Module, layers, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor
                     ) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Run the dense model once: each requested layer's (q, k, v), B×H×N×D, and the model's output."""
    captured: dict[int, tuple] = {}
    with dense_cores(model):
        handles = [
            transformer_blocks(model)[i].attn.core.register_forward_hook(
                lambda _m, inputs, _out, i=i: captured.__setitem__(i, tuple(a.detach() for a in inputs)))
            for i in layers]
        try:
            out = model(x, t, y)
        finally:
            for h in handles:
                h.remove()
    return captured, out
