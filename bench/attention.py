"""Attention kernels on one GPU: dense cuDNN SDPA, dense flash SDPA, FlexAttention with SLA2's block mask
(sparse part only) and sla2cli's Triton SLA2 all in (router + sparse + linear + mix), forward and backward.

    python bench/attention.py                 # the issue's table (bf16, medians of do_bench)
    python bench/attention.py --variants      # also time the fused kernel at other warps / pipeline stages
    python bench/attention.py --sla DIR       # also time thu-ml/SLA all in, from a checkout at DIR
    python bench/attention.py --quick         # one small shape, to check the script
    python bench/attention.py --learned 16    # also: a rank-16 learned feature map + α per query vs the paper's
    python bench/attention.py --low-bit       # also: QAT's low-bit sparse branch (INT8 Q·Kᵀ, FP8 P·V) all in

Every SLA2 output is checked against the PyTorch reference on the same routing before it is timed (rel
err = ‖out − ref‖ / ‖ref‖), the router against the reference router (share of identical kept blocks), and
two runs against each other bit for bit. Ratios are against dense cuDNN in the same run.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sla2cli.kernels import function  # noqa: E402
from sla2cli.kernels.function import (  # noqa: E402
    _num_warps,
    linear_stats,
    quantise_kv,
    route_pooled,
    sla2_backward,
    sla2_forward,
    sla2_triton,
    unkept_sums,
)
from sla2cli.sla2.reference import sla2_reference  # noqa: E402
from sla2cli.sla2.routing import Routing, num_blocks, route  # noqa: E402

# (name, B, H, N, D, keep ratios, (block_q, block_k) settings)
SHAPES = [
    ("SLA paper", 1, 12, 32768, 128, (0.10, 0.05, 0.03), ((128, 128), (128, 64))),
    ("JiT-B/16 2048px", 1, 12, 16416, 64, (0.05, 0.03), ((128, 64), (128, 128))),
    ("JiT-B/16 1024px", 4, 12, 4128, 64, (0.05,), ((128, 64), (64, 64))),
    ("JiT-H/16 2048px", 1, 16, 16416, 80, (0.05,), ((128, 64),)),
    ("PixelGen-XL 2048px", 1, 16, 16416, 72, (0.05,), ((128, 64),)),
]
QUICK = [("quick", 1, 4, 4100, 80, (0.05,), ((64, 64),))]
QUICK_BACKWARD = [("quick", 1, 4, 4100, 80, 0.05, (64, 64))]
BACKWARD = [("SLA paper", 1, 12, 32768, 128, 0.05, (128, 64)), ("SLA paper", 1, 12, 32768, 128, 0.05, (128, 128)),
            ("JiT-B/16 2048px", 1, 12, 16416, 64, 0.05, (128, 64))]


def ms(fn, rep=200) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def jit_layout(B, H, N, D, dtype):
    """q, k, v as JiT makes them: permuted views of one B×N×3×H×D qkv tensor (no copy)."""
    qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=dtype)
    return [t.transpose(1, 2) for t in qkv.unbind(2)]


def flex_runner(q, k, v, indices, block_q, block_k):
    """FlexAttention restricted to SLA2's kept blocks (no linear branch, no router), compiled."""
    from torch.nn.attention.flex_attention import BlockMask

    B, H, n_q, kk = indices.shape
    n_k = num_blocks(q.shape[-2], block_k)
    kv_idx = torch.zeros(B, H, n_q, n_k, dtype=torch.int32, device=q.device)
    kv_idx[..., :kk] = indices.to(torch.int32)
    kv_num = torch.full((B, H, n_q), kk, dtype=torch.int32, device=q.device)
    mask = BlockMask.from_kv_blocks(kv_num, kv_idx, BLOCK_SIZE=(block_q, block_k),
                                    seq_lengths=(q.shape[-2], k.shape[-2]))
    options = {"BLOCK_M": block_q, "BLOCK_N": 64}
    return lambda: _flex()(q, k, v, block_mask=mask, kernel_options=options)


