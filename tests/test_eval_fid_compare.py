"""`--compare-to`: a converted model against the dense one, pair by pair; the default sample folder."""

from __future__ import annotations

import math
import shutil

import pytest
from conftest import nonzero_model, one_json
from test_eval_fid_cli import SMALL, files  # noqa: F401
from test_eval_fid_metrics import inception_weights  # noqa: F401

from sla2cli import SLA2Config, apply_sla2, save_model


def test_compare_converted_with_dense_then_with_a_folder(cli, files, inception_weights, tmp_path, monkeypatch):
    converted = nonzero_model(SMALL)
    apply_sla2(converted, "all", SLA2Config(topk=0.5, block_q=16, block_k=16))
    sla2_file = save_model(converted, tmp_path / "small-sla2.safetensors")
    monkeypatch.chdir(tmp_path)
    common = ["-n", 4, "--steps", 3, "--cfg", 2.0, "--batch-size", 2, "--dtype", "fp32", "--device", "cpu",
              "--inception-weights", inception_weights, "--ref", files["npz"], "--json"]

    # No --out: samples go to sla2-samples/<model>-<settings>/, kept on request; the other model's
    # samples (same seed, indices, settings) go beside them.
    code, stdout, stderr = cli("eval-fid", files["model"], *common, "--compare-to", sla2_file, "--keep-samples")
    assert code == 0, stderr
    r = one_json(stdout)
    folder = tmp_path / r["out"]
    assert r["out"].startswith("sla2-samples/small-jit-3steps-cfg2-seed0-fp32") and r["kept_samples"]
    c = r["compare"]
    assert c["kind"] == "model" and c["pairs"] == 4 and c["converted_layers"] == [0, 1]
    assert c["sla2_backend"] == "torch" and r["sla2_backend"] is None
    assert c["identical"] < 4 and 0 < c["mae_mean"] <= c["mae_worst"] and c["psnr_worst"] <= c["psnr_mean"]
    assert c["fid_between"] > 0 and c["fid_other"] > 0 and math.isfinite(r["fid"])
    other_folder = folder / "compare-small-sla2"
    assert sorted(p.name for p in other_folder.glob("*.png")) == [f"{i:06d}.png" for i in range(4)]

    # A sample folder from the same seed is compared as it is. Run again without --keep-samples: every
    # sample is reused, nothing generated, and the default folder is removed afterwards.
    shutil.copytree(other_folder, tmp_path / "other")
    shutil.rmtree(other_folder)
    code, stdout, stderr = cli("eval-fid", files["model"], *common, "--compare-to", tmp_path / "other")
    assert code == 0, stderr
    r2 = one_json(stdout)
    assert r2["generation"]["generated"] == 0 and r2["images_per_second"] is None and not r2["kept_samples"]
    assert r2["compare"]["kind"] == "folder"
    for key in ("fid_between", "fid_other", "mae_mean", "psnr_mean"):
        assert r2["compare"][key] == pytest.approx(c[key], rel=1e-6), key
    assert r2["fid"] == pytest.approx(r["fid"], rel=1e-6)
    assert not (tmp_path / "sla2-samples").exists()


def test_compare_to_must_be_paired(cli, files, inception_weights, tmp_path):
    import torch

    from sla2cli.metrics.samples import prepare_folder, write_sample
    folder = tmp_path / "seed7"
    prepare_folder(folder, {"seed": 7, "resolution": 16, "num_classes": 5, "noise_scale": 1.0}, create=True)
    for i in range(3):
        write_sample(folder, i, torch.zeros(3, 16, 16, dtype=torch.uint8))
    args = ["eval-fid", files["model"], "-n", 3, "--cfg", 2.0, "--dtype", "fp32", "--device", "cpu",
            "--inception-weights", inception_weights, "--ref", files["npz"], "--out", tmp_path / "out"]
    code, _, stderr = cli(*args, "--compare-to", folder)
    assert code == 2 and "is not paired with this run" in stderr and "seed 7 there, 0 now" in stderr
    code, _, stderr = cli(*args[:3], 4, *args[4:], "--compare-to", folder)
    assert code == 2 and "lacks 1 of the 4 samples" in stderr and "000003.png" in stderr
    code, _, stderr = cli(*args, "--compare-to", tmp_path / "missing")
    assert code == 2 and "does not exist" in stderr
    assert not (tmp_path / "out").exists()
