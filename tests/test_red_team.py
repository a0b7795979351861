"""What the red team of issue 17 broke (items 4-6), each reproduced: nothing hangs, bad input is one line
with exit code 1 or 2 (never an internal error), nothing is lost or silently changed."""

from __future__ import annotations

import argparse
import errno
import json
import os
import pathlib
import pickle
import socket
import stat
import subprocess
import sys
import typing

import pytest
import torch
from conftest import TINY, nonzero_model, one_json, within
from finetune_support import converted_file, one_thread, random_model  # noqa: F401
from official_jit import official_args, write_official_pth
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sla2cli.checkpoints.writing as writing
import sla2cli.finetune.trainer as trainer
from sla2cli import SLA2Config, apply_sla2, load_model, save_model
from sla2cli.cli import app
from sla2cli.commands._common import finite
from sla2cli.errors import InvalidParameter
from sla2cli.models.shipped import half_storage_copy
from sla2cli.sampling import sampler_settings


def _one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err and "internal error" not in err, err
    return lines[0]


def _refused(cli, code: int, *args) -> str:
    got, out, err = cli(*args)
    assert got == code and out == "", (got, err)
    return _one_line(err)


@pytest.fixture
def dense(tmp_path) -> pathlib.Path:
    return save_model(nonzero_model(), tmp_path / "dense.safetensors")


# 4. Hangs -----------------------------------------------------------------------------------------------------

def _special(kind: str, path: pathlib.Path):
    if kind == "fifo":
        os.mkfifo(path)
        return path
    if kind == "directory":
        path.mkdir()
        return path
    if kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        return path
    return pathlib.Path("/dev/zero")  # a character device that never ends


@pytest.mark.parametrize("kind", ["fifo", "directory", "socket", "char-device"])
def test_special_files_as_inputs_are_refused_without_opening_them(cli, tmp_path, kind):
    special = _special(kind, tmp_path / "model.pth")
    for args in (("stats", special), ("convert", special, "-o", tmp_path / "out.safetensors")):
        code, out, err = within(30, lambda: cli(*args), special)
        assert code == 1 and out == ""
        assert _one_line(err).startswith(f"error: {special} is a") and "not a file" in err
    assert not (tmp_path / "out.safetensors").exists()


def _float_options() -> list[tuple[str, str, typing.Any]]:
    """(command, flag, its typer.Option) for every float option of every command."""
    found = []
    for command in app.registered_commands:
        hints = typing.get_type_hints(command.callback, include_extras=True)
        for name, hint in hints.items():
            if typing.get_origin(hint) is not typing.Annotated:
                continue
            base, *extras = typing.get_args(hint)
            if float not in (base, *typing.get_args(base)):
                continue
            option = next(e for e in extras if hasattr(e, "param_decls"))
            flags = [d for d in option.param_decls if d.startswith("--")] or ["--" + name.replace("_", "-")]
            found.append((command.name, flags[0], option))
    return found


FLOATS = _float_options()


def test_every_float_option_parses_through_finite():
    assert {(c, f) for c, f, _ in FLOATS} >= {("profile", "--bench-ms"), ("eval-fid", "--cfg"), ("stats", "--t"),
                                               ("quality", "--cfg"), ("convert", "--topk"), ("finetune", "--ema")}
    assert [(c, f) for c, f, option in FLOATS if option.parser is not finite] == []


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("command,flag", [(c, f) for c, f, _ in FLOATS])
def test_non_finite_option_values_are_usage_errors(cli, tmp_path, command, flag, value):
    required = {"eval-fid": ("-n", "2", "--ref", tmp_path)}.get(command, ())
    line = _refused(cli, 2, command, tmp_path / "model.safetensors", *required, f"{flag}={value}")
    assert f"'{flag}': {value} is not a finite number" in line


def test_the_sampler_refuses_non_finite_guidance_and_shift():
    for cfg, shift in ((float("nan"), None), (-1.0, None), (1.0, float("nan")), (1.0, float("inf"))):
        with pytest.raises(InvalidParameter, match="must be a finite number"):
            sampler_settings("pixelgen", steps=2, cfg=cfg, cfg_interval=None, time_shift=shift, preset=None)


# 5. Bad input: one line, exit code 1 ---------------------------------------------------------------------------

