"""JiT's flow-matching convention: z_t = t·x + (1−t)·ε, t = 1 is clean, the network predicts x."""

from __future__ import annotations

import torch

P_MEAN = -0.8
P_STD = 0.8
T_EPS = 5e-2


def sample_t(n: int, *, generator: torch.Generator | None = None, device="cpu",
             p_mean: float = P_MEAN, p_std: float = P_STD) -> torch.Tensor:
    """JiT's training distribution of t: logit-normal, sigmoid(N(p_mean, p_std²))."""
    return torch.sigmoid(torch.randn(n, generator=generator, device=device) * p_std + p_mean)


def add_noise(x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, noise_scale: float = 1.0) -> torch.Tensor:
    t = t.view(-1, *([1] * (x.dim() - 1)))
    return t * x + (1 - t) * noise * noise_scale


def velocity(x_pred: torch.Tensor, z: torch.Tensor, t: torch.Tensor, t_eps: float = T_EPS) -> torch.Tensor:
    """v = (x̂ − z) / (1 − t), with 1 − t clamped as upstream does near t = 1."""
    t = t.view(-1, *([1] * (z.dim() - 1)))
    return (x_pred - z) / (1 - t).clamp_min(t_eps)
