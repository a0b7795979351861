"""The profile report for a person: rich tables, a few lines of verdict, and the optional PNG plot.

Every function takes the plain dict `profile_model` returns (what `--json` prints) and prints nothing.
"""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from ..checkpoints import check_output
from ..checkpoints.writing import atomic_write
from ..errors import ParameterError
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


def per_layer_table(report: dict) -> Table:
    rows = report["per_layer"]
    graphs = any(r["dense_attention_graph_ms"] is not None for r in rows)
    table = Table(title="Per layer (GFLOP: 2 FLOPs per multiply-add; ms: median)", title_justify="left")
    columns = ["layer", "tokens", "mode", "kept / total", "dense attn GFLOP", "SLA2 GFLOP (executed)",
               "dense attn ms", "SLA2 ms (all in)", "speedup"]
    if graphs:
        columns += ["dense ms (graph)", "SLA2 ms (graph)", "speedup (graph)"]
    columns += ["rest of block GFLOP", "rest of block ms", "attn share", "advice"]
    for name in columns:
        table.add_column(name, justify="left" if name == "advice" else "right", no_wrap=name == "advice")
    for r in rows:
        kept = f"{r['kept_blocks']}/{r['key_blocks']}" if r["mode"] == "sla2" else "-"
        cells = [str(r["layer"]), str(r["tokens"]), r["mode"] + (f" ({r['backend']})" if r["backend"] else ""), kept,
                 _g(r["dense_attention_flops"]), _g(r["sla2_attention_flops"]), _ms(r["dense_attention_ms"]),
                 _ms(r["sla2_attention_ms"]), _x(r["attention_speedup"])]
        if graphs:
            cells += [_ms(r["dense_attention_graph_ms"]), _ms(r["sla2_attention_graph_ms"]),
                      _x(r["attention_speedup_graph"])]
        advice = "-" if r["recommendation"] is None else (
            "SLA2" if r["recommendation"] == "sla2" else
            "keep dense: " + ", ".join(REASONS[code] for code in r["reason_codes"]))
        cells += [_g(r["rest_of_block_flops"]), _ms(r["rest_of_block_ms"]), _pct(r["attention_share"]), advice]
        table.add_row(*cells)
    t = report["totals"]
    cells = ["total", "", "", "", _g(t["dense_attention_flops"]), _g(t["executed_attention_flops"]),
             _ms(t["dense_attention_ms"]), _ms(t["executed_attention_ms"]),
             _x(t["dense_attention_ms"] / t["executed_attention_ms"])]
    if graphs:
        cells += ["", "", ""]
    share = t["dense_attention_ms"] / (t["dense_attention_ms"] + t["rest_of_blocks_ms"])
    cells += [_g(t["rest_of_blocks_flops"]), _ms(t["rest_of_blocks_ms"]), _pct(share), ""]
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
    table = Table(title="End to end (one forward)", title_justify="left")
    for name in ["model", "GFLOPs", "latency ms", "speedup vs dense"] + (["graph ms"] if graphs else []) + [
            "peak memory MiB"]:
        table.add_column(name, justify="left" if name == "model" else "right")
    converted = report["converted_layers"]
    rows = [("dense SDPA", "dense", t["dense_model_flops"], e["dense_ms"]),
            (f"as converted (layers {layer_spec(converted)})", "converted", t["converted_model_flops"],
             e["converted_ms"]),
            (f"recommended (layers {report['recommendation']['layers']})", "recommended", recommended_flops(report),
             e.get("recommended_ms")),
            ("attention removed (ceiling)", "no_attention",
             t["dense_model_flops"] - t["dense_attention_flops"], e["no_attention_ms"])]
    for label, key, flops, ms in rows:
        cells = [label, _g(flops), _ms(ms), _x(e["dense_ms"] / ms if ms else None)]
        if graphs:
            cells.append(_ms(graphs.get(key)))
        cells.append("-" if e["peak_memory_mib"].get(key) is None else f"{e['peak_memory_mib'][key]:.0f}")
        table.add_row(*cells)
    return table


