"""torch-fidelity's InceptionV3 (`inception-v3-compat`, the TF-FID network): its weights, offline or downloaded.

Weights come from `--inception-weights PATH` or torch-fidelity's cache (torch hub's
`checkpoints/weights-inception-2015-12-05-6726825d.pth`); when neither is there we try one download
(torch hub's, checked against the hash in the file name) and otherwise say exactly which file to place
where. Everything is checked before any sample is made.
The file is unpickled once, with `weights_only=True`; torch-fidelity gets those tensors, never the
path (it would unpickle the file again, with `weights_only=False`, so a file swapped in between could
run code).
"""

from __future__ import annotations

import socket
from pathlib import Path

import torch

from ..checkpoints.reading import open_regular
from ..errors import InvalidParameter, Param, ParameterError, SLA2Error

FEATURE_EXTRACTOR = "inception-v3-compat"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_FILE = INCEPTION_URL.rsplit("/", 1)[1]
FID_LAYER, ISC_LAYER = "2048", "logits_unbiased"
DOWNLOAD_TIMEOUT_S = 30


def cached_weights_path() -> Path:
    """Where torch-fidelity looks for (and downloads) its Inception weights: torch hub's checkpoints folder."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def download(url: str, dst: Path, progress: bool = False, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Fetch `url` into `dst` with torch hub's downloader: a temporary file beside `dst`, renamed once its
    sha256 starts with the hash the file name carries; `progress` draws torch's bar on stderr. torch hub
    sets no timeout, so a silent network would hang it: sockets get `timeout` meanwhile."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        torch.hub.download_url_to_file(url, str(dst), hash_prefix=dst.stem.rsplit("-", 1)[-1], progress=progress)
    finally:
        socket.setdefaulttimeout(previous)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict of torch-fidelity's InceptionV3, loaded without unpickling code, checked."""
    with open_regular(Path(path)) as file:  # a FIFO or device is refused, never waited on
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
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


def resolve_state(path: Path | None, allow_download: bool = True,
                  progress: bool = False) -> tuple[Path, dict[str, torch.Tensor]]:
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
                download(INCEPTION_URL, cached, progress)
            except (OSError, ValueError, RuntimeError) as exc:  # URLError, disk errors; a wrong hash: RuntimeError
                reason = " ".join(str(exc).split())[:120] or type(exc).__name__
        if not cached.is_file():
            raise ParameterError("inception_weights", None, "Inception weights for FID are missing and could not be "
                                 "downloaded ({reason}): download {url} and place it at {cached}, or pass its path "
                                 "as {name} (without {ref}, eval-fid samples and compares without FID)",
                                 reason=reason, url=INCEPTION_URL, cached=cached, ref=Param("ref"))
    return cached, load_weights(cached)
