"""`sla2 profile` on CPU with a tiny model: the report, latency on CPU, the sweep and plot, bad inputs."""

import builtins

import pytest
from conftest import one_json

# The tiny official checkpoint at 16 px: 64 tokens in layers 0-1, 72 (two 64-blocks) in 2-3.
BASE = ("--in-context-start", "2", "--device", "cpu", "--resolution", "16", "--bench-ms", "2", "--threads", "1")


def test_profile_json_report_on_cpu(cli, official_pth):
    code, out, err = cli("profile", official_pth, *BASE, "--layers", "2-3", "--topk", "0.5", "--json")
    assert code == 0, err
    doc = one_json(out)
    assert doc["environment"]["device_type"] == "cpu" and doc["timing"]["threads"] == 1
    assert doc["environment"]["torch"] and doc["counter"] == "torch" and "2 per multiply-add" in doc["flop_convention"]
    rows = doc["per_layer"]
    assert [r["layer"] for r in rows] == [0, 1, 2, 3]
    assert [r["tokens"] for r in rows] == [64, 64, 72, 72] and [r["mode"] for r in rows] == ["dense"] * 2 + ["sla2"] * 2
    for r in rows:
        assert r["dense_attention_flops"] == 4 * 1 * 2 * r["tokens"] ** 2 * 32
        assert r["dense_attention_ms"] > 0 and r["rest_of_block_ms"] > 0 and r["rest_of_block_flops"] > 0
    for r in rows[2:]:
        assert r["kept_blocks"] == 1 and r["key_blocks"] == 2 and r["backend"] == "torch"
        assert r["sla2_attention_flops"] == r["executed_attention_flops"] > 0 and r["sla2_attention_ms"] > 0
        assert r["recommendation"] in ("sla2", "keep dense")
        if r["recommendation"] == "keep dense":  # 2 key blocks: always the too-few-blocks reason
            assert "few_key_blocks" in r["reason_codes"] and "too few key blocks" in r["reason"]
    e = doc["end_to_end"]
    for key in ("dense_ms", "converted_ms", "no_attention_ms", "recommended_ms"):
        assert e[key] > 0
    assert e["ceiling"] == pytest.approx(e["dense_ms"] / e["no_attention_ms"])
    assert e["peak_memory_mib"]["dense"] is None  # not measured on CPU, and said so by null
    t = doc["totals"]
    assert t["dense_model_flops"] - t["converted_model_flops"] == \
        t["dense_attention_flops"] - t["executed_attention_flops"]
    assert set(doc["recommendation"]["convert"]) | set(doc["recommendation"]["keep_dense"]) == {2, 3}


