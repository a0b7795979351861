"""Writing checkpoints atomically, in our format or back in the layouts the original codebases load.

Our format is one safetensors file: every tensor (JiT weights in the official key names, SLA2
parameters under `blocks.N.attn.core.`) plus string metadata (format, version, model config, SLA2
config, provenance). `jit-pth` and `pixelgen-ckpt` carry the dense weights where the official code
expects them; converted layers' SLA2 tensors ride along under `sla2` / `sla2.` with the same metadata.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from ..errors import UsageError
from .reading import FORMAT_NAME, SLA2_PREFIX

FORMAT_VERSION = "1"
CORE_MARKER = ".attn.core."


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_output(dst: Path, force: bool, sources: tuple[Path, ...] = ()) -> None:
    """Refuse to overwrite without --force, and never overwrite an input even with it."""
    for src in sources:
        if dst.exists() and src.exists() and dst.resolve() == Path(src).resolve():
            raise UsageError(f"output {dst} is the input file; choose another -o path (inputs are never modified)")
    if dst.exists() and not force:
        raise UsageError(f"{dst} already exists; pass --force to overwrite it")
    if dst.exists() and dst.is_dir():
        raise UsageError(f"{dst} is a directory; -o needs a file path")
    if not dst.parent.exists():
        raise UsageError(f"folder {dst.parent} does not exist; create it first")


def atomic_write(dst: Path, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(dense JiT weights, SLA2 parameters) of a model state_dict."""
    dense = {k: v for k, v in state.items() if CORE_MARKER not in k}
    sla2 = {k: v for k, v in state.items() if CORE_MARKER in k}
    return dense, sla2


def _metadata(meta: dict) -> dict[str, str]:
    out = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
    out.update({k: json.dumps(v, sort_keys=True) for k, v in meta.items()})
    return out


def _contiguous(state: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def write_safetensors(dst: Path, state: dict, meta: dict) -> None:
    atomic_write(dst, lambda tmp: save_file(_contiguous(state), tmp, metadata=_metadata(meta)))


def write_jit_pth(dst: Path, state: dict, meta: dict) -> None:
    """Official JiT layout: model / model_ema1 / model_ema2 (one set of weights) with `net.` keys, and args."""
    dense, sla2 = split_state(_contiguous(state))
    net = {f"net.{k}": v for k, v in dense.items()}
    config = meta["model_config"]
    payload = {
        "model": net, "model_ema1": net, "model_ema2": net,
        "args": argparse.Namespace(model=meta.get("preset"), img_size=config["input_size"],
                                   class_num=config["num_classes"], noise_scale=config["noise_scale"]),
    }
    if sla2:
        payload["sla2"] = sla2
        payload["sla2_metadata"] = meta
    atomic_write(dst, lambda tmp: torch.save(payload, tmp))


def write_pixelgen_ckpt(dst: Path, state: dict, meta: dict) -> None:
    """PixelGen/Lightning layout: `denoiser.` and `ema_denoiser.` keys; SLA2 tensors under `sla2.<module>.`."""
    dense, sla2 = split_state(_contiguous(state))
    merged = {}
    for module in ("denoiser", "ema_denoiser"):
        merged.update({f"{module}.{k}": v for k, v in dense.items()})
        merged.update({f"{SLA2_PREFIX}{module}.{k}": v for k, v in sla2.items()})
    payload = {"state_dict": merged, "sla2_metadata": meta} if sla2 else {"state_dict": merged}
    atomic_write(dst, lambda tmp: torch.save(payload, tmp))


WRITERS: dict[str, Callable[[Path, dict, dict], None]] = {
    "safetensors": write_safetensors,
    "jit-pth": write_jit_pth,
    "pixelgen-ckpt": write_pixelgen_ckpt,
}
