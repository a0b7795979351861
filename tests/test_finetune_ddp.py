"""`torchrun --nproc_per_node=2 sla2 finetune ...` on CPU (gloo): data-parallel, rank 0 writes, and the
result equals one process with the same global batch up to float tolerance."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import one_json
from finetune_support import converted_file, one_thread, random_model  # noqa: F401
from safetensors.torch import load_file

ARGS = ("--data-free", "--data-free-samples", "6", "--steps", "4", "--batch-size", "4", "--eval-samples", "2",
        "--topk-schedule", "1:0.1",  # the first step keeps every block: all gradients are zero
        "--device", "cpu", "--save-every", "2", "--json")


def test_two_gloo_processes_match_one_process(cli, tmp_path):
    src = converted_file(cli, tmp_path, model=random_model())
    single, ddp = tmp_path / "single.safetensors", tmp_path / "ddp.safetensors"
    code, out, err = cli("finetune", src, "-o", single, *ARGS)
    assert code == 0, err
    expected = one_json(out)

    script = tmp_path / "sla2_entry.py"
    script.write_text("from sla2cli.cli import main\nmain()\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
         "finetune", str(src), "-o", str(ddp), *ARGS],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = one_json(proc.stdout)  # rank 0 alone prints
    assert doc["world_size"] == 2 and doc["steps_run"] == 4
    assert doc["loss_history"] == pytest.approx(expected["loss_history"], rel=1e-4, abs=1e-6)
    a, b = load_file(str(single)), load_file(str(ddp))
    assert a.keys() == b.keys()
    for k in a:
        # Adam divides each gradient by its own running scale: for a router element whose gradient is ~0, the
        # all-reduce's other summation order can move its update by up to the step size (5e-3 here), so router
        # weights get a looser bound (seen: 4e-5 on one element, for some seeds, before and after the change of
        # seed streams); the loss history above stays the strict check.
        atol = 1e-4 if k.endswith(("proj_q", "proj_k")) else 1e-5
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=atol), k
    moved = [k for k in a if k.endswith("alpha_logit") and not torch.equal(a[k], load_file(str(src))[k])]
    assert moved, "training changed α"
    assert not (tmp_path / "ddp.safetensors.resume.pt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["dense.safetensors", "sla2.safetensors", "single.safetensors", "ddp.safetensors", "sla2_entry.py"])


def test_global_batch_must_split_evenly_across_processes(tmp_path):
    from sla2cli import SLA2Config, apply_sla2, save_model
    from sla2cli.checkpoints import load_model
    from sla2cli.distributed import ProcessGroup
    from sla2cli.errors import UsageError
    from sla2cli.finetune import DataSpec, FinetuneConfig, run_finetune

    model = random_model()
    apply_sla2(model, "all", SLA2Config(topk=0.1, block_q=16, block_k=16))
    src = tmp_path / "m.safetensors"
    save_model(model, src)
    model, info = load_model(src)
    with pytest.raises(UsageError, match="multiple of the 3 processes"):
        run_finetune(model, info, source=src, dst=tmp_path / "o.safetensors", config=FinetuneConfig(batch_size=4),
                     data=DataSpec(), device=torch.device("cpu"), group=ProcessGroup(rank=0, world_size=3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