def verdict_lines(report: dict) -> list[str]:
    e = report["end_to_end"]
    lines = [f"attention is {e['attention_share']:.0%} of the dense forward; Amdahl ceiling {e['ceiling']:.2f}x "
             f"(dense {e['dense_ms']:.2f} ms, attention removed {e['no_attention_ms']:.2f} ms)",
             f"as converted: {e['speedup']:.2f}x end to end; recommendation: {report['recommendation']['summary']}"
             + (f" ({e['recommended_speedup']:.2f}x)" if e.get("recommended_speedup") else "")]
    by_reason: dict[str, list[int]] = {}
    for row in report["per_layer"]:
        for part in row["reasons"]:
            by_reason.setdefault(part, []).append(row["layer"])
    lines += [f"keep dense, layers {layer_spec(layers)}: {why}" for why, layers in by_reason.items()]
    if report["sweep"]:
        r = report["pays_off_from"]
        lines.append(f"SLA2 pays off from {r} px on (faster than dense at every swept resolution from there)" if r
                     else "SLA2 as converted is not faster than dense at the largest swept resolution")
    return lines


def sweep_table(report: dict) -> Table:
    table = Table(title="Resolution sweep (model as converted)", title_justify="left")
    graphs = any(r.get("graph_ms") for r in report["sweep"])
    columns = ["resolution", "tokens", "dense GFLOP", "SLA2 GFLOP", "dense ms", "SLA2 ms", "attention removed ms",
               "attention share", "speedup", "ceiling"]
    for name in columns + (["dense ms (graph)", "SLA2 ms (graph)", "speedup (graph)"] if graphs else []):
        table.add_column(name, justify="right")
    for r in report["sweep"]:
        cells = [str(r["resolution"]), str(r["tokens"]), _g(r["dense_flops"]), _g(r["converted_flops"]),
                 _ms(r["dense_ms"]), _ms(r["converted_ms"]), _ms(r["no_attention_ms"]), _pct(r["attention_share"]),
                 _x(r["speedup"]), _x(r["ceiling"])]
        if graphs:
            g = r.get("graph_ms") or {}
            d, c = g.get("dense"), g.get("converted")
            cells += [_ms(d), _ms(c), _x(d / c if d and c else None)]
        table.add_row(*cells)
    return table


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise ParameterError("plot", None, "{name} needs matplotlib: pip install matplotlib (the 'plot' extra of "
                             "sla2cli), or drop {name}") from None
    matplotlib.use("Agg")
    return matplotlib


def write_plot(report: dict, path: Path, force: bool = False) -> Path:
    """Latency and attention share against resolution, dense vs SLA2, as a PNG (written atomically)."""
    require_matplotlib()
    import matplotlib.pyplot as plt

    check_output(path, force)
    rows = report["sweep"] or [{"resolution": report["resolution"], **report["end_to_end"]}]
    res = [r["resolution"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(res, [r["dense_ms"] for r in rows], "o-", label="dense SDPA")
    left.plot(res, [r["converted_ms"] for r in rows], "s-", label="SLA2 (as converted)")
    left.plot(res, [r["no_attention_ms"] for r in rows], "^--", label="attention removed (ceiling)")
    left.set(xlabel="resolution (px)", ylabel="forward latency (ms)", yscale="log", title="End-to-end latency")
    left.legend()
    right.plot(res, [100 * r["attention_share"] for r in rows], "o-", color="C0")
    right.set(xlabel="resolution (px)", ylabel="attention share of the dense forward (%)", ylim=(0, 100),
              title="Attention share and SLA2 speedup")
    speed = right.twinx()
    speed.plot(res, [r["speedup"] for r in rows], "s-", color="C1", label="SLA2 speedup (as converted)")
    speed.plot(res, [r["ceiling"] for r in rows], "^--", color="C2", label="ceiling (attention removed)")
    speed.axhline(1.0, color="grey", lw=0.8)
    speed.set(ylabel="speedup over dense (x)")
    speed.legend(loc="upper left")
    for ax in (left, right):
        ax.set_xticks(res)
        ax.set_xticklabels([str(r) for r in res])
    env = report["environment"]
    fig.suptitle(f"{report['model']}, batch {report['batch_size']}, {env['device']}, {env['dtype']}", fontsize=9)
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return Path(path)
