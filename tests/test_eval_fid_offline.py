"""`sla2 eval-fid` without Inception: no `--ref` (samples, paired metrics, grid), the shipped texture feature
space, the global batch size, and the weights download (a file:// URL: nothing leaves the machine)."""

from __future__ import annotations

import hashlib
import importlib

import numpy as np
import pytest
import torch
from conftest import nonzero_model, one_json
from PIL import Image
from test_eval_fid_cli import SMALL

from sla2cli import SLA2Config, apply_sla2, save_model
from sla2cli.data.textures import REFERENCE_SEED, texture_batch
from sla2cli.distributed import ProcessGroup
from sla2cli.errors import SLA2Error
from sla2cli.metrics import inception as inception_module
from sla2cli.metrics.grid import GAP, image_grid
from sla2cli.sampling import to_uint8

evaluate_module = importlib.import_module("sla2cli.metrics.evaluate")
COMMON = ["-n", 4, "--steps", 2, "--cfg", 1.0, "--batch-size", 2, "--dtype", "fp32", "--device", "cpu", "--json"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("offline")
    converted = nonzero_model(SMALL)
    apply_sla2(converted, "all", SLA2Config(topk=0.5, block_q=16, block_k=16))
    dense = save_model(nonzero_model(SMALL), root / "small.safetensors")
    return dense, save_model(converted, root / "sla2.safetensors")


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No cached Inception weights, and any download attempt fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(inception_module, "download", lambda *a, **k: pytest.fail("must not download"))


def test_without_ref_samples_compare_and_grid_need_no_inception(cli, models, tmp_path, offline):
    model, converted = models
    grid = tmp_path / "pairs.png"
    code, stdout, stderr = cli("eval-fid", model, *COMMON, "--out", tmp_path / "s", "--compare-to", converted,
                               "--grid", grid)
    assert code == 0, stderr
    r = one_json(stdout)
    assert r["fid"] is None and r["kid"] is None and r["reference"] is None
    assert r["notes"] == ["FID not computed: no reference (--ref) given"]
    c = r["compare"]
    assert c["pairs"] == 4 and c["fid_between"] is None and c["identical"] < 4
    assert 0 < c["psnr_mean"] and -1 <= c["ssim_worst"] <= c["ssim_mean"] < 1 and c["mae_mean"] > 0
    assert r["grid"] == str(grid) and len(list((tmp_path / "s").glob("*.png"))) == 4
    with Image.open(grid) as image:  # two rows of four 16 px samples, upscaled 2x
        assert image.width > 4 * 16 * 2 and image.height > 2 * 16 * 2

    code, stdout, stderr = cli("eval-fid", model, *COMMON[:-1], "--out", tmp_path / "s")  # the human report
    assert code == 0 and "FID not computed: no reference (--ref) given" in " ".join(stdout.split()), stderr
    code, _, stderr = cli("eval-fid", model, *COMMON, "--out", tmp_path / "s", "--grid", grid)
    assert code == 2 and "already exists" in stderr and "--force" in stderr
    code, _, stderr = cli("eval-fid", model, *COMMON, "--out", tmp_path / "s", "--grid", grid, "--force")
    assert code == 0, stderr


def test_grid_labels_never_run_together(tmp_path):
    labels = ["mega-mendung", "mandala", "x"]
    rows = [("a long row name", np.zeros((3, 8, 8, 3), np.uint8))]
    with Image.open(image_grid(rows, labels, tmp_path / "g.png", scale=1)) as image:
        band = np.asarray(image.convert("L"))[: GAP + 8]
    ink = band.min(axis=0) < 200  # columns of the label band with any text
    left = int(np.argmax(ink))
    runs, blank = [], 0
    for inked in ink[left:]:
        if not inked:
            blank += 1
        else:
            runs.append(blank)
            blank = 0
    assert sum(gap >= GAP // 2 for gap in runs) == len(labels) - 1  # a clear gap between each pair of labels


def test_texture_features_are_a_torch_fidelity_extractor():
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    from sla2cli.metrics import FEATURE_SPACES, create_extractor, frechet_distance, statistics
    from sla2cli.metrics.texture_features import EXTRACTOR_NAME, WEIGHTS_PATH, TextureFeatureExtractor

    assert WEIGHTS_PATH.stat().st_size < 2 ** 20
    space = FEATURE_SPACES["textures"]
    path, state = space.resolve(None, False, False)
    assert FEATURE_EXTRACTORS_REGISTRY[EXTRACTOR_NAME] is TextureFeatureExtractor
    extractor = create_extractor(state, [space.layer], torch.device("cpu"), "textures")

    def stats(images):
        with torch.no_grad():
            return statistics(extractor(to_uint8(images))[0])

    reference = stats(texture_batch(range(64), seed=REFERENCE_SEED)[0])
    other = texture_batch(range(64), seed=1)[0]
    same = frechet_distance(reference, stats(other))
    blurred = frechet_distance(reference, stats(torch.nn.functional.avg_pool2d(other, 3, 1, 1)))
    assert same * 10 < blurred  # the feature space sees a blur that the texture classes survive


def test_eval_fid_in_the_texture_space(cli, models, tmp_path, offline):
    model, _ = models
    ref = tmp_path / "ref"
    ref.mkdir()
    for i, image in enumerate(to_uint8(texture_batch(range(4), seed=REFERENCE_SEED, size=16)[0])):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(ref / f"{i:06d}.png")
    code, stdout, stderr = cli("eval-fid", model, *COMMON, "--out", tmp_path / "s", "--ref", ref,
                               "--features", "textures")
    assert code == 0, stderr
    r = one_json(stdout)
    assert r["features"]["metric"] == "texture Fréchet distance" and r["features"]["extractor"] == "sla2cli-textures"
    assert r["fid"] > 0 and r["kid"]["subset_size"] == 4 and r["reference"]["images"] == 4
    assert r["kid"]["subsets"] == 1 and r["kid"]["std"] is None  # 4 samples, 4 references: one estimate
    code, _, stderr = cli("eval-fid", model, *COMMON, "--ref", ref, "--features", "textures", "--isc")
    assert code == 2 and "--isc needs" in stderr and "--features inception" in stderr
    code, _, stderr = cli("eval-fid", model, *COMMON, "--ref", ref, "--features", "textures",
                          "--inception-weights", ref / "000000.png")
    assert code == 2 and "--inception-weights is for --features inception" in stderr
    code, _, stderr = cli("eval-fid", model, *COMMON, "--ref", ref, "--features", "vgg")
    assert code == 2 and "--features 'vgg' is not a feature space" in stderr


def test_batch_size_is_global(cli, models, tmp_path, monkeypatch):
    model, _ = models
    monkeypatch.setattr(evaluate_module, "init_from_env", lambda device: ProcessGroup(rank=0, world_size=3))
    code, _, stderr = cli("eval-fid", model, *COMMON, "--out", tmp_path / "s")
    assert code == 2 and "--batch-size 2 (the global batch) must be a multiple of the 3 processes" in stderr
    assert not (tmp_path / "s").exists()


def test_inception_download_checks_the_hash(tmp_path, monkeypatch):
    payload = b"weights"
    digest = hashlib.sha256(payload).hexdigest()
    source = tmp_path / "server" / "w.pth"
    source.parent.mkdir()
    source.write_bytes(payload)
    good = tmp_path / "cache" / f"weights-{digest[:8]}.pth"
    inception_module.download(source.as_uri(), good)
    assert good.read_bytes() == payload
    bad = tmp_path / "cache" / "weights-00000000.pth"
    with pytest.raises(RuntimeError, match="invalid hash value"):
        inception_module.download(source.as_uri(), bad)
    assert sorted(p.name for p in good.parent.iterdir()) == [good.name]  # no partial file left

    # resolve_state downloads into torch hub's cache when nothing is there, and says why when it cannot
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(inception_module, "INCEPTION_URL", source.as_uri())
    with pytest.raises(SLA2Error, match="could not be downloaded .*invalid hash value.*without ref"):
        inception_module.resolve_state(None)
