"""`sla2 quality` and its library: v-loss ratio, paired PSNR/SSIM/MAE and per-layer error against dense."""

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import TINY, nonzero_model, one_json
from PIL import Image

from sla2cli import apply_sla2, remove_sla2, save_model
from sla2cli.diffusion import noised, v_loss
from sla2cli.errors import InvalidParameter
from sla2cli.metrics.paired import image_errors, psnr, ssim
from sla2cli.metrics.quality import full_finetune_in, quality_report
from sla2cli.sampling import paired_inputs, sample, to_uint8
from sla2cli.seeding import PROBE_NOISE
from sla2cli.sla2 import SLA2Config
from sla2cli.sla2.stats import measure_layers, own_noised_batch

C1, C2 = 0.01 ** 2, 0.03 ** 2
FAST = dict(eval_samples=2, samples=2, steps=2, cfg=2.0)


def _dense(config=TINY) -> torch.nn.Module:
    """A tiny random JiT whose samples stay inside [-1, 1] (the output layer scaled down), so pixels differ."""
    model = nonzero_model(config)
    with torch.no_grad():
        model.final_layer.linear.weight.mul_(0.02)
        model.final_layer.linear.bias.mul_(0.02)
    return model


def _converted() -> torch.nn.Module:
    model = _dense()
    apply_sla2(model, [2, 3], SLA2Config(topk=0.25))
    return model


def _one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- SSIM ---------------------------------------------------------------------------------------------

