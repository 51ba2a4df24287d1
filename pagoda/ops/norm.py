"""RMSNorm, its fused-residual and Gemma forms, their fp8-output forms (rmsnorm_quant, fused_add_rmsnorm_quant:
the input of an fp8 GEMM), and LayerNorm (FlashInfer names and arguments).

All compute in fp32 and return the input dtype. ``input`` is [..., hidden] with a
contiguous last dimension; ``weight`` is [hidden].
"""
from __future__ import annotations

import torch
import triton

from ..attention.formats import FP8_DTYPES, FP8_MAX
from ._dispatch import check_eps, check_same, check_scale, pdl_launch, rows_view, use_triton
from .kernels.norm import layernorm_kernel, rmsnorm_kernel


def _block(hidden: int) -> int:
    return min(4096, max(16, triton.next_power_of_2(hidden)))


def _check(input, weight, name="input", weight_name="weight"):
    if not isinstance(input, torch.Tensor) or input.dim() < 1:
        raise ValueError(f"{name} must be a tensor [..., hidden]")
    if not isinstance(weight, torch.Tensor) or weight.shape != (input.shape[-1],):
        raise ValueError(f"{weight_name} must have shape ({input.shape[-1]},), got {getattr(weight, 'shape', weight)}")
    if weight.device != input.device:
        raise ValueError(f"{weight_name} must be on the device of input")
    if not input.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating tensor, got {input.dtype}")


