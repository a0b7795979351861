"""The convert workflow: choose settings and layers, convert (or revert), calibrate α, describe, save.

Kept apart from the CLI so that the same steps serve `sla2 convert`, `sla2 demo` and Python users.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .checkpoints import LoadInfo, file_sha256, save_model
from .errors import InvalidParameter
from .models.jit import JiT
from .sla2.attention import SLA2Config, initial_features
from .sla2.layers import set_sla2_layers, sla2_layers
from .sla2.stats import calibrate_alpha, describe_layers

# Fewer key blocks than this and the kept blocks plus routing cost about as much as dense attention.
MIN_KEY_BLOCKS_TO_PAY_OFF = 8

SLA2_PRESETS: dict[str, dict] = {
    "max-speed": {"topk": 0.05, "qat": True},
    "balanced": {"topk": 0.15, "qat": True},
    "quality": {"topk": 0.25, "qat": False},
}


def check_preset(preset: str | None) -> None:
    if preset is not None and preset not in SLA2_PRESETS:
        raise InvalidParameter("preset", preset, "unknown preset {value!r}; choose one of: {choices}",
                               choices=", ".join(SLA2_PRESETS))


def sla2_settings(preset: str | None, base: SLA2Config | None = None, **explicit) -> SLA2Config:
    """Preset values, then explicit options on top; `base` (an existing conversion) fills the rest."""
    check_preset(preset)
    values = (base or SLA2Config()).to_dict()
    values.update(SLA2_PRESETS.get(preset, {}))
    values.update({k: v for k, v in explicit.items() if v is not None})
    return SLA2Config(**values)


# `suggest_layers`: a layer is worth converting where the kept blocks at the balanced topk hold this much mass.
SUGGEST_MIN_MASS = 0.75


def suggest_layers(concentration: list[dict], topk: float = SLA2_PRESETS["balanced"]["topk"],
                   min_mass: float = SUGGEST_MIN_MASS) -> list[int]:
    """Layers worth converting, from `sla2.stats.attention_concentration` records (measured at `topk`): enough
    key blocks for sparsity to pay off, and at least `min_mass` of the softmax mass in the kept blocks (the
    rest is what the linear branch must approximate)."""
    return [r["layer"] for r in concentration
            if r["key_blocks"] >= MIN_KEY_BLOCKS_TO_PAY_OFF and r["captured_mass"][topk] >= min_mass]


@dataclass
class ConversionResult:
    layers: list[int]
    config: SLA2Config
    rows: list[dict]
    warnings: list[str] = field(default_factory=list)
    calibrated_alpha: dict[int, list[float]] = field(default_factory=dict)
    output: Path | None = None
    budget: list[dict] = field(default_factory=list)  # per-layer choices of a --max-error conversion


def short_sequence_warnings(rows: list[dict], block_k: int) -> list[str]:
    short = [r["layer"] for r in rows if r["converted"] and r["key_blocks"] is not None
             and r["key_blocks"] < MIN_KEY_BLOCKS_TO_PAY_OFF]
    if not short:
        return []
    worst = min(r["key_blocks"] for r in rows if r["layer"] in short)
    return [f"layers {','.join(map(str, short))} see only {worst}+ key blocks of {block_k} tokens: routing and the "
            f"kept blocks cost about as much as dense attention there, so SLA2 cannot pay off; keep them dense "
            f"(choose --layers without them) or run at a higher resolution"]


def convert_model(model: JiT, *, layer_spec: str | list[int] | None, settings: SLA2Config,
                  calibration: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                  topk_per_layer: dict[int, float] | None = None) -> ConversionResult:
    """Convert `model` in place so exactly the layers of `layer_spec` are SLA2 (see `set_sla2_layers`,
    also for `topk_per_layer`); with a `calibration` batch (z, t, y) on the model's device, α is set to
    the softmax mass the kept blocks capture on it."""
    layers = set_sla2_layers(model, layer_spec, settings, topk_per_layer)
    calibrated = {}
    if calibration is not None and layers:
        calibrated = {i: a.flatten().tolist() for i, a in calibrate_alpha(model, *calibration).items()}
    rows = describe_layers(model)
    return ConversionResult(layers=layers, config=settings, rows=rows,
                            warnings=short_sequence_warnings(rows, settings.block_k) + untrained_map_warnings(model),
                            calibrated_alpha=calibrated)


def untrained_map_warnings(model: JiT) -> list[str]:
    """A learned feature map still at its start is no better than the paper's φ (below the head dim it is
    worse: a fixed random basis) until `sla2 finetune` trains it."""
    fresh = [i for i, core in sla2_layers(model).items() if core.config.feature_rank and torch.equal(
        core.feature_q.detach().cpu(), initial_features(*core.feature_q.shape).to(core.feature_q.dtype))]
    if not fresh:
        return []
    return [f"the learned feature maps of layer(s) {', '.join(map(str, fresh))} are untrained; run `sla2 finetune` "
            "(stage 1 trains them with the model's weights untouched) before using this model"]


def provenance_record(**facts) -> dict:
    """`facts` on how a model file was made, with the sla2cli that made it and when."""
    return {**facts, "sla2cli_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def provenance_for(src: Path, info: LoadInfo, **details) -> dict:
    """The provenance of a model converted from `src`: the source file (name, hash, layout, weights),
    `details` of the conversion, and the source's own provenance as `history`."""
    record = provenance_record(source=src.name, source_sha256=file_sha256(src), source_layout=info.layout,
                               weights=info.weights, **details)
    if info.provenance:
        record["history"] = info.provenance
    return record


def write_converted(model: JiT, src: Path, dst: Path, info: LoadInfo, *, format: str = "safetensors",
                    force: bool = False, **details) -> Path:
    """Write `model`, converted from `src`, with its provenance (`details` as in `provenance_for`)."""
    return save_model(model, dst, format=format, provenance=provenance_for(src, info, **details), force=force,
                      sources=(src,), dtypes=info.dtypes)

