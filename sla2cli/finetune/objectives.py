"""The losses: layer-local distillation of the router and α (stage 1), JiT's v-loss (stage 2).

Stage 1 compares each converted layer's SLA2 output with dense attention on the dense teacher's own
q, k, v at that layer, so errors of earlier layers do not compound and every layer trains at once.
Losses are means over samples of per-sample quantities: K processes averaging their gradients then
give exactly the gradient of one process holding the whole batch.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion import v_loss
from ..sla2.attention import SLA2Attention
from ..sla2.layers import transformer_blocks
from ..sla2.stats import relative_squared_error
from .softtopk import soft_topk_attention


def _touch(params) -> torch.Tensor:
    """0 × every trainable parameter: a step where nothing is routed (topk 1 keeps every block) still has
    a gradient (of zeros), so the optimiser and DistributedDataParallel see every parameter every step."""
    params = [p for p in params if p.requires_grad]
    return torch.stack([p.sum() for p in params]).sum() * 0.0 if params else torch.zeros(())


class _SoftTopkCore(nn.Module):
    """Stands in for an SLA2 core during an end-to-end pass: the same parameters, SoftTop-k gradients."""

    def __init__(self, core: SLA2Attention, topk: float, tau: float):
        super().__init__()
        self.core, self.topk, self.tau = core, topk, tau

    def forward(self, q, k, v):
        return soft_topk_attention(self.core, q, k, v, topk=self.topk, tau=self.tau)


@contextmanager
def soft_topk_cores(model: nn.Module, cores: dict[int, SLA2Attention], topk: dict[int, float], tau: float):
    blocks = transformer_blocks(model)
    for i, core in cores.items():
        blocks[i].attn.core = _SoftTopkCore(core, topk[i], tau)
    try:
        yield model
    finally:
        for i, core in cores.items():
            blocks[i].attn.core = core


class RouterDistillation(nn.Module):
    """Stage 1's trainable part (each converted layer's W_q, W_k, α and learned feature maps) and its loss.

    forward(qkv, topk, ...) → (loss, per-layer losses, end-to-end loss). `objective` "layer": the mean over
    layers of the relative squared error of SLA2 against dense attention on the teacher's q, k, v; "distill":
    the squared error of the whole model's velocity against the dense teacher's on the same input (the
    per-layer errors are then only measured, and only when `measure`: they cost a second pass through every
    layer's attention). Plus `e2e_weight` × the relative squared error of the whole model's output against the
    dense teacher's.
    """

    def __init__(self, model: nn.Module, cores: dict[int, SLA2Attention], objective: str = "layer"):
        super().__init__()
        self.layers = sorted(cores)
        self.cores = nn.ModuleDict({str(i): cores[i] for i in self.layers})
        self.objective = objective
        self._model = (model,)  # not a submodule: its frozen weights are no part of what trains

    def forward(self, qkv: dict, topk: dict[int, float], tau: float, e2e_weight: float = 0.0, z=None, t=None,
                y=None, teacher_out=None, autocast=None, measure: bool = True):
        per_layer = []
        measured = self.layers if measure or self.objective == "layer" else []  # "layer": they are the loss
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.objective == "layer"):
            for i in measured:
                q, k, v = qkv[i]
                target = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
                out = soft_topk_attention(self.cores[str(i)], q, k, v, topk=topk[i], tau=tau)
                per_layer.append(relative_squared_error(out, target).mean())
        loss = _touch(self.parameters())
        per_layer = torch.stack(per_layer) if per_layer else loss.new_zeros(0)
        pred = None
        if self.objective == "distill" or e2e_weight > 0:
            model = self._model[0]
            cores = {i: self.cores[str(i)] for i in self.layers}
            with soft_topk_cores(model, cores, topk, tau), autocast():
                pred = model(z, t, y)
        loss = loss + (per_layer.mean() if self.objective == "layer" else v_loss(pred, teacher_out, z, t).mean())
        e2e = torch.zeros((), device=loss.device)
        if e2e_weight > 0:
            e2e = relative_squared_error(pred, teacher_out).mean()
            loss = loss + e2e_weight * e2e
        return loss, per_layer.detach(), e2e.detach()


class FullFinetune(nn.Module):
    """Stage 2: every weight but the router. `objective` "v": JiT's v-loss; "distill": the squared error of
    the velocity against the frozen dense teacher's on the same input; "v+distill": both. Plus
    `e2e_weight` × the relative squared error of the output against the teacher's."""

    def __init__(self, model: nn.Module, teacher: nn.Module | None = None, objective: str = "v"):
        super().__init__()
        self.model, self.objective = model, objective
        self._teacher = (teacher,)

    def forward(self, x, z, t, y, e2e_weight: float = 0.0, autocast=None):
        with autocast():
            pred = self.model(z, t, y)
        target = None
        if "distill" in self.objective or e2e_weight > 0:
            with torch.no_grad(), autocast():
                target = self._teacher[0](z, t, y)
        parts = []
        if "v" in self.objective.split("+"):
            parts.append(v_loss(pred, x, z, t).mean())
        if "distill" in self.objective:
            parts.append(v_loss(pred, target, z, t).mean())  # the teacher's prediction stands in for x
        loss = torch.stack(parts).sum() + _touch(p for n, p in self.model.named_parameters()
                                                 if n.endswith("alpha_logit"))
        e2e = torch.zeros((), device=loss.device)
        if e2e_weight > 0:
            e2e = relative_squared_error(pred, target).mean()
            loss = loss + e2e_weight * e2e
        return loss, torch.stack(parts).detach(), e2e.detach()
