"""Checkpoints in, models out, and back: `load_model` reads every supported file, `save_model` writes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import CheckpointError, InvalidParameter
from ..models.jit import ARCHITECTURES, JiT, JiTConfig
from ..sla2.attention import SLA2Config
from ..sla2.layers import set_sla2_layers, sla2_layers
from .architecture import infer_config, with_in_context_start
from .reading import RawCheckpoint, read_checkpoint
from .writing import WRITERS, check_output, claim, file_sha256, split_state

__all__ = ["LoadInfo", "load_model", "save_model", "model_metadata", "check_output", "file_sha256",
           "read_checkpoint", "WRITERS", "writer"]


@dataclass
class LoadInfo:
    """Where a model came from and what it is."""

    path: Path
    layout: str
    weights: str
    available_weights: list[str]
    config: JiTConfig
    sla2_layers: list[int]
    sla2_config: SLA2Config | None  # the base settings; a budgeted file's layers each have their own topk
    provenance: dict = field(default_factory=dict)

    @property
    def preset(self) -> str | None:
        return preset_name(self.config)


def preset_name(config: JiTConfig) -> str | None:
    for name, preset in ARCHITECTURES.items():
        if dataclasses.replace(preset, input_size=config.input_size, num_classes=config.num_classes,
                               noise_scale=config.noise_scale) == config:
            return name
    return None


def _float_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype the weights were stored in, so a round trip stays bit-exact."""
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def load_model(path, weights: str = "auto", in_context_start: int | None = None, device="cpu",
               trust_checkpoint: bool = False) -> tuple[JiT, LoadInfo]:
    """Load any supported file (official `.pth`, PixelGen `.ckpt`, state_dict, safetensors, ours) into JiT."""
    raw: RawCheckpoint = read_checkpoint(path, trust=trust_checkpoint)
    name, state = raw.entry(weights)
    dense, sla2 = split_state(state)
    meta = raw.metadata
    if "model_config" in meta:
        config = with_in_context_start(JiTConfig.from_dict(meta["model_config"]), in_context_start)
    else:
        config = infer_config(dense, args=raw.args, in_context_start=in_context_start, source=raw.path.name)
    model = JiT(config).to(_float_dtype(dense))
    layers, sla2_config = [], None
    if sla2:
        if "sla2" not in meta:
            raise CheckpointError(f"{raw.path.name} has SLA2 tensors but no SLA2 metadata to rebuild them")
        layers = list(meta["sla2"]["layers"])
        sla2_config = SLA2Config.from_dict(meta["sla2"]["config"])
        topk_per_layer = {int(i): topk for i, topk in meta["sla2"].get("topk_per_layer", {}).items()}
        set_sla2_layers(model, layers, sla2_config, topk_per_layer)
    try:
        model.load_state_dict({**dense, **sla2}, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{raw.path.name} does not match the inferred JiT architecture: {detail}") from None
    model.eval().to(device)
    info = LoadInfo(path=raw.path, layout=raw.layout, weights=name, available_weights=list(raw.entries),
                    config=config, sla2_layers=layers, sla2_config=sla2_config,
                    provenance=meta.get("provenance", {}))
    return model, info


def model_metadata(model: JiT, provenance: dict) -> dict:
    """The metadata our files carry: model config, SLA2 layers and settings, provenance."""
    converted = sla2_layers(model)
    meta = {"model_config": model.config.to_dict(), "provenance": provenance, "preset": preset_name(model.config)}
    if converted:
        first = next(iter(converted.values()))
        meta["sla2"] = {"layers": sorted(converted), "config": first.config.to_dict()}
        topks = {str(i): core.config.topk for i, core in converted.items()}
        if len(set(topks.values())) > 1:  # only then, so files of one topk are written as before
            meta["sla2"]["topk_per_layer"] = topks
    return meta


def writer(format: str) -> Callable:
    """The writer of checkpoint `format`; callers may look it up early to fail before slow work."""
    if format not in WRITERS:
        raise InvalidParameter("format", format, "unknown {name} {value!r}; choose one of: {choices}",
                               choices=", ".join(WRITERS))
    return WRITERS[format]


def save_model(model: JiT, dst, *, format: str = "safetensors", provenance: dict | None = None,
               force: bool = False, sources: tuple = ()) -> Path:
    """Write `model` atomically in `format`; refuses to overwrite without `force` and never touches `sources`.

    `dst` is claimed while it is checked and written: another process writing it at the same time is refused.
    """
    write = writer(format)
    dst = Path(dst)
    sources = tuple(Path(s) for s in sources)
    with claim([dst], sources):
        check_output(dst, force, sources)
        write(dst, model.state_dict(), model_metadata(model, provenance or {}))
    return dst
