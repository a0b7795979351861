"""Our extensions of SLA2: a learned feature map φ(x·W) of rank R and α per query, from conversion to
calibration, checkpoints, stage 1's objectives and the FLOP count."""

import math

import pytest
import torch
from conftest import TINY, nonzero_model, one_json

from sla2cli import SLA2Config, apply_sla2, load_model
from sla2cli.diffusion import v_loss
from sla2cli.errors import InvalidParameter
from sla2cli.finetune.config import FinetuneConfig
from sla2cli.finetune.objectives import RouterDistillation
from sla2cli.profiling.ops import dense_attention_flops, sla2_flops
from sla2cli.sla2 import SLA2Attention, sla2_reference
from sla2cli.sla2.attention import initial_features
from sla2cli.sla2.layers import sla2_layers
from sla2cli.sla2.probe import record_dense_qkv
from sla2cli.sla2.stats import calibrate_alpha

ICS_TINY = ("--in-context-start", "2")  # the tiny model is no preset: its in_context_start must be given
LEARNED = SLA2Config(topk=0.3, block_q=16, block_k=16, feature_rank=8, alpha_mode="per_query")


def _batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.rand(n, generator=g) * 0.9, torch.arange(n) % 5


def test_rank_d_identity_map_with_zero_mix_scale_is_the_papers_form():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 70, 16, dtype=torch.float64) for _ in range(3))
    alpha = torch.tensor([0.3, 0.8], dtype=torch.float64)
    plain = sla2_reference(q, k, v, topk=0.3, alpha=alpha, block_q=16, block_k=16)
    identity = initial_features(2, 16, 16).double()
    same = sla2_reference(q, k, v, topk=0.3, alpha=alpha, block_q=16, block_k=16, feature_q=identity,
                          feature_k=identity, mix_scale=torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(same, plain, rtol=1e-12, atol=1e-12)


def test_per_query_alpha_matches_a_hand_computation():
    """One query block, one head, every key outside the kept block feeding the linear branch: α per query token
    is σ(logit α + c·(lse over kept keys − log Σ_unkept φ(q)·φ(k)))."""
    torch.manual_seed(1)
    N, D = 32, 4
    q, k, v = (torch.randn(1, 1, N, D, dtype=torch.float64) for _ in range(3))
    alpha, c = torch.tensor([0.4], dtype=torch.float64), torch.tensor([0.7], dtype=torch.float64)
    out, stats = sla2_reference(q, k, v, topk=0.5, alpha=alpha, block_q=32, block_k=16, mix_scale=c,
                                return_stats=True)
    kept = stats.kept[0, 0, 0]  # which of the two key blocks the single query block kept
    keys = torch.arange(N) // 16
    in_kept = kept[keys]
    s = (q[0, 0] @ k[0, 0].T) / math.sqrt(D)
    lse = torch.logsumexp(s[:, in_kept], dim=-1)
    w = torch.softmax(q[0, 0], -1) @ torch.softmax(k[0, 0], -1).T
    den = w[:, ~in_kept].sum(-1)
    a = torch.sigmoid(torch.logit(alpha) + c * (lse - den.log()))
    o_s = torch.softmax(s[:, in_kept], -1) @ v[0, 0][in_kept]
    o_l = (w[:, ~in_kept] @ v[0, 0][~in_kept]) / den[:, None]
    torch.testing.assert_close(out[0, 0], a[:, None] * o_s + (1 - a[:, None]) * o_l, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.alpha[0, 0, 0], a.mean(), rtol=1e-12, atol=1e-12)


def test_calibration_sets_the_mean_applied_alpha_to_the_captured_mass():
    model = nonzero_model()
    apply_sla2(model, [2, 3], LEARNED)
    x, t, y = _batch()
    calibrate_alpha(model, x, t, y)
    qkv, _ = record_dense_qkv(model, [2, 3], x, t, y)
    for i, core in sla2_layers(model).items():
        _, stats = core(*qkv[i], return_stats=True)
        mass = stats.captured_mass.mean(dim=(0, 2))
        applied = stats.alpha.mean(dim=(0, 2))
        assert torch.allclose(applied, mass, atol=0.02), (i, applied, mass)


def test_learned_parts_survive_a_checkpoint(cli, official_pth, tmp_path):
    dst = tmp_path / "learned.safetensors"
    code, out, err = cli("convert", official_pth, "-o", dst, "--layers", "2-3", "--topk", "0.3", "--block-q", "16",
                         "--block-k", "16", "--feature-rank", "8", "--alpha-mode", "per_query", "--calibrate", "2",
                         *ICS_TINY, "--json")
    assert code == 0, err
    doc = one_json(out)
    assert doc["sla2_config"]["feature_rank"] == 8
    assert any("untrained" in w and "sla2 finetune" in w for w in doc["warnings"])  # converted, not yet trained
    model, info = load_model(dst)
    assert info.sla2_config.feature_rank == 8 and info.sla2_config.alpha_mode == "per_query"
    core = sla2_layers(model)[2]
    assert core.feature_q.shape == (TINY.num_heads, TINY.hidden_size // TINY.num_heads, 8)
    code, out, err = cli("stats", dst, "--json")
    assert code == 0, err
    layer = next(r for r in one_json(out)["per_layer"] if r["layer"] == 2)
    assert layer["feature_rank"] == 8 and layer["alpha_mode"] == "per_query"


@pytest.mark.parametrize("rank", ["-1", "257", "two", "1.5"])
def test_bad_feature_rank_is_one_line_and_writes_nothing(cli, official_pth, tmp_path, rank):
    dst = tmp_path / "x.safetensors"
    code, _, err = cli("convert", official_pth, "-o", dst, "--feature-rank", rank, *ICS_TINY)
    assert code == 2 and "--feature-rank" in err and len(err.strip().splitlines()) == 1
    assert not dst.exists()


@pytest.mark.parametrize("rank", [-1, 257, True, 2.0])
def test_config_refuses_a_bad_feature_rank(rank):
    with pytest.raises(InvalidParameter):
        SLA2Config(feature_rank=rank)


def test_stage_1_distillation_trains_the_learned_parts_against_the_teachers_velocity():
    model = nonzero_model()
    apply_sla2(model, [2, 3], LEARNED)
    cores = sla2_layers(model)
    model.requires_grad_(False)
    for core in cores.values():
        core.requires_grad_(True)
    x, t, y = _batch()
    z = x  # any input: the teacher's prediction is the target
    qkv, teacher = record_dense_qkv(model, [2, 3], z, t, y)
    module = RouterDistillation(model, cores, objective="distill")
    loss, per_layer, _ = module(qkv, {2: 0.3, 3: 0.3}, tau=0.1, z=z, t=t, y=y, teacher_out=teacher,
                                autocast=lambda: torch.autocast("cpu", enabled=False))
    with torch.no_grad():
        expected = v_loss(model(z, t, y), teacher, z, t).mean()
    assert torch.allclose(loss, expected, rtol=1e-5) and per_layer.shape == (2,) and not per_layer.requires_grad
    unmeasured, nothing, _ = module(qkv, {2: 0.3, 3: 0.3}, tau=0.1, z=z, t=t, y=y, teacher_out=teacher,
                                    autocast=lambda: torch.autocast("cpu", enabled=False), measure=False)
    assert torch.equal(unmeasured, loss) and nothing.shape == (0,)  # measuring the layers is only a report
    loss.backward()
    for core in cores.values():
        for name in ("feature_q", "feature_k", "mix_scale", "alpha_logit", "proj_q"):
            assert getattr(core, name).grad is not None and getattr(core, name).grad.abs().sum() > 0, name


def test_stage_1_objectives_are_per_stage():
    assert FinetuneConfig(objective="distill").objective == "distill"
    with pytest.raises(InvalidParameter):
        FinetuneConfig(objective="layer", full=True)


def test_flops_count_the_feature_maps_by_hand():
    B, H, N, D, R, b = 1, 3, 1032, 64, 16, 16
    n = math.ceil(N / b)  # 65 blocks, the last padded to whole
    got = sla2_flops(B, H, N, D, topk=4 / 65, block_q=b, block_k=b, backend="triton", feature_rank=R)
    router = 2 * H * n * n * D + 2 * H * D ** 3 + 2 * H * n * D * D  # Triton: one W_kᵀW_q on the key means
    sparse = 4 * H * n * b * 4 * b * D
    unkept_sums = 2 * H * n * n * R * (D + 1)  # the complement mask times the stacked [h_j, z_j]
    linear = 2 * H * n * b * R * D + 2 * H * n * b * R * (D + 1) + 2 * H * 2 * n * b * D * R + unkept_sums
    assert (got["router"], got["sparse"], got["linear"]) == (router, sparse, linear)
    removed = 1 - got["total"] / dense_attention_flops(B, H, N, N, D)
    # the 90% row of bench/quality.sh: 90.03% removed by the kernels that summed the kept blocks from totals;
    # the unkept sums' product costs 3.2% of dense attention at these 16-token blocks
    assert 0.867 < removed < 0.869
    plain = sla2_flops(B, H, N, D, topk=4 / 65, block_q=b, block_k=b, backend="triton")
    assert plain["linear"] > got["linear"]  # rank 16 < D: cheaper than the paper's φ on all 64 dims


def test_module_exposes_only_the_parts_its_config_asks_for():
    core = SLA2Attention(2, 16, SLA2Config())
    assert core.learned_parts() == {}
    core = SLA2Attention(2, 16, LEARNED)
    assert set(core.learned_parts()) == {"feature_q", "feature_k", "mix_scale"}


def test_stage_1_with_learned_parts_cuts_the_demo_models_held_out_error(cli, tmp_path):
    """The recipe's stage 1 on the shipped model (learned rank-16 maps, α per query, velocity distillation on
    training textures): 8 steps of 4 lower the held-out v-loss by over 5% (measured 1.359x -> 1.258x dense on
    16 textures of HELD_OUT_SEED), and only SLA2's own parameters move."""
    from finetune_support import demo_held_out

    from sla2cli.data.textures import TRAIN_SEED, texture_batch
    from sla2cli.models.shipped import DEMO_MODEL_PATH
    from sla2cli.pipeline import write_textures

    src, dst = tmp_path / "c.safetensors", tmp_path / "f.safetensors"
    code, _, err = cli("convert", DEMO_MODEL_PATH, "-o", src, "--topk", "0.15", "--feature-rank", "16",
                       "--alpha-mode", "per_query", "--no-qat", "--calibrate", "4", "--device", "cpu")
    assert code == 0, err
    images, labels = texture_batch(torch.arange(64), seed=TRAIN_SEED)
    data = write_textures(tmp_path / "textures", images, labels)
    code, out, err = cli("finetune", src, "-o", dst, "--data", data, "--steps", "8", "--batch-size", "4",
                         "--eval-samples", "4", "--device", "cpu", "--save-every", "0", "--objective", "distill",
                         "--schedule", "cosine", "--warmup", "0.05", "--json")
    assert code == 0, err
    assert one_json(out)["options"]["objective"] == "distill"
    before, _ = load_model(src)
    after, _ = load_model(dst)
    changed = {k for k, v in after.state_dict().items() if not torch.equal(v, before.state_dict()[k])}
    assert changed and all(".core." in k for k in changed) and any(k.endswith("feature_q") for k in changed)
    loss_before, loss_after = demo_held_out(before, after)
    print(f"held-out v-loss {loss_before['ratio']:.3f}x -> {loss_after['ratio']:.3f}x dense")
    assert loss_after["model"] < 0.95 * loss_before["model"]
