"""The profile report for a person: rich tables, a few lines of verdict, and the optional PNG plot.

Every function takes the plain dict `profile_model` returns (what `--json` prints) and prints nothing.
"""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.table import Table

from .. import plots
from .profile import REASONS, layer_spec


def _g(flops) -> str:
    return "-" if flops is None else f"{flops / 1e9:.2f}"


def _ms(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _x(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _pct(value) -> str:
    return "-" if value is None else f"{value:.0%}"


def header(report: dict) -> str:
    env, timing = report["environment"], report["timing"]
    how = timing["method"] + (f", {timing['threads']} threads" if "threads" in timing else "")
    tokens = sorted({r["tokens"] for r in report["per_layer"]})
    return (f"{report['model']} at {report['resolution']} px, batch {report['batch_size']}: "
            f"{' / '.join(map(str, tokens))} tokens per layer\n"
            f"device {env['device']}, {env['dtype']}, torch {env['torch']}, triton {env['triton'] or '-'}, "
            f"SLA2 backend(s) {', '.join(env['backends']) or '-'} (Triton kernels: {env['kernels']})\n"
            f"latency: {how}\n"
            f"FLOPs counted by {'torch.utils.flop_counter' if report['counter'] == 'torch' else 'fvcore'}: "
            f"{report['flop_convention']}")


def _spread(ms, iqr) -> str:
    """Median ± IQR (ms)."""
    return "-" if ms is None else f"{ms:.3f}±{iqr:.3f}"


def _speedup(value, inconclusive) -> str:
    return "-" if value is None else f"{value:.2f}x" + ("?" if inconclusive else "")


def _table(title: str) -> Table:
    """Compact tables (no vertical rules): at 120 columns no number is cut."""
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)


def _advice(row: dict, wide: bool) -> str:
    if row["recommendation"] is None:
        return "-"
    if row["recommendation"] == "sla2":
        return "SLA2"
    return ("keep dense: " if wide else "dense: ") + ", ".join(REASONS[code] for code in row["reason_codes"])


def per_layer_table(report: dict, wide: bool = False) -> Table:
    """Per layer: tokens, mode, kept blocks, dense and SLA2 attention latency (median ± IQR), speedup ("?":
    the timings overlap), attention share, advice; `wide` adds FLOPs, CUDA-graph times and the rest of the block."""
    rows = report["per_layer"]
    graphs = any(r["dense_attention_graph_ms"] is not None for r in rows)
    table = _table("Per layer (ms: median±IQR over repeats; ?: dense and SLA2 overlap, inconclusive)")
    columns = ["layer", "tokens", "mode", "kept"]
    columns += ["dense attn GFLOP", "SLA2 GFLOP (executed)"] if wide else []
    columns += ["dense attn ms", "SLA2 ms (all in)", "speedup"] if wide else ["dense ms", "SLA2 ms", "speedup"]
    if graphs:
        columns += ["dense ms (graph)", "SLA2 ms (graph)", "speedup (graph)"] if wide else ["graph speedup"]
    columns += ["rest of block GFLOP", "rest of block ms"] if wide else []
    columns += ["attn share" if wide else "share", "advice"]
    for name in columns:
        table.add_column(name, justify="left" if name == "advice" else "right", no_wrap=name != "advice")
    for r in rows:
        kept = f"{r['kept_blocks']}/{r['key_blocks']}" if r["mode"] == "sla2" else "-"
        mode = r["mode"] + (f"/{r['path']}" if r["path"] else "")
        cells = [str(r["layer"]), str(r["tokens"]), mode, kept]
        if wide:
            cells += [_g(r["dense_attention_flops"]), _g(r["sla2_attention_flops"])]
        cells += [_spread(r["dense_attention_ms"], r["dense_attention_iqr_ms"]),
                  _spread(r["sla2_attention_ms"], r["sla2_attention_iqr_ms"]),
                  _speedup(r["attention_speedup"], r["inconclusive"])]
        if graphs:
            graph_speedup = _speedup(r["attention_speedup_graph"], r["inconclusive_graph"])
            cells += [_ms(r["dense_attention_graph_ms"]), _ms(r["sla2_attention_graph_ms"]), graph_speedup] if wide \
                else [graph_speedup]
        if wide:
            cells += [_g(r["rest_of_block_flops"]), _spread(r["rest_of_block_ms"], r["rest_of_block_iqr_ms"])]
        cells += [_pct(r["attention_share"]), _advice(r, wide)]
        table.add_row(*cells)
    t = report["totals"]
    cells = ["total", "", "", ""]
    cells += [_g(t["dense_attention_flops"]), _g(t["executed_attention_flops"])] if wide else []
    cells += [_ms(t["dense_attention_ms"]), _ms(t["executed_attention_ms"]),
              _x(t["dense_attention_ms"] / t["executed_attention_ms"])]
    cells += ([""] * (3 if wide else 1)) if graphs else []
    cells += [_g(t["rest_of_blocks_flops"]), _ms(t["rest_of_blocks_ms"])] if wide else []
    share = t["dense_attention_ms"] / (t["dense_attention_ms"] + t["rest_of_blocks_ms"])
    cells += [_pct(share), ""]
    table.add_row(*cells, end_section=False, style="bold")
    return table


def recommended_flops(report: dict) -> int:
    """The dense model's FLOPs with SLA2 only in the recommended layers (from the counted per-layer numbers)."""
    saved = sum(r["dense_attention_flops"] - r["executed_attention_flops"]
                for r in report["per_layer"] if r["recommendation"] == "sla2")
    return report["totals"]["dense_model_flops"] - saved


def end_to_end_table(report: dict) -> Table:
    e = report["end_to_end"]
    t = report["totals"]
    graphs = e.get("graph_ms")
    table = _table("End to end (one forward; ms: median±IQR)")
    for name in ["model", "GFLOPs", "latency ms", "speedup vs dense"] + (["graph ms"] if graphs else []) + [
            "peak memory MiB"]:
        table.add_column(name, justify="left" if name == "model" else "right")
    converted = report["converted_layers"]
    rows = [("dense SDPA", "dense", t["dense_model_flops"], e["dense_ms"], e["dense_iqr_ms"], False),
            (f"as converted (layers {layer_spec(converted)})", "converted", t["converted_model_flops"],
             e["converted_ms"], e["converted_iqr_ms"], e["inconclusive"]),
            (f"recommended (layers {report['recommendation']['layers']})", "recommended", recommended_flops(report),
             e.get("recommended_ms"), e.get("recommended_iqr_ms"), e.get("recommended_inconclusive")),
            ("attention removed (ceiling)", "no_attention",
             t["dense_model_flops"] - t["dense_attention_flops"], e["no_attention_ms"], e["no_attention_iqr_ms"],
             False)]
    for label, key, flops, ms, iqr, inconclusive in rows:
        cells = [label, _g(flops), _spread(ms, iqr), _speedup(e["dense_ms"] / ms if ms else None, inconclusive)]
        if graphs:
            cells.append(_ms(graphs.get(key)))
        cells.append("-" if e["peak_memory_mib"].get(key) is None else f"{e['peak_memory_mib'][key]:.0f}")
        table.add_row(*cells)
    return table


def verdict_lines(report: dict) -> list[str]:
    e = report["end_to_end"]
    lines = [f"attention is {e['attention_share']:.0%} of the dense forward; Amdahl ceiling {e['ceiling']:.2f}x "
             f"(dense {e['dense_ms']:.2f} ms, attention removed {e['no_attention_ms']:.2f} ms)",
             f"as converted: {e['speedup']:.2f}x end to end{' (inconclusive)' if e['inconclusive'] else ''}; "
             f"recommendation: {report['recommendation']['summary']}"
             + (f" ({e['recommended_speedup']:.2f}x"
                f"{' as CUDA graphs' if e.get('recommended_compared_by') == 'graph_ms' else ''})"
                if e.get("recommended_speedup") else "")]
    by_reason: dict[str, list[int]] = {}
    for row in report["per_layer"]:
        for part in row["reasons"]:
            by_reason.setdefault(part, []).append(row["layer"])
    lines += [f"keep dense, layers {layer_spec(layers)}: {why}" for why, layers in by_reason.items()]
    unsure = [r["layer"] for r in report["per_layer"] if r["inconclusive"] or r["inconclusive_graph"]]
    if unsure or e["inconclusive"]:
        where = ([f"layers {layer_spec(unsure)}"] if unsure else []) + (["end to end"] if e["inconclusive"] else [])
        lines.append(f"inconclusive ({' and '.join(where)}): dense and SLA2 timings overlap (median ± IQR/2); "
                     "rerun with a larger --bench-ms on an idle machine")
    if report["sweep"]:
        r = report["pays_off_from"]
        lines.append(f"SLA2 pays off from {r} px on (faster than dense at every swept resolution from there)" if r
                     else "SLA2 as converted is not faster than dense at the largest swept resolution")
    return lines


def sweep_table(report: dict, wide: bool = False) -> Table:
    table = _table("Resolution sweep (model as converted; ms: median±IQR)")
    graphs = wide and any(r.get("graph_ms") for r in report["sweep"])
    columns = ["resolution", "tokens"] + (["dense GFLOP", "SLA2 GFLOP"] if wide else []) + [
        "dense ms", "SLA2 ms", "attention removed ms", "attention share", "speedup", "ceiling"]
    for name in columns + (["dense ms (graph)", "SLA2 ms (graph)", "speedup (graph)"] if graphs else []):
        table.add_column(name, justify="right")
    for r in report["sweep"]:
        cells = [str(r["resolution"]), str(r["tokens"])] + ([_g(r["dense_flops"]), _g(r["converted_flops"])]
                                                           if wide else [])
        cells += [_spread(r["dense_ms"], r["dense_iqr_ms"]), _spread(r["converted_ms"], r["converted_iqr_ms"]),
                  _spread(r["no_attention_ms"], r["no_attention_iqr_ms"]), _pct(r["attention_share"]),
                  _speedup(r["speedup"], r["inconclusive"]), _x(r["ceiling"])]
        if graphs:
            g = r.get("graph_ms") or {}
            d, c = g.get("dense"), g.get("converted")
            cells += [_ms(d), _ms(c), _x(d / c if d and c else None)]
        table.add_row(*cells)
    return table


def write_plot(report: dict, path: Path, force: bool = False) -> Path:
    """Latency and attention share against resolution, dense vs SLA2, and each converted layer's attention
    speedup (hatched where inconclusive), as a PNG."""
    fig, (left, middle, right) = plots.figure(1, 3, figsize=(15, 4))
    rows = report["sweep"] or [{"resolution": report["resolution"], **report["end_to_end"]}]
    res = [r["resolution"] for r in rows]
    left.plot(res, [r["dense_ms"] for r in rows], "o-", label="dense SDPA")
    left.plot(res, [r["converted_ms"] for r in rows], "s-", label="SLA2 (as converted)")
    left.plot(res, [r["no_attention_ms"] for r in rows], "^--", label="attention removed (ceiling)")
    left.set(xlabel="resolution (px)", ylabel="forward latency (ms)", yscale="log", title="End-to-end latency")
    left.legend()
    share = middle.plot(res, [100 * r["attention_share"] for r in rows], "o-", color="C0",
                        label="attention share of the dense forward (left axis)")
    middle.set(xlabel="resolution (px)", ylabel="attention share of the dense forward (%)", ylim=(0, 100),
               title="Attention share and SLA2 speedup")
    speed = middle.twinx()
    lines = share + speed.plot(res, [r["speedup"] for r in rows], "s-", color="C1", label="SLA2 speedup (as converted)")
    lines += speed.plot(res, [r["ceiling"] for r in rows], "^--", color="C2", label="ceiling (attention removed)")
    speed.axhline(1.0, color="grey", lw=0.8)
    speed.set(ylabel="speedup over dense (x)")
    speed.legend(lines, [line.get_label() for line in lines], loc="upper left", fontsize=8)
    for ax in (left, middle):
        ax.set_xticks(res)
        ax.set_xticklabels([str(r) for r in res])
    converted = [r for r in report["per_layer"] if r["attention_speedup"] is not None]
    if converted:
        bars = right.bar([str(r["layer"]) for r in converted], [r["attention_speedup"] for r in converted],
                         color=["C1" if r["recommendation"] == "sla2" else "C7" for r in converted])
        for bar, r in zip(bars, converted):
            if r["inconclusive"]:
                bar.set_hatch("//")
        right.axhline(1.0, color="grey", lw=0.8)
    else:
        right.text(0.5, 0.5, "no converted layer", ha="center", va="center", transform=right.transAxes)
    right.set(xlabel="layer", ylabel="dense / SLA2 attention latency (x)",
              title=f"Per-layer attention speedup at {report['resolution']} px\n(orange: SLA2 advised, grey: keep "
                    "dense; hatched: inconclusive)")
    env = report["environment"]
    fig.suptitle(f"{report['model']}, batch {report['batch_size']}, {env['device']}, {env['dtype']}", fontsize=9)
    fig.tight_layout()
    return plots.save(fig, path, force)
