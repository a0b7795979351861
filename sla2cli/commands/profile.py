"""`sla2 profile`: per-layer FLOPs and latency, dense against SLA2, and the honest end-to-end picture."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UsageError
from ._common import (
    HUB_HELP,
    DeviceOpt,
    ForceOpt,
    InContextStartOpt,
    JsonOpt,
    Output,
    PresetOpt,
    SeedOpt,
    TrustOpt,
    WeightsOpt,
    finite,
    load_model_warned,
    local_path,
    model_source,
    resolve_device,
    resolve_dtype,
)


def _resolutions(text: str | None) -> list[int]:
    if text is None:
        return []
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--sweep-resolution takes pixel sizes separated by commas (e.g. 256,512,1024), "
                         f"got {text!r}") from None
    if not values:
        raise UsageError("--sweep-resolution needs at least one resolution, e.g. 256,512,1024")
    return values


def command(
    model_path: Annotated[Optional[Path], typer.Argument(
        help="Checkpoint (dense or converted): official JiT .pth, PixelGen .ckpt, state_dict or .safetensors. "
             f"Omit it and pass --arch to profile random weights. The file is {HUB_HELP}.",
        show_default=False, metavar="MODEL", parser=model_source)] = None,
    arch: Annotated[Optional[str], typer.Option(
        help="Profile an architecture with random weights: JiT-B/16, JiT-B/32, JiT-L/16, JiT-L/32, JiT-H/16, JiT-H/32, "
             "PixelGen-XL.")] = None,
    resolution: Annotated[Optional[int], typer.Option(help="Image size in pixels (default: the model's).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward.")] = 1,
    layers: Annotated[Optional[str], typer.Option(help="Layers to run as SLA2: 6-11, 0,2,5-7, all, none, last:6 "
                                                  "(default: as converted; all for a dense model).")] = None,
    topk: Annotated[Optional[float], typer.Option(help="Fraction of key blocks kept, in (0, 1] (default: as "
                                                  "converted; 0.15 for a dense model).", parser=finite)] = None,
    preset: PresetOpt = None,
    counter: Annotated[str, typer.Option(help="FLOP counter: torch (torch.utils.flop_counter) or fvcore.")] = "torch",
    sweep_resolution: Annotated[Optional[str], typer.Option(
        "--sweep-resolution", help="Also time end to end at these resolutions, e.g. 256,512,1024,2048.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write latency and attention share against resolution, and "
                                                 "the per-layer speedup, as a PNG (needs matplotlib, the 'plot' "
                                                 "extra).", parser=local_path)] = None,
    wide: Annotated[bool, typer.Option("--wide", help="Tables with every column (FLOPs, CUDA-graph times, the rest "
                                       "of the block); the default fits 120 columns. --json has everything.")] = False,
    bench_ms: Annotated[float, typer.Option("--bench-ms", help="Time spent per measurement in ms (CUDA: "
                                            "do_bench rep; CPU: minimum run time).", parser=finite)] = 100.0,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for timing (default: torch's, "
                                                   "usually one per core).")] = None,
    weights: WeightsOpt = "auto",
    in_context_start: InContextStartOpt = None,
    trust_checkpoint: TrustOpt = False,
    force: ForceOpt = False,
    device: DeviceOpt = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="fp32, bf16 or fp16 (default: bf16 on CUDA, "
                                                 "fp32 on CPU).")] = None,
    seed: SeedOpt = 0,
    json_output: JsonOpt = False,
):
    """Per-layer FLOPs and latency of dense vs SLA2 attention, end-to-end speedup, ceiling and advice."""
    from .. import plots
    from ..checkpoints import check_output
    from ..conversion import check_preset
    from ..profiling import Timer, check_profile_options, profile_model, random_model, render, select_layers

    out = Output(json_output)
    if (model_path is None) == (arch is None):
        raise UsageError("give either a MODEL file or --arch NAME (random weights), not both" if arch
                         else "missing MODEL: give a checkpoint file, or --arch NAME to profile random weights")
    check_profile_options(batch_size=batch_size, counter=counter)  # before any slow work
    check_preset(preset)
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    if bench_ms <= 0:
        raise UsageError(f"--bench-ms must be > 0, got {bench_ms}")
    sweep = _resolutions(sweep_resolution)
    if plot is not None:  # fail before any slow work
        plots.require_matplotlib()
        check_output(plot, force, (model_path,) if model_path is not None else ())
    dev = resolve_device(device)
    dt = resolve_dtype(dtype or ("bf16" if dev.type == "cuda" else "fp32"))

    if arch is not None:
        model = random_model(arch, resolution=resolution, device=dev, seed=seed)
        label = f"{arch} (random weights)"
    else:
        model, info = load_model_warned(out, model_path, weights=weights, in_context_start=in_context_start,
                                 trust_checkpoint=trust_checkpoint)
        label = f"{model_path.name} ({info.weights})"
    select_layers(model, layers, topk, preset)

    with out.progress() as progress:
        task = progress.add_task("profiling", total=None)
        report = profile_model(model, device=dev, dtype=dt, batch_size=batch_size, resolution=resolution,
                               counter=counter, sweep=sweep, seed=seed, label=label,
                               timer=Timer(dev, rep_ms=bench_ms, min_run_time=bench_ms / 1e3, threads=threads),
                               progress=lambda message: progress.update(task, description=message))
    if plot is not None:
        report["plot"] = str(render.write_plot(report, plot, force))

    def show(console):
        console.print(render.header(report), highlight=False)
        console.print(render.per_layer_table(report, wide))
        console.print(render.end_to_end_table(report))
        if report["sweep"]:
            console.print(render.sweep_table(report, wide))
        for line in render.verdict_lines(report):
            console.print(line, highlight=False)
        if report.get("plot"):
            console.print(f"plot written to {report['plot']}", highlight=False)

    out.emit(report, show)