def _hand_ssim_one_window(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of 11×11×C images (exactly one window), written out with explicit gaussian weights."""
    r = np.arange(11) - 5.0
    w = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5 ** 2))
    w /= w.sum()
    values = []
    for c in range(a.shape[2]):
        x, y = a[..., c] / 255.0, b[..., c] / 255.0
        mx, my = (w * x).sum(), (w * y).sum()
        vx, vy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum()
        cov = (w * (x - mx) * (y - my)).sum()
        values.append((2 * mx * my + C1) * (2 * cov + C2) / ((mx ** 2 + my ** 2 + C1) * (vx + vy + C2)))
    return float(np.mean(values))


def test_ssim_against_hand_computations():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
    assert ssim(a, a) == 1.0
    # constant images: only the luminance term is left, (2·μx·μy + C1) / (μx² + μy² + C1)
    x, y = np.full((16, 16, 3), 0.4), np.full((16, 16, 3), 0.5)
    assert ssim(x, y) == pytest.approx((2 * 0.4 * 0.5 + C1) / (0.4 ** 2 + 0.5 ** 2 + C1), rel=1e-12)
    # a constant offset keeps variance and covariance equal: again the luminance term alone, per window
    p = rng.integers(0, 200, (11, 11, 3), dtype=np.uint8)
    q = p + np.uint8(30)
    r = np.arange(11) - 5.0
    w = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / 4.5)
    w /= w.sum()
    mu = [(w * p[..., c] / 255.0).sum() for c in range(3)]
    closed = np.mean([(2 * m * (m + 30 / 255) + C1) / (m ** 2 + (m + 30 / 255) ** 2 + C1) for m in mu])
    assert ssim(p, q) == pytest.approx(closed, rel=1e-12)
    # any two 11x11 patches: the formula written out by hand
    b = rng.integers(0, 256, (11, 11, 3), dtype=np.uint8)
    assert ssim(p, b) == pytest.approx(_hand_ssim_one_window(p, b), rel=1e-10)
    assert ssim(p, b) == pytest.approx(ssim(b, p), rel=1e-12) and ssim(p, b) < 0.5
    # larger images: the mean over every valid window (here 2x1 windows), then over channels
    big_a, big_b = rng.integers(0, 256, (12, 11, 3), dtype=np.uint8), rng.integers(0, 256, (12, 11, 3), dtype=np.uint8)
    windows = [_hand_ssim_one_window(big_a[i:i + 11], big_b[i:i + 11]) for i in range(2)]
    assert ssim(big_a, big_b) == pytest.approx(np.mean(windows), rel=1e-10)
    with pytest.raises(ValueError, match="differ in shape"):
        ssim(a, a[:-1])
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(a[:10], a[:10])


# --- the library ----------------------------------------------------------------------------------------

def test_quality_numbers_match_a_hand_computation():
    model = _converted()
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 32, 32, generator=gen) * 2 - 1
    labels = torch.tensor([0, 3, 4])
    report = quality_report(copy.deepcopy(model), images=images, labels=labels, **FAST)

    dense = copy.deepcopy(model)
    remove_sla2(dense)
    z, t, _ = noised(images, seed=0, stream=PROBE_NOISE)
    with torch.no_grad():
        mine, theirs = v_loss(model(z, t, labels), images, z, t), v_loss(dense(z, t, labels), images, z, t)
    v = report["v_loss"]
    assert v["model"] == pytest.approx(mine.mean().item(), rel=1e-6)
    assert v["dense"] == pytest.approx(theirs.mean().item(), rel=1e-6)
    assert v["ratio"] == pytest.approx(mine.mean().item() / theirs.mean().item(), rel=1e-6) and v["ratio"] != 1.0
    assert report["settings"]["eval_samples"] == 3 and report["data"]["used"] == 3
    expected = {m["layer"]: m for m in measure_layers(model, z, t, labels)}
    for m in report["per_layer"]:
        assert m["relative_squared_error"] == pytest.approx(expected[m["layer"]]["relative_squared_error"], rel=1e-5)
        assert m["kept_fraction"] == pytest.approx(1 / 5)
    # paired samples: the same (seed, index) noise and labels for both models
    noise, lab = paired_inputs(0, range(2), (3, 32, 32), TINY.num_classes)
    a = to_uint8(sample(model, noise, lab, steps=2, cfg=2.0)).permute(0, 2, 3, 1).numpy()
    b = to_uint8(sample(dense, noise, lab, steps=2, cfg=2.0)).permute(0, 2, 3, 1).numpy()
    psnrs = [psnr(image_errors(x, y)[1]) for x, y in zip(a, b)]
    ssims = [ssim(x, y) for x, y in zip(a, b)]
    p = report["paired"]
    assert p["pairs"] == 2 and p["identical"] == 0 and all(math.isfinite(x) for x in psnrs)
    assert p["psnr_mean"] == pytest.approx(np.mean(psnrs)) and p["psnr_worst"] == pytest.approx(min(psnrs))
    assert p["psnr_worst_index"] == int(np.argmin(psnrs))
    assert p["ssim_mean"] == pytest.approx(np.mean(ssims)) and p["ssim_worst_index"] == int(np.argmin(ssims))
    assert 0 < p["ssim_mean"] < 1 and p["mae_mean"] > 0
    assert report["dense"]["source"] == "stripped" and report["warnings"] == []


def test_without_data_the_dense_models_own_samples_are_noised_as_stats_measure_does():
    model = _converted()
    report = quality_report(copy.deepcopy(model), **FAST)
    assert report["data"]["source"] == "dense samples"
    z, t, y = own_noised_batch(model, 2, seed=0)  # what `sla2 stats --measure --batch-size 2` measures on
    expected = {m["layer"]: m for m in measure_layers(model, z, t, y)}
    assert report["v_loss"]["t"] == pytest.approx(t.tolist())
    for m in report["per_layer"]:
        assert m["relative_squared_error"] == pytest.approx(expected[m["layer"]]["relative_squared_error"], rel=1e-5)


def test_a_model_against_itself_is_identical():
    model = _converted()
    report = quality_report(model, copy.deepcopy(model), **FAST)
    v, p = report["v_loss"], report["paired"]
    assert v["ratio"] == 1.0 and v["output_relative_error"] == 0.0
    assert p["identical"] == 2 and p["psnr_mean"] is None and p["ssim_mean"] == 1.0 and p["mae_mean"] == 0.0
    assert all(r["psnr"] is None for r in p["per_image"])
    assert report["dense"]["source"] == "given"
    dense = quality_report(_dense(), **FAST)  # no SLA2 layer: reported, with a warning
    assert dense["v_loss"]["ratio"] == 1.0 and dense["paired"]["identical"] == 2 and dense["per_layer"] == []
    assert any("no layer is converted" in w for w in dense["warnings"])


@pytest.mark.parametrize("kwargs,parameter", [
    (dict(samples=-1), "samples"), (dict(steps=0), "steps"), (dict(eval_samples=0), "eval_samples"),
    (dict(cfg=float("nan")), "cfg"), (dict(cfg=float("inf")), "cfg"), (dict(seed=-1), "seed"),
])
def test_bad_inputs_are_refused_before_any_work(kwargs, parameter):
    with pytest.raises(InvalidParameter) as info:
        quality_report(_dense(), **{**FAST, **kwargs})
    assert info.value.parameter == parameter


def test_other_architectures_are_refused_and_full_finetunes_warned():
    other = nonzero_model(dataclasses.replace(TINY, hidden_size=32))
    with pytest.raises(InvalidParameter, match="hidden_size 64 vs 32") as info:
        quality_report(_converted(), other, **FAST)
    assert info.value.parameter == "dense"
    full = {"finetune": {"stage": "router", "previous": {"stage": "full"}}}
    assert full_finetune_in(full) and not full_finetune_in({"finetune": {"stage": "router"}})
    assert not full_finetune_in(None)


# --- the command ---------------------------------------------------------------------------------------

def test_cli_json_one_document_and_the_explicit_dense_source(cli, tmp_path):
    dense_file = save_model(_dense(), tmp_path / "dense.safetensors")
    sla2_file = save_model(_converted(), tmp_path / "sla2.safetensors")
    args = ("-n", "2", "--eval-samples", "2", "--steps", "2", "--device", "cpu", "--json")
    code, out, err = cli("quality", sla2_file, *args)
    assert code == 0, err
    doc = one_json(out)
    assert {"model", "dense", "data", "settings", "v_loss", "paired", "per_layer", "converted_layers",
            "warnings"} <= set(doc)
    assert doc["converted_layers"] == [2, 3] and [m["layer"] for m in doc["per_layer"]] == [2, 3]
    assert {"ratio", "model", "dense"} <= set(doc["v_loss"])
    assert {"psnr_mean", "ssim_mean", "mae_mean"} <= set(doc["paired"])
    assert doc["dense"]["source"] == "stripped" and doc["dense"]["path"] is None
    # the converted model's dense source, named: the same numbers (only the router and α differ)
    code, out, err = cli("quality", sla2_file, "--dense", dense_file, *args)
    assert code == 0, err
    named = one_json(out)
    assert named["dense"]["source"] == "given" and named["dense"]["path"] == str(dense_file)
    assert named["v_loss"] == doc["v_loss"] and named["paired"] == doc["paired"]
    code, out, err = cli("quality", dense_file, *args)  # a dense model: ratio 1, and a warning on stderr
    assert code == 0 and one_json(out)["v_loss"]["ratio"] == 1.0 and "no layer is converted" in err


def test_cli_tables_and_image_folders(cli, tmp_path):
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for c in ("0", "3"):
        (data / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(data / c / f"{i}.png")
    sla2_file = save_model(_converted(), tmp_path / "sla2.safetensors")
    code, out, err = cli("quality", sla2_file, "--data", data, "-n", "1", "--eval-samples", "3", "--steps", "2",
                         "--device", "cpu")
    assert code == 0, err
    assert "v-loss ratio" in out and "SSIM" in out and "SLA2 layers against dense attention" in out
    assert f"3 images of {data}" in out and "--dense" in out
    code, out, err = cli("quality", sla2_file, "--data", data, "--eval-samples", "9", "-n", "1", "--steps", "2",
                         "--device", "cpu", "--json")
    assert code == 0, err
    assert one_json(out)["data"]["source"] == "folder" and one_json(out)["data"]["used"] == 4


@pytest.mark.parametrize("args,message", [
    (("-n", "-2"), "error: -n/--samples must be >= 0 (0: no paired samples), got -2"),
    (("--steps", "0"), "error: --steps must be >= 1, got 0"),
    (("--eval-samples", "0"), "error: --eval-samples must be >= 1, got 0"),
    (("--cfg", "-1"), "error: --cfg must be a finite number >= 0 (1.0 turns guidance off), got -1.0"),
])
def test_cli_bad_inputs_exit_2_with_one_line(cli, tmp_path, args, message):
    sla2_file = save_model(_converted(), tmp_path / "sla2.safetensors")
    code, out, err = cli("quality", sla2_file, *args, "--device", "cpu")
    assert code == 2 and out == "" and _one_line(err) == message


def test_cli_refuses_another_architecture(cli, tmp_path):
    sla2_file = save_model(_converted(), tmp_path / "sla2.safetensors")
    other = save_model(nonzero_model(dataclasses.replace(TINY, depth=3)), tmp_path / "other.safetensors")
    code, out, err = cli("quality", sla2_file, "--dense", other, "--device", "cpu")
    assert code == 2 and out == ""
    assert _one_line(err).startswith("error: --dense is another architecture than the model (depth 4 vs 3)")


def test_no_paired_samples_gives_the_v_loss_and_layer_errors_alone(cli, tmp_path):
    """-n 0: the v-loss and per-layer error without drawing a sample (the numbers are those of a run with pairs)."""
    sla2_file = save_model(_converted(), tmp_path / "sla2.safetensors")
    args = ("--eval-samples", "2", "--steps", "2", "--device", "cpu")
    code, out, err = cli("quality", sla2_file, "-n", "0", *args, "--json")
    assert code == 0, err
    doc = one_json(out)
    assert doc["paired"] is None and doc["settings"]["samples"] == 0 and len(doc["per_layer"]) == 2
    assert doc["v_loss"] == one_json(cli("quality", sla2_file, "-n", "1", *args, "--json")[1])["v_loss"]
    code, out, err = cli("quality", sla2_file, "-n", "0", *args)  # the table, without the paired rows
    assert code == 0 and "v-loss ratio" in out and "PSNR" not in out and "no paired samples" in out
    code, _, err = cli("quality", sla2_file, "-n", "-1", *args)
    assert code == 2 and "must be >= 0" in err
