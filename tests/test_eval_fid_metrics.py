"""FID/IS through torch-fidelity, references, Inception weights offline, paired metrics.

No network: an InceptionV3 of torch-fidelity's architecture with random weights is saved to a temporary
file (`random_inception_weights`), so the real feature pipeline runs end to end. The other eval-fid
test files import these helpers.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from sla2cli.errors import SLA2Error, UsageError
from sla2cli.metrics import (
    create_extractor,
    dataset_features,
    frechet_distance,
    inception_score,
    kernel_distance,
    paired_metrics,
    resolve_reference,
    resolve_weights,
    statistics,
)
from sla2cli.metrics import inception as inception_module
from sla2cli.metrics.inception import INCEPTION_FILE, INCEPTION_URL


def random_inception_weights(path: Path) -> Path:
    """torch-fidelity's InceptionV3 with random He-initialised weights (features of a useful scale)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    with mock.patch.object(fe, "load_state_dict_from_url", return_value=None), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, strict=True: None):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / m.weight[0].numel()) ** 0.5)
        net.fc.weight.copy_(torch.randn(net.fc.weight.shape, generator=gen) * 3 / 2048 ** 0.5)
    torch.save(net.state_dict(), path)
    return path


def write_images(folder: Path, count: int, size: int = 32, seed: int = 0, high: int = 256) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, high, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def folder_features(weights: Path, files) -> np.ndarray:
    """Pool-3 features of image files from a fresh torch-fidelity InceptionV3, outside our code path."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    images = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1)
                          for f in sorted(map(str, files))])
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))
    with torch.no_grad():
        return net.eval()(images)[0].double().numpy()


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of two Gaussians fitted to feature sets, in float64 with scipy.

    tr √(Σa Σb) equals the sum of the singular values of Ac Bcᵀ / √((Na−1)(Nb−1)) (centred features),
    exact for the low-rank covariances of few samples, where sqrtm of 2048×2048 would be slow and
    ill-conditioned.
    """
    ac, bc = a - a.mean(0), b - b.mean(0)
    na, nb = len(a), len(b)
    tr_sqrt = scipy.linalg.svdvals(ac @ bc.T).sum() / np.sqrt((na - 1) * (nb - 1))
    d = a.mean(0) - b.mean(0)
    return float(d @ d + (ac ** 2).sum() / (na - 1) + (bc ** 2).sum() / (nb - 1) - 2 * tr_sqrt)


def write_npz(path: Path, features: np.ndarray) -> Path:
    np.savez(path, mu=features.mean(0), sigma=np.cov(features, rowvar=False))
    return path


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    return random_inception_weights(tmp_path_factory.mktemp("inception") / INCEPTION_FILE)


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory, inception_weights):
    root = tmp_path_factory.mktemp("sets")
    a = write_images(root / "a", 4, seed=1)
    b = write_images(root / "b", 5, seed=2, high=160)
    return a, b


def test_fid_equals_direct_frechet_on_the_same_features(two_sets, inception_weights):
    from torch_fidelity.datasets import ImagesPathDataset
    a, b = two_sets
    extractor = create_extractor(inception_weights, ["2048"], torch.device("cpu"))
    fa, fb = (dataset_features(ImagesPathDataset(sorted(map(str, d.iterdir()))), extractor, torch.device("cpu"))["2048"]
              for d in (a, b))
    assert fa.shape == (4, 2048) and fb.shape == (5, 2048)
    ours = frechet_distance(statistics(fa), statistics(fb))
    expected = scipy_frechet(fa.double().numpy(), fb.double().numpy())
    assert expected > 1e-3  # the random network separates the two sets
    assert ours == pytest.approx(expected, rel=1e-5)

    # An .npz of the reference's statistics (float64, as JiT's fid_stats) gives the same FID.
    npz = write_npz(a.parent / "b_stats.npz", fb.double().numpy())
    ref = resolve_reference(str(npz))
    assert ref.kind == "npz" and ref.statistics["mu"].shape == (2048,)
    assert frechet_distance(statistics(fa), ref.statistics) == pytest.approx(expected, rel=1e-5)