def _flex():
    """One compiled FlexAttention for the whole run (recompiles only when shapes change)."""
    from torch.nn.attention.flex_attention import flex_attention

    global _FLEX
    if _FLEX is None:
        torch._dynamo.config.recompile_limit = 64  # one compile per shape and block size
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


_FLEX = None


def router_agreement(q, k, keep, block_q, block_k, proj_q, proj_k, indices) -> float:
    """Share of the reference router's kept blocks that the Triton path keeps too."""
    ref = route(q, k, topk=keep, block_q=block_q, block_k=block_k, proj_q=proj_q, proj_k=proj_k).mask
    mine = torch.zeros_like(ref).scatter_(-1, indices, True)
    return ((ref & mine).sum() / ref.sum()).item()


def graph_ms(fn) -> float:
    """Median ms of one call replayed from a CUDA graph (no host launch work): what a captured sampler pays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return ms(graph.replay)


def sla_anchor(sla_dir: str | None, D: int, keep: float):
    """thu-ml/SLA's module (all in) from a checkout at `sla_dir`, or None; it is read, not depended on."""
    if not sla_dir:
        return None
    if sla_dir not in sys.path:
        sys.path.insert(0, sla_dir)
    from sparse_linear_attention import SparseLinearAttention

    return SparseLinearAttention(D, keep, BLKQ=64, BLKK=64).cuda()


def low_bit_columns(run, q, k, v, alpha, keep, block_q, block_k, full, out, stats, k_bar, routing) -> dict:
    """QAT's low-bit forward all in (and its quantisation of K, V alone), its error against the bf16 kernel's
    output (rel err, cosine) and against the fake-quant reference on the same routing; its parts and the
    fused kernel's launch settings as notes."""
    low = run(qat=True)
    ref = sla2_reference(q, k, v, topk=keep, alpha=alpha, block_q=block_q, block_k=block_k, routing=full, qat=True)
    cosine = F.cosine_similarity(low.float().flatten(), out.float().flatten(), 0).item()
    _, _, v_max = linear_stats(k, v, block_k, "softmax", v_max=True)
    prepared = quantise_kv(k, v, block_k, k_bar, v_max)
    notes = [f"quantise parts: stats with V's block maxima "
             f"{ms(lambda: linear_stats(k, v, block_k, 'softmax', v_max=True)):.3f} "
             f"(without {ms(lambda: linear_stats(k, v, block_k, 'softmax')):.3f}), "
             f"quantise from them {ms(lambda: quantise_kv(k, v, block_k, k_bar, v_max)):.3f}, "
             f"by torch passes over K and V {ms(lambda: quantise_kv(k, v, block_k)):.3f}"]
    for warps, stages in ((4, 2), (4, 3), (8, 2), (8, 3)):
        try:
            t = ms(lambda: sla2_forward(q, k, v, alpha, routing, stats, block_q=block_q, block_k=block_k,
                                        feature_map="softmax", low_bit=prepared, num_warps=warps, num_stages=stages))
            notes.append(f"low-bit fused warps {warps} stages {stages}: {t:.3f}")
        except triton.runtime.errors.OutOfResources:
            notes.append(f"low-bit fused warps {warps} stages {stages}: out of resources")
    return dict(low=ms(lambda: run(qat=True)), low_graph=graph_ms(lambda: run(qat=True)),
                quantise=ms(lambda: quantise_kv(k, v, block_k, k_bar, v_max)), low_err=rel_err(low, out),
                low_cos=cosine, low_ref_err=rel_err(low, ref), low_det=torch.equal(low, run(qat=True)), low_notes=notes)


