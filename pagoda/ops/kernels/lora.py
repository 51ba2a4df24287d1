"""Segment GEMM (multi-LoRA): Y[rows of segment b] = X[rows of segment b] @ W[weight_indices[b]] for segments of
consecutive rows of X (FlashInfer's SegmentGEMMWrapper; ops/lora.py is the host side).

A LoRA layer at serving time is two of these: the shrink (d_in = hidden size, d_out = the rank, 8-128) and the
expand (d_in = the rank, d_out = the hidden size), each request's rows with its own adapter. The grid is fixed by
what the host knows without reading the segment table (X's row count and the number of segments), so a run is
CUDA-graph safe with the table on the device: segment_tiles_kernel turns the segments' row pointers into
row-tile pointers (each segment ceil(rows / BLOCK_M) tiles, one program, a running sum), and each program of
segment_gemm_kernel finds its segment from them (one vector load of the tile ends up to 1024 segments, a binary
search past that). Programs past the last tile leave at once; there are at most as many as X has row tiles plus
one per segment.

SPLIT_K > 1 (the shrink, whose d_out of a few columns leaves one column tile a segment: at decode one program a
request would read its whole adapter alone): each program sums its share of K and adds it to Y with float32
atomics (Y a float32 scratch that segment_tiles_kernel zeroes, cast into the output after).

Rows of a segment past X's last row, and segments whose weight index lies outside W, are never read: the former
are clamped away, the latter write NaN rows (the host checks host-side tables; a device-side table is not read
back, as FlashInfer does not, and this keeps a bad entry visible instead of reading past W).
"""
import triton
import triton.language as tl

from .pdl import pdl_enter


