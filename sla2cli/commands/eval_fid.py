"""`sla2 eval-fid`: sample with JiT's (or PixelGen's) sampler, FID/KID/IS through torch-fidelity, paired comparison."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..errors import UsageError
from ._common import (
    HUB_HELP,
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
    local_path,
    model_source,
    resolve_device,
    resolve_dtype,
)


def _interval(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        raise UsageError(f"--cfg-interval must be LOW,HIGH (e.g. 0.1,1.0), got {text!r}") from None
    return low, high


def command(
    model_path: ModelArg,
    num_samples: Annotated[int, typer.Option("--num-samples", "-n", help="Images to generate (at least 2).",
                                             show_default=False)],
    ref: Annotated[Optional[str], typer.Option("--ref", help="Reference: image folder, .npz with mu/sigma in the "
                                               "--features space, or a torch-fidelity input such as cifar10-train. "
                                               "Without it: samples, --compare-to and --grid only, no FID.",
                                               show_default=False)] = None,
    features: Annotated[str, typer.Option("--features", help="Feature space of FID and KID: inception "
                                          "(Inception-V3, FID as papers report it) or textures (the network shipped "
                                          "for the demo's textures, offline: a texture Fréchet distance).")
                        ] = "inception",
    grid: Annotated[Optional[Path], typer.Option("--grid", help="Write a PNG of the first 16 samples, with "
                                                 "--compare-to's below them, labelled by class.",
                                                 show_default=False, parser=local_path)] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Sample folder ({index:06d}.png; a re-run resumes). "
                                                    "Default: sla2-samples/<model>-<settings>, removed after "
                                                    "unless --keep-samples.", parser=local_path)] = None,
    steps: Annotated[int, typer.Option(help="Sampling steps.")] = 50,
    cfg: Annotated[Optional[float], typer.Option(help="Guidance scale (default per preset: JiT-B 3.0, L 2.4, H 2.2; "
                                                 "/32: 3.0, 2.5, 2.3; PixelGen-XL 2.25).", parser=finite)] = None,
    cfg_interval: Annotated[Optional[str], typer.Option("--cfg-interval", help="LOW,HIGH range of t with guidance "
                                                        "(default: jit 0.1,1.0; pixelgen 0.1,0.9).")] = None,
    sampler: Annotated[str, typer.Option(help="Sampler: jit, pixelgen.")] = "jit",
    time_shift: Annotated[Optional[float], typer.Option("--time-shift", help="PixelGen's time shift "
                                                        "(default 2.0).", parser=finite)] = None,
    dense_until: Annotated[float, typer.Option("--dense-until", help="Run the model's evaluations at t below this "
                                               "(0 = noise, 1 = image) with every SLA2 layer dense: the first, "
                                               "noisiest steps are where SLA2's error costs samples most.",
                                               parser=finite)] = 0.0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per batch, global: under torchrun each "
                                            "of K processes samples batch-size / K at a time.")] = 64,
    seed: SeedOpt = 0,
    inception_weights: Annotated[Optional[Path], typer.Option("--inception-weights", help="torch-fidelity's "
                                                              "weights-inception-2015-12-05-6726825d.pth (default: "
                                                              "torch-fidelity's cache).", parser=local_path)] = None,
    isc: Annotated[bool, typer.Option("--isc", help="Also compute the Inception Score.")] = False,
    compare_to: Annotated[Optional[Path], typer.Option("--compare-to", help="Another model, or a sample folder "
                                                       "from the same seed: adds PSNR/SSIM/MAE per image (and "
                                                       f"FID between the sets, with --ref); {HUB_HELP}.",
                                                       parser=model_source)] = None,
    keep_samples: Annotated[bool, typer.Option("--keep-samples", help="Keep the default sample folder.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --grid file.")] = False,
    sla2_backend: Annotated[str, typer.Option("--sla2-backend", help="SLA2 implementation for converted layers: "
                                              "auto (Triton kernels on CUDA when available), torch, triton.")] = "auto",
    compile_blocks: Annotated[bool, typer.Option("--compile", help="On CUDA, run the blocks' non-attention work "
                                                 "(norms, RoPE, adaLN, MLP) as torch.compile'd fused kernels inside "
                                                 "the CUDA graphs, attention as it is: up to 2.4x faster forwards on "
                                                 "small-width models; the first batch waits for the compile, and "
                                                 "samples differ from eager ones by float rounding.")] = False,
    weights: WeightsOpt = "auto",
    in_context_start: InContextStartOpt = None,
    trust_checkpoint: TrustOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "bf16",
    json_output: JsonOpt = False,
):
    """Generate samples, compute FID (and KID, IS) with torch-fidelity, and compare two models pair by pair."""
    from ..metrics import EvalRequest, evaluate

    out = Output(json_output)
    request = EvalRequest(
        model=model_path, num_samples=num_samples, ref=ref, features=features, grid=grid, force=force,
        download_progress=out.stderr.is_terminal and not json_output, out=out_dir, sampler=sampler, steps=steps,
        cfg=cfg, cfg_interval=_interval(cfg_interval), time_shift=time_shift, batch_size=batch_size, seed=seed,
        inception_weights=inception_weights, isc=isc, compare_to=compare_to, keep_samples=keep_samples,
        device=resolve_device(device), dtype=resolve_dtype(dtype), weights=weights,
        in_context_start=in_context_start, trust_checkpoint=trust_checkpoint, sla2_backend=sla2_backend,
        compile_blocks=compile_blocks, dense_until=dense_until)
    with out.progress() as bar:
        tasks: dict[str, int] = {}

        def progress(task: str, done: int, total: int) -> None:
            if task not in tasks:
                tasks[task] = bar.add_task(task, total=total or None)
            bar.update(tasks[task], completed=done, total=total or None)

        report = evaluate(request, progress)
    if report is None:  # another rank under torchrun: rank 0 reports
        return
    for warning in report["warnings"]:
        out.warn(warning)
    out.emit(report, lambda console: _render(console, report))


def _num(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _render(console, r: dict) -> None:
    table = Table(title=f"eval-fid: {Path(r['model']).name}", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    gen, ref, feats = r["generation"], r["reference"], r["features"]
    metric = feats["metric"] if feats else "FID"
    shift = f", time shift {r['time_shift']:g}" if r["time_shift"] is not None else ""
    layers = ",".join(map(str, r["converted_layers"])) or "none"
    rows = [
        ("model", f"{r['model']} ({r['preset'] or 'custom'}, {r['weights']}; SLA2 layers: {layers}"
                  + (f", {r['sla2_backend']} backend" if r["sla2_backend"] else "") + ")"),
        ("samples", f"{r['samples']} at {r['resolution']} px, seed {r['seed']}, {r['dtype']} on {r['device']}"
                    + (f" x{r['world_size']} ranks" if r["world_size"] > 1 else "")
                    + (", blocks compiled" if r["compile_blocks"] else "")),
        ("sampler", f"{r['sampler']}, {r['steps']} steps{shift}"
                    + (f"; dense attention for t < {r['dense_until']:g}" if r.get("dense_until") else "")),
        ("CFG", f"{r['cfg']:g} on t in {tuple(r['cfg_interval'])}"),
    ]
    if ref is None:
        rows += [(metric, note) for note in r["notes"]]
    else:
        rows.append((metric, _num(r["fid"], 4)))
        if r["kid"]:
            kid = r["kid"]
            spread = (f" ± {kid['std']:.5f} ({kid['subsets']} subsets of {kid['subset_size']})"
                      if kid["std"] is not None else f" (one estimate on both whole sets of {kid['subset_size']})")
            rows.append(("KID", f"{kid['mean']:.5f}{spread}"))
        if r["isc"]:
            rows.append(("IS", f"{r['isc']['mean']:.3f} ± {r['isc']['std']:.3f} ({r['isc']['splits']} splits)"))
        ref_detail = f"{ref['images']} images" if ref["kind"] != "npz" else "statistics file"
        rows += [("reference", f"{ref['source']} ({ref['kind']}, {ref_detail})"),
                 ("features", f"{feats['extractor']} ({feats['layer']}, {feats['dim']}), torch-fidelity "
                              f"{r['torch_fidelity']}")]
    rows += [
        ("samples folder", f"{r['out']} ({'kept' if r['kept_samples'] else 'removed'}; {gen['written']} new, "
                           f"{gen['reused']} reused)"),
        ("wall time", f"{r['wall_s']:.1f} s (sampling {gen['seconds']:.1f} s)"),
        ("images / s", _num(r["images_per_second"], 2)),
    ]
    if r["grid"]:
        rows.append(("grid", r["grid"]))
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    c = r["compare"]
    if c:
        cmp = Table(title=f"paired with {c['other']} ({c['kind']}), {c['pairs']} pairs", title_justify="left",
                    show_header=False)
        cmp.add_column(style="bold")
        cmp.add_column()
        if ref is not None:
            cmp.add_row(f"{metric} between the sets", _num(c["fid_between"], 4))
            cmp.add_row(f"{metric} of the other", _num(c["fid_other"], 4))
        for key, name, digits, unit in (("psnr", "PSNR", 2, " dB"), ("ssim", "SSIM", 4, ""), ("mae", "MAE", 4, "")):
            index = c[f"{key}_worst_index"]
            cmp.add_row(f"{name} mean / worst", f"{_num(c[f'{key}_mean'], digits)} / "
                        f"{_num(c[f'{key}_worst'], digits)}{unit}" + (f" (#{index})" if index is not None else ""))
        if c["identical"]:
            cmp.add_row("identical images", str(c["identical"]))
        if c["generation"] and c["generation"]["images_per_second"]:
            cmp.add_row("images / s (other)", _num(c["generation"]["images_per_second"], 2))
        console.print(cmp)
