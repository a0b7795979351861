"""`sla2 finetune`: train the router and α of a converted model against its dense self (or, with
--full, every weight with JiT's v-loss), resumably, on one device or data-parallel under torchrun."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from ..errors import UsageError
from ._common import (
    HUB_HELP,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    InContextStartOpt,
    JsonOpt,
    Output,
    SeedOpt,
    Stop,
    TrustOpt,
    WeightsOpt,
    finite,
    invocation,
    load_model_warned,
    local_path,
    model_source,
    resolve_device,
)

if TYPE_CHECKING:
    from ..finetune import FinetuneResult, RecipeResult
    from ..finetune.state import Interrupted

ModelArg = Annotated[Path, typer.Argument(metavar="MODEL", show_default=False,
                                          help=f"A converted (SLA2) model, as `sla2 convert` writes it; {HUB_HELP}.",
                                          parser=model_source)]


def command(
    model_path: ModelArg,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Where to write the finetuned model "
                                                   "(its resumable state goes next to it as DST.resume.pt).",
                                                   parser=local_path)] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Image folder: one sub-folder per class (or a flat "
                                                 "folder with --class-index), resized and centre-cropped.",
                                                 parser=local_path)] = None,
    data_free: Annotated[bool, typer.Option("--data-free", help="Train on samples of the dense model itself "
                                            "(Heun, random labels) instead of --data.")] = False,
    class_index: Annotated[Optional[int], typer.Option("--class-index", help="Class of every image of a flat "
                                                       "--data folder.")] = None,
    workers: Annotated[int, typer.Option("--workers", help="Processes decoding --data images ahead of each step "
                                         "(0: the training process).")] = 4,
    data_free_samples: Annotated[int, typer.Option("--data-free-samples", help="Size of the pool of teacher "
                                                   "samples --data-free draws once and re-noises every step.")] = 64,
    data_free_steps: Annotated[Optional[int], typer.Option("--data-free-steps", help="Heun steps of the teacher's "
                                                           "sampling for --data-free (default 8).")] = None,
    data_free_cfg: Annotated[Optional[float], typer.Option("--data-free-cfg", help="Guidance scale of the "
                                                           "teacher's sampling for --data-free (default 1).",
                                                           parser=finite)] = None,
    data_free_states: Annotated[Optional[str], typer.Option("--data-free-states", help="noised (the teacher's "
                                                            "samples, noised by JiT's t distribution) or "
                                                            "trajectory (the inputs its sampler fed the network: "
                                                            "train where sampling happens; distillation only); "
                                                            "default noised.")] = None,
    t_distribution: Annotated[str, typer.Option("--t-distribution", help="Where the noised training states' t lie: "
                                                "jit (JiT's logit-normal), uniform (the sampler's evenly spaced "
                                                "steps), early (its first steps, where SLA2's error costs the "
                                                "samples most) or logit-normal:MEAN,STD. With --recipe: stage "
                                                "1's (stage 2 trains at JiT's t).")] = "jit",
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 200,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Global batch (split across torchrun "
                                            "processes).")] = 8,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate (default 0.005 for the router, α logits 10x; "
                                                "1e-05 with --full).", parser=finite)] = None,
    topk_schedule: Annotated[Optional[str], typer.Option("--topk-schedule", help="Anneal topk linearly from "
                                                         "START to END over the first half of the steps, given "
                                                         "as START:END (e.g. 0.5:0.1); END is the saved topk.")] = None,
    tau: Annotated[float, typer.Option(help="SoftTop-k temperature of the router's soft mask.", parser=finite)] = 0.1,
    full: Annotated[bool, typer.Option("--full", help="Stage 2: train every weight but the router with JiT's "
                                       "v-loss (router frozen, hard top-k).")] = False,
    e2e_weight: Annotated[float, typer.Option("--e2e-weight", help="Add this multiple of the output's relative "
                                              "squared error against the dense teacher.", parser=finite)] = 0.0,
    recipe: Annotated[bool, typer.Option("--recipe", help="The whole recipe: stage 1 for --router-steps, then "
                                         "stage 2 for --steps (JiT's v-loss at JiT's t on the same images, lr "
                                         "1.5e-4, warm-up, cosine, EMA 0.995); held-out v-loss against the dense "
                                         "source before and after.")] = False,
    router_steps: Annotated[int, typer.Option("--router-steps", help="Stage 1's steps in --recipe.")] = 200,
    keep_stage1: Annotated[bool, typer.Option("--keep-stage1", help="With --recipe: keep stage 1's model as "
                                              "DST.stage1.safetensors (weights untouched).")] = False,
    control: Annotated[bool, typer.Option("--control", help="With --recipe: also train a dense control (every "
                                          "block kept) by the same stage 2, written as DST.control.*.")] = False,
    objective: Annotated[Optional[str], typer.Option("--objective", help="The loss. Stage 1: layer (layer-local "
                                                     "error, the default) or distill (the model's velocity against "
                                                     "the dense teacher's). Stage 2 (--full; with --recipe, stage "
                                                     "2's): v (JiT's v-loss), distill, v+distill.")] = None,
    lr_schedule: Annotated[Optional[str], typer.Option("--schedule", help="Learning rate after warm-up: "
                                                       "constant or cosine.")] = None,
    warmup: Annotated[Optional[float], typer.Option("--warmup", help="Linear warm-up over this fraction "
                                                    "of the steps.", parser=finite)] = None,
    ema: Annotated[Optional[float], typer.Option("--ema", help="Save the exponential moving average of "
                                                 "the weights with this decay (0: off).", parser=finite)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from DST.resume.pt.")] = False,
    save_every: Annotated[int, typer.Option("--save-every", help="Write the resumable state every N steps "
                                            "(0: never).")] = 50,
    eval_samples: Annotated[int, typer.Option("--eval-samples", help="Noised samples on which the per-layer "
                                              "error is measured before and after.")] = 8,
    backend: Annotated[str, typer.Option("--backend", help="SLA2 implementation to train with: auto (Triton "
                                         "kernels on CUDA when available), torch, triton.")] = "auto",
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Also draw the loss and per-layer error curves "
                                                 "as a PNG (needs matplotlib, the 'plot' extra).",
                                                 parser=local_path)] = None,
    weights: WeightsOpt = "auto",
    in_context_start: InContextStartOpt = None,
    trust_checkpoint: TrustOpt = False,
    force: ForceOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "fp32",
    seed: SeedOpt = 0,
    json_output: JsonOpt = False,
):
    """Finetune a converted model's router and α against dense attention (or all weights with --full)."""
    from .. import plots
    from ..checkpoints import check_output
    from ..distributed import init_from_env, rank_device, shutdown
    from ..finetune import DataSpec, FinetuneConfig, StepInfo, TopkSchedule, run_finetune
    from ..finetune.config import RECIPE, RECIPE_ROUTER
    from ..finetune.recipe import recipe_outputs, run_recipe
    from ..finetune.state import Interrupted, state_path
    from ..sla2.backends import check_name

    out = Output(json_output)
    if output is None:
        raise UsageError("missing -o/--output: where to write the finetuned model")
    if data is None and not data_free:
        raise UsageError("choose the training images: --data DIR (an image folder) or --data-free (samples of "
                         "the dense model itself)")
    if data is not None and data_free:
        raise UsageError("--data and --data-free exclude each other; choose one")
    teacher = {"sampling_steps": data_free_steps, "cfg": data_free_cfg, "states": data_free_states}
    teacher = {k: v for k, v in teacher.items() if v is not None}
    if teacher and not data_free:
        raise UsageError("--data-free-steps, --data-free-cfg and --data-free-states set the teacher's sampling; "
                         "they need --data-free")
    check_name(backend)
    schedule = TopkSchedule.parse(topk_schedule) if topk_schedule is not None else None
    if control and not recipe:
        raise UsageError("--control trains a dense control beside --recipe; pass --recipe too")
    if keep_stage1 and not recipe:
        raise UsageError("--keep-stage1 keeps the first stage of --recipe; pass --recipe too")
    if recipe and full:
        raise UsageError("--recipe runs stage 1 and then stage 2 (--full) itself; drop --full")
    explicit = {"lr": lr, "objective": objective, "schedule": lr_schedule, "warmup": warmup, "ema": ema}
    stage2 = {**(RECIPE if recipe else {}), **{k: v for k, v in explicit.items() if v is not None}}
    common = dict(batch_size=batch_size, topk_schedule=schedule, tau=tau, e2e_weight=e2e_weight,
                  save_every=save_every, eval_samples=eval_samples, seed=seed, dtype=dtype)
    config = FinetuneConfig(steps=steps, full=full or recipe, **common, **stage2)
    router_config = FinetuneConfig(steps=router_steps, **common, **RECIPE_ROUTER) if recipe else None
    spec = DataSpec(folder=data, class_index=class_index, teacher_samples=data_free_samples, workers=workers,
                    t_distribution=t_distribution,
                    **teacher)
    written = recipe_outputs(output, control) if recipe else [output, state_path(output)]
    check_output(output, force, (model_path,), derived=written)  # fail before any slow work
    if plot is not None:
        plots.require_matplotlib()
        check_output(plot, force, (model_path, *written))
    dev = resolve_device(device)
    group = init_from_env(dev)
    try:
        dev = rank_device(dev, group)
        model, info = load_model_warned(out, model_path, weights=weights, in_context_start=in_context_start,
                                 trust_checkpoint=trust_checkpoint)

        def started(summary: dict) -> None:
            if not group.is_main:
                return
            source = (f"--data {data}" if data is not None else f"--data-free ({data_free_samples} teacher samples"
                      + (", their sampling trajectories)" if spec.kind == "trajectory" else ")"))
            resumed = f", resuming at step {summary['resume_step']}" if summary["resume_step"] is not None else ""
            out.log(f"finetune ({config.stage}): {len(summary['layers'])} SLA2 layers, {steps} steps of {batch_size} "
                    f"on {dev}{f' x{group.world_size} processes' if group.distributed else ''}, {source}{resumed}")

        every = max(1, steps // 10)
        curves: dict[str, dict[int, list[float]]] = {}  # stage -> step -> per-layer training error (stage 1)
        with out.progress() as progress:
            task = progress.add_task("finetuning", total=steps)

            def report(info_: StepInfo, stage: str = "finetuning") -> None:
                if not group.is_main:
                    return
                if info_.per_layer:
                    curves.setdefault(stage, {})[info_.step] = info_.per_layer
                progress.update(task, completed=info_.step,
                                description=f"{stage}: loss {info_.loss:.4f} topk {info_.topk:.3f}")
                if not out.stderr.is_terminal and (info_.step % every == 0 or info_.step == info_.steps):
                    out.log(f"{stage} step {info_.step}/{info_.steps}: loss {info_.loss:.5f}, topk "
                            f"{info_.topk:.3f}, {info_.seconds:.1f} s")

            try:
                if recipe:
                    result = run_recipe(model, info, source=model_path, dst=output, router=router_config, full=config,
                                        data=spec, device=dev, group=group, force=force, resume=resume,
                                        backend=backend, control=control, on_start=started, keep_stage1=keep_stage1,
                                        progress=lambda stage, info_: (progress.update(task, total=info_.steps),
                                                                       report(info_, stage)))
                else:
                    result = run_finetune(model, info, source=model_path, dst=output, config=config, data=spec,
                                          device=dev, group=group, force=force, resume=resume, backend=backend,
                                          progress=report, on_start=started)
            except Interrupted as stop:
                raise Stop(_resume_advice(stop) if group.is_main else None, 130) from None
    finally:
        shutdown(group)
    if not group.is_main:
        return
    stages = [("stage 1", result.router), ("stage 2", result.full)] if recipe else [(config.stage, result)]
    if plot is not None:
        plots.finetune_curves([(name, r.to_dict(), curves.get("finetuning" if not recipe else name, {}))
                               for name, r in stages if r is not None], plot, force)
    document = {"model": str(model_path), **({"recipe": True} if recipe else {}), **result.to_dict(),
                **({"plot": str(plot)} if plot is not None else {})}
    for warning in (result.full if recipe else result).warnings:
        out.warn(warning)

    def render(console):
        if recipe:
            _render_recipe(console, model_path, result)
        else:
            _render(console, model_path, result)
        if plot is not None:
            console.print(f"plot written to {plot}", highlight=False)

    out.emit(document, render)


def _resume_advice(stop: Interrupted) -> str:
    """What Ctrl-C leaves behind, and the command that continues from it (the same one, with --resume)."""
    args = invocation()
    again = shlex.join(["sla2", *args, *([] if "--resume" in args else ["--resume"])])
    if stop.saved is None:
        return (f"interrupted at step {stop.step} of {stop.steps}, before the first saved state (--save-every); "
                f"nothing to resume: run the command again to start over")
    return (f"interrupted at step {stop.step} of {stop.steps}; the state of step {stop.saved} is saved in "
            f"{stop.state_file}. Resume with:\n  {again}")


def _render_recipe(console, model_path: Path, result: RecipeResult) -> None:
    if result.router is not None:
        _render(console, model_path, result.router)
    else:
        console.print("stage 1: finished in an earlier run")
    _render(console, model_path, result.full)
    h = result.held_out
    line = (f"held-out v-loss against the dense source ({h['eval_samples']} samples): converted "
            f"{h['converted']['ratio']:.4f}x → stage 1 {h['stage1']['ratio']:.4f}x → finetuned "
            f"{h['finetuned']['ratio']:.4f}x")
    if "control" in h:
        line += (f"; dense control {h['control']['ratio']:.4f}x (finetuned / control "
                 f"{h['finetuned_vs_control']:.4f}x)")
    console.print(line)


def _render(console, model_path: Path, result: FinetuneResult) -> None:
    console.print(_table(result, f"{model_path.name} → {result.output.name}: {result.stage} finetune"))
    d = result.data
    source = (f"image folder {d['path']} ({d['images']} images, {d['classes']} classes)" if d["source"] == "folder"
              else f"{d['samples']} samples of the dense model ({d['sampling_steps']} Heun steps, CFG {d['cfg']:g}, "
                   f"random labels)")
    if d["source"] == "trajectory":
        source += f": the {d['states']} inputs their sampler fed the network"
    console.print(f"data: {source}")
    rate = f"{result.steps_per_second:.2f} steps/s" if result.steps_per_second else "no steps run"
    resumed = f" (resumed at step {result.resumed_from})" if result.resumed_from is not None else ""
    console.print(f"{result.steps_run} steps{resumed} in {result.seconds:.1f} s: {rate}, {result.world_size} "
                  f"process(es), {result.backend} backend")
    console.print(f"mean relative squared error against dense attention: {result.mean_error_before:.4f} → "
                  f"{result.mean_error_after:.4f} ({result.error_reduction:.2f}x lower)")
    console.print(f"wrote {result.output}")


def _table(result: FinetuneResult, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for name in ("layer", "tokens", "kept / total", "rel. sq. error before", "after", "x lower", "α mean [min, max]",
                 "drift W_q", "drift W_k"):
        table.add_column(name, justify="right")
    for r in result.per_layer:
        table.add_row(str(r["layer"]), str(r["tokens"]), f"{r['kept_blocks']}/{r['key_blocks']}",
                      f"{r['error_before']:.4f}", f"{r['error_after']:.4f}",
                      f"{r['error_before'] / max(r['error_after'], 1e-12):.2f}",
                      f"{r['alpha_mean']:.3f} [{r['alpha_min']:.3f}, {r['alpha_max']:.3f}]",
                      f"{r['router_drift_q']:.4f}", f"{r['router_drift_k']:.4f}")
    return table
