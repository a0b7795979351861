"""Tiny JiT models and checkpoint files in the official layouts, built fresh for each test."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # before anything imports Triton: its kernels run in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sla2cli.cli import run
from sla2cli.models.jit import JiT, JiTConfig

TINY = JiTConfig(input_size=32, patch_size=2, hidden_size=64, depth=4, num_heads=2, ffn_hidden_dim=96,
                 num_classes=5, bottleneck_dim=16, in_context_len=8, in_context_start=2)


def nonzero_model(config: JiTConfig = TINY, seed: int = 0) -> JiT:
    """A JiT whose every parameter is random and non-zero (upstream init zeroes the adaLN and output)."""
    torch.manual_seed(seed)
    model = JiT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "pos_embed":
                continue
            if "norm" in name:  # RMSNorm gains around 1
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.1))
    return model.eval()


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def official_pth(tmp_path) -> Path:
    """An official-layout JiT .pth of the tiny model (model / model_ema1 / model_ema2 with `net.` keys)."""
    from official_jit import official_args, write_official_pth
    path = tmp_path / "jit-tiny.pth"
    write_official_pth(path, nonzero_model().state_dict(), official_args(model="JiT-tiny", img_size=32, class_num=5))
    return path


@pytest.fixture
def cli(capsys):
    """Run `sla2 ARGS...` in-process; returns (exit code, stdout, stderr)."""
    def invoke(*args):
        code = run([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return invoke


def within(seconds: float, call, fifo: Path):
    """`call()` (its value, or what it raised), failing the test instead of hanging it if it takes longer than
    `seconds`."""
    result = {}

    def run():
        try:
            result["value"] = call()
        except Exception as exc:  # re-raised in the test's own thread
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if stat.S_ISFIFO(os.stat(fifo).st_mode):
            open(fifo, "wb").close()  # a writer comes and goes: the blocked reader sees the end
        thread.join()
        pytest.fail(f"blocked on {fifo}")
    if "error" in result:
        raise result["error"]
    return result["value"]


def one_json(stdout: str) -> dict:
    """Parse stdout as exactly one JSON document (fails if anything else is printed there)."""
    return json.loads(stdout)
