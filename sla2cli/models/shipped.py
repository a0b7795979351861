"""Trained models shipped inside the package, by name.

Both are class-conditional JiTs trained by `scripts/train_demo_model.py` on the procedural batik-like
textures of `sla2cli.data.textures` (seed 0); their weight matrices are stored in float16 (vectors and the
position table in float32) and `load_model` reads such a file of mixed dtypes into a float32 model.

- "demo" (`assets/demo-jit.safetensors`, 9.2 MB): 64x64 px, patch 2 (1024 image tokens + 8 in-context
  tokens), width 192, depth 6, 3 heads of 64; small enough for `sla2 demo` on a CPU, but attention is only
  47% of its forward FLOPs, so SLA2 cannot make it much faster.
- "showcase" (`assets/showcase-jit.safetensors`, 14.2 MB, 6.29 M parameters): 128x128 px, patch 2 (4096
  image tokens + 8 in-context tokens), width 192, depth 8, 3 heads of 64. Attention is 78% of a forward's
  FLOPs (103.4 of 132.5 GFLOP per image, torch and fvcore counters alike): the model on which SLA2 can
  be both faster and as good. Width and depth are the largest that keep the file well under 16 MB (the
  position table alone is 3.1 MB in float32); it needs a GPU.
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
    needs_cuda: bool = False  # too slow for a CPU

    def check_installed(self) -> None:
        """The one-line error of a model file missing from this installation."""
        if not self.path.exists():
            raise CheckpointError(f"the {self.name} model {self.path} is missing from this installation; "
                                  "reinstall sla2cli (pip install -e .)")

    def load(self, device="cpu") -> tuple[JiT, LoadInfo]:
        """The model (float32, eval mode) and its LoadInfo."""
        self.check_installed()
        return load_model(self.path, device=device)


SHIPPED_MODELS = {
    "demo": ShippedModel(
        name="demo", path=ASSETS / "demo-jit.safetensors",
        config=JiTConfig(input_size=64, patch_size=2, in_channels=3, hidden_size=192, depth=6, num_heads=3,
                         ffn_hidden_dim=512, num_classes=8, bottleneck_dim=16, in_context_len=8,
                         in_context_start=2, noise_scale=1.0),
        held_out_seed=7_777),  # training drew textures of seed 0 only
    "showcase": ShippedModel(
        name="showcase", path=ASSETS / "showcase-jit.safetensors",
        config=JiTConfig(input_size=128, patch_size=2, in_channels=3, hidden_size=192, depth=8, num_heads=3,
                         ffn_hidden_dim=512, num_classes=8, bottleneck_dim=16, in_context_len=8,
                         in_context_start=2, noise_scale=1.0),
        held_out_seed=8_888, needs_cuda=True),  # training drew textures of seed 0 only
}

DEMO, SHOWCASE = SHIPPED_MODELS["demo"], SHIPPED_MODELS["showcase"]
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
