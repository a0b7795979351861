"""A feature space for the demo's domain: a small conv net that tells the eight texture classes apart.

Inception-V3 features need a 92 MB download and were learnt on photographs; the demo's 64x64 batik-like
textures (`sla2cli.data.textures`) are neither. `TextureNet` was trained by
`scripts/train_texture_features.py` to classify those textures and ships as
`sla2cli/assets/texture-features.safetensors` (under 1 MB). Its penultimate layer (128 numbers) is the
feature space of the "texture Fréchet distance" and KID: `TextureFeatureExtractor` registers it with
torch-fidelity (`register_feature_extractor`), whose statistics then work in it unchanged.
These numbers compare texture sets with each other only; they are not Inception FIDs.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.helpers import vassert

from ..data.textures import NUM_CLASSES
from ..errors import SLA2Error

EXTRACTOR_NAME = "sla2cli-textures"
WEIGHTS_PATH = Path(__file__).resolve().parent.parent / "assets" / "texture-features.safetensors"
INPUT_SIZE = 64
FEATURE_DIM = 128
FEATURES, LOGITS = "features", "logits"


class TextureNet(nn.Module):
    """Four conv stages (64 → 4 px), global average pooling, a 128-d feature layer, class logits."""

    WIDTHS = (24, 48, 96, 128)

    def __init__(self, num_classes: int = NUM_CLASSES, dim: int = FEATURE_DIM):
        super().__init__()
        layers, c = [], 3
        for w in self.WIDTHS:
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
            c = w
        self.body = nn.Sequential(*layers)
        self.features = nn.Sequential(nn.Linear(c, dim), nn.ReLU())
        self.head = nn.Linear(dim, num_classes)

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """uint8 B×3×H×W (what torch-fidelity feeds) → float in [-1, 1] at 64×64."""
        x = images.float() / 127.5 - 1.0
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False)
        return x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, logits) of images in [-1, 1] at 64×64."""
        f = self.features(self.body(x).mean(dim=(2, 3)))
        return f, self.head(f)


def load_weights(path: Path = WEIGHTS_PATH) -> dict[str, torch.Tensor]:
    """The shipped network's tensors (safetensors: nothing is unpickled)."""
    from safetensors.torch import load_file
    if not Path(path).is_file():
        raise SLA2Error(f"the texture feature network {path} is missing from this installation; reinstall sla2cli "
                        "(pip install -e .)")
    return load_file(str(path))


class TextureFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity's side of `TextureNet`: uint8 images in, (features, logits) out, as requested."""

    def __init__(self, name, features_list, state_dict: dict[str, torch.Tensor] | None = None, **kwargs):
        super().__init__(name, features_list)
        self.net = TextureNet()
        self.net.load_state_dict(load_weights() if state_dict is None else state_dict)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return FEATURES, LOGITS

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"fid": FEATURES, "kid": FEATURES, "prc": FEATURES, "isc": LOGITS}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE, dtype=torch.uint8)

    def forward(self, x):
        vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting image as torch.Tensor with dtype=torch.uint8")
        vassert(x.dim() == 4 and x.shape[1] == 3, f"Input is not Bx3xHxW: {x.shape}")
        features, logits = self.net(self.net.prepare(x))
        out = {FEATURES: features, LOGITS: logits}
        return tuple(out[name] for name in self.features_list)


def register() -> None:
    """Make the extractor known to torch-fidelity under EXTRACTOR_NAME (once per process)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
    if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(EXTRACTOR_NAME, TextureFeatureExtractor)
