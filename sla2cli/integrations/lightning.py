"""SLA2 inside a Lightning training loop (PixelGen-style: a LightningModule with `denoiser` and `ema_denoiser`).

Four callbacks, each usable from a Lightning CLI YAML (`class_path` / `init_args`):

- `SLA2Convert`: converts the networks before the optimisers are built, from settings or from an
  SLA2 file (e.g. the output of `sla2 finetune`); saves checkpoints with SLA2 tensors under
  `sla2.<module>.` plus `sla2_metadata`, the layout `sla2 convert --format pixelgen-ckpt` writes and
  every `sla2` command reads; a resumed run finds them again.
- `SLA2StatsLogger`: logs per-layer α, realised kept fraction and router drift every N steps.
- `SLA2TopkSchedule`: anneals topk from a dense start to the target.
- `SLA2QATSwitch`: turns QAT on (or off) from a given step.
"""

from __future__ import annotations

import math
from typing import Sequence

from torch import nn

try:
    import lightning.pytorch as pl
except ImportError as exc:  # the extra is optional; say which one to install
    raise ImportError("sla2cli.integrations.lightning needs Lightning: pip install 'sla2cli[lightning]'") from exc

from ..checkpoints import load_model
from ..checkpoints.reading import SLA2_PREFIX
from ..checkpoints.writing import CORE_MARKER
from ..errors import SLA2Error
from ..sla2.attention import SLA2Config
from ..sla2.control import disable_qat, enable_qat, freeze_router, set_topk
from ..sla2.layers import apply_sla2, sla2_layers
from ..sla2.routing import keep_count, num_blocks
from ..sla2.stats import describe_layers

DEFAULT_MODULES = ("denoiser", "ema_denoiser")


def _networks(pl_module: nn.Module, names: Sequence[str]) -> list[tuple[str, nn.Module]]:
    found = [(n, getattr(pl_module, n)) for n in names if isinstance(getattr(pl_module, n, None), nn.Module)]
    if not found:
        raise SLA2Error(f"the LightningModule has none of the attributes {list(names)}; pass modules=[...] "
                        "naming its JiT networks")
    return found


class SLA2Convert(pl.Callback):
    """Convert `layers` of each network in `modules` at setup, so the optimiser sees the SLA2 parameters.

    With `from_file`, layers, settings, router and α come from that SLA2 file instead (the dense
    weights stay those of the run). `freeze_router` gives SLA2's second stage: W_q, W_k fixed.
    """

    def __init__(self, layers: str = "all", topk: float = 0.15, block_q: int = 64, block_k: int = 64,
                 feature_map: str = "softmax", qat: bool = False, alpha_mode: str = "per_head",
                 feature_rank: int = 0, from_file: str | None = None, freeze_router: bool = False,
                 modules: Sequence[str] = DEFAULT_MODULES):
        self.settings = SLA2Config(topk=topk, block_q=block_q, block_k=block_k, feature_map=feature_map, qat=qat,
                                   alpha_mode=alpha_mode, feature_rank=feature_rank)
        self.layers, self.from_file, self.freeze, self.modules = layers, from_file, freeze_router, tuple(modules)
        self._done = False

    def _convert(self, net: nn.Module) -> None:
        if self.from_file is None:
            apply_sla2(net, self.layers, self.settings)
            return
        source, info = load_model(self.from_file)
        if not info.sla2_layers:
            raise SLA2Error(f"{self.from_file} has no SLA2 layers to take over")
        for i, core in sla2_layers(source).items():  # each layer's own settings: a budgeted file's topk differ
            apply_sla2(net, [i], core.config)
            net.blocks[i].attn.core.load_state_dict(core.state_dict())

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self._done:
            return
        for _, net in _networks(pl_module, self.modules):
            self._convert(net)
            if self.freeze:
                freeze_router(net)
        self._route_sla2_keys_on_load(pl_module)
        self._done = True

    @staticmethod
    def _route_sla2_keys_on_load(pl_module) -> None:
        """Before Lightning loads a checkpoint's state_dict, move `sla2.`-prefixed tensors back in place;
        a dense checkpoint keeps the freshly converted SLA2 parameters."""
        original = pl_module.on_load_checkpoint

        def on_load_checkpoint(checkpoint):
            state = checkpoint.get("state_dict", {})
            for key in [k for k in state if k.startswith(SLA2_PREFIX)]:
                state[key[len(SLA2_PREFIX):]] = state.pop(key)
            for key, value in pl_module.state_dict().items():
                if CORE_MARKER in key:
                    state.setdefault(key, value)
            return original(checkpoint)

        pl_module.on_load_checkpoint = on_load_checkpoint

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if CORE_MARKER in k]:
            state[SLA2_PREFIX + key] = state.pop(key)
        name, net = _networks(pl_module, self.modules)[0]
        layers = sla2_layers(net)
        checkpoint["sla2_metadata"] = {
            "sla2": {"layers": sorted(layers), "config": next(iter(layers.values())).config.to_dict()},
            "provenance": {"trainer": "lightning", "global_step": trainer.global_step, "module": name}}


