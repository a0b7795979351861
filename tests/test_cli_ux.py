"""What a user sees around the results: a fast `--help` (no torch at import), shell completion, `--quiet`,
progress with count and ETA, help texts that agree with the library, profile spread and table width, the
stats of a dense model, the α heatmap, finetune's plot and its Ctrl-C advice."""

import io
import os
import subprocess
import sys

import pytest
import torch
from conftest import one_json
from finetune_support import converted_file, one_thread, random_model  # noqa: F401
from rich.console import Console

import sla2cli.finetune.trainer as trainer

HEAVY = ("torch", "torchvision", "torch_fidelity", "fvcore", "matplotlib", "safetensors", "huggingface_hub")
PNG = b"\x89PNG\r\n\x1a\n"


def test_the_cli_and_every_command_module_import_without_torch():
    code = ("import sys, sla2cli, sla2cli.cli; sla2cli.__version__; "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr


def test_show_completion_and_install_completion_exist():
    env = {**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    proc = subprocess.run([sys.executable, "-m", "sla2cli", "--show-completion", "bash"], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0 and "_SLA2_COMPLETE=complete_bash" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "sla2cli", "--help"], capture_output=True, text=True, timeout=120,
                          env={**env, "COLUMNS": "200"})
    assert "--install-completion" in proc.stdout and "--quiet" in proc.stdout


def test_help_texts_name_what_the_library_accepts(cli):
    """Help is written out (the library modules need torch); it must still list every choice and default."""
    from sla2cli.budget import DEFAULT_SAMPLES
    from sla2cli.finetune.config import FULL_LR, RECIPE_ROUTER_STEPS, ROUTER_LR
    from sla2cli.models.jit import ARCHITECTURES
    from sla2cli.sampling import SAMPLERS

    def helps(command):
        from typer.main import get_command

        from sla2cli.cli import app
        params = get_command(app).commands[command].params
        return {p.name: (p.help or "", p.default) for p in params}

    assert all(name in helps("profile")["arch"][0] for name in ARCHITECTURES)
    assert all(name in helps("eval-fid")["sampler"][0] for name in SAMPLERS)
    assert f"default {DEFAULT_SAMPLES} " in helps("convert")["calibrate"][0]
    finetune = helps("finetune")
    assert f"{ROUTER_LR:g}" in finetune["lr"][0] and f"{FULL_LR:g}" in finetune["lr"][0]
    assert finetune["router_steps"][1] == RECIPE_ROUTER_STEPS


def test_progress_shows_count_and_eta():
    from sla2cli.commands._common import Output

    out = Output(False)
    buffer = io.StringIO()
    out.stderr = Console(file=buffer, force_terminal=True, width=120)
    with out.progress() as progress:
        task = progress.add_task("finetuning", total=10)
        progress.update(task, completed=3)
        progress.refresh()
        assert progress.columns and not progress.disable
        rendered = "".join(str(column.render(progress.tasks[0])) for column in progress.columns[3:])
    assert "3/10" in rendered and ":" in rendered  # M/N and a time remaining h:mm:ss


@pytest.fixture
def tiny(cli, tmp_path):
    return converted_file(cli, tmp_path, model=random_model())


def test_quiet_keeps_the_result_and_drops_progress_and_logs(cli, tiny, tmp_path):
    args = ("finetune", tiny, "--data-free", "--data-free-samples", "2", "--batch-size", "1", "--eval-samples", "1",
            "--steps", "2", "--device", "cpu", "--save-every", "0")
    code, out, err = cli("--quiet", *args, "-o", tmp_path / "q.safetensors")
    assert code == 0 and "wrote" in out and err == ""
    code, out, err = cli(*args, "-o", tmp_path / "loud.safetensors")
    assert code == 0 and "finetune (router)" in err  # the info line --quiet dropped


def test_ctrl_c_in_finetune_says_where_the_state_is_and_how_to_resume(cli, tiny, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = trainer.record_dense_qkv

    def failing(*args, **kwargs):  # the teacher pass of training step 4 is Ctrl-C
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer, "record_dense_qkv", failing)
    dst = tmp_path / "out.safetensors"
    args = ["finetune", str(tiny), "-o", str(dst), "--data-free", "--data-free-samples", "2", "--batch-size", "1",
            "--eval-samples", "1", "--steps", "5", "--save-every", "2", "--device", "cpu"]
    code, out, err = cli(*args)
    assert code == 130 and out == "" and "error" not in err
    assert "interrupted at step 4 of 5" in err and f"the state of step 2 is saved in {dst}.resume.pt" in err
    assert "sla2 " + " ".join(args) + " --resume" in " ".join(err.split())


def test_finetune_plot_draws_the_curves(cli, tiny, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "curves.png"
    code, out, err = cli("finetune", tiny, "-o", tmp_path / "ft.safetensors", "--data-free", "--data-free-samples", "2",
                         "--batch-size", "1", "--eval-samples", "1", "--steps", "3", "--device", "cpu", "--plot", png,
                         "--json")
    assert code == 0, err
    assert one_json(out)["plot"] == str(png) and png.read_bytes()[:8] == PNG


def test_stats_of_a_dense_model_shows_concentration_and_suggests_layers(cli, official_pth, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "mass.png"
    args = ("stats", official_pth, "--in-context-start", "2", "--device", "cpu", "--batch-size", "1")
    code, out, err = cli(*args, "--json", "--plot", png)
    assert code == 0, err
    doc = one_json(out)
    rows = doc["concentration"]
    assert [r["layer"] for r in rows] == [0, 1, 2, 3] and png.read_bytes()[:8] == PNG
    for r in rows:
        masses = [r["captured_mass"][k] for k in ("0.05", "0.15", "0.25")]
        assert 0 < masses[0] <= masses[1] <= masses[2] <= 1.0 + 1e-6 and 0 < r["entropy_ratio"] <= 1.0
        ceilings = [r["mass_ceiling"][k] for k in ("0.05", "0.15", "0.25")]  # no router keeps more with as many keys
        assert all(m <= c + 1e-5 for m, c in zip(masses, ceilings)) and ceilings == sorted(ceilings)
    assert doc["suggested_layers"] == "none"  # 4-5 key blocks of 64 tokens: too few to pay off
    code, out, _ = cli(*args)
    assert code == 0 and "no layer is converted" in out and "mass @ topk 0.15" in out and "suggested:" in out
    assert "the most any router" in out


def test_suggest_layers_needs_key_blocks_and_captured_mass():
    from sla2cli.conversion import suggest_layers
    rows = [{"layer": 0, "key_blocks": 16, "captured_mass": {0.15: 0.9}},
            {"layer": 1, "key_blocks": 16, "captured_mass": {0.15: 0.5}},
            {"layer": 2, "key_blocks": 4, "captured_mass": {0.15: 0.95}}]
    assert suggest_layers(rows) == [0]


def test_stats_plot_of_a_converted_model_is_an_alpha_heatmap(cli, official_pth, tmp_path):
    pytest.importorskip("matplotlib")
    src = tmp_path / "sla2.safetensors"
    assert cli("convert", official_pth, "-o", src, "--layers", "2-3", "--in-context-start", "2")[0] == 0
    png = tmp_path / "alpha.png"
    code, out, err = cli("stats", src, "--plot", png)
    assert code == 0 and "plot written" in out and png.read_bytes()[:8] == PNG
    code, _, err = cli("stats", src, "--plot", png)
    assert code == 2 and "--force" in err


def test_profile_spread_inconclusive_and_narrow_tables(cli, official_pth):
    from sla2cli.profiling import render
    from sla2cli.profiling.profile import overlap

    base = ("--in-context-start", "2", "--device", "cpu", "--resolution", "16", "--bench-ms", "2", "--threads", "1")
    code, out, err = cli("profile", official_pth, *base, "--layers", "2-3", "--topk", "0.5", "--json")
    assert code == 0, err
    report = one_json(out)
    for r in report["per_layer"]:
        assert r["dense_attention_iqr_ms"] >= 0 and r["rest_of_block_iqr_ms"] >= 0
    for r in report["per_layer"][2:]:
        assert r["sla2_attention_iqr_ms"] >= 0 and isinstance(r["inconclusive"], bool)
    assert report["end_to_end"]["dense_iqr_ms"] >= 0 and isinstance(report["end_to_end"]["inconclusive"], bool)
    console = Console(width=120, record=True)
    for table in (render.per_layer_table(report), render.end_to_end_table(report)):
        console.print(table)
    text = console.export_text()
    assert all(len(line) <= 120 for line in text.splitlines()) and "…" not in text
    for r in report["per_layer"]:
        assert f"{r['dense_attention_ms']:.3f}±{r['dense_attention_iqr_ms']:.3f}" in text
    wide = Console(width=400, record=True)
    wide.print(render.per_layer_table(report, wide=True))
    assert "rest of block GFLOP" in wide.export_text() and "rest of block GFLOP" not in text
    assert overlap({"ms": 1.0, "iqr_ms": 0.2}, {"ms": 1.15, "iqr_ms": 0.2})
    assert not overlap({"ms": 1.0, "iqr_ms": 0.1}, {"ms": 1.5, "iqr_ms": 0.1})


def test_timer_reports_median_and_iqr_from_torch_benchmark():
    from sla2cli.profiling.timing import Timer, Timing

    timing = Timer(torch.device("cpu"), min_run_time=0.001, threads=1).eager(lambda: torch.ones(8).sum())
    assert isinstance(timing, Timing) and timing.ms > 0 and timing.iqr_ms >= 0 and timing.samples >= 5
    fixed = Timing.from_ms([1.0, 2.0, 3.0, 4.0, 5.0])
    assert fixed.ms == pytest.approx(3.0) and fixed.iqr_ms == pytest.approx(2.0)
