"""The samplers of JiT and PixelGen, and the (seed, index) → (noise, label) map that pairs runs.

Both integrate JiT's flow z_t = t·x + (1−t)·ε from t = 0 (noise) to t = 1 (image) with Heun steps and
a final Euler step, turning the network's x-prediction into a velocity v = (x̂ − z) / max(1 − t, t_eps)
and applying classifier-free guidance v_u + w·(v_c − v_u) on that velocity (null class = num_classes):

- `jit` (LTH14/JiT `denoiser.py`): time grid linspace(0, 1, steps+1); guidance where
  low < t < high (t = 0 counts as inside when low = 0), judged at the time of each evaluation.
- `pixelgen` (Zehong-Ma/PixelGen `HeunSamplerJiT`, exact Heun): grid linspace(0, 1 − 1/steps, steps)
  followed by 1, respaced by the time shift t ↦ t / (t + (1 − t)·shift); guidance where
  low < t ≤ high, judged at the start of the step for both of its evaluations.

The grid and the state z are float32 (float64 when the noise is), as in the originals (guidance is judged
on a host copy of the grid, so a step never waits for the GPU); the network sees
z in its own parameter dtype, so it runs under `torch.autocast` or with low-precision weights alike.
Conditional and unconditional passes run as one batch. Where guidance is off (outside the interval or
w = 1) only the conditional pass runs: the originals compute v_u + 1·(v_c − v_u) there, which is v_c
up to rounding.

`dense_until` (ours, not the originals'): an evaluation at t < dense_until runs `dense_model`, the model with
every SLA2 layer attending densely (`sla2.layers.dense_twin`). A converted model's error costs its samples most
in the first, noisiest steps (bench/RESULTS.md, "Session 10"), so a few dense steps buy back much of the
quality for a small part of the speed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .diffusion import T_EPS
from .errors import InvalidParameter, Param
from .seeding import SAMPLE_LABELS, SAMPLE_NOISE, generator

# Guidance scales of the official evaluations (JiT README: ImageNet 256/512, 50 Heun steps, interval
# 0.1-1.0; PixelGen-XL config: 2.25 with its own sampler).
PRESET_CFG: dict[str, float] = {
    "JiT-B/16": 3.0, "JiT-L/16": 2.4, "JiT-H/16": 2.2,
    "JiT-B/32": 3.0, "JiT-L/32": 2.5, "JiT-H/32": 2.3,
    "PixelGen-XL": 2.25,
}


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler's defaults and its integration function."""

    name: str
    cfg_interval: tuple[float, float]
    time_shift: float | None  # None: the sampler has no time shift
    run: Callable


@dataclass(frozen=True)
class SamplerSettings:
    """Everything that fixes a sampling run besides the model, the noise and the labels."""

    sampler: str = "jit"
    steps: int = 50
    cfg: float = 1.0
    cfg_interval: tuple[float, float] = (0.1, 1.0)
    time_shift: float | None = None
    dense_until: float = 0.0  # evaluations at t < dense_until attend densely in every layer (0: none do)

    def to_dict(self) -> dict:
        """The settings as sample folders' manifests record them (dense_until only where set, so folders of
        earlier versions still resume)."""
        return {"sampler": self.sampler, "steps": self.steps, "cfg": self.cfg,
                "cfg_interval": list(self.cfg_interval), "time_shift": self.time_shift,
                **({"dense_until": self.dense_until} if self.dense_until else {})}


def _state_dtype(noise: torch.Tensor) -> torch.dtype:
    return torch.float64 if noise.dtype == torch.float64 else torch.float32


def _net_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _velocity(model: nn.Module, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, cfg: float,
              guide: bool, t_eps: float) -> torch.Tensor:
    """Guided velocity at time t (a 0-dim tensor): one batched cond/uncond pass, or cond only."""
    n = z.shape[0]
    dtype = _net_dtype(model)
    if guide and cfg != 1.0:
        z_in = torch.cat([z, z]).to(dtype)
        y_in = torch.cat([labels, torch.full_like(labels, model.num_classes)])
        x_pred = model(z_in, t.expand(2 * n), y_in)
        v = (x_pred - torch.cat([z, z])) / (1.0 - t).clamp_min(t_eps)
        v_cond, v_uncond = v[:n], v[n:]
        return v_uncond + cfg * (v_cond - v_uncond)
    x_pred = model(z.to(dtype), t.expand(n), labels)
    return (x_pred - z) / (1.0 - t).clamp_min(t_eps)


