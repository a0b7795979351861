"""The Triton SLA2 backend against the PyTorch reference, on the CPU through Triton's interpreter.

Small shapes (N=150: every block size leaves a partial last block) cover each head dim, block size,
dtype, layout and feature map the kernels specialise on.
"""

import pytest
import torch

from sla2cli.kernels import BACKEND
from sla2cli.kernels.function import linear_stats, lowbit_problem, route_pooled, sla2_triton, sums_dtype, unkept_sums
from sla2cli.sla2 import backends
from sla2cli.sla2.reference import sla2_reference
from sla2cli.sla2.routing import num_blocks, route

N = 150
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def make_qkv(B, H, D, dtype, layout, seed=0):
    """Fresh random q, k, v; `jit` gives the permuted views of one B×N×3×H×D tensor that JiT passes."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "jit":
        qkv = torch.randn(B, N, 3, H, D, generator=gen).to(dtype)
        return [t.transpose(1, 2) for t in qkv.unbind(2)]
    return [torch.randn(B, H, N, D, generator=gen).to(dtype) for _ in range(3)]


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def projections(D, seed=1):
    gen = torch.Generator().manual_seed(seed)
    eye = torch.eye(D)
    return eye + 0.2 * torch.randn(D, D, generator=gen), eye + 0.2 * torch.randn(D, D, generator=gen)


# (D, block_q, block_k, dtype, layout, feature_map, topk, alpha per query block)
CASES = [
    (64, 64, 64, torch.float32, "bhnd", "softmax", 0.4, False),
    (64, 128, 64, torch.bfloat16, "jit", "softmax", 0.4, False),
    (64, 128, 128, torch.float16, "bhnd", "softmax", 0.6, True),
    (72, 64, 64, torch.float32, "jit", "elu", 0.3, False),
    (72, 128, 64, torch.bfloat16, "bhnd", "softmax", 0.4, True),
    (80, 64, 64, torch.float16, "jit", "softmax", 0.4, False),
    (80, 128, 128, torch.float32, "bhnd", "relu", 0.6, False),
    (80, 128, 64, torch.bfloat16, "jit", "elu", 0.3, False),
    (128, 64, 64, torch.bfloat16, "bhnd", "softmax", 0.4, False),
    (128, 128, 64, torch.float32, "jit", "softmax", 0.3, True),
    (128, 128, 128, torch.bfloat16, "jit", "softmax", 1.0, False),
    (80, 64, 64, torch.float32, "bhnd", "softmax", 1.0, False),
    (64, 32, 16, torch.bfloat16, "jit", "softmax", 0.3, False),
]


@pytest.mark.parametrize("D,block_q,block_k,dtype,layout,feature_map,topk,alpha_per_block", CASES)
def test_forward_matches_reference(D, block_q, block_k, dtype, layout, feature_map, topk, alpha_per_block):
    B, H = 1, 2
    q, k, v = make_qkv(B, H, D, dtype, layout)
    alpha_shape = (H, num_blocks(N, block_q)) if alpha_per_block else (H,)
    alpha = torch.rand(alpha_shape, generator=torch.Generator().manual_seed(2))
    proj_q, proj_k = projections(D)
    routing = route(q, k, topk=topk, block_q=block_q, block_k=block_k, proj_q=proj_q, proj_k=proj_k)
    kwargs = dict(topk=topk, alpha=alpha, block_q=block_q, block_k=block_k, feature_map=feature_map, routing=routing)
    out = sla2_triton(q, k, v, **kwargs)
    ref = sla2_reference(q, k, v, **kwargs)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOLERANCE[dtype]


def learned_parts(H, D, rank, per_query, seed=11):
    gen = torch.Generator().manual_seed(seed)
    parts = {}
    if rank:
        parts = {name: torch.randn(H, D, rank, generator=gen) / D ** 0.5 for name in ("feature_q", "feature_k")}
    if per_query:
        parts["mix_scale"] = torch.rand(H, generator=gen) + 0.5
    return parts


# (D, block_q, block_k, dtype, layout, feature map, feature rank (0: none), α per query)
LEARNED_CASES = [
    (64, 16, 16, torch.float32, "jit", "softmax", 16, True),
    (64, 64, 32, torch.bfloat16, "bhnd", "softmax", 16, True),
    (64, 128, 64, torch.float32, "jit", "softmax", 16, False),
    (64, 64, 64, torch.float32, "bhnd", "softmax", 64, True),
    (80, 64, 64, torch.float16, "jit", "elu", 24, False),
    (72, 128, 64, torch.float32, "bhnd", "softmax", 0, True),
    (128, 64, 128, torch.bfloat16, "jit", "softmax", 32, True),
]


@pytest.mark.parametrize("D,block_q,block_k,dtype,layout,feature_map,rank,per_query", LEARNED_CASES)
def test_learned_feature_maps_and_per_query_alpha_match_reference(D, block_q, block_k, dtype, layout, feature_map,
                                                                  rank, per_query):
    """The forward of our extensions (φ(x·W) of rank R, α per query from the loop's log-sum-exp) against the
    reference; a partial last block everywhere."""
    H = 2
    q, k, v = make_qkv(1, H, D, dtype, layout, seed=12)
    parts = learned_parts(H, D, rank, per_query)
    alpha = torch.rand(H, generator=torch.Generator().manual_seed(13)) * 0.8 + 0.1
    kwargs = dict(topk=0.3, alpha=alpha, block_q=block_q, block_k=block_k, feature_map=feature_map, **parts)
    out = sla2_triton(q, k, v, **kwargs)
    ref = sla2_reference(q, k, v, **kwargs)
    assert out.dtype == q.dtype and torch.isfinite(out).all()
    assert rel_err(out, ref) < TOLERANCE[dtype]
    plain = sla2_reference(q, k, v, topk=0.3, alpha=alpha, block_q=block_q, block_k=block_k, feature_map=feature_map)
    assert rel_err(plain, ref) > 10 * TOLERANCE[dtype]  # the learned parts changed the output: they were used


# (D, block_q, block_k, dtype, layout, feature map, feature rank (0: none), α per query)
LEARNED_BACKWARD_CASES = [
    (64, 16, 16, torch.float32, "jit", "softmax", 16, True),
    (64, 64, 32, torch.float32, "bhnd", "softmax", 16, False),
    (72, 64, 64, torch.float32, "jit", "elu", 24, True),
    (64, 32, 64, torch.float32, "bhnd", "softmax", 0, True),
    (80, 64, 64, torch.float32, "jit", "softmax", 64, True),
    (64, 32, 32, torch.bfloat16, "jit", "softmax", 16, True),
]


@pytest.mark.parametrize("D,block_q,block_k,dtype,layout,feature_map,rank,per_query", LEARNED_BACKWARD_CASES)
def test_learned_parts_backward_matches_reference(D, block_q, block_k, dtype, layout, feature_map, rank, per_query):
    """Gradients of q, k, v, α, the feature maps W_q, W_k and the mix scale through the Triton backward."""
    H = 2
    q, k, v = (t.detach().requires_grad_() for t in make_qkv(1, H, D, dtype, layout, seed=15))
    parts = {n: t.requires_grad_() for n, t in learned_parts(H, D, rank, per_query, seed=16).items()}
    alpha = (torch.rand(H, generator=torch.Generator().manual_seed(17)) * 0.8 + 0.1).requires_grad_()
    routing = route(q, k, topk=0.3, block_q=block_q, block_k=block_k)
    kwargs = dict(topk=0.3, block_q=block_q, block_k=block_k, feature_map=feature_map, routing=routing)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(18)).to(dtype)
    inputs = [q, k, v, alpha, *parts.values()]
    mine = torch.autograd.grad(sla2_triton(q, k, v, alpha=alpha, **kwargs, **parts), inputs, grad)
    ref = torch.autograd.grad(sla2_reference(q, k, v, alpha=alpha, **kwargs, **parts), inputs, grad)
    for name, a, b in zip(["q", "k", "v", "alpha", *parts], mine, ref):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < (1e-4 if dtype == torch.float32 else 5e-2), name


def test_feature_maps_come_in_pairs():
    q, k, v = make_qkv(1, 2, 64, torch.float32, "bhnd")
    one = learned_parts(2, 64, 16, False)["feature_q"]
    with pytest.raises(ValueError, match="together"):
        sla2_triton(q, k, v, topk=0.3, alpha=torch.tensor([0.5, 0.5]), block_q=64, block_k=64, feature_q=one)


def test_inference_runs_no_torch_product_between_the_launches(monkeypatch):
    """The learned feature maps (q·W_q, k·W_k) and the router's projections are applied inside the kernels: on
    the inference path no einsum or matmul runs (they cost an SLA2 layer of the showcase 42% of its time as
    torch ops: two copies of q and k and four products per call, bench/RESULTS.md session 9)."""
    H, D = 2, 64
    q, k, v = make_qkv(1, H, D, torch.bfloat16, "jit", seed=21)
    parts = learned_parts(H, D, 16, True, seed=22)
    proj_q, proj_k = projections(D, seed=23)
    kwargs = dict(topk=0.3, alpha=torch.tensor([0.3, 0.7]), block_q=32, block_k=32, proj_q=proj_q, proj_k=proj_k,
                  **parts)
    ref = sla2_reference(q, k, v, **kwargs)

    def refuse(*args, **kw):
        raise AssertionError("a torch product ran on SLA2's inference path")

    for owner, name in ((torch, "einsum"), (torch, "matmul"), (torch, "bmm"), (torch.Tensor, "__matmul__")):
        monkeypatch.setattr(owner, name, refuse)
    with torch.no_grad():
        out = sla2_triton(q, k, v, **kwargs)
    monkeypatch.undo()
    assert rel_err(out, ref) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("layout", ["bhnd", "jit"])
@pytest.mark.parametrize("D,block_q,block_k", [(64, 64, 64), (80, 128, 64), (72, 64, 128)])
def test_router_matches_reference(D, block_q, block_k, layout):
    q, k, v = make_qkv(2, 2, D, torch.float32, layout, seed=3)
    proj_q, proj_k = projections(D, seed=4)
    _, k_bar, _ = linear_stats(k, v, block_k, "softmax")
    for pq, pk in [(None, None), (proj_q, proj_k), (proj_q, None), (None, proj_k)]:
        mine = route_pooled(q, k_bar, topk=0.3, block_q=block_q, block_k=block_k, proj_q=pq, proj_k=pk)
        ref = route(q, k, topk=0.3, block_q=block_q, block_k=block_k, proj_q=pq, proj_k=pk)
        assert torch.equal(mine.indices.long(), ref.indices)
        assert mine.mask.dtype == torch.bool and torch.equal(mine.mask, ref.mask)


def test_own_router_end_to_end_matches_reference():
    q, k, v = make_qkv(1, 2, 64, torch.float32, "jit", seed=5)
    proj_q, proj_k = projections(64, seed=6)
    kwargs = dict(topk=0.3, alpha=torch.tensor([0.7, 0.9]), block_q=64, block_k=64, proj_q=proj_q, proj_k=proj_k)
    assert rel_err(sla2_triton(q, k, v, **kwargs), sla2_reference(q, k, v, **kwargs)) < 1e-5


def test_all_blocks_kept_is_exact_softmax_attention():
    q, k, v = make_qkv(1, 2, 80, torch.float32, "bhnd", seed=7)
    out = sla2_triton(q, k, v, topk=1.0, alpha=torch.tensor([0.2, 0.5]), block_q=128, block_k=64)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert rel_err(out, dense) < 1e-5


# (D, block_q, block_k, dtype, layout, feature_map, topk, alpha per query block)
BACKWARD_CASES = [
    (72, 64, 64, torch.float32, "bhnd", "softmax", 0.4, False),
    (64, 128, 64, torch.float32, "jit", "elu", 0.3, True),
    (80, 64, 128, torch.float32, "bhnd", "relu", 0.6, False),
    (128, 128, 128, torch.bfloat16, "jit", "softmax", 0.6, False),
    (80, 128, 64, torch.float16, "bhnd", "softmax", 0.4, False),
    (64, 64, 64, torch.float32, "jit", "softmax", 1.0, False),
    (64, 16, 32, torch.float32, "jit", "softmax", 0.3, False),
]


@pytest.mark.parametrize("D,block_q,block_k,dtype,layout,feature_map,topk,alpha_per_block", BACKWARD_CASES)
def test_backward_matches_reference(D, block_q, block_k, dtype, layout, feature_map, topk, alpha_per_block):
    H = 2
    q, k, v = (t.detach().requires_grad_() for t in make_qkv(1, H, D, dtype, layout, seed=8))
    alpha_shape = (H, num_blocks(N, block_q)) if alpha_per_block else (H,)
    alpha = torch.rand(alpha_shape, generator=torch.Generator().manual_seed(9)).requires_grad_()
    proj_q, proj_k = projections(D, seed=9)
    routing = route(q, k, topk=topk, block_q=block_q, block_k=block_k, proj_q=proj_q, proj_k=proj_k)
    kwargs = dict(topk=topk, alpha=alpha, block_q=block_q, block_k=block_k, feature_map=feature_map, routing=routing)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(10)).to(dtype)
    wanted = (q, k, v, alpha) if topk < 1.0 else (q, k, v)  # with every block kept, α is unused
    mine = torch.autograd.grad(sla2_triton(q, k, v, **kwargs), wanted, grad)
    ref = torch.autograd.grad(sla2_reference(q, k, v, **kwargs), wanted, grad)
    for name, a, b in zip("q k v alpha".split(), mine, ref):
        assert a.shape == b.shape, name
        assert rel_err(a, b) < 5 * TOLERANCE[dtype], name


def test_deterministic_run_to_run():
    q, k, v = make_qkv(1, 2, 64, torch.bfloat16, "jit", seed=11)
    kwargs = dict(topk=0.4, alpha=torch.tensor([0.7, 0.9]), block_q=64, block_k=64)
    assert torch.equal(sla2_triton(q, k, v, **kwargs), sla2_triton(q, k, v, **kwargs))


def test_qat_with_blocks_too_small_for_the_low_bit_products_is_served_by_the_reference():
    q, k, v = make_qkv(1, 2, 64, torch.float32, "bhnd", seed=12)
    kwargs = dict(topk=0.4, alpha=torch.tensor([0.7, 0.9]), qat=True, block_q=32, block_k=16)
    assert torch.equal(sla2_triton(q, k, v, **kwargs), sla2_reference(q, k, v, **kwargs))
    assert BACKEND.qat_problem is lowbit_problem and lowbit_problem(q, 32, 64) is None
    assert "at least 16 queries and 32 keys, not 32/16" in lowbit_problem(q, 32, 16)


def test_registered_as_triton_backend_for_cuda_only():
    fn = backends.get("triton").fn
    assert fn is sla2_triton
    assert BACKEND.problem(torch.zeros(1, 1, 4, 64), feature_map="softmax", qat=False, return_stats=False)


# (D, feature rank (0: none), block_q, block_k, dtype): more blocks than one tile of UNKEPT_TILES each way
UNKEPT_CASES = [(64, 0, 16, 16, torch.bfloat16), (80, 0, 32, 16, torch.float32), (128, 0, 64, 32, torch.float16),
                (64, 16, 16, 32, torch.float32)]


@pytest.mark.parametrize("D,rank,block_q,block_k,dtype", UNKEPT_CASES)
def test_unkept_sums_equal_the_masked_sums_of_the_stored_statistics(D, rank, block_q, block_k, dtype, monkeypatch):
    """Per query block Σ_{j not kept} s_j, and per key block Σ_{i that did not keep it} ds_i (the transposed
    mask), against torch on the same stored values; small tiles so rows, columns and blocks span several."""
    import sla2cli.kernels.function as function

    monkeypatch.setattr(function, "UNKEPT_TILES", (16, 64, 16))
    q, k, v = make_qkv(2, 2, D, dtype, "jit", seed=19)
    fk = learned_parts(2, D, rank, False)["feature_k"] if rank else None
    stats, _, _ = linear_stats(k, v, block_k, "softmax", fk)
    R = rank or D
    assert stats.shape == (4, num_blocks(N, block_k), R * D + R) and stats.dtype == dtype
    routing = route(q, k, topk=0.3, block_q=block_q, block_k=block_k)
    unkept = (~routing.mask).flatten(0, 1).double()
    want = unkept @ stats.double()
    got = unkept_sums(stats, routing.mask)
    assert got.dtype == sums_dtype(dtype)
    tol = 2 ** -8 if got.dtype == torch.bfloat16 else 1e-6  # summed in fp32, rounded once to its dtype
    assert torch.allclose(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())
    per_query = torch.randn(4, num_blocks(N, block_q), R * D + R, generator=torch.Generator().manual_seed(3))
    want = unkept.transpose(1, 2) @ per_query.double()
    got = unkept_sums(per_query, routing.mask, per_key_block=True)
    assert got.shape == want.shape and torch.allclose(got.double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("D,block_q,block_k,dtype,alpha_per_block", [
    (64, 128, 64, torch.float32, False), (72, 64, 32, torch.bfloat16, True), (64, 32, 16, torch.float32, True)])
def test_inference_path_and_backward_match_reference(D, block_q, block_k, dtype, alpha_per_block):
    """The inference path (no autograd Function) and the backward, on one given routing."""
    H = 2
    q, k, v = (t.detach().requires_grad_() for t in make_qkv(1, H, D, dtype, "bhnd", seed=20))
    alpha_shape = (H, num_blocks(N, block_q)) if alpha_per_block else (H,)
    alpha = torch.rand(alpha_shape, generator=torch.Generator().manual_seed(21)).requires_grad_()
    routing = route(q, k, topk=0.3, block_q=block_q, block_k=block_k)
    kwargs = dict(topk=0.3, alpha=alpha, block_q=block_q, block_k=block_k, routing=routing)
    with torch.no_grad():  # the inference path
        out = sla2_triton(q, k, v, **kwargs)
    ref = sla2_reference(q, k, v, **kwargs)
    assert rel_err(out, ref) < TOLERANCE[dtype]
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(22)).to(dtype)
    mine = torch.autograd.grad(sla2_triton(q, k, v, **kwargs), (q, k, v, alpha), grad)
    theirs = torch.autograd.grad(ref, (q, k, v, alpha), grad)
    for name, a, b in zip("q k v alpha".split(), mine, theirs):
        assert rel_err(a, b) < 5 * TOLERANCE[dtype], name
