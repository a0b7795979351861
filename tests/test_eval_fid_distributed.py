"""`sla2 eval-fid` under torchrun: two gloo processes with a global batch of 4 write the same files as one
process with a batch of 2 (each process samples batch-size / 2 at a time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import nonzero_model, one_json
from test_eval_fid_cli import SMALL

from sla2cli import save_model

RUNNER = "import sys\nfrom sla2cli.cli import main\nsys.argv[0] = 'sla2'\nmain()\n"


def test_two_ranks_write_the_same_files_as_one(cli, tmp_path):
    model = save_model(nonzero_model(SMALL), tmp_path / "small.safetensors")
    runner = tmp_path / "sla2_runner.py"
    runner.write_text(RUNNER)

    def args(out, batch_size):
        # 5 samples in batches of 2: rank 0 makes [0, 1] and [4], rank 1 makes [2, 3].
        return ["eval-fid", str(model), "-n", "5", "--steps", "3", "--cfg", "2.0", "--batch-size", str(batch_size),
                "--dtype", "fp32", "--device", "cpu", "--out", str(out), "--json"]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(runner), *args(tmp_path / "two", 4)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # exactly one document: rank 1 prints nothing
    assert report["world_size"] == 2 and report["generation"]["written"] == 5
    assert report["batch_size"] == 4 and report["batch_per_process"] == 2

    code, stdout, stderr = cli(*args(tmp_path / "one", 2))
    assert code == 0, stderr
    single = one_json(stdout)
    assert single["world_size"] == 1 and single["batch_per_process"] == 2
    names = sorted(p.name for p in (tmp_path / "one").glob("*.png"))
    assert names == [f"{i:06d}.png" for i in range(5)] == sorted(p.name for p in (tmp_path / "two").glob("*.png"))
    for name in names:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
