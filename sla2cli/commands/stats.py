"""`sla2 stats`: what each layer of a (converted or dense) model holds, and optionally what it does."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..checkpoints import load_model
from ..errors import UsageError
from ..report import finetune_summary, stats_table
from ..sla2.stats import describe_layers, measure_layers, own_noised_batch
from ._common import (
    DeviceOpt,
    DtypeOpt,
    InContextStartOpt,
    JsonOpt,
    ModelArg,
    Output,
    SeedOpt,
    TrustOpt,
    WeightsOpt,
    resolve_device,
    resolve_dtype,
)


def command(
    model_path: ModelArg,
    measure: Annotated[bool, typer.Option("--measure", help="Run noised inputs and measure realised sparsity, "
                                          "captured softmax mass and error against dense attention.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples for --measure.")] = 4,
    t: Annotated[Optional[float], typer.Option("--t", help="Noise level for --measure in [0, 1) (1 is clean); "
                                               "default: JiT's training distribution.")] = None,
    resolution: Annotated[Optional[int], typer.Option(help="Image size for --measure (default: the model's).")] = None,
    weights: WeightsOpt = "auto",
    in_context_start: InContextStartOpt = None,
    trust_checkpoint: TrustOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "fp32",
    seed: SeedOpt = 0,
    json_output: JsonOpt = False,
):
    """Per-layer SLA2 statistics: settings, α per head, router drift, and with --measure real behaviour."""
    out = Output(json_output)
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if t is not None and not 0.0 <= t < 1.0:
        raise UsageError(f"--t must be in [0, 1), got {t}")
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    model, info = load_model(model_path, weights=weights, in_context_start=in_context_start,
                             trust_checkpoint=trust_checkpoint)
    if resolution is not None and (resolution <= 0 or resolution % model.config.patch_size):
        raise UsageError(f"--resolution must be a positive multiple of the patch size {model.config.patch_size}")
    rows = describe_layers(model)
    measured = {}
    if measure and info.sla2_layers:
        model.to(dev, dt)
        with out.progress() as progress:
            progress.add_task("sampling and measuring", total=None)
            z, tt, y = own_noised_batch(model, batch_size, t=t, resolution=resolution, seed=seed, device=dev)
            measured = {m["layer"]: m for m in measure_layers(model, z, tt, y)}
    document = {"model": str(model_path), "weights": info.weights, "layout": info.layout,
                "config": info.config.to_dict(), "converted_layers": info.sla2_layers,
                "provenance": info.provenance, "per_layer": [{**r, **measured.get(r["layer"], {})} for r in rows]}

    def render(console):
        if not info.sla2_layers:
            console.print(f"{model_path.name}: dense model, no layer is converted "
                          f"({info.config.depth} layers, {info.config.num_heads} heads of {info.config.head_dim})")
            return
        console.print(stats_table(rows, measured or None))
        if info.provenance:
            p = info.provenance
            console.print(f"converted from {p.get('source')} ({p.get('weights')}, "
                          f"sha256 {str(p.get('source_sha256'))[:12]}…)")
            if "finetune" in p:
                console.print(finetune_summary(p["finetune"]))

    out.emit(document, render)
