"""Rotary position embedding: one launch rotates q and k; a program per (token, block of heads)."""
import triton
import triton.language as tl

from .pdl import pdl_enter


@triton.jit
def _cached_cos_sin(COS_SIN, pos, i, im, half, max_pos, stride_cs):
    """cos / sin of rotary pairs i at pos from a [max_pos, 2 * half] = [cos | sin] cache (NaN for a position
    outside it: the caller writes NaN rather than read out of bounds)."""
    ok = (pos >= 0) & (pos < max_pos)
    row = COS_SIN + pos.to(tl.int64) * stride_cs
    cos = tl.load(row + i, mask=im & ok, other=float("nan")).to(tl.float32)
    sin = tl.load(row + half + i, mask=im & ok, other=float("nan")).to(tl.float32)
    return cos, sin


@triton.jit
def _pairs(i, half, INTERLEAVE: tl.constexpr):
    """The dims rotated together: (2i, 2i + 1) interleaved (GPT-J), (i, i + half) otherwise (NeoX)."""
    if INTERLEAVE:
        return 2 * i, 2 * i + 1
    return i, i + half


@triton.jit
def _head_block(POS, t, hb, num_heads, half, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
    """Head block hb: its heads and their mask, token t's position, the rotary pair indices and their mask."""
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_R)
    return heads, heads < num_heads, tl.load(POS + t), i, i < half


