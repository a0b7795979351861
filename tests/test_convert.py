"""`sla2 convert` and the checkpoint layer: conversions, the way back, and every bad input."""

import argparse

import pytest
import torch
from conftest import TINY, nonzero_model, one_json, sha256
from safetensors import safe_open

from sla2cli import SLA2Config, apply_sla2, load_model
from sla2cli.checkpoints.architecture import infer_config
from sla2cli.errors import UsageError
from sla2cli.models.jit import ARCHITECTURES

ICS = ("--in-context-start", "2")  # the tiny model is no preset: its in_context_start must be given


def _inputs(seed=0, size=32, n=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.rand(n, generator=g), torch.tensor([1, 4])[:n]


def test_convert_writes_a_model_that_loads_back_identical(cli, official_pth, tmp_path):
    dst = tmp_path / "sla2.safetensors"
    code, out, err = cli("convert", official_pth, "-o", dst, "--layers", "2-3", "--topk", "0.3", *ICS, "--json")
    assert code == 0, err
    doc = one_json(out)
    assert doc["layers"] == [2, 3] and doc["weights"] == "model_ema1"
    assert [r["converted"] for r in doc["per_layer"]] == [False, False, True, True]
    model, info = load_model(dst)
    assert info.sla2_layers == [2, 3] and info.sla2_config.topk == 0.3 and info.config == TINY
    with safe_open(str(dst), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "sla2cli" and '"source_sha256"' in meta["provenance"]
    expected, _ = load_model(official_pth, in_context_start=2)
    apply_sla2(expected, [2, 3], SLA2Config(topk=0.3))
    x, t, y = _inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, y), expected(x, t, y))


def test_all_layers_at_topk_one_reproduce_the_dense_output(cli, official_pth, tmp_path):
    dst = tmp_path / "full.safetensors"
    assert cli("convert", official_pth, "-o", dst, "--layers", "all", "--topk", "1.0", *ICS)[0] == 0
    dense, _ = load_model(official_pth, in_context_start=2)
    converted, info = load_model(dst)
    assert info.sla2_layers == [0, 1, 2, 3]
    x, t, y = _inputs(1)
    with torch.no_grad():
        got, want = converted(x, t, y), dense(x, t, y)
    assert (got - want).norm() / want.norm() < 1e-6, "float32 rounding only"


@pytest.mark.parametrize("fmt", ["jit-pth", "pixelgen-ckpt", "safetensors"])
def test_the_way_back_gives_the_original_tensors_bit_for_bit(cli, official_pth, tmp_path, fmt):
    sla2 = tmp_path / "sla2.safetensors"
    assert cli("convert", official_pth, "-o", sla2, "--layers", "1-3", *ICS)[0] == 0
    back = tmp_path / f"back.{fmt}"
    code, _, err = cli("convert", sla2, "-o", back, "--layers", "none", "--format", fmt)
    assert code == 0, err
    original = {k[len("net."):]: v for k, v in torch.load(official_pth, weights_only=False)["model_ema1"].items()}
    if fmt == "jit-pth":
        with torch.serialization.safe_globals([argparse.Namespace]):
            payload = torch.load(back, weights_only=True, map_location="cpu")
        entries = [{k[len("net."):]: v for k, v in payload[name].items()}
                   for name in ("model", "model_ema1", "model_ema2")]
    elif fmt == "pixelgen-ckpt":
        state = torch.load(back, weights_only=True, map_location="cpu")["state_dict"]
        entries = [{k[len(p) + 1:]: v for k, v in state.items() if k.startswith(p + ".")}
                   for p in ("denoiser", "ema_denoiser")]
    else:
        model, info = load_model(back)
        assert info.sla2_layers == []
        entries = [model.state_dict()]
    for entry in entries:
        assert entry.keys() == original.keys()
        assert all(torch.equal(entry[k], original[k]) and entry[k].dtype == original[k].dtype for k in original)


def test_converted_layers_survive_export_to_the_training_layouts(cli, official_pth, tmp_path):
    sla2 = tmp_path / "sla2.safetensors"
    assert cli("convert", official_pth, "-o", sla2, "--layers", "3", "--topk", "0.2", *ICS)[0] == 0
    for fmt in ("jit-pth", "pixelgen-ckpt"):
        out = tmp_path / f"out.{fmt}"
        assert cli("convert", sla2, "-o", out, "--format", fmt)[0] == 0
        model, info = load_model(out)
        assert info.sla2_layers == [3] and info.sla2_config.topk == 0.2