def jit_time_grid(steps: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.linspace(0.0, 1.0, steps + 1, dtype=dtype)


def pixelgen_time_grid(steps: int, time_shift: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """PixelGen: linspace(0, 1 − 1/steps, steps), then 1, respaced by t / (t + (1 − t)·shift)."""
    last = 1.0 / steps
    grid = torch.cat([torch.linspace(0.0, 1.0 - last, steps, dtype=dtype), torch.ones(1, dtype=dtype)])
    return grid / (grid + (1 - grid) * time_shift)


def _jit_guided(t: torch.Tensor, interval: tuple[float, float]) -> bool:
    low, high = interval
    return bool(t < high) and (low == 0 or bool(t > low))


def _pixelgen_guided(t: torch.Tensor, interval: tuple[float, float]) -> bool:
    low, high = interval
    return bool(t > low) and bool(t <= high)


def _networks(model: nn.Module, dense_model: nn.Module | None, dense_until: float) -> Callable:
    """host t → the network that evaluates there (`dense_model` below `dense_until`)."""
    if dense_until > 0 and dense_model is None:
        raise InvalidParameter("dense_until", dense_until, "{name} > 0 needs the model's dense twin as {dense}",
                               dense=Param("dense_model"))
    return lambda host_t: dense_model if float(host_t) < dense_until else model


def jit_sample(model: nn.Module, noise: torch.Tensor, labels: torch.Tensor, *, steps: int, cfg: float,
               cfg_interval: tuple[float, float], method: str = "heun", t_eps: float = T_EPS,
               trajectory: list | None = None, dense_model: nn.Module | None = None, dense_until: float = 0.0,
               **_) -> torch.Tensor:
    """LTH14/JiT `Denoiser.generate`: Heun (or Euler) steps on linspace(0, 1, steps+1), last step Euler."""
    if method not in ("heun", "euler"):
        raise InvalidParameter("method", method, "unknown JiT sampling {name} {value!r}; choose heun or euler")
    host_grid = jit_time_grid(steps, _state_dtype(noise))
    grid = host_grid.to(noise.device)
    z = noise.to(_state_dtype(noise))
    net = _networks(model, dense_model, dense_until)

    def v_at(z, i):
        return _velocity(net(host_grid[i]), z, grid[i], labels, cfg, _jit_guided(host_grid[i], cfg_interval), t_eps)

    for i in range(steps - 1):
        t, t_next = grid[i], grid[i + 1]
        v = v_at(z, i)
        if method == "heun":
            z_euler = z + (t_next - t) * v
            v = 0.5 * (v + v_at(z_euler, i + 1))
        z = z + (t_next - t) * v
        if trajectory is not None:
            trajectory.append(z)
    z = z + (grid[-1] - grid[-2]) * v_at(z, steps - 1)
    if trajectory is not None:
        trajectory.append(z)
    return z


def pixelgen_sample(model: nn.Module, noise: torch.Tensor, labels: torch.Tensor, *, steps: int, cfg: float,
                    cfg_interval: tuple[float, float], time_shift: float = 2.0, t_eps: float = T_EPS,
                    trajectory: list | None = None, dense_model: nn.Module | None = None, dense_until: float = 0.0,
                    **_) -> torch.Tensor:
    """Zehong-Ma/PixelGen `HeunSamplerJiT` with exact Heun: shifted grid, guidance judged at t_cur."""
    host_grid = pixelgen_time_grid(steps, time_shift, _state_dtype(noise))
    grid = host_grid.to(noise.device)
    z = noise.to(_state_dtype(noise))
    net = _networks(model, dense_model, dense_until)
    for i in range(steps):
        t, t_next = grid[i], grid[i + 1]
        guide = _pixelgen_guided(host_grid[i], cfg_interval)
        v = _velocity(net(host_grid[i]), z, t, labels, cfg, guide, t_eps)
        dt = t_next - t
        if i < steps - 1:
            z_hat = z + v * dt
            v_hat = _velocity(net(host_grid[i + 1]), z_hat, t_next, labels, cfg, guide, t_eps)
            z = z + (v + v_hat) / 2 * dt
        else:
            z = z + v * dt
        if trajectory is not None:
            trajectory.append(z)
    return z


SAMPLERS: dict[str, SamplerSpec] = {
    "jit": SamplerSpec("jit", cfg_interval=(0.1, 1.0), time_shift=None, run=jit_sample),
    # PixelGen-XL's released configuration: shift 2.0, guidance on (0.1, 0.9].
    "pixelgen": SamplerSpec("pixelgen", cfg_interval=(0.1, 0.9), time_shift=2.0, run=pixelgen_sample),
}


def default_cfg(preset: str | None) -> float | None:
    """The guidance scale the official evaluation uses for a preset; None for other architectures."""
    return PRESET_CFG.get(preset) if preset else None


def sampler_spec(sampler: str) -> SamplerSpec:
    """The registered sampler called `sampler`."""
    if sampler not in SAMPLERS:
        raise InvalidParameter("sampler", sampler, "unknown {name} {value!r}; choose one of: {choices}",
                               choices=", ".join(SAMPLERS))
    return SAMPLERS[sampler]


def sampler_settings(sampler: str, *, steps: int, cfg: float | None, cfg_interval: tuple[float, float] | None,
                     time_shift: float | None, preset: str | None, dense_until: float = 0.0) -> SamplerSettings:
    """Fill a sampler's defaults (interval, shift, per-preset CFG) and check every value."""
    spec = sampler_spec(sampler)
    if steps < 1:
        raise InvalidParameter("steps", steps, "{name} must be >= 1, got {value}")
    if cfg is None:
        cfg = default_cfg(preset)
        if cfg is None:
            raise InvalidParameter("cfg", None, "no default CFG scale for this architecture (not a JiT/PixelGen "
                                   "preset); pass {name} (1.0 turns guidance off)")
    if not (math.isfinite(cfg) and cfg >= 0):  # nan passes `cfg < 0` and samples black images
        raise InvalidParameter("cfg", cfg, "{name} must be a finite number >= 0, got {value}")
    interval = spec.cfg_interval if cfg_interval is None else tuple(float(x) for x in cfg_interval)
    if len(interval) != 2 or not 0.0 <= interval[0] <= interval[1] <= 1.0:
        raise InvalidParameter("cfg_interval", cfg_interval,
                               "{name} must be LOW,HIGH with 0 <= LOW <= HIGH <= 1, got {value}")
    if spec.time_shift is None:
        if time_shift is not None:
            raise InvalidParameter("time_shift", time_shift, "{name} applies to the pixelgen sampler only, "
                                   "not {sampler}", sampler=sampler)
    else:
        time_shift = spec.time_shift if time_shift is None else float(time_shift)
        if not (math.isfinite(time_shift) and time_shift > 0):
            raise InvalidParameter("time_shift", time_shift, "{name} must be a finite number > 0, got {value}")
    if not (math.isfinite(dense_until) and 0.0 <= dense_until <= 1.0):
        raise InvalidParameter("dense_until", dense_until, "{name} must be a number in [0, 1] (a time t: "
                               "evaluations before it attend densely), got {value}")
    return SamplerSettings(sampler=sampler, steps=steps, cfg=float(cfg), cfg_interval=interval,
                           time_shift=time_shift, dense_until=float(dense_until))


@torch.no_grad()
def sample(model: nn.Module, noise: torch.Tensor, labels: torch.Tensor, *, steps: int = 50, cfg: float = 1.0,
           cfg_interval: tuple[float, float] | None = None, sampler: str = "jit", method: str = "heun",
           time_shift: float | None = None, trajectory: list | None = None, dense_model: nn.Module | None = None,
           dense_until: float = 0.0) -> torch.Tensor:
    """Integrate from z_0 = noise (already scaled by noise_scale) to t = 1; returns the image in [-1, 1].

    The result has the noise's dtype. `trajectory`, if a list, receives z after every step. Evaluations at
    t < `dense_until` run `dense_model` (the model's `sla2.layers.dense_twin`) instead of `model`.
    """
    spec = sampler_spec(sampler)
    interval = spec.cfg_interval if cfg_interval is None else cfg_interval
    shift = spec.time_shift if time_shift is None else time_shift
    z = spec.run(model, noise, labels, steps=steps, cfg=cfg, cfg_interval=interval, method=method,
                 time_shift=shift, trajectory=trajectory, dense_model=dense_model, dense_until=dense_until)
    return z.to(noise.dtype)


def sample_with(model: nn.Module, noise: torch.Tensor, labels: torch.Tensor, settings: SamplerSettings,
                trajectory: list | None = None, dense_model: nn.Module | None = None) -> torch.Tensor:
    return sample(model, noise, labels, steps=settings.steps, cfg=settings.cfg, cfg_interval=settings.cfg_interval,
                  sampler=settings.sampler, time_shift=settings.time_shift, trajectory=trajectory,
                  dense_model=dense_model, dense_until=settings.dense_until)


# --- pairing: every sample's noise and label are functions of (seed, index) -----------------------

def sample_noise(seed: int, index: int, shape: tuple[int, ...], noise_scale: float = 1.0) -> torch.Tensor:
    """Sample `index`'s starting noise, float32 on the CPU (the same on every machine and world size)."""
    gen = generator(seed, SAMPLE_NOISE, index)
    return torch.randn(shape, generator=gen, dtype=torch.float32) * noise_scale


def _class_order(seed: int, cycle: int, num_classes: int) -> torch.Tensor:
    gen = generator(seed, SAMPLE_LABELS, cycle)
    return torch.randperm(num_classes, generator=gen)


def sample_label(seed: int, index: int, num_classes: int) -> int:
    """Balanced labels: indices [k·C, (k+1)·C) hold every class once, in an order drawn from (seed, k)."""
    cycle, position = divmod(index, num_classes)
    return int(_class_order(seed, cycle, num_classes)[position])


def paired_inputs(seed: int, indices, shape: tuple[int, ...], num_classes: int,
                  noise_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise B×C×H×W float32, labels B) for the given sample indices, each a function of (seed, index)."""
    indices = list(indices)
    noise = torch.stack([sample_noise(seed, i, shape, noise_scale) for i in indices])
    labels = torch.tensor([sample_label(seed, i, num_classes) for i in indices], dtype=torch.long)
    return noise, labels


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images → uint8 as JiT saves them: round(clip((x + 1) / 2 · 255, 0, 255))."""
    x = (images.float() + 1) / 2
    return (x * 255).clamp(0, 255).round().to(torch.uint8)