@triton.jit
def segment_tiles_kernel(SEG_INDPTR, TILE_INDPTR, batch_size, n_rows, ZERO, n_zero, BLOCK_M: tl.constexpr,
                         BLOCK: tl.constexpr, ZERO_BLOCK: tl.constexpr):
    """TILE_INDPTR[0] = 0, TILE_INDPTR[b + 1] = sum over segments <= b of ceil(rows / BLOCK_M), rows clamped to
    0 .. n_rows (program 0); every program also zeroes its ZERO_BLOCK of the n_zero float32 at ZERO (a split-K
    run's sums: no memset launch of their own)."""
    if n_zero > 0:
        offs_z = tl.program_id(0) * ZERO_BLOCK + tl.arange(0, ZERO_BLOCK)
        tl.store(ZERO + offs_z, tl.zeros([ZERO_BLOCK], tl.float32), mask=offs_z < n_zero)
    if tl.program_id(0) > 0:
        return
    tl.store(TILE_INDPTR, 0)
    carry = 0
    for b0 in range(0, batch_size, BLOCK):
        offs = b0 + tl.arange(0, BLOCK)
        ok = offs < batch_size
        lo = tl.minimum(tl.maximum(tl.load(SEG_INDPTR + offs, mask=ok, other=0), 0), n_rows)
        hi = tl.minimum(tl.maximum(tl.load(SEG_INDPTR + offs + 1, mask=ok, other=0), 0), n_rows)
        tiles = tl.where(ok & (hi > lo), (hi - lo + BLOCK_M - 1) // BLOCK_M, 0).to(tl.int32)
        run = tl.cumsum(tiles, 0) + carry
        tl.store(TILE_INDPTR + 1 + offs, run, mask=ok)
        carry = carry + tl.sum(tiles, 0)


@triton.jit
def segment_gemm_kernel(X, W, Y, SEG_INDPTR, WEIGHT_INDICES, TILE_INDPTR, n_rows, num_weights, batch_size,
                        d_in, d_out, stride_xm, stride_wb, stride_wk, stride_wn, stride_ym,
                        HAS_INDICES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, SEARCH: tl.constexpr = 0):
    """Program (t, n, s): row tile t (of all segments' tiles, TILE_INDPTR; the grid's first axis, which is not
    capped at 65535), column tile n, K share s of SPLIT_K. W[w] holds element (k, n) at k * stride_wk + n *
    stride_wn (both FlashInfer layouts). SEARCH: a power of two >= batch_size to find the segment by one vector
    load, or 0 for a binary search (many segments)."""
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    # the segment b with TILE_INDPTR[b] <= t < TILE_INDPTR[b + 1] (an empty segment holds no tile)
    if SEARCH > 0:
        # the segments' tile ends in one load (one round trip to L2 instead of a search's log2(batch_size), each
        # waiting for the last: a decode expand's program is a few of them and one MMA): b = how many end <= t
        offs = tl.arange(0, SEARCH)
        ends = tl.load(TILE_INDPTR + 1 + offs, mask=offs < batch_size, other=0)
        if t >= tl.max(ends, 0):
            return
        b = tl.sum(((ends <= t) & (offs < batch_size)).to(tl.int32), 0)
    else:
        if t >= tl.load(TILE_INDPTR + batch_size):
            return
        lo = 0
        hi = batch_size
        while hi - lo > 1:  # (the last b with TILE_INDPTR[b] <= t: past the empty segments before t's)
            mid = (lo + hi) // 2
            if tl.load(TILE_INDPTR + mid) <= t:
                lo = mid
            else:
                hi = mid
        b = lo
    seg_lo = tl.minimum(tl.maximum(tl.load(SEG_INDPTR + b), 0), n_rows)
    seg_hi = tl.minimum(tl.maximum(tl.load(SEG_INDPTR + b + 1), 0), n_rows)
    row0 = seg_lo + (t - tl.load(TILE_INDPTR + b)) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < seg_hi
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < d_out
    if HAS_INDICES:
        w_idx = tl.load(WEIGHT_INDICES + b).to(tl.int64)
    else:
        w_idx = b.to(tl.int64)
    y_ptrs = Y + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :]
    w_ok = (w_idx >= 0) & (w_idx < num_weights)
    w_idx = tl.where(w_ok, w_idx, 0)  # (a bad index reads W[0] and writes NaN rows)
    # this program's share of K: whole BLOCK_K steps, SPLIT_K shares
    k_steps = tl.cdiv(d_in, BLOCK_K)
    per = tl.cdiv(k_steps, SPLIT_K)
    k_lo = tl.multiple_of(pid_k * per * BLOCK_K, BLOCK_K)  # (said: the loads stay aligned, cp.async-pipelined)
    k_hi = tl.minimum(k_lo + per * BLOCK_K, d_in)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + rows.to(tl.int64)[:, None] * stride_xm + (k_lo + offs_k)[None, :]
    w_ptrs = W + w_idx * stride_wb + (k_lo + offs_k)[:, None] * stride_wk + cols[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        k_ok = k + offs_k < k_hi
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(x, w, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    mask = row_ok[:, None] & col_ok[None, :]
    acc = tl.where(w_ok, acc, float("nan"))
    if SPLIT_K > 1:
        tl.atomic_add(y_ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _tile_rows(TILES, ORDER, n_tiles, t, BLOCK_M: tl.constexpr):
    """Tile t of a lora_tiles table: (its slot, its rows (int64, BLOCK_M), which of them are rows: none where the
    slot is <= 0, no work)."""
    slot = tl.load(TILES + t)
    first = tl.load(TILES + n_tiles + t)
    end = tl.load(TILES + 2 * n_tiles + t)
    offs = first + tl.arange(0, BLOCK_M)
    ok = (offs < end) & (slot > 0)
    return slot, tl.load(ORDER + offs, mask=ok, other=0).to(tl.int64), ok


@triton.jit
def lora_shrink_kernel(X, A, P, ORDER, TILES, n_tiles, d_in, stride_xm, stride_as, stride_ar, stride_ps, stride_pm,
                       RP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
                       PDL: tl.constexpr = False):
    """The serving engine's LoRA shrink over rows grouped by adapter (ops/lora.py lora_delta): program (t, s) takes
    tile t of TILES ([3, n_tiles] int32: adapter slot, first and end position in ORDER; a slot <= 0 is no work) and
    K share s of SPLIT, and writes P[s, row, :] = X[row, share] @ A[slot, :, share]^T (float32, RP columns) for
    the tile's rows ORDER[first:end] (at most BLOCK_M). Every share writes, an empty one zeros.
    PDL (a programmatic dependent launch, kernels/pdl.py): the tables (step inputs written before the step) load
    before the wait, X after it (the kernel before writes it); A is written only between steps."""
    t = tl.program_id(0)
    s = tl.program_id(1)
    slot, rows, ok = _tile_rows(TILES, ORDER, n_tiles, t, BLOCK_M)
    pdl_enter(PDL)  # (every program, those without work too: the chain's next kernel waits for all of them)
    if slot <= 0:
        return
    k_steps = tl.cdiv(d_in, BLOCK_K)
    per = tl.cdiv(k_steps, SPLIT)
    k_lo = tl.multiple_of(s * per * BLOCK_K, BLOCK_K)
    k_hi = tl.minimum(k_lo + per * BLOCK_K, d_in)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, RP)
    x_ptrs = X + rows[:, None] * stride_xm + (k_lo + offs_k)[None, :]
    a_ptrs = A + slot.to(tl.int64) * stride_as + offs_r[None, :] * stride_ar + (k_lo + offs_k)[:, None]
    acc = tl.zeros([BLOCK_M, RP], dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        k_ok = k + offs_k < k_hi
        x = tl.load(x_ptrs, mask=ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(x, a, acc)
        x_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
    tl.store(P + s * stride_ps + rows[:, None] * stride_pm + offs_r[None, :], acc, mask=ok[:, None])


@triton.jit
def lora_expand_kernel(P, B, OUT, ORDER, TILES, n_tiles, d_out, stride_ps, stride_pm, stride_bs, stride_bn,
                       stride_om, RP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       SPLIT: tl.constexpr, PDL: tl.constexpr = False):
    """Program (t, n): OUT[row, cols] += (sum over s of P[s, row, :]) @ B[slot, cols, :]^T for tile t's rows
    (lora_shrink_kernel's tiles) and column tile n: the shrink's sum rounded to B's dtype, the product added to
    OUT in float32 and rounded once. Each (row, column) belongs to one program: no atomics.
    PDL: the tables and B (as lora_shrink_kernel's) load before the wait, P and OUT after it."""
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot, rows, ok = _tile_rows(TILES, ORDER, n_tiles, t, BLOCK_M)
    offs_r = tl.arange(0, RP)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < d_out
    b = tl.load(B + tl.maximum(slot, 0).to(tl.int64) * stride_bs + cols[None, :] * stride_bn + offs_r[:, None],
                mask=col_ok[None, :] & (slot > 0), other=0.0)
    pdl_enter(PDL)
    if slot <= 0:
        return
    shrunk = tl.zeros([BLOCK_M, RP], dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        shrunk += tl.load(P + s * stride_ps + rows[:, None] * stride_pm + offs_r[None, :], mask=ok[:, None], other=0.0)
    acc = tl.dot(shrunk.to(B.dtype.element_ty), b)
    o_ptrs = OUT + rows[:, None] * stride_om + cols[None, :]
    mask = ok[:, None] & col_ok[None, :]
    o = tl.load(o_ptrs, mask=mask, other=0.0)
    tl.store(o_ptrs, (o.to(tl.float32) + acc).to(OUT.dtype.element_ty), mask=mask)
