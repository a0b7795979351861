"""`sla2 demo`: the whole pipeline on a JiT shipped inside the package (`--model`), nothing downloaded."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Callable, NamedTuple

import typer
from rich.rule import Rule
from rich.table import Table

from ..report import layers_table
from ._common import DeviceOpt, JsonOpt, Output, SeedOpt, local_path, resolve_device


def _f(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _render_model(r: dict, console) -> None:
    c = r["config"]
    t = r["trained"]
    console.print(f"{Path(r['path']).name}: JiT {c['input_size']}x{c['input_size']} px, patch {c['patch_size']}, "
                  f"width {c['hidden_size']}, depth {c['depth']}, {c['num_heads']} heads of "
                  f"{c['hidden_size'] // c['num_heads']}, {c['num_classes']} classes ({', '.join(r['classes'])}); "
                  f"{r['parameters'] / 1e6:.1f} M parameters, {r['file_bytes'] / 2**20:.1f} MiB", highlight=False)
    console.print(f"trained {t['steps']} steps x {t['batch_size']} on {t['device']} ({t['train_seconds']} s) by "
                  f"scripts/train_demo_model.py; held-out v-loss {r['held_out_v_loss']:.4f} "
                  f"(an untrained model: about 0.86)", highlight=False)
    table = Table(title="stats: the dense model's layers, and how concentrated their attention is",
                  title_justify="left")
    for name in ("layer", "tokens", "heads", "head_dim", "key blocks of 64", "entropy / log N"):
        table.add_column(name, justify="right")
    for row in r["per_layer"]:
        table.add_row(str(row["layer"]), str(row["tokens"]), str(row["heads"]), str(row["head_dim"]),
                      str(row["key_blocks_64"]), f"{row['attention_entropy'] / row['log_n']:.2f}")
    console.print(table)
    console.print("entropy / log N is 1.0 for uniform attention; lower means each query looks at few keys, "
                  "which is what block sparsity exploits", style="dim")


def _render_plan(r: dict, console) -> None:
    console.print(f"candidates: layers {', '.join(map(str, r['candidates'])) or 'none'} ({r['rule']}); "
                  f"conversion: {r['conversion']} (topk {r['settings']['topk']}, QAT "
                  f"{'on' if r['settings']['qat'] else 'off'})",
                  highlight=False)


def _render_profile(r: dict, console) -> None:
    from ..profiling import render

    console.print(render.header(r), highlight=False)
    console.print(render.per_layer_table(r))
    console.print(render.end_to_end_table(r))
    for line in render.verdict_lines(r):
        console.print(line, highlight=False)


def _render_convert(r: dict, console) -> None:
    s = r["settings"]
    topk = "per layer" if r.get("budget") else s["topk"]
    title = (f"convert ({r['conversion']}) → SLA2 topk={topk} blocks=({s['block_q']},{s['block_k']}) "
             f"φ={s['feature_map']} QAT={'on' if s['qat'] else 'off'}")
    console.print(layers_table(r["per_layer"], title))
    for record in r.get("budget") or []:
        console.print(f"layer {record['layer']}: {record['why']}", highlight=False)
    alphas = ", ".join(f"{i}: {sum(a) / len(a):.2f}" for i, a in r["calibrated_alpha"].items())
    console.print(f"α calibrated on held-out textures (layer: mean over heads) {alphas}", highlight=False)
    console.print(f"wrote {r['output']}", highlight=False)


def _render_finetune(r: dict, console) -> None:
    data = r["data"]
    source = (f"images of {data['path']}" if data["source"] == "folder"
              else f"data-free: {data.get('samples')} teacher samples")
    table = Table(title=f"finetune ({r['stage']} stage on {source}; {r['steps_run']} steps)", title_justify="left")
    for name in ("layer", "kept / total", "rel. sq. error before", "after", "α mean", "drift W_q", "drift W_k"):
        table.add_column(name, justify="right")
    for row in r["per_layer"]:
        table.add_row(str(row["layer"]), f"{row['kept_blocks']}/{row['key_blocks']}", f"{row['error_before']:.4f}",
                      f"{row['error_after']:.4f}", f"{row['alpha_mean']:.3f}", f"{row['router_drift_q']:.4f}",
                      f"{row['router_drift_k']:.4f}")
    console.print(table)
    console.print(f"mean relative squared attention error {r['mean_error_before']:.4f} → "
                  f"{r['mean_error_after']:.4f} on its evaluation images; {_f(r['steps_per_second'], 2)} steps/s; "
                  f"wrote {r['output']}", highlight=False)


def _render_measure(r: dict, console) -> None:
    models = list(r)
    table = Table(title="stats --measure: converted layers against dense attention (held-out textures)",
                  title_justify="left")
    table.add_column("layer", justify="right")
    for name in models:
        for column in ("kept frac", "captured mass", "rel. error"):
            table.add_column(f"{column} ({name})", justify="right")
    layers = [m["layer"] for m in r[models[0]]["per_layer"]]
    by_model = {name: {m["layer"]: m for m in r[name]["per_layer"]} for name in models}
    for i in layers:
        cells = [str(i)]
        for name in models:
            m = by_model[name][i]
            cells += [f"{m['kept_fraction']:.3f}", f"{m['captured_mass']:.3f}", f"{m['relative_error']:.4f}"]
        table.add_row(*cells)
    console.print(table)
    for name in models:
        m = r[name]
        console.print(f"{name}: whole-model x-prediction error vs dense {m['model_relative_error']:.4f}; held-out "
                      f"v-loss {m['held_out_v_loss']:.4f} (dense {m['dense_held_out_v_loss']:.4f}, "
                      f"{m['held_out_v_loss'] / m['dense_held_out_v_loss']:.3f}x)", highlight=False)


def _render_samples(r: dict, console) -> None:
    table = Table(title=f"samples from the same seeds ({r['samples']} images, {r['steps']} Heun steps, no guidance)",
                  title_justify="left")
    for name in ("model", "PSNR vs dense (dB)", "worst PSNR", "SSIM vs dense", "MAE vs dense"):
        table.add_column(name, justify="right")
    for name, p in r["paired_vs_dense"].items():
        table.add_row(name, _f(p["psnr_mean"], 1), _f(p["psnr_worst"], 1), _f(p["ssim_mean"], 3),
                      _f(p["mae_mean"], 4))
    console.print(table)
    console.print(f"grid of dense vs SLA2 samples: {r['grid']}", highlight=False)


def _render_fid(r: dict, console) -> None:
    c = r.get("compare") or {}
    metric = r["features"]["metric"]
    kid = r["kid"]["mean"] if r.get("kid") else None
    console.print(f"{metric} of {Path(r['model']).name} against the reference textures: {r['fid']:.2f} (KID "
                  f"{_f(kid, 4)}; {r['samples']} samples; dense: {_f(c.get('fid_other'), 2)}; between them "
                  f"{_f(c.get('fid_between'), 2)}); PSNR vs dense {_f(c.get('psnr_mean'), 1)} dB", highlight=False)
    console.print(f"measured in the feature space of the texture network shipped with sla2cli ({r['features']['dim']} "
                  "features), offline: comparable with other texture runs only, not with Inception FIDs; few "
                  "samples make it a smoke test of the pipeline, not a quality number", style="dim")


def _render_speed(r: dict, console) -> None:
    compiled = all(m.get("compile_blocks") for m in r["models"].values())
    path = "CUDA graphs, blocks compiled" if compiled else "CUDA graphs" if r["cuda_graphs"] else "eager"
    table = Table(title=f"sampling speed, end to end ({r['batch']} images per batch, {r['steps']} Heun steps, CFG "
                        f"{r['cfg']}, {r['dtype']}, {path})", title_justify="left")
    for name in ("model", "images/s", "ms per batch (median)", "IQR ms"):
        table.add_column(name, justify="right")
    for name, m in r["models"].items():
        table.add_row(name, f"{m['images_per_second']:.2f}", f"{m['ms_per_batch']:.1f}", f"{m['iqr_ms']:.1f}")
    console.print(table)
    console.print(f"SLA2 (layers {', '.join(map(str, r['layers']))}) samples {r['speedup']:.2f}x as many images per "
                  "second as the dense model", highlight=False)
    for name, m in r["models"].items():
        if m.get("compile_error"):
            console.print(f"{name}: compiling the blocks failed ({m['compile_error']}); timed uncompiled",
                          highlight=False)


class Step(NamedTuple):
    key: str
    title: str
    function: str  # the `sla2cli.pipeline` step that runs it, imported only when the demo runs (it needs torch)
    render: Callable
    when: str | None = None  # the DemoPlan field that must be set for this step to run (None: always)

    def run(self, demo):
        from .. import pipeline

        return getattr(pipeline, self.function)(demo)


STEPS: list[Step] = [
    Step("model", "stats: the shipped model", "step_model", _render_model),
    Step("plan", "which layers could be converted", "step_plan_layers", _render_plan),
    Step("profile", "profile: is SLA2 faster, layer by layer?", "step_profile", _render_profile),
    Step("convert", "convert", "step_convert", _render_convert),
    Step("finetune", "finetune (stage 1, on training textures)", "step_finetune", _render_finetune),
    Step("stage2", "finetune stage 2 (every weight, the recipe's rate)", "step_stage2", _render_finetune,
         when="stage2_steps"),
    Step("measure", "stats --measure", "step_measure", _render_measure),
    Step("samples", "dense vs SLA2 samples", "step_samples", _render_samples),
    Step("fid", "eval-fid", "step_fid", _render_fid),
    Step("speed", "sampling speed, dense vs SLA2", "step_speed", _render_speed, when="speed_batch"),
]


def summary_table(r: dict, layers: list[int], timings: dict[str, float]) -> Table:
    """The last table: what was converted, the errors, speed, quality against dense, and where the time went."""
    table = Table(title="Summary", title_justify="left")
    table.add_column("what")
    table.add_column("result", justify="right")
    how = f" ({r['convert']['conversion']})" if "convert" in r else ""
    table.add_row(f"layers converted{how}", ", ".join(map(str, layers)) or "none")
    for name, m in r.get("measure", {}).items():
        errors = [x["relative_error"] for x in m["per_layer"]]
        if errors:
            table.add_row(f"attention error per layer, {name} (mean, max)",
                          f"{sum(errors) / len(errors):.4f}, {max(errors):.4f}")
            table.add_row(f"held-out v-loss, dense → {name}", f"{m['dense_held_out_v_loss']:.4f} → "
                                                              f"{m['held_out_v_loss']:.4f}")
    p = r.get("profile")
    if p:
        e = p["end_to_end"]
        speedups = [row["attention_speedup"] for row in p["per_layer"] if row.get("attention_speedup")]
        if speedups:
            table.add_row("attention speedup per layer (min, max)", f"{min(speedups):.2f}x, {max(speedups):.2f}x")
        table.add_row("end to end speedup, as converted / ceiling", f"{e['speedup']:.2f}x / {e['ceiling']:.2f}x")
    for name, paired in r.get("samples", {}).get("paired_vs_dense", {}).items():
        table.add_row(f"{name}: PSNR vs dense samples", f"{_f(paired['psnr_mean'], 1)} dB")
    fid = r.get("fid")
    if fid is not None:
        table.add_row(f"{fid['features']['metric']} vs reference textures", f"{fid['fid']:.2f}")
    speed = r.get("speed")
    if speed is not None:
        m = speed["models"]
        table.add_row(f"sampling images/s, dense → SLA2 (batch {speed['batch']}, {speed['steps']} steps, CFG)",
                      f"{m['dense']['images_per_second']:.2f} → {m['SLA2']['images_per_second']:.2f} "
                      f"({speed['speedup']:.2f}x)")
    for step, seconds in timings.items():
        table.add_row(f"time: {step}", f"{seconds:.1f} s")
    table.add_row("time: total", f"{sum(timings.values()):.1f} s")
    return table


def _rounded(timings: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in timings.items()}


def command(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the converted and finetuned models, the sample "
                                          "grid and sla2-demo.json (made if absent; reused only if an earlier demo "
                                          "made it).", parser=local_path)] = Path("sla2-demo"),
    model: Annotated[str, typer.Option("--model", help="The shipped model: demo (64x64 px, 1024 tokens; runs on a "
                                       "CPU) or showcase (128x128 px, 4096 tokens, where attention is most of the "
                                       "forward; needs a GPU, the demo model runs instead on a CPU).")] = "demo",
    fast: Annotated[bool, typer.Option("--fast", help="Fewer samples, steps and repetitions: the same pipeline "
                                       "in a fraction of the time, with noisier numbers (for tests).")] = False,
    device: DeviceOpt = None,
    seed: SeedOpt = 0,
    json_output: JsonOpt = False,
):
    """Run stats, profile, convert, finetune, stats --measure, eval-fid and (on a GPU) a sampling-speed
    comparison on a JiT shipped with sla2cli."""
    import torch

    from .. import pipeline as lib

    out = Output(json_output)
    dev = resolve_device(device)
    shipped, fallback = lib.demo_model(model, dev)
    if fallback:
        out.warn(fallback)
    lib.prepare_out(out_dir)
    demo = lib.Demo(out=out_dir, device=dev, plan=lib.plan_for(fast, dev, shipped), seed=seed, shipped=shipped)
    lib.load_backends(demo)
    steps = [step for step in STEPS if step.when is None or getattr(demo.plan, step.when)]
    timings: dict[str, float] = {}
    torch.manual_seed(seed)
    for number, step in enumerate(steps, 1):
        if not json_output:
            out.stdout.print(Rule(f"{number}/{len(steps)}  {step.title}", align="left"))
        start = time.perf_counter()
        with out.progress() as progress:
            progress.add_task(step.title, total=None)
            demo.results[step.key] = step.run(demo)
        timings[step.key] = time.perf_counter() - start
        lib.write_manifest(demo, _rounded(timings), complete=False)
        if json_output:
            out.log(f"{number}/{len(steps)}  {step.title}: {timings[step.key]:.1f} s")
        else:
            step.render(demo.results[step.key], out.stdout)
    seconds = _rounded(timings)
    manifest = lib.write_manifest(demo, seconds)
    document = {"out": str(out_dir), "device": str(dev), "model": shipped.name, "plan": demo.plan.to_dict(),
                "layers": demo.layers, "files": {**demo.files, "manifest": str(manifest)},
                "notices": ([fallback] if fallback else []) + demo.notices,
                "seconds": seconds, "results": demo.results}
    for notice in demo.notices:
        out.warn(notice)

    def render_summary(console):
        console.print(Rule("summary", align="left"))
        console.print(summary_table(demo.results, demo.layers, timings))
        console.print(f"everything is in {out_dir}/ (sla2-demo.json holds every number)", highlight=False)

    out.emit(document, render_summary)
