"""Running one command across the processes `torchrun` starts (NCCL on CUDA, gloo on CPU).

Without torchrun's environment everything here degrades to a single process, so the same code path
serves one GPU, several GPUs and CPU tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ProcessGroup:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_from_env(device: torch.device) -> ProcessGroup:
    """Join torchrun's process group if its variables are set; pick each rank's CUDA device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return ProcessGroup()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(local)
    return ProcessGroup(rank=rank, world_size=world, local_rank=local)


def rank_device(device: torch.device, group: ProcessGroup) -> torch.device:
    """Each rank's device: cuda:LOCAL_RANK under torchrun, otherwise what was asked for."""
    if device.type == "cuda" and group.distributed:
        return torch.device("cuda", group.local_rank)
    return device


def barrier(group: ProcessGroup) -> None:
    if group.distributed:
        dist.barrier()


def shutdown(group: ProcessGroup) -> None:
    if group.distributed and dist.is_initialized():
        dist.destroy_process_group()


def from_main(group: ProcessGroup, value):
    """Rank 0's `value` (any picklable object) on every rank."""
    if not (group.distributed and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