def test_calibration_sets_alpha_from_the_captured_mass(cli, official_pth, tmp_path):
    dst = tmp_path / "cal.safetensors"
    code, out, err = cli("convert", official_pth, "-o", dst, "--layers", "2-3", "--topk", "0.25", "--calibrate", "2",
                         "--device", "cpu", *ICS, "--json")
    assert code == 0, err
    alphas = one_json(out)["calibrated_alpha"]
    assert set(alphas) == {"2", "3"} and all(0 < a < 1 for v in alphas.values() for a in v)
    model, _ = load_model(dst)
    assert torch.allclose(model.blocks[2].attn.core.alpha, torch.tensor(alphas["2"]), atol=1e-6)


def test_dry_run_writes_nothing(cli, official_pth, tmp_path):
    dst = tmp_path / "never.safetensors"
    code, out, _ = cli("convert", official_pth, "-o", dst, "--dry-run", *ICS)
    assert code == 0 and "dry run" in out and not dst.exists()


def test_short_sequences_warn_to_keep_layers_dense(cli, official_pth, tmp_path):
    code, out, err = cli("convert", official_pth, "--dry-run", "--layers", "all", *ICS, "--json")
    assert code == 0 and "keep them dense" in err
    assert one_json(out)["warnings"]  # 256-264 tokens are 4-5 key blocks of 64


def test_presets_and_explicit_overrides(cli, official_pth):
    doc = one_json(cli("convert", official_pth, "--dry-run", "--preset", "max-speed", *ICS, "--json")[1])
    assert doc["sla2_config"]["topk"] == 0.05 and doc["sla2_config"]["qat"] is True
    doc = one_json(cli("convert", official_pth, "--dry-run", "--preset", "quality", "--topk", "0.4", "--qat",
                       *ICS, "--json")[1])
    assert doc["sla2_config"]["topk"] == 0.4 and doc["sla2_config"]["qat"] is True


def test_force_overwrites_but_never_the_input(cli, official_pth, tmp_path):
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"old")
    assert cli("convert", official_pth, "-o", dst, "--force", *ICS)[0] == 0
    assert load_model(dst)[1].sla2_layers == [0, 1, 2, 3]
    before = sha256(official_pth)
    code, _, err = cli("convert", official_pth, "-o", official_pth, "--force", *ICS)
    assert code == 2 and "is the input" in err and sha256(official_pth) == before


class Unlisted:
    """A class outside the unpickling allowlist."""


def _truncated(path, tmp_path):
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return bad


def _unsafe(path, tmp_path):
    bad = tmp_path / "unsafe.pth"
    payload = torch.load(path, weights_only=False)
    payload["extra"] = Unlisted()
    torch.save(payload, bad)
    return bad


def _text(_, tmp_path):
    bad = tmp_path / "notes.pth"
    bad.write_text("these are my notes, not a checkpoint\n")
    return bad


def _corrupt_safetensors(path, tmp_path):
    good = tmp_path / "good.safetensors"
    load_model(path, in_context_start=2)  # sanity: the source loads
    from sla2cli.checkpoints import save_model
    save_model(load_model(path, in_context_start=2)[0], good)
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(good.read_bytes()[:-100])
    return bad


def _garbled_safetensors(_, tmp_path):
    bad = tmp_path / "garbled.safetensors"
    header = b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}'  # unterminated JSON
    bad.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    return bad


def _not_jit(_, tmp_path):
    bad = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.randn(4, 3, 3, 3)}, bad)
    return bad


