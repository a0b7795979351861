"""Finetune inputs: image folders (layouts, class indices, resize and crop, DataLoader workers) and the keyed
random draws."""

import numpy as np
import pytest
import torch
from conftest import within
from finetune_support import one_thread  # noqa: F401
from PIL import Image

from sla2cli.data.images import ImageFolder, center_crop, image_loader, to_tensor
from sla2cli.diffusion import noised
from sla2cli.errors import SLA2Error, UsageError
from sla2cli.finetune.sources import FolderSource, _Shuffled


def _save(path, size=(40, 20), colour=(255, 0, 0), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour if mode == "RGB" else colour[0]).save(path)
    return path


def test_class_folders_map_in_sorted_order_recursively(tmp_path):
    _save(tmp_path / "zebra" / "a.png")
    _save(tmp_path / "ant" / "deep" / "b.jpg")
    _save(tmp_path / "ant" / "c.png")
    _save(tmp_path / "ant" / ".hidden.png")
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    folder = ImageFolder.open(tmp_path, 16, num_classes=10)
    assert folder.mapping == {"ant": 0, "zebra": 1}
    assert [(p.name, y) for p, y in zip(folder.files, folder.labels)] == [("c.png", 0), ("b.jpg", 0), ("a.png", 1)]


def test_integer_folder_names_are_the_class_indices(tmp_path):
    for name in ("2", "10", "7"):
        _save(tmp_path / name / "x.png")
    folder = ImageFolder.open(tmp_path, 8, num_classes=11)
    assert folder.mapping == {"2": 2, "7": 7, "10": 10} and sorted(folder.labels) == [2, 7, 10]
    assert [folder[i][1] for i in range(3)] == folder.labels


def test_flat_folder_takes_its_class_from_the_option(tmp_path):
    _save(tmp_path / "a.png")
    _save(tmp_path / "b.webp")
    folder = ImageFolder.open(tmp_path, 8, class_index=3, num_classes=4)
    assert folder.labels == [3, 3] and len(folder) == 2


def test_resize_and_centre_crop_follow_jit(tmp_path):
    array = np.zeros((60, 100, 3), dtype=np.uint8)
    array[:, 20:80] = 255  # a white centre square of 60x60 between black side bars
    img = Image.fromarray(array)
    cropped = center_crop(img, 30)
    assert cropped.size == (30, 30)
    assert np.asarray(cropped).min() >= 250  # the bars were cut off, only the centre remains
    big = center_crop(Image.new("RGB", (1000, 700), (10, 20, 30)), 64)  # box-halved, then bicubic
    assert big.size == (64, 64) and np.asarray(big)[32, 32].tolist() == [10, 20, 30]
    x = to_tensor(Image.new("RGB", (2, 2), (255, 0, 127)))
    assert x.shape == (3, 2, 2) and x[:, 0, 0].tolist() == pytest.approx([1.0, -1.0, 127 / 127.5 - 1])


def test_grey_and_transparent_images_become_rgb(tmp_path):
    _save(tmp_path / "c" / "grey.png", mode="L")
    _save(tmp_path / "c" / "rgba.png", mode="RGBA", colour=(0, 255, 0, 128))
    x, y = next(iter(image_loader(ImageFolder.open(tmp_path, 12), [[0, 1]])))
    assert x.shape == (2, 3, 12, 12) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1


def test_indexing_opens_no_file_and_a_broken_image_is_one_clear_line(tmp_path, monkeypatch):
    path = _save(tmp_path / "c" / "a.png", size=(64, 64))
    _save(tmp_path / "c" / "b.png", size=(64, 64))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="class folder .*empty has no images"):
        ImageFolder.open(tmp_path, 8)
    (tmp_path / "empty").rmdir()
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    folder = ImageFolder.open(tmp_path, 8)
    assert len(folder) == 2 and opened == []  # torchvision's index: names only, decoding happens in the loader
    monkeypatch.setattr(Image, "open", real_open)
    path.write_bytes(path.read_bytes()[:60])  # header intact, pixel data cut
    for workers in (0, 1):  # in this process, and re-raised from a DataLoader worker: one line either way
        with pytest.raises(SLA2Error, match="cannot read image .*a.png") as exc:
            next(iter(image_loader(folder, [[0, 1]], workers)))
        assert "\n" not in str(exc.value) and "Traceback" not in str(exc.value)