def _retag(src: pathlib.Path, dst: pathlib.Path, change) -> pathlib.Path:
    """`src`'s tensors with its JSON metadata changed by `change(dict)`."""
    with safe_open(str(src), "pt") as f:
        raw = f.metadata()
    meta = {k: json.loads(v) for k, v in raw.items() if k not in ("format", "format_version")}
    change(meta)
    save_file(load_file(str(src)), str(dst), metadata={"format": raw["format"], "format_version": raw["format_version"],
                                                      **{k: json.dumps(v) for k, v in meta.items()}})
    return dst


def _converted(tmp_path) -> pathlib.Path:
    model = nonzero_model()
    apply_sla2(model, [2, 3], SLA2Config(block_q=16, block_k=16))
    return save_model(model, tmp_path / "sla2.safetensors")


METADATA = [
    ("model_config", lambda m: m["model_config"].update(depth="four"), "model_config depth = 'four'"),
    ("model_config", lambda m: m["model_config"].update(hidden_size=-64), "model_config hidden_size = -64"),
    ("model_config", lambda m: m.update(model_config=[1, 2]), "model_config is a list"),
    ("model_config", lambda m: m["model_config"].update(noise_scale=None), "model_config noise_scale = None"),
    ("model_config", lambda m: m["model_config"].update(in_context_start=99), "in_context_start 99 of 4 blocks"),
    ("model_config", lambda m: m["model_config"].update(hidden_size=100_000), "hidden_size 100000 (tensors: 64)"),
    ("sla2", lambda m: m["sla2"]["config"].update(block_q=48), "block_q must be one of"),
    ("sla2", lambda m: m["sla2"].update(layers=[2, 99]), "layers [2, 99] are not distinct blocks of 0-3"),
    ("sla2", lambda m: m["sla2"].pop("config"), "no 'config'"),
    ("sla2", lambda m: m.update(sla2="all"), "corrupt SLA2 metadata"),
    ("sla2", lambda m: m["sla2"].update(topk_per_layer={"2": 7}), "topk must be in (0, 1], got 7"),
]


@pytest.mark.parametrize("part,change,message", METADATA, ids=[m for _, _, m in METADATA])
def test_corrupt_metadata_is_a_failure_of_the_file_not_of_the_usage(cli, tmp_path, dense, part, change, message):
    src = _converted(tmp_path) if part == "sla2" else dense
    bad = _retag(src, tmp_path / "bad.safetensors", change)
    line = _refused(cli, 1, "stats", bad)
    assert "bad.safetensors" in line and message in line


def _state_with(tmp_path, name: str, **changes) -> pathlib.Path:
    """The tiny model's weights, some replaced, as a plain safetensors file (no metadata)."""
    state = {k: v.clone() for k, v in nonzero_model().state_dict().items()}
    save_file({**state, **changes}, str(tmp_path / name))
    return tmp_path / name


def test_a_tiny_file_asking_for_a_huge_model_is_refused_before_anything_is_allocated(cli, tmp_path):
    tiny = tmp_path / "tiny.safetensors"
    config = json.dumps({**TINY.to_dict(), "hidden_size": 60_000})
    save_file({"pos_embed": torch.zeros(1, 4, 0)}, str(tiny),
              metadata={"format": "sla2cli", "format_version": "1", "model_config": config})
    assert tiny.stat().st_size < 500
    assert "is not a JiT model" in _refused(cli, 1, "stats", tiny)
    # shapes saying width 60000 (a 40 GB model) in a 1 MB file without metadata: refused on the meta device
    huge = _state_with(tmp_path, "huge.safetensors", **{"pos_embed": torch.zeros(1, 1, 60_000),
                                                          "blocks.0.attn.q_norm.weight": torch.ones(30_000)})
    line = _refused(cli, 1, "stats", huge, "--in-context-start", "2")
    assert "does not match the inferred JiT architecture" in line and "60000" in line


