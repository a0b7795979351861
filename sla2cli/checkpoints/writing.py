"""Writing checkpoints atomically, in our format or back in the layouts the original codebases load.

Our format is one safetensors file: every tensor (JiT weights in the official key names, SLA2
parameters under `blocks.N.attn.core.`) plus string metadata (format, version, model config, SLA2
config, provenance). `jit-pth` and `pixelgen-ckpt` carry the dense weights where the official code
expects them; converted layers' SLA2 tensors ride along under `sla2` / `sla2.` with the same metadata.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors.torch import save_file

from ..errors import InvalidParameter, Param, SLA2Error
from .reading import FORMAT_NAME, SLA2_PREFIX

FORMAT_VERSION = "1"
CORE_MARKER = ".attn.core."


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def same_file(a: Path, b: Path) -> bool:
    """Whether `a` and `b` are one file: `os.path.samefile` where both exist (symlinks, hard links), the
    resolved paths otherwise."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def check_spares_inputs(written: Iterable[Path], sources: Iterable[Path], parameter: str = "dst",
                        value=None) -> None:
    """Refuse when any path a command writes (or deletes) is one of its inputs, whatever `force` says.

    `value`: what the user named (an output, a folder) when the paths are derived from it.
    """
    sources = [Path(s) for s in sources if s is not None]
    for path in written:
        for src in sources:
            if not same_file(path, src):
                continue
            if value is None:
                raise InvalidParameter(parameter, path, "output {value} is the input file; choose another {name} "
                                       "path (inputs are never modified)")
            raise InvalidParameter(parameter, value, "{name} {value} would write {path}, which is the input {src}; "
                                   "choose another {name} (inputs are never modified)", path=path, src=src)


def check_output(dst: Path, force: bool, sources: tuple[Path, ...] = (), derived: Iterable[Path] = ()) -> None:
    """Refuse to overwrite without `force`, and never overwrite an input even with it.

    `derived`: the other files written beside `dst` (a resumable state, intermediate models); none of
    them may be an input either. Their overwriting is their writer's business.
    """
    dst = Path(dst)
    check_spares_inputs([dst], sources)
    check_spares_inputs([p for p in derived if Path(p) != Path(dst)], sources, value=dst)
    if dst.exists() and not force:
        raise InvalidParameter("dst", dst, "{value} already exists; pass {force} to overwrite it",
                               force=Param("force=True"))
    if dst.exists() and dst.is_dir():
        raise InvalidParameter("dst", dst, "{value} is a directory; {name} needs a file path")
    if not dst.parent.exists():
        raise InvalidParameter("dst", dst, "folder {parent} does not exist; create it first", parent=dst.parent)


LOCK_SUFFIX = ".lock"
_HELD: dict[str, list] = {}  # lock path -> [file descriptor, depth]: claims this process holds


def lock_path(dst: Path) -> Path:
    return Path(dst).with_name(Path(dst).name + LOCK_SUFFIX)


def _acquire(dst: Path, lock: Path) -> int:
    """flock `lock` (created if missing) without waiting; the kernel drops it when the holder dies."""
    for _ in range(20):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            raise InvalidParameter("dst", dst, "folder {parent} does not exist; create it first",
                                   parent=dst.parent) from None
        except OSError as exc:
            raise InvalidParameter("dst", dst, "cannot create {lock} to claim {value} ({error}); choose another "
                                   "{name}", lock=lock, error=exc.strerror or exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise InvalidParameter("dst", dst, "{value} is being written by another process (pid {pid}, which "
                                   "holds {lock}); wait for it to finish, or choose another {name}",
                                   pid=holder, lock=lock) from None
        try:  # the holder before us may have removed the file we opened: then claim the new one
            current = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            current = False
        if current:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)
    raise SLA2Error(f"could not claim {dst}: {lock} keeps changing; try again")


@contextmanager
def _claim_one(dst: Path, sources: Iterable[Path]) -> Iterator[None]:
    lock = lock_path(dst)
    key = os.path.abspath(lock)
    if key in _HELD:  # this process holds it already (a library call inside a command)
        _HELD[key][1] += 1
    else:
        check_spares_inputs([lock], sources, value=dst)
        _HELD[key] = [_acquire(dst, lock), 1]
    try:
        yield
    finally:
        _HELD[key][1] -= 1
        if not _HELD[key][1]:
            fd = _HELD.pop(key)[0]
            try:
                Path(lock).unlink(missing_ok=True)  # while still holding it; waiters then re-check
            finally:
                os.close(fd)


@contextmanager
def claim(paths: Iterable[Path], sources: Iterable[Path] = ()) -> Iterator[None]:
    """Hold every path in `paths` against other writers for the block: `DST.lock` beside each, flock'ed.

    Another process claiming one of them is refused at once, `force` or not. A killed holder's lock is
    released by the kernel (its file stays and is reused): nothing blocks forever. Re-entrant within
    one process. None of the lock files may be an input (`sources`).
    """
    sources = [Path(s) for s in sources]
    with ExitStack() as stack:
        for path in dict.fromkeys(Path(p) for p in paths):
            stack.enter_context(_claim_one(path, sources))
        yield


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