@pytest.mark.parametrize("make_input,extra,code,message", [
    (lambda p, t: t / "missing.pth", (), 1, "does not exist"),
    (_truncated, (), 1, "truncated or not a PyTorch checkpoint"),
    (_text, (), 1, "is not a checkpoint"),
    (_corrupt_safetensors, (), 1, "corrupt or truncated safetensors"),
    (_garbled_safetensors, (), 1, "corrupt or truncated safetensors"),
    (_unsafe, (), 1, "Unlisted"),
    (_not_jit, (), 1, "is not a JiT model"),
    (lambda p, t: p, ("--layers", "7"), 2, "valid layers are 0-3"),
    (lambda p, t: p, ("--layers", "2-1"), 2, "valid layers are 0-3"),
    (lambda p, t: p, ("--layers", "one,two"), 2, "malformed layer spec"),
    (lambda p, t: p, ("--layers", "last:9"), 2, "last:N needs"),
    (lambda p, t: p, ("--topk", "0"), 2, "topk must be in (0, 1]"),
    (lambda p, t: p, ("--topk", "1.5"), 2, "topk must be in (0, 1]"),
    (lambda p, t: p, ("--topk", "-0.1"), 2, "topk must be in (0, 1]"),
    (lambda p, t: p, ("--block-q", "48"), 2, "--block-q must be one of"),
    (lambda p, t: p, ("--feature-map", "cosine"), 2, "unknown feature map"),
    (lambda p, t: p, ("--preset", "fastest"), 2, "unknown preset"),
    (lambda p, t: p, ("--weights", "model_ema3"), 2, "available: model, model_ema1, model_ema2"),
    (lambda p, t: p, ("--format", "onnx"), 2, "unknown --format"),
    (lambda p, t: p, ("--calibrate", "-1"), 2, "--calibrate must be"),
    (lambda p, t: p, ("--device", "tpu"), 2, "--device"),
])
def test_bad_inputs_fail_cleanly_and_write_nothing(cli, official_pth, tmp_path, make_input, extra, code, message):
    src = make_input(official_pth, tmp_path)
    before = {p.name: sha256(p) for p in tmp_path.iterdir() if p.is_file()}
    dst = tmp_path / "out.safetensors"
    got, out, err = cli("convert", src, "-o", dst, *ICS, *extra)
    assert got == code
    assert message in err
    assert err.strip().count("\n") == 0 and "Traceback" not in err  # one line, no traceback
    assert not dst.exists() and out == ""
    assert {p.name: sha256(p) for p in tmp_path.iterdir() if p.is_file()} == before  # no temp files left


def test_missing_in_context_start_is_asked_for(cli, official_pth, tmp_path):
    code, _, err = cli("convert", official_pth, "-o", tmp_path / "x.safetensors")
    assert code == 2 and "--in-context-start" in err and not (tmp_path / "x.safetensors").exists()


def test_existing_output_is_kept_without_force(cli, official_pth, tmp_path):
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"precious")
    code, _, err = cli("convert", official_pth, "-o", dst, *ICS)
    assert code == 2 and "--force" in err and dst.read_bytes() == b"precious"


def test_trusted_checkpoints_load_with_full_unpickle(cli, official_pth, tmp_path):
    unsafe = _unsafe(official_pth, tmp_path)
    code, _, err = cli("convert", unsafe, "-o", tmp_path / "ok.safetensors", "--trust-checkpoint", *ICS)
    assert code == 0, err


def test_missing_output_option_is_a_usage_error(cli, official_pth):
    code, _, err = cli("convert", official_pth, *ICS)
    assert code == 2 and "--output" in err


def _shapes_only(config):
    """A state_dict with the shapes infer_config reads, for preset-sized architectures (no big tensors)."""
    D, p = config.hidden_size, config.patch_size
    state = {"pos_embed": torch.empty(1, config.grid_size ** 2, D),
             "x_embedder.proj1.weight": torch.empty(config.bottleneck_dim or D, 3, p, p),
             "y_embedder.embedding_table.weight": torch.empty(1001, 1),
             "in_context_posemb": torch.empty(1, 32, 1),
             "blocks.0.attn.q_norm.weight": torch.empty(config.head_dim),
             "blocks.0.mlp.w12.weight": torch.empty(2 * config.ffn_hidden_dim, 1),
             "final_layer.linear.weight": torch.empty(1),
             f"blocks.{config.depth - 1}.norm1.weight": torch.empty(1)}
    if config.bottleneck_dim:
        state["x_embedder.proj2.weight"] = torch.empty(1)
    return state


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architecture_is_read_off_the_shapes_of_every_preset(name):
    preset = ARCHITECTURES[name]
    assert infer_config(_shapes_only(preset)) == preset
    assert infer_config(_shapes_only(preset), args={"model": name}).in_context_start == preset.in_context_start


def test_in_context_start_comes_from_args_model_before_shape_matching():
    state = _shapes_only(ARCHITECTURES["JiT-B/16"])
    assert infer_config(state, args={"model": "JiT-B/16"}).in_context_start == 4
    assert infer_config(state, in_context_start=6).in_context_start == 6
    with pytest.raises(UsageError, match="pass it as in_context_start"):
        infer_config(_shapes_only(TINY))


def test_wrapper_prefixes_and_bare_state_dicts_load(tmp_path):
    model = nonzero_model()
    for prefix in ("", "module.", "_orig_mod.module."):
        path = tmp_path / f"bare{len(prefix)}.pt"
        torch.save({prefix + k: v for k, v in model.state_dict().items()}, path)
        loaded, info = load_model(path, in_context_start=2)
        assert info.layout == "state-dict" and info.weights == "model"
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
