"""The showcase model (issue 18): its architecture, the training script's options for it (resume across calls),
and `sla2 demo --model`; the trained asset (made on a GPU by bench/showcase.sh) loads and gives its stored forward.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from sla2cli.data.textures import TRAIN_SEED, texture_batch
from sla2cli.errors import CheckpointError
from sla2cli.models.jit import JiT, JiTConfig
from sla2cli.models.shipped import DEMO, SHIPPED_MODELS, SHOWCASE, half_storage_copy
from sla2cli.pipeline import MANIFEST, demo_model, plan_for
from sla2cli.profiling import model_flops

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_demo_model.py"
MiB = 2 ** 20


@pytest.fixture(scope="module")
def script():
    """scripts/train_demo_model.py as a module (registered: its dataclass resolves annotations through it)."""
    spec = importlib.util.spec_from_file_location("train_demo_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


# --- the architecture -----------------------------------------------------------------------------------

def test_showcase_has_4096_tokens_heads_of_64_and_a_file_under_16_mb():
    c = SHOWCASE.config
    assert c.grid_size ** 2 == 4096 and c.tokens(c.depth - 1) == 4096 + c.in_context_len and c.head_dim == 64
    model = JiT(c)
    assert sum(p.numel() for p in model.parameters()) <= 7.5e6
    shipped = half_storage_copy(model)
    size = len(save({k: v.contiguous() for k, v in shipped.state_dict().items()}))
    assert size < 15 * MiB, size / MiB  # the device returns files of 16 MiB at most
    assert SHOWCASE.held_out_seed not in (TRAIN_SEED, DEMO.held_out_seed) and SHOWCASE.needs_cuda


def test_attention_is_most_of_the_showcase_forward():
    flops = model_flops(JiT(SHOWCASE.config), batch_size=1, resolution=128, counter="fvcore")
    share = sum(flops.dense_attention) / flops.dense_total
    assert 0.75 < share < 0.8, share  # recorded in models/shipped.py: 78% (103.4 of 132.5 GFLOP)
    demo = model_flops(JiT(DEMO.config), batch_size=1, resolution=64, counter="fvcore")
    assert sum(demo.dense_attention) / demo.dense_total < 0.5


def test_textures_render_at_128_px():
    x, y = texture_batch(torch.arange(16), seed=SHOWCASE.held_out_seed, size=128)
    assert x.shape == (16, 3, 128, 128) and x.min() >= -1 and x.max() <= 1
    assert (x.flatten(1).std(dim=1) > 0.1).all()


# --- the training script ----------------------------------------------------------------------------------

def _args(script, tmp_path, *extra):
    return script.parse_args(["--device", "cpu", "--out-dir", str(tmp_path), "--minutes", "100000", *map(str, extra)])


def _state(folder: Path) -> dict:
    return {part: torch.load(folder / f"{part}.pt", weights_only=True) for part in ("model", "ema", "exp_avg",
                                                                                   "exp_avg_sq")}


def test_showcase_two_step_smoke_training_with_a_compact_state(script, tmp_path):
    args = _args(script, tmp_path, "--model", "showcase", "--max-steps", 2, "--batch-size", 1, "--save-state",
                 "--compact-state")
    assert (args.lr, args.warmup, args.minutes) == (6e-4, 100, 100000)  # the recipe fills what is not given
    ema, record = script.train(args)
    assert record["steps"] == 2 and [s for s, _ in record["history"]] == [0, 1]
    assert ema.config == SHOWCASE.config
    folder = script.state_folder(tmp_path, SHOWCASE)
    for part in folder.iterdir():  # each comes back from a device call (16 MiB a file)
        assert part.stat().st_size < 12 * MiB, part
    state = _state(folder)
    assert {v.dtype for v in state["model"]["weights"].values()} == {torch.float16}
    assert {v.dtype for v in state["exp_avg_sq"]["moments"].values()} == {torch.bfloat16}


def test_resume_continues_the_step_count_exactly(script, tmp_path):
    """Two steps, or one step, the state, and one more step in a second call: the same weights, EMA, moments."""
    whole, first, second = tmp_path / "whole", tmp_path / "first", tmp_path / "second"
    common = ("--batch-size", 2, "--save-state", "--eval-images", 1, "--sample-steps", 0)
    script.train(_args(script, whole, "--max-steps", 2, *common))
    script.train(_args(script, first, "--max-steps", 1, *common))
    assert script.main(["--device", "cpu", "--out-dir", str(second), "--minutes", "100000", "--max-steps", "2",
                        "--resume", str(script.state_folder(first, DEMO)), *map(str, common)]) == 0
    a, b = _state(script.state_folder(whole, DEMO)), _state(script.state_folder(second, DEMO))
    assert a["model"]["step"] == b["model"]["step"] == 2 and b["model"]["calls"] == 2
    assert a["model"]["history"] == b["model"]["history"]
    for part, key in (("model", "weights"), ("ema", "weights"), ("exp_avg", "moments"), ("exp_avg_sq", "moments")):
        # the cosine is a function of wall time over a budget of 10^5 minutes: equal up to rounding
        torch.testing.assert_close(b[part][key], a[part][key], rtol=1e-6, atol=1e-7)
    assert b["model"]["elapsed"] > _state(script.state_folder(first, DEMO))["model"]["elapsed"]
    record = json.loads((second / "demo-train.json").read_text())
    assert record["steps"] == 2 and record["calls"] == 2 and record["provenance"]["calls"] == 2
    assert (second / "demo-jit.safetensors").exists() and (second / "demo-loss.png").exists()
    assert not (second / "demo-samples.png").exists()  # --sample-steps 0: no grids


def test_a_call_ends_after_call_minutes_and_a_resume_needs_the_same_options(script, tmp_path):
    _, record = script.train(_args(script, tmp_path, "--batch-size", 2, "--save-state", "--call-minutes", 0))
    assert record["steps"] == 0
    folder = script.state_folder(tmp_path, DEMO)
    with pytest.raises(SystemExit, match="--batch-size 2 \\(now 4\\)"):
        script.train(_args(script, tmp_path / "next", "--batch-size", 4, "--resume", folder))


def test_sample_grid_at_128_px_is_not_enlarged(script, tmp_path):
    from PIL import Image

    config = JiTConfig(input_size=128, patch_size=16, hidden_size=64, depth=1, num_heads=1, ffn_hidden_dim=64,
                       num_classes=8, bottleneck_dim=16, in_context_len=0)
    path = tmp_path / "grid.png"
    script.sample_grid(JiT(config).eval(), SHOWCASE.held_out_seed, torch.device("cpu"), path, per_class=1, steps=1,
                       cfg=1.0, title="t")
    # 96 px of class names, two held-out images and one sample of 128 + 4 px, a 12 px gap; a 22 px title row
    assert Image.open(path).size == (96 + 3 * 132 + 12, 22 + 8 * 132)


# --- sla2 demo --model ------------------------------------------------------------------------------------

def test_demo_model_choice_and_cpu_fallback():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert demo_model("demo", cpu) == (DEMO, None)
    shipped, notice = demo_model("showcase", cpu)
    assert shipped is DEMO and "needs a GPU" in notice and "demo model" in notice and "\n" not in notice
    if SHOWCASE.path.exists():
        assert demo_model("showcase", cuda) == (SHOWCASE, None)
    else:
        with pytest.raises(CheckpointError, match="missing from this installation"):
            demo_model("showcase", cuda)
    assert plan_for(False, cpu).speed_batch == 0 and plan_for(False, cuda).speed_batch == 8


def test_the_showcase_demo_trains_stage_1_as_the_recipe_does():
    """On a GPU the showcase's demo runs the recipe's stage 1 (100 steps of 32, bf16, the router's default
    rate) on t among the sampler's first steps (what cut its 95% texture FD from 93.4 to 11.8), the demo model
    keeps its 30-second plan, and a CPU or a --fast run keeps its own."""
    from sla2cli.finetune import FinetuneConfig
    from sla2cli.finetune.config import ROUTER_LR

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    plan = plan_for(False, cuda, SHOWCASE)
    got = (plan.finetune_steps, plan.finetune_batch, plan.finetune_dtype, plan.finetune_t, plan.train_textures,
           plan.stage2_steps)
    assert got == (100, 32, "bf16", "early", 2048, 400)
    assert plan_for(False, cuda).stage2_steps == 0 == plan_for(False, cpu, SHOWCASE).stage2_steps
    assert plan_for(False, cuda).finetune_t == "jit" == plan_for(False, cpu).finetune_t
    assert FinetuneConfig(steps=1, lr=plan.finetune_lr).learning_rate == ROUTER_LR
    assert plan_for(False, cuda, DEMO) == plan_for(False, cuda)
    assert plan_for(False, cuda).finetune_steps == 60 and plan_for(False, cuda).finetune_dtype == "fp32"
    assert plan_for(True, cuda, SHOWCASE) == plan_for(True, cuda)
    assert plan_for(False, cpu, SHOWCASE) == plan_for(False, cpu)


def test_demo_on_a_cpu_warns_once_that_the_showcase_needs_a_gpu(cli, tmp_path):
    foreign = tmp_path / "mine"  # refused right after the model is chosen: the pipeline never runs
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    code, _, stderr = cli("demo", "--model", "showcase", "--device", "cpu", "--out", foreign)
    assert code == 2 and "not made by 'sla2 demo'" in stderr
    warnings = [line for line in stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "showcase model" in warnings[0] and "needs a GPU" in warnings[0]


def test_demo_with_the_showcase_asset_missing_is_one_line(cli, tmp_path, monkeypatch):
    absent = dataclasses.replace(SHOWCASE, path=tmp_path / "showcase-jit.safetensors", needs_cuda=False)
    monkeypatch.setitem(SHIPPED_MODELS, "showcase", absent)  # as on a GPU, where there is no fallback
    with pytest.raises(CheckpointError, match="missing from this installation"):
        absent.load()
    out = tmp_path / "out"
    code, stdout, stderr = cli("demo", "--model", "showcase", "--device", "cpu", "--out", out)
    assert code != 0 and stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "showcase model" in lines[0] and "missing from this installation" in lines[0]
    assert not out.exists()  # nothing made before the check


def test_demo_refuses_an_unknown_model(cli, tmp_path):
    code, _, stderr = cli("demo", "--model", "huge", "--out", tmp_path / "out")
    assert code == 2 and "--model" in stderr and "demo, showcase" in stderr


def test_speed_step_rendering():
    from rich.console import Console

    from sla2cli.commands.demo import STEPS, summary_table

    speed = {"batch": 8, "steps": 50, "cfg": 2.0, "dtype": "bf16", "layers": [0, 1], "speedup": 1.6,
             "cuda_graphs": True,
             "models": {"dense": {"images_per_second": 5.0, "ms_per_batch": 1600.0, "iqr_ms": 4.0,
                                  "compile_blocks": True, "compile_error": None},
                        "SLA2": {"images_per_second": 8.0, "ms_per_batch": 1000.0, "iqr_ms": 3.0,
                                 "compile_blocks": True, "compile_error": None}}}
    step = next(s for s in STEPS if s.key == "speed")
    assert step.when == "speed_batch"
    console = Console(record=True, width=200)
    step.render(speed, console)
    console.print(summary_table({"speed": speed}, [0, 1], {"speed": 12.0}))
    text = console.export_text()
    assert "sampling speed, end to end" in text and "1.60x as many images" in text
    assert "5.00 → 8.00 (1.60x)" in text and "CUDA graphs, blocks compiled)" in " ".join(text.split())
    speed["models"]["SLA2"].update(compile_blocks=False, compile_error="RuntimeError: no compiler")
    console = Console(record=True, width=200)
    step.render(speed, console)
    text = " ".join(console.export_text().split())  # the title wraps
    assert "CUDA graphs)" in text and "blocks compiled" not in text
    assert "SLA2: compiling the blocks failed (RuntimeError: no compiler); timed uncompiled" in text


def test_manifest_names_the_model(tmp_path):
    from sla2cli.pipeline import Demo, write_manifest

    demo = Demo(out=tmp_path, device=torch.device("cpu"), plan=plan_for(True, torch.device("cpu")))
    assert json.loads(write_manifest(demo, {}).read_text())["model"] == "demo" and (tmp_path / MANIFEST).exists()


def test_speed_step_times_dense_and_sla2_sampling(tmp_path):
    """The step's arithmetic on a tiny model on a CPU (where `sla2 demo` never runs it: no CUDA graphs there)."""
    import copy

    from conftest import nonzero_model

    from sla2cli.pipeline import Demo, demo_settings, step_speed
    from sla2cli.sla2.layers import apply_sla2

    cpu = torch.device("cpu")
    plan = dataclasses.replace(plan_for(True, cpu), speed_batch=1, speed_steps=1, profile_ms=1.0)
    dense = nonzero_model()
    converted = copy.deepcopy(dense)
    apply_sla2(converted, [0, 1], demo_settings())
    demo = Demo(out=tmp_path, device=cpu, plan=plan, dense=dense, converted=converted.eval(), layers=[0, 1])
    r = step_speed(demo)
    assert (r["batch"], r["steps"], r["cfg"], r["layers"]) == (1, 1, 2.0, [0, 1])
    for m in r["models"].values():
        assert m["images_per_second"] == pytest.approx(1 / (m["ms_per_batch"] / 1e3)) and m["repeats"] >= 5
    dense_ips, sla2_ips = (r["models"][k]["images_per_second"] for k in ("dense", "SLA2"))
    assert r["speedup"] == pytest.approx(sla2_ips / dense_ips)
    assert all(m["compile_blocks"] is False and m["compile_error"] is None for m in r["models"].values())  # CPU