def test_profile_tables_sweep_and_plot(cli, official_pth, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "profile.png"
    code, out, err = cli("profile", official_pth, *BASE, "--topk", "0.5", "--sweep-resolution", "8,16",
                         "--plot", png, "--counter", "fvcore")
    assert code == 0, err
    for text in ("Per layer", "End to end", "Resolution sweep", "threads", "Amdahl ceiling", "fvcore",
                 "attention removed"):
        assert text in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, err = cli("profile", official_pth, *BASE, "--plot", png)
    assert code == 2 and "--force" in err


def test_profile_dense_model_and_sweep_json(cli, official_pth):
    code, out, err = cli("profile", official_pth, *BASE, "--layers", "none", "--sweep-resolution", "16", "--json")
    assert code == 0, err
    doc = one_json(out)
    assert doc["converted_layers"] == [] and all(r["mode"] == "dense" for r in doc["per_layer"])
    assert "no layer is converted" in doc["recommendation"]["summary"]
    assert [r["resolution"] for r in doc["sweep"]] == [16] and "pays_off_from" in doc


def test_profile_converts_with_a_preset_and_says_which_path_each_layer_runs(cli, official_pth):
    """`--preset` as `sla2 convert` takes it (topk and QAT; --topk overrides its topk): profiling max-speed is
    how a user sees whether its low-bit path pays on their GPU (on a CPU the QAT layers run the reference)."""
    code, out, err = cli("profile", official_pth, *BASE, "--layers", "2-3", "--preset", "max-speed", "--json")
    assert code == 0, err
    rows = one_json(out)["per_layer"][2:]
    assert [r["topk"] for r in rows] == [0.05, 0.05] and all(r["mode"] == "sla2" for r in rows)
    assert all(r["path"] == rows[0]["path"] and "QAT" in r["path"] for r in rows), rows[0]["path"]
    code, out, err = cli("profile", official_pth, *BASE, "--layers", "2-3", "--preset", "quality", "--topk", "0.5",
                         "--json")
    assert code == 0, err
    rows = one_json(out)["per_layer"][2:]
    assert [r["topk"] for r in rows] == [0.5, 0.5] and all("QAT" not in r["path"] for r in rows)


@pytest.mark.parametrize("args,message", [
    ((), "missing MODEL"),
    (("--arch", "JiT-Q/7"), "unknown --arch"),
    (("--counter", "ptflops"), "unknown --counter"),
    (("--batch-size", "0"), "--batch-size"),
    (("--resolution", "33"), "multiple of the patch size"),
    (("--sweep-resolution", "16,abc"), "--sweep-resolution"),
    (("--sweep-resolution", "15"), "--sweep-resolution"),
    (("--topk", "1.5"), "topk"),
    (("--preset", "turbo"), "unknown preset 'turbo'"),
    (("--layers", "2-9"), "valid layers are 0-3"),
    (("--dtype", "fp64"), "--dtype"),
    (("--bench-ms", "0"), "--bench-ms"),
    (("--threads", "0"), "--threads"),
])
def test_profile_bad_inputs(cli, official_pth, args, message):
    model = () if args[:1] in ((), ("--arch",)) else (official_pth, "--in-context-start", "2")
    code, out, err = cli("profile", *model, "--device", "cpu", *args)
    assert code == 2, err
    assert message in err and out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_profile_model_and_arch_together_or_missing_file(cli, official_pth, tmp_path):
    code, _, err = cli("profile", official_pth, "--arch", "JiT-B/16")
    assert code == 2 and "not both" in err
    code, _, err = cli("profile", tmp_path / "missing.pth", "--device", "cpu")
    assert code != 0 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_profile_plot_without_matplotlib(cli, official_pth, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    code, out, err = cli("profile", official_pth, *BASE, "--plot", tmp_path / "p.png")
    assert code == 1 and "pip install matplotlib" in err and out == ""
    assert not (tmp_path / "p.png").exists()


def _row(tokens=4128, key_blocks=65, backend="triton", qat_fallback=None):
    path = backend if qat_fallback is None else f"{backend}, QAT by the reference ({qat_fallback})"
    return {"layer": 4, "mode": "sla2", "tokens": tokens, "key_blocks": key_blocks, "block_k": 64, "backend": backend,
            "path": path, "qat_fallback": qat_fallback}


def test_layer_advice_uses_gpu_time_at_launch_bound_sizes_and_says_why():
    import torch

    from sla2cli.profiling.profile import layer_advice
    cuda = torch.device("cuda")
    # launch-bound alone (eager slower) but faster as a CUDA graph: convert, and say so
    advice = layer_advice(_row(), {"dense": {"ms": 0.51, "graph_ms": 0.50}, "sla2": {"ms": 0.89, "graph_ms": 0.23}},
                          cuda)
    assert advice["recommendation"] == "sla2"
    assert "CUDA graph" in advice["reason"] and "launch-bound" in advice["reason"]
    # 288 tokens: 5 key blocks, 0.05 ms of dense attention: keep dense, for both reasons
    advice = layer_advice(_row(288, 5), {"dense": {"ms": 0.05, "graph_ms": 0.048},
                                         "sla2": {"ms": 0.8, "graph_ms": 0.14}}, cuda)
    assert advice["recommendation"] == "keep dense"
    assert advice["reason_codes"] == ["few_key_blocks", "launch_bound"] and "5 blocks of 64 tokens" in advice["reason"]
    # the reference backend on a GPU is named as a reason; a long sequence slower for no listed reason says so
    advice = layer_advice(_row(backend="torch"), {"dense": {"ms": 2.0}, "sla2": {"ms": 9.0}}, cuda)
    assert advice["reason_codes"] == ["reference_backend"]
    # so is a QAT layer whose backend hands its low-bit branch to the reference (here: no FP8), with the reason
    qat = _row(qat_fallback="FP8 needs compute capability 8.9 or newer; this GPU has 8.0")
    advice = layer_advice(qat, {"dense": {"ms": 2.0}, "sla2": {"ms": 9.0}}, cuda)
    assert advice["reason_codes"] == ["reference_backend"] and "this GPU has 8.0" in advice["reason"]
    advice = layer_advice(_row(), {"dense": {"ms": 2.0}, "sla2": {"ms": 2.5}}, cuda)
    assert advice["reason_codes"] == ["not_faster"]


def test_recommendation_is_checked_end_to_end():
    from sla2cli.profiling.profile import recommendation
    rows = [{"layer": 0, "mode": "dense", "recommendation": None},
            {"layer": 1, "mode": "sla2", "recommendation": "sla2"},
            {"layer": 2, "mode": "sla2", "recommendation": "sla2"}]
    faster = recommendation(rows, {"dense": {"ms": 50.0}, "converted": {"ms": 40.0}})
    assert faster["convert"] == [1, 2] and faster["measured"]["ms"] == 40.0 and "every converted" in faster["summary"]
    within_noise = recommendation(rows, {"dense": {"ms": 50.0}, "converted": {"ms": 49.5}})
    assert within_noise["convert"] == [] and within_noise["keep_dense"] == [1, 2]
    assert within_noise["measured"]["ms"] == 50.0 and within_noise["rejected_end_to_end"]["layers"] == "1-2"
    rows[2]["recommendation"] = "keep dense"
    partly = recommendation(rows, {"dense": {"ms": 50.0}, "converted": {"ms": 52.0}, "recommended": {"ms": 45.0}})
    assert partly["convert"] == [1] and partly["keep_dense"] == [2] and partly["layers"] == "1"


def test_end_to_end_check_compares_cuda_graph_times_where_both_were_captured():
    """A small forward eagerly times the host (the showcase at batch 1: 14.2 against 9.4 ms eager, 2.09 against
    2.17 ms as graphs); samplers replay graphs, so the check compares those where both forwards have one."""
    from sla2cli.profiling.profile import recommendation
    rows = [{"layer": 0, "mode": "sla2", "recommendation": "sla2"}]
    host_bound = recommendation(rows, {"dense": {"ms": 9.35, "graph_ms": 2.17},
                                       "converted": {"ms": 14.24, "graph_ms": 2.09}})
    assert host_bound["convert"] == [0] and host_bound["rejected_end_to_end"] is None
    slower = recommendation(rows, {"dense": {"ms": 9.35, "graph_ms": 2.0}, "converted": {"ms": 8.0, "graph_ms": 2.1}})
    assert slower["convert"] == [] and slower["rejected_end_to_end"]["compared_by"] == "graph_ms"
    assert "(2.10 vs 2.00 ms as CUDA graphs)" in slower["summary"]
    one_graph = recommendation(rows, {"dense": {"ms": 120.0}, "converted": {"ms": 90.0, "graph_ms": 80.0}})
    assert one_graph["convert"] == [0]  # eager against eager when only one forward was captured
    one_graph = recommendation(rows, {"dense": {"ms": 120.0}, "converted": {"ms": 119.0, "graph_ms": 80.0}})
    assert one_graph["convert"] == [] and one_graph["rejected_end_to_end"]["compared_by"] == "ms"
    # the summary's speedup of the recommendation is on the same clock as the check, and says which
    from sla2cli.profiling.profile import _e2e_summary
    e2e = {name: {"ms": ms, "iqr_ms": 0.1, "graph_ms": graph, "peak_memory_mib": None}
           for name, ms, graph in (("dense", 9.35, 2.17), ("converted", 14.24, 2.09), ("no_attention", 8.6, 1.86))}
    e2e["recommended"] = e2e["converted"]
    summary = _e2e_summary(e2e)
    assert summary["recommended_speedup"] == pytest.approx(2.17 / 2.09)
    assert summary["recommended_compared_by"] == "graph_ms" and summary["speedup"] == pytest.approx(9.35 / 14.24)
