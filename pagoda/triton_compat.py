"""Fixes for Triton's CPU interpreter (TRITON_INTERPRET=1), applied on import.

Triton's interpreter stores bfloat16 as raw uint16 bits and its ``tl.dot`` multiplies
those bits as integers (Triton 3.6), so every bf16 matrix product is garbage on the CPU.
We convert bf16 operands to float32 before the product, which is what the hardware's
bf16 MMA computes (fp32 accumulation of exact bf16 products).
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


patch_interpreter()
