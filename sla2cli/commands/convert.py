"""`sla2 convert`: turn chosen layers of a JiT checkpoint into SLA2, or back to dense (`--layers none`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import conversion
from ..checkpoints import WRITERS, check_output, load_model
from ..errors import UsageError
from ..report import layers_table
from ._common import (DeviceOpt, ForceOpt, InContextStartOpt, JsonOpt, ModelArg, Output, SeedOpt, TrustOpt,
                      WeightsOpt, resolve_device)


def command(
    src: ModelArg,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Where to write the result.")] = None,
    layers: Annotated[Optional[str], typer.Option(help="Layers to convert: 6-11, 0,2,5-7, all, none, last:6 "
                                                  "(default: all for a dense model, unchanged for a converted one).")] = None,
    topk: Annotated[Optional[float], typer.Option(help="Fraction of key blocks each query block keeps, in (0, 1].")] = None,
    block_q: Annotated[Optional[int], typer.Option("--block-q", help="Query block size (16, 32, 64, 128).")] = None,
    block_k: Annotated[Optional[int], typer.Option("--block-k", help="Key block size (16, 32, 64, 128).")] = None,
    feature_map: Annotated[Optional[str], typer.Option("--feature-map", help="Linear branch φ: softmax, elu, relu.")] = None,
    qat: Annotated[Optional[bool], typer.Option("--qat/--no-qat", help="Fake-quantise the sparse branch (INT8 QK, FP8 PV).")] = None,
    preset: Annotated[Optional[str], typer.Option(help="max-speed (topk 0.05, QAT), balanced (0.15, QAT), "
                                                  "quality (0.25, no QAT); explicit options override it.")] = None,
    alpha_mode: Annotated[Optional[str], typer.Option("--alpha-mode", help="per_head or per_head_query_block.")] = None,
    calibrate: Annotated[int, typer.Option(help="Initialise α from N noised samples of the model's own distribution.")] = 0,
    format: Annotated[str, typer.Option("--format", help="safetensors (ours), jit-pth (official JiT) or "
                                        "pixelgen-ckpt (PixelGen/Lightning).")] = "safetensors",
    weights: WeightsOpt = "auto",
    in_context_start: InContextStartOpt = None,
    trust_checkpoint: TrustOpt = False,
    force: ForceOpt = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be converted; write nothing.")] = False,
    device: DeviceOpt = None,
    seed: SeedOpt = 0,
    json_output: JsonOpt = False,
):
    """Convert layers of a JiT checkpoint to SLA2 attention (or back to dense with --layers none)."""
    out = Output(json_output)
    if output is None and not dry_run:
        raise UsageError("missing -o/--output (or pass --dry-run to only see the plan)")
    if format not in WRITERS:
        raise UsageError(f"unknown --format {format!r}; choose one of: {', '.join(WRITERS)}")
    if calibrate < 0:
        raise UsageError(f"--calibrate must be >= 0, got {calibrate}")
    if output is not None and not dry_run:
        check_output(output, force, (src,))  # fail before any slow work
    dev = resolve_device(device)
    model, info = load_model(src, weights=weights, in_context_start=in_context_start,
                             trust_checkpoint=trust_checkpoint)
    settings = conversion.sla2_settings(preset, info.sla2_config, topk=topk, block_q=block_q, block_k=block_k,
                                           feature_map=feature_map, qat=qat, alpha_mode=alpha_mode)
    with out.progress() as progress:
        progress.add_task(f"converting{' and calibrating' if calibrate else ''}", total=None)
        result = conversion.convert_model(model, info, layer_spec=layers, settings=settings,
                                          calibrate=calibrate, device=dev, seed=seed)
        if not dry_run:
            result.output = conversion.write_converted(model, src, output, info, format=format, force=force,
                                                       calibrate=calibrate)
    for warning in result.warnings:
        out.warn(warning)
    document = {
        "source": str(src), "weights": info.weights, "output": str(result.output) if result.output else None,
        "format": format, "dry_run": dry_run, "layers": result.layers, "sla2_config": settings.to_dict(),
        "calibrated_alpha": result.calibrated_alpha, "warnings": result.warnings, "per_layer": result.rows,
    }

    def render(console):
        console.print(layers_table(result.rows, f"{src.name} ({info.weights}) → SLA2 topk={settings.topk} "
                                   f"blocks=({settings.block_q},{settings.block_k}) φ={settings.feature_map} "
                                   f"QAT={'on' if settings.qat else 'off'}"))
        if result.calibrated_alpha:
            console.print(f"α calibrated on {calibrate} samples of the model's own distribution")
        console.print("dry run: nothing written" if dry_run else f"wrote {result.output} ({format})")

    out.emit(document, render)
