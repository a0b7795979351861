"""Training inputs: clean images (an image folder, or the dense teacher's own samples).

Every random draw is a pure function of (seed, stream, global sample position): which image a step
uses, and (`diffusion.noised`, in the trainer) its t and its noise. A run therefore needs no RNG state
to resume exactly, and K processes that each take their slice of the global batch see the very samples
one process would.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.distributed as dist

from ..data.images import ImageFolder, image_loader
from ..distributed import ProcessGroup
from ..sampling import sample
from ..seeding import EVAL_ORDER, TEACHER_POOL, TRAIN_ORDER, generator
from ..sla2.probe import dense_cores
from .config import DataSpec

SAMPLING_BATCH = 16  # the teacher samples its pool this many images at a time (or the training batch, if larger)


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

    def __init__(self, folder: ImageFolder, seed: int, eval_samples: int, workers: int = 0):
        self.folder, self.workers = folder, workers
        self.order = _Shuffled(len(folder), seed, TRAIN_ORDER)
        self.eval_indices = _Shuffled(len(folder), seed, EVAL_ORDER)(range(eval_samples))

    def describe(self) -> dict:
        return {"source": "folder", "path": str(self.folder.root), "images": len(self.folder),
                "classes": len(self.folder.mapping), "resolution": self.folder.resolution}

    def train_batches(self, steps: list[range]):
        """(x, y) for each step's positions, in order."""
        return iter(image_loader(self.folder, [self.order(positions) for positions in steps], self.workers))

    def eval_batch(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = next(iter(image_loader(self.folder, [self.eval_indices])))
        return x.to(device), y.to(device)


class TeacherSource:
    """A pool of the dense teacher's own samples (random labels), drawn once; the last `eval_samples` evaluate."""

    kind = "teacher"

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, seed: int, eval_samples: int, sampling_steps: int):
        self.train_x, self.train_y = images[:-eval_samples], labels[:-eval_samples]
        self.eval_x, self.eval_y = images[-eval_samples:], labels[-eval_samples:]
        self.order = _Shuffled(len(self.train_x), seed, TRAIN_ORDER)
        self.sampling_steps = sampling_steps

    def describe(self) -> dict:
        return {"source": "teacher", "samples": len(self.train_x), "sampling_steps": self.sampling_steps,
                "sampler": "heun", "labels": "uniform random"}

    def train_batches(self, steps: list[range]):
        """(x, y) for each step's positions, in order."""
        for positions in steps:
            idx = torch.tensor(self.order(positions), dtype=torch.long, device=self.train_x.device)
            yield self.train_x[idx], self.train_y[idx]

    def eval_batch(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.eval_x.to(device), self.eval_y.to(device)


@torch.no_grad()
def teacher_samples(model, count: int, *, steps: int, seed: int, device: torch.device, batch_size: int,
                    group: ProcessGroup, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` samples of the dense model (Heun, `steps` steps, uniform random labels), clamped to [-1, 1].

    Sample i's label and noise depend on (seed, i) only. Under torchrun each rank draws a contiguous
    share and the shares are gathered, so every rank holds the same pool.
    """
    cfg = model.config
    share = math.ceil(count / group.world_size)
    mine = range(group.rank * share, min(count, (group.rank + 1) * share))
    images = torch.zeros(share, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)
    labels = torch.zeros(share, dtype=torch.long, device=device)
    for i0 in range(0, len(mine), batch_size):
        chunk = mine[i0:i0 + batch_size]
        gens = [generator(seed, TEACHER_POOL, i, device=device) for i in chunk]
        y = torch.stack([torch.randint(0, cfg.num_classes, (), generator=g, device=device) for g in gens])
        noise = torch.stack([torch.randn(cfg.in_channels, cfg.input_size, cfg.input_size, generator=g,
                                         device=device) for g in gens]) * cfg.noise_scale
        with dense_cores(model), autocast():
            x = sample(model, noise, y, steps=steps)
        images[i0:i0 + len(chunk)] = x.float().clamp(-1, 1)
        labels[i0:i0 + len(chunk)] = y
    if group.distributed:
        gathered_x = [torch.empty_like(images) for _ in range(group.world_size)]
        gathered_y = [torch.empty_like(labels) for _ in range(group.world_size)]
        dist.all_gather(gathered_x, images)
        dist.all_gather(gathered_y, labels)
        images, labels = torch.cat(gathered_x), torch.cat(gathered_y)
    return images[:count], labels[:count]


def build_source(model, spec: DataSpec, *, seed: int, eval_samples: int, device: torch.device, batch_size: int,
                 group: ProcessGroup, autocast, folder: ImageFolder | None = None):
    """The run's source of clean images; `batch_size` bounds the teacher's sampling batch (at least 16)."""
    if spec.kind == "folder":
        return FolderSource(folder, seed, eval_samples, spec.workers)
    x, y = teacher_samples(model, spec.teacher_samples + eval_samples, steps=spec.sampling_steps, seed=seed,
                           device=device, batch_size=max(batch_size, SAMPLING_BATCH), group=group, autocast=autocast)
    return TeacherSource(x, y, seed, eval_samples, spec.sampling_steps)