@triton.jit
def _rotate_rows(xrow, yrow, i, half, m, cos, sin, scale, clamp, INTERLEAVE: tl.constexpr, QUANT: tl.constexpr):
    """yrow's rotary pairs = xrow's rotated by (cos, sin) (QUANT: then times scale, clamped to +-clamp), stored in
    yrow's dtype."""
    i1, i2 = _pairs(i, half, INTERLEAVE)
    x1 = tl.load(xrow + i1[None, :], mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(xrow + i2[None, :], mask=m, other=0.0).to(tl.float32)
    y1 = quantize(x1 * cos[None, :] - x2 * sin[None, :], scale, clamp, QUANT)
    y2 = quantize(x2 * cos[None, :] + x1 * sin[None, :], scale, clamp, QUANT)
    tl.store(yrow + i1[None, :], y1.to(yrow.dtype.element_ty), mask=m)
    tl.store(yrow + i2[None, :], y2.to(yrow.dtype.element_ty), mask=m)


@triton.jit
def rope_kernel(
    Q, K, QO, KO, POS, FREQ, COS_SIN, num_q_heads, num_k_heads, head_dim, half, max_pos,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh, stride_cs,
    BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    INTERLEAVE: tl.constexpr, FROM_CACHE: tl.constexpr, COPY_REST: tl.constexpr,
):
    """Rotates pairs of the first 2 * half dims by angle pos * FREQ[i] (or reads cos/sin from
    COS_SIN[pos] = [cos(half) | sin(half)]). Pairs are (i, i + half) (NeoX) or (2i, 2i + 1)
    (INTERLEAVE). COPY_REST copies dims past the rotary ones (out of place, partial rotary).
    Program (t, j): token t, head block j of q (j < q blocks) or of k (after them). A position
    outside 0..max_pos-1 of the cos/sin cache writes NaN (it is never read out of bounds)."""
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    q_blocks = tl.cdiv(num_q_heads, BLOCK_H)
    if j < q_blocks:
        X, Y, num_heads, hb = Q, QO, num_q_heads, j
        sxt, sxh, syt, syh = stride_qt, stride_qh, stride_qot, stride_qoh
    else:
        X, Y, num_heads, hb = K, KO, num_k_heads, j - q_blocks
        sxt, sxh, syt, syh = stride_kt, stride_kh, stride_kot, stride_koh
    heads, hm, pos, i, im = _head_block(POS, t, hb, num_heads, half, BLOCK_H, BLOCK_R)
    if FROM_CACHE:
        cos, sin = _cached_cos_sin(COS_SIN, pos, i, im, half, max_pos, stride_cs)
    else:
        ang = pos.to(tl.float32) * tl.load(FREQ + i, mask=im, other=0.0)
        cos = tl.cos(ang)
        sin = tl.sin(ang)
    m = hm[:, None] & im[None, :]
    xrow = X + t * sxt + heads[:, None] * sxh
    yrow = Y + t * syt + heads[:, None] * syh
    _rotate_rows(xrow, yrow, i, half, m, cos, sin, 1.0, 0.0, INTERLEAVE, False)
    if COPY_REST:
        d = tl.arange(0, BLOCK_D)
        dm = hm[:, None] & (d[None, :] >= 2 * half) & (d[None, :] < head_dim)
        tl.store(yrow + d[None, :], tl.load(xrow + d[None, :], mask=dm), mask=dm)


@triton.jit
def rope_quantize_kernel(
    QR, KR, QN, KN, QRO, KRO, QNO, KNO, POS, COS_SIN, num_q_heads, num_k_heads, half, nope_dim, max_pos,
    s_qr_t, s_qr_h, s_kr_t, s_kr_h, s_qn_t, s_qn_h, s_kn_t, s_kn_h,
    s_qro_t, s_qro_h, s_kro_t, s_kro_h, s_qno_t, s_qno_h, s_kno_t, s_kno_h, stride_cs, scale_q, scale_kv, clamp,
    BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, INTERLEAVE: tl.constexpr,
    HAS_NOPE: tl.constexpr, PDL: tl.constexpr = False,
):
    """FlashInfer's rope_quantize_fp8: program (t, j), token t, head block j of q (j < q blocks) or of k: the rotary
    part (2 * half dims, cos / sin from COS_SIN[pos]) rotated, times the side's scale, clamped to +-clamp, stored in
    the outputs' fp8 dtype; the non-rotary part (nope_dim dims, HAS_NOPE) scaled, clamped and stored alike. A
    position outside the cache writes NaN (as rope_kernel). PDL: kernels/pdl.py."""
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    q_blocks = tl.cdiv(num_q_heads, BLOCK_H)
    if j < q_blocks:
        XR, XN, YR, YN, num_heads, hb, scale = QR, QN, QRO, QNO, num_q_heads, j, scale_q
        sxr_t, sxr_h, sxn_t, sxn_h = s_qr_t, s_qr_h, s_qn_t, s_qn_h
        syr_t, syr_h, syn_t, syn_h = s_qro_t, s_qro_h, s_qno_t, s_qno_h
    else:
        XR, XN, YR, YN, num_heads, hb, scale = KR, KN, KRO, KNO, num_k_heads, j - q_blocks, scale_kv
        sxr_t, sxr_h, sxn_t, sxn_h = s_kr_t, s_kr_h, s_kn_t, s_kn_h
        syr_t, syr_h, syn_t, syn_h = s_kro_t, s_kro_h, s_kno_t, s_kno_h
    heads, hm, pos, i, im = _head_block(POS, t, hb, num_heads, half, BLOCK_H, BLOCK_R)
    cos, sin = _cached_cos_sin(COS_SIN, pos, i, im, half, max_pos, stride_cs)
    m = hm[:, None] & im[None, :]
    _rotate_rows(XR + t * sxr_t + heads[:, None] * sxr_h, YR + t * syr_t + heads[:, None] * syr_h, i, half, m, cos,
                 sin, scale, clamp, INTERLEAVE, True)
    if HAS_NOPE:
        d = tl.arange(0, BLOCK_N)
        dm = hm[:, None] & (d[None, :] < nope_dim)
        xn = tl.load(XN + t * sxn_t + heads[:, None] * sxn_h + d[None, :], mask=dm, other=0.0).to(tl.float32)
        tl.store(YN + t * syn_t + heads[:, None] * syn_h + d[None, :],
                 quantize(xn, scale, clamp, True).to(YN.dtype.element_ty), mask=dm)


@triton.jit
def quantize(x, inv, clamp, QUANT: tl.constexpr):
    """x (float32) as an fp8 cache stores it: clamp(x * inv, +-clamp) (then rounded by the store's cast); x as it is
    without QUANT."""
    if QUANT:
        x = tl.minimum(tl.maximum(x * inv, -clamp), clamp)
    return x


@triton.jit
def _head_rms_norm(x1, x2, x_rest, W, i1, i2, im, d, half, head_dim, eps, offset, REST: tl.constexpr):
    """[heads, dims] float32 rows of whole heads, held as the rotary pairs' halves x1 / x2 (dims i1 / i2) and, with
    REST (partial rotary), the dims past them (x_rest over d, zero where masked), times rsqrt(mean(x^2) + eps) and
    (W + offset) per dim."""
    ss = tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)
    if REST:
        ss += tl.sum(x_rest * x_rest, axis=1)
    r = tl.rsqrt(ss / head_dim + eps)[:, None]
    w1 = tl.load(W + i1, mask=im, other=0.0).to(tl.float32) + offset
    w2 = tl.load(W + i2, mask=im, other=0.0).to(tl.float32) + offset
    if REST:
        wr = tl.load(W + d, mask=(d >= 2 * half) & (d < head_dim), other=0.0).to(tl.float32) + offset
        x_rest = x_rest * r * wr[None, :]
    return x1 * r * w1[None, :], x2 * r * w2[None, :], x_rest


