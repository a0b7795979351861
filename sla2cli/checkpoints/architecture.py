"""Reading a JiT architecture off tensor shapes.

Everything but `in_context_start` is in the weights. That one comes from the official `args.model`
preset name, else from the preset with the same depth and width, else the user must say it.
"""

from __future__ import annotations

import math
import re

import torch

from ..errors import CheckpointError, InvalidParameter
from ..models.jit import ARCHITECTURES, JiTConfig

_REQUIRED = ("pos_embed", "x_embedder.proj1.weight", "y_embedder.embedding_table.weight",
             "blocks.0.attn.q_norm.weight", "blocks.0.mlp.w12.weight", "final_layer.linear.weight")
# The dimensions of the tensors the architecture is read from (a loaded model's shapes are checked in full).
_NDIM = {"pos_embed": 3, "x_embedder.proj1.weight": 4, "y_embedder.embedding_table.weight": 2,
         "blocks.0.attn.q_norm.weight": 1, "blocks.0.mlp.w12.weight": 2, "in_context_posemb": 3}


def _preset_for(depth: int, hidden: int) -> tuple[str, JiTConfig] | None:
    for name, cfg in ARCHITECTURES.items():
        if cfg.depth == depth and cfg.hidden_size == hidden:
            return name, cfg
    return None


def _check_shapes(state: dict[str, torch.Tensor], source: str) -> None:
    """The tensors the architecture is read from must have the dimensions it is read from, none of them 0."""
    for key, ndim in _NDIM.items():
        if key in state and (state[key].dim() != ndim or not state[key].numel()):
            raise CheckpointError(f"{source} is not a JiT model ({key} has shape {tuple(state[key].shape)})")
    positions, hidden = state["pos_embed"].shape[1:]
    head_dim = state["blocks.0.attn.q_norm.weight"].shape[0]
    if math.isqrt(positions) ** 2 != positions:
        raise CheckpointError(f"{source} is not a JiT model (pos_embed has {positions} positions, no square grid)")
    if hidden % head_dim:
        raise CheckpointError(f"{source} is not a JiT model (width {hidden} is no multiple of the head size "
                              f"{head_dim})")


def _noise_scale(args: dict, source: str) -> float:
    value = args.get("noise_scale", JiTConfig.noise_scale)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise CheckpointError(f"{source} has args.noise_scale {value!r}; expected a positive number")
    return float(value)


def infer_config(state: dict[str, torch.Tensor], *, args: dict | None = None,
                 in_context_start: int | None = None, source: str = "checkpoint") -> JiTConfig:
    """JiTConfig for a dense JiT state_dict; raises CheckpointError if it is not one."""
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"{source} is not a JiT model (missing {', '.join(missing[:3])})")
    _check_shapes(state, source)
    args = args or {}
    hidden = state["pos_embed"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    head_dim = state["blocks.0.attn.q_norm.weight"].shape[0]
    proj1 = state["x_embedder.proj1.weight"]
    patch, in_channels = proj1.shape[-1], proj1.shape[1]
    grid = math.isqrt(state["pos_embed"].shape[1])
    in_context_len = state["in_context_posemb"].shape[1] if "in_context_posemb" in state else 0

    start = in_context_start
    if start is None and in_context_len == 0:
        start = 0
    if start is None and isinstance(args.get("model"), str) and args["model"] in ARCHITECTURES:
        preset = ARCHITECTURES[args["model"]]
        if (preset.depth, preset.hidden_size) == (depth, hidden):
            start = preset.in_context_start
    if start is None and (match := _preset_for(depth, hidden)):
        start = match[1].in_context_start
    if start is None:
        raise InvalidParameter("in_context_start", None, "{source}: depth {depth} and width {hidden} match no "
                               "preset, so the block where in-context tokens join cannot be known; pass it as {name}",
                               source=source, depth=depth, hidden=hidden)
    check_in_context_start(start, depth)

    return JiTConfig(
        input_size=grid * patch, patch_size=patch, in_channels=in_channels, hidden_size=hidden, depth=depth,
        num_heads=hidden // head_dim, ffn_hidden_dim=state["blocks.0.mlp.w12.weight"].shape[0] // 2,
        num_classes=state["y_embedder.embedding_table.weight"].shape[0] - 1,
        bottleneck_dim=proj1.shape[0] if "x_embedder.proj2.weight" in state else None,
        in_context_len=in_context_len, in_context_start=start,
        noise_scale=_noise_scale(args, source))


def check_in_context_start(start: int, depth: int) -> None:
    if not 0 <= start < depth:
        raise InvalidParameter("in_context_start", start, "{name} {value} is out of range; the model has blocks "
                               "0-{last}", last=depth - 1)
