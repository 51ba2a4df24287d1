"""RMSNorm family: one program per row, fp32 statistics."""
import triton
import triton.language as tl

from .pdl import pdl_enter


@triton.jit
def rmsnorm_kernel(X, R, W, Y, hidden, stride_x, stride_r, stride_y, eps, weight_offset,
                   BLOCK: tl.constexpr, ADD_RESIDUAL: tl.constexpr, PDL: tl.constexpr = False,
                   NORM_INTO_R: tl.constexpr = False, QUANT: tl.constexpr = False, scale_inv=1.0, clamp=448.0):
    """Y = X / rms(X) * (W + weight_offset), or with ADD_RESIDUAL: R <- X + R, then Y = norm(R)
    (Y aliases X for the in-place fused form), or with NORM_INTO_R: R <- R + norm(X), the norm rounded to R's
    dtype before the sum (as the norm's own output would be; Y is R then; in float32 the compiler may fuse the
    product and the sum). QUANT (FlashInfer's rmsnorm_quant): Y (fp8) = the norm * scale_inv clamped to +-clamp,
    and with ADD_RESIDUAL the norm of the float32 sum in a one-pass row (FlashInfer's quant kernel keeps it in
    float; its other kernels and a two-pass row read the sum rounded to R's dtype). A row of at most BLOCK elements
    is one pass, its weight loaded with it (one round of loads: at decode batch 1 the kernel is that round's
    latency); longer rows take two passes. PDL: kernels/pdl.py."""
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    if hidden <= BLOCK:
        offs = tl.arange(0, BLOCK)
        m = offs < hidden
        x = tl.load(X + row * stride_x + offs, mask=m, other=0.0).to(tl.float32)
        w = tl.load(W + offs, mask=m, other=0.0).to(tl.float32) + weight_offset
        if ADD_RESIDUAL:
            x += tl.load(R + row * stride_r + offs, mask=m, other=0.0).to(tl.float32)
            xr = x.to(R.dtype.element_ty)
            tl.store(R + row * stride_r + offs, xr, mask=m)
        inv = 1.0 / tl.sqrt(tl.sum(x * x, 0) / hidden + eps)
        if ADD_RESIDUAL and not QUANT:
            x = xr.to(tl.float32)  # the sum in the residual's dtype, as the two-pass form re-reads it
        if QUANT:
            y = tl.minimum(tl.maximum(x * inv * w * scale_inv, -clamp), clamp).to(Y.dtype.element_ty)
        else:
            y = (x * inv * w).to(Y.dtype.element_ty)
        if NORM_INTO_R:
            y = (y.to(tl.float32) + tl.load(Y + row * stride_y + offs, mask=m, other=0.0).to(tl.float32)).to(
                Y.dtype.element_ty)
        tl.store(Y + row * stride_y + offs, y, mask=m)
    else:
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, hidden, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < hidden
            x = tl.load(X + row * stride_x + offs, mask=m, other=0.0).to(tl.float32)
            if ADD_RESIDUAL:
                x += tl.load(R + row * stride_r + offs, mask=m, other=0.0).to(tl.float32)
                tl.store(R + row * stride_r + offs, x.to(R.dtype.element_ty), mask=m)
            acc += x * x
        inv = 1.0 / tl.sqrt(tl.sum(acc, 0) / hidden + eps)
        for start in range(0, hidden, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < hidden
            if ADD_RESIDUAL:
                # re-read the sum in the residual's dtype, as FlashInfer's fused kernel does
                x = tl.load(R + row * stride_r + offs, mask=m, other=0.0).to(tl.float32)
            else:
                x = tl.load(X + row * stride_x + offs, mask=m, other=0.0).to(tl.float32)
            w = tl.load(W + offs, mask=m, other=0.0).to(tl.float32) + weight_offset
            if QUANT:
                y = tl.minimum(tl.maximum(x * inv * w * scale_inv, -clamp), clamp).to(Y.dtype.element_ty)
            else:
                y = (x * inv * w).to(Y.dtype.element_ty)
            if NORM_INTO_R:
                y = (y.to(tl.float32) + tl.load(Y + row * stride_y + offs, mask=m, other=0.0).to(tl.float32)).to(
                    Y.dtype.element_ty)
            tl.store(Y + row * stride_y + offs, y, mask=m)


@triton.jit
def layernorm_kernel(X, G, B, Y, hidden, stride_x, stride_y, eps, BLOCK: tl.constexpr):
    """Y = (X - mean(X)) / sqrt(var(X) + eps) * G + B over each row (biased variance, as torch's layer_norm), fp32
    statistics. A row of at most BLOCK elements is one pass; longer rows take three (the mean, the variance about it,
    the output)."""
    row = tl.program_id(0).to(tl.int64)
    if hidden <= BLOCK:
        offs = tl.arange(0, BLOCK)
        m = offs < hidden
        x = tl.load(X + row * stride_x + offs, mask=m, other=0.0).to(tl.float32)
        mean = tl.sum(x, 0) / hidden
        xc = tl.where(m, x - mean, 0.0)
        inv = 1.0 / tl.sqrt(tl.sum(xc * xc, 0) / hidden + eps)
        g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
        b = tl.load(B + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_y + offs, (xc * inv * g + b).to(Y.dtype.element_ty), mask=m)
    else:
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, hidden, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            acc += tl.load(X + row * stride_x + offs, mask=offs < hidden, other=0.0).to(tl.float32)
        mean = tl.sum(acc, 0) / hidden
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, hidden, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < hidden
            xc = tl.where(m, tl.load(X + row * stride_x + offs, mask=m, other=0.0).to(tl.float32) - mean, 0.0)
            acc += xc * xc
        inv = 1.0 / tl.sqrt(tl.sum(acc, 0) / hidden + eps)
        for start in range(0, hidden, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < hidden
            x = tl.load(X + row * stride_x + offs, mask=m, other=0.0).to(tl.float32)
            g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
            b = tl.load(B + offs, mask=m, other=0.0).to(tl.float32)
            tl.store(Y + row * stride_y + offs, ((x - mean) * inv * g + b).to(Y.dtype.element_ty), mask=m)