@triton.jit
def rope_append_kernel(
    Q, K, V, KC, VC, POS, BATCH, KV_INDICES, KV_INDPTR, COS_SIN,
    num_q_heads, num_kv_heads, head_dim, half, max_pos, page_size,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cp, stride_cs, stride_ch, stride_vcp, stride_vcs, stride_vch, stride_cos,
    BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, INTERLEAVE: tl.constexpr,
    PDL: tl.constexpr = False, TABLES_EARLY: tl.constexpr = False,
    k_inv=1.0, v_inv=1.0, clamp=0.0, QUANT: tl.constexpr = False,
    QW=None, KW=None, norm_eps=0.0, norm_offset=0.0, QK_NORM: tl.constexpr = False, NORM_REST: tl.constexpr = False,
):
    """RoPE from a cos/sin cache on q (in place) and on k, whose rotated rows go straight into the paged
    cache with v's (append_paged_kv_kernel's page / slot): one launch instead of rope_kernel plus
    append_paged_kv_kernel, and k is not written back. Program (t, j): token t, head block j of q, or
    (j past q's blocks) of k and v. Dims past the rotary ones are copied; a position outside the cos/sin
    cache writes NaN, as rope_kernel does. PDL: kernels/pdl.py. TABLES_EARLY (with PDL): the positions, the
    cos / sin rows and the page chain load before the wait for the kernel ahead (the caller promises that none
    of them is that kernel's output: the engine's step inputs are host copies made before the step), so that
    only the q / k / v loads wait for it: at decode batch 1 the kernel is its chain of dependent loads. QUANT (an
    fp8 cache): k and v stored as clamp(x * k_inv / v_inv, +-clamp) rounded to the cache dtype, as
    append_paged_kv_kernel stores them. QK_NORM (Qwen3's, Gemma 3's per-head q / k norms): each head of q and of k
    is RMS-normalized over head_dim with weight QW / KW (plus norm_offset: 1 for Gemma's (1 + w)) before it is
    rotated, in float32, rounded once after RoPE; NORM_REST: dims past the rotary ones (partial rotary) are there."""
    if not TABLES_EARLY:
        pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    q_blocks = tl.cdiv(num_q_heads, BLOCK_H)
    pos = tl.load(POS + t)
    # the k / v programs' page chain (batch -> indptr -> page id) starts with the position's load, not after
    # the cos / sin it waits for
    b = tl.load(BATCH + t, mask=j >= q_blocks, other=0)
    i = tl.arange(0, BLOCK_R)
    im = i < half
    cos, sin = _cached_cos_sin(COS_SIN, pos, i, im, half, max_pos, stride_cos)
    is_kv = j >= q_blocks
    page = tl.load(KV_INDICES + tl.load(KV_INDPTR + b, mask=is_kv, other=0) + pos // page_size, mask=is_kv,
                   other=0).to(tl.int64)
    if TABLES_EARLY:
        pdl_enter(PDL)
    cos = cos[None, :]
    sin = sin[None, :]
    i1, i2 = _pairs(i, half, INTERLEAVE)
    d = tl.arange(0, BLOCK_D)
    if j < q_blocks:
        heads = j * BLOCK_H + tl.arange(0, BLOCK_H)
        m = (heads < num_q_heads)[:, None] & im[None, :]
        xrow = Q + t * stride_qt + heads[:, None] * stride_qh
        x1 = tl.load(xrow + i1[None, :], mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(xrow + i2[None, :], mask=m, other=0.0).to(tl.float32)
        if QK_NORM:  # (the dims past the rotary ones, if any, are normalized in place too)
            rest = (heads < num_q_heads)[:, None] & (d[None, :] >= 2 * half) & (d[None, :] < head_dim)
            q_rest = 0.0  # (q's own name: after the branch on j, a name both branches set must have one type)
            if NORM_REST:
                q_rest = tl.load(xrow + d[None, :], mask=rest, other=0.0).to(tl.float32)
            x1, x2, q_rest = _head_rms_norm(x1, x2, q_rest, QW, i1, i2, im, d, half, head_dim, norm_eps, norm_offset,
                                            NORM_REST)
            if NORM_REST:
                tl.store(xrow + d[None, :], q_rest.to(Q.dtype.element_ty), mask=rest)
        tl.store(xrow + i1[None, :], (x1 * cos - x2 * sin).to(Q.dtype.element_ty), mask=m)
        tl.store(xrow + i2[None, :], (x2 * cos + x1 * sin).to(Q.dtype.element_ty), mask=m)
    else:
        heads = (j - q_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
        hm = (heads < num_kv_heads)[:, None]
        m = hm & im[None, :]
        slot = pos % page_size
        xrow = K + t * stride_kt + heads[:, None] * stride_kh
        crow = KC + page * stride_cp + slot * stride_cs + heads[:, None] * stride_ch
        x1 = tl.load(xrow + i1[None, :], mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(xrow + i2[None, :], mask=m, other=0.0).to(tl.float32)
        if QK_NORM:  # (rest is set again below, where the form without the norms sets it: its PTX unchanged)
            rest = hm & (d[None, :] >= 2 * half) & (d[None, :] < head_dim)
            x_rest = tl.load(xrow + d[None, :], mask=rest, other=0.0).to(tl.float32)  # (all masked without NORM_REST)
            x1, x2, x_rest = _head_rms_norm(x1, x2, x_rest, KW, i1, i2, im, d, half, head_dim, norm_eps, norm_offset,
                                            NORM_REST)
        tl.store(crow + i1[None, :], quantize(x1 * cos - x2 * sin, k_inv, clamp, QUANT).to(KC.dtype.element_ty),
                 mask=m)
        tl.store(crow + i2[None, :], quantize(x2 * cos + x1 * sin, k_inv, clamp, QUANT).to(KC.dtype.element_ty),
                 mask=m)
        rest = hm & (d[None, :] >= 2 * half) & (d[None, :] < head_dim)
        if not QK_NORM:
            x_rest = tl.load(xrow + d[None, :], mask=rest)
        if QUANT:
            x_rest = quantize(x_rest.to(tl.float32), k_inv, clamp, QUANT)
        tl.store(crow + d[None, :], x_rest.to(KC.dtype.element_ty), mask=rest)
        dm = hm & (d[None, :] < head_dim)
        v = tl.load(V + t * stride_vt + heads[:, None] * stride_vh + d[None, :], mask=dm)
        if QUANT:
            v = quantize(v.to(tl.float32), v_inv, clamp, QUANT)
        tl.store(VC + page * stride_vcp + slot * stride_vcs + heads[:, None] * stride_vch + d[None, :],
                 v.to(VC.dtype.element_ty), mask=dm)