def forward_rows(shapes, variants: bool, sla_dir: str | None, low_bit: bool = False):
    torch.manual_seed(0)
    rows = []
    for name, B, H, N, D, keeps, blocks in shapes:
        if name.startswith("JiT"):
            q, k, v = jit_layout(B, H, N, D, torch.bfloat16)
        else:
            q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        eye = torch.eye(D, device="cuda")
        proj_q, proj_k = eye + 0.05 * torch.randn_like(eye), eye + 0.05 * torch.randn_like(eye)
        alpha = torch.rand(H, device="cuda") * 0.5 + 0.5
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            t_cudnn = ms(lambda: F.scaled_dot_product_attention(q, k, v))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            t_flash = ms(lambda: F.scaled_dot_product_attention(q, k, v))
        print(f"{name} B={B} H={H} N={N} D={D} (q strides {q.stride()}): cuDNN {t_cudnn:.3f} ms, "
              f"flash {t_flash:.3f} ms", flush=True)
        for keep in keeps:
            try:
                sla = sla_anchor(sla_dir, D, keep)
                t_sla = ms(lambda: sla(q, k, v)) if sla is not None else float("nan")
            except Exception as exc:  # its kernels assert on head dims that are not powers of two
                print(f"  thu-ml/SLA failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                t_sla = float("nan")
            for block_q, block_k in blocks:
                run = partial(sla2_triton, q, k, v, topk=keep, alpha=alpha, block_q=block_q, block_k=block_k,
                              proj_q=proj_q, proj_k=proj_k)
                with torch.no_grad():
                    out = run()
                    stats, k_bar, _ = linear_stats(k, v, block_k, "softmax")
                    routing = route_pooled(q, k_bar, topk=keep, block_q=block_q, block_k=block_k, proj_q=proj_q,
                                           proj_k=proj_k)
                    indices = routing.indices
                    full = Routing(routing.mask.float(), indices.long(), routing.mask)
                    ref = sla2_reference(q, k, v, topk=keep, alpha=alpha, block_q=block_q, block_k=block_k,
                                         routing=full)
                    err = rel_err(out, ref)
                    same = torch.equal(out, run())
                    agree = router_agreement(q, k, keep, block_q, block_k, proj_q, proj_k, indices)
                    t_all = ms(run)
                    t_graph = graph_ms(run)
                    t_stats = ms(lambda: linear_stats(k, v, block_k, "softmax"))

                    def router():
                        return route_pooled(q, k_bar, topk=keep, block_q=block_q, block_k=block_k, proj_q=proj_q,
                                            proj_k=proj_k)

                    t_route, t_route_graph = ms(router), graph_ms(router)
                    t_unkept = ms(lambda: unkept_sums(stats, routing.mask))
                    t_main = ms(lambda: sla2_forward(q, k, v, alpha, routing, stats, block_q=block_q,
                                                     block_k=block_k, feature_map="softmax"))
                    t_sparse = ms(lambda: sla2_forward(q, k, v, alpha, routing, None, block_q=block_q,
                                                       block_k=block_k, feature_map="softmax"))
                    try:
                        t_flex = ms(flex_runner(q, k, v, indices, block_q, block_k))
                    except Exception as exc:  # flex's block-size / head-dim limits differ by version
                        print(f"  flex failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                        t_flex = float("nan")
                    notes = []
                    if variants and keep == 0.05:
                        for warps, stages in ((4, 2), (4, 3), (8, 2), (8, 3), (8, 4)):
                            def fused(with_linear=True):
                                return sla2_forward(q, k, v, alpha, routing, stats if with_linear else None,
                                                    block_q=block_q, block_k=block_k, feature_map="softmax",
                                                    num_warps=warps, num_stages=stages)
                            try:
                                o = fused()
                                t, t_s = ms(fused), ms(lambda: fused(False))
                            except triton.runtime.errors.OutOfResources:
                                notes.append(f"warps {warps} stages {stages}: out of resources")
                                continue
                            chosen = " (default warps)" if warps == _num_warps(block_q, D) else ""
                            notes.append(f"warps {warps} stages {stages}{chosen}: fused {t:.3f} (sparse part "
                                         f"{t_s:.3f}; err {rel_err(o, ref):.1e})")
                        kept_tiles = function.UNKEPT_TILES
                        for tiles in ((32, 128, 64), (64, 128, 64), (128, 128, 64), (64, 256, 32), (128, 64, 64)):
                            function.UNKEPT_TILES = tiles
                            t = ms(lambda: unkept_sums(stats, routing.mask))
                            notes.append(f"unkept sums tiles {tiles}: {t:.3f}")
                        function.UNKEPT_TILES = kept_tiles
                    low = (low_bit_columns(run, q, k, v, alpha, keep, block_q, block_k, full, out, stats, k_bar,
                                           routing) if low_bit else {})
                    notes += low.pop("low_notes", [])
                    ref = full = None
                kk = indices.shape[-1]
                n_k = num_blocks(N, block_k)
                row = dict(name=name, shape=f"{B}x{H}x{N}x{D}", keep=keep, blocks=f"{block_q},{block_k}",
                           kept=f"{kk}/{n_k}", cudnn=t_cudnn, flash=t_flash, flex=t_flex, sla=t_sla, sla2=t_all,
                           graph=t_graph, stats=t_stats, route=t_route, route_graph=t_route_graph, unkept=t_unkept,
                           main=t_main, sparse=t_sparse, err=err, agree=agree, det=same, **low)
                rows.append(row)
                print(f"  keep {keep:.2f} blocks ({block_q},{block_k}) kk {kk}/{n_k}: sla2 {t_all:.3f} ms "
                      f"({t_cudnn / t_all:.1f}x; graph {t_graph:.3f}) = stats {t_stats:.3f} + router {t_route:.3f} "
                      f"+ fused {t_main:.3f} (unkept sums {t_unkept:.3f}; sparse part alone {t_sparse:.3f}); "
                      f"flex {t_flex:.3f}; "
                      f"thu-ml/SLA {t_sla:.3f}; rel err {err:.2e}; router agreement {agree:.4f}; "
                      f"deterministic {same}" + ("".join(f"\n    {n}" for n in notes)), flush=True)
        q = k = v = None  # free the inputs before the next shape
        torch.cuda.empty_cache()
    return rows


def backward_variants(q, k, v, alpha, grad, keep, block_q, block_k) -> list[str]:
    """The backward kernels at other warps / pipeline stages, on one routing (forward saved once)."""
    with torch.no_grad():
        stats, k_bar, _ = linear_stats(k, v, block_k, "softmax")
        routing = route_pooled(q, k_bar, topk=keep, block_q=block_q, block_k=block_k, proj_q=None, proj_k=None)
        _, o_s, lse = sla2_forward(q, k, v, alpha, routing, stats, block_q=block_q, block_k=block_k,
                                   feature_map="softmax", save=True)
        notes = []
        for warps, stages in ((4, 1), (4, 2), (8, 1), (8, 2)):
            try:
                t = ms(lambda: sla2_backward(grad, q, k, v, alpha, routing, stats, o_s, lse, block_q=block_q,
                                             block_k=block_k, feature_map="softmax", num_warps=warps,
                                             num_stages=stages))
                notes.append(f"    warps {warps} stages {stages}: {t:.3f} ms")
            except triton.runtime.errors.OutOfResources:
                notes.append(f"    warps {warps} stages {stages}: out of resources")
    return notes


def backward_rows(shapes, variants: bool = False):
    torch.manual_seed(1)
    rows = []
    for name, B, H, N, D, keep, (block_q, block_k) in shapes:
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(3))
        alpha = (torch.rand(H, device="cuda") * 0.5 + 0.5).requires_grad_()
        grad = torch.randn_like(q)
        timings = {}
        for label, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q, k, v)
                timings[label] = ms(lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True))
        out = sla2_triton(q, k, v, topk=keep, alpha=alpha, block_q=block_q, block_k=block_k)
        timings["sla2"] = ms(lambda: torch.autograd.grad(out, (q, k, v, alpha), grad, retain_graph=True))
        mine = torch.autograd.grad(out, (q, k, v, alpha), grad)
        with torch.no_grad():
            _, k_bar, _ = linear_stats(k, v, block_k, "softmax")
            routing = route_pooled(q, k_bar, topk=keep, block_q=block_q, block_k=block_k, proj_q=None, proj_k=None)
        ref_out = sla2_reference(q, k, v, topk=keep, alpha=alpha, block_q=block_q, block_k=block_k,
                                 routing=Routing(routing.mask.float(), routing.indices.long(), routing.mask))
        ref = torch.autograd.grad(ref_out, (q, k, v, alpha), grad)
        errs = {f"d{n}": rel_err(a, b) for n, a, b in zip(("q", "k", "v", "alpha"), mine, ref)}
        ref_out = ref = mine = out = None
        notes = backward_variants(q, k, v, alpha, grad, keep, block_q, block_k) if variants else []
        rows.append(dict(name=name, shape=f"{B}x{H}x{N}x{D}", keep=keep, blocks=f"{block_q},{block_k}", errs=errs,
                         **timings))
        print(f"backward {name} keep {keep} blocks ({block_q},{block_k}): "
              + ", ".join(f"{key} {val:.3f} ms" for key, val in timings.items())
              + "; rel err " + ", ".join(f"{key} {val:.1e}" for key, val in errs.items())
              + "".join(f"\n{n}" for n in notes), flush=True)
        q = k = v = None  # free the inputs before the next shape
        torch.cuda.empty_cache()
    return rows


