"""JiT's flow-matching convention: z_t = t·x + (1−t)·ε, t = 1 is clean, the network predicts x."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .errors import InvalidParameter
from .seeding import PROBE_NOISE, generator

P_MEAN = -0.8
P_STD = 0.8
T_EPS = 5e-2


def sample_t(n: int, *, generator: torch.Generator | None = None, device="cpu",
             p_mean: float = P_MEAN, p_std: float = P_STD) -> torch.Tensor:
    """JiT's training distribution of t: logit-normal, sigmoid(N(p_mean, p_std²))."""
    return torch.sigmoid(torch.randn(n, generator=generator, device=device) * p_std + p_mean)


@dataclass(frozen=True)
class TDistribution:
    """Where training draws t: logit-normal sigmoid(N(mean, std²)) like JiT's, or uniform on [0, 1)."""

    kind: str  # "logit-normal" or "uniform"
    mean: float = P_MEAN
    std: float = P_STD

    @classmethod
    def parse(cls, text: str) -> "TDistribution":
        """A name of T_DISTRIBUTIONS, or "logit-normal:MEAN,STD"."""
        if text in T_DISTRIBUTIONS:
            return T_DISTRIBUTIONS[text]
        head, _, args = str(text).partition(":")
        try:
            mean, std = (float(a) for a in args.split(","))
        except ValueError:
            mean = std = math.nan
        if head != "logit-normal" or not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            raise InvalidParameter("t_distribution", text, "{name} must be " + ", ".join(T_DISTRIBUTIONS)
                                   + " or logit-normal:MEAN,STD (STD > 0), got {value!r}")
        return cls("logit-normal", mean, std)

    def sample(self, n: int, *, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        if self.kind == "uniform":
            return torch.rand(n, generator=generator, device=device)
        return sample_t(n, generator=generator, device=device, p_mean=self.mean, p_std=self.std)


# Named distributions of t. "jit": JiT's own, which almost never draws t < 0.05 or t > 0.9; "uniform": the Heun
# sampler's evenly spaced grid; "early": most draws among the sampler's first steps (median 0.17, 27% below
# 0.1), where a converted model's error costs its samples most. The 95%-sparse showcase after stage 1 with
# dense attention for t < 0.25 only: texture FD 16.2 -> 7.2 (for t >= 0.75 only: 13.9); stage 1 on these
# draws instead of JiT's: 17.3 -> 11.8 (bench/RESULTS.md, "Session 10").
T_DISTRIBUTIONS = {"jit": TDistribution("logit-normal", P_MEAN, P_STD), "uniform": TDistribution("uniform"),
                   "early": TDistribution("logit-normal", -1.6, 1.0)}


def add_noise(x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, noise_scale: float = 1.0) -> torch.Tensor:
    t = t.view(-1, *([1] * (x.dim() - 1)))
    return t * x + (1 - t) * noise * noise_scale


def velocity(x_pred: torch.Tensor, z: torch.Tensor, t: torch.Tensor, t_eps: float = T_EPS) -> torch.Tensor:
    """v = (x̂ − z) / (1 − t), with 1 − t clamped as upstream does near t = 1."""
    t = t.view(-1, *([1] * (z.dim() - 1)))
    return (x_pred - z) / (1 - t).clamp_min(t_eps)


def noised(x: torch.Tensor, positions=None, *, seed: int, stream: int, noise_scale: float = 1.0,
           t: torch.Tensor | None = None, t_distribution: str = "jit"
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z, t, ε) for clean images x: z = t·x + (1−t)·ε·noise_scale, t drawn from `t_distribution`
    (`TDistribution.parse`) unless given.

    Sample i's t and ε are drawn from (seed, stream, positions[i]) alone (positions default to 0, 1, ...),
    so a sample is noised alike whatever batch or process holds it; a given t leaves ε unchanged.
    """
    device = x.device
    draw = TDistribution.parse(t_distribution)
    positions = range(x.shape[0]) if positions is None else positions
    ts, eps = [], []
    for p in positions:
        g = generator(seed, stream, p, device=device)
        ts.append(draw.sample(1, generator=g, device=device))
        eps.append(torch.randn(x.shape[1:], generator=g, device=device))
    if t is None:
        t = torch.cat(ts) if ts else torch.empty(0, device=device)
    noise = torch.stack(eps) if eps else torch.empty_like(x)
    t = t.to(device)
    return add_noise(x, t.to(x.dtype), noise.to(x.dtype), noise_scale), t, noise


def v_loss(pred: torch.Tensor, x: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """JiT's training loss per sample: mean squared error of v = (x − z)/(1 − t) against the prediction's."""
    v_pred, v_true = velocity(pred.float(), z.float(), t.float()), velocity(x.float(), z.float(), t.float())
    return (v_pred - v_true).flatten(1).square().mean(1)


@torch.no_grad()
def denoising_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, seed: int = 0,
                   t: torch.Tensor | None = None) -> float:
    """JiT's training loss (mean v-loss) of `model` on x noised reproducibly by `seed`."""
    z, t, _ = noised(x, seed=seed, stream=PROBE_NOISE, t=t, noise_scale=getattr(model.config, "noise_scale", 1.0))
    return v_loss(model(z, t, y), x, z, t).mean().item()
