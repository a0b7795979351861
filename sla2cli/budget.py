"""Quality-budgeted conversion: each layer keeps the fewest key blocks whose layer-local error stays within a bound.

The error is `measure_layers`' relative squared error against dense attention on the dense model's own q, k, v,
after α is calibrated for the candidate, so a layer's error depends on its own kept-block count only. All layers
bisect at once (errors fall as blocks are kept), one calibration and one measurement per round.
"""

from __future__ import annotations

import math

import torch

from .conversion import MIN_KEY_BLOCKS_TO_PAY_OFF, ConversionResult, convert_model
from .errors import InvalidParameter, UsageError
from .models.jit import JiT
from .sla2.attention import SLA2Config
from .sla2.layers import layer_tokens, set_sla2_layers
from .sla2.routing import keep_count, num_blocks
from .sla2.stats import calibrate_alpha, measure_layers

# Samples of the model's own distribution to calibrate and measure on when the caller names no number.
DEFAULT_SAMPLES = 8

# Why a layer got its setting (`reason` of each record).
WITHIN_BUDGET, TOO_FEW_KEY_BLOCKS, OVER_BUDGET = "within_budget", "too_few_key_blocks", "over_budget"


def check_max_error(max_error: float) -> float:
    """`max_error` as a float, or InvalidParameter; callers check it before any slow work."""
    if not (isinstance(max_error, (int, float)) and math.isfinite(max_error) and max_error > 0):
        raise InvalidParameter("max_error", max_error, "{name} must be a finite number > 0, got {value}")
    return float(max_error)


def topk_for(kept: int, key_blocks: int) -> float:
    """The topk that keeps exactly `kept` of `key_blocks` blocks."""
    topk = kept / key_blocks
    assert keep_count(topk, key_blocks) == kept
    return topk


def _record(layer: int, key_blocks: int, kept: int | None, error: float | None, reason: str, why: str) -> dict:
    return {"layer": layer, "key_blocks": key_blocks, "kept_blocks": kept,
            "topk": None if kept is None else topk_for(kept, key_blocks), "error": error, "reason": reason,
            "why": why}


def choose_keep_counts(model: JiT, layers: list[int], settings: SLA2Config, max_error: float,
                       calibration: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> list[dict]:
    """Per layer of `layers`: the smallest kept-block count whose error is <= `max_error` (one block fewer
    exceeds it), or dense and why. Leaves `model` converted as last searched; `convert_within_budget` finishes."""
    records, key_blocks = {}, {}
    for i in layers:
        tokens = layer_tokens(model, i)
        if tokens is None:
            raise UsageError(f"layer {i}: a budgeted conversion needs the model's resolution (a JiT config)")
        n_k = num_blocks(tokens, settings.block_k)
        if n_k < MIN_KEY_BLOCKS_TO_PAY_OFF:
            records[i] = _record(i, n_k, None, None, TOO_FEW_KEY_BLOCKS,
                                 f"dense: {n_k} key blocks (< {MIN_KEY_BLOCKS_TO_PAY_OFF}), SLA2 cannot pay off")
        else:
            key_blocks[i] = n_k
    # The error at lo exceeds the budget (0: nothing kept), at hi it does not (n_k: dense).
    bounds = {i: (0, n_k) for i, n_k in key_blocks.items()}
    errors: dict[int, dict[int, float]] = {i: {} for i in bounds}
    topks: dict[int, float] = {}
    while trial := {i: (lo + hi) // 2 for i, (lo, hi) in bounds.items() if hi - lo > 1}:
        topks.update({i: topk_for(kept, key_blocks[i]) for i, kept in trial.items()})
        set_sla2_layers(model, sorted(bounds), settings, topks)
        calibrate_alpha(model, *calibration)
        measured = {m["layer"]: m["relative_squared_error"] for m in measure_layers(model, *calibration)}
        for i, kept in trial.items():
            errors[i][kept] = measured[i]
            lo, hi = bounds[i]
            bounds[i] = (lo, kept) if measured[i] <= max_error else (kept, hi)
    for i, (lo, hi) in bounds.items():
        n_k = key_blocks[i]
        if hi == n_k:
            records[i] = _record(i, n_k, None, None, OVER_BUDGET,
                                 f"dense: even {lo}/{n_k} blocks give error {errors[i][lo]:.4g} > {max_error:g}")
        else:
            fewer = f"; {lo} give {errors[i][lo]:.4g}" if lo else ""
            records[i] = _record(i, n_k, hi, errors[i][hi], WITHIN_BUDGET,
                                 f"fewest blocks with error {errors[i][hi]:.4g} <= {max_error:g}{fewer}")
    return [records[i] for i in sorted(records)]


def convert_within_budget(model: JiT, *, layer_spec: str | list[int] | None, settings: SLA2Config,
                          max_error: float, calibration: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                          ) -> ConversionResult:
    """`convert_model` with each layer's topk chosen by `choose_keep_counts` (`settings.topk` is not used);
    the result's `budget` holds the per-layer records."""
    max_error = check_max_error(max_error)
    layers = set_sla2_layers(model, layer_spec, settings)
    records = choose_keep_counts(model, layers, settings, max_error, calibration)
    chosen = {r["layer"]: r["topk"] for r in records if r["topk"] is not None}
    result = convert_model(model, layer_spec=sorted(chosen), settings=settings, calibration=calibration,
                           topk_per_layer=chosen)
    result.budget = records
    return result
