"""Where a JiT forward spends its time and FLOPs, per layer, dense against SLA2, and what that buys end to end.

`profile_model` returns one plain dict (what `sla2 profile --json` prints): per-layer FLOPs (counted),
per-layer latencies of dense attention, SLA2 attention and the rest of the block (measured at the model's
real per-layer shapes, on inputs captured from a forward; each a median with its IQR, `*_iqr_ms`, and a
speedup flagged `inconclusive` where the two timings overlap), end-to-end forward latency and peak memory of
the dense model, the model as converted, the model as the recommendations would convert it and the model
with attention removed (the Amdahl ceiling), optionally per resolution (`sweep`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable

import torch
from torch import nn

from ..conversion import MIN_KEY_BLOCKS_TO_PAY_OFF, sla2_settings
from ..errors import InvalidParameter
from ..models.jit import DenseAttention, JiT, JiTConfig, architecture_config
from ..sla2.attention import SLA2Attention
from ..sla2.backends import kernels_unavailable
from ..sla2.layers import set_sla2_layers, sla2_layers, transformer_blocks
from ..sla2.routing import keep_count, num_blocks
from .flops import FLOP_CONVENTION, flop_counter, model_flops
from .timing import LAUNCH_BOUND_MS, Timer, environment

# Forwards faster than this (ms, eager) are also timed as CUDA graphs: at small sizes kernel launches from
# the CPU, not the GPU, set the eager time, and the graph shows what the GPU work itself costs.
E2E_GRAPH_BELOW_MS = 100.0


class NoAttention(nn.Module):
    """Attention removed: returns (a contiguous copy of) v, laid out like an attention output."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return v.contiguous()


@contextmanager
def swapped_cores(model: nn.Module, make: Callable[[int, nn.Module], nn.Module | None]):
    """Give block i the core `make(i, current)` (None keeps it) for the duration; restore afterwards."""
    blocks = transformer_blocks(model)
    saved = {}
    for i, block in enumerate(blocks):
        new = make(i, block.attn.core)
        if new is not None:
            saved[i] = block.attn.core
            block.attn.core = new
    try:
        yield model
    finally:
        for i, core in saved.items():
            blocks[i].attn.core = core


def dense_everywhere(i, core):
    return DenseAttention() if not isinstance(core, DenseAttention) else None


def no_attention(i, core):
    return NoAttention()


def only_layers(layers: Iterable[int]):
    """Keep SLA2 in `layers`, dense attention in every other converted layer."""
    keep = set(layers)
    return lambda i, core: DenseAttention() if isinstance(core, SLA2Attention) and i not in keep else None


def layer_spec(layers: list[int]) -> str:
    """[4, 5, 6, 9] -> '4-6,9'; [] -> 'none'."""
    if not layers:
        return "none"
    parts, start, prev = [], layers[0], layers[0]
    for i in list(layers[1:]) + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(parts)


