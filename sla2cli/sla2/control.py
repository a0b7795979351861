"""Run-time switches on a converted model: QAT on/off, top-k, a frozen or trainable router.

Plain functions over `sla2_layers(model)`, so training code (the Lightning callbacks, finetune, a
user's own loop) changes SLA2 behaviour without knowing where the layers live.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from .layers import sla2_layers


def _update(model: nn.Module, **changes) -> list[int]:
    layers = sla2_layers(model)
    for core in layers.values():
        core.config = dataclasses.replace(core.config, **changes)
    return sorted(layers)


def enable_qat(model: nn.Module) -> list[int]:
    """Fake-quantise the sparse branch (INT8 QK, FP8 PV) in every converted layer; returns the layers."""
    return _update(model, qat=True)


def disable_qat(model: nn.Module) -> list[int]:
    return _update(model, qat=False)


def set_topk(model: nn.Module, topk: float) -> list[int]:
    """Change the kept fraction of key blocks in every converted layer (a top-k schedule's step)."""
    return _update(model, topk=topk)


def freeze_router(model: nn.Module, frozen: bool = True) -> list[int]:
    """Stop (or restart) gradients to W_q and W_k, as SLA2's second stage does; α stays trainable."""
    layers = sla2_layers(model)
    for core in layers.values():
        core.proj_q.requires_grad_(not frozen)
        core.proj_k.requires_grad_(not frozen)
    return sorted(layers)