def test_profile_step_runs_the_samplers_forward_batch(tmp_path):
    """Where the demo times sampling (batch 8, guidance: forwards of 16), its profile times that batch too: at
    batch 1 the showcase's forward is host-bound and the profile advised against the conversion that then
    sampled 1.40x faster. Without a speed step (a CPU) it stays at batch 1."""
    from conftest import nonzero_model

    from sla2cli.pipeline import Demo, step_profile

    cpu = torch.device("cpu")
    for speed_batch, batch in ((2, 4), (0, 1)):
        plan = dataclasses.replace(plan_for(True, cpu), speed_batch=speed_batch, profile_ms=1.0)
        demo = Demo(out=tmp_path, device=cpu, plan=plan, dense=nonzero_model(), candidates=[0, 1])
        report = step_profile(demo)
        assert report["batch_size"] == batch and report["converted_layers"] == [0, 1]


# --- the trained asset ------------------------------------------------------------------------------------

def test_shipped_showcase_loads_and_gives_its_stored_forward():
    """The asset in the package (trained by bench/showcase.sh on an H200): its architecture, and one forward
    on fixed noise against the output stored when it shipped (every 8th pixel of a 1×3×128×128 x-prediction)."""
    from safetensors.torch import load_file

    model, info = SHOWCASE.load()
    assert model.config == SHOWCASE.config and {p.dtype for p in model.parameters()} == {torch.float32}
    assert info.provenance["source"] == "scripts/train_demo_model.py" and info.provenance["steps"] > 0
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x, torch.tensor([0.5]), torch.tensor([3]))
    assert out.shape == (1, 3, 128, 128)
    stored = load_file(Path(__file__).parent / "data" / "showcase-forward.safetensors")["output"]
    torch.testing.assert_close(out[:, :, ::8, ::8], stored, rtol=1e-4, atol=1e-4)


