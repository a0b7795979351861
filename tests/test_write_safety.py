"""No path a command writes may be an input (even with --force), and two writers of one path never race."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import nonzero_model, sha256
from finetune_support import converted_file, one_thread, random_model  # noqa: F401
from test_eval_fid_cli import SMALL
from test_eval_fid_metrics import inception_weights, write_images  # noqa: F401

from sla2cli import save_model
from sla2cli.checkpoints.writing import lock_path
from sla2cli.finetune.recipe import stage1_path
from sla2cli.finetune.state import state_path

RUN = ("--data-free", "--steps", "1", "--batch-size", "2", "--eval-samples", "1", "--data-free-samples", "2",
       "--save-every", "0", "--device", "cpu")


@pytest.fixture
def src(cli, tmp_path):
    return converted_file(cli, tmp_path, model=random_model())


def _refused(cli, *args):
    code, _, err = cli(*args)
    assert code in (1, 2) and len(err.strip().splitlines()) == 1, err
    return err


def test_the_state_path_is_never_the_input_even_with_force(cli, src, tmp_path):
    trap = tmp_path / "trap"
    trap.mkdir()
    model = trap / "m.resume.pt"  # `-o trap/m` keeps its state in trap/m.resume.pt: the input
    shutil.copy(src, model)
    before = sha256(model)
    assert "input" in _refused(cli, "finetune", model, "-o", trap / "m", "--force", *RUN)
    assert sha256(model) == before
    os.link(src, trap / "h.resume.pt")  # a hard link of the input where the state would go
    assert "input" in _refused(cli, "finetune", src, "-o", trap / "h", "--force", *RUN)
    assert sha256(src) == before


@pytest.mark.parametrize("named", ["stage1 (hard link)", "stage1 state"])
def test_the_recipe_never_writes_over_its_input(cli, src, tmp_path, named):
    dst = tmp_path / "r.safetensors"
    mid = stage1_path(dst)
    if named == "stage1 (hard link)":  # the resolved paths differ, the file is the same
        os.link(src, mid)
        model = src
    else:  # stage 1's resumable state, r.safetensors.stage1.safetensors.resume.pt, is the input
        model = shutil.copy(src, state_path(mid))
    before = sha256(model)
    assert "input" in _refused(cli, "finetune", model, "-o", dst, "--recipe", "--router-steps", "1", "--force", *RUN)
    assert sha256(model) == before and not dst.exists()


def test_eval_fid_never_writes_samples_into_its_reference_folder(cli, tmp_path, inception_weights):
    ref = write_images(tmp_path / "ref", 2, size=16)
    model = save_model(nonzero_model(SMALL), tmp_path / "small.safetensors")
    assert "input" in _refused(cli, "eval-fid", model, "-n", 2, "--steps", 2, "--cfg", 1.0, "--ref", ref, "--out",
                               ref, "--device", "cpu", "--inception-weights", inception_weights)
    assert sorted(p.name for p in ref.iterdir()) == ["img0.png", "img1.png"]


HOLD = """
import sys, time
from pathlib import Path
from sla2cli.checkpoints.writing import claim
with claim([Path(p) for p in sys.argv[1:]]):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder():
    """Another process holding the claim on some paths, as a running `sla2 convert` or finetune would."""
    procs = []

    def hold(*paths):
        proc = subprocess.Popen([sys.executable, "-c", HOLD, *map(str, paths)], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc
    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_claimed_output_is_refused_even_with_force_and_a_killed_holder_blocks_nothing(cli, src, tmp_path, holder):
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"the other writer's file")
    finetune_dst = tmp_path / "ft.safetensors"
    proc = holder(dst, state_path(finetune_dst))  # two finetunes to ft.safetensors share its state file
    assert "another" in _refused(cli, "convert", src, "-o", dst, "--force")
    assert dst.read_bytes() == b"the other writer's file"
    assert "another" in _refused(cli, "finetune", src, "-o", finetune_dst, *RUN)
    assert not finetune_dst.exists()
    proc.kill()  # a killed writer leaves its lock file; it does not block the next one
    proc.wait()
    code, _, err = cli("convert", src, "-o", dst, "--force")
    assert code == 0, err
    assert dst.read_bytes() != b"the other writer's file" and not lock_path(dst).exists()


def test_profile_plot_is_never_the_input(cli, tmp_path):
    pytest.importorskip("matplotlib")
    model = tmp_path / "m.pt"
    model.write_bytes(b"checkpoint bytes")
    assert "is the input" in _refused(cli, "profile", model, "--plot", model, "--force")
    assert model.read_bytes() == b"checkpoint bytes"
