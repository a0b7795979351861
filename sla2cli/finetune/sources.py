"""Training inputs: the network's inputs (z_t, t, label) with the clean image where there is one.

Three sources: an image folder or a pool of the dense teacher's own samples, both noised at t drawn from a
`diffusion.TDistribution` (JiT's by default; `diffusion.noised`), or the dense sampler's own trajectories
(every input its network evaluations saw, conditional and unconditional: the states a converted model meets
when it samples).
Every random draw is a pure function of (seed, stream, global sample position): which image or state a
step uses, its t and its noise. A run therefore needs no RNG state to resume exactly, and K processes
that each take their slice of the global batch see the very samples one process would.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.distributed as dist

from ..data.images import ImageFolder, image_loader
from ..diffusion import noised
from ..distributed import ProcessGroup
from ..sampling import sample
from ..seeding import EVAL_NOISE, EVAL_ORDER, TEACHER_POOL, TRAIN_NOISE, TRAIN_ORDER, generator
from ..sla2.probe import dense_cores
from .config import DataSpec

SAMPLING_BATCH = 16  # the teacher samples its pool this many images at a time (or the training batch, if larger)
EVAL_STATES_PER_TRAJECTORY = 8  # a trajectory source evaluates on this many states of each held-out trajectory


class _Shuffled:
    """Position p of an endless stream → item index: a fresh permutation of n items every epoch."""

    def __init__(self, n: int, seed: int, stream: int):
        self.n, self.seed, self.stream = n, seed, stream
        self._perm = lru_cache(maxsize=4)(self._permutation)

    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=generator(self.seed, self.stream, epoch))

    def __call__(self, positions) -> list[int]:
        return [int(self._perm(p // self.n)[p % self.n]) for p in positions]


class FolderSource:
    """Images of a folder (class sub-folders or one class), shuffled per epoch; evaluation on a fixed subset.

    A DataLoader decodes each step's images in `workers` processes ahead of the step. Its batches are the
    keyed order's (`_Shuffled`) positions of this rank, not a DistributedSampler's: that one pads and strides
    each epoch by the number of processes, so K processes would see other images than one process with the
    same global batch, and a resumed run other images than an uninterrupted one.
    """

    kind = "folder"

    def __init__(self, folder: ImageFolder, seed: int, eval_samples: int, noise_scale: float = 1.0, workers: int = 0,
                 t_distribution: str = "jit"):
        self.folder, self.workers, self.seed, self.noise_scale = folder, workers, seed, noise_scale
        self.t_distribution = t_distribution
        self.order = _Shuffled(len(folder), seed, TRAIN_ORDER)
        self.eval_indices = _Shuffled(len(folder), seed, EVAL_ORDER)(range(eval_samples))

    def describe(self) -> dict:
        return {"source": "folder", "path": str(self.folder.root), "images": len(self.folder),
                "classes": len(self.folder.mapping), "resolution": self.folder.resolution,
                "t_distribution": self.t_distribution}

    def train_batches(self, steps: list[range], device):
        """(x, z, t, y) for each step's positions, in order."""
        images = image_loader(self.folder, [self.order(positions) for positions in steps], self.workers)
        return _noised(images, steps, device, self.seed, self.noise_scale, self.t_distribution)

    def eval_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed evaluation subset, clean (x in [-1, 1], labels)."""
        return next(iter(image_loader(self.folder, [self.eval_indices])))

    def eval_states(self, device) -> tuple[torch.Tensor, ...]:
        x, y = self.eval_images()
        return _eval_noised(x.to(device), y.to(device), self.seed, self.noise_scale)


class TeacherSource:
    """A pool of the dense teacher's own samples (random labels), drawn once; the last `eval_samples` evaluate."""

    kind = "teacher"

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, seed: int, eval_samples: int, noise_scale: float,
                 sampling: dict, t_distribution: str = "jit"):
        self.train_x, self.train_y = images[:-eval_samples], labels[:-eval_samples]
        self.eval_x, self.eval_y = images[-eval_samples:], labels[-eval_samples:]
        self.order = _Shuffled(len(self.train_x), seed, TRAIN_ORDER)
        self.seed, self.noise_scale, self.sampling = seed, noise_scale, sampling
        self.t_distribution = t_distribution

    def describe(self) -> dict:
        return {"source": "teacher", "samples": len(self.train_x), **self.sampling, "labels": "uniform random",
                "t_distribution": self.t_distribution}

    def train_batches(self, steps: list[range], device):
        """(x, z, t, y) for each step's positions, in order."""
        def images():
            for positions in steps:
                idx = torch.tensor(self.order(positions), dtype=torch.long, device=self.train_x.device)
                yield self.train_x[idx], self.train_y[idx]
        return _noised(images(), steps, device, self.seed, self.noise_scale, self.t_distribution)

    def eval_states(self, device) -> tuple[torch.Tensor, ...]:
        return _eval_noised(self.eval_x.to(device), self.eval_y.to(device), self.seed, self.noise_scale)


