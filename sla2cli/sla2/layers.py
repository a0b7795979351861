"""Turning chosen layers of a JiT-like model into SLA2 attention, and back.

Works on our `JiT` and, duck-typed, on models built by the official JiT or PixelGen code: any
`model.blocks[i].attn` with `qkv`, `q_norm`, `k_norm`, `proj` and `num_heads`. Weights are never
copied or changed: the block's own linear layers stay in place and only the token mixing is swapped.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
import warnings

from torch import nn

from ..errors import UsageError
from ..models.jit import Attention, DenseAttention
from .attention import ALPHA_INIT, SLA2Attention, SLA2Config

_ATTENTION_PARTS = ("qkv", "q_norm", "k_norm", "proj", "num_heads")


def parse_layer_spec(spec: str, depth: int) -> list[int]:
    """`6-11`, `0,2,5-7`, `all`, `none`, `last:6` → sorted layer indices; anything else is a UsageError."""
    text = spec.strip().lower()
    valid = f"valid layers are 0-{depth - 1} (`all`, `none`, `last:N`, `A-B`, `A,B,C`)"
    if text == "all":
        return list(range(depth))
    if text == "none":
        return []
    if m := re.fullmatch(r"last:(\d+)", text):
        count = int(m.group(1))
        if not 1 <= count <= depth:
            raise UsageError(f"layer spec {spec!r}: last:N needs 1 <= N <= {depth}; {valid}")
        return list(range(depth - count, depth))
    layers: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise UsageError(f"malformed layer spec {spec!r}; {valid}")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if lo > hi or hi >= depth:
            raise UsageError(f"layer spec {spec!r} is out of range; {valid}")
        layers.update(range(lo, hi + 1))
    return sorted(layers)


def transformer_blocks(model: nn.Module):
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise UsageError("model has no `blocks` ModuleList; SLA2 converts JiT-like transformers only")
    return blocks


def layer_tokens(model: nn.Module, layer: int) -> int | None:
    """Tokens the attention of `layer` sees at the model's native resolution (None if unknowable)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "tokens"):
        return config.tokens(layer)
    try:  # official JiT / PixelGen attributes
        grid = model.input_size // model.patch_size
        extra = model.in_context_len if model.in_context_len > 0 and layer >= model.in_context_start else 0
        return grid * grid + extra
    except AttributeError:
        return None


def layer_prefix_tokens(model: nn.Module, layer: int) -> int:
    """In-context tokens in front of the image tokens at `layer`: upstream models prepend them from
    in_context_start on; our JiT appends them (`in_context_first = False`), so it has none."""
    if not getattr(model, "in_context_first", True):
        return 0
    config = getattr(model, "config", None)
    source = config if config is not None and hasattr(config, "in_context_len") else model
    length, start = getattr(source, "in_context_len", 0), getattr(source, "in_context_start", 0)
    return length if length > 0 and layer >= start else 0


def sla2_layers(model: nn.Module) -> dict[int, SLA2Attention]:
    """The converted layers of a model, by index."""
    return {i: b.attn.core for i, b in enumerate(transformer_blocks(model))
            if isinstance(getattr(b.attn, "core", None), SLA2Attention)}


def apply_sla2(model: nn.Module, layers, config: SLA2Config | None = None, *, alpha_init: float = ALPHA_INIT,
               backend: str = "auto", **settings) -> list[int]:
    """Convert `layers` (indices or a spec string) of `model` to SLA2 with `config` (default: SLA2Config())
    in place; returns the converted indices.

    Layers already converted get the new settings but keep their trained router and α when shapes allow.
    Settings as keywords (`topk=0.3`) are the deprecated form of `config`, kept for existing callers.
    """
    config = config or SLA2Config()
    if settings:
        warnings.warn("apply_sla2(model, layers, topk=...) is deprecated; pass an SLA2Config: "
                      "apply_sla2(model, layers, SLA2Config(topk=...))", DeprecationWarning, stacklevel=2)
        config = dataclasses.replace(config, **settings)
    blocks = transformer_blocks(model)
    if isinstance(layers, str):
        layers = parse_layer_spec(layers, len(blocks))
    for i in layers:
        if not 0 <= i < len(blocks):
            raise UsageError(f"layer {i} is out of range; valid layers are 0-{len(blocks) - 1}")
        attn = blocks[i].attn
        missing = [p for p in _ATTENTION_PARTS if not hasattr(attn, p)]
        if missing:
            raise UsageError(f"block {i}'s attention lacks {', '.join(missing)}; not a JiT-style attention")
        weight = attn.qkv.weight
        head_dim = weight.shape[1] // attn.num_heads
        tokens = layer_tokens(model, i)
        query_blocks = None if tokens is None else -(-tokens // config.block_q)
        core = SLA2Attention(attn.num_heads, head_dim, config, query_blocks, alpha_init, backend,
                             prefix_tokens=layer_prefix_tokens(model, i))
        old = getattr(attn, "core", None)
        if isinstance(old, SLA2Attention):
            core.load_state_dict({k: v for k, v in old.state_dict().items()
                                  if v.shape == core.state_dict()[k].shape}, strict=False)
        core.to(device=weight.device, dtype=weight.dtype)
        if isinstance(attn, Attention):
            attn.core = core
        else:
            blocks[i].attn = Attention.adopt(attn, core)
    return list(layers)


def set_sla2_layers(model: nn.Module, layers, config: SLA2Config,
                    topk_per_layer: dict[int, float] | None = None) -> list[int]:
    """Make exactly `layers` SLA2 with `config` and revert the rest to dense; returns them.

    `layers` are indices or a spec string; None keeps a converted model's own layers and means all of a
    dense one (what `sla2 convert` and `sla2 profile` do without --layers). `topk_per_layer` gives layers
    their own topk (budgeted conversions); they are converted in groups of equal topk.
    """
    converted = sla2_layers(model)
    if layers is None and converted:
        layers = sorted(converted)
    elif layers is None or isinstance(layers, str):
        layers = parse_layer_spec(layers or "all", len(transformer_blocks(model)))
    remove_sla2(model, [i for i in converted if i not in layers])
    groups: dict[float, list[int]] = {}
    for i in layers:
        groups.setdefault((topk_per_layer or {}).get(i, config.topk), []).append(i)
    for topk, group in groups.items():
        apply_sla2(model, group, dataclasses.replace(config, topk=topk))
    return list(layers)


def dense_twin(model: nn.Module) -> nn.Module:
    """A copy of `model` with every layer attending densely that shares its weights and buffers (no second
    copy in memory): what the sampler's `dense_until` steps run. A model without SLA2 layers is its own twin."""
    if not sla2_layers(model):
        return model
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    twin = copy.deepcopy(model, memo=shared)
    remove_sla2(twin)
    return twin


def remove_sla2(model: nn.Module, layers=None) -> list[int]:
    """Give `layers` (default: all converted) dense attention again; returns the indices reverted."""
    converted = sla2_layers(model)
    chosen = sorted(converted) if layers is None else [i for i in layers if i in converted]
    for i in chosen:
        transformer_blocks(model)[i].attn.core = DenseAttention()
    return chosen
