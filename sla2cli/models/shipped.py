"""Trained models shipped inside the package, by name.

"demo" (`sla2cli/assets/demo-jit.safetensors`) is a class-conditional JiT (64x64 px, patch 2: 1024 image
tokens + 8 in-context tokens, width 192, depth 6, 3 heads of 64) trained by `scripts/train_demo_model.py`
on the procedural batik-like textures of `sla2cli.data.textures`. Its weight matrices are stored in
float16 (vectors and the position table in float32) to keep the file under 10 MB; `load_model` reads a
file of mixed dtypes into a float32 model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..checkpoints import LoadInfo, load_model
from ..errors import CheckpointError
from .jit import JiT, JiTConfig

ASSETS = Path(__file__).parent.parent / "assets"


@dataclass(frozen=True)
class ShippedModel:
    """A model file in the package, its architecture, and the texture seed of data it never saw in training."""

    name: str
    path: Path
    config: JiTConfig
    held_out_seed: int

    def load(self, device="cpu") -> tuple[JiT, LoadInfo]:
        """The model (float32, eval mode) and its LoadInfo."""
        if not self.path.exists():
            raise CheckpointError(f"the {self.name} model {self.path} is missing from this installation; "
                                  "reinstall sla2cli (pip install -e .)")
        return load_model(self.path, device=device)


SHIPPED_MODELS = {
    "demo": ShippedModel(
        name="demo", path=ASSETS / "demo-jit.safetensors",
        config=JiTConfig(input_size=64, patch_size=2, in_channels=3, hidden_size=192, depth=6, num_heads=3,
                         ffn_hidden_dim=512, num_classes=8, bottleneck_dim=16, in_context_len=8,
                         in_context_start=2, noise_scale=1.0),
        held_out_seed=7_777),  # training drew textures of seed 0 only
}

DEMO = SHIPPED_MODELS["demo"]
DEMO_MODEL_PATH, DEMO_CONFIG, HELD_OUT_SEED = DEMO.path, DEMO.config, DEMO.held_out_seed


def half_storage_copy(model: nn.Module) -> nn.Module:
    """A CPU copy whose weight matrices are float16 (vectors and `pos_embed` stay float32), for shipping.

    A state_dict of mixed dtypes loads back into a float32 model (see `checkpoints._float_dtype`).
    """
    ship = copy.deepcopy(model).cpu().float()
    for name, p in ship.named_parameters():
        if p.dim() >= 2 and name != "pos_embed":
            p.data = p.data.half()
    return ship
