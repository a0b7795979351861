"""Loading official JiT `.pth` and PixelGen Lightning `.ckpt` files reproduces the official forward.

The yardstick is `tests/official_jit.py`, an independent functional reading of the official code
(it imports nothing from sla2cli). Fixtures are written in the official on-disk layouts with every
parameter non-zero and with distinct weights per entry, so picking the wrong entry, a wrong RoPE
convention or a wrong in-context start all fail by orders of magnitude more than the tolerance.
"""

from __future__ import annotations

import math
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import official_jit as O  # noqa: E402

import sla2cli  # noqa: E402

# float32 precision: max |diff| <= 1e-5 of the output's scale (observed fp32-vs-fp64 error ~4e-7)
RTOL = 1e-5

# name -> (builder kwargs, in_context_start)
CASES = {
    # official JiT layout, tiny: hidden 64, 4 heads of 16, depth 4, patch 4, 32 px, 8 in-context tokens
    "jit_tiny": (dict(hidden=64, depth=4, heads=4, patch=4, img_size=32, num_classes=10,
                      bottleneck_dim=16, in_context_len=8), 2),
    # odd shapes: head_dim 36 (RoPE over 9 frequencies per axis), grid 13 (where arange(n)/n*n is
    # not exact in float32), 5 in-context tokens, start 1
    "jit_odd": (dict(hidden=72, depth=3, heads=2, patch=2, img_size=26, num_classes=7,
                     bottleneck_dim=12, in_context_len=5), 1),
    # official JiT with in_context_len=0 (a valid constructor argument): no in_context_posemb
    "jit_no_ctx": (dict(hidden=32, depth=2, heads=2, patch=4, img_size=16, num_classes=3,
                        bottleneck_dim=8, in_context_len=0), 1),
    # PixelGen layout (single conv with bias), tiny
    "pixelgen_tiny": (dict(hidden=64, depth=4, heads=4, patch=4, img_size=32, num_classes=10,
                           bottleneck_dim=None, in_context_len=8), 2),
    # PixelGen-XL-like head_dim 72 (2 heads of 72), grid 13
    "pixelgen_hd72": (dict(hidden=144, depth=3, heads=2, patch=2, img_size=26, num_classes=5,
                           bottleneck_dim=None, in_context_len=6), 1),
}