def test_kid_spread_only_where_subsets_differ():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 8, generator=g), torch.randn(40, 8, generator=g) + 2
    whole = kernel_distance(a, b)  # every subset of 40 of 40 is the whole set: one estimate, no spread
    assert whole["subsets"] == 1 and whole["std"] is None and whole["subset_size"] == 40
    drawn = kernel_distance(a, b[:30])  # subsets of 30 of a's 40 differ: a real spread
    assert drawn["subsets"] == 100 and drawn["subset_size"] == 30 and drawn["std"] > 0
    assert whole["mean"] > 10 * abs(kernel_distance(a[:20], a[20:])["mean"])  # shifted sets are far apart


def test_inception_score_is_torch_fidelitys(inception_weights):
    from torch_fidelity.metric_isc import isc_features_to_metric
    logits = torch.randn(12, 1008, generator=torch.Generator().manual_seed(3)) * 3
    ours = inception_score(logits)
    ref = isc_features_to_metric(logits, splits=10, shuffle=True, rng_seed=2020)
    assert ours["mean"] == pytest.approx(ref["inception_score_mean"]) and ours["splits"] == 10
    assert inception_score(logits[:4])["splits"] == 4  # never more splits than samples


def test_reference_errors_are_clear(tmp_path):
    with pytest.raises(UsageError, match="not a folder of images, an .npz"):
        resolve_reference(str(tmp_path / "nowhere"))
    with pytest.raises(UsageError, match="does not exist"):
        resolve_reference(str(tmp_path / "stats.npz"))
    one = write_images(tmp_path / "one", 1)
    with pytest.raises(UsageError, match="holds 1 image"):
        resolve_reference(str(one))
    np.savez(tmp_path / "nosigma.npz", mu=np.zeros(2048))
    with pytest.raises(UsageError, match="no sigma"):
        resolve_reference(str(tmp_path / "nosigma.npz"))
    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(UsageError, match=r"must be \(2048,\)"):
        resolve_reference(str(tmp_path / "small.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(UsageError, match="not a readable .npz"):
        resolve_reference(str(tmp_path / "junk.npz"))
    assert resolve_reference("cifar10-train").kind == "registered"


def test_missing_weights_name_the_file_and_place(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    calls = []

    def offline(url, dst, timeout=0):
        calls.append((url, dst))
        raise OSError("network is unreachable")

    monkeypatch.setattr(inception_module, "download", offline)
    cached = tmp_path / "torch-home" / "hub" / "checkpoints" / INCEPTION_FILE
    with pytest.raises(SLA2Error) as exc:
        resolve_weights(None)
    message = str(exc.value)
    assert INCEPTION_URL in message and str(cached) in message and "inception_weights" in message
    assert calls == [(INCEPTION_URL, cached)] and not cached.exists()
    with pytest.raises(UsageError, match="does not exist"):
        resolve_weights(tmp_path / "missing.pth")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(SLA2Error, match="not an InceptionV3 state_dict"):
        resolve_weights(tmp_path / "other.pth")


def test_cached_weights_are_found(tmp_path, monkeypatch, inception_weights):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / INCEPTION_FILE
    cached.parent.mkdir(parents=True)
    cached.symlink_to(inception_weights)
    monkeypatch.setattr(inception_module, "download", lambda *a, **k: pytest.fail("must not download"))
    assert resolve_weights(None) == cached


def test_paired_metrics(tmp_path):
    from sla2cli.metrics.samples import write_sample
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    rng = np.random.default_rng(0)
    images = [torch.from_numpy(rng.integers(10, 240, (3, 8, 8), dtype=np.uint8)) for _ in range(3)]
    for i, img in enumerate(images):
        write_sample(a, i, img)
        write_sample(b, i, img if i != 1 else img + 5)  # image 1 differs by 5 levels everywhere
    m = paired_metrics(a, b, 3)
    assert m["identical"] == 2 and m["pairs"] == 3
    assert m["mae_worst"] == pytest.approx(5 / 255) and m["mae_worst_index"] == 1
    assert m["mae_mean"] == pytest.approx(5 / 255 / 3)
    assert m["psnr_worst"] == pytest.approx(10 * np.log10(255 ** 2 / 25)) and m["psnr_worst_index"] == 1
