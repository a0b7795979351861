"""`sla2 eval-fid` under torchrun: two gloo processes write the same files as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import nonzero_model, one_json
from test_eval_fid_cli import SMALL
from test_eval_fid_metrics import inception_weights  # noqa: F401

from sla2cli import save_model

RUNNER = "import sys\nfrom sla2cli.cli import main\nsys.argv[0] = 'sla2'\nmain()\n"


def test_two_ranks_write_the_same_files_as_one(cli, tmp_path, inception_weights):
    model = save_model(nonzero_model(SMALL), tmp_path / "small.safetensors")
    feats = np.random.default_rng(1).random((5, 2048))
    np.savez(tmp_path / "ref.npz", mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    runner = tmp_path / "sla2_runner.py"
    runner.write_text(RUNNER)

    def args(out):
        # 5 samples in batches of 2: rank 0 makes [0, 1] and [4], rank 1 makes [2, 3].
        return ["eval-fid", str(model), "-n", "5", "--steps", "3", "--cfg", "2.0", "--batch-size", "2",
                "--dtype", "fp32", "--device", "cpu", "--inception-weights", str(inception_weights),
                "--ref", str(tmp_path / "ref.npz"), "--out", str(out), "--json"]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(runner), *args(tmp_path / "two")], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # exactly one document: rank 1 prints nothing
    assert report["world_size"] == 2 and report["generation"]["written"] == 5

    code, stdout, stderr = cli(*args(tmp_path / "one"))
    assert code == 0, stderr
    single = one_json(stdout)
    assert single["world_size"] == 1
    names = sorted(p.name for p in (tmp_path / "one").glob("*.png"))
    assert names == [f"{i:06d}.png" for i in range(5)] == sorted(p.name for p in (tmp_path / "two").glob("*.png"))
    for name in names:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert report["fid"] == pytest.approx(single["fid"], rel=1e-6)  # same images; thread counts differ
