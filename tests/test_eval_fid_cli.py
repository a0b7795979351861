"""`sla2 eval-fid` end to end on a tiny model with a random-weight InceptionV3: FID, resume, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import nonzero_model, one_json
from test_eval_fid_metrics import folder_features, inception_weights, scipy_frechet, write_images  # noqa: F401

from sla2cli import save_model
from sla2cli.metrics import EvalRequest, evaluate
from sla2cli.metrics import generate as generate_module
from sla2cli.metrics import inception as inception_module
from sla2cli.models.jit import JiTConfig

SMALL = JiTConfig(input_size=16, patch_size=4, hidden_size=32, depth=2, num_heads=2, ffn_hidden_dim=48,
                  num_classes=5, bottleneck_dim=8, in_context_len=4, in_context_start=1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalfid")
    model = save_model(nonzero_model(SMALL), root / "small.safetensors")
    ref_dir = write_images(root / "ref", 4, size=16, seed=5)
    rng = np.random.default_rng(0)
    feats = rng.random((6, 2048)) * 0.5
    np.savez(root / "ref_stats.npz", mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    return {"root": root, "model": model, "ref_dir": ref_dir, "npz": root / "ref_stats.npz"}


def base_args(files, weights, out, n=4):
    return ["eval-fid", files["model"], "-n", n, "--steps", 3, "--cfg", 2.0, "--batch-size", 2, "--dtype", "fp32",
            "--device", "cpu", "--inception-weights", weights, "--out", out]


def test_fid_isc_and_report_against_a_folder(cli, files, inception_weights, tmp_path):
    out = tmp_path / "samples"
    code, stdout, stderr = cli(*base_args(files, inception_weights, out), "--ref", files["ref_dir"], "--isc", "--json")
    assert code == 0, stderr
    r = one_json(stdout)
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:06d}.png" for i in range(4)]
    manifest = json.loads((out / "eval-fid.json").read_text())
    assert manifest["seed"] == 0 and manifest["cfg"] == 2.0 and manifest["model"]["file"] == "small.safetensors"
    assert r["samples"] == 4 and r["steps"] == 3 and r["cfg"] == 2.0 and r["cfg_interval"] == [0.1, 1.0]
    assert r["sampler"] == "jit" and r["reference"] == {"kind": "folder", "source": str(files["ref_dir"]),
                                                        "images": 4, "statistics_file": None}
    assert r["torch_fidelity"] == "0.4.0" and r["kept_samples"] is True and r["compare"] is None
    assert r["generation"]["written"] == 4 and r["images_per_second"] > 0 and r["wall_s"] > 0
    assert r["isc"]["splits"] == 4 and r["isc"]["mean"] >= 1.0
    # FID of our pipeline = a direct Fréchet distance on features taken outside it.
    expected = scipy_frechet(folder_features(inception_weights, out.glob("*.png")),
                             folder_features(inception_weights, files["ref_dir"].glob("*.png")))
    assert r["fid"] == pytest.approx(expected, rel=1e-5) and expected > 1e-3


def test_resume_after_a_killed_run_gives_identical_files(cli, files, inception_weights, tmp_path, monkeypatch):
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    code, stdout, stderr = cli(*base_args(files, inception_weights, clean, n=5), "--ref", files["npz"])
    assert code == 0, stderr
    assert "FID" in stdout and "statistics file" in stdout  # the human report

    real_write, calls = generate_module.write_sample, []

    def write_then_die(folder, index, image):
        calls.append(index)
        if len(calls) == 3:  # killed while writing the third file: a partial temporary file stays behind
            (Path(folder) / f".{index:06d}.png.x1y2.tmp").write_bytes(b"\x89PNG partial")
            raise KeyboardInterrupt
        real_write(folder, index, image)

    monkeypatch.setattr(generate_module, "write_sample", write_then_die)
    request = EvalRequest(model=files["model"], num_samples=5, ref=str(files["npz"]), out=resumed, steps=3, cfg=2.0,
                          batch_size=2, dtype=torch.float32, inception_weights=inception_weights)
    with pytest.raises(KeyboardInterrupt):
        evaluate(request)
    assert sorted(p.name for p in resumed.glob("*.png")) == ["000000.png", "000001.png"]
    monkeypatch.setattr(generate_module, "write_sample", real_write)

    code, stdout, stderr = cli(*base_args(files, inception_weights, resumed, n=5), "--ref", files["npz"], "--json")
    assert code == 0, stderr
    gen = one_json(stdout)["generation"]
    assert (gen["reused"], gen["written"], gen["generated"]) == (2, 3, 3)
    assert sorted(p.name for p in resumed.iterdir()) == sorted(p.name for p in clean.iterdir())  # no leftovers
    for i in range(5):
        assert (resumed / f"{i:06d}.png").read_bytes() == (clean / f"{i:06d}.png").read_bytes(), i

    # The folder remembers how its samples were made: other settings are refused, nothing is touched.
    before = {p.name: p.stat().st_mtime_ns for p in resumed.iterdir()}
    args = base_args(files, inception_weights, resumed, n=5)
    args[args.index("--cfg") + 1] = 3.0
    code, _, stderr = cli(*args, "--ref", files["npz"])
    assert code == 2 and "made differently" in stderr and "cfg 2.0 there, 3.0 now" in stderr
    assert {p.name: p.stat().st_mtime_ns for p in resumed.iterdir()} == before


def _assert_clean_failure(code, stderr, expected_code, *phrases):
    assert code == expected_code, stderr
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in stderr, stderr
    flat = " ".join(stderr.split())
    for phrase in phrases:
        assert phrase in flat, stderr


def test_bad_inputs_fail_clearly_and_write_nothing(cli, files, inception_weights, tmp_path, monkeypatch):
    out = tmp_path / "never"
    args = base_args(files, inception_weights, out)

    code, _, stderr = cli(*base_args(files, inception_weights, out, n=1), "--ref", files["npz"])
    _assert_clean_failure(code, stderr, 2, "--num-samples must be at least 2")
    code, _, stderr = cli(*args, "--ref", tmp_path / "no-such-ref")
    _assert_clean_failure(code, stderr, 2, "is not a folder of images, an .npz")
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    code, _, stderr = cli(*args, "--ref", tmp_path / "bad.npz")
    _assert_clean_failure(code, stderr, 2, "has no mu and sigma")
    code, _, stderr = cli(*args, "--ref", files["npz"], "--cfg-interval", "0.5")
    _assert_clean_failure(code, stderr, 2, "--cfg-interval must be LOW,HIGH")

    i = args.index("--cfg")
    no_cfg = args[:i] + args[i + 2:]
    code, _, stderr = cli(*no_cfg, "--ref", files["npz"])
    _assert_clean_failure(code, stderr, 2, "pass --cfg")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(inception_module, "download", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    no_weights = args[: args.index("--inception-weights")] + args[args.index("--inception-weights") + 2:]
    code, _, stderr = cli(*no_weights, "--ref", files["npz"])
    _assert_clean_failure(code, stderr, 1, "weights-inception-2015-12-05-6726825d.pth",
                          str(tmp_path / "torch-home" / "hub" / "checkpoints"), "--inception-weights")
    assert not out.exists() and not (tmp_path / "torch-home" / "hub" / "checkpoints").exists()


def test_compile_on_a_cpu_says_it_samples_uncompiled(cli, files, inception_weights, tmp_path):
    """`--compile` fuses work inside CUDA graphs; on a CPU the run goes on as without it, and says so."""
    out = tmp_path / "samples"
    code, stdout, stderr = cli(*base_args(files, inception_weights, out, n=2), "--compile", "--json")
    assert code == 0, stderr
    r = one_json(stdout)
    assert r["compile_blocks"] is False and r["generation"]["written"] == 2
    assert any("uncompiled" in w for w in r["warnings"])


def test_qat_layers_on_a_cpu_are_said_once(cli, files, inception_weights, tmp_path):
    """A QAT model sampled where no low-bit kernel runs: one warning for all its QAT layers, then it samples."""
    from sla2cli.sla2.attention import SLA2Config
    from sla2cli.sla2.layers import apply_sla2

    model = nonzero_model(SMALL)
    apply_sla2(model, [0, 1], SLA2Config(topk=0.5, block_q=16, block_k=16, qat=True))
    path = save_model(model, tmp_path / "qat.safetensors")
    args = base_args(files, inception_weights, tmp_path / "samples", n=2)
    args[1] = path
    code, stdout, stderr = cli(*args, "--json")
    assert code == 0, stderr
    r = one_json(stdout)
    qat = [w for w in r["warnings"] if "fake-quant PyTorch reference" in w]
    assert qat == ["qat.safetensors: QAT's sparse branch of 2 layer(s) runs in the fake-quant PyTorch reference, "
                   "not in low-bit kernels (the low-bit kernels run on CUDA only, not cpu): correct, but slower "
                   "than the same layers without QAT"]
    assert r["generation"]["written"] == 2
