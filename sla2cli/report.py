"""Rich tables for what the commands return; each takes plain records (the same ones `--json` prints)."""

from __future__ import annotations

from rich.table import Table


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _kept(row: dict) -> str:
    return f"{row['kept_blocks']}/{row['key_blocks']}" if row.get("converted") and row.get("key_blocks") else "-"


def layers_table(rows: list[dict], title: str, why: dict[int, str] | None = None) -> Table:
    """Layer, tokens, heads, head_dim, converted, kept blocks per query block / total, nominal sparsity, and
    with `why` (a budgeted conversion) the reason each layer got its setting."""
    table = Table(title=title, title_justify="left")
    for name in ("layer", "tokens", "heads", "head_dim", "converted", "kept / total blocks", "nominal sparsity"):
        table.add_column(name, justify="right")
    if why is not None:
        table.add_column("why", justify="left")
    for r in rows:
        sparsity = f"{r['nominal_sparsity']:.0%}" if r.get("nominal_sparsity") is not None else "-"
        cells = [str(r["layer"]), _fmt(r["tokens"]), str(r["heads"]), str(r["head_dim"]), _fmt(r["converted"]),
                 _kept(r), sparsity]
        table.add_row(*cells, *([] if why is None else [why.get(r["layer"], "dense: not among the layers to convert")]))
    return table


def stats_table(rows: list[dict], measured: dict[int, dict] | None = None) -> Table:
    """Per-layer SLA2 settings, α summary, router drift and, when measured, realised behaviour. With α per
    query the settings hold its base value σ(bias); the α applied is measured."""
    table = Table(title="SLA2 layers", title_justify="left")
    columns = ["layer", "mode", "topk", "kept / total", "blocks q,k", "φ", "QAT", "α mean [min, max]",
               "drift W_q", "drift W_k"]
    if measured:
        columns += ["kept frac", "captured mass", "α applied", "rel. error vs dense"]
    for name in columns:
        table.add_column(name, justify="right")
    for r in rows:
        if not r["converted"]:
            cells = [str(r["layer"]), "dense"] + ["-"] * (len(columns) - 2)
        else:
            mode = "sla2" + (f"/{r['path']}" if r.get("path") else "")
            cells = [str(r["layer"]), mode, _fmt(r["topk"], 2), _kept(r), f"{r['block_q']},{r['block_k']}",
                     r["feature_map"] + (f"(x·W, rank {r['feature_rank']})" if r.get("feature_rank") else ""),
                     _fmt(r["qat"]),
                     ("base " if r["alpha_mode"] == "per_query" else "")
                     + f"{r['alpha_mean']:.3f} [{r['alpha_min']:.3f}, {r['alpha_max']:.3f}]",
                     _fmt(r["router_drift_q"], 4), _fmt(r["router_drift_k"], 4)]
            if measured:
                m = measured.get(r["layer"], {})
                cells += [_fmt(m.get("kept_fraction")), _fmt(m.get("captured_mass")), _fmt(m.get("alpha_applied")),
                          _fmt(m.get("relative_error"), 4)]
        table.add_row(*cells)
    return table


def concentration_table(rows: list[dict], samples: int) -> Table:
    """A dense model's attention per layer (`attention_concentration` records): entropy over log N and, at each
    topk, the softmax mass the kept key blocks capture against the most any router could, with the blocks kept."""
    topks = list(rows[0]["captured_mass"])
    table = Table(title=f"Attention concentration ({samples} noised samples of the model's own distribution; "
                        f"blocks of {rows[0]['block_k']} tokens; mass kept by the blocks / the most any router "
                        f"could keep with as many keys)", title_justify="left")
    for name in ["layer", "tokens", "key blocks", "entropy / log N"] + [f"mass @ topk {k:g}" for k in topks]:
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(str(r["layer"]), str(r["tokens"]), str(r["key_blocks"]), f"{r['entropy_ratio']:.2f}",
                      *[f"{r['captured_mass'][k]:.3f} / {r['mass_ceiling'][k]:.3f} ({r['kept_blocks'][k]}/"
                        f"{r['key_blocks']})" for k in topks])
    return table


def finetune_summary(record: dict) -> str:
    """One line for a finetune provenance record (the full record is in --json)."""
    errors = record.get("errors", {})
    before = [e["before"] for e in errors.values() if e.get("before") is not None]
    after = [e["after"] for e in errors.values() if e.get("after") is not None]
    change = (f", mean layer error {sum(before) / len(before):.4f} → {sum(after) / len(after):.4f}"
              if before and after else "")
    source = record.get("data", {}).get("source", "?") if isinstance(record.get("data"), dict) else "?"
    return (f"finetuned ({record.get('stage', '?')}): {record.get('steps', '?')} steps on {source} data, "
            f"batch {record.get('batch_size', '?')}, from {record.get('input', '?')}{change}")
