"""Rotary position embedding: one program per (token, block of heads)."""
import triton
import triton.language as tl


@triton.jit
def rope_kernel(
    X, Y, POS, FREQ, COS_SIN, num_heads, head_dim, half,
    stride_xt, stride_xh, stride_yt, stride_yh, stride_cs,
    BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    INTERLEAVE: tl.constexpr, FROM_CACHE: tl.constexpr, COPY_REST: tl.constexpr,
):
    """Rotates pairs of the first 2 * half dims by angle pos * FREQ[i] (or reads cos/sin from
    COS_SIN[pos] = [cos(half) | sin(half)]). Pairs are (i, i + half) (NeoX) or (2i, 2i + 1)
    (INTERLEAVE). COPY_REST copies dims past the rotary ones (out of place, partial rotary)."""
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = heads < num_heads
    pos = tl.load(POS + t)
    i = tl.arange(0, BLOCK_R)
    im = i < half
    if FROM_CACHE:
        row = COS_SIN + pos.to(tl.int64) * stride_cs
        cos = tl.load(row + i, mask=im, other=1.0).to(tl.float32)
        sin = tl.load(row + half + i, mask=im, other=0.0).to(tl.float32)
    else:
        ang = pos.to(tl.float32) * tl.load(FREQ + i, mask=im, other=0.0)
        cos = tl.cos(ang)
        sin = tl.sin(ang)
    if INTERLEAVE:
        i1 = 2 * i
        i2 = 2 * i + 1
    else:
        i1 = i
        i2 = i + half
    m = hm[:, None] & im[None, :]
    xrow = X + t * stride_xt + heads[:, None] * stride_xh
    yrow = Y + t * stride_yt + heads[:, None] * stride_yh
    x1 = tl.load(xrow + i1[None, :], mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(xrow + i2[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(yrow + i1[None, :], (x1 * cos[None, :] - x2 * sin[None, :]).to(Y.dtype.element_ty), mask=m)
    tl.store(yrow + i2[None, :], (x2 * cos[None, :] + x1 * sin[None, :]).to(Y.dtype.element_ty), mask=m)
    if COPY_REST:
        d = tl.arange(0, BLOCK_D)
        dm = hm[:, None] & (d[None, :] >= 2 * half) & (d[None, :] < head_dim)
        tl.store(yrow + d[None, :], tl.load(xrow + d[None, :], mask=dm), mask=dm)
