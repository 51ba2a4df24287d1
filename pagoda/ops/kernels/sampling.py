"""Sorting-free sampling (FlashInfer's rejection scheme), one program per row.

Each round draws a token by inverse CDF from the probabilities above a pivot ``low``, then
checks it against the filter (top-k: fewer than k tokens are more likely; top-p: the mass
of more likely tokens is below p; min-p: p_x >= min_p * max p). A rejected token becomes the
new pivot, which removes it and every less likely token; the loop ends at the first accepted
token. Nothing is sorted and every pass is a streaming read of the row.
"""
import triton
import triton.language as tl


@triton.jit
def _row_max(row, vocab, BLOCK: tl.constexpr):
    m = tl.zeros([BLOCK], tl.float32)
    for s in range(0, vocab, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        m = tl.maximum(m, tl.load(row + offs, mask=offs < vocab, other=0.0).to(tl.float32))
    return tl.max(m, 0)


@triton.jit
def sample_kernel(P, OUT, TOP_K, TOP_P, MIN_P, stride_p, vocab, seed, offset,
                  FILTER: tl.constexpr, BLOCK: tl.constexpr):
    """FILTER: 0 none, 1 top-k, 2 top-p, 3 min-p, 4 top-k and top-p. TOP_K/TOP_P/MIN_P are
    per-row tensors. Probabilities need not sum to 1 (they are renormalized implicitly)."""
    r = tl.program_id(0)
    row = P + r.to(tl.int64) * stride_p
    k = tl.load(TOP_K + r) if FILTER == 1 or FILTER == 4 else 0
    top_p = tl.load(TOP_P + r) if FILTER == 2 or FILTER == 4 else 1.0
    min_keep = 0.0
    if FILTER == 3:
        min_keep = tl.load(MIN_P + r) * _row_max(row, vocab, BLOCK)
    row_total = 0.0
    if FILTER == 2 or FILTER == 4:
        acc = tl.zeros([BLOCK], tl.float32)
        for s in range(0, vocab, BLOCK):
            offs = s + tl.arange(0, BLOCK)
            acc += tl.load(row + offs, mask=offs < vocab, other=0.0).to(tl.float32)
        row_total = tl.sum(acc, 0)
    low = -1.0  # pivot: candidates have p > low (p >= 0 always)
    result = -1
    rnd = 0
    while result < 0:
        # pass 1: mass above the pivot
        tot = tl.zeros([BLOCK], tl.float32)
        for s in range(0, vocab, BLOCK):
            offs = s + tl.arange(0, BLOCK)
            p = tl.load(row + offs, mask=offs < vocab, other=0.0).to(tl.float32)
            tot += tl.where(p > low, p, 0.0)
        total = tl.sum(tot, 0)
        u = tl.rand(seed, offset + r * 1024 + rnd)
        target = u * total
        # pass 2: the first token whose running mass reaches the target
        prefix = 0.0
        x = vocab
        last = 0
        for s in range(0, vocab, BLOCK):
            offs = s + tl.arange(0, BLOCK)
            p = tl.load(row + offs, mask=offs < vocab, other=0.0).to(tl.float32)
            pm = tl.where(p > low, p, 0.0)
            csum = prefix + tl.cumsum(pm, 0)
            hit = (csum > target) & (pm > 0)
            x = tl.minimum(x, tl.min(tl.where(hit, offs, vocab), 0))
            last = tl.maximum(last, tl.max(tl.where(pm > 0, offs, 0), 0))
            prefix += tl.sum(pm, 0)
        x = tl.where(x < vocab, x, last)  # rounding left the target past the end: last candidate
        px = tl.load(row + x).to(tl.float32)
        # pass 3: how many tokens, and how much mass, are more likely than x
        cnt = tl.zeros([BLOCK], tl.int32)
        mass = tl.zeros([BLOCK], tl.float32)
        for s in range(0, vocab, BLOCK):
            offs = s + tl.arange(0, BLOCK)
            p = tl.load(row + offs, mask=offs < vocab, other=0.0).to(tl.float32)
            gt = p > px
            cnt += gt.to(tl.int32)
            mass += tl.where(gt, p, 0.0)
        ok = True
        if FILTER == 1 or FILTER == 4:
            ok = ok & (tl.sum(cnt, 0) < k)
        if FILTER == 2 or FILTER == 4:
            ok = ok & (tl.sum(mass, 0) < top_p * row_total)
        if FILTER == 3:
            ok = ok & (px >= min_keep)
        result = tl.where(ok, x, -1)
        low = px
        rnd += 1
    tl.store(OUT + r, result)


@triton.jit
def _order_key(x):
    """int32 keys that order like the float32 values (negative floats flip)."""
    b = x.to(tl.int32, bitcast=True)
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF)


