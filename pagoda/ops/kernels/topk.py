"""Top-k selection by radix select, one program per row (ops/topk.py's top_k and sparse-attention transforms).

Four histogram passes over the row's order keys find the k-th largest key and how many of the values equal to it
are among the k largest (kernels/sampling.py's kth_largest, which the top-k sampling filters use); a fifth pass
writes the positions of the values above that key and of the first ones equal to it, in position order, each
program's output slots filled by a running prefix sum. Nothing is sorted: five streaming reads of the row.
"""
import triton
import triton.language as tl

from .sampling import kth_largest, order_key


@triton.jit
def topk_kernel(X, OUT, VALS, LENS, TABLE, ROW_TO_BATCH, OFFSETS, stride_x, stride_o, stride_t, width, K,
                MODE: tl.constexpr, BLOCK: tl.constexpr, WBLOCK: tl.constexpr):
    """Row r of X [rows, width]: its top-K positions among its first n (n = width, or LENS[r] clamped to
    0..width), in position order, into OUT[r, :K]:
    MODE 0: the positions (int64), and their values into VALS [rows, K];
    MODE 1: TABLE[b, position] with b = ROW_TO_BATCH[r] (or r when ROW_TO_BATCH is None), int32;
    MODE 2: OFFSETS[r] + position, int32.
    A row with n <= K keeps all n positions in order, and MODES 1 / 2 fill its slots past n with -1. BLOCK: the
    elements of a radix pass's step, WBLOCK: of the writing pass's (its prefix sums take more registers)."""
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
        thr, need_eq = kth_largest(row, n, K, BLOCK)
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
