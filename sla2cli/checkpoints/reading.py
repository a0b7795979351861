"""Reading every supported checkpoint layout into named weight entries, safely.

Pickles load with `torch.load(weights_only=True)` and a small allowlist; anything else is refused
with the unsafe globals named, unless the user passes `--trust-checkpoint`. The file type is told by
its first bytes, not its extension.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import stat
import struct
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file as load_safetensors

from ..errors import CheckpointError, InvalidParameter, Param, UnsafeCheckpointError

FORMAT_NAME = "sla2cli"
SLA2_PREFIX = "sla2."

# Globals a weights-only unpickle may build: the official JiT `args` and plain containers.
SAFE_GLOBALS = [argparse.Namespace]

# Prefixes wrappers add around the network: DDP, torch.compile, the official Denoiser's `net`.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "net.")


@dataclass
class RawCheckpoint:
    """A file's weight entries (name → state_dict) plus what the file says about itself."""

    path: Path
    layout: str  # jit-pth | pixelgen-ckpt | state-dict | safetensors | sla2cli
    entries: dict[str, dict[str, torch.Tensor]]
    default_entry: str
    args: dict = field(default_factory=dict)  # official JiT `args`, as a dict
    metadata: dict = field(default_factory=dict)  # our safetensors metadata, JSON-decoded

    def entry(self, name: str) -> tuple[str, dict[str, torch.Tensor]]:
        """Pick weights by name; `auto` means the official evaluation's choice (EMA) or the only one."""
        chosen = self.default_entry if name == "auto" else name
        if chosen not in self.entries:
            raise InvalidParameter("weights", name, "{name} {value!r} is not in {file}; available: {available}",
                                   file=self.path.name, available=", ".join(self.entries))
        return chosen, self.entries[chosen]


def _tensors(state: dict) -> dict[str, torch.Tensor]:
    """The entries of a loaded dictionary that can be weights; a hand-made file may hold anything else too."""
    return {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _strip_wrappers(state: dict) -> dict[str, torch.Tensor]:
    tensors = _tensors(state)
    changed = True
    while changed and tensors:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in tensors):
                tensors = {k[len(prefix):]: v for k, v in tensors.items()}
                changed = True
    return tensors


def _with_prefix(state: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in _tensors(state).items() if k.startswith(prefix)}


