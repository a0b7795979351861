"""Sampling speed as `sla2 eval-fid` runs it (`metrics.generate.generate_samples`: bf16 autocast, JiT's Heun
sampler with CFG), dense and SLA2, eager and replayed from CUDA graphs, against the forward's own time.

    python bench/sampling.py --resolution 2048 --batch-size 1 --steps 10

JiT-B/16 with random weights (`profiling.random_model`); SLA2 on every layer at `--topk`, 128-row query and
64-token key blocks, Triton kernels. "forward-predicted" images/s is what the forward's CUDA-graph time
allows (one batch-B and one batch-2B forward per guided step, as the sampler calls them, no host work);
"steady" is the rate from the first batch's end to the last's (what a long eval-fid run converges to:
without the first batch's graph captures and noise, and the last batch's PNG writing, which nothing
overlaps); it should come within a few percent of the prediction.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sla2cli.graphs import Graphed  # noqa: E402
from sla2cli.metrics.generate import generate_samples  # noqa: E402
from sla2cli.profiling.profile import random_model  # noqa: E402
from sla2cli.sampling import SamplerSettings, _jit_guided, jit_time_grid, sample_with  # noqa: E402
from sla2cli.sla2.attention import SLA2Config  # noqa: E402
from sla2cli.sla2.layers import apply_sla2  # noqa: E402


def forward_graph_ms(model, batch: int, resolution: int) -> float:
    z = torch.randn(batch, 3, resolution, resolution, device="cuda")
    t = torch.full((batch,), 0.5, device="cuda")
    y = torch.zeros(batch, dtype=torch.long, device="cuda")
    net = Graphed(model)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        net(z, t, y)
        graph, _, _ = net._graphs[next(iter(net._graphs))]
        return triton.testing.do_bench(graph.replay, warmup=50, rep=500, return_mode="median")


def guided_evaluations(settings: SamplerSettings) -> tuple[int, int]:
    """(guided, unguided) network evaluations of the JiT Heun sampler with these settings."""
    grid = jit_time_grid(settings.steps)
    times = [grid[j] for i in range(settings.steps - 1) for j in (i, i + 1)] + [grid[settings.steps - 1]]
    guided = sum(_jit_guided(t, settings.cfg_interval) for t in times) if settings.cfg != 1.0 else 0
    return guided, len(times) - guided


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--topk", type=float, default=0.05)
    parser.add_argument("--images", type=int, default=4)
    args = parser.parse_args()
    dense = random_model("JiT-B/16", resolution=args.resolution, device="cuda")
    sla2 = copy.deepcopy(dense)
    apply_sla2(sla2, list(range(len(sla2.blocks))), SLA2Config(topk=args.topk, block_q=128, block_k=64))
    settings = SamplerSettings(steps=args.steps, cfg=args.cfg)
    guided, plain = guided_evaluations(settings)
    rows = []
    noise = torch.randn(args.batch_size, 3, args.resolution, args.resolution, device="cuda")
    labels = torch.arange(args.batch_size, device="cuda")
    for name, model in (("dense", dense), ("SLA2", sla2)):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            same = torch.equal(sample_with(model, noise, labels, settings),
                               sample_with(Graphed(model), noise, labels, settings))
        print(f"{name}: samples from CUDA graphs identical to eager ones: {same}", flush=True)
        fwd = {b: forward_graph_ms(model, b, args.resolution) for b in (args.batch_size, 2 * args.batch_size)}
        predicted = args.batch_size / ((guided * fwd[2 * args.batch_size] + plain * fwd[args.batch_size]) / 1e3)
        for graphs in (False, True):
            with tempfile.TemporaryDirectory() as folder:
                generate_samples(model, Path(folder), args.batch_size, settings=settings, seed=1,
                                 batch_size=args.batch_size, device=torch.device("cuda"), dtype=torch.bfloat16,
                                 graphs=graphs)  # warm-up: compiles, captures
            marks = []  # (seconds, images sampled) at each batch the sampler reports

            def progress(task, done, total):
                marks.append((time.perf_counter(), done))

            with tempfile.TemporaryDirectory() as folder:
                torch.cuda.synchronize()
                start = time.perf_counter()
                generate_samples(model, Path(folder), args.images, settings=settings, seed=0,
                                 batch_size=args.batch_size, device=torch.device("cuda"), dtype=torch.bfloat16,
                                 graphs=graphs, progress=progress)
                torch.cuda.synchronize()
                seconds = time.perf_counter() - start
            (t1, n1), (t2, n2) = marks[1], marks[-1]  # after the first batch (captures, first noise) to the last
            rows.append((name, "graphs" if graphs else "eager", args.images / seconds, (n2 - n1) / (t2 - t1),
                         predicted, fwd[args.batch_size], fwd[2 * args.batch_size]))
            print(rows[-1], flush=True)
    print(f"\nJiT-B/16 {args.resolution} px, batch {args.batch_size}, {args.steps} Heun steps, CFG {args.cfg} "
          f"({guided} guided + {plain} plain evaluations per image batch), SLA2 topk {args.topk} all layers, bf16, "
          f"{torch.cuda.get_device_name()}\n")
    print("| model | sampler | images/s, whole run | images/s, steady | forward-predicted images/s | "
          "steady / predicted | fwd ms B (graph) | fwd ms 2B (graph) |")
    print("| --- " * 8 + "|")
    base = {mode: steady for name, mode, _, steady, *_ in rows if name == "dense"}
    for name, mode, ips, steady, pred, f1, f2 in rows:
        print(f"| {name} | {mode} | {ips:.3f} | {steady:.3f} ({steady / base[mode]:.2f}x dense) | {pred:.3f} | "
              f"{steady / pred:.1%} | {f1:.2f} | {f2:.2f} |")


if __name__ == "__main__":
    main()
