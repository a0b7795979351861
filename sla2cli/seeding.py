"""Random draws named by what they are for, not by the order they happen in.

Every draw is keyed by (seed, stream, index...): each kind of draw has its own stream (below) and each
sample its index, so a sample's draws are the same whatever batch, process or resumed run makes them,
and two kinds of draw never share numbers.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import InvalidParameter

# The kinds of draw. SAMPLE_NOISE and SAMPLE_LABELS key the samples of `eval-fid` (and its sample folders):
# their values must never change.
(SAMPLE_NOISE, SAMPLE_LABELS, TRAIN_ORDER, TRAIN_NOISE, EVAL_ORDER, EVAL_NOISE, TEACHER_POOL, PROBE_SAMPLES,
 PROBE_NOISE) = range(9)


def check_seed(seed: int) -> None:
    """Seeds name NumPy SeedSequence streams, which take non-negative integers only."""
    if seed < 0:
        raise InvalidParameter("seed", seed, "{name} must be >= 0, got {value}")


def stream_seed(seed: int, *key: int) -> int:
    """A 64-bit seed for the stream named by (seed, *key): NumPy's SeedSequence hashing, no collisions
    between nearby seeds and indices."""
    check_seed(seed)
    return int(np.random.SeedSequence([seed, *key]).generate_state(1, np.uint64)[0])


def generator(seed: int, *key: int, device="cpu") -> torch.Generator:
    """A torch generator on `device` for the stream (seed, *key)."""
    return torch.Generator(device=device).manual_seed(stream_seed(seed, *key))