def test_every_epoch_visits_every_image_once():
    order = _Shuffled(7, seed=3, stream=0)
    for epoch in range(3):
        assert sorted(order(range(epoch * 7, epoch * 7 + 7))) == list(range(7))
    assert order(range(7)) != order(range(7, 14))


def test_draws_depend_on_the_sample_position_only():
    """Any split of a global batch across processes sees the same t and noise for each sample."""
    x = torch.zeros(6, 3, 4, 4)
    z, t, eps = noised(x, range(10, 16), seed=1, stream=1, noise_scale=2.0)
    z2, t2, _ = noised(x[3:], range(13, 16), seed=1, stream=1, noise_scale=2.0)
    assert torch.equal(z[3:], z2) and torch.equal(t[3:], t2)
    torch.testing.assert_close(z, ((1 - t)[:, None, None, None] * eps * 2.0))
    assert 0 < t.min() and t.max() < 1


def test_uniform_t_covers_the_samplers_late_steps():
    """JiT's logit-normal t almost never reaches the sampler's last steps (t > 0.9); uniform draws do, as
    pure functions of the position like JiT's, and the noise of a sample does not depend on its t."""
    x = torch.zeros(4000, 1, 1, 1)
    _, jit, _ = noised(x, seed=1, stream=1)
    _, uniform, eps = noised(x, seed=1, stream=1, t_distribution="uniform")
    assert (jit > 0.9).float().mean() < 0.002 and abs((uniform > 0.9).float().mean() - 0.1) < 0.02
    assert abs(uniform.mean() - 0.5) < 0.02 and 0 <= uniform.min() and uniform.max() < 1
    _, again, eps2 = noised(x[7:9], range(7, 9), seed=1, stream=1, t_distribution="uniform")
    assert torch.equal(again, uniform[7:9]) and torch.equal(eps2, eps[7:9])


def test_named_and_custom_t_distributions():
    """"early" puts most draws among the sampler's first steps; "logit-normal:M,S" is JiT's family with other
    parameters ("jit" is -0.8, 0.8)."""
    x = torch.zeros(4000, 1, 1, 1)
    _, early, _ = noised(x, seed=2, stream=1, t_distribution="early")
    assert 0.15 < early.median() < 0.19 and 0.24 < (early < 0.1).float().mean() < 0.30
    _, jit, _ = noised(x, seed=2, stream=1)
    _, same, _ = noised(x, seed=2, stream=1, t_distribution="logit-normal:-0.8,0.8")
    assert torch.equal(jit, same)
    _, late, _ = noised(x, seed=2, stream=1, t_distribution="logit-normal:2,0.5")
    assert late.median() > 0.85


def test_folder_source_draws_t_from_its_distribution(tmp_path):
    for i in range(4):
        _save(tmp_path / "c0" / f"{i}.png", colour=(40 * i, 0, 0))
    folder = ImageFolder.open(tmp_path, 8)
    steps = [range(0, 64)]
    source = FolderSource(folder, seed=0, eval_samples=2, t_distribution="uniform")
    (_, _, t, _), = source.train_batches(steps, "cpu")
    (_, _, t_jit, _), = FolderSource(folder, seed=0, eval_samples=2).train_batches(steps, "cpu")
    assert t.max() > 0.9 > t_jit.max() and source.describe()["t_distribution"] == "uniform"
    _, eval_t, _ = source.eval_states("cpu")  # held-out states stay JiT's: the v-loss is comparable across runs
    torch.testing.assert_close(eval_t, FolderSource(folder, seed=0, eval_samples=2).eval_states("cpu")[1])


def test_folder_source_batches_are_deterministic(tmp_path):
    for c in range(2):
        for i in range(3):
            _save(tmp_path / f"c{c}" / f"{i}.png", colour=(40 * i, 100 * c, 0))
    folder = ImageFolder.open(tmp_path, 8)
    source = FolderSource(folder, seed=0, eval_samples=2)
    steps = [range(0, 4), range(4, 8)]
    (a, za, ta, ya), (a2, *_) = source.train_batches(steps, "cpu")
    (b, zb, tb, yb), (b2, *_) = FolderSource(folder, seed=0, eval_samples=2, workers=2).train_batches(steps, "cpu")
    assert torch.equal(a, b) and torch.equal(ya, yb) and torch.equal(a2, b2) and a.shape == (4, 3, 8, 8)
    assert torch.equal(za, zb) and torch.equal(ta, tb)  # the noise follows the positions too
    (resumed, *_), = source.train_batches(steps[1:], "cpu")  # a resumed run reads the same images at the same positions
    assert torch.equal(resumed, a2)
    assert source.describe() == {"source": "folder", "path": str(tmp_path), "images": 6, "classes": 2,
                                 "resolution": 8, "t_distribution": "jit"}