def _inputs(kw, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, kw["img_size"], kw["img_size"], generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.randint(0, kw["num_classes"], (batch,), generator=g)
    y[-1] = kw["num_classes"]  # the null (CFG) class
    return x, t, y


def _state_dict(name, seed=0):
    kw, start = CASES[name]
    return O.random_official_state_dict(**kw, seed=seed), kw, start


def _max_err(got, ref):
    return (got - ref).abs().max().item()


def _assert_f32_close(got, ref, what=""):
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert got.dtype == torch.float32, f"{what}: dtype {got.dtype}"
    scale = max(ref.abs().max().item(), 1.0)
    err = _max_err(got, ref)
    assert err <= RTOL * scale, f"{what}: max abs diff {err:.3e} > {RTOL:.0e} x scale {scale:.3g}"


def _run(model, x, t, y):
    model.eval()
    with torch.no_grad():
        return model(x, t, y)


# --------------------------------------------------------------------------------------------
# (a) the reference itself
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_reference_shape_finite_batch_independent_and_stable(name):
    sd, kw, start = _state_dict(name)
    O.assert_all_nonzero(sd)
    x, t, y = _inputs(kw)
    out = O.official_forward(sd, x, t, y, in_context_start=start)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.std() > 0.1  # a live output, not a collapsed one
    # each sample is computed independently of the others
    one = O.official_forward(sd, x[1:2], t[1:2], y[1:2], in_context_start=start)
    _assert_f32_close(one, out[1:2], "batch independence")
    # float32 evaluation is within the tolerance of a float64 evaluation: the tolerance is meaningful
    sd64 = {k: v.double() for k, v in sd.items()}
    out64 = O.official_forward(sd64, x.double(), t.double(), y, in_context_start=start)
    assert _max_err(out, out64.float()) <= 0.1 * RTOL * max(out64.abs().max().item(), 1.0)


@pytest.mark.parametrize("name", ["jit_tiny", "pixelgen_hd72"])
def test_fixtures_discriminate_the_mistakes_that_matter(name):
    sd, kw, start = _state_dict(name)
    x, t, y = _inputs(kw)
    ref = O.official_forward(sd, x, t, y, in_context_start=start)
    scale = max(ref.abs().max().item(), 1.0)
    wrong = {
        "in_context_start - 1": O.official_forward(sd, x, t, y, in_context_start=start - 1),
        "in_context_start + 1": O.official_forward(sd, x, t, y, in_context_start=start + 1),
        "half-split RoPE pairs": O.official_forward(sd, x, t, y, in_context_start=start, _rope_pairing="split"),
        "no RoPE": O.official_forward(sd, x, t, y, in_context_start=start, _rope_pairing="none"),
        "other weights entry": O.official_forward(O.perturbed(sd, 99), x, t, y, in_context_start=start),
    }
    for what, out in wrong.items():
        assert _max_err(out, ref) > 100 * RTOL * scale, f"fixture cannot see: {what}"


def test_reference_rope_tables_match_closed_form():
    head_dim, grid, prefix = 36, 13, 5
    cos, sin = O.rope_tables(head_dim, grid, prefix)
    assert cos.shape == sin.shape == (prefix + grid * grid, head_dim)
    assert torch.equal(cos[:prefix], torch.ones(prefix, head_dim))
    assert torch.equal(sin[:prefix], torch.zeros(prefix, head_dim))
    half = head_dim // 2  # first half rotates with the row index, second half with the column
    inv = [10000 ** (-(2 * i) / half) for i in range(half // 2)]
    for r, c in [(0, 0), (0, 5), (7, 0), (12, 12), (3, 11)]:
        row = cos[prefix + r * grid + c]
        for j in range(head_dim):
            pos, jj = (r, j) if j < half else (c, j - half)
            assert math.isclose(row[j].item(), math.cos(pos * inv[jj // 2]), abs_tol=2e-6)


def test_reference_pos_embed_matches_closed_form():
    D, grid = 16, 5
    pe = O.official_sincos_pos_embed(D, grid)[0]
    q = D // 4  # [sin(w), cos(w), sin(h), cos(h)] with w the column index, each D/4 wide
    omega = [1 / 10000 ** (i / q) for i in range(q)]
    for r, c in [(0, 0), (1, 3), (4, 2)]:
        v = pe[r * grid + c]
        for i in range(q):
            assert math.isclose(v[i].item(), math.sin(c * omega[i]), abs_tol=1e-6)
            assert math.isclose(v[q + i].item(), math.cos(c * omega[i]), abs_tol=1e-6)
            assert math.isclose(v[2 * q + i].item(), math.sin(r * omega[i]), abs_tol=1e-6)
            assert math.isclose(v[3 * q + i].item(), math.cos(r * omega[i]), abs_tol=1e-6)


# --------------------------------------------------------------------------------------------
# (b) sla2cli.load_model against the reference
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """name -> (path, entries, kw, start), each checkpoint written once in its official layout."""
    root = tmp_path_factory.mktemp("official")
    out = {}
    for name in CASES:
        sd, kw, start = _state_dict(name, seed=len(out) + 10)
        if kw["bottleneck_dim"] is None:
            path = root / f"{name}.ckpt"
            entries = O.write_pixelgen_ckpt(path, sd)
        else:
            path = root / f"{name}.pth"
            args = O.official_args(model="JiT-T/4", img_size=kw["img_size"], class_num=kw["num_classes"])
            entries = O.write_official_pth(path, sd, args)
        out[name] = (path, entries, kw, start)
    return out


def _check(files, name, weights, expect_entry):
    path, entries, kw, start = files[name]
    model, _info = sla2cli.load_model(str(path), weights=weights, in_context_start=start, device="cpu")
    x, t, y = _inputs(kw)
    got = _run(model, x, t, y)
    ref = O.official_forward(entries[expect_entry], x, t, y, in_context_start=start)
    _assert_f32_close(got, ref, f"{name} weights={weights}")
    # and it is unmistakably that entry, not another one in the file
    for other, sd in entries.items():
        if other != expect_entry:
            alt = O.official_forward(sd, x, t, y, in_context_start=start)
            assert _max_err(got, alt) > 100 * RTOL * max(alt.abs().max().item(), 1.0), \
                f"{name}: output also matches {other}"
    return model, entries[expect_entry]


@pytest.mark.parametrize("weights,expect", [("auto", "model_ema1"), ("model", "model"),
                                            ("model_ema1", "model_ema1"), ("model_ema2", "model_ema2")])
def test_official_pth_matches_reference(files, weights, expect):
    _check(files, "jit_tiny", weights, expect)


@pytest.mark.parametrize("weights,expect", [("auto", "ema_denoiser"), ("denoiser", "denoiser"),
                                            ("ema_denoiser", "ema_denoiser")])
def test_pixelgen_ckpt_matches_reference(files, weights, expect):
    _check(files, "pixelgen_tiny", weights, expect)


@pytest.mark.parametrize("name", ["jit_odd", "jit_no_ctx", "pixelgen_hd72"])
def test_odd_shapes_match_reference(files, name):
    expect = "ema_denoiser" if CASES[name][0]["bottleneck_dim"] is None else "model_ema1"
    _check(files, name, "auto", expect)


@pytest.mark.parametrize("name,weights", [("jit_tiny", "model_ema2"), ("pixelgen_hd72", "denoiser")])
def test_loaded_state_dict_is_the_official_one_bit_for_bit(files, name, weights):
    """Same keys, same shapes, same values as the entry in the file (official layout, no extras)."""
    path, entries, _kw, start = files[name]
    model, _ = sla2cli.load_model(str(path), weights=weights, in_context_start=start, device="cpu")
    got = model.state_dict()
    want = entries[weights]
    assert set(got) == set(want), (f"missing {sorted(set(want) - set(got))[:5]}, "
                                   f"extra {sorted(set(got) - set(want))[:5]}")
    for k, v in want.items():
        assert got[k].shape == v.shape, k
        assert torch.equal(got[k].float(), v), k


def test_tiny_model_without_in_context_start_is_refused(files):
    path, _entries, _kw, _start = files["jit_tiny"]
    with pytest.raises(Exception, match=r"(?i)in.context.start"):
        sla2cli.load_model(str(path), weights="auto", device="cpu")
