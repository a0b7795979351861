"""FLOPs counted by `sla2cli.profiling`: dense attention, the SLA2 custom op's formula, torch vs fvcore."""

import pytest
import torch
from conftest import TINY, nonzero_model
from torch.utils.flop_counter import FlopCounterMode

from sla2cli.models.jit import JiT, architecture_config
from sla2cli.profiling import model_flops, sla2_flops, through_custom_op
from sla2cli.profiling.flops import count_fvcore, count_torch, meta_inputs
from sla2cli.sla2 import SLA2Attention, SLA2Config, apply_sla2, sla2_attention


def meta_preset(name: str, **overrides) -> JiT:
    with torch.device("meta"):
        return JiT(architecture_config(name, **overrides))


@pytest.mark.parametrize("name,resolution", [("JiT-B/16", 256), ("JiT-L/16", 256), ("JiT-H/16", 256),
                                             ("PixelGen-XL", 256), ("JiT-B/32", 512)])
def test_dense_attention_flops_are_4BHN2D(name, resolution):
    model = meta_preset(name)
    c = model.config
    B = 2
    flops = model_flops(model, batch_size=B, resolution=resolution)
    for i in range(c.depth):
        N = 256 if i < c.in_context_start else 288
        assert c.tokens(i, resolution) == N
        assert flops.dense_attention[i] == 4 * B * c.num_heads * N * N * c.head_dim
    assert flops.attention == flops.dense_attention and flops.total == flops.dense_total


def kept_block_formula(B, H, N, D, kk, n, block=64, reference=True):
    """The issue's kept-block count written out: router, sparse over kept blocks, linear branch."""
    projections = 2 * B * H * 2 * n * D * D if reference else 2 * H * D ** 3 + 2 * B * H * n * D * D  # W_kᵀW_q
    router = 2 * B * H * n * n * D + projections
    sparse = 2 * (2 * B * H * (n * block) * (kk * block) * D)
    if kk == n:
        return router + sparse
    linear = 2 * B * H * (n * block) * D * D + 2 * B * H * (n * block) * D * (D + 1)
    gather = 2 * B * H * n * n * D * (D + 1)  # the unkept blocks' statistics, one masked product
    return router + sparse + linear + gather


def test_sla2_flops_equal_the_kept_block_formula():
    model = meta_preset("JiT-B/16")
    c = model.config
    apply_sla2(model, f"{c.in_context_start}-{c.depth - 1}", SLA2Config(topk=0.05))
    B = 3
    flops = model_flops(model, batch_size=B, resolution=256)
    expected = kept_block_formula(B, 12, 288, 64, kk=1, n=5)  # 288 tokens: 5 blocks of 64, keep 1
    for i in range(c.depth):
        assert flops.attention[i] == (expected if i >= c.in_context_start else flops.dense_attention[i])
    assert flops.total == flops.dense_total - sum(flops.dense_attention[4:]) + 8 * expected
    assert flops.rest_of_block[5] == flops.rest_of_block[4]  # the projections and MLP do not change

    # every block kept: no linear branch; at 1024 px (4128 tokens, 65 blocks) topk 0.05 keeps 3
    assert sla2_flops(1, 12, 288, 64, topk=1.0)["total"] == kept_block_formula(1, 12, 288, 64, kk=5, n=5)
    assert sla2_flops(1, 12, 4128, 64, topk=0.05)["total"] == kept_block_formula(1, 12, 4128, 64, kk=3, n=65)
    # the Triton kernels fold the router's projections into one D×D matrix applied to the key means only
    assert sla2_flops(1, 12, 4128, 64, topk=0.05, backend="triton")["total"] == \
        kept_block_formula(1, 12, 4128, 64, kk=3, n=65, reference=False)


def test_custom_op_matches_sla2_attention_and_keeps_training_differentiable():
    torch.manual_seed(0)
    core = SLA2Attention(2, 16, SLA2Config(topk=0.3, block_q=16, block_k=16))
    q, k, v = (torch.randn(2, 2, 70, 16) for _ in range(3))
    direct = sla2_attention(q, k, v, topk=0.3, alpha=core.alpha, block_q=16, block_k=16, proj_q=core.proj_q,
                            proj_k=core.proj_k, backend="torch")
    with through_custom_op():
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            through_op = core(q, k, v)
        assert torch.equal(through_op, direct)
        assert counter.get_total_flops() == sla2_flops(2, 2, 70, 16, topk=0.3, block_q=16, block_k=16)["total"]
        out = core(q.requires_grad_(), k, v)  # with gradients: the differentiable path, not the op
        out.sum().backward()
    assert q.grad is not None and core.alpha_logit.grad is not None


def test_fvcore_and_torch_counters_agree_on_dense_and_converted_models():
    model = meta_preset("JiT-B/16")
    apply_sla2(model, "4-11", SLA2Config(topk=0.05))
    names = [f"blocks.{i}" for i in range(12)] + [f"blocks.{i}.attn.core" for i in range(12)]
    a = model_flops(model, batch_size=2, resolution=256, counter="torch")
    b = model_flops(model, batch_size=2, resolution=256, counter="fvcore")
    assert a == model_flops(model, batch_size=2, resolution=256, counter="torch")
    assert (a.total, a.dense_total, a.attention, a.dense_attention, a.rest_of_block) == \
        (b.total, b.dense_total, b.attention, b.dense_attention, b.rest_of_block)
    # on real CPU tensors too (no meta-device patch linear), per module
    tiny = nonzero_model(TINY)
    apply_sla2(tiny, "2-3", SLA2Config(topk=0.5))
    x = torch.randn(1, 3, 32, 32)
    inputs = (x, torch.rand(1), torch.zeros(1, dtype=torch.long))
    t, f = count_torch(tiny, inputs, names[:4] + names[12:16]), count_fvcore(tiny, inputs, names[:4] + names[12:16])
    assert t.total == f.total and t.modules == f.modules and t.total > 0


def test_meta_inputs_shapes():
    x, t, y = meta_inputs(TINY, 3, 48)
    assert x.shape == (3, 3, 48, 48) and t.shape == (3,) and y.dtype == torch.long
