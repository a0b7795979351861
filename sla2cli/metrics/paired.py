"""Paired comparison of two sample sets made from the same (seed, index) noise and labels.

Per image, on pixel values scaled to [0, 1]: mean absolute error and PSNR = 10·log10(1 / MSE).
Identical images (MSE 0, PSNR infinite) are counted apart and left out of the PSNR summary.
"""

from __future__ import annotations

import math
from pathlib import Path

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


def paired_metrics(folder_a: Path, folder_b: Path, count: int) -> dict:
    """MAE and PSNR over indices 0..count-1: mean and worst (with the worst image's index)."""
    mae, mse = [], []
    for i in range(count):
        e = image_errors(read_sample(folder_a, i), read_sample(folder_b, i))
        mae.append(e[0])
        mse.append(e[1])
    mae_arr = np.array(mae)
    psnrs = np.array([psnr(m) for m in mse])
    finite = np.isfinite(psnrs)
    worst_mae = int(mae_arr.argmax())
    out = {"pairs": count, "identical": int((~finite).sum()),
           "mae_mean": float(mae_arr.mean()), "mae_worst": float(mae_arr[worst_mae]), "mae_worst_index": worst_mae,
           "psnr_mean": None, "psnr_worst": None, "psnr_worst_index": None}
    if finite.any():
        worst = int(np.where(finite, psnrs, np.inf).argmin())
        out.update(psnr_mean=float(psnrs[finite].mean()), psnr_worst=float(psnrs[worst]), psnr_worst_index=worst)
    return out
