"""The fused SLA2 forward kernel compiled for Hopper (sm_90a) without a GPU: the instructions of its loop over kept
key blocks, by kind, with the registers, spills and shared memory each launch setting costs.

    python bench/sass.py                               # the benchmark's rows, bf16 and low bit
    python bench/sass.py --d 64 --blocks 128,64 --warps 4 --stages 3 --low-bit

Needs only triton (its bundled ptxas, cuobjdump and nvdisasm). The launch is specialised as a real one on the
benchmark's inputs is: unit strides as constants, pointers and strides divisible by 16 hinted as such; without
those hints Triton loads element by element and the counts mean nothing. Static counts, not time: an
instruction saved shows where the loop can get shorter, the GPU says whether it does.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# the kernel file alone (it imports only triton), so that any triton install can compile it, torch or not
_spec = importlib.util.spec_from_file_location(
    "sla2_triton", Path(__file__).resolve().parents[1] / "sla2cli" / "kernels" / "sla2_triton.py")
sla2_triton = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sla2_triton)
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
ROWS = [(128, (128, 128), 8, 3), (64, (128, 64), 4, 3)]
UNIT_STRIDES = {"sq_d", "sk_d", "sv_d", "so_d", "sa_h"}
STRIDES_BY_16 = {"sq_b", "sq_h", "sq_n", "sk_b", "sk_h", "sk_n", "sv_b", "sv_h", "sv_n", "so_b", "so_h", "so_n",
                 "N", "n_q", "n_k", "sw_h", "sw_d"}


def compile_forward(d: int, block_q: int, block_k: int, warps: int, stages: int, low_bit: bool):
    fn = sla2_triton._sla2_fwd_kernel
    names = fn.arg_names
    pointers = {n: "*bf16" for n in names if n.endswith("_ptr")}
    pointers.update(idx_ptr="*i32", alpha_ptr="*fp32", mix_ptr="*fp32", rest_ptr="*fp32")
    if low_bit:
        pointers.update(kq_ptr="*i8", kscale_ptr="*fp32", vq_ptr="*fp8e4nv", vscale_ptr="*fp32")
    const = dict(D=d, R=d, ROW_ALIGN=8, BLOCK_Q=block_q, BLOCK_K=block_k, D_PAD=d, R_PAD=d,
                 FEATURE=sla2_triton.FEATURE_IDS["softmax"], LEARNED=False, LINEAR=True, MIX=False, PREC="tf32",
                 SAVE=False, QUANT=low_bit, **{n: 1 for n in UNIT_STRIDES})
    signature = {n: "constexpr" if n in const else pointers.get(n, "fp32" if n == "qk_scale" else "i32")
                 for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n in pointers or n in STRIDES_BY_16}
    source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(n),): v for n, v in const.items()},
                       attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps,
                                                                           "num_stages": stages})


def sass_and_resources(kernel) -> tuple[str, str]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([BIN / "nvdisasm", "-c", "-g", f.name], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([BIN / "cuobjdump", "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    return sass, " ".join(re.findall(r"(?:REG|STACK|LOCAL):\d+", usage))


def loop_body(sass: str) -> list[str]:
    """The opcodes of the longest loop (the instructions between a label and the branch back to it; a branch
    inside the loop counts whole, taken or not)."""
    ops, labels, best = [], {}, []
    for line in sass.splitlines():
        label = re.match(r"\s*\.(L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(ops)
            continue
        op = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if not op:
            continue
        ops.append(op.group(1))
        target = re.search(r"BRA.*`\(\.(L_x_\d+)\)", line)
        if target and labels.get(target.group(1), len(ops)) < len(ops) - 1:
            body = ops[labels[target.group(1)]:]
            best = body if len(body) > len(best) else best
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, help="head dim (default: the benchmark's rows)")
    parser.add_argument("--blocks", default="128,128", help="BLOCK_Q,BLOCK_K")
    parser.add_argument("--warps", type=int, default=8)
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--low-bit", action="store_true", help="only the low-bit loop (default: both)")
    args = parser.parse_args()
    block_q, block_k = map(int, args.blocks.split(","))
    rows = ROWS if args.d is None else [(args.d, (block_q, block_k), args.warps, args.stages)]
    for d, (bq, bk), warps, stages in rows:
        for low_bit in ((True,) if args.low_bit else (False, True)):
            kernel = compile_forward(d, bq, bk, warps, stages, low_bit)
            sass, usage = sass_and_resources(kernel)
            body = collections.Counter(loop_body(sass))
            total = len(re.findall(r"/\*[0-9a-f]{4,}\*/\s+\S", sass))
            print(f"D {d}, blocks {bq},{bk}, {warps} warps, {stages} stages, {'low bit' if low_bit else 'bf16'}: "
                  f"loop {sum(body.values())} instructions per thread and kept block (kernel {total}); {usage}; "
                  f"shared {kernel.metadata.shared} B")
            print("  " + " ".join(f"{op}:{n}" for op, n in body.most_common(24)))


if __name__ == "__main__":
    main()
