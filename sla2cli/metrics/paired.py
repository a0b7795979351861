"""Paired comparison of two sample sets made from the same (seed, index) noise and labels.

Per image, on pixel values scaled to [0, 1]: mean absolute error, PSNR = 10·log10(1 / MSE) and SSIM.
Identical images (MSE 0, PSNR infinite) are counted apart and left out of the PSNR summary.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import numpy as np

from .samples import read_sample


def image_errors(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(MAE, MSE) of two uint8 H×W×3 images, on the [0, 1] scale, in float64."""
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    diff = (a.astype(np.float64) - b.astype(np.float64)) / 255.0
    return float(np.abs(diff).mean()), float((diff * diff).mean())


def psnr(mse: float) -> float:
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """The normalised 1-D gaussian of SSIM's window (the 2-D window is its outer product with itself)."""
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-r * r / (2 * sigma * sigma))
    return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of H×W×C by the window g⊗g (MATLAB's filter2(w, x, 'valid'))."""
    n = len(g)
    h, w = x.shape[0] - n + 1, x.shape[1] - n + 1
    rows = sum(g[k] * x[k:k + h] for k in range(n))
    return sum(g[k] * rows[:, k:k + w] for k in range(n))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM (Wang et al. 2004) of two H×W×C (or H×W) images, mean over the valid windows and the channels.

    uint8 images are scaled to [0, 1]; float images are taken as already in [0, 1] (dynamic range L = 1).
    Gaussian window 11×11 with σ 1.5, K1 0.01, K2 0.03, windows inside the image only (as the authors'
    `ssim_index.m`), each channel on its own. Identical images give 1.
    """
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if min(a.shape[:2]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {a.shape[:2]}")
    x, y = (im.astype(np.float64) / 255.0 if im.dtype == np.uint8 else im.astype(np.float64) for im in (a, b))
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
    g = gaussian_window()
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    mu_x, mu_y = _filter_valid(x, g), _filter_valid(y, g)
    var_x = _filter_valid(x * x, g) - mu_x * mu_x
    var_y = _filter_valid(y * y, g) - mu_y * mu_y
    cov = _filter_valid(x * y, g) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean(axis=(0, 1)).mean())


def _summary(values: np.ndarray, worst_is_max: bool) -> tuple[float | None, float | None, int | None]:
    """(mean, worst, worst index) over the finite values; None where there are none."""
    finite = np.isfinite(values)
    if not finite.any():
        return None, None, None
    masked = np.where(finite, values, -np.inf if worst_is_max else np.inf)
    worst = int(masked.argmax() if worst_is_max else masked.argmin())
    return float(values[finite].mean()), float(values[worst]), worst


def compare_pairs(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict:
    """MAE, PSNR and SSIM of each (a, b) pair of uint8 H×W×3 images: mean and worst (with its index) of each,
    and every pair's values (`per_image`).

    Pairs are read one at a time (sample folders may hold 50 000 images). Identical pairs (PSNR infinite)
    are counted apart and left out of the PSNR summary; SSIM is None for images under its 11×11 window.
    """
    mae, mse, sim = [], [], []
    for a, b in pairs:
        e = image_errors(a, b)
        mae.append(e[0])
        mse.append(e[1])
        sim.append(ssim(a, b) if min(a.shape[:2]) >= SSIM_WINDOW else math.nan)
    psnrs = np.array([psnr(m) for m in mse])
    out = {"pairs": len(mae), "identical": int(np.isinf(psnrs).sum())}
    for name, values, worst_is_max in (("psnr", psnrs, False), ("ssim", np.array(sim), False),
                                       ("mae", np.array(mae), True)):
        mean, worst, index = _summary(values, worst_is_max)
        out.update({f"{name}_mean": mean, f"{name}_worst": worst, f"{name}_worst_index": index})
    out["per_image"] = [{"index": i, "psnr": None if math.isinf(p) else float(p),
                         "ssim": None if math.isnan(s) else s, "mae": m}
                        for i, (p, s, m) in enumerate(zip(psnrs, sim, mae))]
    return out


def paired_metrics(folder_a: Path, folder_b: Path, count: int) -> dict:
    """`compare_pairs` over the samples 0..count-1 of two folders, without the per-image list."""
    out = compare_pairs((read_sample(folder_a, i), read_sample(folder_b, i)) for i in range(count))
    del out["per_image"]
    return out
