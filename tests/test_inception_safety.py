"""`--inception-weights` is unpickled once, safely: a file swapped in after the check never runs code."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import nonzero_model
from test_eval_fid_cli import SMALL
from test_eval_fid_metrics import inception_weights  # noqa: F401

from sla2cli import save_model
from sla2cli.errors import SLA2Error
from sla2cli.metrics import resolve_weights

# the module: the package's `evaluate` is the function
evaluate_module = importlib.import_module("sla2cli.metrics.evaluate")


class _Payload:
    """Unpickling this creates `marker` (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _malicious(path: Path, marker: Path) -> Path:
    torch.save({"fc.weight": _Payload(marker), "Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, path)
    return path


def test_weights_whose_pickle_runs_code_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(SLA2Error, match="cannot be read as a plain state_dict"):
        resolve_weights(_malicious(tmp_path / "evil.pth", marker))
    assert not marker.exists()


def test_weights_swapped_after_the_check_are_never_unpickled(cli, inception_weights, tmp_path, monkeypatch):
    weights = tmp_path / "inception.pth"
    weights.write_bytes(Path(inception_weights).read_bytes())
    model = save_model(nonzero_model(SMALL), tmp_path / "small.safetensors")
    feats = np.random.default_rng(0).random((6, 2048))
    np.savez(tmp_path / "ref.npz", mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    marker = tmp_path / "pwned"
    loads = []
    real_load, real_create = torch.load, evaluate_module.create_extractor

    def recording_load(f, *args, **kwargs):
        name = f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", None)  # a path or an open file
        if isinstance(name, (str, os.PathLike)) and Path(name).resolve() == weights.resolve():
            loads.append(kwargs.get("weights_only"))
        return real_load(f, *args, **kwargs)

    def swap_then_create(*args, **kwargs):  # the attacker wins the race between the check and the use
        _malicious(weights, marker)
        return real_create(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    monkeypatch.setattr(evaluate_module, "create_extractor", swap_then_create)
    code, _, err = cli("eval-fid", model, "-n", 2, "--steps", 2, "--cfg", 1.0, "--batch-size", 2, "--dtype", "fp32",
                       "--device", "cpu", "--inception-weights", weights, "--ref", tmp_path / "ref.npz",
                       "--out", tmp_path / "s")
    assert not marker.exists()
    assert code == 0, err
    assert loads == [True]  # the user's file is opened once, with weights_only=True
