"""Checkpoints in, models out, and back: `load_model` reads every supported file, `save_model` writes."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import CheckpointError, InvalidParameter, SLA2Error
from ..models.jit import ARCHITECTURES, JiT, JiTConfig
from ..sla2.attention import SLA2Config
from ..sla2.layers import set_sla2_layers, sla2_layers
from .architecture import infer_config
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
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)  # each tensor's stored dtype; saving keeps it
    warnings: list[str] = field(default_factory=list)  # about the file's numbers (NaN, integer weights)

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


def _names(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def _metadata_config(meta: dict, source: str) -> JiTConfig | None:
    """Our files' `model_config`, each field of the type it must have: metadata is text anyone can edit."""
    if "model_config" not in meta:
        return None
    data = meta["model_config"]
    if not isinstance(data, dict):
        raise CheckpointError(f"{source} has corrupt sla2cli metadata (model_config is a {type(data).__name__})")
    config = JiTConfig.from_dict(data)
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "noise_scale":
            ok = type(value) in (int, float) and math.isfinite(value) and value > 0
        else:
            ok = (type(value) is int and value >= 0) or (value is None and f.name == "bottleneck_dim")
        if not ok:
            raise CheckpointError(f"{source} has corrupt sla2cli metadata (model_config {f.name} = {value!r})")
    return config


def _sla2_metadata(meta: dict, depth: int, source: str) -> tuple[list[int], SLA2Config, dict[int, float]]:
    """The converted layers, their settings and per-layer topk, as our files' `sla2` metadata gives them."""
    if "sla2" not in meta:
        raise CheckpointError(f"{source} has SLA2 tensors but no SLA2 metadata to rebuild them")
    try:
        layers = meta["sla2"]["layers"]
        if not (isinstance(layers, list) and all(type(i) is int and 0 <= i < depth for i in layers)
                and len(set(layers)) == len(layers)):
            raise ValueError(f"layers {layers!r} are not distinct blocks of 0-{depth - 1}")
        config = SLA2Config.from_dict(meta["sla2"]["config"])
        topk_per_layer = {int(i): topk for i, topk in meta["sla2"].get("topk_per_layer", {}).items()}
        for topk in topk_per_layer.values():
            dataclasses.replace(config, topk=topk)  # checks it
    except (KeyError, TypeError, ValueError, AttributeError, SLA2Error) as exc:
        detail = f"no {exc}" if isinstance(exc, KeyError) else str(exc)
        raise CheckpointError(f"{source} has corrupt SLA2 metadata ({detail})") from None
    return layers, config, topk_per_layer


