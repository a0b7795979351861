"""What a finetune run is asked to do, checked before anything is loaded or written."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from ..diffusion import T_DISTRIBUTIONS, TDistribution
from ..errors import InvalidParameter, Param
from .schedule import EMA, LRSchedule

# Stage 1 trains only W_q, W_k and α (a few thousand numbers per layer): a large rate converges in a few
# hundred steps. Stage 2 (--full) moves every weight of a trained model: a fine-tuning rate.
ROUTER_LR = 5e-3
FULL_LR = 1e-5
DTYPES = ("fp32", "bf16")
OBJECTIVES = ("v", "distill", "v+distill")  # stage 2
ROUTER_OBJECTIVES = ("layer", "distill")  # stage 1: layer-local error, or the whole model's velocity
# `--recipe`: stage 1 for `router_steps` with RECIPE_ROUTER, then stage 2 with RECIPE on `recipe_stage2_data`.
# Stage 2 continues the model's own training (JiT's v-loss at JiT's t, EMA): on the 95% showcase 400 steps of 32
# took the texture FD to 3.96 where the dense model scores 4.39 and distillation at 3e-5 reached 6.21
# (bench/RESULTS.md, "Session 17"). Distilling from the teacher fails differently: at 3e-4 Adam turns its
# float-noise gradient into full-rate steps that wreck the samples ("Session 9"), at 3e-5 it barely moves them.
RECIPE = {"objective": "v", "schedule": "cosine", "warmup": 0.05, "ema": 0.995, "lr": 1.5e-4}
RECIPE_ROUTER = {"objective": "distill", "schedule": "cosine", "warmup": 0.05}
RECIPE_ROUTER_STEPS = 200


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
            raise InvalidParameter("topk_schedule", text, "{name} {value!r}: expected START:END with "
                                   "0 < END <= START <= 1, e.g. 0.5:0.1 (dense start, target at the end)")
        return cls(start, end)

    def at(self, step: int, steps: int) -> float:
        ramp = max(1, steps // 2)
        return self.end if step >= ramp else self.start + (self.end - self.start) * step / ramp

    def __str__(self) -> str:
        return f"{self.start:g}:{self.end:g}"


STATES = ("noised", "trajectory")


@dataclass(frozen=True)
class DataSpec:
    """Where training inputs come from: an image folder, or the dense teacher's own samples (`folder=None`),
    drawn with `sampling_steps` Heun steps at guidance `cfg`. `states` "noised": clean images noised at t
    drawn from `t_distribution`; "trajectory" (teacher only): the inputs the teacher's sampler fed its network,
    so stage 1 trains where sampling happens. `t_distribution` (noised states): where the training draws' t lie, as
    `diffusion.TDistribution.parse` reads it: JiT's ("jit"), "uniform", "early" (the sampler's first steps,
    where a converted model's error costs its samples most) or "logit-normal:MEAN,STD".
    `workers`: processes that decode the folder's images ahead of each step (0: the training process)."""

    folder: Path | None = None
    class_index: int | None = None
    teacher_samples: int = 64
    sampling_steps: int = 8
    workers: int = 4
    cfg: float = 1.0
    states: str = "noised"
    t_distribution: str = "jit"

    def __post_init__(self):
        if self.folder is None and self.class_index is not None:
            raise InvalidParameter("class_index", self.class_index, "{name} labels the images of an image folder "
                                   "({folder}); it has no meaning with {teacher}", folder=Param("folder"),
                                   teacher=Param("folder=None"))
        if self.teacher_samples < 1:
            raise InvalidParameter("teacher_samples", self.teacher_samples, "{name} must be >= 1, got {value}")
        if self.workers < 0:
            raise InvalidParameter("workers", self.workers, "{name} must be >= 0, got {value}")
        if self.sampling_steps < 2:
            raise InvalidParameter("sampling_steps", self.sampling_steps, "{name} must be >= 2 (the teacher's "
                                   "sampler), got {value}")
        if not (math.isfinite(self.cfg) and self.cfg > 0):
            raise InvalidParameter("cfg", self.cfg, "{name} must be a finite number > 0, got {value}")
        if self.states not in STATES:
            raise InvalidParameter("states", self.states, "{name} must be one of " + ", ".join(STATES)
                                   + ", got {value!r}")
        if TDistribution.parse(self.t_distribution) != T_DISTRIBUTIONS["jit"] and self.states == "trajectory":
            raise InvalidParameter("t_distribution", self.t_distribution, "{name} {value!r} draws t for noised "
                                   "states; the sampler's trajectory states come with their own t")
        if self.states == "trajectory" and self.folder is not None:
            raise InvalidParameter("states", self.states, "{name} {value!r} records the dense model's own sampling; "
                                   "it needs {teacher}, not an image folder", teacher=Param("folder=None"))

    @property
    def kind(self) -> str:
        return "folder" if self.folder is not None else "trajectory" if self.states == "trajectory" else "teacher"