def random_model(arch: str, *, resolution: int | None = None, device="cpu", seed: int = 0) -> JiT:
    """A preset with random weights; upstream's zero-initialised parameters (adaLN, output) get small random
    values too, so nothing is timed on zeros."""
    config = architecture_config(arch, **({"input_size": resolution} if resolution else {}))
    torch.manual_seed(seed)
    with torch.device(device):
        model = JiT(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.normal_(0.0, 0.02)
    return model.eval()


def select_layers(model: JiT, layers: str | None, topk: float | None, preset: str | None = None) -> list[int]:
    """Convert exactly `layers` (None: keep a converted model's layers, convert all of a dense one).

    A converted model keeps its trained router, α and topk (a budgeted one has one per layer) where its
    layers stay converted; `preset` (`sla2 convert --preset`'s: topk and QAT) and `topk` override the stored
    settings, `topk` the preset's."""
    converted = sla2_layers(model)
    as_converted = topk is None and preset is None
    if layers is None and as_converted and converted:
        return sorted(converted)
    base = next(iter(converted.values())).config if converted else None
    own = {i: core.config.topk for i, core in converted.items()} if as_converted else None
    return set_sla2_layers(model, layers, sla2_settings(preset, base, topk=topk), own)


def kernel_status(device: torch.device) -> str:
    """On CUDA, load the Triton kernels (they register the "triton" backend); say whether that worked."""
    if device.type != "cuda":
        return f"not used on {device.type}"
    why = kernels_unavailable(device)
    return "imported" if why is None else f"not importable ({why})"


def check_resolution(model: JiT, resolution: int, parameter: str = "resolution") -> None:
    """`resolution` (the argument called `parameter`) fits the patch size and any per-query-block α."""
    p = model.config.patch_size
    if resolution <= 0 or resolution % p:
        raise InvalidParameter(parameter, resolution, "{name} must be a positive multiple of the patch size {p}, "
                               "got {value}", p=p)
    fixed = [i for i, core in sla2_layers(model).items() if core.config.alpha_mode == "per_head_query_block"]
    if fixed and resolution != model.config.input_size:
        raise InvalidParameter(parameter, resolution, "layers {layers} learned α per query block at {size} px; "
                               "profile them at {name} {size}", layers=layer_spec(fixed), size=model.config.input_size)


def check_profile_options(*, batch_size: int, counter: str) -> None:
    """What `profile_model` checks before any work; a caller may check it earlier still."""
    if batch_size < 1:
        raise InvalidParameter("batch_size", batch_size, "{name} must be >= 1, got {value}")
    flop_counter(counter)


def _inputs(model: JiT, batch_size: int, resolution: int, device, dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    c = model.config
    x = torch.randn(batch_size, c.in_channels, resolution, resolution, generator=gen) * c.noise_scale
    t = torch.rand(batch_size, generator=gen).clamp(0.02, 0.98)
    y = torch.randint(0, c.num_classes, (batch_size,), generator=gen)
    return x.to(device, dtype), t.to(device), y.to(device)


def _no_grad(fn: Callable) -> Callable[[], object]:
    def call():
        with torch.no_grad():
            return fn()
    return call


def _pair(timer: Timer, fns: dict[str, Callable], graph_below_ms: float = LAUNCH_BOUND_MS) -> dict[str, dict]:
    """Eager median and IQR of each; if any median is under `graph_below_ms` on CUDA, every one also as a
    CUDA graph (`graph_ms`, `graph_iqr_ms`; None where it cannot be captured)."""
    result = {name: {"ms": t.ms, "iqr_ms": t.iqr_ms} for name, t in ((n, timer.eager(fn)) for n, fn in fns.items())}
    if timer.is_cuda and min(r["ms"] for r in result.values()) < graph_below_ms:
        for name, fn in fns.items():
            graph = timer.graph(fn, result[name]["ms"])
            result[name].update(graph_ms=graph and graph.ms, graph_iqr_ms=graph and graph.iqr_ms)
    return result


def overlap(a: dict, b: dict, key: str = "ms") -> bool:
    """Whether two timings (`key` and `key` IQR) cannot be told apart: the ranges median ± IQR/2 intersect.
    A speedup between them is then inconclusive: noise, not a result."""
    iqr = key.removesuffix("ms") + "iqr_ms"
    return abs(a[key] - b[key]) <= (a[iqr] + b[iqr]) / 2


def _end_to_end(model: JiT, timer: Timer, inputs, variants: dict[str, Callable]) -> dict[str, dict]:
    """Forward latency and peak memory of the model under each core swap in `variants`."""
    fns = {}
    for name, make in variants.items():
        def forward(make=make):
            with swapped_cores(model, make):
                return model(*inputs)
        fns[name] = _no_grad(forward)
    measured = _pair(timer, fns, graph_below_ms=E2E_GRAPH_BELOW_MS)
    for name, fn in fns.items():
        peak = timer.peak_memory(fn)
        measured[name]["peak_memory_mib"] = None if peak is None else round(peak / 2 ** 20, 1)
    return measured


def _signature(model: JiT, i: int, tokens: int, core: nn.Module, probe: torch.Tensor):
    if isinstance(core, SLA2Attention):
        return (tokens, "sla2", tuple(sorted(core.config.to_dict().items())), core.resolve_backend(probe).name)
    return (tokens, "dense")


def _capture(model: JiT, layers: list[int], inputs) -> dict[int, dict]:
    """The real inputs of each listed block and its attention core, from one dense forward."""
    captured: dict[int, dict] = {i: {} for i in layers}
    blocks = transformer_blocks(model)
    with swapped_cores(model, dense_everywhere):
        handles = []
        for i in layers:
            handles.append(blocks[i].register_forward_pre_hook(
                lambda _m, args, i=i: captured[i].__setitem__("block", args)))
            handles.append(blocks[i].attn.core.register_forward_pre_hook(
                lambda _m, args, i=i: captured[i].__setitem__("qkv", tuple(a.detach() for a in args))))
        try:
            with torch.no_grad():
                model(*inputs)
        finally:
            for h in handles:
                h.remove()
    return captured


def _layer_timings(model: JiT, timer: Timer, inputs, resolution: int, probe: torch.Tensor) -> dict[int, dict]:
    """Per layer: dense attention, SLA2 attention (converted layers) and the rest of the block.

    Layers with the same shape and SLA2 settings are timed once, on the first of them (`timed_as`)."""
    blocks = transformer_blocks(model)
    reps: dict[tuple, int] = {}
    rep_of = {}
    for i, block in enumerate(blocks):
        sig = _signature(model, i, model.config.tokens(i, resolution), block.attn.core, probe)
        rep_of[i] = reps.setdefault(sig, i)
    captured = _capture(model, sorted(set(rep_of.values())), inputs)
    dense = DenseAttention()
    measured: dict[int, dict] = {}
    for r in sorted(set(rep_of.values())):
        q, k, v = captured[r]["qkv"]
        x, c, rope = captured[r]["block"]
        core = blocks[r].attn.core
        fns = {"dense": _no_grad(lambda: dense(q, k, v))}
        if isinstance(core, SLA2Attention):
            fns["sla2"] = _no_grad(lambda core=core: core(q, k, v))
        attn = _pair(timer, fns)

        def rest(r=r, x=x, c=c, rope=rope):
            with swapped_cores(model, lambda i, core: NoAttention() if i == r else None):
                return blocks[r](x, c, rope)
        measured[r] = {"attention": attn, "rest": _pair(timer, {"rest": _no_grad(rest)})["rest"]}
    del captured
    return {i: {**measured[r], "timed_as": r} for i, r in rep_of.items()}


# Short labels of the reasons a converted layer should stay dense (the full sentence is in `reason`).
REASONS = {"few_key_blocks": "few key blocks", "reference_backend": "reference backend",
           "launch_bound": "launch-bound", "not_faster": "not faster"}


def _gpu_ms(timing: dict) -> float:
    """What the GPU spends: the CUDA-graph time where a size is launch-bound, else the eager median."""
    return timing.get("graph_ms") or timing["ms"]


def _why_not_faster(row: dict, timing: dict, device: torch.device) -> list[tuple[str, str]]:
    """(code, sentence) for each reason SLA2 is not faster than dense in this layer."""
    reasons = []
    n_k, block_k = row["key_blocks"], row["block_k"]
    if n_k < MIN_KEY_BLOCKS_TO_PAY_OFF:
        blocks = f"{n_k} block{'s' if n_k != 1 else ''} of {block_k} tokens"
        reasons.append(("few_key_blocks", f"too few key blocks ({blocks}; SLA2 needs about "
                        f"{MIN_KEY_BLOCKS_TO_PAY_OFF}+): routing and the kept blocks cost about as much as dense "
                        "attention"))
    if device.type == "cuda" and (row["backend"] != "triton" or row["qat_fallback"]):
        reasons.append(("reference_backend", f"it runs the PyTorch reference ({row['path']}), not a fused kernel"))
    dense, sla2 = _gpu_ms(timing["dense"]), _gpu_ms(timing["sla2"])
    if dense < LAUNCH_BOUND_MS:
        what = "kernel launches" if device.type == "cuda" else "operator calls"
        reasons.append(("launch_bound", f"launch-bound: dense attention takes only {dense:.3f} ms, less than "
                        f"SLA2's extra {what} cost ({sla2:.3f} ms)"))
    if not reasons:
        reasons.append(("not_faster", f"not faster at {row['tokens']} tokens ({sla2:.3f} vs {dense:.3f} ms)"))
    return reasons


def layer_advice(row: dict, timing: dict, device: torch.device) -> dict:
    """Keep SLA2 in a layer only where it is faster than dense attention on the GPU (CUDA-graph time at
    launch-bound sizes, as the forward overlaps launches with earlier work), else "keep dense" and why."""
    dense_t, sla2_t = timing["dense"], timing["sla2"]
    dense, sla2 = _gpu_ms(dense_t), _gpu_ms(sla2_t)
    if sla2 < dense:
        graph = bool(dense_t.get("graph_ms") and sla2_t.get("graph_ms"))
        reason = f"{dense / sla2:.2f}x faster than dense" + (" as a CUDA graph" if graph else "")
        if graph and sla2_t["ms"] >= dense_t["ms"]:
            reason += f" (launch-bound alone: eager {sla2_t['ms']:.3f} vs {dense_t['ms']:.3f} ms)"
        return {"recommendation": "sla2", "reason": reason, "reasons": [], "reason_codes": []}
    reasons = _why_not_faster(row, timing, device)
    return {"recommendation": "keep dense", "reason": "; ".join(text for _, text in reasons),
            "reasons": [text for _, text in reasons], "reason_codes": [code for code, _ in reasons]}


# End to end, a conversion is recommended only if it beats dense by this factor (a margin over timing noise).
E2E_MARGIN = 1.02


def compared_time(dense: dict, other: dict) -> str:
    """Which time two end-to-end forwards are compared by: "graph_ms" where both were captured, else "ms"."""
    return "graph_ms" if dense.get("graph_ms") and other.get("graph_ms") else "ms"


def recommendation(rows: list[dict], e2e: dict[str, dict]) -> dict:
    """The layers to convert (per-layer advice, then checked end to end) and a one-line verdict.

    `e2e` holds measured forwards: "dense", "converted" and, where the advice differs from the model as
    converted, "recommended". If the advised conversion is not `E2E_MARGIN` faster than dense end to end,
    the advice becomes: keep the model dense. Like the per-layer advice, the check compares CUDA-graph times
    where both forwards were captured: a sampler replays graphs, and eagerly a small forward times the host.
    """
    converted = [r["layer"] for r in rows if r["mode"] == "sla2"]
    keep = [r["layer"] for r in rows if r["recommendation"] == "sla2"]
    keep_dense = [r["layer"] for r in rows if r["recommendation"] == "keep dense"]
    measured = e2e.get("recommended") or (e2e["converted"] if not keep_dense else e2e["dense"])
    key = compared_time(e2e["dense"], measured)
    new_ms, dense_ms = measured[key], e2e["dense"][key]
    check = None
    if not converted:
        verdict = "no layer is converted: pass --layers (and --topk) to see what SLA2 would save"
    elif not keep:
        verdict = "keep the model dense: no converted layer is faster with SLA2 at this size"
    elif new_ms * E2E_MARGIN > dense_ms:
        check = {"layers": layer_spec(keep), "ms": new_ms, "dense_ms": dense_ms, "compared_by": key}
        verdict = (f"keep the model dense: converting layers {layer_spec(keep)} is not {E2E_MARGIN:.2f}x faster "
                   f"end to end ({new_ms:.2f} vs {dense_ms:.2f} ms{' as CUDA graphs' if key == 'graph_ms' else ''})")
        keep, keep_dense, measured = [], converted, e2e["dense"]
    elif keep_dense:
        verdict = f"convert only layers {layer_spec(keep)}; keep {layer_spec(keep_dense)} dense"
    else:
        verdict = f"every converted layer ({layer_spec(keep)}) is faster with SLA2"
    return {"convert": keep, "keep_dense": keep_dense, "layers": layer_spec(keep), "summary": verdict,
            "measured": measured, "rejected_end_to_end": check}


def _speedup(base: float | None, new: float | None) -> float | None:
    return None if not base or not new else base / new


def _e2e_summary(e2e: dict[str, dict]) -> dict:
    dense, converted, bare = e2e["dense"]["ms"], e2e["converted"]["ms"], e2e["no_attention"]["ms"]
    summary = {
        "dense_ms": dense, "converted_ms": converted, "no_attention_ms": bare,
        **{f"{name}_iqr_ms": e2e[name]["iqr_ms"] for name in ("dense", "converted", "no_attention")},
        "speedup": _speedup(dense, converted), "ceiling": _speedup(dense, bare),
        "inconclusive": overlap(e2e["dense"], e2e["converted"]),
        "attention_share": max(0.0, 1 - bare / dense),
        "peak_memory_mib": {name: m["peak_memory_mib"] for name, m in e2e.items()},
    }
    if "recommended" in e2e:
        summary["recommended_ms"] = e2e["recommended"]["ms"]
        summary["recommended_iqr_ms"] = e2e["recommended"]["iqr_ms"]
        key = compared_time(e2e["dense"], e2e["recommended"])  # as the recommendation compared them
        summary["recommended_speedup"] = _speedup(e2e["dense"][key], e2e["recommended"][key])
        summary["recommended_compared_by"] = key
        summary["recommended_inconclusive"] = e2e["recommended"] is not e2e["dense"] and overlap(e2e["dense"],
                                                                                               e2e["recommended"])
    if any(m.get("graph_ms") for m in e2e.values()):
        summary["graph_ms"] = {name: m.get("graph_ms") for name, m in e2e.items()}
    return summary


def sweep_row(model: JiT, timer: Timer, *, resolution: int, batch_size: int, counter: str, device, dtype,
              seed: int) -> dict:
    """End-to-end dense / converted / no-attention at one resolution, with counted FLOPs."""
    check_resolution(model, resolution, parameter="sweep")
    flops = model_flops(model, batch_size=batch_size, resolution=resolution, counter=counter, device=device,
                        dtype=dtype)
    inputs = _inputs(model, batch_size, resolution, device, dtype, seed)
    e2e = _end_to_end(model, timer, inputs, {"dense": dense_everywhere, "converted": lambda i, c: None,
                                             "no_attention": no_attention})
    tokens = max(model.config.tokens(i, resolution) for i in range(model.config.depth))
    return {"resolution": resolution, "tokens": tokens, "dense_flops": flops.dense_total,
            "converted_flops": flops.total, **_e2e_summary(e2e)}


def pays_off_from(rows: list[dict]) -> int | None:
    """The lowest resolution from which the converted model is faster at every larger swept resolution."""
    best = None
    for row in sorted(rows, key=lambda r: r["resolution"], reverse=True):
        if not row["speedup"] or row["speedup"] <= 1.0:
            break
        best = row["resolution"]
    return best


def profile_model(model: JiT, *, device: torch.device, dtype: torch.dtype, batch_size: int = 1,
                  resolution: int | None = None, counter: str = "torch", sweep: Iterable[int] = (),
                  timer: Timer | None = None, seed: int = 0, label: str = "model",
                  progress: Callable[[str], None] | None = None) -> dict:
    """Profile `model` (converted as it is) on `device`; see the module docstring for what is returned."""
    say = progress or (lambda message: None)
    check_profile_options(batch_size=batch_size, counter=counter)
    resolution = resolution or model.config.input_size
    check_resolution(model, resolution)
    sweep = sorted(set(sweep))
    for r in sweep:
        check_resolution(model, r, parameter="sweep")
    timer = timer or Timer(device)
    kernels = kernel_status(device)
    model = model.to(device=device, dtype=dtype).eval()
    config: JiTConfig = model.config
    converted = sla2_layers(model)
    probe = torch.empty(1, 1, 1, config.head_dim, device=device, dtype=dtype)

    say("counting FLOPs")
    flops = model_flops(model, batch_size=batch_size, resolution=resolution, counter=counter, device=device,
                        dtype=dtype)
    inputs = _inputs(model, batch_size, resolution, device, dtype, seed)
    say("timing end to end")
    timer.warm_up(_no_grad(lambda: model(*inputs)))
    e2e = _end_to_end(model, timer, inputs, {"dense": dense_everywhere, "converted": lambda i, c: None,
                                             "no_attention": no_attention})
    say("timing every layer")
    timings = _layer_timings(model, timer, inputs, resolution, probe)

    rows = []
    for i in range(config.depth):
        tokens = config.tokens(i, resolution)
        t = timings[i]
        dense_t, rest_t = t["attention"]["dense"], t["rest"]
        row = {"layer": i, "tokens": tokens, "heads": config.num_heads, "head_dim": config.head_dim,
               "mode": "dense", "backend": None, "path": None, "qat_fallback": None, "kept_blocks": None,
               "key_blocks": None,
               "dense_attention_flops": flops.dense_attention[i], "sla2_attention_flops": None,
               "executed_attention_flops": flops.attention[i], "rest_of_block_flops": flops.rest_of_block[i],
               "dense_attention_ms": dense_t["ms"], "dense_attention_iqr_ms": dense_t["iqr_ms"],
               "sla2_attention_ms": None, "sla2_attention_iqr_ms": None, "attention_speedup": None,
               "inconclusive": None, "rest_of_block_ms": rest_t["ms"], "rest_of_block_iqr_ms": rest_t["iqr_ms"],
               "attention_share": dense_t["ms"] / (dense_t["ms"] + rest_t["ms"]),
               "dense_attention_graph_ms": dense_t.get("graph_ms"), "sla2_attention_graph_ms": None,
               "attention_speedup_graph": None, "inconclusive_graph": None,
               "rest_of_block_graph_ms": rest_t.get("graph_ms"),
               "timed_as": t["timed_as"], "recommendation": None, "reason": None, "reasons": [], "reason_codes": []}
        core = converted.get(i)
        if core is not None:
            c = core.config
            n_k = num_blocks(tokens, c.block_k)
            sla2_t = t["attention"]["sla2"]
            row.update({"mode": "sla2", "backend": core.resolve_backend(probe).name, "path": core.path(probe),
                        "qat_fallback": core.qat_fallback(probe), "topk": c.topk,
                        "block_q": c.block_q, "block_k": c.block_k, "kept_blocks": keep_count(c.topk, n_k),
                        "key_blocks": n_k, "sla2_attention_flops": flops.attention[i],
                        "sla2_attention_ms": sla2_t["ms"], "sla2_attention_iqr_ms": sla2_t["iqr_ms"],
                        "attention_speedup": dense_t["ms"] / sla2_t["ms"], "inconclusive": overlap(dense_t, sla2_t),
                        "sla2_attention_graph_ms": sla2_t.get("graph_ms")})
            if sla2_t.get("graph_ms") and dense_t.get("graph_ms"):
                row["attention_speedup_graph"] = dense_t["graph_ms"] / sla2_t["graph_ms"]
                row["inconclusive_graph"] = overlap(dense_t, sla2_t, "graph_ms")
            row.update(layer_advice(row, t["attention"], device))
        rows.append(row)

    keep = [r["layer"] for r in rows if r["recommendation"] == "sla2"]
    if keep and keep != sorted(converted):
        say("timing the recommended conversion")
        e2e.update(_end_to_end(model, timer, inputs, {"recommended": only_layers(keep)}))
    advice = recommendation(rows, e2e)
    e2e["recommended"] = advice.pop("measured")
    end_to_end = _e2e_summary(e2e)

    sweep_rows = []
    for r in sweep:
        if r == resolution:
            sweep_rows.append({"resolution": r, "tokens": max(config.tokens(i, r) for i in range(config.depth)),
                               "dense_flops": flops.dense_total, "converted_flops": flops.total,
                               **{k: v for k, v in end_to_end.items() if not k.startswith("recommended")}})
            continue
        say(f"sweep: {r} px")
        sweep_rows.append(sweep_row(model, timer, resolution=r, batch_size=batch_size, counter=counter,
                                    device=device, dtype=dtype, seed=seed))

    totals = {
        "dense_model_flops": flops.dense_total, "converted_model_flops": flops.total,
        "dense_attention_flops": sum(flops.dense_attention), "executed_attention_flops": sum(flops.attention),
        "rest_of_blocks_flops": sum(flops.rest_of_block), "outside_blocks_flops": flops.outside_blocks,
        "dense_attention_ms": sum(r["dense_attention_ms"] for r in rows),
        "executed_attention_ms": sum(r["sla2_attention_ms"] or r["dense_attention_ms"] for r in rows),
        "rest_of_blocks_ms": sum(r["rest_of_block_ms"] for r in rows),
    }
    return {
        "model": label, "resolution": resolution, "batch_size": batch_size,
        "config": config.to_dict(), "converted_layers": sorted(converted),
        "environment": {**environment(device, dtype), "kernels": kernels,
                        "backends": sorted({r["backend"] for r in rows if r["backend"]})},
        "timing": timer.describe(), "counter": counter, "flop_convention": FLOP_CONVENTION,
        "per_layer": rows, "totals": totals, "end_to_end": end_to_end,
        "recommendation": advice,
        "sweep": sweep_rows, "pays_off_from": pays_off_from(sweep_rows) if sweep_rows else None,
    }
