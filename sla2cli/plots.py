"""PNG figures of what the commands return (matplotlib, the 'plot' extra), each written atomically.

Every figure takes the plain records `--json` prints. matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ParameterError


def require_matplotlib():
    """matplotlib with its file-only backend, or an error naming the extra to install (checked before slow work)."""
    try:
        import matplotlib
    except ImportError:
        raise ParameterError("plot", None, "{name} needs matplotlib: pip install matplotlib (the 'plot' extra of "
                             "sla2cli), or drop {name}") from None
    matplotlib.use("Agg")
    return matplotlib


def figure(*grid, **options):
    """`matplotlib.pyplot.subplots(*grid, **options)`."""
    require_matplotlib()
    import matplotlib.pyplot as plt

    return plt.subplots(*grid, **options)


def save(fig, path: Path, force: bool = False) -> Path:
    """Write `fig` as a PNG (never over an existing file without `force`) and close it."""
    import matplotlib.pyplot as plt

    from .checkpoints.writing import atomic_write, check_output

    try:
        check_output(path, force)
        atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)
    return Path(path)


def finetune_curves(stages: list[tuple[str, dict, dict[int, list[float]]]], path: Path, force: bool = False) -> Path:
    """Per stage (name, `FinetuneResult.to_dict()`, {step: per-layer training error}): the training loss per
    step, and each layer's relative squared error against dense attention: its training curve (stage 1, the
    steps this process ran) and the held-out value before and after."""
    fig, axes = figure(len(stages), 2, figsize=(11, 3.6 * len(stages)), squeeze=False)
    for (name, record, curves), (loss_ax, error_ax) in zip(stages, axes):
        history = record["loss_history"]
        steps = list(range(1, len(history) + 1))
        loss_ax.plot(steps, history, lw=0.8, color="C0", alpha=0.5, label="loss per step")
        window = max(1, len(history) // 20)
        if window > 1:
            smooth = [sum(history[max(0, i - window + 1):i + 1]) / len(history[max(0, i - window + 1):i + 1])
                      for i in range(len(history))]
            loss_ax.plot(steps, smooth, color="C0", label=f"running mean of {window}")
        if record.get("resumed_from"):
            loss_ax.axvline(record["resumed_from"], color="grey", ls=":", label="resumed here")
        loss_ax.set(xlabel="step", ylabel="training loss", yscale="log", title=f"{name}: training loss")
        loss_ax.legend(fontsize=8)
        end = len(history)
        for i, row in enumerate(record["per_layer"]):
            color = f"C{i % 10}"
            if record["stage"] == "router" and curves:  # stage 1's loss parts are the layers' errors
                done = sorted(curves)
                error_ax.plot(done, [curves[s][i] for s in done], lw=0.8, color=color, alpha=0.6)
            error_ax.plot([0, end], [row["error_before"], row["error_after"]], "o--", color=color,
                          label=f"layer {row['layer']}")
        error_ax.set(xlabel="step", ylabel="relative squared error vs dense", yscale="log",
                     title=f"{name}: per-layer error (dots: held out; lines: training)")
        error_ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return save(fig, path, force)


def _heatmap(ax, values: list[list[float]], rows: list[str], columns: list[str], label: str, fig) -> None:
    image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xticks(range(len(columns)), columns)
    if len(rows) * len(columns) <= 400:
        for r, line in enumerate(values):
            for c, value in enumerate(line):
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if value > 0.6 else "white")
    fig.colorbar(image, ax=ax, label=label)


def alpha_heatmap(rows: list[dict], title: str, path: Path, force: bool = False) -> Path:
    """α per converted layer and head (`describe_layers` records): the weight of the sparse branch."""
    converted = [r for r in rows if r["converted"]]
    heads = max(len(r["alpha_per_head"]) for r in converted)
    fig, ax = figure(figsize=(max(5.0, 2.5 + 0.5 * heads), max(2.5, 1.2 + 0.4 * len(converted))))
    _heatmap(ax, [r["alpha_per_head"] for r in converted], [f"layer {r['layer']}" for r in converted],
             [str(h) for h in range(heads)], "α (sparse branch weight)", fig)
    ax.set(xlabel="head")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save(fig, path, force)


def concentration_heatmap(rows: list[dict], title: str, path: Path, force: bool = False) -> Path:
    """Softmax mass the top-k key blocks capture, per layer and topk (`attention_concentration` records)."""
    topks = list(rows[0]["captured_mass"])
    fig, ax = figure(figsize=(max(5.0, 2.5 + 0.9 * len(topks)), max(2.5, 1.2 + 0.4 * len(rows))))
    _heatmap(ax, [[r["captured_mass"][k] for k in topks] for r in rows], [f"layer {r['layer']}" for r in rows],
             [f"{float(k):g}" for k in topks], "captured softmax mass", fig)
    ax.set(xlabel="topk (fraction of key blocks kept)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save(fig, path, force)
