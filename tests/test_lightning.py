"""SLA2 inside a Lightning loop: callbacks convert, log, schedule top-k, toggle QAT; checkpoints go both ways."""

import copy
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from conftest import TINY, nonzero_model
from lightning.pytorch.loggers import Logger

from sla2cli import load_model, save_model
from sla2cli.diffusion import add_noise, sample_t, velocity
from sla2cli.integrations.lightning import SLA2Convert, SLA2QATSwitch, SLA2StatsLogger, SLA2TopkSchedule
from sla2cli.sla2 import SLA2Config, apply_sla2, sla2_layers


class PixelGenLike(pl.LightningModule):
    """The shape of PixelGen's module: a denoiser, its EMA copy, JiT's v-loss."""

    def __init__(self):
        super().__init__()
        self.denoiser = nonzero_model()
        self.ema_denoiser = copy.deepcopy(self.denoiser).requires_grad_(False)
        self.seen = []  # (global_step, topk, qat) as the networks were during each step

    def training_step(self, batch, batch_idx):
        x, y = batch
        core = self.denoiser.blocks[3].attn.core
        self.seen.append((self.global_step, core.config.topk, core.config.qat))
        t = sample_t(x.shape[0])
        z = add_noise(x, t, torch.randn_like(x))
        loss = (velocity(self.denoiser(z, t, y), z, t) - velocity(x, z, t)).square().mean()
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        with torch.no_grad():
            for e, p in zip(self.ema_denoiser.parameters(), self.denoiser.parameters()):
                e.lerp_(p, 0.1)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