def learned_rows(shapes, rank):
    """The paper's form against our extensions (a learned rank-`rank` feature map and α per query) at each
    shape's first keep and block setting: forward and backward all in, each checked against the reference."""
    torch.manual_seed(2)
    rows = []
    for name, B, H, N, D, keeps, settings in shapes:
        keep, (block_q, block_k) = keeps[0], settings[0]
        q, k, v = (t.detach().requires_grad_() for t in jit_layout(B, H, N, D, torch.bfloat16))
        alpha = (torch.rand(H, device="cuda") * 0.5 + 0.25).requires_grad_()
        parts = {"feature_q": torch.randn(H, D, rank, device="cuda") / D ** 0.5,
                 "feature_k": torch.randn(H, D, rank, device="cuda") / D ** 0.5,
                 "mix_scale": torch.ones(H, device="cuda")}
        parts = {n: t.requires_grad_() for n, t in parts.items()}
        grad = torch.randn_like(q)
        row = dict(name=name, shape=f"{B}x{H}x{N}x{D}", keep=keep, blocks=f"{block_q},{block_k}", rank=rank)
        for label, extra in (("paper", {}), ("learned", parts)):
            call = partial(sla2_triton, q, k, v, topk=keep, alpha=alpha, block_q=block_q, block_k=block_k, **extra)
            with torch.no_grad():
                row[f"{label}_fwd"] = ms(call)
            inputs = (q, k, v, alpha, *extra.values())
            out = call()
            row[f"{label}_bwd"] = ms(lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True))
            mine = torch.autograd.grad(out, inputs, grad)
            routing = route(q, k, topk=keep, block_q=block_q, block_k=block_k)
            ref_out = sla2_reference(q, k, v, topk=keep, alpha=alpha, block_q=block_q, block_k=block_k,
                                     routing=routing, **extra)
            ref = torch.autograd.grad(ref_out, inputs, grad)
            row[f"{label}_err"] = max([rel_err(out, ref_out)] + [rel_err(a, b) for a, b in zip(mine, ref)])
            out = ref_out = mine = ref = None
        rows.append(row)
        print(f"learned rank {rank} {name}: forward {row['paper_fwd']:.3f} → {row['learned_fwd']:.3f} ms, backward "
              f"{row['paper_bwd']:.3f} → {row['learned_bwd']:.3f} ms; worst rel err {row['learned_err']:.1e}",
              flush=True)
        q = k = v = None
        torch.cuda.empty_cache()
    return rows


