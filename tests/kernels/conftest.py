"""Kernel tests run on the CPU through Triton's interpreter (TRITON_INTERPRET is set by the top-level conftest)."""

import numpy as np
import pytest

triton = pytest.importorskip("triton", reason="Triton is not installed: the Triton SLA2 backend cannot be tested")


def _patch_interpreter_bf16_dot():
    """Triton's interpreter multiplies bf16 operands as their raw uint16 bits (seen in 3.9); upcast first.

    The GPU compiler is unaffected; without this every bf16 `tl.dot` under TRITON_INTERPRET is garbage.
    """
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16:
            a = self.cast_impl(a, tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = self.cast_impl(b, tl.float32)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    probe = interpreter.TensorHandle(np.array([[16256]], dtype=np.uint16), tl.bfloat16)  # 1.0 in bf16
    acc = interpreter.TensorHandle(np.zeros((1, 1), dtype=np.float32), tl.float32)
    if original(interpreter.InterpreterBuilder(), probe, probe, acc, "ieee", 0).data[0, 0] != 1.0:
        interpreter.InterpreterBuilder.create_dot = create_dot


_patch_interpreter_bf16_dot()


def _patch_interpreter_fp8_cast():
    """Triton's interpreter casts fp32 to FP8 e4m3 without the carry into the exponent when rounding up
    (31.2 → 16, where the GPU's cvt.rn.satfinite and torch give 32); cast through torch instead.

    The GPU compiler is unaffected (`bench/attention.py --low-bit` checks its kernels against the reference).
    """
    import torch
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_fp_to_fp

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.float8e4nv:
            data = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.float8_e4m3fn).view(torch.uint8)
            return interpreter.TensorHandle(data.numpy(), dst_type.scalar)
        return original(self, src, dst_type, rounding_mode)

    probe = interpreter.TensorHandle(np.array([31.2], dtype=np.float32), tl.float32)
    back = original(interpreter.InterpreterBuilder(), probe, tl.float8e4nv, None)
    if torch.from_numpy(back.data.copy()).view(torch.float8_e4m3fn).float().item() != 32.0:
        interpreter.InterpreterBuilder.create_fp_to_fp = create_fp_to_fp


_patch_interpreter_fp8_cast()