_SPECIAL = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def open_regular(path: Path) -> BinaryIO:
    """`path` opened for reading, or CheckpointError unless it is a regular file.

    Opening a FIFO for reading waits for a writer, and a device may never end: the open is non-blocking,
    so it returns at once whatever `path` is, and the file's type is checked on what was opened.
    """
    fd = None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        mode = os.fstat(fd).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except OSError as exc:
        mode = os.stat(path).st_mode if os.path.exists(path) else stat.S_IFREG  # a socket cannot be opened
        if stat.S_ISREG(mode):
            raise CheckpointError(f"cannot read {path} ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        if fd is not None:
            os.close(fd)
        kind = next((name for test, name in _SPECIAL if test(mode)), "not a regular file")
        raise CheckpointError(f"{path} is {kind}, not a file")
    os.set_blocking(fd, True)
    file = os.fdopen(fd, "rb")
    file.raw.name = str(path)  # messages and readers name the file, not its descriptor
    return file


def _sniff(path: Path) -> str:
    """The file's type by its first bytes: zip (torch.save), pickle protocol 2+ (legacy torch.save), or
    safetensors (a little-endian u64 header length, then the JSON header's `{`)."""
    with open_regular(path) as f:
        head = f.read(16)
        size = os.fstat(f.fileno()).st_size
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 0 < header_len < size:
            return "safetensors"
    if head[:1] == b"\x80":
        return "torch-legacy"
    return "unknown"


def _reason(exc: BaseException) -> str:
    """One line saying why torch could not read a file; its weights-only messages are paragraphs of advice
    around the one line that matters."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines() if line.strip()]
    detail = [line for line in lines if line.startswith(("WeightsUnpickler error:", "Trying to load unsupported"))]
    return (detail or lines or [type(exc).__name__])[0].removeprefix("WeightsUnpickler error: ")


def _torch_load(path: Path, trust: bool, mmap: bool):
    """mmap keeps multi-GB training checkpoints (optimizer state included) off the heap until used.

    torch.load reads any path ending in `.safetensors` as safetensors, whatever it holds: such a file,
    which `read_checkpoint` found to be a pickle by its content, is handed over open (torch cannot mmap that).
    """
    by_name = path.name.endswith(".safetensors")
    with open_regular(path) if by_name else nullcontext(path) as source:
        if trust:
            return torch.load(source, map_location="cpu", weights_only=False, mmap=mmap and not by_name)
        try:
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap and not by_name)
        except pickle.UnpicklingError as exc:
            try:
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except Exception:  # legacy (non-zip) format: only the loader's message names the global
                unsafe = re.findall(r"GLOBAL ([\w.]+)", str(exc))
            allowed = {f"{c.__module__}.{c.__qualname__}" for c in SAFE_GLOBALS}
            unsafe = [g for g in dict.fromkeys(unsafe) if g not in allowed]
            if unsafe:
                raise UnsafeCheckpointError(
                    "trust_checkpoint", False, "{file} needs unsafe pickle globals ({names}); pass {trust} only if "
                    "you trust where the file came from", file=path.name, names=", ".join(unsafe),
                    trust=Param("trust_checkpoint=True")) from None
            raise CheckpointError(f"{path.name} is not a readable PyTorch checkpoint ({_reason(exc)})") from None


def _load_torch(path: Path, trust: bool, mmap: bool) -> RawCheckpoint:
    try:
        obj = _torch_load(path, trust, mmap)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever unpickling a damaged file raises, the file is the cause
        raise CheckpointError(f"{path.name} is truncated or not a PyTorch checkpoint ({_reason(exc)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path.name} holds a {type(obj).__name__}, not a checkpoint dictionary")

    sla2_meta = obj.get("sla2_metadata") if isinstance(obj.get("sla2_metadata"), dict) else {}
    if "model" in obj and isinstance(obj["model"], dict):
        shared_sla2 = _tensors(obj["sla2"]) if isinstance(obj.get("sla2"), dict) else {}  # one set for every entry
        entries = {name: {**_strip_wrappers(obj[name]), **shared_sla2}
                   for name in ("model", "model_ema1", "model_ema2") if isinstance(obj.get(name), dict)}
        args = obj.get("args")
        args = vars(args) if isinstance(args, argparse.Namespace) else (args if isinstance(args, dict) else {})
        default = "model_ema1" if "model_ema1" in entries else "model"
        return RawCheckpoint(path, "jit-pth", entries, default, args=args, metadata=sla2_meta)
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        state = obj["state_dict"]
        entries = {}
        for name in ("denoiser", "ema_denoiser"):
            sub = _with_prefix(state, name + ".")
            if sub:
                entries[name] = {**_strip_wrappers(sub), **_with_prefix(state, f"{SLA2_PREFIX}{name}.")}
        if entries:
            default = "ema_denoiser" if "ema_denoiser" in entries else "denoiser"
            return RawCheckpoint(path, "pixelgen-ckpt", entries, default, metadata=sla2_meta)
        obj = state
    tensors = _strip_wrappers(obj)
    if not tensors:
        raise CheckpointError(f"{path.name} holds no tensors; expected a JiT checkpoint or state_dict")
    return RawCheckpoint(path, "state-dict", {"model": tensors}, "model")


def _load_safetensors(path: Path) -> RawCheckpoint:
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata() or {}
        tensors = load_safetensors(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path.name} is a corrupt or truncated safetensors file ({exc})") from None
    if raw_meta.get("format") == FORMAT_NAME:
        try:
            metadata = {k: json.loads(v) if k not in ("format", "format_version") else v for k, v in raw_meta.items()}
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path.name} has corrupt sla2cli metadata ({exc})") from None
        return RawCheckpoint(path, "sla2cli", {"model": tensors}, "model", metadata=metadata)
    return RawCheckpoint(path, "safetensors", {"model": _strip_wrappers(tensors)}, "model")


def read_checkpoint(path: str | Path, trust: bool = False) -> RawCheckpoint:
    """Open any supported file; raises CheckpointError with one actionable sentence otherwise."""
    path = Path(path)
    kind = _sniff(path)
    if kind == "safetensors":
        return _load_safetensors(path)
    if kind in ("torch-zip", "torch-legacy"):
        return _load_torch(path, trust, mmap=kind == "torch-zip")
    raise CheckpointError(f"{path.name} is not a checkpoint (expected a .pth/.pt/.ckpt or .safetensors file)")
