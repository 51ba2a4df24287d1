"""Sorting-free sampling (FlashInfer's rejection scheme), one program per row.

Each round draws a token by inverse CDF from the probabilities above a pivot ``low``, then
checks it against the filter (top-k: fewer than k tokens are more likely; top-p: the mass
of more likely tokens is below p; min-p: p_x >= min_p * max p). A rejected token raises the
pivot, which removes it and every less likely token; the loop ends at the first accepted
token. Nothing is sorted and every pass is a streaming read of the row.

Top-k thresholds (top_k_renorm_probs, top_k_mask_logits) are found by a radix select on
order-preserving integer keys: four histogram passes of 8 bits each give the exact k-th
largest value.
"""
import triton
import triton.language as tl


@triton.jit
def _keep(cnt, mass, v, k, top_p, row_total, min_keep, FILTER: tl.constexpr):
    """Would a token of probability v pass the filter, given cnt / mass of the tokens above it?"""
    ok = v == v
    if FILTER == 1 or FILTER == 4:
        ok = ok & (cnt < k)
    if FILTER == 2 or FILTER == 4:
        ok = ok & (mass < top_p * row_total)
    if FILTER == 3:
        ok = ok & (v >= min_keep)
    return ok


@triton.jit
def sample_kernel(P, OUT, TOP_K, TOP_P, MIN_P, k_val, p_val, m_val, stride_p, vocab, seed, offset,
                  FILTER: tl.constexpr, K_ROWS: tl.constexpr, P_ROWS: tl.constexpr, M_ROWS: tl.constexpr,
                  BLOCK: tl.constexpr):
    """FILTER: 0 none, 1 top-k, 2 top-p, 3 min-p, 4 top-k and top-p. A parameter is a per-row
    tensor when its *_ROWS flag is set, else the scalar *_val. Probabilities need not sum to 1.
    A row with NaN, negative or infinite probabilities, no mass, or a parameter out of range
    gets -1.

    Rounds (dual pivot, as FlashInfer): draw x among the tokens above ``low`` by inverse CDF;
    accept it if it passes the filter. Otherwise a second pivot halfway between p_x and an
    upper bound of the threshold is tested in the same pass: the threshold lies above p_x, and
    either above the second pivot (low jumps there) or below it (it becomes the upper bound),
    so the candidate interval at least halves every round. The mass above the new ``low`` comes
    out of the same pass, so a round is 1.5 streaming reads of the row on average."""
    r = tl.program_id(0)
    row = P + r.to(tl.int64) * stride_p
    k = tl.load(TOP_K + r) if K_ROWS else k_val
    top_p = tl.load(TOP_P + r) if P_ROWS else p_val
    min_p = tl.load(MIN_P + r) if M_ROWS else m_val
    # pass 0: total mass, largest probability, validity
    acc = tl.zeros([BLOCK], tl.float32)
    mx = tl.zeros([BLOCK], tl.float32)
    bad = tl.zeros([BLOCK], tl.int32)
    for s in range(0, vocab, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        p = tl.load(row + offs, mask=offs < vocab, other=0.0).to(tl.float32)
        acc += p
        mx = tl.maximum(mx, p)
        bad |= ((p != p) | (p < 0.0)).to(tl.int32)
    row_total = tl.sum(acc, 0)
    high = tl.max(mx, 0)
    invalid = (tl.max(bad, 0) > 0) | (row_total <= 0.0) | (row_total == float("inf"))
    if FILTER == 1 or FILTER == 4:
        invalid = invalid | (k < 1)
    if FILTER == 2 or FILTER == 4:
        invalid = invalid | (top_p <= 0.0) | (top_p > 1.0) | (top_p != top_p)
    if FILTER == 3:
        invalid = invalid | (min_p < 0.0) | (min_p > 1.0) | (min_p != min_p)
    low = -1.0  # candidates have p > low (and p >= floor)
    total = row_total  # their mass
    floor = 0.0
    if FILTER == 3:  # min-p knows its threshold: one draw among p >= min_p * max p
        floor = min_p * high
        acc = tl.zeros([BLOCK], tl.float32)
        for s in range(0, vocab, BLOCK):
            offs = s + tl.arange(0, BLOCK)
            p = tl.load(row + offs, mask=offs < vocab, other=0.0).to(tl.float32)
            acc += tl.where(p >= floor, p, 0.0)
        total = tl.sum(acc, 0)
    result = -1
    done = invalid
    rnd = 0
    while not done:
        target = tl.rand(seed, offset + r * 1024 + rnd) * total
        # inverse CDF, stopping at the block that holds the draw
        prefix = 0.0
        x = -1
        last = 0
        s = 0
        while (s < vocab) & (x < 0):
            offs = s + tl.arange(0, BLOCK)
            p = tl.load(row + offs, mask=offs < vocab, other=0.0).to(tl.float32)
            pm = tl.where((p > low) & (p >= floor), p, 0.0)
            csum = prefix + tl.cumsum(pm, 0)
            hit = (csum > target) & (pm > 0)
            xi = tl.min(tl.where(hit, offs, vocab), 0)
            x = tl.where(xi < vocab, xi, -1)
            last = tl.maximum(last, tl.max(tl.where(pm > 0, offs, 0), 0))
            prefix += tl.sum(pm, 0)
            s += BLOCK
        x = tl.where(x >= 0, x, last)  # rounding carried the draw past the end: last candidate
        p0 = tl.load(row + x).to(tl.float32)
        p1 = (p0 + high) * 0.5
        cnt0 = 0
        cnt1 = 0
        mass0 = 0.0
        mass1 = 0.0
        if FILTER == 1 or FILTER == 2 or FILTER == 4:
            c0 = tl.zeros([BLOCK], tl.int32)
            c1 = tl.zeros([BLOCK], tl.int32)
            m0 = tl.zeros([BLOCK], tl.float32)
            m1 = tl.zeros([BLOCK], tl.float32)
            for s2 in range(0, vocab, BLOCK):
                offs = s2 + tl.arange(0, BLOCK)
                p = tl.load(row + offs, mask=offs < vocab, other=0.0).to(tl.float32)
                g0 = p > p0
                g1 = p > p1
                c0 += g0.to(tl.int32)
                c1 += g1.to(tl.int32)
                m0 += tl.where(g0, p, 0.0)
                m1 += tl.where(g1, p, 0.0)
            cnt0 = tl.sum(c0, 0)
            cnt1 = tl.sum(c1, 0)
            mass0 = tl.sum(m0, 0)
            mass1 = tl.sum(m1, 0)
        ok0 = _keep(cnt0, mass0, p0, k, top_p, row_total, floor, FILTER)
        ok1 = _keep(cnt1, mass1, p1, k, top_p, row_total, floor, FILTER)
        result = tl.where(ok0, x, -1)
        done = ok0
        # the threshold lies in (p0, p1] when p1 passes, above p1 otherwise
        low = tl.where(ok1, p0, p1)
        total = tl.where(ok1, mass0, mass1)
        high = tl.where(ok1, p1, high)
        rnd += 1
    tl.store(OUT + r, result)


@triton.jit
def order_key(x):
    """int32 keys that order like the float32 values (negative floats flip)."""
    b = x.to(tl.int32, bitcast=True)
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF)