def test_showcase_conversion_is_the_recipe_without_qat_within_an_error_budget(tmp_path):
    """The showcase's demo converts each layer as sparse as its error budget allows, QAT off; run here on the small
    model's weights under the showcase's name (the showcase itself is too slow for a CPU test)."""
    from sla2cli.checkpoints import load_model
    from sla2cli.models.shipped import DEMO
    from sla2cli.pipeline import (
        DEMO_CONVERSIONS,
        SHOWCASE_MAX_ERROR,
        Demo,
        demo_settings,
        step_convert,
        step_plan_layers,
    )

    assert DEMO_CONVERSIONS["demo"].max_error is None and demo_settings().qat  # the small model: balanced, QAT
    settings = demo_settings(SHOWCASE)
    assert not settings.qat and settings.feature_rank == 16 and settings.alpha_mode == "per_query"
    cpu = torch.device("cpu")
    shipped = dataclasses.replace(DEMO, name="showcase")
    demo = Demo(out=tmp_path, device=cpu, plan=plan_for(True, cpu), shipped=shipped)
    demo.dense, demo.info = shipped.load()
    step_plan_layers(demo)
    r = step_convert(demo)
    assert r["conversion"] == f"balanced preset, no QAT, per-layer error <= {SHOWCASE_MAX_ERROR:g}"
    records = {b["layer"]: b for b in r["budget"]}
    assert sorted(records) == demo.candidates and demo.layers == r["layers"]
    within = [i for i, b in records.items() if b["reason"] == "within_budget"]
    assert within == r["layers"] and within  # some layer fits the budget at this size
    for i in within:
        assert records[i]["error"] <= SHOWCASE_MAX_ERROR
    model, info = load_model(r["output"])
    assert info.sla2_layers == within and not info.sla2_config.qat
    assert info.provenance["max_error"] == SHOWCASE_MAX_ERROR and info.provenance["preset"] == "balanced"
    per_layer_topk = {row["layer"]: row["topk"] for row in r["per_layer"] if row["converted"]}
    assert per_layer_topk == {i: records[i]["topk"] for i in within}
    from rich.console import Console

    from sla2cli.commands.demo import STEPS

    console = Console(record=True, width=200)
    next(s for s in STEPS if s.key == "convert").render(r, console)
    text = " ".join(console.export_text().split())
    assert "no QAT, per-layer error <= 0.02) → SLA2 topk=per layer" in text
    assert f"layer {within[0]}: fewest blocks with error" in text
    from sla2cli.commands.demo import summary_table

    console = Console(record=True, width=200)
    console.print(summary_table({"convert": r}, r["layers"], {"convert": 1.0}))
    assert f"layers converted (balanced preset, no QAT, per-layer error <= {SHOWCASE_MAX_ERROR:g})" in \
        console.export_text()


