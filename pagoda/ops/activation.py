"""Gated activations of LLM MLPs (FlashInfer names): input [..., 2 * d] -> out [..., d],
out = act(input[..., :d]) * input[..., d:], computed in fp32."""
from __future__ import annotations


import torch
import triton

from ._dispatch import check_eps, pdl_launch, rows_view, use_triton
from .kernels.activation import act_and_mul_kernel, soft_cap_kernel

_TORCH = {
    0: torch.nn.functional.silu,
    1: lambda a: torch.nn.functional.gelu(a),
    2: lambda a: torch.nn.functional.gelu(a, approximate="tanh"),
}


NORM_MAX_HIDDEN = 16384  # the longest norm_input row a program reduces (in registers)


def _act_and_mul(input, out, act, enable_pdl=None, norm_input=None, norm_eps=1e-6):
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
    if norm_input is not None:
        if (not isinstance(norm_input, torch.Tensor) or norm_input.dim() < 1
                or tuple(norm_input.shape[:-1]) != tuple(input.shape[:-1]) or norm_input.device != input.device
                or not norm_input.dtype.is_floating_point or not 0 < norm_input.shape[-1] <= NORM_MAX_HIDDEN):
            raise ValueError(f"norm_input must be a floating [..., hidden] tensor (hidden 1..{NORM_MAX_HIDDEN}) "
                             f"with input's rows {tuple(input.shape[:-1])} on {input.device}, got "
                             f"{getattr(norm_input, 'dtype', type(norm_input))} "
                             f"{tuple(getattr(norm_input, 'shape', ()))}")
        check_eps("norm_eps", norm_eps)
    if input.numel() == 0:
        return out
    if not use_triton(input):
        x = input.float()
        if norm_input is not None:
            x = x * torch.rsqrt(norm_input.float().pow(2).mean(-1, keepdim=True) + norm_eps)
        out.copy_((_TORCH[act](x[..., :d]) * x[..., d:]).to(out.dtype))
        return out
    x2, y2 = rows_view("input", input), rows_view("out", out)
    n2 = rows_view("norm_input", norm_input) if norm_input is not None else x2
    block = min(1024, max(16, triton.next_power_of_2(d)))
    act_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](
        x2, y2, d, x2.stride(0), y2.stride(0), n2, n2.stride(0), n2.shape[-1], float(norm_eps), ACT=act,
        BLOCK=block, NORM_BLOCK=triton.next_power_of_2(n2.shape[-1]) if norm_input is not None else 0,
        num_warps=4, **pdl_launch(enable_pdl, input))
    return out


def silu_and_mul(input: torch.Tensor, out: torch.Tensor | None = None, enable_pdl: bool | None = None,
                 norm_input: torch.Tensor | None = None, norm_eps: float = 1e-6):
    """SwiGLU: silu(gate) * up. enable_pdl: a programmatic dependent launch on a Hopper GPU
    (ops/kernels/pdl.py; None: off). norm_input [..., hidden] (pagoda's, for an RMSNorm deferred past the
    gate / up projection): input is that projection of norm_input without the norm's factor (its weight folded
    into the projection), and each row of input is scaled by rsqrt(mean(norm_input[row]^2) + norm_eps) first,
    which is the same as projecting the normalized row (the projection is linear)."""
    return _act_and_mul(input, out, 0, enable_pdl, norm_input, norm_eps)


def gelu_and_mul(input: torch.Tensor, out: torch.Tensor | None = None, enable_pdl: bool | None = None,
                 norm_input: torch.Tensor | None = None, norm_eps: float = 1e-6):
    """GeGLU with the exact (erf) GELU (norm_input, norm_eps: as silu_and_mul's)."""
    return _act_and_mul(input, out, 1, enable_pdl, norm_input, norm_eps)


def gelu_tanh_and_mul(input: torch.Tensor, out: torch.Tensor | None = None, enable_pdl: bool | None = None,
                      norm_input: torch.Tensor | None = None, norm_eps: float = 1e-6):
    """GeGLU with the tanh approximation of GELU (norm_input, norm_eps: as silu_and_mul's)."""
    return _act_and_mul(input, out, 2, enable_pdl, norm_input, norm_eps)


def soft_cap(input: torch.Tensor, cap: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """cap * tanh(input / cap), computed and returned in float32 (pagoda's, for logits soft caps such as Gemma 2's
    final_logit_softcapping: one launch where ``torch.tanh(logits.float() / cap) * cap`` takes four, each over the
    whole [rows, vocab]). input: any floating dtype, contiguous; out: float32 of input's shape."""
    if not isinstance(input, torch.Tensor) or not input.dtype.is_floating_point:
        raise ValueError(f"input must be a floating tensor, got {getattr(input, 'dtype', type(input))}")
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0:
        raise ValueError(f"cap must be a float > 0, got {cap!r}")
    if out is None:
        out = torch.empty(input.shape, dtype=torch.float32, device=input.device)
    elif (not isinstance(out, torch.Tensor) or out.shape != input.shape or out.dtype != torch.float32
          or out.device != input.device or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous float32 {tuple(input.shape)} on {input.device}, got "
                         f"{getattr(out, 'dtype', type(out))} {tuple(getattr(out, 'shape', ()))}")
    if input.numel() == 0:
        return out
    if not use_triton(input):
        torch.mul(torch.tanh(input.float() / cap), cap, out=out)
        return out
    x = input if input.is_contiguous() else input.contiguous()
    block = 4096
    soft_cap_kernel[(triton.cdiv(x.numel(), block),)](x, out, x.numel(), float(cap), BLOCK=block, num_warps=8)
    return out
