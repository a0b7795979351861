"""Generating a sample folder: fixed batches of indices, shared round-robin between ranks, resumable.

Batch k holds indices [k·B, (k+1)·B) whatever the number of processes, and rank r makes the batches
with k mod world_size = r, so every image is computed in the same batch (hence bit for bit the same)
by one process or several. A batch with any index missing is generated whole and only its missing
files are written: a resumed run reproduces the files an uninterrupted one would have written.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import ProcessGroup
from ..graphs import graphed
from ..sampling import SamplerSettings, paired_inputs, sample_with, to_uint8
from ..sla2.layers import dense_twin
from .samples import missing_indices, write_sample

Progress = Callable[[str, int, int], None]  # (task, images done, images to do)


@dataclass
class Generation:
    """What one generation pass did, summed over ranks; seconds is the slowest rank's wall time."""

    folder: Path
    requested: int
    generated: int
    written: int
    reused: int
    seconds: float
    compile_error: str | None = None  # why `compile_blocks` fell back to uncompiled graphs (`graphs.Graphed`)

    @property
    def images_per_second(self) -> float | None:
        return self.generated / self.seconds if self.generated and self.seconds > 0 else None

    def to_dict(self) -> dict:
        return {"folder": str(self.folder), "requested": self.requested, "generated": self.generated,
                "written": self.written, "reused": self.reused, "seconds": self.seconds,
                "images_per_second": self.images_per_second, "compile_error": self.compile_error}


def batches(num_samples: int, batch_size: int) -> list[range]:
    return [range(s, min(s + batch_size, num_samples)) for s in range(0, num_samples, batch_size)]


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16/fp16 as the official evaluations run: float32 weights under autocast."""
    return nullcontext() if dtype == torch.float32 else torch.autocast(device_type=device.type, dtype=dtype)


def _write_batch(folder: Path, indices: range, missing: list[int], images: torch.Tensor) -> None:
    for i in missing:
        write_sample(folder, i, images[i - indices.start])


@torch.no_grad()
def generate_samples(model: nn.Module, folder: Path, num_samples: int, *, settings: SamplerSettings, seed: int,
                     batch_size: int, device: torch.device, dtype: torch.dtype,
                     group: ProcessGroup = ProcessGroup(), progress: Progress | None = None,
                     task: str = "sampling", graphs: bool = True, compile_blocks: bool = False) -> Generation:
    """Write samples 0..num_samples-1 of `model` into `folder` (which must exist), skipping those present.

    `graphs`: on CUDA, replay the model's forward from CUDA graphs (`sla2cli.graphs`; same outputs, no
    per-kernel launch cost), so sampling runs at the speed `sla2 profile` reports for graphs; with
    `compile_blocks` the graphs hold the blocks' non-attention work compiled (faster; float rounding differs).
    """
    net = graphed(model, device, compile_blocks) if graphs else model
    dense = None
    if settings.dense_until > 0:  # the steps before it run the model with every layer dense
        twin = dense_twin(model)
        dense = net if twin is model else graphed(twin, device, compile_blocks) if graphs else twin
    cfg = model.config
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    mine = [b for k, b in enumerate(batches(num_samples, batch_size)) if k % group.world_size == group.rank]
    todo = [(b, missing_indices(folder, b)) for b in mine]
    todo = [(b, missing) for b, missing in todo if missing]
    reused = sum(len(b) for b in mine) - sum(len(missing) for _, missing in todo)
    total = sum(len(b) for b, _ in todo)
    generated = written = 0
    if progress:
        progress(task, 0, total)
    start = time.perf_counter()
    # One helper thread encodes and writes a batch's PNGs and draws the next batch's noise while the GPU samples
    # (at 2048 px those took about a second per image, as long as SLA2's forwards); FIFO, so noise comes first.
    with ThreadPoolExecutor(max_workers=1) as io:
        def inputs(k):
            return io.submit(paired_inputs, seed, todo[k][0], shape, cfg.num_classes, cfg.noise_scale)

        upcoming, writing = inputs(0) if todo else None, None
        for k, (b, missing) in enumerate(todo):
            noise, labels = upcoming.result()
            upcoming = inputs(k + 1) if k + 1 < len(todo) else None
            with autocast(device, dtype):
                images = to_uint8(sample_with(net, noise.to(device), labels.to(device), settings,
                                               dense_model=dense)).cpu()
            if writing is not None:
                writing.result()  # surfaces a failed write; keeps one batch in flight
            writing = io.submit(_write_batch, folder, b, missing, images)
            generated += len(b)
            written += len(missing)
            if progress:
                progress(task, generated, total)
        if writing is not None:
            writing.result()
    seconds = time.perf_counter() - start
    counts = [(generated, written, reused, seconds)]
    if group.distributed:
        counts = [None] * group.world_size
        dist.all_gather_object(counts, (generated, written, reused, seconds))
    return Generation(folder=Path(folder), requested=num_samples, generated=sum(c[0] for c in counts),
                      written=sum(c[1] for c in counts), reused=sum(c[2] for c in counts),
                      seconds=max(c[3] for c in counts), compile_error=getattr(net, "compile_error", None))