def recipe_stage2_data(data: DataSpec) -> DataSpec:
    """Where the recipe's stage 2 trains: the same images (or the same teacher's samples, never its trajectory,
    which has no clean image for the v-loss) noised at JiT's own t, as the model was trained; stage 1's t
    distribution is for the router, which must be right where sampling is most sensitive."""
    return dataclasses.replace(data, states="noised", t_distribution="jit")


@dataclass(frozen=True)
class FinetuneConfig:
    """Stage 1 (default): router W_q, W_k and α against dense attention, layer by layer.
    Stage 2 (`full`): every weight but the router, with JiT's v-loss.

    `batch_size` is the global batch: under torchrun each of K ranks takes batch_size / K samples.
    `e2e_weight` adds that multiple of the relative squared error of the model's output against the
    dense teacher's. `save_every` 0 writes no intermediate state.

    `objective` (None: "layer" in stage 1, "v" in stage 2): stage 1's "layer" is the layer-local error
    against dense attention, "distill" the squared error of the whole model's velocity against the dense
    teacher's (what held-out v-loss measures); stage 2's "v" is JiT's v-loss on the data, "distill" the
    velocity distillation (no noise in the target: it converges faster, see bench/RESULTS.md), "v+distill"
    their sum. `schedule` and `warmup` shape the learning rate (`LRSchedule`); `ema` > 0 keeps an
    exponential moving average of the weights, which is what is saved.
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
    objective: str | None = None
    schedule: str = "constant"
    warmup: float = 0.0
    ema: float = 0.0

    def __post_init__(self):
        if self.steps < 1:
            raise InvalidParameter("steps", self.steps, "{name} must be >= 1, got {value}")
        if self.batch_size < 1:
            raise InvalidParameter("batch_size", self.batch_size, "{name} must be >= 1, got {value}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise InvalidParameter("lr", self.lr, "{name} must be a positive number, got {value}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise InvalidParameter("tau", self.tau, "{name} must be > 0, got {value}")
        if not (math.isfinite(self.e2e_weight) and self.e2e_weight >= 0):
            raise InvalidParameter("e2e_weight", self.e2e_weight, "{name} must be >= 0, got {value}")
        if self.save_every < 0:
            raise InvalidParameter("save_every", self.save_every, "{name} must be >= 0 (0: no intermediate state), "
                                   "got {value}")
        if self.eval_samples < 1:
            raise InvalidParameter("eval_samples", self.eval_samples, "{name} must be >= 1, got {value}")
        if self.objective is None:
            object.__setattr__(self, "objective", "v" if self.full else "layer")
        choices = OBJECTIVES if self.full else ROUTER_OBJECTIVES
        if self.objective not in choices:
            raise InvalidParameter("objective", self.objective, "{name} of " + ("stage 2" if self.full else "stage 1")
                                   + " must be one of " + ", ".join(choices) + ", got {value!r}")
        LRSchedule(self.schedule, self.warmup)
        EMA([], self.ema)
        if self.dtype not in DTYPES:
            raise InvalidParameter("dtype", self.dtype, "{name} {value!r} is not supported for finetuning; use fp32 "
                                   "or bf16 (fp16 would need loss scaling)")

    @property
    def stage(self) -> str:
        return "full" if self.full else "router"

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (FULL_LR if self.full else ROUTER_LR)

    @property
    def lr_schedule(self) -> LRSchedule:
        return LRSchedule(self.schedule, self.warmup)

    def topk_at(self, step: int, target: float) -> float:
        return target if self.topk_schedule is None else self.topk_schedule.at(step, self.steps)

    def to_dict(self) -> dict:
        record = dataclasses.asdict(self)
        record["lr"] = self.learning_rate
        record["topk_schedule"] = None if self.topk_schedule is None else str(self.topk_schedule)
        return record
