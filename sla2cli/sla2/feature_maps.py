"""Feature maps φ of the linear-attention branch; a new map is one new registry entry."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "softmax": lambda x: torch.softmax(x, dim=-1),
    "elu": lambda x: F.elu(x) + 1.0,
    "relu": F.relu,
}