@triton.jit
def kth_largest(row, vocab, k, BLOCK: tl.constexpr):
    """(order key of the k-th largest of row[:vocab], how many of the values with that key are among the k largest)
    (k clamped to 1..vocab): radix select, most significant byte first; each pass histograms the next byte of the
    keys that share the bytes chosen so far."""
    k_rem = tl.minimum(tl.maximum(k, 1), vocab)
    prefix = 0  # raw bits of the chosen bytes
    bins = tl.arange(0, 256)
    for d in tl.static_range(4):
        hist = tl.zeros([256], tl.int32)
        for s in range(0, vocab, BLOCK):
            offs = s + tl.arange(0, BLOCK)
            m = offs < vocab
            key = order_key(tl.load(row + offs, mask=m, other=0.0).to(tl.float32))
            digit = (key >> (24 - 8 * d)) & 0xFF
            if d == 0:
                digit = digit ^ 0x80  # the sign byte: flip so that unsigned digit order is key order
            else:
                m = m & (((key >> (32 - 8 * d)) & ((1 << (8 * d)) - 1)) == prefix)
            hist += tl.histogram(digit, 256, mask=m)
        ge = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # how many have this byte or a larger one
        b = tl.max(tl.where(ge >= k_rem, bins, 0), 0)
        k_rem -= tl.sum(tl.where(bins > b, hist, 0), 0)
        if d == 0:
            b = b ^ 0x80
        prefix = (prefix << 8) | b
    return prefix, k_rem