def test_a_fifo_named_like_an_image_is_one_line_not_a_hang(tmp_path):
    """An image folder entry that is a FIFO would block the loader's open for ever: it is refused instead."""
    import os

    _save(tmp_path / "c" / "a.png", size=(16, 16))
    os.mkfifo(tmp_path / "c" / "b.png")
    folder = ImageFolder.open(tmp_path, 8)
    with pytest.raises(SLA2Error) as exc:
        within(30, lambda: next(iter(image_loader(folder, [[0, 1]]))), tmp_path / "c" / "b.png")
    assert "b.png is a FIFO, not a file" in str(exc.value) and "\n" not in str(exc.value)


def test_trajectory_states_are_the_inputs_the_guided_sampler_fed_the_network():
    """Recording changes nothing in the samples; each trajectory holds, in order, the (z, t, y) of every
    network evaluation: both passes where guidance is on, one where it is off, starting from the noise."""
    from contextlib import nullcontext

    from finetune_support import random_model

    from sla2cli.distributed import ProcessGroup
    from sla2cli.finetune.sources import teacher_samples
    from sla2cli.seeding import TEACHER_POOL, generator

    model = random_model().eval()
    common = dict(steps=4, seed=3, device=torch.device("cpu"), batch_size=2, group=ProcessGroup(),
                  autocast=nullcontext, cfg=2.0)
    x, y = teacher_samples(model, 3, **common)
    x2, y2, z, t, labels = teacher_samples(model, 3, **common, record=True)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    # linspace(0, 1, 5): Heun at 0 (guidance off: t = 0 is outside (0.1, 1)), 0.25; 0.25, 0.5; 0.5, 0.75;
    # Euler at 0.75 -> 7 evaluations, 6 of them guided (two inputs each): 13 inputs per trajectory
    assert z.shape == (3, 13, *x.shape[1:]) and t.shape == labels.shape == (3, 13)
    expected_t = [0.0, 0.25, 0.25, 0.25, 0.25, 0.5, 0.5, 0.5, 0.5, 0.75, 0.75, 0.75, 0.75]
    assert torch.allclose(t, torch.tensor(expected_t).expand(3, 13))
    null = model.config.num_classes
    assert torch.equal(labels[:, 0], y) and torch.equal(labels[:, 1], y) and (labels[:, 2] == null).all()
    assert torch.equal(z[:, 1], z[:, 2])  # the guided pass feeds one state to both labels
    for i in range(3):  # each trajectory starts at its own keyed noise
        g = generator(3, TEACHER_POOL, i)
        torch.randint(0, null, (), generator=g)
        assert torch.equal(z[i, 0], torch.randn(*x.shape[1:], generator=g) * model.config.noise_scale)


def test_a_trajectory_source_draws_states_by_position_and_evaluates_on_held_out_trajectories():
    from contextlib import nullcontext

    from finetune_support import random_model

    from sla2cli.distributed import ProcessGroup
    from sla2cli.finetune.config import DataSpec
    from sla2cli.finetune.sources import build_source

    model = random_model().eval()
    spec = DataSpec(teacher_samples=2, sampling_steps=3, cfg=1.5, states="trajectory")
    src = build_source(model, spec, seed=0, eval_samples=4, device=torch.device("cpu"), batch_size=2,
                       group=ProcessGroup(), autocast=nullcontext)
    assert spec.kind == "trajectory" and src.describe()["states"] == len(src.z) == 2 * 9
    z_eval, t_eval, y_eval = src.eval_states("cpu")
    assert z_eval.shape[0] == t_eval.shape[0] == y_eval.shape[0] == 4
    assert not any(torch.equal(e, s) for e in z_eval for s in src.z)  # held-out trajectories only
    steps = [range(0, 4), range(4, 8)]
    (x, z, t, y), second = src.train_batches(steps, "cpu")
    (_, z2, t2, y2), = src.train_batches(steps[1:], "cpu")
    assert x is None and z.shape == (4, *z_eval.shape[1:])
    assert torch.equal(second[1], z2) and torch.equal(second[2], t2) and torch.equal(second[3], y2)
