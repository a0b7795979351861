"""Reading a JiT architecture off tensor shapes.

Everything but `in_context_start` is in the weights. That one comes from the official `args.model`
preset name, else from the preset with the same depth and width, else the user must say it.
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch

from ..errors import CheckpointError, InvalidParameter
from ..models.jit import ARCHITECTURES, JiTConfig

_REQUIRED = ("pos_embed", "x_embedder.proj1.weight", "y_embedder.embedding_table.weight",
             "blocks.0.attn.q_norm.weight", "blocks.0.mlp.w12.weight", "final_layer.linear.weight")


def _preset_for(depth: int, hidden: int) -> tuple[str, JiTConfig] | None:
    for name, cfg in ARCHITECTURES.items():
        if cfg.depth == depth and cfg.hidden_size == hidden:
            return name, cfg
    return None


def infer_config(state: dict[str, torch.Tensor], *, args: dict | None = None,
                 in_context_start: int | None = None, source: str = "checkpoint") -> JiTConfig:
    """JiTConfig for a dense JiT state_dict; raises CheckpointError if it is not one."""
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"{source} is not a JiT model (missing {', '.join(missing[:3])})")
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
        noise_scale=float(args.get("noise_scale", JiTConfig.noise_scale)))


def check_in_context_start(start: int, depth: int) -> None:
    if not 0 <= start < depth:
        raise InvalidParameter("in_context_start", start, "{name} {value} is out of range; the model has blocks "
                               "0-{last}", last=depth - 1)


def with_in_context_start(config: JiTConfig, start: int | None) -> JiTConfig:
    if start is None or start == config.in_context_start:
        return config
    check_in_context_start(start, config.depth)
    return dataclasses.replace(config, in_context_start=start)