@triton.jit
def filter_kernel(X, Y, TOP_K, TOP_P, k_val, p_val, stride_x, stride_y, vocab, MODE: tl.constexpr,
                  K_ROWS: tl.constexpr, P_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """MODE 0: top-k renorm of probs; 1: top-p renorm of probs; 2: top-k mask of logits (others
    -> -inf). Top-k: exact threshold by radix select; top-p: bisection on the order keys. Ties
    with the threshold value are kept. A row whose parameter is out of range is written as NaN."""
    r = tl.program_id(0)
    row = X + r.to(tl.int64) * stride_x
    out = Y + r.to(tl.int64) * stride_y
    invalid = r < 0
    if MODE == 1:
        top_p = tl.load(TOP_P + r) if P_ROWS else p_val
        invalid = (top_p <= 0.0) | (top_p > 1.0) | (top_p != top_p)
        kmin = tl.full([BLOCK], 2147483647, tl.int32)
        kmax = tl.full([BLOCK], -2147483648, tl.int32)
        tot = tl.zeros([BLOCK], tl.float32)
        for s in range(0, vocab, BLOCK):
            offs = s + tl.arange(0, BLOCK)
            m = offs < vocab
            x = tl.load(row + offs, mask=m, other=0.0).to(tl.float32)
            key = order_key(x)
            kmin = tl.where(m, tl.minimum(kmin, key), kmin)
            kmax = tl.where(m, tl.maximum(kmax, key), kmax)
            tot += tl.where(m, x, 0.0)
        lo = tl.min(kmin, 0).to(tl.int64)  # invariant: the kept set of lo holds mass >= need
        hi = tl.max(kmax, 0).to(tl.int64) + 1
        need = top_p * tl.sum(tot, 0)
        if top_p >= 1.0:
            hi = lo + 1  # keep everything (rounding must not drop the tail)
        while hi - lo > 1:
            mid = lo + (hi - lo) // 2
            mass = tl.zeros([BLOCK], tl.float32)
            for s in range(0, vocab, BLOCK):
                offs = s + tl.arange(0, BLOCK)
                m = offs < vocab
                x = tl.load(row + offs, mask=m, other=0.0).to(tl.float32)
                mass += tl.where(m & (order_key(x).to(tl.int64) >= mid), x, 0.0)
            ok = tl.sum(mass, 0) >= need
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid)
        thr = lo.to(tl.int32)
    else:
        k = tl.load(TOP_K + r) if K_ROWS else k_val
        invalid = k < 1
        thr, _ = kth_largest(row, vocab, k, BLOCK)
    denom = 1.0
    if MODE != 2:
        kept = tl.zeros([BLOCK], tl.float32)
        for s in range(0, vocab, BLOCK):
            offs = s + tl.arange(0, BLOCK)
            m = offs < vocab
            x = tl.load(row + offs, mask=m, other=0.0).to(tl.float32)
            kept += tl.where(m & (order_key(x) >= thr), x, 0.0)
        denom = tl.sum(kept, 0)
    for s in range(0, vocab, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        m = offs < vocab
        x = tl.load(row + offs, mask=m, other=0.0).to(tl.float32)
        keep = order_key(x) >= thr
        if MODE == 2:
            y = tl.where(keep, x, float("-inf"))
        else:
            y = tl.where(keep, x / denom, 0.0)
        y = tl.where(invalid, float("nan"), y)
        tl.store(out + offs, y.to(Y.dtype.element_ty), mask=m)


@triton.jit
def greedy_kernel(X, OUT, KEYS, COUNT, stride_x, vocab, span, BLOCK: tl.constexpr, NEXT=None):
    """Argmax of each row of X (first index of the maximum, as torch.argmax), -1 for a row holding a NaN or
    an infinity, in one launch: program (r, c) scans columns c * span .. (c + 1) * span of row r and folds
    its best (value, index) into KEYS[r] with one atomic max (a 64-bit key that orders by value, then by
    smaller index; the largest int64, above every finite value's key, for a program that saw a NaN or an
    infinity); the last program of the row writes OUT[r] and resets KEYS / COUNT for the next launch
    (CUDA-graph safe; not for concurrent launches on several streams). NEXT: also the index, -1 read as 0,
    into NEXT[r] (in NEXT's dtype: the next decode step's input id). The max and the last program's exchange
    are relaxed: the count's acq_rel bump orders them (a program's max before its bump, the last program's
    exchange after it). (Session 20: three fenced atomics a program and three exchanges at the end took
    9.2 us for a 128k vocabulary at batch 1 in the engine's profile.)"""
    r = tl.program_id(0)
    c = tl.program_id(1)
    row = X + r.to(tl.int64) * stride_x
    best = tl.full([BLOCK], -9223372036854775808, tl.int64)
    bad = tl.zeros([BLOCK], tl.int32)
    for s in range(c * span, tl.minimum((c + 1) * span, vocab), BLOCK):
        offs = s + tl.arange(0, BLOCK)
        m = offs < vocab
        x = tl.load(row + offs, mask=m, other=0.0).to(tl.float32)
        bad = tl.maximum(bad, (m & ~(tl.abs(x) < float("inf"))).to(tl.int32))
        x = tl.where(x == 0.0, 0.0, x)  # -0.0 ties with +0.0, as in torch.argmax (their keys differ)
        key = order_key(x).to(tl.int64) * 4294967296 + (2147483647 - offs).to(tl.int64)
        best = tl.maximum(best, tl.where(m, key, -9223372036854775808))
    # (a finite float's key is at most 0x7F7FFFFF in the high word: below the largest int64)
    mine = tl.where(tl.max(bad, 0) > 0, 9223372036854775807, tl.max(best, 0))
    tl.atomic_max(KEYS + r, mine, sem="relaxed")
    if tl.atomic_add(COUNT + r, 1) == tl.num_programs(1) - 1:  # acq_rel: the others' maxima are visible
        key = tl.atomic_xchg(KEYS + r, -9223372036854775808, sem="relaxed")
        tl.store(COUNT + r, 0)  # (every program of the row has counted: no one else touches it this launch)
        b = key == 9223372036854775807
        idx = 2147483647 - (key & 4294967295)
        tl.store(OUT + r, tl.where(b, -1, idx))
        if NEXT is not None:
            tl.store(NEXT + r, tl.where(b, 0, idx).to(NEXT.dtype.element_ty))
