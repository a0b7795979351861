"""JiT's sampler: Heun steps on the time grid linspace(0, 1, steps+1), a final Euler step, and
classifier-free guidance on the velocity inside an interval of t (null class = num_classes)."""

from __future__ import annotations

import torch
from torch import nn

from .diffusion import velocity


def guided_velocity(model: nn.Module, z: torch.Tensor, t: float, labels: torch.Tensor, cfg: float,
                    cfg_interval: tuple[float, float]) -> torch.Tensor:
    """Conditional and unconditional passes batched together; guidance only for t inside the interval."""
    n = z.shape[0]
    tt = torch.full((n,), t, device=z.device, dtype=torch.float32)
    low, high = cfg_interval
    if cfg == 1.0 or not (t < high and (low == 0 or t > low)):
        return velocity(model(z, tt, labels), z, tt)
    null = torch.full_like(labels, model.num_classes)
    x_pred = model(torch.cat([z, z]), torch.cat([tt, tt]), torch.cat([labels, null]))
    v = velocity(x_pred, torch.cat([z, z]), torch.cat([tt, tt]))
    v_cond, v_uncond = v[:n], v[n:]
    return v_uncond + cfg * (v_cond - v_uncond)


@torch.no_grad()
def sample(model: nn.Module, noise: torch.Tensor, labels: torch.Tensor, *, steps: int = 50, cfg: float = 1.0,
           cfg_interval: tuple[float, float] = (0.0, 1.0), method: str = "heun") -> torch.Tensor:
    """Integrate from z_0 = noise (already scaled) to t = 1; returns the final z (the image, in [-1, 1])."""
    grid = torch.linspace(0.0, 1.0, steps + 1).tolist()
    z = noise
    for i in range(steps - 1):
        t, t_next = grid[i], grid[i + 1]
        v = guided_velocity(model, z, t, labels, cfg, cfg_interval)
        if method == "heun":
            z_euler = z + (t_next - t) * v
            v = 0.5 * (v + guided_velocity(model, z_euler, t_next, labels, cfg, cfg_interval))
        z = z + (t_next - t) * v
    t, t_next = grid[-2], grid[-1]
    return z + (t_next - t) * guided_velocity(model, z, t, labels, cfg, cfg_interval)
