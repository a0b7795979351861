"""`sla2 finetune --recipe`: stage 1 then stage 2 in one command, the held-out report, the dense control,
resuming across the stage boundary, and stage 2's objectives and schedule options."""

import pytest
import torch
from conftest import one_json
from finetune_support import converted_file, one_thread, random_model  # noqa: F401
from safetensors.torch import load_file

from sla2cli import load_model
from sla2cli.errors import InvalidParameter
from sla2cli.finetune import FinetuneConfig
from sla2cli.finetune.recipe import stage1_path

BASE = ("--data-free", "--data-free-samples", "4", "--batch-size", "2", "--eval-samples", "2", "--device", "cpu",
        "--save-every", "0", "--steps", "2", "--json")
ARGS = (*BASE, "--router-steps", "2", "--recipe")


@pytest.fixture
def src(cli, tmp_path):
    return converted_file(cli, tmp_path, model=random_model())


def test_recipe_runs_both_stages_reports_and_cleans_up(cli, src, tmp_path):
    dst = tmp_path / "out.safetensors"
    code, out, err = cli("finetune", src, "-o", dst, *ARGS, "--control")
    assert code == 0, err
    doc = one_json(out)
    assert doc["stage1"]["stage"] == "router" and doc["stage2"]["stage"] == "full"
    options = doc["stage2"]["options"]
    assert options["objective"] == "v" and options["lr"] == 1.5e-4 and options["ema"] == 0.995
    h = doc["held_out"]
    for key in ("converted", "stage1", "finetuned", "control"):
        assert h[key]["ratio"] == pytest.approx(h[key]["model"] / h[key]["dense"])
    assert h["finetuned_vs_control"] == pytest.approx(h["finetuned"]["model"] / h["control"]["model"])
    # every block kept: the dense model moved by 2 full steps, which shifts a random model's loss by tens of
    # percent at most
    assert 0.5 < h["control"]["ratio"] < 1.5
    assert dst.exists() and (tmp_path / "out.control.safetensors").exists()
    assert not stage1_path(dst).exists()  # the intermediate is gone
    assert doc["stage1"]["options"]["objective"] == "distill"  # stage 1 distils the model's velocity


def test_recipe_keeps_stage_1_when_asked(cli, src, tmp_path):
    dst = tmp_path / "out.safetensors"
    code, _, err = cli("finetune", src, "-o", dst, *ARGS, "--keep-stage1")
    assert code == 0, err
    stage1, _ = load_model(stage1_path(dst))
    before, _ = load_model(src)
    dense_before = {k: v for k, v in before.state_dict().items() if ".core." not in k}
    assert all(torch.equal(stage1.state_dict()[k], v) for k, v in dense_before.items())  # weights untouched


def test_resume_skips_a_finished_stage_1(cli, src, tmp_path, monkeypatch):
    dst = tmp_path / "out.safetensors"
    import sla2cli.finetune.recipe as recipe

    calls = []
    original = recipe.run_finetune

    def stop_after_stage_1(*args, **kwargs):
        calls.append(kwargs["config"].stage)
        if kwargs["config"].full:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(recipe, "run_finetune", stop_after_stage_1)
    code, _, _ = cli("finetune", src, "-o", dst, *ARGS)
    assert code != 0 and stage1_path(dst).exists() and not dst.exists()
    monkeypatch.setattr(recipe, "run_finetune", lambda *a, **k: (calls.append(k["config"].stage), original(*a, **k))[1])
    code, out, err = cli("finetune", src, "-o", dst, *ARGS, "--resume")
    assert code == 0, err
    assert calls == ["router", "full", "full"]  # stage 1 was not run again
    assert one_json(out)["stage1"] is None and dst.exists() and not stage1_path(dst).exists()


def test_distill_objective_with_ema_and_cosine_changes_weights_and_saves_the_average(cli, src, tmp_path):
    dst = tmp_path / "full.safetensors"
    code, out, err = cli("finetune", src, "-o", dst, *BASE, "--full", "--objective", "v+distill", "--schedule",
                         "cosine", "--warmup", "0.5", "--ema", "0.5", "--lr", "1e-3")
    assert code == 0, err
    doc = one_json(out)
    assert doc["options"]["objective"] == "v+distill" and len(doc["loss_history"]) == 2
    before, after = load_file(str(src)), load_file(str(dst))
    moved = [k for k in before if "proj_" not in k and not torch.equal(before[k].float(), after[k].float())]
    assert moved  # the weights moved
    assert all(torch.equal(before[k], after[k]) for k in before if k.endswith(("proj_q", "proj_k")))


