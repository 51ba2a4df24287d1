"""Gated activations of LLM MLPs (FlashInfer names): input [..., 2 * d] -> out [..., d],
out = act(input[..., :d]) * input[..., d:], computed in fp32."""
from __future__ import annotations


import torch
import triton

from ._dispatch import pdl_launch, rows_view, use_triton
from .kernels.activation import act_and_mul_kernel

_TORCH = {
    0: torch.nn.functional.silu,
    1: lambda a: torch.nn.functional.gelu(a),
    2: lambda a: torch.nn.functional.gelu(a, approximate="tanh"),
}


def _act_and_mul(input, out, act, enable_pdl=None):
    if not isinstance(input, torch.Tensor) or input.dim() < 1 or input.shape[-1] % 2:
        raise ValueError(f"input must be [..., 2 * d], got {getattr(input, 'shape', input)}")
    if not input.dtype.is_floating_point:
        raise ValueError(f"input must be a floating tensor, got {input.dtype}")
    d = input.shape[-1] // 2
    shape = (*input.shape[:-1], d)
    if out is None:
        out = torch.empty(shape, dtype=input.dtype, device=input.device)
    elif tuple(out.shape) != shape or out.dtype != input.dtype or out.device != input.device:
        raise ValueError(f"out must be {input.dtype} {shape}, got {out.dtype} {tuple(out.shape)}")
    if input.numel() == 0:
        return out
    if not use_triton(input):
        x = input.float()
        out.copy_((_TORCH[act](x[..., :d]) * x[..., d:]).to(out.dtype))
        return out
    x2, y2 = rows_view("input", input), rows_view("out", out)
    block = min(1024, max(16, triton.next_power_of_2(d)))
    act_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](x2, y2, d, x2.stride(0), y2.stride(0), ACT=act,
                                                             BLOCK=block, num_warps=4,
                                                             **pdl_launch(enable_pdl, input))
    return out


def silu_and_mul(input: torch.Tensor, out: torch.Tensor | None = None, enable_pdl: bool | None = None):
    """SwiGLU: silu(gate) * up. enable_pdl: a programmatic dependent launch on a Hopper GPU
    (ops/kernels/pdl.py; None: off)."""
    return _act_and_mul(input, out, 0, enable_pdl)


def gelu_and_mul(input: torch.Tensor, out: torch.Tensor | None = None, enable_pdl: bool | None = None):
    """GeGLU with the exact (erf) GELU."""
    return _act_and_mul(input, out, 1, enable_pdl)


def gelu_tanh_and_mul(input: torch.Tensor, out: torch.Tensor | None = None, enable_pdl: bool | None = None):
    """GeGLU with the tanh approximation of GELU."""
    return _act_and_mul(input, out, 2, enable_pdl)
