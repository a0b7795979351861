"""The feature spaces FID and KID are measured in: one registry, `sla2 eval-fid --features NAME`.

Each entry names a feature extractor in torch-fidelity's own registry, the layer FID and KID read, how
reports call the Fréchet distance there, and where its weights come from (read once, checked, before
any sample is made). torch-fidelity then extracts features and computes the statistics the same way
in every space.

- `inception`: torch-fidelity's Inception-V3 (`inception-v3-compat`, pool-3): FID as papers report it.
- `textures`: the network shipped for the demo's textures (`texture_features`): a texture Fréchet
  distance, offline, comparable only with itself.

torch-fidelity is imported lazily: it pulls in torchvision, which costs seconds at start-up.
"""

from __future__ import annotations

import io
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import InvalidParameter, Param, SLA2Error
from . import inception


@dataclass(frozen=True)
class FeatureSpace:
    name: str
    extractor: str  # torch-fidelity's registry name
    layer: str  # the features FID and KID use
    dim: int
    metric: str  # what reports call the Fréchet distance in this space
    isc_layer: str | None  # logits for the Inception Score, where it is defined
    resolve: Callable[[Path | None, bool, bool], tuple[Path, dict]]  # (path, allow download, show progress)
    #                                                                 -> (weights file, its tensors)
    extractor_kwargs: Callable[[dict], dict]  # what torch-fidelity's constructor gets for those tensors

    def describe(self, weights: Path) -> dict:
        return {"name": self.name, "extractor": self.extractor, "layer": self.layer, "dim": self.dim,
                "metric": self.metric, "weights": str(weights)}


def _inception_kwargs(state: dict) -> dict:
    """torch-fidelity unpickles `feature_extractor_weights_path` with `weights_only=False`: it gets an
    in-memory copy serialised from tensors we read safely, never a path someone else can replace."""
    buffer = io.BytesIO()
    torch.save({k: v for k, v in state.items() if torch.is_tensor(v)}, buffer)
    buffer.seek(0)
    return {"feature_extractor_weights_path": buffer}


def _texture_weights(path: Path | None, allow_download: bool = True, progress: bool = False) -> tuple[Path, dict]:
    from . import texture_features
    if path is not None:
        raise InvalidParameter("inception_weights", path, "{name} is for {inception}; the texture features ship "
                               "with sla2cli", inception=Param("features='inception'"))
    texture_features.register()
    return texture_features.WEIGHTS_PATH, texture_features.load_weights()


FEATURE_SPACES: dict[str, FeatureSpace] = {
    "inception": FeatureSpace("inception", inception.FEATURE_EXTRACTOR, inception.FID_LAYER, 2048, "FID",
                              inception.ISC_LAYER, inception.resolve_state, _inception_kwargs),
    "textures": FeatureSpace("textures", "sla2cli-textures", "features", 128, "texture Fréchet distance", None,
                             _texture_weights, lambda state: {"state_dict": state}),
}


def feature_space(name: str) -> FeatureSpace:
    if name not in FEATURE_SPACES:
        raise InvalidParameter("features", name, "{name} {value!r} is not a feature space; use "
                               + ", ".join(FEATURE_SPACES))
    return FEATURE_SPACES[name]


def _device_context(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def create_extractor(weights: Path | dict[str, torch.Tensor], layers: list[str], device: torch.device,
                     features: str = "inception"):
    """torch-fidelity's extractor of `features` on `device` (its `cuda` flag means the current CUDA device).

    `weights`: the tensors the space's `resolve` read, or a file (then read and checked here).
    """
    from torch_fidelity.utils import create_feature_extractor
    space = feature_space(features)
    what = f"{weights}" if isinstance(weights, (str, Path)) else f"the {space.name} weights"
    state = space.resolve(Path(weights), False, False)[1] if isinstance(weights, (str, Path)) else weights
    with _device_context(device):
        try:
            return create_feature_extractor(space.extractor, list(layers), cuda=device.type == "cuda",
                                            verbose=False, **space.extractor_kwargs(state))
        except RuntimeError as exc:  # load_state_dict: wrong keys or shapes
            detail = " ".join(str(exc).split())[:200]
            raise SLA2Error(f"{what} do not fit {space.extractor}: {detail}") from None


def dataset_features(dataset, extractor, device: torch.device, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Features of a Dataset of uint8 3×H×W images, via torch-fidelity's own loop."""
    from torch_fidelity.utils import get_featuresdict_from_dataset
    with _device_context(device):
        return get_featuresdict_from_dataset(dataset, extractor, batch_size, device.type == "cuda",
                                             save_cpu_ram=len(dataset) < 512, verbose=False)


def input_features(source: str, extractor, device: torch.device, batch_size: int = 64, cache: bool = True,
                   save_cpu_ram: bool = False) -> dict[str, torch.Tensor]:
    """Features of a torch-fidelity input: a registered name (cached by torch-fidelity) or an image folder."""
    from torch_fidelity.utils import extract_featuresdict_from_input_id_cached
    with _device_context(device):
        try:
            return extract_featuresdict_from_input_id_cached(
                2, extractor, input2=source, cuda=device.type == "cuda", batch_size=batch_size, cache=cache,
                verbose=False, save_cpu_ram=save_cpu_ram)
        except ValueError as exc:  # torch-fidelity's vassert
            raise SLA2Error(f"reference {source}: {exc}") from None
