"""Sample folders: `{index:06d}.png` written atomically, a manifest of how they were made, resume.

A folder holds the samples of one model under one set of sampling settings (`eval-fid.json`), so a
re-run skips the indices already there and never mixes samples made differently.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..checkpoints.writing import atomic_write
from ..errors import InvalidParameter, UsageError

MANIFEST = "eval-fid.json"
MANIFEST_FORMAT = "sla2cli-samples"
_SAMPLE = re.compile(r"^\d{6,}\.png$")
_PARTIAL = re.compile(r"^\.\d{6,}\.png\..*\.tmp$")
# Keys that must agree for two folders to be paired sample by sample.
PAIRING_KEYS = ("seed", "resolution", "num_classes", "noise_scale")


def sample_path(folder: Path, index: int) -> Path:
    return Path(folder) / f"{index:06d}.png"


def missing_indices(folder: Path, indices) -> list[int]:
    return [i for i in indices if not sample_path(folder, i).is_file()]


def write_sample(folder: Path, index: int, image: torch.Tensor) -> None:
    """Write one uint8 3×H×W image as PNG through a temporary file and a rename."""
    array = np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy())
    atomic_write(sample_path(folder, index), lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def read_sample(folder: Path, index: int) -> np.ndarray:
    with Image.open(sample_path(folder, index)) as img:
        return np.asarray(img.convert("RGB"))


def sample_files(folder: Path, count: int) -> list[str]:
    return [str(sample_path(folder, i)) for i in range(count)]


def sample_dataset(folder: Path, count: int):
    """The first `count` samples as a torch-fidelity Dataset of uint8 images."""
    from torch_fidelity.datasets import ImagesPathDataset
    return ImagesPathDataset(sample_files(folder, count))


def folder_writes(folder: Path, inputs) -> list[Path]:
    """What a run may write or delete that could be one of `inputs`: the folder, its manifest, and the
    inputs' names inside it where they are a sample's or a leftover's (for `check_spares_inputs`)."""
    folder = Path(folder)
    names = sorted({Path(p).name for p in inputs if _SAMPLE.match(Path(p).name) or _PARTIAL.match(Path(p).name)})
    return [folder, folder / MANIFEST, *(folder / name for name in names)]


def remove_partial(folder: Path) -> int:
    """Delete temporary files a killed run left behind; returns how many."""
    removed = 0
    if Path(folder).is_dir():
        for p in Path(folder).iterdir():
            if _PARTIAL.match(p.name):
                p.unlink(missing_ok=True)
                removed += 1
    return removed


def remove_samples(folder: Path) -> None:
    """Delete the samples, the manifest and leftovers of a folder we made; the folder too if then empty."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.is_file() and (_SAMPLE.match(p.name) or _PARTIAL.match(p.name) or p.name == MANIFEST):
            p.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UsageError(f"{path} is not a readable sample manifest; remove it or use another folder") from None
    return data if isinstance(data, dict) else None


def _differences(found: dict, wanted: dict, keys) -> list[str]:
    return [f"{k} {found.get(k)!r} there, {wanted.get(k)!r} now" for k in keys if found.get(k) != wanted.get(k)]


def prepare_folder(folder: Path, manifest: dict, *, create: bool) -> None:
    """Check that `folder` holds nothing but samples made exactly as `manifest` says; write the manifest.

    With create=False only checks (other ranks, or before anything may be written). Errors name it `out`.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InvalidParameter("out", folder, "{name} {value} is a file; it must be a folder")
    found = read_manifest(folder) if folder.is_dir() else None
    wanted = {"format": MANIFEST_FORMAT, **manifest}
    if found is not None:
        diff = _differences(found, wanted, sorted(set(found) | set(wanted)))
        if diff:
            raise InvalidParameter("out", folder, "{value} holds samples made differently ({diff}); use another "
                                   "{name} folder", diff="; ".join(diff[:3]))
    elif folder.is_dir() and any(_SAMPLE.match(p.name) for p in folder.iterdir()):
        raise InvalidParameter("out", folder, "{value} holds sample files but no {manifest} saying how they were "
                               "made; use another {name} folder", manifest=MANIFEST)
    if create and found is None:
        folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps(wanted, indent=2, sort_keys=True) + "\n"
        atomic_write(folder / MANIFEST, lambda tmp: Path(tmp).write_text(text))


def check_pairing(folder: Path, count: int, manifest: dict) -> list[str]:
    """A sample folder to compare with (`compare_to`): all `count` indices present and paired by the same seed.

    Returns warnings for settings that differ but do not break the pairing (steps, CFG, ...).
    """
    folder = Path(folder)
    missing = missing_indices(folder, range(count))
    if missing:
        raise InvalidParameter("compare_to", folder, "{name} {value} lacks {missing} of the {count} samples "
                               "(first missing: {first})", missing=len(missing), count=count,
                               first=sample_path(folder, missing[0]).name)
    found = read_manifest(folder)
    if found is None:
        return [f"{folder} has no {MANIFEST}: cannot check it was sampled from the same seed"]
    broken = _differences(found, manifest, PAIRING_KEYS)
    if broken:
        raise InvalidParameter("compare_to", folder, "{name} {value} is not paired with this run ({broken})",
                               broken="; ".join(broken))
    other = sorted((set(manifest) | set(found)) - set(PAIRING_KEYS) - {"model", "format"})
    return [f"{folder} was sampled with different settings: {d}"
            for d in _differences(found, manifest, other)]
