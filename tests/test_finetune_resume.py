"""A finetune stopped mid-way (interrupted, or killed outright) and resumed ends exactly where an
uninterrupted run ends; a diverging run stops with a clear error and writes nothing."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import one_json
from finetune_support import converted_file, one_thread, random_model  # noqa: F401
from safetensors.torch import load_file

import sla2cli.finetune.sources as sources
import sla2cli.finetune.trainer as trainer

ARGS = ("--data-free", "--data-free-samples", "6", "--batch-size", "2", "--eval-samples", "2", "--device", "cpu",
        "--save-every", "2", "--json")


@pytest.fixture
def src(cli, tmp_path):
    return converted_file(cli, tmp_path, model=random_model())


def _same_files(a, b):
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta), [k for k in ta if not torch.equal(ta[k], tb[k])]


def _interrupt_at(monkeypatch, step):
    """Make the teacher pass of training step `step` (1-based) raise KeyboardInterrupt, like Ctrl-C."""
    calls = {"n": 0}
    original = trainer.record_dense_qkv

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer, "record_dense_qkv", failing)


@pytest.mark.parametrize("stage", [(), ("--full", "--lr", "1e-3")], ids=["router", "full"])
def test_interrupted_and_resumed_equals_uninterrupted(cli, src, tmp_path, monkeypatch, stage):
    whole, parts = tmp_path / "whole.safetensors", tmp_path / "parts.safetensors"
    code, out, err = cli("finetune", src, "-o", whole, "--steps", "7", *stage, *ARGS)
    assert code == 0, err
    expected = one_json(out)

    if not stage:
        _interrupt_at(monkeypatch, 6)
    else:  # stage 2 has no teacher pass: interrupt its sixth batch instead
        calls = {"n": 0}
        original = sources.noised

        def failing(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 7:  # the evaluation batch is the first call
                raise KeyboardInterrupt
            return original(*args, **kwargs)

        monkeypatch.setattr(sources, "noised", failing)
    code, out, err = cli("finetune", src, "-o", parts, "--steps", "7", *stage, *ARGS)
    assert code == 130 and "interrupted" in err and out == ""
    state = tmp_path / "parts.safetensors.resume.pt"
    assert not parts.exists() and state.exists()
    assert torch.load(state, weights_only=True)["step"] == 4
    monkeypatch.undo()

    code, out, err = cli("finetune", src, "-o", parts, "--steps", "7", *stage, *ARGS, "--resume")
    assert code == 0, err
    resumed = one_json(out)
    assert resumed["resumed_from"] == 4 and resumed["steps_run"] == 3 and not state.exists()
    assert resumed["loss_history"] == expected["loss_history"]
    assert resumed["per_layer"] == expected["per_layer"]
    _same_files(whole, parts)


def test_killed_process_resumes_to_the_same_result(cli, src, tmp_path):
    """SIGKILL a real `sla2 finetune` process once it has saved a state, then resume it in-process."""
    whole, parts = tmp_path / "whole.safetensors", tmp_path / "parts.safetensors"
    args = ("--steps", "40", "--save-every", "1", *ARGS[:-3], "--json")
    code, _, err = cli("finetune", src, "-o", whole, *args)
    assert code == 0, err
    state = tmp_path / "parts.safetensors.resume.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", "from sla2cli.cli import main; main()", "finetune", str(src), "-o",
                             str(parts), *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    assert state.exists() and not parts.exists()
    saved = torch.load(state, weights_only=True)["step"]
    assert 1 <= saved < 40
    code, out, err = cli("finetune", src, "-o", parts, *args, "--resume")
    assert code == 0, err
    assert one_json(out)["resumed_from"] == saved
    _same_files(whole, parts)


def test_resume_refuses_other_options_and_a_leftover_state_needs_a_decision(cli, src, tmp_path, monkeypatch):
    dst = tmp_path / "ft.safetensors"
    _interrupt_at(monkeypatch, 3)
    assert cli("finetune", src, "-o", dst, "--steps", "5", *ARGS)[0] == 130
    monkeypatch.undo()
    state = tmp_path / "ft.safetensors.resume.pt"
    saved = state.read_bytes()

    code, out, err = cli("finetune", src, "-o", dst, "--steps", "5", *ARGS, "--resume", "--lr", "0.5")
    assert code == 2 and "different options: lr" in err and out == "" and err.count("\n") == 1
    code, _, err = cli("finetune", src, "-o", dst, "--steps", "5", *ARGS)
    assert code == 2 and "pass --resume to continue it, or --force" in err
    other = converted_file(cli, tmp_path, "--layers", "1-2", "--topk", "0.2", name="other.safetensors")
    code, _, err = cli("finetune", other, "-o", dst, "--steps", "5", *ARGS, "--resume")
    assert code == 2 and "another input file" in err
    assert state.read_bytes() == saved and not dst.exists()

    state.write_bytes(b"not a torch file")
    code, _, err = cli("finetune", src, "-o", dst, "--steps", "5", *ARGS, "--resume")
    assert code == 1 and "cannot read the resumable state" in err and err.count("\n") == 1

    code, out, err = cli("finetune", src, "-o", dst, "--steps", "5", *ARGS, "--force")  # start over
    assert code == 0, err
    assert one_json(out)["resumed_from"] is None and dst.exists() and not state.exists()


def test_diverging_loss_stops_with_a_clear_error_and_writes_nothing(cli, src, tmp_path):
    dst = tmp_path / "ft.safetensors"
    code, out, err = cli("finetune", src, "-o", dst, "--steps", "6", "--lr", "1e30", *ARGS[:-3], "--save-every", "1")
    assert code == 1 and out == ""
    last = err.strip().splitlines()[-1]  # progress lines come before it; the error is one line
    assert last.startswith(("error: the loss became", "error: the gradients became")), err
    assert "nan" in last or "inf" in last
    assert "lower --lr" in last and "--resume continues" in last and "Traceback" not in err
    assert not dst.exists()
    state = torch.load(tmp_path / "ft.safetensors.resume.pt", weights_only=True)
    assert all(torch.isfinite(w).all() for w in state["weights"].values())
