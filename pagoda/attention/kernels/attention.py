"""One attention kernel over the BSR description of a batch (DESIGN.md).

A *work item* is one query tile of one request against one contiguous chunk of that
request's KV. The planner writes items as int32 rows of ``WORK_FIELDS`` entries:

    0 q_start    first query token of the tile (row of q / out)
    1 q_len      tokens in the tile (<= BLOCK_M // heads_per_prog)
    2 kv_base    paged: offset of the request's first page in kv_indices;
                 ragged: offset of the request's first token in k / v
    3 kv_start   first KV position (within the request) of the chunk
    4 kv_end     one past the last KV position of the chunk
    5 diag       KV position that query row 0 of the tile aligns with: row t sees
                 kv <= diag + t when causal, kv >= diag + t - window_left with a window
    6 partial    -1: write the tile to out / lse; otherwise the first row of this
                 chunk's partial result in tmp_o / tmp_lse
    7 split      -1, or the index of the tile in SPLITS: (first partial row, chunks)
    8 request    the request the tile belongs to (for variants and custom masks)

Split tiles merge in place: each chunk's program stores its partial state, then bumps
the tile's arrival counter (one per task slot); the program that arrives last merges
the chunks through their LSE, writes out / lse and resets the counter. No second launch.

A task is (item, kv_head, head_split). A persistent grid takes tasks longest first (items
are sorted so): program p starts with task p, then fetches the next from an atomic counter
(greedy longest-processing-time scheduling; no atomic round trip before the first task),
and the last program to finish resets the counters, so ``run()`` is one launch that a
CUDA graph can replay after any new plan.
"""
import triton
import triton.language as tl

from ...ops.kernels.pdl import pdl_enter

WORK_FIELDS = 9
SPLIT_FIELDS = 2
# The plan's int32 buffer (one host-to-device copy per plan): a header of NUM_COUNTERS ints, then the work
# list (WORK points there), the split table, the page ids. Header: 0 next task, 1 programs done, 2 number of
# tasks, 3 where the split table starts, 4 where the page ids start (offsets from the buffer's start, which
# SPLITS and KV_INDICES point at), 5 the task band of the Gluon prefill kernel (prefill_sm90._ws_task; 0 in other
# plans), 6 the programs that take tasks in the Gluon decode kernel (runner.balanced_grid; 0 in other plans), 7
# where MLA's merge list starts, after the split table (kernels/mla.py's mla_combine_kernel; 0 in other plans).
NUM_COUNTERS = 8
SPLITS_AT, INDICES_AT, BAND_AT, ACTIVE_AT, MERGES_AT = 3, 4, 5, 6, 7