def test_the_demo_finetune_draws_t_as_its_plan_says(tmp_path, monkeypatch):
    """The plan's finetune_t reaches stage 1's training states (the showcase's "early"), not just the plan."""
    import sla2cli.finetune as finetune_module
    from sla2cli.pipeline import Demo, step_finetune

    seen = {}

    class Result:
        per_layer: list = []

        def to_dict(self):
            return {}

    def fake_run(model, info, *, data, config, **_):
        seen["data"], seen["config"] = data, config
        return Result()

    monkeypatch.setattr(finetune_module, "run_finetune", fake_run)
    cpu = torch.device("cpu")
    plan = dataclasses.replace(plan_for(True, cpu), finetune_t="early")
    demo = Demo(out=tmp_path, device=cpu, plan=plan, files={"converted": str(DEMO.path)})
    step_finetune(demo)
    assert seen["data"].t_distribution == "early" and seen["config"].steps == plan.finetune_steps


def test_the_showcase_demo_runs_the_recipes_stage_2_from_stage_1s_model(tmp_path, monkeypatch):
    """Stage 2 starts from stage 1's file, trains every weight by the recipe (JiT's v-loss at its rate, EMA) on
    the same textures at JiT's t, not stage 1's, and its output becomes the finetuned model the later steps
    measure (stage 1's is kept)."""
    import sla2cli.finetune as finetune_module
    from sla2cli.commands.demo import STEPS
    from sla2cli.finetune.config import RECIPE
    from sla2cli.pipeline import Demo, step_stage2

    seen = {}

    class Result:
        def to_dict(self):
            return {"stage": "full"}

    def fake_run(model, info, *, source, dst, data, config, **_):
        seen.update(source=source, dst=dst, data=data, config=config)
        return Result()

    monkeypatch.setattr(finetune_module, "run_finetune", fake_run)
    cpu = torch.device("cpu")
    plan = dataclasses.replace(plan_for(True, cpu), finetune_t="early", stage2_steps=3)
    stage1 = str(DEMO.path)
    demo = Demo(out=tmp_path, device=cpu, plan=plan, files={"finetuned": stage1, "train_textures": str(tmp_path)})
    assert step_stage2(demo) == {"stage": "full"}
    config = seen["config"]
    assert config.full and config.steps == 3 and config.learning_rate == RECIPE["lr"] == 1.5e-4
    assert config.objective == "v" and config.ema == 0.995 and seen["source"] == DEMO.path
    assert seen["data"].folder == tmp_path and seen["data"].t_distribution == "jit"
    assert demo.files["stage1"] == stage1 and demo.files["finetuned"] == str(seen["dst"]) != stage1
    assert demo.tuned is not None
    stage2 = next(step for step in STEPS if step.key == "stage2")
    assert stage2.when == "stage2_steps" and not getattr(plan_for(True, cpu), stage2.when)