@pytest.mark.parametrize("kwargs", [{"objective": "v"}, {"objective": "v+distill"},
                                    {"objective": "layer", "full": True}, {"objective": "mse", "full": True},
                                    {"ema": 1.0}, {"schedule": "step"}, {"warmup": 1.5, "full": True}])
def test_each_stage_takes_only_its_own_objectives(kwargs):
    with pytest.raises(InvalidParameter):
        FinetuneConfig(**kwargs)


def test_objective_defaults_by_stage_and_stage_1_takes_a_schedule():
    assert FinetuneConfig().objective == "layer" and FinetuneConfig(full=True).objective == "v"
    config = FinetuneConfig(objective="distill", schedule="cosine", warmup=0.05, ema=0.9)
    assert config.stage == "router" and config.lr_schedule.factor(0, 100) < 1


@pytest.mark.parametrize("extra, message", [(("--control",), "--recipe"), (("--recipe", "--full"), "--full"),
                                            (("--keep-stage1",), "--recipe")])
def test_recipe_option_conflicts(cli, src, tmp_path, extra, message):
    code, _, err = cli("finetune", src, "-o", tmp_path / "x.safetensors", *BASE, *extra)
    assert code == 2 and message in err and not (tmp_path / "x.safetensors").exists()


def test_recipe_trains_stage_1_on_the_samplers_own_trajectory_and_stage_2_on_its_samples(cli, src, tmp_path):
    """--data-free-states trajectory: stage 1 distils on the inputs the guided teacher's sampler saw; stage 2
    (JiT's v-loss needs a clean image) on the same teacher's samples noised at JiT's t; the record says so,
    and stage 1 moves only SLA2's parameters."""
    dst = tmp_path / "out.safetensors"
    code, out, err = cli("finetune", src, "-o", dst, *ARGS, "--keep-stage1", "--data-free-states", "trajectory",
                         "--data-free-steps", "3", "--data-free-cfg", "2.0")
    assert code == 0, err
    doc = one_json(out)
    first, second = doc["stage1"]["data"], doc["stage2"]["data"]
    assert first["source"] == "trajectory" and first["cfg"] == 2.0 and first["sampling_steps"] == 3
    assert first["samples"] == 4 and first["states"] == 4 * 9  # 3 steps at CFG 2: 1 + 4 * 2 inputs each
    assert doc["stage1"]["options"]["data"]["source"] == "trajectory"
    assert second["source"] == "teacher" and second["cfg"] == 2.0 and second["samples"] == 4
    assert second["t_distribution"] == "jit" and doc["stage2"]["options"]["data"]["source"] == "teacher"
    assert doc["stage1"]["options"]["objective"] == "distill" and doc["stage2"]["options"]["objective"] == "v"
    dense, stage1 = load_file(src), load_file(stage1_path(dst))
    moved = {k for k in dense if not torch.equal(dense[k], stage1[k])}
    assert moved and all(".attn.core." in k for k in moved), moved


def test_stage_1_distillation_reports_the_layers_errors_every_tenth_step_and_the_last(src, tmp_path, monkeypatch):
    """The layers' errors are not the distillation's loss: measured only every 10th step and at the end, they
    change nothing that trains (the same losses and the same model as measuring every step)."""
    import sla2cli.finetune.trainer as trainer
    from sla2cli.finetune import DataSpec, FinetuneConfig, run_finetune

    def run(dst, every):
        monkeypatch.setattr(trainer, "MEASURE_EVERY", every)
        reported = []
        model, info = load_model(src)
        result = run_finetune(model, info, source=src, dst=dst, data=DataSpec(teacher_samples=4),
                              config=FinetuneConfig(steps=12, batch_size=2, eval_samples=2, save_every=0,
                                                    objective="distill"),
                              device=torch.device("cpu"), progress=lambda s: reported.append((s.step, s.per_layer)))
        return result, reported

    sparse, reported = run(tmp_path / "a.safetensors", 10)
    every, all_steps = run(tmp_path / "b.safetensors", 1)
    assert [step for step, layers in reported if layers] == [10, 12]
    assert all(len(layers) == len(sparse.layers) for _, layers in all_steps)
    assert dict(reported)[10] == dict(all_steps)[10] and dict(reported)[12] == dict(all_steps)[12]
    assert sparse.loss_history == every.loss_history
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