@triton.jit
def _tanh(x):
    # tanh from exp2: stable for large |x| and available in every Triton backend.
    e = tl.exp2(-2.8853900817779268 * tl.abs(x))  # exp(-2|x|)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _load_page_index(ptrs, INDEX_ASM: tl.constexpr):
    """Page ids of a block of tokens. On CUDA they are read with a plain (inline PTX) load:
    a tl.load here becomes a cp.async that Triton's pipeliner commits after the K/V copies,
    and waiting for it then waits for every copy in flight (no overlap of loads and math).
    """
    if INDEX_ASM:
        return tl.inline_asm_elementwise("ld.global.nc.b32 $0, [$1];", "=r,l", [ptrs], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:  # the interpreter: callers clamp masked pointers, so a plain load is in bounds
        return tl.load(ptrs)


# Page ids are prefetched this many KV blocks ahead (CUDA). A token-granular cache (page_size 1) has a new
# 128-byte line of ids every 32 tokens, and the plain load above waits for it on the way to each block's
# copies: 64 x 2048 decode ran 1.21x slower than over 16-token pages (1x32768: 1.46x), page order making no
# difference (scripts/page1_probe.py).
PREFETCH_BLOCKS = tl.constexpr(4)


@triton.jit
def _prefetch_page_ids(KV_INDICES, kv_base, start, kv_end, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """Prefetch (into L1) the page ids of the KV block PREFETCH_BLOCKS blocks after ``start``, one request
    per 128-byte line, clamped to the request's last id."""
    LINES: tl.constexpr = max(1, BLOCK_N // (32 * PAGE_SIZE)) if PAGE_SIZE < 32 else 1
    tok = tl.minimum(start + PREFETCH_BLOCKS * BLOCK_N + tl.arange(0, LINES) * (32 * PAGE_SIZE), kv_end - 1)
    tl.inline_asm_elementwise("prefetch.global.L1 [$1];\n\tmov.u32 $0, 0;", "=r,l",
                              [KV_INDICES + kv_base + tok // PAGE_SIZE], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _dequant(x, dtype: tl.constexpr):
    """A K / V tile in the compute dtype (fp8 caches are dequantized here, after the load; their scales are
    folded into qk_scale and the output)."""
    return x.to(dtype)


@triton.jit
def _kv_offsets(KV_INDICES, kv_base, offs_n, n_valid, stride_kp, stride_ks, stride_vp, stride_vs,
                PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr, INDEX_ASM: tl.constexpr, MASKED: tl.constexpr):
    """Element offsets of the K and V rows of KV positions offs_n (paged: through the page table)."""
    if PAGED:
        if MASKED:  # clamp: tokens past the end read the request's first page id (unused)
            page = _load_page_index(KV_INDICES + kv_base + tl.where(n_valid, offs_n, 0) // PAGE_SIZE, INDEX_ASM)
        else:
            page = _load_page_index(KV_INDICES + kv_base + offs_n // PAGE_SIZE, INDEX_ASM)
        page = page.to(tl.int64)
        slot = offs_n % PAGE_SIZE
        k_off = page * stride_kp + slot * stride_ks
        v_off = page * stride_vp + slot * stride_vs
    else:
        tok = (kv_base + offs_n).to(tl.int64)
        k_off = tok * stride_kp
        v_off = tok * stride_vp
    return k_off, v_off


@triton.jit
def _load_item(WORK, item):
    """Work item fields (module docstring): q_start, q_len, kv_base, kv_start, kv_end, diag, partial."""
    wp = WORK + item * 9
    return (wp, tl.load(wp), tl.load(wp + 1), tl.load(wp + 2), tl.load(wp + 3), tl.load(wp + 4), tl.load(wp + 5),
            tl.load(wp + 6))


@triton.jit
def _attend_block(
    q, acc, m_i, l_i, K, V, KV_INDICES, kv_base, start, kv_end, k_head_off, v_head_off,
    stride_kp, stride_ks, stride_vp, stride_vs, qk_scale, soft_cap_log2,
    row_hi, row_lo, offs_d,
    BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr, INDEX_ASM: tl.constexpr,
    SOFTCAP: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
):
    offs_n = start + tl.arange(0, BLOCK_N)
    n_valid = offs_n < kv_end  # (unused, and removed by the compiler, in unmasked blocks)
    if PAGED and INDEX_ASM and PAGE_SIZE < BLOCK_N:
        _prefetch_page_ids(KV_INDICES, kv_base, start, kv_end, BLOCK_N, PAGE_SIZE)
    k_off, v_off = _kv_offsets(KV_INDICES, kv_base, offs_n, n_valid, stride_kp, stride_ks, stride_vp, stride_vs,
                               PAGE_SIZE, PAGED, INDEX_ASM, MASKED)
    k_ptrs = K + k_head_off + k_off[:, None] + offs_d[None, :]
    v_ptrs = V + v_head_off + v_off[:, None] + offs_d[None, :]
    if MASKED:
        k = tl.load(k_ptrs, mask=n_valid[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
    # fp8 caches dequantize here, after the load (the scale is folded into qk_scale / the output)
    s = tl.dot(q, tl.trans(_dequant(k, q.dtype)))
    if SOFTCAP:
        s = soft_cap_log2 * _tanh(s * qk_scale)
        scale = 1.0
    else:  # the scale is folded into the exponent below (one FMA per score)
        scale = qk_scale
    if MASKED:
        keep = n_valid[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= row_hi[:, None])
        if WINDOW:
            keep = keep & (offs_n[None, :] >= row_lo[:, None])
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale)
    if MASKED:
        # a row that has seen nothing yet keeps m = -inf; shift by 0 to avoid inf - inf
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_ptrs, mask=n_valid[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(q.dtype), _dequant(v, q.dtype), acc)
    return acc, m_new, l_i


@triton.jit
def _no_mod(*args):
    """Placeholder passed for SCORE_MOD / MASK_MOD when a plan has no variant (never called)."""
    return 0


@triton.jit
def _variant_block_compute(
    q, acc, m_i, l_i, K, V, KV_INDICES, kv_base, offs_n, n_valid, keep, k_head_off, v_head_off,
    stride_kp, stride_ks, stride_vp, stride_vs, qk_scale, soft_cap_log2, row_hi, offs_d, req, qo_head, VPARAMS,
    PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr, INDEX_ASM: tl.constexpr, SOFTCAP: tl.constexpr,
    SCORE_MOD: tl.constexpr, HAS_SCORE_MOD: tl.constexpr,
):
    k_off, v_off = _kv_offsets(KV_INDICES, kv_base, offs_n, n_valid, stride_kp, stride_ks, stride_vp, stride_vs,
                               PAGE_SIZE, PAGED, INDEX_ASM, True)
    k = tl.load(K + k_head_off + k_off[:, None] + offs_d[None, :], mask=n_valid[:, None], other=0.0)
    s = tl.dot(q, tl.trans(_dequant(k, q.dtype)))
    if HAS_SCORE_MOD:  # natural-log logits in, natural-log logits out
        x = SCORE_MOD(s * (qk_scale * 0.6931471805599453), req, qo_head[:, None], row_hi[:, None],
                      offs_n[None, :], VPARAMS)
        tl.static_assert(len(x.shape) == 2, "score_mod must return a [rows, cols] tensor")
        s = x.to(tl.float32) * 1.4426950408889634
        scale = 1.0
    elif SOFTCAP:
        s = soft_cap_log2 * _tanh(s * qk_scale)
        scale = 1.0
    else:
        scale = qk_scale
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale)
    m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(V + v_head_off + v_off[:, None] + offs_d[None, :], mask=n_valid[:, None], other=0.0)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(q.dtype), _dequant(v, q.dtype), acc)
    m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attend_block_variant(
    q, acc, m_i, l_i, K, V, KV_INDICES, kv_base, start, kv_end, k_head_off, v_head_off,
    stride_kp, stride_ks, stride_vp, stride_vs, qk_scale, soft_cap_log2,
    row_hi, row_lo, offs_d, req, qo_head, q_local, req_kv_len, mask_bit0, MASK, VPARAMS,
    BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr, INDEX_ASM: tl.constexpr,
    SOFTCAP: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
    SCORE_MOD: tl.constexpr, MASK_MOD: tl.constexpr, HAS_SCORE_MOD: tl.constexpr, HAS_MASK_MOD: tl.constexpr,
    CUSTOM_MASK: tl.constexpr, SKIP_EMPTY: tl.constexpr,
):
    """_attend_block for plans with a variant (AttentionVariant score_mod / mask_mod) or a custom
    mask. The mask is evaluated first, from indices only; with SKIP_EMPTY (custom masks) a block
    it leaves empty is skipped (no K/V load, no MMA). score_mod sees natural-log logits."""
    offs_n = start + tl.arange(0, BLOCK_N)
    n_valid = offs_n < kv_end
    keep = tl.broadcast_to(n_valid[None, :], (q.shape[0], BLOCK_N))
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= row_hi[:, None])
    if WINDOW:
        keep = keep & (offs_n[None, :] >= row_lo[:, None])
    if HAS_MASK_MOD:
        mm = MASK_MOD(req, qo_head[:, None], row_hi[:, None], offs_n[None, :], VPARAMS)
        tl.static_assert(mm.dtype == tl.int1, "mask_mod must return a boolean (int1) tensor")
        tl.static_assert(len(mm.shape) == 2, "mask_mod must return a [rows, cols] tensor (broadcast its inputs)")
        keep = keep & mm
    if CUSTOM_MASK:
        bit = mask_bit0 + q_local[:, None].to(tl.int64) * req_kv_len + offs_n[None, :]
        byte = tl.load(MASK + (bit >> 3), mask=keep, other=0)
        keep = keep & (((byte >> (bit & 7).to(tl.uint8)) & 1) != 0)
    if SKIP_EMPTY:  # custom masks: a block the mask leaves empty costs no load (the branch costs pipelining)
        if tl.max(tl.max(keep.to(tl.int32), 1), 0) > 0:
            acc, m_i, l_i = _variant_block_compute(
                q, acc, m_i, l_i, K, V, KV_INDICES, kv_base, offs_n, n_valid, keep, k_head_off, v_head_off,
                stride_kp, stride_ks, stride_vp, stride_vs, qk_scale, soft_cap_log2, row_hi, offs_d, req, qo_head,
                VPARAMS, PAGE_SIZE, PAGED, INDEX_ASM, SOFTCAP, SCORE_MOD, HAS_SCORE_MOD)
    else:  # variants: the planner already dropped the KV ranges their kv_ranges excludes
        acc, m_i, l_i = _variant_block_compute(
                q, acc, m_i, l_i, K, V, KV_INDICES, kv_base, offs_n, n_valid, keep, k_head_off, v_head_off,
                stride_kp, stride_ks, stride_vp, stride_vs, qk_scale, soft_cap_log2, row_hi, offs_d, req, qo_head,
                VPARAMS, PAGE_SIZE, PAGED, INDEX_ASM, SOFTCAP, SCORE_MOD, HAS_SCORE_MOD)
    return acc, m_i, l_i


@triton.jit
def _merge_two_states(va, sa, vb, sb):
    """merge_state's formula on [rows, D] float32 values and [rows] base-2 LSEs: (v, s) over both KV sets
    (an empty state, s = -inf, is the identity; two empty ones give (0, -inf))."""
    m = tl.maximum(sa, sb)
    m = tl.where(m == float("-inf"), 0.0, m)
    wa = tl.exp2(sa - m)
    wb = tl.exp2(sb - m)
    d = wa + wb
    empty = d == 0.0
    d_safe = tl.where(empty, 1.0, d)
    return (va * wa[:, None] + vb * wb[:, None]) / d_safe[:, None], tl.where(empty, float("-inf"), m + tl.log2(d_safe))


@triton.jit
def _with_sinks(lse, SINKS, qo_head, row_valid):
    """(factor, lse) of rows whose softmax also sums an attention sink (reference.py): lse (base 2) over the
    keys becomes log2(2^lse + e^sink), and the output scales by 2^(old lse - new lse) (0 for a row that saw no
    key; a row with neither gets 0 and -inf)."""
    sink = tl.load(SINKS + qo_head, mask=row_valid, other=float("-inf")) * 1.4426950408889634
    mx = tl.maximum(lse, sink)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    a = tl.exp2(lse - mx)
    den = a + tl.exp2(sink - mx)
    none = den == 0.0
    den_safe = tl.where(none, 1.0, den)
    return tl.where(none, 0.0, a / den_safe), tl.where(none, float("-inf"), mx + tl.log2(den_safe))


@triton.jit
def _sink_divisor(l, m, SINKS, qo_head, row_valid):
    """The divisor of rows whose output is acc / l once their softmax's sum also holds an attention sink: the
    sum l 2^m (m the row's max, base 2) becomes l 2^m + 2^sink = 2^m (l + 2^(sink - m)), so out = acc / (l +
    2^(sink - m)), one row vector where _with_sinks' factor scales the whole tile (notes.md session 36). 1 where
    that is 0 (a row with no key and no sink: its acc is 0); +inf where m is -inf (no key: out 0)."""
    sink = tl.load(SINKS + qo_head, mask=row_valid, other=float("-inf")) * 1.4426950408889634
    den = l + tl.where(sink == float("-inf"), 0.0, tl.exp2(sink - m))
    return tl.where(den == 0.0, 1.0, den)


@triton.jit
def _merge_partials(O, LSE, TMP_O, TMP_LSE, first, n_chunks, q_len, tok, q_row, qo_head, row_valid, offs_d,
                    stride_ot, stride_oh, stride_lt, stride_tt, stride_th, stride_tl,
                    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, WRITE_LSE: tl.constexpr,
                    UNROLL: tl.constexpr, MERGE_OUT: tl.constexpr = False, SINKS=None):
    """MERGE_OUT: (O, LSE) already hold a state over other KV (a cascade's earlier level): it is merged in
    as one more partial, and the result replaces it. SINKS: attention-sink logits per query head (_with_sinks),
    added to the merged state."""
    if MERGE_OUT:
        m0 = tl.load(LSE + q_row * stride_lt + qo_head, mask=row_valid, other=float("-inf"))
        acc = tl.load(O + q_row[:, None] * stride_ot + qo_head[:, None] * stride_oh + offs_d[None, :],
                      mask=row_valid[:, None], other=0.0).to(tl.float32)
        live0 = m0 > float("-inf")
        m = tl.where(live0, m0, 0.0)
        d = tl.where(live0, 1.0, 0.0)
        acc = tl.where(live0[:, None], acc, 0.0)
    else:
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        d = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # UNROLL chunks per step (8 for head_dim <= 256), so their loads are in flight together
    # (latency, not bandwidth, bounds a merge of many chunks).
    for c0 in range(0, n_chunks, UNROLL):
        for j in tl.static_range(UNROLL):
            live = row_valid & (c0 + j < n_chunks)
            r = (first + (c0 + j) * q_len + tok).to(tl.int64)
            s = tl.load(TMP_LSE + r * stride_tl + qo_head, mask=live, other=float("-inf"), cache_modifier=".cg")
            v = tl.load(TMP_O + r[:, None] * stride_tt + qo_head[:, None] * stride_th + offs_d[None, :],
                        mask=live[:, None], other=0.0, cache_modifier=".cg")
            m_new = tl.maximum(m, s)
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m - m_new)
            w = tl.exp2(s - m_new)
            d = d * alpha + w
            acc = acc * alpha[:, None] + w[:, None] * v
            m = m_new
    empty = d == 0.0
    d_safe = tl.where(empty, 1.0, d)
    # (in the order of the expressions before SINKS: without it the kernels compile to the same PTX)
    o_ptrs = O + q_row[:, None] * stride_ot + qo_head[:, None] * stride_oh + offs_d[None, :]
    out = acc / d_safe[:, None]
    if SINKS is not None:
        factor, lse_sink = _with_sinks(tl.where(empty, float("-inf"), m + tl.log2(d_safe)), SINKS, qo_head,
                                       row_valid)
        out = out * factor[:, None]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_valid[:, None])
    if WRITE_LSE:
        lse_ptrs = LSE + q_row * stride_lt + qo_head
        lse = tl.where(empty, float("-inf"), m + tl.log2(d_safe))
        if SINKS is not None:
            lse = lse_sink
        tl.store(lse_ptrs, lse, mask=row_valid)


@triton.jit
def _split_entry(wp, SPLITS, partial):
    """(split id, first partial row, chunks) of a chunk's split tile (zeros for an unsplit tile), loaded when
    the task starts: work item field 7 goes out with the item's other fields and the split table's entry
    right after it (masked loads, no branch: nothing waits for them), so they arrive under the KV loop
    instead of adding two dependent round trips to the epilogue before its arrival counter."""
    split = tl.load(wp + 7)
    is_split = partial >= 0
    first = tl.load(SPLITS + split * 2, mask=is_split, other=0)
    n_chunks = tl.load(SPLITS + split * 2 + 1, mask=is_split, other=0)
    return split, first, n_chunks


@triton.jit
def _finish_tile(acc, m_i, l_i, v_scale, partial, split, first, n_chunks, slot, slots_per_split, O, LSE, TMP_O,
                 TMP_LSE, ARRIVALS, q_len, tok, q_row, qo_head, row_valid, offs_d, stride_ot, stride_oh, stride_lt,
                 stride_tt, stride_th, stride_tl, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                 WRITE_LSE: tl.constexpr, MERGE_UNROLL: tl.constexpr, MERGE_OUT: tl.constexpr = False,
                 DEFER_MERGE: tl.constexpr = False, SINKS=None):
    """A task's epilogue (attention and MLA kernels): normalize, then write out / lse, or, for a chunk of a split tile
    (split, first, n_chunks from _split_entry), its partial state; the chunk that arrives last (one counter per
    tile and task slot) merges the tile's partials and resets the counter. MERGE_OUT: out / lse hold a state
    over other KV on entry (a cascade's earlier level); the result is the merge of both (merge_state's formula),
    so a cascade needs no separate merge kernel. DEFER_MERGE: a chunk only writes its partial state, and a
    second launch merges (MLA: kernels/mla.py's mla_combine_kernel). SINKS: attention-sink logits per query head
    (_with_sinks), added where the final out / lse are written (never to a chunk's partial state)."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc * (v_scale / l_safe)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))
    if MERGE_OUT:
        # (a chunk of a split tile merges in _merge_partials instead)
        s0 = tl.load(LSE + q_row * stride_lt + qo_head, mask=row_valid, other=float("-inf"))
        o0 = tl.load(O + q_row[:, None] * stride_ot + qo_head[:, None] * stride_oh + offs_d[None, :],
                     mask=row_valid[:, None], other=0.0).to(tl.float32)
        merged_o, merged_s = _merge_two_states(out, lse, o0, s0)
        unsplit = partial < 0
        out = tl.where(unsplit, merged_o, out)
        lse = tl.where(unsplit, merged_s, lse)
    if partial < 0:
        if SINKS is not None:
            factor, lse = _with_sinks(lse, SINKS, qo_head, row_valid)
            out = out * factor[:, None]
        tl.store(O + q_row[:, None] * stride_ot + qo_head[:, None] * stride_oh + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=row_valid[:, None])
        if WRITE_LSE:
            tl.store(LSE + q_row * stride_lt + qo_head, lse, mask=row_valid)
    else:
        p_row = (partial + tok).to(tl.int64)
        tl.store(TMP_O + p_row[:, None] * stride_tt + qo_head[:, None] * stride_th + offs_d[None, :],
                 out, mask=row_valid[:, None])
        tl.store(TMP_LSE + p_row * stride_tl + qo_head, lse, mask=row_valid)
        if not DEFER_MERGE:  # (split, first, n_chunks: _split_entry, at the task's start)
            arrival = ARRIVALS + split * slots_per_split + slot
            # acq_rel: our partial is published before the bump; the last one sees them all
            if tl.atomic_add(arrival, 1) == n_chunks - 1:
                tl.store(arrival, 0)  # (every chunk arrived: a plain store, not an acq_rel exchange to wait for)
                _merge_partials(O, LSE, TMP_O, TMP_LSE, first, n_chunks, q_len, tok, q_row, qo_head,
                                row_valid, offs_d, stride_ot, stride_oh, stride_lt, stride_tt, stride_th,
                                stride_tl, BLOCK_M, HEAD_DIM, WRITE_LSE, MERGE_UNROLL, MERGE_OUT, SINKS)


@triton.jit
def _reset_counters(COUNTERS):
    """The last program out resets the task counters for the next launch (CUDA-graph replay)."""
    done = tl.atomic_add(COUNTERS + 1, 1)
    if done == tl.num_programs(0) - 1:
        tl.store(COUNTERS, 0)
        tl.store(COUNTERS + 1, 0)


@triton.jit
def attention_kernel(
    Q, K, V, O, LSE, TMP_O, TMP_LSE, WORK, COUNTERS, KV_INDICES, SPLITS, ARRIVALS, K_SCALE, V_SCALE,
    REQS, MASK, VPARAMS,
    stride_qt, stride_qh,
    stride_kp, stride_ks, stride_kh,
    stride_vp, stride_vs, stride_vh,
    stride_ot, stride_oh, stride_lt,
    stride_tt, stride_th, stride_tl,
    num_kv_heads, group_size, heads_per_prog,
    qk_scale, soft_cap_log2, window_left, k_scale, v_scale, stride_ksh, stride_vsh,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
    PAGED: tl.constexpr, INDEX_ASM: tl.constexpr, CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr,
    WINDOW: tl.constexpr, WRITE_LSE: tl.constexpr, SCALE_PTR: tl.constexpr, KV_DEQUANT: tl.constexpr,
    VARIANT: tl.constexpr, SCORE_MOD: tl.constexpr, MASK_MOD: tl.constexpr, HAS_SCORE_MOD: tl.constexpr,
    HAS_MASK_MOD: tl.constexpr, CUSTOM_MASK: tl.constexpr, MERGE_OUT: tl.constexpr = False,
    PDL: tl.constexpr = False, SINKS=None,
):
    """Scores are kept in the log2 domain: qk_scale = sm_scale * log2(e) (or
    sm_scale / cap with a soft cap, then multiplied back by cap * log2(e)).
    The cache holds K / k_scale and V / v_scale (fp8 caches; 1.0 otherwise): k_scale
    multiplies the logits' scale, v_scale the output; with SCALE_PTR they are also
    multiplied by per-KV-head factors K_SCALE[h * stride_ksh], V_SCALE[h * stride_vsh].
    PDL: a programmatic dependent launch (ops/kernels/pdl.py). SINKS (None: none): float32 attention-sink
    logits per query head (reference.py), added to each row's softmax where out / lse are written."""
    pdl_enter(PDL)
    n_hsplit = tl.cdiv(group_size, heads_per_prog)
    tasks_per_item = num_kv_heads * n_hsplit
    num_tasks = tl.load(COUNTERS + 2)
    SPLITS = SPLITS + tl.load(COUNTERS + 3)  # where the split table and the page ids start in the plan
    KV_INDICES = KV_INDICES + tl.load(COUNTERS + 4)  # buffer (header fields SPLITS_AT, INDICES_AT)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    tok = offs_m // heads_per_prog
    sub = offs_m % heads_per_prog

    task = tl.program_id(0)  # the first task needs no fetch; later ones come from the counter
    while task < num_tasks:
        item = task // tasks_per_item
        rem = task % tasks_per_item
        kvh = rem // n_hsplit
        hsplit = rem % n_hsplit
        wp, q_start, q_len, kv_base, kv_start, kv_end, diag, partial = _load_item(WORK, item)
        split, first, n_chunks = _split_entry(wp, SPLITS, partial)

        head_in_group = hsplit * heads_per_prog + sub
        row_valid = (tok < q_len) & (head_in_group < group_size)
        qo_head = kvh * group_size + head_in_group
        q_row = (q_start + tok).to(tl.int64)
        q = tl.load(Q + q_row[:, None] * stride_qt + qo_head[:, None] * stride_qh + offs_d[None, :],
                    mask=row_valid[:, None], other=0.0)
        if KV_DEQUANT:
            # bf16 queries over an fp8 cache compute in fp16: fp8 -> fp16 is one instruction per two values
            # (fp8 -> bf16 is not: bit placement and a multiply, or two conversions through fp16), fp16 holds
            # every e4m3 / e5m2 value exactly, P keeps 3 more mantissa bits than in bf16, and decode runs 1.2x
            # faster on the H200 (notes.md, session 7). q is clamped to fp16's range (|q| <= 65504).
            q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
        row_hi = diag + tok
        row_lo = row_hi - window_left

        # Blocks in [full_lo, full_hi) need no mask: every row sees every column.
        full_lo = kv_start
        if WINDOW:
            lo_need = diag + q_len - 1 - window_left
            n_pre = tl.maximum(lo_need - kv_start, 0)
            full_lo = tl.minimum(kv_start + tl.cdiv(n_pre, BLOCK_N) * BLOCK_N, kv_end)
        hi_lim = kv_end
        if CAUSAL:
            hi_lim = tl.minimum(kv_end, diag + 1)
        full_hi = full_lo + tl.maximum(hi_lim - full_lo, 0) // BLOCK_N * BLOCK_N

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        if VARIANT:  # REQS[request] = (first query row, kv_len, first bit of its custom mask), int64
            req = tl.load(wp + 8)
            q_local = q_row - tl.load(REQS + req * 3)
            req_kv_len = tl.load(REQS + req * 3 + 1)
            mask_bit0 = tl.load(REQS + req * 3 + 2)
        task_qk_scale = qk_scale * k_scale
        task_v_scale = v_scale
        if SCALE_PTR:
            task_qk_scale = task_qk_scale * tl.load(K_SCALE + kvh * stride_ksh)
            task_v_scale = task_v_scale * tl.load(V_SCALE + kvh * stride_vsh)
        k_head_off = kvh.to(tl.int64) * stride_kh
        v_head_off = kvh.to(tl.int64) * stride_vh
        if VARIANT:
            for start in range(kv_start, kv_end, BLOCK_N):
                acc, m_i, l_i = _attend_block_variant(
                    q, acc, m_i, l_i, K, V, KV_INDICES, kv_base, start, kv_end, k_head_off, v_head_off,
                    stride_kp, stride_ks, stride_vp, stride_vs, task_qk_scale, soft_cap_log2,
                    row_hi, row_lo, offs_d, req, qo_head, q_local, req_kv_len, mask_bit0, MASK, VPARAMS,
                    BLOCK_N, PAGE_SIZE, PAGED, INDEX_ASM, SOFTCAP, CAUSAL, WINDOW,
                    SCORE_MOD, MASK_MOD, HAS_SCORE_MOD, HAS_MASK_MOD, CUSTOM_MASK, CUSTOM_MASK)
        else:
            for start in range(kv_start, full_lo, BLOCK_N):
                acc, m_i, l_i = _attend_block(
                    q, acc, m_i, l_i, K, V, KV_INDICES, kv_base, start, kv_end, k_head_off, v_head_off,
                    stride_kp, stride_ks, stride_vp, stride_vs, task_qk_scale, soft_cap_log2,
                    row_hi, row_lo, offs_d, BLOCK_N, PAGE_SIZE, PAGED, INDEX_ASM, SOFTCAP, True, CAUSAL, WINDOW)
            for start in range(full_lo, full_hi, BLOCK_N):
                acc, m_i, l_i = _attend_block(
                    q, acc, m_i, l_i, K, V, KV_INDICES, kv_base, start, kv_end, k_head_off, v_head_off,
                    stride_kp, stride_ks, stride_vp, stride_vs, task_qk_scale, soft_cap_log2,
                    row_hi, row_lo, offs_d, BLOCK_N, PAGE_SIZE, PAGED, INDEX_ASM, SOFTCAP, False, CAUSAL, WINDOW)
            for start in range(full_hi, kv_end, BLOCK_N):
                acc, m_i, l_i = _attend_block(
                    q, acc, m_i, l_i, K, V, KV_INDICES, kv_base, start, kv_end, k_head_off, v_head_off,
                    stride_kp, stride_ks, stride_vp, stride_vs, task_qk_scale, soft_cap_log2,
                    row_hi, row_lo, offs_d, BLOCK_N, PAGE_SIZE, PAGED, INDEX_ASM, SOFTCAP, True, CAUSAL, WINDOW)

        _finish_tile(acc, m_i, l_i, task_v_scale, partial, split, first, n_chunks, rem, tasks_per_item, O, LSE,
                     TMP_O, TMP_LSE, ARRIVALS, q_len, tok, q_row, qo_head, row_valid, offs_d, stride_ot, stride_oh,
                     stride_lt, stride_tt, stride_th, stride_tl, BLOCK_M, HEAD_DIM, WRITE_LSE, 8, MERGE_OUT,
                     SINKS=SINKS)
        # relaxed: a task id orders nothing (the work list is read-only; partial results are published by the
        # arrival counter's acq_rel), and acq_rel here cost a fence (waiting for this task's stores) per task
        task = tl.num_programs(0) + tl.atomic_add(COUNTERS, 1, sem="relaxed")

    _reset_counters(COUNTERS)


@triton.jit
def merge_states_kernel(
    O, LSE, V, S, num_rows, num_states, num_heads,
    stride_ot, stride_oh, stride_lt, stride_vr, stride_vh, stride_sr,
    HEAD_DIM: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Merge attention states through their base-2 log-sum-exp: out row i merges state rows
    i*num_states .. i*num_states + num_states - 1 (row r, head h: V + r*stride_vr +
    h*stride_vh, S + r*stride_sr + h). A program takes (row, head) units of a persistent
    grid and reads BLOCK_C states at a time."""
    offs_d = tl.arange(0, HEAD_DIM)
    offs_c = tl.arange(0, BLOCK_C)
    for unit in range(tl.program_id(0), num_rows * num_heads, tl.num_programs(0)):
        row = unit // num_heads
        h = unit % num_heads
        first = row * num_states
        m = float("-inf")
        d = 0.0
        acc = tl.zeros([HEAD_DIM], tl.float32)
        for c0 in range(0, num_states, BLOCK_C):
            cmask = c0 + offs_c < num_states
            rows = (first + c0 + offs_c).to(tl.int64)
            s = tl.load(S + rows * stride_sr + h, mask=cmask, other=float("-inf"))
            v = tl.load(V + rows[:, None] * stride_vr + h * stride_vh + offs_d[None, :],
                        mask=cmask[:, None], other=0.0).to(tl.float32)
            m_new = tl.maximum(m, tl.max(s, 0))
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m - m_new)
            w = tl.exp2(s - m_new)
            d = d * alpha + tl.sum(w, 0)
            acc = acc * alpha + tl.sum(w[:, None] * v, 0)
            m = m_new
        empty = d == 0.0
        d_safe = tl.where(empty, 1.0, d)
        row64 = row.to(tl.int64)
        tl.store(O + row64 * stride_ot + h * stride_oh + offs_d, (acc / d_safe).to(O.dtype.element_ty))
        tl.store(LSE + row64 * stride_lt + h, tl.where(empty, float("-inf"), m + tl.log2(d_safe)))


@triton.jit
def merge_two_kernel(
    VA, SA, VB, SB, VO, SO, MASK, num_rows, num_heads,
    stride_va_r, stride_va_h, stride_sa_r, stride_vb_r, stride_vb_h, stride_sb_r,
    stride_vo_r, stride_vo_h, stride_so_r,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, HAS_MASK: tl.constexpr,
):
    """(VO, SO) = merge of states A and B per (row, head); VO/SO may alias VA/SA.
    With HAS_MASK, rows whose MASK is false keep A (written as is)."""
    row = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < num_heads
    offs_d = tl.arange(0, HEAD_DIM)
    sa = tl.load(SA + row * stride_sa_r + heads, mask=hmask, other=float("-inf"))
    sb = tl.load(SB + row * stride_sb_r + heads, mask=hmask, other=float("-inf"))
    va = tl.load(VA + row * stride_va_r + heads[:, None] * stride_va_h + offs_d[None, :],
                 mask=hmask[:, None], other=0.0).to(tl.float32)
    vb = tl.load(VB + row * stride_vb_r + heads[:, None] * stride_vb_h + offs_d[None, :],
                 mask=hmask[:, None], other=0.0).to(tl.float32)
    if HAS_MASK:
        use_b = tl.load(MASK + row) != 0
        sb = tl.where(use_b, sb, float("-inf"))
    out, s_out = _merge_two_states(va, sa, vb, sb)
    if HAS_MASK:
        out = tl.where(use_b, out, va)
    tl.store(VO + row * stride_vo_r + heads[:, None] * stride_vo_h + offs_d[None, :],
             out.to(VO.dtype.element_ty), mask=hmask[:, None])
    if HAS_MASK:
        s_out = tl.where(use_b, s_out, sa)
    tl.store(SO + row * stride_so_r + heads, s_out, mask=hmask)
