"""`sla2 stats`, `apply_sla2` on models from other codebases, and the model at other resolutions."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, nonzero_model, one_json
from torch import nn

from sla2cli import apply_sla2, remove_sla2
from sla2cli.models.jit import JiT
from sla2cli.sla2 import SLA2Attention, SLA2Config, sla2_attention, sla2_layers


def _converted_file(cli, official_pth, tmp_path, *extra):
    dst = tmp_path / "sla2.safetensors"
    code, _, err = cli("convert", official_pth, "-o", dst, "--layers", "2-3", "--topk", "0.25",
                       "--in-context-start", "2", *extra)
    assert code == 0, err
    return dst


def test_stats_lists_every_layer_with_alpha_and_router_drift(cli, official_pth, tmp_path):
    path = _converted_file(cli, official_pth, tmp_path, "--alpha-mode", "per_head_query_block")
    code, out, err = cli("stats", path, "--json")
    assert code == 0, err
    doc = one_json(out)
    rows = {r["layer"]: r for r in doc["per_layer"]}
    assert [rows[i]["converted"] for i in range(4)] == [False, False, True, True]
    r = rows[2]
    assert r["topk"] == 0.25 and r["block_q"] == 64 and r["feature_map"] == "softmax" and r["qat"] is False
    assert r["kept_blocks"] == 1 and r["key_blocks"] == 5  # 256 + 8 tokens = 5 blocks, floor(1.25 + .5) = 1
    assert len(r["alpha"]) == 2 and len(r["alpha"][0]) == 5 and len(r["alpha_per_head"]) == 2
    assert r["router_drift_q"] == 0.0 and r["router_drift_k"] == 0.0
    assert r["path"] == "torch"  # on the CPU: the reference; a QAT layer would also say which branch
    assert doc["provenance"]["source"] == official_pth.name


def test_router_drift_is_relative_frobenius_distance_to_identity(tmp_path):
    model = nonzero_model()
    apply_sla2(model, [3], SLA2Config(topk=0.5))
    core = model.blocks[3].attn.core
    with torch.no_grad():
        core.proj_q.add_(0.1 * torch.eye(32))
    from sla2cli.sla2.stats import describe_layers
    row = describe_layers(model)[3]
    assert row["router_drift_q"] == pytest.approx(0.1, rel=1e-5) and row["router_drift_k"] == 0.0


def test_stats_measure_reports_realised_behaviour(cli, official_pth, tmp_path):
    path = _converted_file(cli, official_pth, tmp_path)
    code, out, err = cli("stats", path, "--measure", "--batch-size", "2", "--t", "0.5", "--device", "cpu", "--json")
    assert code == 0, err
    rows = {r["layer"]: r for r in one_json(out)["per_layer"]}
    for i in (2, 3):
        assert rows[i]["kept_fraction"] == pytest.approx(1 / 5)
        assert 0.0 < rows[i]["captured_mass"] <= 1.0 and rows[i]["relative_error"] > 0
    assert "captured_mass" not in rows[0]


def test_stats_human_tables_and_dense_models(cli, official_pth, tmp_path):
    code, out, _ = cli("stats", official_pth, "--in-context-start", "2")
    assert code == 0 and "no layer is converted" in out
    code, out, _ = cli("stats", _converted_file(cli, official_pth, tmp_path), "--measure", "--batch-size", "1",
                       "--device", "cpu")
    assert code == 0 and "captured mass" in out and "sla2" in out


@pytest.mark.parametrize("args,message", [(("--batch-size", "0"), "--batch-size"), (("--t", "1.0"), "--t must be"),
                                          (("--dtype", "fp64"), "--dtype"), (("--resolution", "33"), "--resolution")])
def test_stats_bad_options(cli, official_pth, tmp_path, args, message):
    code, out, err = cli("stats", _converted_file(cli, official_pth, tmp_path), "--measure", *args)
    assert code == 2 and message in err and out == ""


class ForeignAttention(nn.Module):
    """Shaped like the official JiT attention: its own forward calls SDPA directly."""

    def __init__(self, dim, heads):
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(dim // heads)
        self.k_norm = nn.RMSNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(rope(self.q_norm(q)), rope(self.k_norm(k)), v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class ForeignBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.attn = ForeignAttention(dim, heads)

    def forward(self, x):
        return x + self.attn(x, rope=lambda t: t * 1.0)


class ForeignModel(nn.Module):
    def __init__(self, dim=32, heads=2, depth=3):
        super().__init__()
        self.blocks = nn.ModuleList(ForeignBlock(dim, heads) for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_apply_sla2_keyword_settings_still_work_with_a_deprecation_warning():
    model, old = nonzero_model(), nonzero_model()
    apply_sla2(model, [2, 3], SLA2Config(topk=0.3, block_q=32))
    with pytest.warns(DeprecationWarning, match="SLA2Config"):
        apply_sla2(old, [2, 3], topk=0.3, block_q=32)
    assert all(old.blocks[i].attn.core.config == model.blocks[i].attn.core.config for i in (2, 3))


def test_apply_sla2_works_on_another_codebases_model_and_keeps_its_keys():
    torch.manual_seed(0)
    model = ForeignModel()
    x = torch.randn(2, 100, 32)
    dense_out = model(x)
    keys = set(model.state_dict())
    apply_sla2(model, [1, 2], SLA2Config(topk=1.0, block_q=32, block_k=32))
    assert set(sla2_layers(model)) == {1, 2}
    assert set(model.state_dict()) - keys == {f"blocks.{i}.attn.core.{p}" for i in (1, 2)
                                              for p in ("proj_q", "proj_k", "alpha_logit")}
    assert ((model(x) - dense_out).norm() / dense_out.norm()) < 1e-6
    apply_sla2(model, [1, 2], SLA2Config(topk=0.25, block_q=32, block_k=32))
    assert ((model(x) - dense_out).norm() / dense_out.norm()) > 1e-3  # really sparse now
    remove_sla2(model)
    assert sla2_layers(model) == {} and torch.allclose(model(x), dense_out, atol=1e-6)


def test_reconverting_keeps_trained_router_and_alpha():
    model = nonzero_model()
    apply_sla2(model, [2], SLA2Config(topk=0.5))
    core = model.blocks[2].attn.core
    with torch.no_grad():
        core.proj_q.mul_(2.0)
        core.alpha_logit.fill_(0.3)
    apply_sla2(model, [2], SLA2Config(topk=0.2))
    new = model.blocks[2].attn.core
    assert isinstance(new, SLA2Attention) and new.config.topk == 0.2
    assert torch.equal(new.proj_q, 2 * torch.eye(32)) and torch.all(new.alpha_logit == 0.3)


def test_prepended_in_context_tokens_form_their_own_query_and_key_block():
    """Upstream models prepend their class tokens; SLA2 sees them last, as their own (partial) block, so
    a head that attends mostly to them (a class sink) finds one key block, not a mix with image rows."""
    core = SLA2Attention(2, 32, SLA2Config(topk=0.2, block_q=32, block_k=32), prefix_tokens=8)
    torch.manual_seed(0)
    sink = torch.randn(32)
    q, k, v = torch.randn(3, 2, 2, 264, 32).unbind(0)
    q = q + 2 * sink
    k[:, :, :8] = 3 * sink + 0.1 * torch.randn(2, 2, 8, 32)
    out, stats = core(q, k, v, return_stats=True)
    assert stats.kept.shape[-1] == 9 and stats.kept[..., -1].all()  # 8 image blocks + the sink's, always kept

    def last(x):
        return torch.cat([x[:, :, 8:], x[:, :, :8]], dim=2)

    expected = sla2_attention(last(q), last(k), last(v), topk=0.2, alpha=core.alpha, block_q=32, block_k=32,
                              backend="torch")
    assert torch.equal(out, torch.cat([expected[:, :, -8:], expected[:, :, :-8]], dim=2))


def test_our_jit_keeps_in_context_tokens_last_so_nothing_is_moved():
    model = nonzero_model()  # 256 image tokens; 8 in-context tokens from layer 2 on
    with torch.no_grad():
        model.in_context_posemb.zero_()  # all 8 class tokens identical: recognisable in the attention input
    apply_sla2(model, "all", SLA2Config(topk=0.2, block_q=32, block_k=32))
    assert [core.prefix_tokens for core in sla2_layers(model).values()] == [0, 0, 0, 0]
    seen = {}
    model.blocks[2].attn.core.register_forward_pre_hook(lambda _m, args: seen.update(v=args[2]))
    model(torch.randn(1, 3, 32, 32), torch.tensor([0.5]), torch.tensor([1]))
    v = seen["v"]
    assert v.shape[2] == 264 and torch.allclose(v[:, :, -8:], v[:, :, -1:].expand(-1, -1, 8, -1))
    assert not torch.allclose(v[:, :, :8], v[:, :, :1].expand(-1, -1, 8, -1))
    upstream = ForeignModel()
    upstream.in_context_len, upstream.in_context_start = 4, 1
    apply_sla2(upstream, "all", SLA2Config(topk=0.5, block_q=32, block_k=32))
    assert [core.prefix_tokens for core in sla2_layers(upstream).values()] == [0, 4, 4]


@pytest.mark.parametrize("size", [16, 48, 64])
def test_any_resolution_that_the_patch_divides(size):
    model = nonzero_model()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        out = model(x, torch.rand(1), torch.tensor([0]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_rope_tables_follow_the_input_device_and_dtype():
    model = JiT(TINY).to(torch.bfloat16)
    out = model(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16), torch.rand(1), torch.tensor([1]))
    assert out.dtype == torch.bfloat16
    assert all(cos.dtype == torch.bfloat16 for cos, _ in model.feat_rope._cache.values())


def test_inputs_the_patch_does_not_divide_are_refused():
    from sla2cli.errors import UsageError
    with pytest.raises(UsageError, match="divisible by the patch size"):
        nonzero_model()(torch.randn(1, 3, 33, 33), torch.rand(1), torch.tensor([0]))


def test_mass_ceiling_is_each_querys_heaviest_keys():
    from sla2cli.sla2.stats import _mass_ceiling
    q = torch.randn(1, 2, 32, 8)
    uniform = _mass_ceiling(q, torch.zeros(1, 2, 32, 8), [1, 8, 32])  # equal logits: c keys hold c/N
    assert uniform == pytest.approx([1 / 32, 8 / 32, 1.0], rel=1e-5)
    keys = torch.eye(8).repeat(1, 2, 1, 1) * 10  # each query's attention on the one key along its own axis
    sharp = _mass_ceiling(keys.clone(), keys, [1, 4])
    assert sharp == pytest.approx([1.0, 1.0], abs=1e-4)
