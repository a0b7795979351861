"""Stage 2's optimisation aids: the learning-rate schedule (linear warm-up, then cosine or constant) and
an exponential moving average of the trained weights.

Measured on the demo model at 90.6% sparsity (bench/RESULTS.md, "Quality recipe"): 300 distillation
steps at lr 3e-4 with 5% warm-up and cosine decay reach 1.075x dense v-loss where a constant 1e-4 reaches
1.113x; the EMA is what stage 2 saves, so a run's last noisy steps do not decide the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import CheckpointError, InvalidParameter

SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class LRSchedule:
    """Factor on the base learning rate at each step: `warmup` (a fraction of the steps) rises linearly
    from 1/warmup_steps to 1, then `kind` "cosine" decays to 0 at the last step or "constant" stays."""

    kind: str = "constant"
    warmup: float = 0.0

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise InvalidParameter("schedule", self.kind, "{name} must be one of " + ", ".join(SCHEDULES)
                                   + ", got {value!r}")
        if not (math.isfinite(self.warmup) and 0.0 <= self.warmup < 1.0):
            raise InvalidParameter("warmup", self.warmup, "{name} must be a fraction of the steps in [0, 1), "
                                   "got {value}")

    def factor(self, step: int, steps: int) -> float:
        warm = int(round(self.warmup * steps))
        if step < warm:
            return (step + 1) / warm
        if self.kind == "cosine":
            span = max(1, steps - warm)
            return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / span))
        return 1.0


class EMA:
    """An exponential moving average of parameters over the steps of this run, bias-corrected as Adam's
    moments are: the average of p_1..p_n with weights ∝ decay^(n−t), without the pull towards the starting
    weights that a shadow initialised to them keeps for ~1/(1 − decay) steps (so a run of 20 steps with
    decay 0.995 still ends at its trained weights, not 90% of the way back to where it began). `decay` 0
    keeps none."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        if not (math.isfinite(decay) and 0.0 <= decay < 1.0):
            raise InvalidParameter("ema", decay, "{name} must be a decay in [0, 1) (0 = off), got {value}")
        self.params, self.decay = params, decay
        self.shadow = [torch.zeros_like(p.detach()) for p in params] if decay > 0 else []
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1.0 - self.decay)
        self.updates += 1

    @torch.no_grad()
    def average(self) -> list[torch.Tensor]:
        """The bias-corrected averages (empty before the first update)."""
        if not self.updates:
            return []
        correction = 1.0 - self.decay ** self.updates
        return [s / correction for s in self.shadow]

    @torch.no_grad()
    def copy_to_params(self) -> None:
        """Replace the parameters by their averages (the end of a run); nothing happens before an update."""
        for avg, p in zip(self.average(), self.params):
            p.copy_(avg)

    def state_dict(self) -> dict:
        return {"shadow": [s.detach().cpu() for s in self.shadow], "updates": self.updates}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        shadow = state.get("shadow") if isinstance(state, dict) else None
        updates = state.get("updates") if isinstance(state, dict) else None
        if (not isinstance(shadow, list) or not isinstance(updates, int) or updates < 0
                or len(shadow) != len(self.shadow)
                or any(not isinstance(a, torch.Tensor) or a.shape != b.shape for a, b in zip(shadow, self.shadow))):
            raise CheckpointError("the saved EMA weights do not match this run's trainable parameters")
        for s, saved in zip(self.shadow, shadow):
            s.copy_(saved)
        self.updates = updates