@pytest.mark.parametrize("changes,message", [
    ({"blocks.0.attn.q_norm.weight": torch.ones(0)}, "blocks.0.attn.q_norm.weight has shape (0,)"),
    ({"pos_embed": torch.zeros(1, 0, 64)}, "pos_embed has shape (1, 0, 64)"),
    ({"blocks.1.mlp.w3.weight": torch.zeros(0, 96)}, "blocks.1.mlp.w3.weight has shape (0, 96), not (64, 96)"),
    ({"blocks.99999999999999.norm1.weight": torch.ones(64)}, "numbered up to 99999999999999"),
    ({"blocks.0.attn.q_norm.weight": torch.ones(48)}, "width 64 is no multiple of the head size 48"),
    ({"pos_embed": torch.zeros(1, 255, 64)}, "pos_embed has 255 positions, no square grid"),
], ids=["empty q_norm", "empty pos_embed", "empty block weight", "block number", "head_dim", "grid"])
def test_zero_length_and_odd_tensors_are_refused(cli, tmp_path, changes, message):
    bad = _state_with(tmp_path, "odd.safetensors", **changes)
    assert message in _refused(cli, 1, "stats", bad, "--in-context-start", "2")


@pytest.mark.parametrize("value", ["abc", float("nan"), -1.0, [1.0]])
def test_odd_args_values_are_refused(cli, tmp_path, value):
    path = tmp_path / "official.pth"
    write_official_pth(path, nonzero_model().state_dict(), official_args(model="JiT-tiny", img_size=32,
                                                                         class_num=5, noise_scale=value))
    assert "args.noise_scale" in _refused(cli, 1, "stats", path, "--in-context-start", "2")


def test_a_pickle_under_a_safetensors_name_and_the_reverse_are_told_by_content(tmp_path, dense):
    state = nonzero_model().state_dict()
    torch.save(state, tmp_path / "pickled.safetensors")
    (tmp_path / "safe.pth").write_bytes(dense.read_bytes())
    for path in (tmp_path / "pickled.safetensors", tmp_path / "safe.pth"):
        model, info = load_model(path, in_context_start=2)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items()), info.layout


def _legacy(path: pathlib.Path, obj) -> pathlib.Path:
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    return path


def test_legacy_pickles_fail_in_one_line_naming_the_globals(cli, tmp_path):
    unsafe = _legacy(tmp_path / "unsafe.pth", {"model": nonzero_model().state_dict(), "x": pathlib.PurePosixPath("a")})
    assert "unsafe pickle globals (pathlib.PurePosixPath); pass --trust-checkpoint" in _refused(cli, 1, "stats", unsafe)
    blocked = tmp_path / "blocked.pth"  # a pickle that would run os.system("id")
    blocked.write_bytes(b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00idq\x01\x85q\x02Rq\x03.")
    assert "unsafe pickle globals (os.system)" in _refused(cli, 1, "stats", blocked)
    whole = _legacy(tmp_path / "whole.pth", nonzero_model().state_dict()).read_bytes()
    (tmp_path / "cut.pth").write_bytes(whole[:5000])
    assert "cut.pth is truncated or not a PyTorch checkpoint" in _refused(cli, 1, "stats", tmp_path / "cut.pth")
    (tmp_path / "plain.pth").write_bytes(pickle.dumps({"a": 1}, protocol=2))
    assert "plain.pth" in _refused(cli, 1, "stats", tmp_path / "plain.pth")


RUN = ("--data-free", "--data-free-samples", "2", "--batch-size", "2", "--eval-samples", "1", "--device", "cpu",
       "--save-every", "2", "--steps", "4")


def _bad_optimizer(state):
    moments = next(iter(state["optimizer"]["state"].values()))
    moments["exp_avg"] = torch.zeros(3)


RESUME = [
    (lambda s: s.update(step=99), "step 99 of a run of 4 steps"),
    (lambda s: s.update(step=-1), "step -1 of a run of 4 steps"),
    (lambda s: s.pop("optimizer"), "no optimizer"),
    (lambda s: s.update(history=[]), "a loss history of 0 entries at step 2"),
    (lambda s: s["weights"].update({k: torch.zeros(1) for k in list(s["weights"])[:1]}), "its weights are not"),
    (lambda s: s["weights"].popitem(), "its weights are not"),
    (lambda s: s.update(errors_before={}), "no errors measured before training"),
    (_bad_optimizer, "its optimiser state does not match"),
    (lambda s: s["rng"].update(torch=torch.zeros(3)), "is damaged"),
]


@pytest.fixture
def interrupted(cli, tmp_path, monkeypatch):
    """A finetune stopped after its state of step 2 was written: (model, output, state file)."""
    src = converted_file(cli, tmp_path, model=random_model())
    dst = tmp_path / "ft.safetensors"
    calls = {"n": 0}
    original = trainer.record_dense_qkv

    def stop_at_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer, "record_dense_qkv", stop_at_third)
    assert cli("finetune", src, "-o", dst, *RUN)[0] == 130
    monkeypatch.undo()
    return src, dst, tmp_path / "ft.safetensors.resume.pt"