class TrajectorySource:
    """The dense sampler's own network inputs (z_t, t, label), drawn once; held-out trajectories evaluate.

    Training on them matches stage 1's data and t distribution to sampling: the states are those the
    guided sampler visits (both passes of every guided evaluation), not images noised by JiT's training
    t distribution. There is no clean image, so only the distillation objectives apply.
    """

    kind = "trajectory"

    def __init__(self, states: tuple[torch.Tensor, ...], eval_states: tuple[torch.Tensor, ...], trajectories: int,
                 seed: int, sampling: dict):
        self.z, self.t, self.y = states
        self.eval = eval_states
        self.order = _Shuffled(len(self.z), seed, TRAIN_ORDER)
        self.trajectories, self.sampling = trajectories, sampling

    def describe(self) -> dict:
        return {"source": "trajectory", "samples": self.trajectories, "states": len(self.z), **self.sampling,
                "labels": "uniform random"}

    def train_batches(self, steps: list[range], device):
        """(None, z, t, y) for each step's positions, in order."""
        for positions in steps:
            idx = torch.tensor(self.order(positions), dtype=torch.long)
            yield None, self.z[idx].to(device), self.t[idx].to(device), self.y[idx].to(device)

    def eval_states(self, device) -> tuple[torch.Tensor, ...]:
        return tuple(v.to(device) for v in self.eval)


def _noised(images, steps: list[range], device, seed: int, noise_scale: float, t_distribution: str):
    """(x, z, t, y): each step's clean images noised by their global positions, t from `t_distribution`."""
    for positions, (x, y) in zip(steps, images):
        x, y = x.to(device), y.to(device)
        z, t, _ = noised(x, positions, seed=seed, stream=TRAIN_NOISE, noise_scale=noise_scale,
                         t_distribution=t_distribution)
        yield x, z, t, y


def _eval_noised(x: torch.Tensor, y: torch.Tensor, seed: int, noise_scale: float) -> tuple[torch.Tensor, ...]:
    z, t, _ = noised(x, range(len(x)), seed=seed, stream=EVAL_NOISE, noise_scale=noise_scale)
    return z, t, y