@triton.jit
def filter_kernel(X, Y, TOP_K, TOP_P, stride_x, stride_y, vocab, MODE: tl.constexpr, BLOCK: tl.constexpr):
    """Exact top-k / top-p threshold by bisection on the values' order keys (no sort), then one
    writing pass. MODE 0: top-k renorm of probs; 1: top-p renorm of probs; 2: top-k mask of logits
    (others -> -inf). Ties with the threshold value are kept."""
    r = tl.program_id(0)
    row = X + r.to(tl.int64) * stride_x
    out = Y + r.to(tl.int64) * stride_y
    kmin = tl.full([BLOCK], 2147483647, tl.int32)
    kmax = tl.full([BLOCK], -2147483648, tl.int32)
    tot = tl.zeros([BLOCK], tl.float32)
    for s in range(0, vocab, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        m = offs < vocab
        x = tl.load(row + offs, mask=m, other=0.0).to(tl.float32)
        key = _order_key(x)
        kmin = tl.where(m, tl.minimum(kmin, key), kmin)
        kmax = tl.where(m, tl.maximum(kmax, key), kmax)
        tot += tl.where(m, x, 0.0)
    total = tl.sum(tot, 0)
    lo = tl.min(kmin, 0).to(tl.int64)  # invariant: the kept set of lo satisfies the filter's need
    hi = tl.max(kmax, 0).to(tl.int64) + 1
    if MODE == 1:
        need = tl.load(TOP_P + r) * total
        if tl.load(TOP_P + r) >= 1.0:
            hi = lo + 1  # keep everything (rounding must not drop the tail)
    else:
        k = tl.load(TOP_K + r)
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        cnt = tl.zeros([BLOCK], tl.int32)
        mass = tl.zeros([BLOCK], tl.float32)
        for s in range(0, vocab, BLOCK):
            offs = s + tl.arange(0, BLOCK)
            m = offs < vocab
            x = tl.load(row + offs, mask=m, other=0.0).to(tl.float32)
            ge = m & (_order_key(x).to(tl.int64) >= mid)
            cnt += ge.to(tl.int32)
            mass += tl.where(ge, x, 0.0)
        if MODE == 1:
            ok = tl.sum(mass, 0) >= need
        else:
            ok = tl.sum(cnt, 0) >= k
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
    kept = tl.zeros([BLOCK], tl.float32)
    for s in range(0, vocab, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        m = offs < vocab
        x = tl.load(row + offs, mask=m, other=0.0).to(tl.float32)
        kept += tl.where(m & (_order_key(x).to(tl.int64) >= lo), x, 0.0)
    denom = tl.sum(kept, 0)
    for s in range(0, vocab, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        m = offs < vocab
        x = tl.load(row + offs, mask=m, other=0.0).to(tl.float32)
        keep = _order_key(x).to(tl.int64) >= lo
        if MODE == 2:
            y = tl.where(keep, x, float("-inf"))
        else:
            y = tl.where(keep, x / denom, 0.0)
        tl.store(out + offs, y.to(Y.dtype.element_ty), mask=m)
