"""torch-fidelity's InceptionV3 (`inception-v3-compat`, the TF-FID network): weights offline, features.

Weights come from `--inception-weights PATH` or torch-fidelity's cache (torch hub's
`checkpoints/weights-inception-2015-12-05-6726825d.pth`); when neither is there we try one download
and otherwise say exactly which file to place where. Everything is checked before any sample is made.
The file is unpickled once, with `weights_only=True`; torch-fidelity gets those tensors, never the
path (it would unpickle the file again, with `weights_only=False`, so a file swapped in between could
run code).
torch-fidelity is imported lazily: it pulls in torchvision, which costs seconds at start-up.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import urllib.request
from contextlib import nullcontext
from pathlib import Path

import torch

from ..errors import InvalidParameter, ParameterError, SLA2Error

FEATURE_EXTRACTOR = "inception-v3-compat"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_FILE = INCEPTION_URL.rsplit("/", 1)[1]
FID_LAYER, ISC_LAYER = "2048", "logits_unbiased"
DOWNLOAD_TIMEOUT_S = 30


def cached_weights_path() -> Path:
    """Where torch-fidelity looks for (and downloads) its Inception weights: torch hub's checkpoints folder."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def download(url: str, dst: Path, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Fetch `url` into `dst` atomically; the sha256 must start with the hash the file name carries.

    Nothing is created (not even the folder) unless the server answers.
    """
    prefix = dst.stem.rsplit("-", 1)[-1]
    with urllib.request.urlopen(url, timeout=timeout) as response:
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".part", dir=dst.parent)
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as f:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    f.write(chunk)
                    digest.update(chunk)
            if not digest.hexdigest().startswith(prefix):
                raise OSError(f"downloaded file's sha256 {digest.hexdigest()[:12]}… does not start with {prefix}")
            os.replace(tmp, dst)
        finally:
            Path(tmp).unlink(missing_ok=True)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict of torch-fidelity's InceptionV3, loaded without unpickling code, checked."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        detail = " ".join(str(exc).split())[:200]
        raise SLA2Error(f"Inception weights {path} cannot be read as a plain state_dict ({detail}); "
                        f"use torch-fidelity's {INCEPTION_FILE}") from None
    fc = state.get("fc.weight") if isinstance(state, dict) else None
    conv = state.get("Conv2d_1a_3x3.conv.weight") if isinstance(state, dict) else None
    if not (torch.is_tensor(fc) and tuple(fc.shape) == (1008, 2048)
            and torch.is_tensor(conv) and tuple(conv.shape) == (32, 3, 3, 3)):
        raise SLA2Error(f"{path} is not an InceptionV3 state_dict of torch-fidelity's architecture "
                        f"(expected fc.weight 1008x2048); use torch-fidelity's {INCEPTION_FILE}")
    return state


def resolve_weights(path: Path | None, allow_download: bool = True) -> Path:
    """The Inception weights file to use, checked; raises with the exact file and place when missing.

    Errors name `path` as `EvalRequest.inception_weights`, where it comes from.
    """
    return resolve_state(path, allow_download)[0]


def resolve_state(path: Path | None, allow_download: bool = True) -> tuple[Path, dict[str, torch.Tensor]]:
    """`resolve_weights`'s file and its tensors, read once: hand the tensors to `create_extractor`."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise InvalidParameter("inception_weights", path, "{name} {value} does not exist; pass torch-fidelity's "
                                   "{file} (from {url})", file=INCEPTION_FILE, url=INCEPTION_URL)
        return path, load_weights(path)
    cached = cached_weights_path()
    if not cached.is_file():
        reason = "downloads are off"
        if allow_download:
            try:
                download(INCEPTION_URL, cached)
            except (OSError, ValueError) as exc:  # URLError, timeouts, disk and hash errors
                reason = " ".join(str(exc).split())[:120] or type(exc).__name__
        if not cached.is_file():
            raise ParameterError("inception_weights", None, "Inception weights for FID are missing and could not be "
                                 "downloaded ({reason}): download {url} and place it at {cached}, or pass its path "
                                 "as {name}", reason=reason, url=INCEPTION_URL, cached=cached)
    return cached, load_weights(cached)


def _device_context(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def create_extractor(weights: Path | dict[str, torch.Tensor], layers: list[str], device: torch.device):
    """torch-fidelity's feature extractor on `device` (its `cuda` flag means the current CUDA device).

    `weights`: the tensors `resolve_state` read, or a file (then read here with `weights_only=True`).
    torch-fidelity unpickles `feature_extractor_weights_path` with `weights_only=False`, so it gets an
    in-memory copy we serialised from those tensors, never a path to a file someone else can replace.
    """
    from torch_fidelity.utils import create_feature_extractor
    state = weights if isinstance(weights, dict) else load_weights(Path(weights))
    what = "the Inception weights" if isinstance(weights, dict) else str(weights)
    buffer = io.BytesIO()
    torch.save({k: v for k, v in state.items() if torch.is_tensor(v)}, buffer)
    buffer.seek(0)
    with _device_context(device):
        try:
            return create_feature_extractor(FEATURE_EXTRACTOR, list(layers), cuda=device.type == "cuda",
                                            feature_extractor_weights_path=buffer, verbose=False)
        except RuntimeError as exc:  # load_state_dict: wrong keys or shapes
            detail = " ".join(str(exc).split())[:200]
            raise SLA2Error(f"{what} do not fit torch-fidelity's InceptionV3: {detail}") from None


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
