"""Top-k selection by radix select (ops/topk.py's top_k and sparse-attention transforms): topk_kernel, one program a
row; the split kernels further down, a few wide rows each over several programs.

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
def _hist_pass(src, m, prefix, d: tl.constexpr, RADIX: tl.constexpr, BLOCK: tl.constexpr, ABOVE: tl.constexpr = False):
    """(histogram of digit d (RADIX bits, most significant first) of the unsigned order keys of src[:m] whose higher
    digits equal prefix, ABOVE: how many keys' higher digits are above prefix (else 0))."""
    NB: tl.constexpr = 1 << RADIX
    SHIFT: tl.constexpr = 32 - RADIX * (d + 1)
    hist = tl.zeros([NB], tl.int32)
    above = tl.zeros([BLOCK], tl.int32)
    for s in range(0, m, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        msk = offs < m
        u = order_key(tl.load(src + offs, mask=msk, other=0.0).to(tl.float32)) ^ SIGN
        if d > 0:
            high = (u >> (SHIFT + RADIX)) & ((1 << (RADIX * d)) - 1)
            if ABOVE:
                above += (msk & (high > prefix)).to(tl.int32)
            msk = msk & (high == prefix)
        hist += tl.histogram((u >> SHIFT) & (NB - 1), NB, mask=msk)
    return hist, tl.sum(above, 0)


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
def _choose(hist, k_rem, prefix, RADIX: tl.constexpr):
    """The digit of the k_rem-th largest key given its digit's histogram: (digit, k_rem within it, prefix with it)."""
    bins = tl.arange(0, 1 << RADIX)
    ge = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # how many have this digit or a larger one
    b = tl.max(tl.where(ge >= k_rem, bins, 0), 0)
    k_rem -= tl.sum(tl.where(bins > b, hist, 0), 0)
    return b, k_rem, (prefix << RADIX) | b


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
            hist, _ = _hist_pass(src, m, prefix, d, RADIX, BLOCK)
        elif m > SBLOCK:
            hist, _ = _hist_pass(src, m, prefix, d, RADIX, CBLOCK)
        else:
            hist, _ = _hist_pass(src, m, prefix, d, RADIX, SBLOCK)
        b, k_rem, prefix = _choose(hist, k_rem, prefix, RADIX)
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
    row, out, vals, n, table, off = _row(X, OUT, VALS, LENS, TABLE, ROW_TO_BATCH, OFFSETS, r, stride_x, stride_o,
                                         stride_t, width, MODE)
    if n <= K:  # (every position, in order; -1 past n)
        _write_all(row, out, vals, table, off, n, K, 0, K, MODE, WBLOCK)
    else:
        if COMPACT:
            scratch = SCRATCH + r * width
        else:
            scratch = row
        thr, need_eq = radix_select(row, n, K, scratch, RADIX, COMPACT, BLOCK, WBLOCK, SBLOCK)
        _write_selected(row, out, vals, table, off, thr, need_eq, 0, n, 0, 0, MODE, WBLOCK)


@triton.jit
def _row(X, OUT, VALS, LENS, TABLE, ROW_TO_BATCH, OFFSETS, r, stride_x, stride_o, stride_t, width,
         MODE: tl.constexpr):
    """Row r's scores, output and values rows, length n, page-table row (MODE 1) and offset (MODE 2)."""
    row = X + r * stride_x
    out = OUT + r * stride_o
    vals = out
    table = out
    off = 0
    if MODE == 0:
        n = width
        vals = VALS + r * stride_o
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
    return row, out, vals, n, table, off


@triton.jit
def _write_all(row, out, vals, table, off, n, K, lo, hi, MODE: tl.constexpr, WBLOCK: tl.constexpr):
    """Output slots [lo, hi) of a row with n <= K: slot i holds position i (-1 at or past n, MODES 1 / 2)."""
    for s0 in range(lo, hi, WBLOCK):
        offs = s0 + tl.arange(0, WBLOCK)
        keep = (offs < n) & (offs < hi)
        if MODE == 0:
            tl.store(out + offs, offs.to(tl.int64), mask=keep)
            tl.store(vals + offs, tl.load(row + offs, mask=keep), mask=keep)
        elif MODE == 1:
            entry = tl.load(table + offs, mask=keep, other=-1)
            tl.store(out + offs, tl.where(keep, entry, -1).to(tl.int32), mask=(offs < K) & (offs < hi))
        else:
            tl.store(out + offs, tl.where(keep, off + offs, -1), mask=(offs < K) & (offs < hi))


@triton.jit
def _write_selected(row, out, vals, table, off, thr, need_eq, lo, hi, base, eq_seen, MODE: tl.constexpr,
                    WBLOCK: tl.constexpr):
    """The positions in [lo, hi) of the values whose order key is above thr, and of those equal to it while fewer
    than need_eq have been taken, into output slots from base on, in position order; eq_seen: the values equal to
    thr before lo."""
    base = tl.zeros([], tl.int32) + base  # (loop-carried: a tensor where the caller passes 0)
    eq_seen = tl.zeros([], tl.int32) + eq_seen
    for s in range(lo, hi, WBLOCK):
        offs = s + tl.arange(0, WBLOCK)
        m = offs < hi
        x = tl.load(row + offs, mask=m, other=0.0)
        key = order_key(x.to(tl.float32))
        eq = (m & (key == thr)).to(tl.int32)
        eq_rank = eq_seen + tl.cumsum(eq, 0) - eq
        sel = (m & (key > thr)) | ((eq != 0) & (eq_rank < need_eq))
        si = sel.to(tl.int32)
        pos = base + tl.cumsum(si, 0) - si
        if MODE == 0:
            tl.store(out + pos, offs.to(tl.int64), mask=sel)
            tl.store(vals + pos, x, mask=sel)
        elif MODE == 1:
            tl.store(out + pos, tl.load(table + offs, mask=sel).to(tl.int32), mask=sel)
        else:
            tl.store(out + pos, off + offs, mask=sel)
        base += tl.sum(si, 0)
        eq_seen += tl.sum(eq, 0)


# Rows split over several programs (few rows, long ones: one program a row leaves SMs idle). One launch a digit:
# each program histograms its slice's digit among the keys sharing the digits chosen so far (every program replays
# the choices from the row's histograms of the earlier digits) and adds its histogram into the row's; the last one
# also keeps each slice's counts (values above the chosen digits so far, and by last digit), from which a writing
# launch gives each slice the output slots the slices before it fill.

@triton.jit
def _replay(HIST, r, D: tl.constexpr, K, RADIX: tl.constexpr):
    """(prefix, k_rem) after row r's digits 0..D-1, from its histograms HIST [rows, 32 / RADIX, 2^RADIX]."""
    NB: tl.constexpr = 1 << RADIX
    ND: tl.constexpr = 32 // RADIX
    k_rem = K
    prefix = 0
    for d in tl.static_range(D):
        hist = tl.load(HIST + (r * ND + d) * NB + tl.arange(0, NB))
        _, k_rem, prefix = _choose(hist, k_rem, prefix, RADIX)
    return prefix, k_rem


@triton.jit
def split_hist_kernel(X, LENS, HIST, PART, stride_x, width, K, S, D: tl.constexpr, HAS_LENS: tl.constexpr,
                      RADIX: tl.constexpr, BLOCK: tl.constexpr):
    """Program (r, p): digit D's histogram of row r's values [p S, p S + S) among its first n, added into HIST[r, D]
    (rows with n <= K are left to the writing launch). The last digit's launch also writes PART[r, p] [2^RADIX + 2]:
    how many of the slice's keys are above the chosen digits so far, then for each last digit d how many of those
    sharing them have a last digit >= d (0 past the last)."""
    NB: tl.constexpr = 1 << RADIX
    ND: tl.constexpr = 32 // RADIX
    r = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    lo = p * S
    n = width
    if HAS_LENS:
        n = tl.minimum(tl.maximum(tl.load(LENS + r), 0), width).to(tl.int32)
    if n > K:
        prefix, k_rem = _replay(HIST, r, D, K, RADIX)
        src = X + r * stride_x + lo
        m = tl.minimum(tl.maximum(n - lo, 0), S)
        bins = tl.arange(0, NB)
        h, above = _hist_pass(src, m, prefix, D, RADIX, BLOCK, D == ND - 1)
        if D == ND - 1:
            part = PART + (r * tl.num_programs(1) + p) * (NB + 2)
            tl.store(part, above)
            tl.store(part + 1 + bins, tl.sum(h, 0) - tl.cumsum(h, 0) + h)  # (digit >= d)
            tl.store(part + 1 + NB, 0)
        tl.atomic_add(HIST + (r * ND + D) * NB + bins, h, mask=h > 0, sem="relaxed")


@triton.jit
def split_write_kernel(X, OUT, VALS, LENS, TABLE, ROW_TO_BATCH, OFFSETS, HIST, PART, stride_x, stride_o, stride_t,
                       width, K, S, SK, MODE: tl.constexpr, RADIX: tl.constexpr, WBLOCK: tl.constexpr,
                       PBLOCK: tl.constexpr):
    """Program (r, p) writes row r's output as topk_kernel does: a row with n > K its slice [p S, p S + S)'s
    selected positions, from the slots the slices before it fill (split_hist_kernel's PART counts; the values equal
    to the k-th largest taken in position order); a row with n <= K its slots [p SK, p SK + SK)."""
    r = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    row, out, vals, n, table, off = _row(X, OUT, VALS, LENS, TABLE, ROW_TO_BATCH, OFFSETS, r, stride_x, stride_o,
                                         stride_t, width, MODE)
    if n <= K:
        _write_all(row, out, vals, table, off, n, K, p * SK, tl.minimum(p * SK + SK, K), MODE, WBLOCK)
    else:
        prefix, need_eq = _replay(HIST, r, 32 // RADIX, K, RADIX)
        b = prefix & ((1 << RADIX) - 1)  # (the last digit)
        q = tl.arange(0, PBLOCK)
        before = q < p
        part = PART + (r * tl.num_programs(1) + q) * ((1 << RADIX) + 2)
        ge_b = tl.load(part + 1 + b, mask=before, other=0)  # (the slices' counts sharing the first digits, last >= b)
        gt_b = tl.load(part + 2 + b, mask=before, other=0)
        gt_before = tl.sum(tl.load(part, mask=before, other=0) + gt_b, 0)
        eq_before = tl.sum(ge_b - gt_b, 0)
        base = gt_before + tl.minimum(eq_before, need_eq)
        lo = p * S
        _write_selected(row, out, vals, table, off, prefix ^ SIGN, need_eq, lo, tl.minimum(lo + S, n), base,
                        eq_before, MODE, WBLOCK)
