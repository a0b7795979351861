"""`dense_until`: the sampler's evaluations before a time t run the model with every SLA2 layer dense."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import nonzero_model, one_json
from test_eval_fid_metrics import inception_weights  # noqa: F401

from sla2cli import save_model
from sla2cli.errors import InvalidParameter
from sla2cli.models.jit import DenseAttention, JiTConfig
from sla2cli.sampling import paired_inputs, sample, sampler_settings
from sla2cli.sla2 import SLA2Config, apply_sla2
from sla2cli.sla2.layers import dense_twin, remove_sla2, sla2_layers

SMALL = JiTConfig(input_size=16, patch_size=2, hidden_size=32, depth=2, num_heads=2, ffn_hidden_dim=48,
                  num_classes=5, bottleneck_dim=8, in_context_len=4, in_context_start=1)


def converted():
    model = nonzero_model(SMALL).eval()
    with torch.no_grad():  # outputs well inside [-1, 1], so samples differ on the uint8 grid where models do
        model.final_layer.linear.weight.mul_(0.02)
        model.final_layer.linear.bias.mul_(0.02)
    apply_sla2(model, [0, 1], SLA2Config(topk=0.25, block_q=16, block_k=16))
    return model


class Recorder(torch.nn.Module):
    """Which network evaluated at which t."""

    def __init__(self, net, name, log):
        super().__init__()
        self.net, self.name, self.log = net, name, log
        self.num_classes, self.config = net.num_classes, net.config

    def forward(self, z, t, y):
        self.log.append((round(float(t[0]), 6), self.name))
        return self.net(z, t, y)


def test_the_twin_shares_the_weights_and_attends_densely():
    model = converted()
    twin = dense_twin(model)
    assert sla2_layers(twin) == {} and list(sla2_layers(model)) == [0, 1]
    assert all(isinstance(b.attn.core, DenseAttention) for b in twin.blocks)
    shared = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        if ".core." not in name:  # the SLA2 cores' own parameters (router, α) are not in the dense twin
            assert shared[name] is p, name
    assert len(shared) == sum(".core." not in name for name, _ in model.named_parameters())


@pytest.mark.parametrize("sampler,steps", [("jit", 5), ("pixelgen", 4)])
def test_evaluations_before_dense_until_run_the_dense_twin(sampler, steps):
    model = converted()
    noise, labels = paired_inputs(0, range(2), (3, 16, 16), SMALL.num_classes)
    log = []
    sample(Recorder(model, "sla2", log), noise, labels, steps=steps, cfg=2.0, sampler=sampler,
           dense_model=Recorder(dense_twin(model), "dense", log), dense_until=0.5)
    assert log and all((name == "dense") == (t < 0.5) for t, name in log), log
    assert {name for _, name in log} == {"dense", "sla2"}


def test_the_ends_of_the_range_are_the_dense_and_the_converted_model():
    model = converted()
    noise, labels = paired_inputs(1, range(2), (3, 16, 16), SMALL.num_classes)
    kwargs = dict(steps=4, cfg=2.0)
    reverted = converted()
    remove_sla2(reverted)
    all_dense = sample(model, noise, labels, dense_model=dense_twin(model), dense_until=1.0, **kwargs)
    torch.testing.assert_close(all_dense, sample(reverted, noise, labels, **kwargs), rtol=0, atol=0)
    none_dense = sample(model, noise, labels, dense_model=dense_twin(model), dense_until=0.0, **kwargs)
    torch.testing.assert_close(none_dense, sample(model, noise, labels, **kwargs), rtol=0, atol=0)
    assert not torch.equal(all_dense, none_dense)


def test_bad_values_are_refused():
    for bad in (-0.1, 1.5, float("nan"), float("inf")):
        with pytest.raises(InvalidParameter, match="dense_until must be a number in"):
            sampler_settings("jit", steps=4, cfg=1.0, cfg_interval=None, time_shift=None, preset=None, dense_until=bad)
    noise, labels = paired_inputs(1, range(1), (3, 16, 16), SMALL.num_classes)
    with pytest.raises(InvalidParameter, match="needs the model's dense twin"):
        sample(converted(), noise, labels, steps=2, dense_until=0.3)


def test_eval_fid_samples_with_dense_early_steps(cli, inception_weights, tmp_path):  # noqa: F811
    path = save_model(converted(), tmp_path / "sla2.safetensors")
    args = ["eval-fid", path, "-n", 2, "--steps", 4, "--cfg", 1.0, "--batch-size", 2, "--dtype", "fp32",
            "--device", "cpu", "--inception-weights", inception_weights]
    code, out, err = cli(*args, "--out", tmp_path / "a", "--dense-until", 0.5, "--json")
    assert code == 0, err
    r = one_json(out)
    assert r["dense_until"] == 0.5 and json.loads((tmp_path / "a" / "eval-fid.json").read_text())["dense_until"] == 0.5
    code, out, err = cli(*args, "--out", tmp_path / "b", "--json", "--compare-to", tmp_path / "a")
    assert code == 0, err
    r = one_json(out)
    assert "dense_until" not in r and r["compare"]["psnr_mean"] is not None  # paired, and not the same images
    assert any("dense_until" in w for w in r["warnings"]), r["warnings"]
    code, _, err = cli(*args, "--out", tmp_path / "a", "--dense-until", 0.25)  # the folder holds other settings
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in (tmp_path / "a").glob("*.png")) == ["000000.png", "000001.png"]


@pytest.mark.parametrize("value,message", [("1.5", "--dense-until must be a number in [0, 1]"),
                                           ("-1", "--dense-until must be a number in [0, 1]"),
                                           ("nan", "not a finite number")])
def test_eval_fid_refuses_bad_dense_until(cli, inception_weights, tmp_path, value, message):  # noqa: F811
    path = save_model(converted(), tmp_path / "sla2.safetensors")
    code, _, err = cli("eval-fid", path, "-n", 2, "--steps", 2, "--cfg", 1.0, "--device", "cpu",
                       "--inception-weights", inception_weights, "--out", tmp_path / "o", "--dense-until", value)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_a_dense_model_samples_the_same_with_or_without_dense_until(tmp_path):
    from sla2cli.metrics.generate import generate_samples

    model = converted()
    remove_sla2(model)
    folders = []
    for until in (0.0, 0.6):
        folder = tmp_path / f"u{until}"
        folder.mkdir()
        settings = sampler_settings("jit", steps=3, cfg=2.0, cfg_interval=None, time_shift=None, preset=None,
                                    dense_until=until)
        generate_samples(model, folder, 2, settings=settings, seed=0, batch_size=2, device=torch.device("cpu"),
                         dtype=torch.float32)
        folders.append(folder)
    for name in ("000000.png", "000001.png"):
        assert (folders[0] / name).read_bytes() == (folders[1] / name).read_bytes()


def test_a_model_without_sla2_layers_is_its_own_twin():
    model = converted()
    remove_sla2(model)
    assert dense_twin(model) is model
