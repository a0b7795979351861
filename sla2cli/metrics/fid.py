"""FID, KID and IS the standard way: torch-fidelity's features (`features`) and its statistics functions.

A reference (`--ref`) is one of
- a folder of images (png/jpg/jpeg, not recursive, as torch-fidelity globs it),
- a torch-fidelity registered input (`cifar10-train`, ...; torch-fidelity caches its features),
- an `.npz` of statistics with `mu` (D) and `sigma` (D×D) in the chosen feature space, as JiT's
  `fid_stats/*.npz` and ADM's reference batches hold for Inception (D = 2048). It has no features, so no KID.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..checkpoints.reading import open_regular
from ..errors import InvalidParameter, SLA2Error
from .features import FEATURE_SPACES, FeatureSpace, input_features

IMAGE_EXTENSIONS = "png,jpg,jpeg"


@dataclass
class Reference:
    """What `--ref` names; `statistics` is filled for .npz files at once, for the others when computed."""

    kind: str  # "folder", "registered" or "npz"
    source: str
    images: int | None = None
    statistics: dict | None = field(default=None, repr=False)
    features: torch.Tensor | None = field(default=None, repr=False)  # for KID; an .npz has none

    def describe(self) -> dict:
        return {"kind": self.kind, "source": self.source, "images": self.images,
                "statistics_file": self.source if self.kind == "npz" else None}


def folder_images(path: Path) -> list[str]:
    from torch_fidelity.utils import glob_samples_paths
    return glob_samples_paths(str(path), False, IMAGE_EXTENSIONS, verbose=False)


def load_statistics(path: Path, parameter: str = "path", space: FeatureSpace = FEATURE_SPACES["inception"]) -> dict:
    """`mu`, `sigma` from an .npz, checked (D and D×D for the space's D, finite), without unpickling anything.

    Errors name the file as the argument `parameter` of the caller (`ref` for `resolve_reference`).
    """
    try:
        with open_regular(Path(path)) as file, np.load(file, allow_pickle=False) as data:
            missing = [k for k in ("mu", "sigma") if k not in data.files]
            if missing:
                raise InvalidParameter(parameter, path, "{name} {value} has no {missing} (found: {found}); an .npz "
                                       "reference must hold {metric} statistics mu and sigma",
                                       missing=" and ".join(missing), found=", ".join(data.files) or "nothing",
                                       metric=space.metric)
            mu, sigma = np.asarray(data["mu"]), np.asarray(data["sigma"])
    except InvalidParameter:
        raise
    except Exception as exc:
        raise InvalidParameter(parameter, path, "{name} {value} is not a readable .npz of statistics "
                               "({detail})", detail=" ".join(str(exc).split())[:160]) from None
    if mu.shape != (space.dim,) or sigma.shape != (space.dim, space.dim):
        raise InvalidParameter(parameter, path, "{name} {value}: mu {mu} and sigma {sigma} must be ({dim},) and "
                               "({dim}, {dim}) ({layer} features of {extractor})", mu=mu.shape, sigma=sigma.shape,
                               dim=space.dim, layer=space.layer, extractor=space.extractor)
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise InvalidParameter(parameter, path, "{name} {value}: mu or sigma contains NaN or infinity")
    return {"mu": mu, "sigma": sigma}


def resolve_reference(ref: str, space: FeatureSpace = FEATURE_SPACES["inception"]) -> Reference:
    """Decide what `ref` is and check it (an .npz against `space`), before any sample is generated."""
    from torch_fidelity.registry import DATASETS_REGISTRY
    path = Path(ref)
    if path.is_dir():
        images = folder_images(path)
        special = next((f for f in images if not stat.S_ISREG(os.stat(f).st_mode)), None)
        if special is not None:  # torch-fidelity would open it and wait (a FIFO) or read forever (a device)
            raise InvalidParameter("ref", ref, "{name} {value} holds {special}, which is not a regular file; remove "
                                   "it from the folder", special=special)
        count = len(images)
        if count < 2:
            raise InvalidParameter("ref", ref, "{name} {value} holds {count} image(s) ({extensions}, not searched "
                                   "recursively); FID needs at least 2", count=count, extensions=IMAGE_EXTENSIONS)
        return Reference("folder", str(path), images=count)
    if path.suffix.lower() == ".npz":
        if not path.is_file():
            raise InvalidParameter("ref", ref, "{name} {value} does not exist")
        return Reference("npz", str(path), statistics=load_statistics(path, parameter="ref", space=space))
    if ref in DATASETS_REGISTRY:
        return Reference("registered", ref)
    raise InvalidParameter("ref", ref, "{name} {value!r} is not a folder of images, an .npz of statistics "
                           "(mu, sigma) or a torch-fidelity input ({inputs})", inputs=", ".join(DATASETS_REGISTRY))


def statistics(features: torch.Tensor) -> dict:
    """mu and sigma of N×D features, by torch-fidelity's `fid_features_to_statistics`."""
    from torch_fidelity.metric_fid import fid_features_to_statistics
    if features.shape[0] < 2:
        raise SLA2Error(f"FID needs at least 2 images, got {features.shape[0]}")
    return fid_features_to_statistics(features.cpu())


def frechet_distance(stats_1: dict, stats_2: dict) -> float:
    """torch-fidelity's `fid_statistics_to_metric`; statistics of different dtypes meet in float64."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    def aligned(key):
        a, b = np.asarray(stats_1[key]), np.asarray(stats_2[key])
        return (a, b) if a.dtype == b.dtype else (a.astype(np.float64), b.astype(np.float64))

    mu_1, mu_2 = aligned("mu")
    sigma_1, sigma_2 = aligned("sigma")
    return float(fid_statistics_to_metric({"mu": mu_1, "sigma": sigma_1}, {"mu": mu_2, "sigma": sigma_2},
                                          verbose=False)[KEY_METRIC_FID])


def inception_score(logits: torch.Tensor, splits: int = 10) -> dict:
    """torch-fidelity's IS on `logits_unbiased` (shuffled with its default seed); splits ≤ N."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
    splits = max(1, min(splits, logits.shape[0]))
    out = isc_features_to_metric(logits, splits=splits, shuffle=True, rng_seed=2020)
    return {"mean": out[KEY_METRIC_ISC_MEAN], "std": out[KEY_METRIC_ISC_STD], "splits": splits}


def kernel_distance(features_1: torch.Tensor, features_2: torch.Tensor, subsets: int = 100) -> dict:
    """torch-fidelity's KID (polynomial kernel), its subset size capped by the smaller set (1000 at most).
    When the cap is both sets' size every subset is the same pair of whole sets: one estimate, and no spread
    (`std` None) rather than a standard deviation of identical draws."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
    size = min(1000, len(features_1), len(features_2))
    whole = size == len(features_1) == len(features_2)
    subsets = 1 if whole else subsets
    out = kid_features_to_metric(features_1.double(), features_2.double(), kid_subsets=subsets,
                                 kid_subset_size=size, verbose=False)
    return {"mean": out[KEY_METRIC_KID_MEAN], "std": None if whole else out[KEY_METRIC_KID_STD],
            "subset_size": size, "subsets": subsets}


def reference_statistics(reference: Reference, space: FeatureSpace, extractor, device: torch.device,
                         batch_size: int = 64) -> dict:
    """The reference's statistics (computing features for folders and registered inputs); sets `images`."""
    if reference.statistics is None:
        reference.features = input_features(reference.source, extractor, device, batch_size,
                                            save_cpu_ram=reference.images is not None and reference.images < 512
                                            )[space.layer]
        reference.images = int(reference.features.shape[0])
        reference.statistics = statistics(reference.features)
    return reference.statistics