class _Inputs:
    """Records the network inputs of one sampling run per sample: a guided pass of batch 2n holds sample i's
    conditional input at row i and its unconditional one at row n + i."""

    def __init__(self, n: int):
        self.n, self.calls = n, []

    def __call__(self, module, args):
        z, t, y = args[:3]
        self.calls.append((z.float(), t.float(), y))

    def states(self) -> tuple[torch.Tensor, ...]:
        """(z, t, y), each n × S × ..., S the inputs one trajectory saw."""
        rows = [tuple(v[part * self.n:(part + 1) * self.n] for v in call)
                for call in self.calls for part in range(len(call[0]) // self.n)]
        return tuple(torch.stack([row[k] for row in rows], 1) for k in range(3))


def _gather(tensors: list[torch.Tensor], group: ProcessGroup) -> list[torch.Tensor]:
    """Every rank's equally shaped shares, concatenated in rank order."""
    if not group.distributed:
        return tensors
    out = []
    for tensor in tensors:
        parts = [torch.empty_like(tensor) for _ in range(group.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        out.append(torch.cat(parts))
    return out


@torch.no_grad()
def teacher_samples(model, count: int, *, steps: int, seed: int, device: torch.device, batch_size: int,
                    group: ProcessGroup, autocast, cfg: float = 1.0, record: bool = False) -> tuple[torch.Tensor, ...]:
    """`count` samples of the dense model (Heun, `steps` steps, guidance `cfg`, uniform random labels), clamped
    to [-1, 1], and their labels; with `record`, also the network inputs (z, t, y) each trajectory saw, each
    count × S × ... .

    Sample i's label and noise depend on (seed, i) only. Under torchrun each rank draws a contiguous
    share and the shares are gathered, so every rank holds the same pool.
    """
    config = model.config
    share = math.ceil(count / group.world_size)
    mine = range(group.rank * share, min(count, (group.rank + 1) * share))
    images = torch.zeros(share, config.in_channels, config.input_size, config.input_size, device=device)
    labels = torch.zeros(share, dtype=torch.long, device=device)
    recorded = []
    for i0 in range(0, share, batch_size):
        chunk = range(mine.start + i0, mine.start + min(share, i0 + batch_size))  # a rank's padding re-draws its last
        gens = [generator(seed, TEACHER_POOL, min(i, count - 1), device=device) for i in chunk]
        y = torch.stack([torch.randint(0, config.num_classes, (), generator=g, device=device) for g in gens])
        noise = torch.stack([torch.randn(config.in_channels, config.input_size, config.input_size, generator=g,
                                         device=device) for g in gens]) * config.noise_scale
        inputs = _Inputs(len(chunk))
        hook = model.register_forward_pre_hook(inputs) if record else None
        try:
            with dense_cores(model), autocast():
                x = sample(model, noise, y, steps=steps, cfg=cfg)
        finally:
            if hook is not None:
                hook.remove()
        images[i0:i0 + len(chunk)] = x.float().clamp(-1, 1)
        labels[i0:i0 + len(chunk)] = y
        if record:
            recorded.append(inputs.states())
    parts = [images, labels] + ([torch.cat([r[k] for r in recorded]) for k in range(3)] if record else [])
    return tuple(part[:count] for part in _gather(parts, group))


def build_source(model, spec: DataSpec, *, seed: int, eval_samples: int, device: torch.device, batch_size: int,
                 group: ProcessGroup, autocast, folder: ImageFolder | None = None):
    """The run's source of training inputs; `batch_size` bounds the teacher's sampling batch (at least 16)."""
    noise_scale = model.config.noise_scale
    if spec.kind == "folder":
        return FolderSource(folder, seed, eval_samples, noise_scale, spec.workers, spec.t_distribution)
    sampling = {"sampling_steps": spec.sampling_steps, "cfg": spec.cfg, "sampler": "heun"}
    batch = max(batch_size, SAMPLING_BATCH)
    if spec.kind == "teacher":
        x, y = teacher_samples(model, spec.teacher_samples + eval_samples, steps=spec.sampling_steps, cfg=spec.cfg,
                               seed=seed, device=device, batch_size=batch, group=group, autocast=autocast)
        return TeacherSource(x, y, seed, eval_samples, noise_scale, sampling, spec.t_distribution)
    held = math.ceil(eval_samples / EVAL_STATES_PER_TRAJECTORY)
    _, _, z, t, y = teacher_samples(model, spec.teacher_samples + held, steps=spec.sampling_steps, cfg=spec.cfg,
                                    seed=seed, device=device, batch_size=batch, group=group, autocast=autocast,
                                    record=True)
    n = spec.teacher_samples
    train = tuple(v[:n].flatten(0, 1).cpu() for v in (z, t, y))
    held_out = tuple(v[n:].flatten(0, 1) for v in (z, t, y))
    pick = torch.linspace(0, len(held_out[0]) - 1, eval_samples).round().long()  # spread along the trajectories
    return TrajectorySource(train, tuple(v[pick] for v in held_out), n, seed, sampling)