def test_a_finetune_that_raised_a_layers_error_advises_longer_stage_1(tmp_path, monkeypatch):
    """The notice says on how many images the rise was measured and advises stage 1, whose error it measured,
    for longer with the plan's t distribution."""
    import sla2cli.finetune as finetune_module
    from sla2cli.pipeline import Demo, step_finetune

    class Result:
        per_layer = [{"layer": 0, "error_before": 0.0190, "error_after": 0.0195},
                     {"layer": 2, "error_before": 0.021, "error_after": 0.033}]

        def to_dict(self):
            return {}

    monkeypatch.setattr(finetune_module, "run_finetune", lambda *a, **k: Result())
    cpu = torch.device("cpu")
    plan = dataclasses.replace(plan_for(True, cpu), finetune_t="early")
    demo = Demo(out=tmp_path, device=cpu, plan=plan, files={"converted": str(DEMO.path)})
    step_finetune(demo)
    (notice,) = demo.notices
    assert "layer(s) 2 (0.021 → 0.033) on its" in notice  # layer 0 rose by less than 5%
    assert f"on its {min(4, plan.train_textures)} evaluation images" in notice
    assert "--objective distill --t-distribution early --steps 300" in notice and "--recipe" not in notice


def test_the_plans_dense_until_reaches_the_fid_and_speed_steps(tmp_path, monkeypatch):
    """bench/quality.sh's dense-early-steps rows: the SLA2 model's FID samples and timed sampling run its dense
    twin before the plan's dense_until, the dense model's never."""
    import sla2cli.metrics as metrics_module
    import sla2cli.pipeline as pipeline
    from sla2cli.checkpoints import load_model
    from sla2cli.pipeline import Demo, step_fid, step_speed
    from sla2cli.sla2 import SLA2Config, apply_sla2, sla2_layers

    cpu = torch.device("cpu")
    plan = dataclasses.replace(plan_for(True, cpu), speed_batch=1, speed_steps=3, profile_ms=1.0, dense_until=0.5)
    dense = load_model(DEMO.path)[0].eval()
    tuned = load_model(DEMO.path)[0].eval()
    apply_sla2(tuned, [0, 1], SLA2Config(topk=0.25, block_q=16, block_k=16))
    demo = Demo(out=tmp_path, device=cpu, plan=plan, dense=dense, tuned=tuned, layers=[0, 1],
                files={"converted": str(DEMO.path)})
    calls = []

    def recording(model, noise, labels, **kwargs):
        calls.append((model, kwargs["dense_model"], kwargs["dense_until"]))
        return noise

    monkeypatch.setattr(pipeline, "sample", recording)
    result = step_speed(demo)
    assert result["dense_until"] == 0.5
    assert {(m is tuned, d is not None and not sla2_layers(d), u) for m, d, u in calls} == {
        (False, False, 0.0), (True, True, 0.5)}
    requests = []
    monkeypatch.setattr(metrics_module, "evaluate", lambda r: requests.append(r) or {})
    step_fid(demo)
    assert [r.dense_until for r in requests] == [0.0, 0.5] and requests[0].model == DEMO.path
