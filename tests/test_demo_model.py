"""The demo model shipped in the package is trained, and its attention has structure.

Held-out data: textures of seed HELD_OUT_SEED (training drew seed 0 only). The untrained baseline is
a fresh JiT of the same architecture (upstream initialisation), compared on the very same noised batch.
"""

from __future__ import annotations

import math

import pytest
import torch

from sla2cli.data.textures import CLASS_NAMES, NUM_CLASSES, reference_set, texture_batch
from sla2cli.diffusion import denoising_loss, noised
from sla2cli.models.jit import JiT
from sla2cli.models.shipped import DEMO, DEMO_CONFIG, DEMO_MODEL_PATH, HELD_OUT_SEED
from sla2cli.seeding import PROBE_NOISE
from sla2cli.sla2.stats import attention_entropy


@pytest.fixture(scope="module")
def demo():
    torch.manual_seed(0)
    model, info = DEMO.load()
    return model, info


@pytest.fixture(scope="module")
def held_out():
    return texture_batch(torch.arange(4), seed=HELD_OUT_SEED)  # one forward of 4 images: a few seconds on CPU


def test_demo_asset_is_small_and_loads_as_float32(demo):
    model, info = demo
    assert DEMO_MODEL_PATH.stat().st_size <= 10 * 2 ** 20
    assert model.config == DEMO_CONFIG
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert DEMO_CONFIG.tokens(DEMO_CONFIG.depth - 1) >= 1024 and DEMO_CONFIG.num_classes >= 4
    assert info.provenance["source"] == "scripts/train_demo_model.py"
    assert info.provenance["steps"] > 0


def test_demo_model_denoises_far_better_than_untrained(demo, held_out):
    model, _ = demo
    x, y = held_out
    torch.manual_seed(0)
    untrained = JiT(DEMO_CONFIG).eval()
    t = torch.linspace(0.2, 0.9, x.shape[0])  # fixed noise levels across the range sampling visits
    trained_loss = denoising_loss(model, x, y, seed=3, t=t)
    untrained_loss = denoising_loss(untrained, x, y, seed=3, t=t)
    assert trained_loss < 0.1 * untrained_loss, (trained_loss, untrained_loss)  # recorded: 0.17 vs 7.9


def test_demo_attention_is_far_from_uniform(demo, held_out):
    model, _ = demo
    x, y = held_out
    z, t, _ = noised(x[:2], seed=4, stream=PROBE_NOISE, t=torch.full((2,), 0.6))
    trained = attention_entropy(model, z, t, y[:2])
    torch.manual_seed(0)
    untrained = attention_entropy(JiT(DEMO_CONFIG).eval(), z, t, y[:2])
    log_n = trained[0]["log_n"]
    assert log_n == pytest.approx(math.log(1024))
    mean_trained = sum(r["entropy"] / r["log_n"] for r in trained.values()) / len(trained)
    mean_untrained = sum(r["entropy"] / r["log_n"] for r in untrained.values()) / len(untrained)
    # recorded: 0.96 of log N untrained, 0.63 trained (0.49 in layer 0, at most 0.81)
    assert mean_untrained > 0.9  # a fresh network attends almost uniformly ...
    assert mean_trained < 0.75, {i: r["entropy"] for i, r in trained.items()}  # ... the trained one does not
    assert all(r["entropy"] < 0.9 * r["log_n"] for r in trained.values())


def test_textures_are_reproducible_and_class_distinct():
    a, la = texture_batch(torch.arange(40), seed=5)
    b, lb = texture_batch(list(range(40)), seed=5)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert a.shape == (40, 3, 64, 64) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(la, torch.arange(40) % NUM_CLASSES) and len(CLASS_NAMES) == NUM_CLASSES >= 4
    c, _ = texture_batch(torch.arange(40), seed=6)
    assert not torch.equal(a, c)
    # every image has structure (not flat), and classes differ in mean colour more than within a class
    assert (a.flatten(1).std(dim=1) > 0.1).all()
    means = a.mean(dim=(2, 3)).view(5, NUM_CLASSES, 3)
    within = means.std(dim=0).mean()
    between = means.mean(dim=0).std(dim=0).mean()
    assert between > 2 * within


def test_reference_set_is_fixed_and_held_out():
    ref, labels = reference_set(32)
    again, _ = reference_set(32)
    assert torch.equal(ref, again)
    train, _ = texture_batch(torch.arange(32), seed=0)
    assert not torch.equal(ref, train)
    assert labels.bincount(minlength=NUM_CLASSES).min() == 4