def _build(config: JiTConfig, state: dict[str, torch.Tensor], dtype: torch.dtype, source: str,
           sla2: tuple[list[int], SLA2Config, dict[int, float]] | None) -> JiT:
    """JiT `config` (with `sla2`'s layers converted) holding exactly `state`'s tensors, as `dtype`.

    The model is laid out on the meta device and its shapes checked against the file's before any memory
    is taken: a file of a few hundred bytes cannot ask for gigabytes. The file's tensors then become the
    model's own (`assign`), not copied into fresh ones.
    """
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if len(blocks) != config.depth:  # the depth is the highest block number plus one
        raise CheckpointError(f"{source} is not a JiT model (it has tensors of {len(blocks)} blocks, numbered "
                              f"up to {config.depth - 1})")
    with torch.device("meta"):
        model = JiT(config)
        if sla2 is not None:
            set_sla2_layers(model, *sla2)
    expected = model.state_dict()
    problems = [f"{k} has shape {tuple(state[k].shape)}, not {tuple(v.shape)}" for k, v in expected.items()
                if k in state and state[k].shape != v.shape]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    problems += [f"missing {_names(missing)}"] * bool(missing) + [f"unexpected {_names(unexpected)}"] * bool(unexpected)
    if problems:
        raise CheckpointError(f"{source} does not match the inferred JiT architecture: {'; '.join(problems[:3])}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return model


def _weight_warnings(state: dict[str, torch.Tensor], dtype: torch.dtype, source: str) -> list[str]:
    """What a person should know about the numbers a file holds: NaN or infinite values, integer weights."""
    warnings = []
    nonfinite = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if nonfinite:
        warnings.append(f"{source}: {len(nonfinite)} tensor(s) hold NaN or infinite values ({_names(nonfinite)}); "
                        "the model's outputs will not be finite")
    integers = [k for k, v in state.items() if not v.is_floating_point()]
    if integers:
        kinds = ", ".join(sorted({str(state[k].dtype).removeprefix("torch.") for k in integers}))
        warnings.append(f"{source}: {len(integers)} tensor(s) are stored as {kinds}, not floating point, and are "
                        f"read as {str(dtype).removeprefix('torch.')} ({_names(integers)})")
    return warnings


def load_model(path, weights: str = "auto", in_context_start: int | None = None, device="cpu",
               trust_checkpoint: bool = False) -> tuple[JiT, LoadInfo]:
    """Load any supported file (official `.pth`, PixelGen `.ckpt`, state_dict, safetensors, ours) into JiT.

    The architecture is read off the tensors' shapes; our files' metadata must agree with them.
    """
    raw: RawCheckpoint = read_checkpoint(path, trust=trust_checkpoint)
    name, state = raw.entry(weights)
    source = raw.path.name
    dense, sla2 = split_state(state)
    meta = raw.metadata
    stored = _metadata_config(meta, source)
    if stored is not None and in_context_start is None:
        if not 0 <= stored.in_context_start < stored.depth:
            raise CheckpointError(f"{source} has corrupt sla2cli metadata (model_config in_context_start "
                                  f"{stored.in_context_start} of {stored.depth} blocks)")
        in_context_start = stored.in_context_start
    config = infer_config(dense, args=raw.args, in_context_start=in_context_start, source=source)
    if stored is not None:
        config = dataclasses.replace(config, noise_scale=float(stored.noise_scale))
        differ = [f"{f.name} {getattr(stored, f.name)!r} (tensors: {getattr(config, f.name)!r})"
                  for f in dataclasses.fields(JiTConfig) if f.name != "in_context_start"
                  and getattr(stored, f.name) != getattr(config, f.name)]
        if differ:
            raise CheckpointError(f"{source}: its metadata describes another model than its tensors hold: "
                                  f"{'; '.join(differ[:3])}")
    layers = _sla2_metadata(meta, config.depth, source) if sla2 else None
    dtype = _float_dtype(dense)
    model = _build(config, {**dense, **sla2}, dtype, source, layers).eval().to(device)
    provenance = meta.get("provenance")
    info = LoadInfo(path=raw.path, layout=raw.layout, weights=name, available_weights=list(raw.entries),
                    config=config, sla2_layers=layers[0] if layers else [],
                    sla2_config=layers[1] if layers else None,
                    provenance=provenance if isinstance(provenance, dict) else {},
                    dtypes={k: v.dtype for k, v in state.items() if v.is_floating_point()},
                    warnings=_weight_warnings(state, dtype, source))
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
               force: bool = False, sources: tuple = (), dtypes: dict[str, torch.dtype] | None = None) -> Path:
    """Write `model` atomically in `format`; refuses to overwrite without `force` and never touches `sources`.

    `dst` is claimed while it is checked and written: another process writing it at the same time is refused.
    `dtypes` (a `LoadInfo.dtypes`): tensors stored in these dtypes, so a file of float16 matrices and float32
    vectors, computed on in float32, is written as it was read.
    """
    write = writer(format)
    dst = Path(dst)
    sources = tuple(Path(s) for s in sources)
    state = {k: v.to((dtypes or {}).get(k, v.dtype)) for k, v in model.state_dict().items()}
    with claim([dst], sources):
        check_output(dst, force, sources)
        write(dst, state, model_metadata(model, provenance or {}))
    return dst