class SLA2StatsLogger(pl.Callback):
    """Every `every_n_steps`, log per converted layer: α mean/min/max, realised kept fraction, router drift."""

    def __init__(self, every_n_steps: int = 50, modules: Sequence[str] = ("denoiser",)):
        self.every, self.modules = every_n_steps, tuple(modules)
        self._tokens: dict[tuple[str, int], int] = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        for name, net in _networks(pl_module, self.modules):
            for i, core in sla2_layers(net).items():
                core.register_forward_pre_hook(
                    lambda _m, args, key=(name, i): self._tokens.__setitem__(key, args[0].shape[-2]))

    def metrics(self, pl_module) -> dict[str, float]:
        values = {}
        for name, net in _networks(pl_module, self.modules):
            for row in describe_layers(net):
                if not row["converted"]:
                    continue
                prefix = f"sla2/{name}/layer{row['layer']}"
                values.update({f"{prefix}/alpha_mean": row["alpha_mean"], f"{prefix}/alpha_min": row["alpha_min"],
                               f"{prefix}/alpha_max": row["alpha_max"],
                               f"{prefix}/router_drift_q": row["router_drift_q"],
                               f"{prefix}/router_drift_k": row["router_drift_k"]})
                tokens = self._tokens.get((name, row["layer"]))
                if tokens:
                    n_k = num_blocks(tokens, row["block_k"])
                    values[f"{prefix}/kept_fraction"] = keep_count(row["topk"], n_k) / n_k
        return values

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            pl_module.log_dict(self.metrics(pl_module), on_step=True, on_epoch=False)


class SLA2TopkSchedule(pl.Callback):
    """topk from `start` (1.0 = every block, exact attention) to `end` over `steps` optimiser steps."""

    def __init__(self, start: float = 1.0, end: float = 0.15, steps: int = 1000, shape: str = "cosine",
                 modules: Sequence[str] = DEFAULT_MODULES):
        if shape not in ("linear", "cosine"):
            raise SLA2Error(f"unknown schedule shape {shape!r}; use linear or cosine")
        self.start, self.end, self.steps, self.shape, self.modules = start, end, max(1, steps), shape, tuple(modules)

    def topk_at(self, step: int) -> float:
        progress = min(1.0, step / self.steps)
        if self.shape == "cosine":
            progress = 0.5 - 0.5 * math.cos(math.pi * progress)
        return self.start + (self.end - self.start) * progress

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        topk = self.topk_at(trainer.global_step)
        for _, net in _networks(pl_module, self.modules):
            set_topk(net, topk)
        pl_module.log("sla2/topk", topk, on_step=True, on_epoch=False)


class SLA2QATSwitch(pl.Callback):
    """QAT `enable`d (or disabled) from optimiser step `at_step` on, the opposite before it."""

    def __init__(self, at_step: int = 0, enable: bool = True, modules: Sequence[str] = DEFAULT_MODULES):
        self.at_step, self.enable, self.modules = at_step, enable, tuple(modules)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        on = self.enable if trainer.global_step >= self.at_step else not self.enable
        for _, net in _networks(pl_module, self.modules):
            (enable_qat if on else disable_qat)(net)
