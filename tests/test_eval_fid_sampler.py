"""The samplers against hand-written float64 references of JiT's and PixelGen's update rules, and pairing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import nonzero_model

from sla2cli.errors import UsageError
from sla2cli.models.jit import JiTConfig
from sla2cli.sampling import (
    PRESET_CFG,
    jit_time_grid,
    paired_inputs,
    pixelgen_time_grid,
    sample,
    sample_label,
    sample_noise,
    sampler_settings,
    to_uint8,
)

T_EPS = 0.05
# Smaller than conftest's TINY (16 tokens, 2 blocks): a sampler test runs the network dozens of times.
SMALL = JiTConfig(input_size=16, patch_size=4, hidden_size=32, depth=2, num_heads=2, ffn_hidden_dim=48,
                  num_classes=5, bottleneck_dim=8, in_context_len=4, in_context_start=1)


def _rmsnorm_in_input_dtype(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


@pytest.fixture
def model64(monkeypatch):
    """The tiny JiT in float64 throughout: its RMSNorm (float32 inside, as upstream) would otherwise turn
    the 1e-15 differences between batch shapes into 1e-8 ones."""
    from sla2cli.models.jit import RMSNorm
    monkeypatch.setattr(RMSNorm, "forward", _rmsnorm_in_input_dtype)
    return nonzero_model(SMALL).double()


def inputs64(n=2, seed=1):
    noise, labels = paired_inputs(seed, range(n), (3, SMALL.input_size, SMALL.input_size), SMALL.num_classes)
    return noise.double(), labels


def reference_velocity(model, z, t, labels, w):
    """JiT `_forward_sample`: separate conditional and unconditional passes, v = (x̂ − z)/max(1 − t, ε)."""
    tt = torch.full((z.shape[0],), t, dtype=torch.float64)
    v_c = (model(z, tt, labels) - z) / max(1.0 - t, T_EPS)
    v_u = (model(z, tt, torch.full_like(labels, SMALL.num_classes)) - z) / max(1.0 - t, T_EPS)
    return v_u + w * (v_c - v_u)


def reference_jit(model, noise, labels, steps, cfg, interval, method="heun"):
    """LTH14/JiT `generate` written out in float64: Heun on linspace(0, 1, steps+1), final Euler step."""
    low, high = interval
    ts = [i / steps for i in range(steps + 1)]

    def v(z, t):
        inside = t < high and (low == 0 or t > low)
        return reference_velocity(model, z, t, labels, cfg if inside else 1.0)

    z, traj = noise.clone(), []
    for i in range(steps - 1):
        t, t_next = ts[i], ts[i + 1]
        v_t = v(z, t)
        if method == "heun":
            z_euler = z + (t_next - t) * v_t
            v_t = 0.5 * (v_t + v(z_euler, t_next))
        z = z + (t_next - t) * v_t
        traj.append(z)
    z = z + (ts[-1] - ts[-2]) * v(z, ts[-2])
    traj.append(z)
    return traj


def reference_pixelgen(model, noise, labels, steps, cfg, interval, shift):
    """PixelGen `HeunSamplerJiT(exact_henu=True)` in float64: shifted grid, guidance decided at t_cur."""
    low, high = interval
    raw = [i * (1 - 1 / steps) / (steps - 1) if steps > 1 else 0.0 for i in range(steps)] + [1.0]
    ts = [t / (t + (1 - t) * shift) for t in raw]
    z, traj = noise.clone(), []
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        w = cfg if (t > low and t <= high) else 1.0
        v_t = reference_velocity(model, z, t, labels, w)
        if i < steps - 1:
            z_hat = z + v_t * (t_next - t)
            v_hat = reference_velocity(model, z_hat, t_next, labels, w)
            z = z + (v_t + v_hat) / 2 * (t_next - t)
        else:
            z = z + v_t * (t_next - t)
        traj.append(z)
    return traj


def assert_trajectories_match(ours, ref):
    assert len(ours) == len(ref)
    for step, (a, b) in enumerate(zip(ours, ref)):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"step {step}: {m}")


@pytest.mark.parametrize("steps,cfg,interval,method", [
    (5, 2.5, (0.25, 0.9), "heun"),   # guidance switches on and off inside the run
    (4, 3.0, (0.0, 1.0), "heun"),    # low = 0: t = 0 is guided
    (3, 1.7, (0.1, 1.0), "euler"),
])
def test_jit_sampler_matches_float64_reference(model64, steps, cfg, interval, method):
    noise, labels = inputs64()
    ours = []
    out = sample(model64, noise, labels, steps=steps, cfg=cfg, cfg_interval=interval, method=method, trajectory=ours)
    ref = reference_jit(model64, noise, labels, steps, cfg, interval, method)
    assert_trajectories_match(ours, ref)
    torch.testing.assert_close(out, ref[-1], rtol=1e-10, atol=1e-10)
    assert out.abs().max() > 0.1 and not torch.allclose(out, noise)


@pytest.mark.parametrize("steps,shift,interval", [(5, 2.0, (0.1, 0.9)), (4, 1.0, (0.3, 0.5)), (1, 2.0, (0.0, 1.0))])
def test_pixelgen_sampler_matches_float64_reference(model64, steps, shift, interval):
    noise, labels = inputs64()
    ours = []
    sample(model64, noise, labels, steps=steps, cfg=2.25, cfg_interval=interval, sampler="pixelgen",
           time_shift=shift, trajectory=ours)
    assert_trajectories_match(ours, reference_pixelgen(model64, noise, labels, steps, 2.25, interval, shift))


def test_time_grids_follow_the_originals():
    assert torch.equal(jit_time_grid(50), torch.linspace(0.0, 1.0, 51))
    assert jit_time_grid(50).dtype == torch.float32
    grid = pixelgen_time_grid(4, 2.0)
    raw = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    torch.testing.assert_close(grid, raw / (raw + (1 - raw) * 2.0))
    torch.testing.assert_close(pixelgen_time_grid(4, 1.0), raw)


def test_float32_sampling_is_close_to_float64(model64):
    noise, labels = inputs64()
    ref = sample(model64, noise, labels, steps=4, cfg=2.0)
    model32 = nonzero_model(SMALL)
    out = sample(model32, noise.float(), labels, steps=4, cfg=2.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_low_precision_weights_keep_the_noise_dtype():
    """`sla2 stats` samples with bf16 weights and bf16 noise: the state stays float32 inside."""
    model = nonzero_model(SMALL).to(torch.bfloat16)
    noise, labels = paired_inputs(0, range(2), (3, 16, 16), SMALL.num_classes)
    out = sample(model, noise.to(torch.bfloat16), labels, steps=2)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_noise_and_labels_are_functions_of_seed_and_index():
    shape = (3, 8, 8)
    noise, labels = paired_inputs(7, range(12), shape, num_classes=5)
    sub_noise, sub_labels = paired_inputs(7, [9, 2, 4], shape, num_classes=5)
    assert torch.equal(sub_noise, noise[[9, 2, 4]]) and torch.equal(sub_labels, labels[[9, 2, 4]])
    assert torch.equal(sample_noise(7, 9, shape), noise[9]) and sample_label(7, 9, 5) == labels[9]
    assert not torch.equal(paired_inputs(8, range(12), shape, 5)[0], noise)
    # Balanced: each block of num_classes consecutive indices holds every class once.
    assert sorted(labels[:5].tolist()) == list(range(5)) and sorted(labels[5:10].tolist()) == list(range(5))
    assert sample_noise(7, 0, shape, noise_scale=2.0).equal(2 * noise[0])
    with pytest.raises(UsageError, match="seed"):
        sample_noise(-1, 0, shape)


def test_to_uint8_rounds_like_jit():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.5, 1.0, 1.2]).view(1, 1, 1, 6)
    expected = np.round(np.clip((x.numpy() + 1) / 2 * 255, 0, 255)).astype(np.uint8)
    assert np.array_equal(to_uint8(x).numpy(), expected)


def test_settings_defaults_per_preset_and_sampler():
    for preset, w in [("JiT-B/16", 3.0), ("JiT-L/16", 2.4), ("JiT-H/16", 2.2), ("JiT-B/32", 3.0),
                      ("JiT-L/32", 2.5), ("JiT-H/32", 2.3)]:
        s = sampler_settings("jit", steps=50, cfg=None, cfg_interval=None, time_shift=None, preset=preset)
        assert s.cfg == w == PRESET_CFG[preset] and s.cfg_interval == (0.1, 1.0) and s.time_shift is None
    s = sampler_settings("pixelgen", steps=50, cfg=None, cfg_interval=None, time_shift=None, preset="PixelGen-XL")
    assert (s.cfg, s.cfg_interval, s.time_shift) == (2.25, (0.1, 0.9), 2.0)
    assert sampler_settings("jit", steps=8, cfg=1.5, cfg_interval=(0.2, 0.7), time_shift=None, preset=None).cfg == 1.5
    with pytest.raises(UsageError, match="pass cfg"):
        sampler_settings("jit", steps=50, cfg=None, cfg_interval=None, time_shift=None, preset=None)
    with pytest.raises(UsageError, match="pixelgen sampler only"):
        sampler_settings("jit", steps=50, cfg=2.0, cfg_interval=None, time_shift=2.0, preset=None)
    with pytest.raises(UsageError, match="cfg_interval"):
        sampler_settings("jit", steps=50, cfg=2.0, cfg_interval=(0.9, 0.1), time_shift=None, preset=None)
    with pytest.raises(UsageError, match="unknown sampler"):
        sampler_settings("ddim", steps=50, cfg=2.0, cfg_interval=None, time_shift=None, preset=None)
    assert math.isclose(sampler_settings("pixelgen", steps=5, cfg=1.0, cfg_interval=None, time_shift=3.0,
                                         preset=None).time_shift, 3.0)
