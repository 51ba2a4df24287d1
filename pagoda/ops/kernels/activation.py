"""Gated activations: out = act(x[..., :d]) * x[..., d:]."""
import triton
import triton.language as tl

from .pdl import pdl_enter


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def act_and_mul_kernel(X, Y, d, stride_x, stride_y, N_IN, stride_n, n_in, eps, ACT: tl.constexpr,
                       BLOCK: tl.constexpr, NORM_BLOCK: tl.constexpr = 0, PDL: tl.constexpr = False):
    """NORM_BLOCK > 0 (= next_power_of_2(n_in)): the row's gate and up are first multiplied by
    rsqrt(mean(N_IN[row]^2) + eps), the RMSNorm factor of the projection's input (its weight folded into the
    projection): every program reduces the row of N_IN, a load beside the gate / up loads."""
    pdl_enter(PDL)  # (kernels/pdl.py)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < d
    if NORM_BLOCK > 0:
        offs_in = tl.arange(0, NORM_BLOCK)
        xin = tl.load(N_IN + row * stride_n + offs_in, mask=offs_in < n_in, other=0.0).to(tl.float32)
    a = tl.load(X + row * stride_x + offs, mask=m, other=0.0).to(tl.float32)
    b = tl.load(X + row * stride_x + d + offs, mask=m, other=0.0).to(tl.float32)
    if NORM_BLOCK > 0:
        scale = tl.rsqrt(tl.sum(xin * xin, axis=0) / n_in + eps)
        a = a * scale
        b = b * scale
    if ACT == 0:
        g = a / (1.0 + tl.exp(-a))
    elif ACT == 1:
        g = 0.5 * a * (1.0 + tl.erf(a * 0.7071067811865476))
    else:
        g = 0.5 * a * (1.0 + _tanh(0.7978845608028654 * (a + 0.044715 * a * a * a)))
    tl.store(Y + row * stride_y + offs, (g * b).to(Y.dtype.element_ty), mask=m)


@triton.jit
def soft_cap_kernel(X, Y, n, cap, BLOCK: tl.constexpr):
    """Y = cap * tanh(X / cap) in float32 over n elements (logits: Gemma's final_logit_softcapping); tanh by
    (1 - e) / (1 + e), e = exp(-2|x|), and by its series where |x| < 0.01 (there 1 - e loses digits)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32) / cap
    small = x * (1.0 - x * x / 3.0)
    t = tl.where(tl.abs(x) < 0.01, small, _tanh(x))
    tl.store(Y + offs, (t * cap).to(Y.dtype.element_ty), mask=m)
