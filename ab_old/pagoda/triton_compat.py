"""Fixes for Triton's CPU interpreter (TRITON_INTERPRET=1), applied on import.

Triton's interpreter stores bfloat16 as raw uint16 bits and its ``tl.dot`` multiplies
those bits as integers (Triton 3.6), so every bf16 matrix product is garbage on the CPU.
We convert bf16 operands to float32 before the product, which is what the hardware's
bf16 MMA computes (fp32 accumulation of exact bf16 products). Its float -> fp8 rounding
is wrong too (see below).
"""
from __future__ import annotations

import os


def patch_interpreter() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_pagoda_bf16", False):
        return
    original = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            def f32(h):
                if h.dtype.scalar != tl.bfloat16:
                    return h.data.astype(np.float32)
                return interpreter._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)
            return interpreter.TensorHandle(np.matmul(f32(a), f32(b), dtype=d.data.dtype) + d.data,
                                            d.dtype.scalar)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    create_dot._pagoda_bf16 = True
    builder.create_dot = create_dot

    # Triton 3.6's interpreter rounds float -> fp8 without carrying into the exponent (127.9 -> 64
    # in e4m3) and rounds ties up; the GPU rounds to nearest even and saturates (cvt.rn.satfinite).
    # Convert through torch, which rounds to nearest even, after clamping to the finite range.
    import torch

    fp8 = {tl.float8e4nv: (torch.float8_e4m3fn, 448.0), tl.float8e5: (torch.float8_e5m2, 57344.0)}
    original_fp_to_fp = builder.create_fp_to_fp

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        dst = dst_type.scalar
        if dst in fp8 and src.dtype.scalar in (tl.float32, tl.float16, tl.bfloat16):
            if src.dtype.scalar == tl.bfloat16:
                x = interpreter._convert_float(src.data, tl.bfloat16, tl.float32, None).view(np.float32)
            else:
                x = src.data.astype(np.float32)
            torch_dtype, limit = fp8[dst]
            t = torch.from_numpy(np.ascontiguousarray(x)).clamp(-limit, limit)  # NaN stays NaN
            return interpreter.TensorHandle(t.to(torch_dtype).view(torch.uint8).numpy(), dst)
        return original_fp_to_fp(self, src, dst_type, rounding_mode)

    builder.create_fp_to_fp = create_fp_to_fp


patch_interpreter()
