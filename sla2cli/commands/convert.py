"""`sla2 convert`: turn chosen layers of a JiT checkpoint into SLA2, or back to dense (`--layers none`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UsageError
from ..report import layers_table
from ._common import (
    DeviceOpt,
    ForceOpt,
    InContextStartOpt,
    JsonOpt,
    ModelArg,
    Output,
    PresetOpt,
    SeedOpt,
    TrustOpt,
    WeightsOpt,
    claim_outputs,
    finite,
    local_path,
    resolve_device,
)


def command(
    ctx: typer.Context,
    src: ModelArg,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Where to write the result.",
                                                   parser=local_path)] = None,
    layers: Annotated[Optional[str], typer.Option(
        help="Layers to convert: 6-11, 0,2,5-7, all, none, last:6 (default: all for a dense model, unchanged for "
             "a converted one).")] = None,
    topk: Annotated[Optional[float], typer.Option(
        help="Fraction of key blocks each query block keeps, in (0, 1].", parser=finite)] = None,
    block_q: Annotated[Optional[int], typer.Option("--block-q", help="Query block size (16, 32, 64, 128).")] = None,
    block_k: Annotated[Optional[int], typer.Option("--block-k", help="Key block size (16, 32, 64, 128).")] = None,
    feature_map: Annotated[Optional[str], typer.Option("--feature-map",
                                                       help="Linear branch φ: softmax, elu, relu.")] = None,
    qat: Annotated[Optional[bool], typer.Option("--qat/--no-qat",
                                                help="Fake-quantise the sparse branch (INT8 QK, FP8 PV).")] = None,
    preset: PresetOpt = None,
    max_error: Annotated[Optional[float], typer.Option(
        "--max-error", help="Give each layer the smallest topk whose layer-local relative squared error stays "
        "<= E (e.g. 0.02), or keep it dense; decides topk over --topk and --preset.", parser=finite)] = None,
    alpha_mode: Annotated[Optional[str], typer.Option(
        "--alpha-mode", help="per_head, per_head_query_block, or per_query (ours: each query's α from its sparse "
        "log-sum-exp against its linear branch's mass).")] = None,
    feature_rank: Annotated[Optional[int], typer.Option(
        "--feature-rank", help="Linear branch φ(x·W) with a learned D×R W per head (ours; 0: the paper's φ(x)); "
        "train it with `sla2 finetune` (stage 1).")] = None,
    calibrate: Annotated[int, typer.Option(help="Initialise α from N noised samples of the model's own distribution "
                                           "(with --max-error also measure on them; default 8 "
                                           "there).")] = 0,
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
    from .. import budget, conversion
    from ..checkpoints import check_output, load_model, writer
    from ..sla2.layers import sla2_layers
    from ..sla2.stats import own_noised_batch

    out = Output(json_output)
    if output is None and not dry_run:
        raise UsageError("missing -o/--output (or pass --dry-run to only see the plan)")
    writer(format)  # fail before any slow work
    if calibrate < 0:
        raise UsageError(f"--calibrate must be >= 0, got {calibrate}")
    if max_error is not None:
        budget.check_max_error(max_error)
    samples = calibrate or (budget.DEFAULT_SAMPLES if max_error is not None else 0)
    if output is not None and not dry_run:
        claim_outputs(ctx, [output], (src,))  # until the end: a second writer of the same file is refused
        check_output(output, force, (src,))  # fail before any slow work
    dev = resolve_device(device)
    model, info = load_model(src, weights=weights, in_context_start=in_context_start,
                             trust_checkpoint=trust_checkpoint)
    settings = conversion.sla2_settings(preset, info.sla2_config, topk=topk, block_q=block_q, block_k=block_k,
                                           feature_map=feature_map, qat=qat, alpha_mode=alpha_mode,
                                           feature_rank=feature_rank)
    with out.progress() as progress:
        task = "choosing each layer's topk" if max_error is not None else "converting"
        progress.add_task(f"{task}{' and calibrating' if samples else ''}", total=None)
        calibration = None
        if samples:
            model.to(dev)
            calibration = own_noised_batch(model, samples, seed=seed, device=dev)
        if max_error is None:  # without a new topk, converted layers keep theirs (a budgeted file's differ)
            own = None if topk is not None or preset is not None else {
                i: core.config.topk for i, core in sla2_layers(model).items()}
            result = conversion.convert_model(model, layer_spec=layers, settings=settings, calibration=calibration,
                                              topk_per_layer=own)
        else:
            result = budget.convert_within_budget(model, layer_spec=layers, settings=settings, max_error=max_error,
                                                  calibration=calibration)
        if not dry_run:
            details = {} if max_error is None else {"max_error": max_error}
            result.output = conversion.write_converted(model, src, output, info, format=format, force=force,
                                                       calibration_samples=samples, **details)
    if max_error is not None and (topk is not None or preset is not None):
        result.warnings.insert(0, f"--max-error {max_error:g} chooses each layer's topk; the topk of "
                                  f"{'--topk' if topk is not None else '--preset'} is not used")
    result.warnings[:0] = info.warnings  # what the file's numbers hold (NaN, integers) first
    for warning in result.warnings:
        out.warn(warning)
    document = {
        "source": str(src), "weights": info.weights, "output": str(result.output) if result.output else None,
        "format": format, "dry_run": dry_run, "layers": result.layers,
        "sla2_config": {**settings.to_dict(), **({} if max_error is None else {"topk": None})},
        "calibrated_alpha": result.calibrated_alpha, "warnings": result.warnings, "per_layer": result.rows,
        "budget": None if max_error is None else {"max_error": max_error, "samples": samples,
                                                   "layers": result.budget},
    }

    def render(console):
        topk_text = f"topk={settings.topk}" if max_error is None else f"error<={max_error:g}"
        why = {r["layer"]: r["why"] for r in result.budget} if max_error is not None else None
        console.print(layers_table(result.rows, f"{src.name} ({info.weights}) → SLA2 {topk_text} "
                                   f"blocks=({settings.block_q},{settings.block_k}) φ={settings.feature_map}"
                                   + (f"(x·W, rank {settings.feature_rank})" if settings.feature_rank else "")
                                   + f" α {settings.alpha_mode} QAT={'on' if settings.qat else 'off'}", why=why))
        if result.calibrated_alpha:
            console.print(f"α calibrated{' and errors measured' if max_error is not None else ''} on {samples} "
                          f"samples of the model's own distribution")
        console.print("dry run: nothing written" if dry_run else f"wrote {result.output} ({format})")

    out.emit(document, render)
