"""Writing checkpoints atomically, in our format or back in the layouts the original codebases load.

Our format is one safetensors file: every tensor (JiT weights in the official key names, SLA2
parameters under `blocks.N.attn.core.`) plus string metadata (format, version, model config, SLA2
config, provenance). `jit-pth` and `pixelgen-ckpt` carry the dense weights where the official code
expects them; converted layers' SLA2 tensors ride along under `sla2` / `sla2.` with the same metadata.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import json
import os
import re
import tempfile
from contextlib import ExitStack, contextmanager, suppress
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
    if dst.is_dir():
        raise InvalidParameter("dst", dst, "{value} is a directory; {name} needs a file path")
    if dst.exists() and not dst.is_file():  # a FIFO, a device: --force would replace it
        raise InvalidParameter("dst", dst, "{value} is not a regular file; {name} needs a file path")
    if dst.exists() and not force:
        raise InvalidParameter("dst", dst, "{value} already exists; pass {force} to overwrite it",
                               force=Param("force=True"))
    if dst.parent.exists() and not dst.parent.is_dir():
        raise InvalidParameter("dst", dst, "{parent} is a file, not a folder; choose another {name}",
                               parent=dst.parent)
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
        except NotADirectoryError:
            raise InvalidParameter("dst", dst, "{parent} is a file, not a folder; choose another {name}",
                                   parent=dst.parent) from None
        except OSError as exc:
            raise write_failed(dst, exc) from None
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
            with suppress(OSError):  # the pid only names the holder; a full disk fails the write itself, clearly
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
        remove_stale_temporaries(dst)
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


def write_failed(dst: Path, exc: BaseException) -> SLA2Error:
    """The error for writing `dst` failing with `exc` for a reason of the machine's, not the command's (exit 1):
    a folder one may not write, a full disk."""
    full = not isinstance(exc, OSError) or exc.errno in (errno.ENOSPC, errno.EDQUOT)
    reason = "no space left on device" if full else exc.strerror or str(exc)
    return SLA2Error(f"cannot write {dst} ({reason}); {'free some space or ' if full else ''}write somewhere else")


def _disk_full(folder: Path) -> bool:
    """Whether `folder`'s file system has (next to) no space left; serialisers report it in their own words."""
    try:
        fs = os.statvfs(folder)
    except OSError:
        return False
    return fs.f_bavail * fs.f_frsize < (1 << 20)


def _temporary_pid(dst: Path, name: str) -> int | None:
    """The pid in the name of a temporary file of `dst` (`.DST.PID.XXXXXXXX.tmp`), None for other files."""
    prefix = f".{dst.name}."
    match = re.fullmatch(r"(\d+)\.\w+\.tmp", name[len(prefix):]) if name.startswith(prefix) else None
    return int(match.group(1)) if match else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it does, and is another user's
        pass
    return True


def remove_stale_temporaries(dst: Path) -> None:
    """Remove the temporary files that writers of `dst` killed mid-write left beside it (their pid is gone)."""
    dst = Path(dst)
    with suppress(OSError):
        for name in os.listdir(dst.parent):
            pid = _temporary_pid(dst, name)
            if pid and pid != os.getpid() and not _alive(pid):
                (dst.parent / name).unlink(missing_ok=True)


def _umask() -> int:
    """The process's umask, which can only be read by setting it."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(dst: Path, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half a file.

    The temporary file, `.DST.PID.XXXXXXXX.tmp`, gets the mode a plain `open` would give (mkstemp's is 0600)
    and a name that lets a later claim of `dst` remove it if this process is killed. A folder one may not
    write or a full disk is a `write_failed` error, with nothing left behind.
    """
    dst = Path(dst)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.{os.getpid()}.", suffix=".tmp", dir=dst.parent)
    except OSError as exc:
        raise write_failed(dst, exc) from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # after: some writers (safetensors) make the file anew
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException as exc:
        full = isinstance(exc, Exception) and _disk_full(dst.parent)  # before the temporary file frees space
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) or full:
            raise write_failed(dst, exc) from None
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
