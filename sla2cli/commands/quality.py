"""`sla2 quality`: a converted model against its dense source: v-loss, paired samples, per-layer error."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..errors import UsageError
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
    finite,
    load_model_warned,
    local_path,
    model_source,
    resolve_device,
    resolve_dtype,
)


def command(
    model_path: ModelArg,
    dense_path: Annotated[Optional[Path], typer.Option("--dense", help="The dense model to compare with (default: "
                                                       "MODEL with its SLA2 layers removed, its source after a "
                                                       "stage-1 finetune; after --full, name the original).",
                                                       parser=model_source)] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Image folder for the v-loss (as `sla2 finetune "
                                                 "--data`); default: samples of the dense model.",
                                                 parser=local_path)] = None,
    class_index: Annotated[Optional[int], typer.Option("--class-index", help="Class of every image of a flat "
                                                       "--data folder.")] = None,
    samples: Annotated[int, typer.Option("-n", "--samples", help="Paired samples (same noise and labels for "
                                         "both models); 0: none, the v-loss and per-layer error only.")] = 8,
    eval_samples: Annotated[int, typer.Option("--eval-samples", help="Noised images on which the v-loss and the "
                                              "per-layer error are measured (one batch).")] = 8,
    steps: Annotated[int, typer.Option(help="Heun steps of the paired samples.")] = 50,
    cfg: Annotated[float, typer.Option(help="Guidance scale of the paired samples (1.0: none).", parser=finite)] = 2.0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Paired samples drawn at a time.")] = 16,
    weights: WeightsOpt = "auto",
    in_context_start: InContextStartOpt = None,
    trust_checkpoint: TrustOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "fp32",
    seed: SeedOpt = 0,
    json_output: JsonOpt = False,
):
    """How far a converted model is from its dense source: v-loss ratio, PSNR/SSIM of paired samples, layer errors."""
    from ..metrics.quality import evaluation_images, quality_report

    out = Output(json_output)
    if class_index is not None and data is None:
        raise UsageError("--class-index labels the images of a --data folder; pass --data DIR too")
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    options = dict(weights=weights, in_context_start=in_context_start, trust_checkpoint=trust_checkpoint)
    model, info = load_model_warned(out, model_path, **options)
    dense = load_model_warned(out, dense_path, **options)[0] if dense_path is not None else None
    images = labels = described = None
    if data is not None:
        images, labels, described = evaluation_images(data, model.config, eval_samples, seed=seed,
                                                      class_index=class_index)
    with out.progress() as progress:
        task = progress.add_task("comparing", total=None)
        report = quality_report(model, dense, images=images, labels=labels, data=described,
                                eval_samples=eval_samples, samples=samples, steps=steps, cfg=cfg, seed=seed,
                                device=dev, dtype=dt, batch_size=batch_size, provenance=info.provenance,
                                progress=lambda message: progress.update(task, description=message))
    report["dense"]["path"] = str(dense_path) if dense_path is not None else None
    for warning in report["warnings"]:
        out.warn(warning)
    document = {"model": str(model_path), **report}
    out.emit(document, lambda console: _render(console, model_path, dense_path, report))


def _f(value, digits: int = 4, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def _render(console, model_path: Path, dense_path: Path | None, r: dict) -> None:
    s, v, p = r["settings"], r["v_loss"], r["paired"]
    reference = str(dense_path) if dense_path is not None else r["dense"]["description"]
    table = Table(title=f"{model_path.name} against {reference}", title_justify="left")
    for name in ("", "mean", "worst (index)"):
        table.add_column(name, justify="right")
    table.add_row(f"v-loss, dense → model ({s['eval_samples']} noised images)",
                  f"{_f(v['dense'])} → {_f(v['model'])}", "")
    table.add_row("v-loss ratio model / dense", _f(v["ratio"]), "")
    table.add_row("x-prediction rel. error vs dense", _f(v["output_relative_error"]), "")
    if p is not None:  # None: -n 0
        for key, name, digits, unit in (("psnr", "PSNR", 2, " dB"), ("ssim", "SSIM", 4, ""), ("mae", "MAE", 4, "")):
            worst = p[f"{key}_worst"]
            table.add_row(f"{name} of {p['pairs']} paired samples", _f(p[f"{key}_mean"], digits, unit),
                          "-" if worst is None else f"{worst:.{digits}f}{unit} ({p[f'{key}_worst_index']})")
        table.add_row("identical sample pairs", f"{p['identical']} of {p['pairs']}", "")
    console.print(table)
    if r["per_layer"]:
        layers = Table(title="SLA2 layers against dense attention (same noised inputs)", title_justify="left")
        for name in ("layer", "kept frac", "captured mass", "rel. sq. error", "rel. error"):
            layers.add_column(name, justify="right")
        for m in r["per_layer"]:
            layers.add_row(str(m["layer"]), _f(m["kept_fraction"], 3), _f(m["captured_mass"], 3),
                           _f(m["relative_squared_error"]), _f(m["relative_error"]))
        console.print(layers)
    d = r["data"]
    source = (f"{d['used']} images of {d.get('path')}" if d["source"] != "dense samples"
              else f"{d['used']} samples of the dense model ({d['sampling_steps']} Heun steps, random labels)")
    pairs = f"paired samples: {s['steps']} Heun steps, CFG {s['cfg']:g}" if p is not None else "no paired samples"
    console.print(f"v-loss on {source}; {pairs}, seed {s['seed']}, {s['dtype']} on {s['device']}", highlight=False)
    if dense_path is None:
        console.print(f"dense reference: {r['dense']['description']}, its dense source when only the router and α "
                      "were trained (stage 1); after a full finetune, pass --dense ORIGINAL", highlight=False)
