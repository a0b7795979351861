"""QAT's low-bit sparse branch (INT8 Q·Kᵀ, FP8 P·V) against the fake-quant reference, through the interpreter.

The reference (`sla2_reference(..., qat=True)`) is the oracle: the kernels match it up to accumulation
order, for every head dim, dtype, layout and block setting they specialise on.
"""

import pytest
import torch
import triton
import triton.language as tl

from sla2cli.kernels.function import linear_stats, quantise_kv, sla2_triton
from sla2cli.kernels.sla2_triton import _int8
from sla2cli.sla2 import quant
from sla2cli.sla2.reference import sla2_reference

from .test_sla2_triton import TOLERANCE, N, learned_parts, make_qkv, rel_err


@triton.jit
def _round_kernel(x_ptr, i8_ptr, f8_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(i8_ptr + offs, _int8(x), mask=offs < n)
    tl.store(f8_ptr + offs, x.to(tl.float8e4nv).to(tl.float32), mask=offs < n)


def test_rounding_matches_torch():
    """INT8: half to even, clamped; FP8 e4m3: nearest even with the carry into the exponent (31.2 → 32) and
    the subnormals (multiples of 2⁻⁹), for either sign, as torch rounds them (the interpreter's own fp8 cast
    is patched to torch's by conftest; on a GPU the hardware's round-to-nearest cast does it)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.tensor([0.5, 1.5, 2.5, -2.5, 126.5, 127.5, -200.0, 31.2, 31.9, 447.9, 448.0, 0.0,
                                 2.0 ** -10, 3 * 2.0 ** -10, -2.0 ** -7 * 1.0625, 0.0151, 0.0157]),
                   torch.rand(4000, generator=gen) * 448, torch.randn(4000, generator=gen),
                   torch.rand(2000, generator=gen) ** 8 * 0.02])
    i8 = torch.empty(len(x), dtype=torch.int8)
    f8 = torch.empty(len(x))
    _round_kernel[(1,)](x, i8, f8, len(x), BLOCK=triton.next_power_of_2(len(x)))
    assert torch.equal(i8, x.round().clamp(-127, 127).to(torch.int8))
    inside = x.abs() <= 448
    assert torch.equal(f8[inside], x[inside].to(torch.float8_e4m3fn).float())


@pytest.mark.parametrize("D,block_k,dtype,layout", [(64, 64, torch.bfloat16, "jit"), (72, 32, torch.float32, "bhnd"),
                                                    (128, 128, torch.float16, "jit")])
def test_quantised_k_and_v_are_the_references(D, block_k, dtype, layout):
    """K − mean in INT8 per key block and V in FP8 per channel: dequantised, exactly `sla2.quant`'s values."""
    _, k, v = make_qkv(1, 2, D, dtype, layout, seed=4)
    low = quantise_kv(k, v, block_k)
    kf, vf = k.float(), v.float()
    n_k = low.k_scale.shape[-1]
    padded = torch.nn.functional.pad(kf - kf.mean(-2, keepdim=True), (0, 0, 0, n_k * block_k - N))
    expect_k = quant.int8_per_block(padded.unflatten(-2, (n_k, block_k)), block_dims=(-2, -1)).flatten(-3, -2)
    mine_k = (low.k[:, :, :D].float().unflatten(1, (n_k, block_k)) * low.k_scale[..., None, None]).flatten(1, 2)
    torch.testing.assert_close(mine_k.view(1, 2, -1, D), expect_k, rtol=1e-6, atol=1e-6)
    mine_v = low.v_t[:, :D, :N].float().transpose(1, 2) * low.v_scale[:, None, :]
    torch.testing.assert_close(mine_v.view(1, 2, N, D), quant.fp8_e4m3(vf, reduce_dims=(-2,)), rtol=0, atol=0)
    assert not low.k[:, N:].any() and not low.v_t[:, :, N:].float().any() and not low.k[:, :, D:].any()


@pytest.mark.parametrize("D,block_k,dtype,layout", [(64, 64, torch.bfloat16, "jit"), (72, 32, torch.float32, "bhnd"),
                                                    (128, 128, torch.float16, "jit")])
def test_scales_from_the_block_statistics_are_the_passes_over_k_and_v(D, block_k, dtype, layout):
    """`linear_stats(v_max=True)`'s block maxima give V's scales exactly, its block means K's mean up to
    summation order: the same quantised K and V as the torch passes over K and V."""
    _, k, v = make_qkv(1, 2, D, dtype, layout, seed=4)
    _, k_bar, v_max = linear_stats(k, v, block_k, "softmax", v_max=True)
    n_k = k_bar.shape[1]
    blocks = torch.nn.functional.pad(v.float().abs(), (0, 0, 0, n_k * block_k - N)).unflatten(-2, (n_k, block_k))
    assert torch.equal(v_max.view(1, 2, n_k, D), blocks.amax(-2))
    assert linear_stats(k, v, block_k, "softmax")[2] is None
    mine, passes = quantise_kv(k, v, block_k, k_bar, v_max), quantise_kv(k, v, block_k)
    assert torch.equal(mine.v_scale, passes.v_scale)
    assert torch.equal(mine.v_t.float(), passes.v_t.float())
    torch.testing.assert_close(mine.k_scale, passes.k_scale, rtol=1e-6, atol=0)
    steps = (mine.k.int() - passes.k.int()).abs()
    assert steps.max() <= 1 and steps.float().mean() < 1e-3  # a rounding tie decided by the mean's last bit


# (D, block_q, block_k, dtype, layout, topk, feature rank, α per query)
CASES = [
    (64, 64, 64, torch.bfloat16, "jit", 0.4, 0, False),
    (64, 32, 32, torch.float32, "bhnd", 0.3, 0, False),
    (72, 64, 32, torch.float16, "jit", 0.4, 0, True),
    (80, 128, 64, torch.bfloat16, "bhnd", 0.3, 16, True),
    (128, 64, 64, torch.float32, "jit", 0.6, 0, False),
    (128, 128, 128, torch.bfloat16, "jit", 1.0, 0, False),
]


@pytest.mark.parametrize("D,block_q,block_k,dtype,layout,topk,rank,per_query", CASES)
def test_low_bit_forward_matches_the_fake_quant_reference(D, block_q, block_k, dtype, layout, topk, rank, per_query):
    q, k, v = make_qkv(1, 2, D, dtype, layout, seed=5)
    kwargs = dict(topk=topk, alpha=torch.tensor([0.6, 0.8]), block_q=block_q, block_k=block_k, qat=True,
                  **learned_parts(2, D, rank, per_query))
    mine = sla2_triton(q, k, v, **kwargs)
    ref = sla2_reference(q, k, v, **kwargs)
    assert rel_err(mine, ref) < TOLERANCE[dtype]
    exact = sla2_reference(q, k, v, **{**kwargs, "qat": False})
    assert 1e-3 < rel_err(mine, exact) < 0.06  # the quantisation shows, a little
    cosine = torch.nn.functional.cosine_similarity(mine.float().flatten(), exact.float().flatten(), 0)
    assert cosine > 0.998


def test_qat_training_takes_the_low_bit_value_and_the_full_precision_gradients():
    """The forward's value is the low-bit branch's; the gradients are those of the bf16 kernels on the
    unquantised inputs (the paper's QAT), as the reference computes them."""
    q, k, v = (t.detach().requires_grad_() for t in make_qkv(1, 2, 64, torch.float32, "jit", seed=6))
    alpha = torch.tensor([0.6, 0.8], requires_grad=True)
    kwargs = dict(topk=0.4, block_q=64, block_k=64)
    grad = torch.randn(1, 2, N, 64, generator=torch.Generator().manual_seed(7))
    inputs = (q, k, v, alpha)
    out = sla2_triton(q, k, v, alpha=alpha, qat=True, **kwargs)
    with torch.no_grad():  # exact + (low − exact): the low-bit value up to one rounding
        torch.testing.assert_close(out, sla2_triton(q, k, v, alpha=alpha, qat=True, **kwargs), rtol=1e-6, atol=1e-7)
    mine = torch.autograd.grad(out, inputs, grad)
    exact = sla2_triton(q, k, v, alpha=alpha, **kwargs)
    for a, b in zip(mine, torch.autograd.grad(exact, inputs, grad)):
        torch.testing.assert_close(a, b)
    ref = sla2_reference(q, k, v, alpha=alpha, qat=True, **kwargs)
    assert rel_err(out, ref) < 1e-5
    for a, b in zip(mine, torch.autograd.grad(ref, inputs, grad)):
        assert rel_err(a, b) < 1e-4