class MemoryLogger(Logger):
    def __init__(self):
        super().__init__()
        self.rows = []

    name, version = "memory", 0

    @property
    def experiment(self):
        return None

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def _loader(n=8):
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(n, 3, 32, 32, generator=g),
                                          torch.randint(0, 5, (n,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=2)


def _trainer(callbacks, tmp_path, steps=6, logger=False):
    return pl.Trainer(max_steps=steps, accelerator="cpu", callbacks=callbacks, logger=logger, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, log_every_n_steps=1,
                      enable_checkpointing=False)


def test_callbacks_convert_log_schedule_and_toggle_qat(tmp_path):
    module, logger = PixelGenLike(), MemoryLogger()
    callbacks = [SLA2Convert(layers="2-3", topk=0.2, block_q=64, block_k=64),
                 SLA2TopkSchedule(start=1.0, end=0.2, steps=4, shape="linear"),
                 SLA2QATSwitch(at_step=3, enable=True),
                 SLA2StatsLogger(every_n_steps=2)]
    _trainer(callbacks, tmp_path, logger=logger).fit(module, _loader())
    assert set(sla2_layers(module.denoiser)) == {2, 3} and set(sla2_layers(module.ema_denoiser)) == {2, 3}
    steps = [(s, round(k, 6), q) for s, k, q in module.seen]
    assert steps[:5] == [(0, 1.0, False), (1, 0.8, False), (2, 0.6, False), (3, 0.4, True), (4, 0.2, True)]
    logged = {k: v for _, row in logger.rows for k, v in row.items()}
    assert {"sla2/denoiser/layer2/alpha_mean", "sla2/denoiser/layer3/router_drift_q",
            "sla2/denoiser/layer3/kept_fraction", "sla2/topk"} <= set(logged)
    assert logged["sla2/denoiser/layer3/kept_fraction"] == pytest.approx(1 / 5)  # 264 tokens: 1 of 5 blocks
    alpha = module.denoiser.blocks[3].attn.core.alpha
    assert not torch.allclose(alpha, torch.full_like(alpha, 0.9))  # α trained
    optimised = {id(p) for g in module.trainer.optimizers[0].param_groups for p in g["params"]}
    assert id(module.denoiser.blocks[3].attn.core.proj_q) in optimised


def test_frozen_router_and_settings_from_an_sla2_file(tmp_path):
    source = nonzero_model()
    apply_sla2(source, [1, 3], SLA2Config(topk=0.3, block_q=32, block_k=32))
    with torch.no_grad():
        source.blocks[3].attn.core.alpha_logit.fill_(1.5)
    path = save_model(source, tmp_path / "tuned.safetensors")
    module = PixelGenLike()
    _trainer([SLA2Convert(from_file=str(path), freeze_router=True)], tmp_path, steps=2).fit(module, _loader())
    core = module.denoiser.blocks[3].attn.core
    assert set(sla2_layers(module.denoiser)) == {1, 3} and core.config.topk == 0.3 and core.config.block_q == 32
    assert torch.equal(core.proj_q, torch.eye(32)) and not core.proj_q.requires_grad  # frozen: unchanged
    assert not torch.allclose(core.alpha_logit, torch.full_like(core.alpha_logit, 1.5))  # α still trains


def test_lightning_checkpoints_round_trip_through_sla2cli(tmp_path):
    module = PixelGenLike()
    trainer = _trainer([SLA2Convert(layers="3", topk=0.25)], tmp_path, steps=2)
    trainer.fit(module, _loader())
    ckpt = tmp_path / "run.ckpt"
    trainer.save_checkpoint(ckpt)
    payload = torch.load(ckpt, weights_only=False)
    assert "sla2.denoiser.blocks.3.attn.core.proj_q" in payload["state_dict"]
    assert payload["sla2_metadata"]["sla2"]["layers"] == [3]
    loaded, info = load_model(ckpt, in_context_start=TINY.in_context_start)
    assert info.weights == "ema_denoiser" and info.sla2_layers == [3]
    assert torch.equal(loaded.blocks[3].attn.core.proj_q, module.ema_denoiser.blocks[3].attn.core.proj_q)

    resumed = PixelGenLike()  # a fresh run resumes from it: SLA2 tensors land back where they belong
    _trainer([SLA2Convert(layers="3", topk=0.25)], tmp_path, steps=3).fit(resumed, _loader(), ckpt_path=ckpt)
    assert resumed.seen[0][0] == 2  # continued at step 2


def test_exported_pixelgen_checkpoint_loads_into_a_lightning_module(cli, official_pth, tmp_path):
    sla2 = tmp_path / "sla2.safetensors"
    assert cli("convert", official_pth, "-o", sla2, "--layers", "2-3", "--in-context-start", "2")[0] == 0
    ckpt = tmp_path / "export.ckpt"
    assert cli("convert", sla2, "-o", ckpt, "--format", "pixelgen-ckpt")[0] == 0
    module = PixelGenLike()
    SLA2Convert(layers="2-3").setup(None, module, "fit")
    checkpoint = torch.load(ckpt, weights_only=True)
    module.on_load_checkpoint(checkpoint)  # what Lightning calls before load_state_dict
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    reference, _ = load_model(sla2)
    for name in ("denoiser", "ema_denoiser"):
        mine = getattr(module, name).state_dict()
        assert mine.keys() == reference.state_dict().keys()
        assert all(torch.equal(mine[k], v) for k, v in reference.state_dict().items())


def test_without_lightning_sla2cli_still_imports_and_the_integration_names_the_extra():
    code = ("import sys; sys.modules['lightning'] = None; sys.modules['lightning.pytorch'] = None\n"
            "import sla2cli, sla2cli.cli\n"
            "try:\n    import sla2cli.integrations.lightning\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'sla2cli[lightning]'" in out


def test_schedule_shapes():
    assert SLA2TopkSchedule(1.0, 0.1, 10, "cosine").topk_at(5) == pytest.approx(0.55)
    assert SLA2TopkSchedule(1.0, 0.1, 10, "linear").topk_at(20) == pytest.approx(0.1)


def test_the_documented_yaml_builds_every_callback():
    import importlib
    from pathlib import Path

    import yaml
    config = yaml.safe_load((Path(__file__).parents[1] / "docs" / "pixelgen-sla2.yaml").read_text())
    built = []
    for entry in config["trainer"]["callbacks"]:
        module, _, cls = entry["class_path"].rpartition(".")
        built.append(getattr(importlib.import_module(module), cls)(**entry["init_args"]))
    assert [type(c).__name__ for c in built] == ["SLA2Convert", "SLA2TopkSchedule", "SLA2QATSwitch", "SLA2StatsLogger"]