def rms_norm_float(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """The PyTorch form of the RMSNorm family over x's last dimension, in float32: x * rsqrt(mean(x^2) + eps) *
    (weight + offset)."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (weight.float() + offset)


def _norm(input, weight, eps, out, offset, enable_pdl=None):
    _check(input, weight)
    if out is None:
        out = torch.empty_like(input)
    else:
        check_same("out", out, input)
    if input.numel() == 0:
        return out
    if not use_triton(input):
        out.copy_(rms_norm_float(input, weight, eps, offset).to(out.dtype))
        return out
    x2, y2 = rows_view("input", input), rows_view("out", out)
    hidden = input.shape[-1]
    rmsnorm_kernel[(x2.shape[0],)](x2, x2, weight, y2, hidden, x2.stride(0), x2.stride(0), y2.stride(0),
                                   float(eps), float(offset), BLOCK=_block(hidden), ADD_RESIDUAL=False,
                                   num_warps=4, **pdl_launch(enable_pdl, input))
    return out


def _fused(input, residual, weight, eps, offset, enable_pdl=None, into=False):
    """residual <- input + residual, input <- norm(residual); into: residual <- residual + norm(input) instead."""
    _check(input, weight)
    check_same("residual", residual, input)
    if input.numel() == 0:
        return
    if not use_triton(input):
        x = input.float() if into else (input.float() + residual.float())
        if not into:
            residual.copy_(x.to(residual.dtype))
            x = residual.float()
        y = rms_norm_float(x, weight, eps, offset).to(input.dtype)
        if into:
            residual.copy_((residual.float() + y.float()).to(residual.dtype))
        else:
            input.copy_(y)
        return
    x2, r2 = rows_view("input", input), rows_view("residual", residual)
    y2 = r2 if into else x2
    hidden = input.shape[-1]
    rmsnorm_kernel[(x2.shape[0],)](x2, r2, weight, y2, hidden, x2.stride(0), r2.stride(0), y2.stride(0),
                                   float(eps), float(offset), BLOCK=_block(hidden), ADD_RESIDUAL=not into,
                                   NORM_INTO_R=into, num_warps=4, **pdl_launch(enable_pdl, input))


def rmsnorm(input: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, out: torch.Tensor | None = None,
            enable_pdl: bool | None = None) -> torch.Tensor:
    """out = input / sqrt(mean(input^2) + eps) * weight. enable_pdl: a programmatic dependent launch on a
    Hopper GPU (ops/kernels/pdl.py; None: off)."""
    return _norm(input, weight, eps, out, 0.0, enable_pdl)


def fused_add_rmsnorm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                      enable_pdl: bool | None = None) -> None:
    """In place: residual <- input + residual; input <- rmsnorm(residual) * weight (enable_pdl: as rmsnorm's)."""
    _fused(input, residual, weight, eps, 0.0, enable_pdl)


def gemma_rmsnorm(input: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, out: torch.Tensor | None = None,
                  enable_pdl: bool | None = None) -> torch.Tensor:
    """Gemma's form: out = input / sqrt(mean(input^2) + eps) * (1 + weight)."""
    return _norm(input, weight, eps, out, 1.0, enable_pdl)


def gemma_fused_add_rmsnorm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                            eps: float = 1e-6, enable_pdl: bool | None = None) -> None:
    """In place: residual <- input + residual; input <- gemma_rmsnorm(residual)."""
    _fused(input, residual, weight, eps, 1.0, enable_pdl)


def gemma_rmsnorm_add(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                      enable_pdl: bool | None = None) -> None:
    """In place: residual <- residual + gemma_rmsnorm(input), the norm rounded to residual's dtype first (what
    ``residual + gemma_rmsnorm(input)`` gives in two launches; pagoda's, for Gemma 2 / 3's post-attention and
    post-feedforward norms, whose output joins the residual stream; on the GPU the sum of two bf16 values rounds
    once where torch's bf16 add rounds a float32 sum, so a rare element differs by one unit in the last place).
    input is left as it is."""
    _fused(input, residual, weight, eps, 1.0, enable_pdl, into=True)


def _check_quant(out, input, scale) -> tuple[float, float]:
    """(1 / scale, the fp8 dtype's largest value) of rmsnorm_quant's out / scale, or ValueError naming them."""
    if not isinstance(out, torch.Tensor) or out.dtype not in FP8_DTYPES or out.shape != input.shape or \
            out.device != input.device:
        raise ValueError(f"out must be a float8_e4m3fn / float8_e5m2 tensor of input's shape {tuple(input.shape)} on "
                         f"{input.device}, got {getattr(out, 'dtype', type(out))} {tuple(getattr(out, 'shape', ()))}")
    if out.numel() and out.stride(-1) != 1:
        raise ValueError("out must have a contiguous last dimension")
    return 1.0 / check_scale("scale", scale), FP8_MAX[out.dtype]


def _norm_quant(out, input, residual, weight, scale, eps, enable_pdl):
    _check(input, weight)
    eps = check_eps("eps", eps)
    scale_inv, clamp = _check_quant(out, input, scale)
    if residual is not None:
        check_same("residual", residual, input)
    if input.numel() == 0:
        return
    if not use_triton(input):
        x = input.float()
        if residual is not None:
            x = x + residual.float()
            residual.copy_(x.to(residual.dtype))
        inv = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        if residual is not None and input.shape[-1] > _block(input.shape[-1]):
            x = residual.float()  # (a two-pass row normalizes the rounded sum by the float sum's rms, as the kernel)
        out.copy_((x * inv * weight.float() * scale_inv).clamp(-clamp, clamp).to(out.dtype))
        return
    x2, y2 = rows_view("input", input), rows_view("out", out)
    r2 = x2 if residual is None else rows_view("residual", residual)
    hidden = input.shape[-1]
    rmsnorm_kernel[(x2.shape[0],)](x2, r2, weight, y2, hidden, x2.stride(0), r2.stride(0), y2.stride(0), eps, 0.0,
                                   BLOCK=_block(hidden), ADD_RESIDUAL=residual is not None, QUANT=True,
                                   scale_inv=scale_inv, clamp=clamp, num_warps=4, **pdl_launch(enable_pdl, input))


def rmsnorm_quant(out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, scale: float, eps: float = 1e-6,
                  enable_pdl: bool | None = None) -> torch.Tensor:
    """FlashInfer's: out (float8_e4m3fn / e5m2, input's shape) = rmsnorm(input) * weight / scale, clamped to the
    fp8 dtype's range (the input of an fp8 GEMM with per-tensor activation scale ``scale``). Returns out."""
    _norm_quant(out, input, None, weight, scale, eps, enable_pdl)
    return out


def fused_add_rmsnorm_quant(out: torch.Tensor, input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                            scale: float, eps: float = 1e-6, enable_pdl: bool | None = None) -> None:
    """FlashInfer's: residual <- input + residual (in residual's dtype); out (fp8) = rmsnorm of the sum * weight /
    scale, clamped to the fp8 range (the float32 sum's norm, as FlashInfer's kernel; rows over 4096 read the rounded
    sum). input is left as it is."""
    _norm_quant(out, input, residual, weight, scale, eps, enable_pdl)


def layernorm(input: torch.Tensor, gemma: torch.Tensor, beta: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(input - mean) / sqrt(var + eps) * gemma + beta over the last dimension (biased variance, fp32 statistics),
    in input's dtype (FlashInfer's layernorm: its gamma is named gemma; FlashInfer takes bf16 input and float32
    gemma / beta only, pagoda any float dtypes)."""
    _check(input, gemma, weight_name="gemma (the weight)")
    if not isinstance(beta, torch.Tensor) or beta.shape != gemma.shape or beta.device != input.device:
        raise ValueError(f"beta must be a [{input.shape[-1]}] tensor on input's device, got "
                         f"{getattr(beta, 'shape', beta)}")
    for name, t in (("gemma", gemma), ("beta", beta)):
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
    eps = check_eps("eps", eps)
    out = torch.empty_like(input)
    if input.numel() == 0:
        return out
    if not use_triton(input):
        x = input.float()
        out.copy_(torch.nn.functional.layer_norm(x, x.shape[-1:], gemma.float(), beta.float(), eps).to(out.dtype))
        return out
    x2, y2 = rows_view("input", input), rows_view("out", out)
    hidden = input.shape[-1]
    layernorm_kernel[(x2.shape[0],)](x2, gemma.contiguous(), beta.contiguous(), y2, hidden, x2.stride(0),
                                     y2.stride(0), eps, BLOCK=_block(hidden), num_warps=8 if hidden > 1024 else 4)
    return out
