"""`sla2 stats`: what each layer of a (converted or dense) model holds, and optionally what it does."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UsageError
from ..report import concentration_table, finetune_summary, stats_table
from ._common import (
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    InContextStartOpt,
    JsonOpt,
    ModelArg,
    Output,
    SeedOpt,
    TrustOpt,
    WeightsOpt,
    finite,
    load_model_warned,
    local_path,
    resolve_device,
    resolve_dtype,
)


def command(
    model_path: ModelArg,
    measure: Annotated[bool, typer.Option("--measure", help="Run noised inputs and measure realised sparsity, "
                                          "captured softmax mass and error against dense attention.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples for --measure (and for a dense model's "
                                            "attention concentration).")] = 4,
    t: Annotated[Optional[float], typer.Option("--t", help="Noise level for --measure in [0, 1) (1 is clean); "
                                               "default: JiT's training distribution.", parser=finite)] = None,
    resolution: Annotated[Optional[int], typer.Option(help="Image size for --measure (default: the model's).")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Also draw a heatmap as a PNG: α per layer and head "
                                                 "(converted model), or the captured softmax mass per layer and "
                                                 "topk (dense model). Needs matplotlib.", parser=local_path)] = None,
    weights: WeightsOpt = "auto",
    in_context_start: InContextStartOpt = None,
    trust_checkpoint: TrustOpt = False,
    force: ForceOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "fp32",
    seed: SeedOpt = 0,
    json_output: JsonOpt = False,
):
    """Per-layer SLA2 statistics: settings, α per head, router drift, with --measure real behaviour; for a dense
    model, how concentrated each layer's attention is and which layers to convert."""
    from .. import plots
    from ..checkpoints import check_output
    from ..conversion import MIN_KEY_BLOCKS_TO_PAY_OFF, SLA2_PRESETS, SUGGEST_MIN_MASS, suggest_layers
    from ..profiling.profile import layer_spec
    from ..sla2.stats import attention_concentration, describe_layers, measure_layers, own_noised_batch

    out = Output(json_output)
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if t is not None and not 0.0 <= t < 1.0:
        raise UsageError(f"--t must be in [0, 1), got {t}")
    if plot is not None:  # before any slow work
        plots.require_matplotlib()
        check_output(plot, force, (model_path,))
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    model, info = load_model_warned(out, model_path, weights=weights, in_context_start=in_context_start,
                             trust_checkpoint=trust_checkpoint)
    if resolution is not None and (resolution <= 0 or resolution % model.config.patch_size):
        raise UsageError(f"--resolution must be a positive multiple of the patch size {model.config.patch_size}")
    rows = describe_layers(model, dev, dt)
    dense = not info.sla2_layers
    measured, concentration = {}, None
    if measure or dense:
        model.to(dev, dt)
        with out.progress() as progress:
            progress.add_task("sampling and measuring" if not dense else "sampling and measuring how concentrated "
                              "attention is", total=None)
            z, tt, y = own_noised_batch(model, batch_size, t=t, resolution=resolution, seed=seed, device=dev)
            if dense:
                concentration = attention_concentration(model, z, tt, y)
            else:
                measured = {m["layer"]: m for m in measure_layers(model, z, tt, y)}
    balanced_topk = SLA2_PRESETS["balanced"]["topk"]
    suggested = None if concentration is None else layer_spec(suggest_layers(concentration, balanced_topk))
    document = {"model": str(model_path), "weights": info.weights, "layout": info.layout,
                "config": info.config.to_dict(), "converted_layers": info.sla2_layers,
                "provenance": info.provenance, "per_layer": [{**r, **measured.get(r["layer"], {})} for r in rows]}
    if concentration is not None:
        document.update(concentration=concentration, suggested_layers=suggested)
    if plot is not None:
        title = f"{model_path.name}: " + ("captured softmax mass" if dense else "α per layer and head")
        (plots.concentration_heatmap(concentration, title, plot, force) if dense
         else plots.alpha_heatmap(rows, title, plot, force))
        document["plot"] = str(plot)

    def render(console):
        if dense:
            c = info.config
            console.print(f"{model_path.name}: dense model, no layer is converted ({c.depth} layers, {c.num_heads} "
                          f"heads of {c.head_dim})", highlight=False)
            console.print(concentration_table(concentration, batch_size))
            rule = (f"{MIN_KEY_BLOCKS_TO_PAY_OFF}+ key blocks, {SUGGEST_MIN_MASS:.0%}+ of the softmax mass in the "
                    f"kept blocks at topk {balanced_topk}")
            console.print(f"suggested: --layers {suggested} ({rule})" if suggested != "none" else
                          f"suggested: keep the model dense (no layer has {rule}; a higher resolution has more "
                          "key blocks)", highlight=False)
        else:
            console.print(stats_table(rows, measured or None))
        if info.provenance and not dense:
            p = info.provenance
            console.print(f"converted from {p.get('source')} ({p.get('weights')}, "
                          f"sha256 {str(p.get('source_sha256'))[:12]}…)")
            if "finetune" in p:
                console.print(finetune_summary(p["finetune"]))
        if plot is not None:
            console.print(f"plot written to {plot}", highlight=False)

    out.emit(document, render)