@pytest.mark.parametrize("change,message", RESUME, ids=[m for _, m in RESUME[:-1]] + ["rng"])
def test_hand_made_resume_states_are_refused_before_training(cli, interrupted, change, message):
    src, dst, state_file = interrupted
    state = torch.load(state_file, weights_only=True)
    change(state)
    torch.save(state, state_file)
    code, out, err = cli("finetune", src, "-o", dst, *RUN, "--resume")
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # after the run's own log line
    assert code == 1 and out == "" and len(errors) == 1 and "internal error" not in err, err
    assert message in errors[0] and "pass --force without --resume" in errors[0] and not dst.exists()


def test_a_fifo_in_place_of_the_resume_state_does_not_hang(cli, interrupted):
    src, dst, state_file = interrupted
    state_file.unlink()
    os.mkfifo(state_file)
    code, _, err = within(60, lambda: cli("finetune", src, "-o", dst, *RUN, "--resume"), state_file)
    assert code == 1 and "is a FIFO, not a file" in _one_line(err)


def _no_leftovers(folder: pathlib.Path, *keep: pathlib.Path) -> None:
    assert sorted(folder.iterdir()) == sorted(keep)


def _disk_full(monkeypatch, error: BaseException) -> None:
    def write_some_then_fail(tensors, path, metadata=None):
        pathlib.Path(path).write_bytes(b"half a file")
        raise error

    monkeypatch.setattr(writing, "save_file", write_some_then_fail)


