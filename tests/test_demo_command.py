"""`sla2 demo --fast` runs the whole pipeline on the shipped model and leaves its results in --out."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import one_json
from PIL import Image

from sla2cli.checkpoints import load_model
from sla2cli.models.shipped import DEMO_CONFIG, DEMO_MODEL_PATH
from sla2cli.pipeline import MANIFEST, plan_for, prepare_out

FAST = plan_for(True, torch.device("cpu"))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One `sla2 demo --fast --json` run (about a minute on two CPU cores), shared by the tests below."""
    import contextlib
    import io

    from sla2cli.cli import run

    out = tmp_path_factory.mktemp("demo") / "out"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = run(["demo", "--fast", "--device", "cpu", "--out", str(out), "--json"])
    return code, stdout.getvalue(), stderr.getvalue(), out


def test_demo_exits_0_with_one_json_document(demo_run):
    code, stdout, stderr, out = demo_run
    assert code == 0, stderr
    doc = one_json(stdout)
    assert doc["plan"] == FAST.to_dict()
    assert doc["layers"], "the demo converts at least one layer"
    for step in ("model", "plan", "profile", "convert", "finetune", "measure", "samples", "fid"):
        assert step in doc["results"] and step in doc["seconds"], step
    assert "speed" not in doc["results"] and doc["model"] == "demo"  # timed on a GPU only


def test_demo_writes_converted_model_grid_and_manifest(demo_run):
    code, stdout, _, out = demo_run
    doc = one_json(stdout)
    model, info = load_model(doc["files"]["converted"])
    assert model.config == DEMO_CONFIG and info.sla2_layers == doc["layers"]
    assert info.sla2_config.topk == 0.15 and info.sla2_config.qat  # the balanced preset
    grid = Image.open(doc["files"]["grid"])
    samples = FAST.samples
    assert grid.width > samples * 64 * 2 and grid.height >= 3 * 64 * 2  # dense, SLA2, difference rows
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["complete"] and manifest["layers"] == doc["layers"]


def test_demo_numbers_are_sane(demo_run):
    _, stdout, _, out = demo_run
    r = one_json(stdout)["results"]
    assert r["model"]["held_out_v_loss"] < 0.3  # trained (untrained: about 0.86)
    for model in ("converted", "finetuned"):
        for row in r["measure"][model]["per_layer"]:
            assert 0 < row["kept_fraction"] < 0.5 and 0 < row["captured_mass"] <= 1 and 0 <= row["relative_error"] < 1
    assert r["finetune"]["steps_run"] == FAST.finetune_steps
    assert len(r["finetune"]["per_layer"]) == len(r["convert"]["layers"])
    assert {row["layer"] for row in r["profile"]["per_layer"]} == set(range(DEMO_CONFIG.depth))
    paired = r["samples"]["paired_vs_dense"]
    assert "SLA2 finetuned" in paired
    assert all(p["psnr_mean"] is None or p["psnr_mean"] > 5 for p in paired.values())
    # offline: a texture Fréchet distance in the shipped network's feature space, never Inception
    fid = r["fid"]
    assert fid["features"]["name"] == "textures" and fid["features"]["metric"] == "texture Fréchet distance"
    assert fid["fid"] > 0 and fid["kid"] is not None and fid["compare"]["fid_other"] > 0
    dense = out / f"samples-{DEMO_MODEL_PATH.stem}"  # the dense model's samples, kept for the next comparison
    assert fid["compare"]["other"] == str(dense) and fid["compare"]["kind"] == "folder"
    assert fid["compare"]["ssim_mean"] is not None
    assert not [w for w in fid["warnings"] if "samples-" in w], fid["warnings"]  # paired, made alike
    assert fid["samples"] == FAST.fid_samples and fid["reference"]["images"] == FAST.fid_samples


def test_the_fid_step_draws_the_dense_samples_once(demo_run):
    """Comparing another model (bench/quality.sh compares stage 1, the recipe and the control) reuses the dense
    samples the demo drew: same files, untouched, and the dense FD they give is the same."""
    from sla2cli.pipeline import Demo, step_fid

    _, stdout, _, out = demo_run
    first = one_json(stdout)["results"]["fid"]
    dense = out / f"samples-{DEMO_MODEL_PATH.stem}"
    before = {p.name: p.stat().st_mtime_ns for p in dense.glob("*.png")}
    converted = next(out.glob("*-sla2.safetensors"))
    demo = Demo(out=out, device=torch.device("cpu"), plan=FAST, files={"converted": str(converted)})
    again = step_fid(demo)
    assert {p.name: p.stat().st_mtime_ns for p in dense.glob("*.png")} == before and len(before) == FAST.fid_samples
    assert again["model"] == str(converted) and again["compare"]["other"] == str(dense)
    assert again["compare"]["fid_other"] == pytest.approx(first["compare"]["fid_other"], rel=1e-6)


def test_demo_human_rendering_of_every_step(demo_run):
    """What human mode prints, rendered from the same results (a second run would double the test's time)."""
    from rich.console import Console

    from sla2cli.commands.demo import STEPS, summary_table

    doc = one_json(demo_run[1])
    console = Console(record=True, width=200)
    for step in STEPS:
        if step.when is None:  # the sampling-speed step runs on a GPU only (tests/test_showcase.py renders it)
            step.render(doc["results"][step.key], console)
    console.print(summary_table(doc["results"], doc["layers"], doc["seconds"]))
    text = console.export_text()
    for title in ("convert", "stats --measure", "finetune", "End to end", "Summary", "dense-vs-sla2.png",
                  "entropy / log N", "texture Fréchet distance of", "SSIM vs dense"):
        assert title in text


def test_demo_reuses_its_own_folder_only(tmp_path):
    out = tmp_path / "out"
    prepare_out(out)
    (out / "dense-vs-sla2.png").write_bytes(b"old")
    prepare_out(out)  # an earlier demo's folder is reused
    assert json.loads((out / MANIFEST).read_text())["complete"] is False


def test_demo_refuses_a_folder_it_did_not_make(tmp_path, cli):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    code, _, stderr = cli("demo", "--fast", "--out", foreign)
    assert code == 2 and "not made by 'sla2 demo'" in stderr
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    file_out = tmp_path / "file"
    file_out.write_text("x")
    code, _, stderr = cli("demo", "--out", file_out)
    assert code == 2 and "is a file" in stderr


def test_a_demo_stopped_part_way_keeps_what_its_finished_steps_measured(tmp_path, cli, monkeypatch):
    """The manifest is rewritten after every step (complete: false until the last), and --json logs each
    step's seconds on stderr: a demo cut by a time limit still says how far it got and what it measured."""
    from sla2cli import pipeline
    from sla2cli.commands import demo as demo_command
    from sla2cli.errors import UsageError

    def stop(demo):
        raise UsageError("stopped by the test")

    monkeypatch.setattr(pipeline, "step_stop", stop, raising=False)
    monkeypatch.setattr(demo_command, "STEPS", (demo_command.STEPS[0],
                                                demo_command.Step("stop", "stop", "step_stop", lambda r, c: None)))
    out = tmp_path / "out"
    code, stdout, stderr = cli("demo", "--fast", "--device", "cpu", "--out", out, "--json")
    assert code != 0 and "stopped by the test" in stderr and stdout == ""
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["complete"] is False
    assert set(manifest["results"]) == set(manifest["seconds"]) == {"model"}
    assert manifest["results"]["model"] and manifest["seconds"]["model"] >= 0
    assert f"1/2  {demo_command.STEPS[0].title}: " in stderr
