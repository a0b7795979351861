"""`sla2 convert --max-error`: each layer's fewest kept blocks within a layer-local error bound, and its file."""

import json

import pytest
from conftest import one_json
from finetune_support import STRUCTURED, converted_file, one_thread, structured_model  # noqa: F401 (fixture)
from safetensors import safe_open
from safetensors.torch import save_file

from sla2cli import SLA2Config, apply_sla2, load_model, save_model
from sla2cli.budget import OVER_BUDGET, TOO_FEW_KEY_BLOCKS, WITHIN_BUDGET, convert_within_budget
from sla2cli.sla2.layers import sla2_layers
from sla2cli.sla2.routing import keep_count
from sla2cli.sla2.stats import calibrate_alpha, measure_layers, own_noised_batch

SETTINGS = SLA2Config(block_q=16, block_k=16)
BUDGET = 0.012  # on the structured model, layers need different numbers of blocks for it


@pytest.fixture
def calibration():
    return own_noised_batch(structured_model(), 8, seed=0)


def _error(layer: int, kept: int, key_blocks: int, calibration) -> float:
    """The error of `layer` alone at `kept` blocks, calibrated and measured by hand."""
    topk = kept / key_blocks
    assert keep_count(topk, key_blocks) == kept
    model = structured_model()
    apply_sla2(model, [layer], SLA2Config(topk=topk, block_q=16, block_k=16))
    calibrate_alpha(model, *calibration)
    return measure_layers(model, *calibration)[0]["relative_squared_error"]


def test_each_layer_gets_the_fewest_blocks_within_the_budget(calibration):
    model = structured_model()
    result = convert_within_budget(model, layer_spec="all", settings=SETTINGS, max_error=BUDGET,
                                   calibration=calibration)
    assert [r["reason"] for r in result.budget] == [WITHIN_BUDGET] * STRUCTURED.depth
    assert len({r["kept_blocks"] for r in result.budget}) > 1, "the budget should tell the layers apart"
    cores = sla2_layers(model)
    for r in result.budget:
        kept, n_k = r["kept_blocks"], r["key_blocks"]
        assert cores[r["layer"]].config.topk == r["topk"] and keep_count(r["topk"], n_k) == kept
        assert r["error"] == pytest.approx(_error(r["layer"], kept, n_k, calibration)) and r["error"] <= BUDGET
        assert kept == 1 or _error(r["layer"], kept - 1, n_k, calibration) > BUDGET


def test_huge_and_tiny_budgets_and_short_layers(calibration):
    model = structured_model()
    loose = convert_within_budget(model, layer_spec="all", settings=SETTINGS, max_error=1e9, calibration=calibration)
    assert [r["kept_blocks"] for r in loose.budget] == [1] * STRUCTURED.depth
    strict = convert_within_budget(model, layer_spec="all", settings=SETTINGS, max_error=1e-7,
                                   calibration=calibration)
    assert [(r["reason"], r["kept_blocks"], r["topk"]) for r in strict.budget] == [(OVER_BUDGET, None, None)] * 3
    assert strict.layers == [] and sla2_layers(model) == {} and "dense: even" in strict.budget[0]["why"]
    short = convert_within_budget(model, layer_spec="1-2", settings=SLA2Config(block_k=32), max_error=1e9,
                                  calibration=calibration)  # 160 tokens: 5 key blocks of 32
    assert [(r["layer"], r["reason"], r["key_blocks"]) for r in short.budget] == [(1, TOO_FEW_KEY_BLOCKS, 5),
                                                                                  (2, TOO_FEW_KEY_BLOCKS, 5)]
    assert sla2_layers(model) == {}


def test_the_file_keeps_each_layers_topk_and_profile_reports_it(cli, tmp_path):
    dst = converted_file(cli, tmp_path, "--max-error", str(BUDGET), "--block-q", "16", "--block-k", "16",
                         "--topk", "0.5", "--seed", "0")
    model, info = load_model(dst)
    topks = {i: core.config.topk for i, core in sla2_layers(model).items()}
    assert len(set(topks.values())) > 1 and info.sla2_config.topk == topks[0] and info.sla2_layers == [0, 1, 2]
    with safe_open(str(dst), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    sla2 = json.loads(meta["sla2"])
    assert {int(i): t for i, t in sla2["topk_per_layer"].items()} == topks
    assert json.loads(meta["provenance"])["max_error"] == BUDGET

    code, out, err = cli("profile", dst, "--device", "cpu", "--bench-ms", "1", "--threads", "1", "--json")
    assert code == 0, err
    assert {r["layer"]: r["topk"] for r in one_json(out)["per_layer"]} == topks

    again = tmp_path / "again.safetensors"  # other settings changed, each layer's topk kept
    code, _, err = cli("convert", dst, "-o", again, "--qat")
    assert code == 0, err
    assert {i: core.config.topk for i, core in sla2_layers(load_model(again)[0]).items()} == topks

    del sla2["topk_per_layer"]  # a file from before per-layer topk: every layer has the one config
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={**meta, "sla2": json.dumps(sla2)})
    model, info = load_model(old)
    assert {core.config.topk for core in sla2_layers(model).values()} == {info.sla2_config.topk}


def test_convert_json_and_table_say_why(cli, tmp_path):
    dense = save_model(structured_model(), tmp_path / "dense.safetensors")
    code, out, err = cli("convert", dense, "--dry-run", "--max-error", "1e-7", "--block-k", "32", "--layers", "1",
                         "--calibrate", "2", "--json")
    assert code == 0, err
    doc = one_json(out)
    assert doc["budget"]["samples"] == 2 and doc["sla2_config"]["topk"] is None and doc["layers"] == []
    assert [r["reason"] for r in doc["budget"]["layers"]] == [TOO_FEW_KEY_BLOCKS]
    code, out, err = cli("convert", dense, "--dry-run", "--max-error", "1e-7", "--block-k", "32", "--layers", "1",
                         "--calibrate", "2")
    assert code == 0, err
    assert "why" in out and "SLA2 cannot pay off" in out and "not among the layers" in out


@pytest.mark.parametrize("value", ["0", "-0.1", "nan", "inf"])
def test_the_budget_must_be_finite_and_positive(cli, tmp_path, value):
    src = tmp_path / "model.safetensors"
    src.write_bytes(b"")  # the budget is checked before the model is read
    code, out, err = cli("convert", src, "-o", tmp_path / "out.safetensors", "--max-error", value)
    assert code == 2 and out == "" and list(tmp_path.iterdir()) == [src]
    if value in ("nan", "inf"):  # refused by the shared parser of every float option
        assert err.strip() == f"error: Invalid value for '--max-error': {value} is not a finite number " \
                              "(see 'sla2 convert --help')"
    else:
        assert err.strip() == f"error: --max-error must be a finite number > 0, got {float(value)}"
