"""Top-k selection by radix select, one program per row (ops/topk.py's top_k and sparse-attention transforms).

Radix select finds the k-th largest order key and how many of the values equal to it are among the k largest, one
RADIX-bit digit a pass (most significant first; each pass histograms the next digit of the keys that share the
digits chosen so far). Where a pass leaves at most half of its values sharing the chosen digits (COMPACT), those
values are copied, in order, into a per-row scratch row and the later passes read only them: on bell-shaped scores
the passes after the first one or two touch a few percent of the row. A last pass writes the positions of the values
above the k-th largest key and of the first ones equal to it, in position order, each program's output slots filled
by a running prefix sum. Nothing is sorted.
"""
import triton
import triton.language as tl

from .sampling import order_key

SIGN = tl.constexpr(-2147483648)  # (int32 0x80000000: an order key xor this orders as an unsigned integer)


@triton.jit
def _hist_pass(src, m, prefix, d: tl.constexpr, RADIX: tl.constexpr, BLOCK: tl.constexpr):
    """Histogram of digit d (RADIX bits, most significant first) of the unsigned order keys of src[:m] whose higher
    digits equal prefix."""
    NB: tl.constexpr = 1 << RADIX
    SHIFT: tl.constexpr = 32 - RADIX * (d + 1)
    hist = tl.zeros([NB], tl.int32)
    for s in range(0, m, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        msk = offs < m
        u = order_key(tl.load(src + offs, mask=msk, other=0.0).to(tl.float32)) ^ SIGN
        if d > 0:
            msk = msk & (((u >> (SHIFT + RADIX)) & ((1 << (RADIX * d)) - 1)) == prefix)
        hist += tl.histogram((u >> SHIFT) & (NB - 1), NB, mask=msk)
    return hist


@triton.jit
def _compact(src, m, dst, prefix, NBITS: tl.constexpr, BLOCK: tl.constexpr):
    """Copies the values of src[:m] whose unsigned order keys' top NBITS bits equal prefix, in order, to dst (which
    may be src: each step writes below what it has read); returns how many."""
    base = 0
    for s in range(0, m, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        msk = offs < m
        x = tl.load(src + offs, mask=msk, other=0.0)
        u = order_key(x.to(tl.float32)) ^ SIGN
        keep = msk & (((u >> (32 - NBITS)) & ((1 << NBITS) - 1)) == prefix)
        ki = keep.to(tl.int32)
        tl.store(dst + base + tl.cumsum(ki, 0) - ki, x, mask=keep)
        base += tl.sum(ki, 0)
    tl.debug_barrier()  # (the next pass's loads by other warps see these stores)
    return base


@triton.jit
def radix_select(row, n, k, scratch, RADIX: tl.constexpr, COMPACT: tl.constexpr, BLOCK: tl.constexpr,
                 CBLOCK: tl.constexpr, SBLOCK: tl.constexpr):
    """(order key of the k-th largest of row[:n], how many of the values with that key are among the k largest),
    1 <= k <= n. Passes over more than BLOCK values step BLOCK at a time, over more than SBLOCK CBLOCK, the rest
    in one SBLOCK step (a histogram's cost is per lane, masked or not); COMPACT: scratch (n values of row's type)
    holds the values left after a pass that keeps at most half."""
    NB: tl.constexpr = 1 << RADIX
    bins = tl.arange(0, NB)
    k_rem = k
    prefix = 0  # the chosen digits of the unsigned key
    src = row
    m = n  # values in src
    for d in tl.static_range(32 // RADIX):
        if m > BLOCK:
            hist = _hist_pass(src, m, prefix, d, RADIX, BLOCK)
        elif m > SBLOCK:
            hist = _hist_pass(src, m, prefix, d, RADIX, CBLOCK)
        else:
            hist = _hist_pass(src, m, prefix, d, RADIX, SBLOCK)
        ge = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # how many have this digit or a larger one
        b = tl.max(tl.where(ge >= k_rem, bins, 0), 0)
        k_rem -= tl.sum(tl.where(bins > b, hist, 0), 0)
        prefix = (prefix << RADIX) | b
        if COMPACT and d < 32 // RADIX - 1:
            kept = tl.sum(tl.where(bins == b, hist, 0), 0)
            if (m > SBLOCK) & (kept * 2 <= m):
                m = _compact(src, m, scratch, prefix, RADIX * (d + 1), CBLOCK)
                src = scratch
    return prefix ^ SIGN, k_rem


@triton.jit
def topk_kernel(X, OUT, VALS, LENS, TABLE, ROW_TO_BATCH, OFFSETS, SCRATCH, stride_x, stride_o, stride_t, width, K,
                MODE: tl.constexpr, BLOCK: tl.constexpr, WBLOCK: tl.constexpr, RADIX: tl.constexpr = 8,
                COMPACT: tl.constexpr = False, SBLOCK: tl.constexpr = 1024):
    """Row r of X [rows, width]: its top-K positions among its first n (n = width, or LENS[r] clamped to
    0..width), in position order, into OUT[r, :K]:
    MODE 0: the positions (int64), and their values into VALS [rows, K];
    MODE 1: TABLE[b, position] with b = ROW_TO_BATCH[r] (or r when ROW_TO_BATCH is None), int32;
    MODE 2: OFFSETS[r] + position, int32.
    A row with n <= K keeps all n positions in order, and MODES 1 / 2 fill its slots past n with -1. BLOCK: the
    elements of a radix pass's step over the row, WBLOCK: of the writing pass's and the compactions' (their prefix
    sums take more registers), SBLOCK: of a pass's one step over a few values; RADIX, COMPACT: radix_select's,
    SCRATCH [rows, width] of X's type (COMPACT)."""
    r = tl.program_id(0).to(tl.int64)
    row = X + r * stride_x
    out = OUT + r * stride_o
    if MODE == 0:
        n = width
    else:
        n = tl.minimum(tl.maximum(tl.load(LENS + r), 0), width).to(tl.int32)
    if MODE == 1:
        if ROW_TO_BATCH is None:
            b = r
        else:
            b = tl.load(ROW_TO_BATCH + r).to(tl.int64)
        table = TABLE + b * stride_t
    if MODE == 2:
        off = tl.load(OFFSETS + r)
    if n <= K:  # (every position, in order; -1 past n)
        for s0 in range(0, K, WBLOCK):
            offs = s0 + tl.arange(0, WBLOCK)
            keep = offs < n
            if MODE == 0:
                tl.store(out + offs, offs.to(tl.int64), mask=keep)
                tl.store(VALS + r * stride_o + offs, tl.load(row + offs, mask=keep), mask=keep)
            elif MODE == 1:
                entry = tl.load(table + offs, mask=keep, other=-1)
                tl.store(out + offs, tl.where(keep, entry, -1).to(tl.int32), mask=offs < K)
            else:
                tl.store(out + offs, tl.where(keep, off + offs, -1), mask=offs < K)
    else:
        if COMPACT:
            scratch = SCRATCH + r * width
        else:
            scratch = row
        thr, need_eq = radix_select(row, n, K, scratch, RADIX, COMPACT, BLOCK, WBLOCK, SBLOCK)
        base = 0  # output slots filled so far
        eq_seen = 0  # values equal to the threshold seen so far
        for s in range(0, n, WBLOCK):
            offs = s + tl.arange(0, WBLOCK)
            m = offs < n
            x = tl.load(row + offs, mask=m, other=0.0)
            key = order_key(x.to(tl.float32))
            eq = (m & (key == thr)).to(tl.int32)
            eq_rank = eq_seen + tl.cumsum(eq, 0) - eq
            sel = (m & (key > thr)) | ((eq != 0) & (eq_rank < need_eq))
            si = sel.to(tl.int32)
            pos = base + tl.cumsum(si, 0) - si
            if MODE == 0:
                tl.store(out + pos, offs.to(tl.int64), mask=sel)
                tl.store(VALS + r * stride_o + pos, x, mask=sel)
            elif MODE == 1:
                tl.store(out + pos, tl.load(table + offs, mask=sel).to(tl.int32), mask=sel)
            else:
                tl.store(out + pos, off + offs, mask=sel)
            base += tl.sum(si, 0)
            eq_seen += tl.sum(eq, 0)