def print_tables(fwd, bwd):
    print(f"\n{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | bf16, "
          "median of do_bench (ms)\n")
    print("| shape BxHxNxD | keep | blocks | kept | cuDNN | flex (sparse only) | thu-ml/SLA | sla2 all in (graph) | "
          "= stats + router + fused (unkept sums; sparse part) | router share eager (graph) | flex x | SLA x | "
          "**sla2 x** (graph) | rel err | router agree | det |")
    print("| --- " * 16 + "|")
    for r in fwd:
        x = r["cudnn"]
        print(f"| {r['shape']} | {r['keep']:.0%} | {r['blocks']} | {r['kept']} | {x:.3f} | {r['flex']:.3f} | "
              f"{r['sla']:.3f} | {r['sla2']:.3f} ({r['graph']:.3f}) | "
              f"{r['stats']:.3f} + {r['route']:.3f} + {r['main']:.3f} ({r['unkept']:.3f}; {r['sparse']:.3f}) | "
              f"{r['route'] / r['sla2']:.0%} ({r['route_graph'] / r['graph']:.0%}) | {x / r['flex']:.1f}x | "
              f"{x / r['sla']:.1f}x | "
              f"**{x / r['sla2']:.1f}x** ({x / r['graph']:.1f}x) | {r['err']:.1e} | "
              f"{r['agree']:.3f} | {'yes' if r['det'] else 'NO'} |")
    if fwd and "low" in fwd[0]:
        print("\n| shape BxHxNxD | keep | blocks | cuDNN | sla2 bf16 all in | **low-bit all in** (graph) | of which "
              "quantise K, V | low-bit x bf16 | **low-bit x cuDNN** (graph) | rel err vs bf16 | cosine vs bf16 | "
              "rel err vs fake-quant ref | det |")
        print("| --- " * 13 + "|")
        for r in fwd:
            x = r["cudnn"]
            print(f"| {r['shape']} | {r['keep']:.0%} | {r['blocks']} | {x:.3f} | {r['sla2']:.3f} | "
                  f"{r['low']:.3f} ({r['low_graph']:.3f}) | {r['quantise']:.3f} | {r['sla2'] / r['low']:.2f}x | "
                  f"**{x / r['low']:.1f}x** ({x / r['low_graph']:.1f}x) | {r['low_err']:.1e} | {r['low_cos']:.5f} | "
                  f"{r['low_ref_err']:.1e} | {'yes' if r['low_det'] else 'NO'} |")
    if bwd:
        print("\n| backward BxHxNxD | keep | blocks | cuDNN | flash | sla2 | **sla2 x** | rel err dq, dk, dv, dα |")
        print("| --- " * 8 + "|")
        for r in bwd:
            errs = ", ".join(f"{val:.1e}" for val in r["errs"].values())
            print(f"| {r['shape']} | {r['keep']:.0%} | {r['blocks']} | {r['cudnn']:.3f} | {r['flash']:.3f} | "
                  f"{r['sla2']:.3f} | **{r['cudnn'] / r['sla2']:.1f}x** | {errs} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--variants", action="store_true")
    parser.add_argument("--sla", metavar="DIR", help="a thu-ml/SLA checkout (its sparse_linear_attention folder)")
    parser.add_argument("--shapes", default=None, help="comma-separated names of SHAPES rows to run (default all)")
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--backward-only", action="store_true")
    parser.add_argument("--low-bit", action="store_true", help="also time QAT's low-bit sparse branch")
    parser.add_argument("--learned", type=int, metavar="R", help="also time a learned rank-R feature map with α per "
                        "query against the paper's form")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/attention.py needs a CUDA GPU")
    shapes = QUICK if args.quick else [s for s in SHAPES if not args.shapes or s[0] in args.shapes.split(",")]
    fwd = [] if args.backward_only else forward_rows(shapes, args.variants, args.sla, args.low_bit)
    bwd = []
    if not args.no_backward:
        try:
            bwd = backward_rows(QUICK_BACKWARD if args.quick else BACKWARD, args.variants)
        except triton.runtime.errors.OutOfResources as exc:
            print(f"backward failed: {exc}", flush=True)
    print_tables(fwd, bwd)
    if args.learned:
        rows = learned_rows(shapes, args.learned)
        print("\n| shape | keep | blocks | rank | forward paper → learned (ms) | backward paper → learned (ms) | "
              "rel err (worst of out, grads) |")
        print("| --- " * 7 + "|")
        for r in rows:
            print(f"| {r['shape']} | {r['keep']:.0%} | {r['blocks']} | {r['rank']} | {r['paper_fwd']:.3f} → "
                  f"{r['learned_fwd']:.3f} | {r['paper_bwd']:.3f} → {r['learned_bwd']:.3f} | "
                  f"{r['paper_err']:.1e} / {r['learned_err']:.1e} |")


if __name__ == "__main__":
    main()