def test_a_full_disk_is_one_line_and_leaves_nothing(cli, tmp_path, dense, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    _disk_full(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    line = _refused(cli, 1, "convert", dense, "-o", out / "m.safetensors", "--layers", "none")
    assert line == f"error: cannot write {out / 'm.safetensors'} (no space left on device); free some space or " \
                   "write somewhere else"
    _no_leftovers(out)
    # torch's and safetensors' serialisers say it in their own words: the free space tells
    _disk_full(monkeypatch, RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"))
    monkeypatch.setattr(writing.os, "statvfs", lambda _: argparse.Namespace(f_bavail=0, f_frsize=4096))
    assert "no space left on device" in _refused(cli, 1, "convert", dense, "-o", out / "m.safetensors",
                                                 "--layers", "none")
    _no_leftovers(out)


def test_a_folder_that_cannot_be_written_is_one_line(cli, tmp_path, dense, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(writing.tempfile, "mkstemp", refuse)
    line = _refused(cli, 1, "convert", dense, "-o", tmp_path / "m.safetensors", "--layers", "none")
    assert line.endswith("(Permission denied); write somewhere else")
    _no_leftovers(tmp_path, dense)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_one_line(cli, tmp_path, dense):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert "Permission denied" in _refused(cli, 1, "convert", dense, "-o", locked / "m.safetensors")


def test_an_output_under_a_file_or_over_a_special_file_is_refused(cli, tmp_path, dense):
    line = _refused(cli, 2, "convert", dense, "-o", dense / "m.safetensors", "--layers", "none")
    assert line.endswith(f"{dense} is a file, not a folder; choose another -o/--output")
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    line = _refused(cli, 2, "convert", dense, "-o", fifo, "--layers", "none", "--force")
    assert line.endswith("is not a regular file; -o/--output needs a file path") and stat.S_ISFIFO(fifo.stat().st_mode)


# 6. Data kept ----------------------------------------------------------------------------------------------------

def test_layers_none_keeps_every_tensor_in_its_stored_dtype(cli, tmp_path):
    src = save_model(half_storage_copy(nonzero_model()), tmp_path / "half.safetensors")
    stored = load_file(str(src))
    assert {v.dtype for v in stored.values()} == {torch.float16, torch.float32}
    code, _, err = cli("convert", src, "-o", tmp_path / "back.safetensors", "--layers", "none")
    assert code == 0, err
    back = load_file(str(tmp_path / "back.safetensors"))
    assert back.keys() == stored.keys()
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in stored.items())
    assert abs((tmp_path / "back.safetensors").stat().st_size - src.stat().st_size) < 2048  # metadata differs


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_outputs_honour_the_umask(cli, tmp_path, dense, umask, mode):
    before = os.umask(umask)
    try:
        code, _, err = cli("convert", dense, "-o", tmp_path / "out.safetensors", "--layers", "none")
    finally:
        os.umask(before)
    assert code == 0, err
    assert stat.S_IMODE((tmp_path / "out.safetensors").stat().st_mode) == mode


def test_temporary_files_of_killed_writers_are_removed_by_the_next_run(cli, tmp_path, dense, monkeypatch):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    out = tmp_path / "out.safetensors"
    stale = tmp_path / f".out.safetensors.{gone.pid}.k2j4h5g6.tmp"
    alive = tmp_path / f".out.safetensors.{os.getppid()}.a1b2c3d4.tmp"  # a writer still running
    other = tmp_path / f".other.safetensors.{gone.pid}.k2j4h5g6.tmp"  # another output's
    for path in (stale, alive, other):
        path.write_bytes(b"partial")
    names = []
    original = writing.save_file
    monkeypatch.setattr(writing, "save_file", lambda t, path, **kw: (names.append(path), original(t, path, **kw)))
    code, _, err = cli("convert", dense, "-o", out, "--layers", "none")
    assert code == 0, err
    assert not stale.exists() and alive.exists() and other.exists() and out.exists()
    assert pathlib.Path(names[0]).name.startswith(f".out.safetensors.{os.getpid()}.")  # this run's own is named so


def test_non_finite_and_integer_weights_convert_with_a_warning(cli, tmp_path):
    state = nonzero_model().state_dict()
    state["blocks.1.attn.qkv.weight"][0, 0] = float("nan")
    state["blocks.2.mlp.w3.bias"][3] = float("inf")
    state["final_layer.linear.bias"] = state["final_layer.linear.bias"].round().long()
    src = tmp_path / "odd.safetensors"
    save_file(state, str(src))
    code, out, err = cli("convert", src, "-o", tmp_path / "out.safetensors", "--layers", "none",
                         "--in-context-start", "2", "--json")
    assert code == 0, err
    warnings = one_json(out)["warnings"]
    assert "2 tensor(s) hold NaN or infinite values (blocks.1.attn.qkv.weight, blocks.2.mlp.w3.bias)" in warnings[0]
    assert "1 tensor(s) are stored as int64, not floating point, and are read as float32" in warnings[1]
    shown = " ".join(err.split())  # the console wraps at its width
    assert all(f"warning: {w}" in shown for w in warnings[:2])
    # every other command that reads a model says the same
    for args in (["stats", src], ["profile", src, "--device", "cpu", "--bench-ms", "1", "--layers", "none"]):
        code, _, err = cli(*args, "--in-context-start", "2", "--json")
        assert code == 0, err
        assert f"warning: {warnings[0]}" in " ".join(err.split())


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_special_files_as_inception_weights_or_reference_statistics_do_not_hang(tmp_path, kind):
    """--inception-weights and an .npz --ref are read through the same non-blocking open as checkpoints."""
    from sla2cli.errors import SLA2Error
    from sla2cli.metrics.fid import load_statistics
    from sla2cli.metrics.inception import load_weights

    path = _special(kind, tmp_path / "special.npz")
    for load in (load_weights, load_statistics):
        with pytest.raises(SLA2Error, match="not a file") as exc:
            within(30, lambda: load(path), path)
        assert "\n" not in str(exc.value)


def test_a_special_file_in_a_reference_folder_is_refused_before_sampling(tmp_path):
    from sla2cli.metrics.fid import resolve_reference

    ref = tmp_path / "ref"
    ref.mkdir()
    for i in range(2):
        (ref / f"{i}.png").write_bytes(b"")
    os.mkfifo(ref / "2.png")
    with pytest.raises(InvalidParameter, match="2.png, which is not a regular file") as exc:
        resolve_reference(str(ref))
    assert exc.value.parameter == "ref"
