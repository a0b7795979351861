"""What a finetune run is asked to do, checked before anything is loaded or written."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError

# Stage 1 trains only W_q, W_k and α (a few thousand numbers per layer): a large rate converges in a few
# hundred steps. Stage 2 (--full) moves every weight of a trained model: a fine-tuning rate.
ROUTER_LR = 5e-3
FULL_LR = 1e-5
DTYPES = ("fp32", "bf16")


@dataclass(frozen=True)
class TopkSchedule:
    """topk falls linearly from `start` to `end` over the first half of the steps, then stays at `end`."""

    start: float
    end: float

    @classmethod
    def parse(cls, text: str) -> "TopkSchedule":
        parts = text.split(":")
        try:
            start, end = (float(p) for p in parts) if len(parts) == 2 else (None, None)
        except ValueError:
            start = end = None
        if start is None or not (0 < end <= start <= 1):
            raise UsageError(f"--topk-schedule {text!r}: expected START:END with 0 < END <= START <= 1, "
                             f"e.g. 0.5:0.1 (dense start, target at the end)")
        return cls(start, end)

    def at(self, step: int, steps: int) -> float:
        ramp = max(1, steps // 2)
        return self.end if step >= ramp else self.start + (self.end - self.start) * step / ramp

    def __str__(self) -> str:
        return f"{self.start:g}:{self.end:g}"


@dataclass(frozen=True)
class DataSpec:
    """Where clean images come from: an image folder, or the dense teacher's own samples (`folder=None`)."""

    folder: Path | None = None
    class_index: int | None = None
    teacher_samples: int = 64
    sampling_steps: int = 8

    def __post_init__(self):
        if self.folder is None and self.class_index is not None:
            raise UsageError("--class-index labels the images of --data DIR; it has no meaning with --data-free")
        if self.teacher_samples < 1:
            raise UsageError(f"--data-free-samples must be >= 1, got {self.teacher_samples}")
        if self.sampling_steps < 2:
            raise UsageError(f"the teacher's sampler needs >= 2 steps, got {self.sampling_steps}")

    @property
    def kind(self) -> str:
        return "teacher" if self.folder is None else "folder"


@dataclass(frozen=True)
class FinetuneConfig:
    """Stage 1 (default): router W_q, W_k and α against dense attention, layer by layer.
    Stage 2 (`full`): every weight but the router, with JiT's v-loss.

    `batch_size` is the global batch: under torchrun each of K ranks takes batch_size / K samples.
    `e2e_weight` adds that multiple of the relative squared error of the model's output against the
    dense teacher's. `save_every` 0 writes no intermediate state.
    """

    steps: int = 200
    batch_size: int = 8
    lr: float | None = None
    topk_schedule: TopkSchedule | None = None
    tau: float = 0.1
    full: bool = False
    e2e_weight: float = 0.0
    save_every: int = 50
    eval_samples: int = 8
    seed: int = 0
    dtype: str = "fp32"

    def __post_init__(self):
        checks = [
            (self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.lr is None or (math.isfinite(self.lr) and self.lr > 0), f"--lr must be a positive number, got {self.lr}"),
            (math.isfinite(self.tau) and self.tau > 0, f"--tau must be > 0, got {self.tau}"),
            (math.isfinite(self.e2e_weight) and self.e2e_weight >= 0, f"--e2e-weight must be >= 0, got {self.e2e_weight}"),
            (self.save_every >= 0, f"--save-every must be >= 0 (0: no intermediate state), got {self.save_every}"),
            (self.eval_samples >= 1, f"--eval-samples must be >= 1, got {self.eval_samples}"),
            (self.dtype in DTYPES, f"--dtype {self.dtype!r} is not supported for finetuning; use fp32 or bf16 "
                                   f"(fp16 would need loss scaling)"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    @property
    def stage(self) -> str:
        return "full" if self.full else "router"

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (FULL_LR if self.full else ROUTER_LR)

    def topk_at(self, step: int, target: float) -> float:
        return target if self.topk_schedule is None else self.topk_schedule.at(step, self.steps)

    def to_dict(self) -> dict:
        record = dataclasses.asdict(self)
        record["lr"] = self.learning_rate
        record["topk_schedule"] = None if self.topk_schedule is None else str(self.topk_schedule)
        return record
