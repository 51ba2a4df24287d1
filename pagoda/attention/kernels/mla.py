"""Multi-head latent attention (DeepSeek-V2/V3 MLA), absorbed form, over a paged latent cache.

All query heads share one latent KV per token: ``ckv`` (head_dim_ckv, 512 in DeepSeek) and
the rotary part ``kpe`` (64). For query row i (a token t and a head h):

    logit_j = (q_nope[t, h] . ckv[j] + q_pe[t, h] . kpe[j]) * sm_scale
    out[t, h] = sum_j softmax(logit)_j * ckv[j]          (head_dim_ckv wide)

It is attention with one KV head (MQA) whose keys are [ckv, kpe] and values ckv: the
kernel packs heads (and tokens) into the rows of a tile, exactly like GQA packing in
kernels/attention.py, so each latent byte is read once per tile of heads_per_prog heads.
Work list, persistent grid, atomic task fetch, split-KV and the in-kernel merge are the
ones of the attention kernel (same WORK / SPLITS layout, same planner).
"""
import triton
import triton.language as tl

from .attention import _finish_tile, _load_item, _load_page_index, _merge_partials, _reset_counters, _split_entry


@triton.jit
def _mla_block(q_nope, q_pe, acc, m_i, l_i, CKV, KPE, KV_INDICES, kv_base, start, kv_end,
               stride_cp, stride_cs, stride_pp, stride_ps, qk_scale, row_hi, offs_c, offs_p,
               BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, INDEX_ASM: tl.constexpr,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr):
    offs_n = start + tl.arange(0, BLOCK_N)
    if MASKED:
        n_valid = offs_n < kv_end
        page = _load_page_index(KV_INDICES + kv_base + tl.where(n_valid, offs_n, 0) // PAGE_SIZE, INDEX_ASM)
    else:
        page = _load_page_index(KV_INDICES + kv_base + offs_n // PAGE_SIZE, INDEX_ASM)
    page = page.to(tl.int64)
    slot = offs_n % PAGE_SIZE
    c_ptrs = CKV + (page * stride_cp + slot * stride_cs)[:, None] + offs_c[None, :]
    p_ptrs = KPE + (page * stride_pp + slot * stride_ps)[:, None] + offs_p[None, :]
    if MASKED:
        ckv = tl.load(c_ptrs, mask=n_valid[:, None], other=0.0)
        kpe = tl.load(p_ptrs, mask=n_valid[:, None], other=0.0)
    else:
        ckv = tl.load(c_ptrs)
        kpe = tl.load(p_ptrs)
    ckv = ckv.to(q_nope.dtype)
    s = tl.dot(q_pe, tl.trans(kpe.to(q_nope.dtype)))
    s = tl.dot(q_nope, tl.trans(ckv), s)
    if MASKED:
        keep = n_valid[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= row_hi[:, None])
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    if MASKED:
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(q_nope.dtype), ckv, acc)
    return acc, m_new, l_i


@triton.jit
def mla_kernel(
    QN, QP, CKV, KPE, O, LSE, TMP_O, TMP_LSE, WORK, COUNTERS, KV_INDICES, SPLITS, ARRIVALS,
    stride_qnt, stride_qnh, stride_qpt, stride_qph,
    stride_cp, stride_cs, stride_pp, stride_ps,
    stride_ot, stride_oh, stride_lt,
    stride_tt, stride_th, stride_tl,
    num_heads, heads_per_prog, qk_scale, ckv_scale,
    D_CKV: tl.constexpr, D_KPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr, INDEX_ASM: tl.constexpr, CAUSAL: tl.constexpr, WRITE_LSE: tl.constexpr,
    MERGE_UNROLL: tl.constexpr, DEFER_MERGE: tl.constexpr = False,
):
    """A task is (item, head split). qk_scale = sm_scale * log2(e) * (kv scale of an fp8 cache);
    ckv_scale multiplies the output (the fp8 cache's scale; 1.0 otherwise). DEFER_MERGE: split tiles
    only write their partial states, and mla_combine_kernel merges them."""
    n_hsplit = tl.cdiv(num_heads, heads_per_prog)
    num_tasks = tl.load(COUNTERS + 2)
    SPLITS = SPLITS + tl.load(COUNTERS + 3)  # where the split table and the page ids start in the plan
    KV_INDICES = KV_INDICES + tl.load(COUNTERS + 4)  # buffer (header fields SPLITS_AT, INDICES_AT)
    offs_m = tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, D_CKV)
    offs_p = tl.arange(0, D_KPE)
    tok = offs_m // heads_per_prog
    sub = offs_m % heads_per_prog

    task = tl.program_id(0)  # the first task needs no fetch; later ones come from the counter
    while task < num_tasks:
        item = task // n_hsplit
        hsplit = task % n_hsplit
        wp, q_start, q_len, kv_base, kv_start, kv_end, diag, partial = _load_item(WORK, item)
        split, first, n_chunks = 0, 0, 0  # (a second launch merges split tiles: no split entry needed)
        if not DEFER_MERGE:
            split, first, n_chunks = _split_entry(wp, SPLITS, partial)

        head = hsplit * heads_per_prog + sub
        row_valid = (tok < q_len) & (head < num_heads)
        q_row = (q_start + tok).to(tl.int64)
        q_nope = tl.load(QN + q_row[:, None] * stride_qnt + head[:, None] * stride_qnh + offs_c[None, :],
                         mask=row_valid[:, None], other=0.0)
        q_pe = tl.load(QP + q_row[:, None] * stride_qpt + head[:, None] * stride_qph + offs_p[None, :],
                       mask=row_valid[:, None], other=0.0)
        row_hi = diag + tok
        hi_lim = kv_end
        if CAUSAL:
            hi_lim = tl.minimum(kv_end, diag + 1)
        full_hi = kv_start + tl.maximum(hi_lim - kv_start, 0) // BLOCK_N * BLOCK_N

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_CKV], tl.float32)
        for start in range(kv_start, full_hi, BLOCK_N):
            acc, m_i, l_i = _mla_block(q_nope, q_pe, acc, m_i, l_i, CKV, KPE, KV_INDICES, kv_base, start, kv_end,
                                       stride_cp, stride_cs, stride_pp, stride_ps, qk_scale, row_hi, offs_c,
                                       offs_p, BLOCK_N, PAGE_SIZE, INDEX_ASM, False, CAUSAL)
        for start in range(full_hi, kv_end, BLOCK_N):
            acc, m_i, l_i = _mla_block(q_nope, q_pe, acc, m_i, l_i, CKV, KPE, KV_INDICES, kv_base, start, kv_end,
                                       stride_cp, stride_cs, stride_pp, stride_ps, qk_scale, row_hi, offs_c,
                                       offs_p, BLOCK_N, PAGE_SIZE, INDEX_ASM, True, CAUSAL)

        _finish_tile(acc, m_i, l_i, ckv_scale, partial, split, first, n_chunks, hsplit, n_hsplit, O, LSE, TMP_O,
                     TMP_LSE, ARRIVALS, q_len, tok, q_row, head, row_valid, offs_c, stride_ot, stride_oh, stride_lt,
                     stride_tt, stride_th, stride_tl, BLOCK_M, D_CKV, WRITE_LSE, MERGE_UNROLL,
                     DEFER_MERGE=DEFER_MERGE)
        # relaxed: a task id orders nothing (the work list is read-only; partial results are published by the
        # arrival counter's acq_rel), and acq_rel here cost a fence (waiting for this task's stores) per task
        task = tl.num_programs(0) + tl.atomic_add(COUNTERS, 1, sem="relaxed")

    _reset_counters(COUNTERS)


# one entry of the MLA merge list (kernels/attention.py header field 7; mla.merge_list): first partial row,
# chunks, first query row, query rows
MERGE_FIELDS = 4
_MERGE_FIELDS = tl.constexpr(MERGE_FIELDS)


@triton.jit
def _merge_chunk_blocks(O, LSE, TMP_O, TMP_LSE, first, n_chunks, q_len, tok, q_row, head, head_ok, offs_d,
                        stride_ot, stride_oh, stride_lt, stride_tt, stride_th, stride_tl,
                        BLOCK_H: tl.constexpr, DC: tl.constexpr, WRITE_LSE: tl.constexpr, CHUNKS: tl.constexpr):
    """One query token's merge of a split tile's n_chunks partial states (rows first + c * q_len + tok) for
    BLOCK_H heads and DC output columns. CHUNKS chunks at a time, each block one [CHUNKS, BLOCK_H] load of
    LSEs and one [CHUNKS, BLOCK_H, DC] load of partial outputs, so a block's loads all go out before any of
    them is used (kernels/attention.py's _merge_partials updates its state chunk by chunk between one chunk's
    loads and the next's). In units of 4 heads x 64 columns on 2 warps this took 1 x 32768's merge launch
    from 16.5 to 6.2 us (H200, notes.md session 38); in units of 8 heads, 16 chunks a load, it was no faster."""
    offs_c = tl.arange(0, CHUNKS)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    d = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, DC], tl.float32)
    for c0 in range(0, n_chunks, CHUNKS):
        live = ((c0 + offs_c) < n_chunks)[:, None] & head_ok[None, :]
        r = (first + (c0 + offs_c) * q_len + tok).to(tl.int64)
        s = tl.load(TMP_LSE + r[:, None] * stride_tl + head[None, :], mask=live, other=float("-inf"),
                    cache_modifier=".cg")
        v = tl.load(TMP_O + r[:, None, None] * stride_tt + head[None, :, None] * stride_th + offs_d[None, None, :],
                    mask=live[:, :, None], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, tl.max(s, 0))
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(s - m_new[None, :])  # (a chunk that saw nothing: lse -inf, weight 0)
        d = d * alpha + tl.sum(w, 0)
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * v, 0)
        m = m_new
    empty = d == 0.0
    d_safe = tl.where(empty, 1.0, d)
    tl.store(O + q_row * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             (acc / d_safe[:, None]).to(O.dtype.element_ty), mask=head_ok[:, None])
    if WRITE_LSE:
        tl.store(LSE + q_row * stride_lt + head, tl.where(empty, float("-inf"), m + tl.log2(d_safe)), mask=head_ok)


@triton.jit
def mla_combine_kernel(
    O, LSE, TMP_O, TMP_LSE, COUNTERS, PLAN,
    stride_ot, stride_oh, stride_lt, stride_tt, stride_th, stride_tl,
    num_heads,
    D: tl.constexpr, BLOCK_H: tl.constexpr, WRITE_LSE: tl.constexpr, CHUNKS: tl.constexpr,
    D_SPLIT: tl.constexpr = 1, BLOCKED: tl.constexpr = False,
):
    """Merge the split tiles of an MLA launch (mla_kernel with DEFER_MERGE, kernels/mla_sm90.py always) in a
    second launch: (split tile, block of BLOCK_H heads, slice of D / D_SPLIT output columns) go over the grid,
    each merging its tile's n_chunks partial states for those heads and columns, token by token (every column
    slice writes the same LSE). BLOCKED: CHUNKS chunks in one load (_merge_chunk_blocks; for units of 4 x 32 x
    num_warps elements, whose chunk axis then stays in each thread's registers); else chunk by chunk, CHUNKS
    loads at a time (kernels/attention.py's _merge_partials; whole rows). The split tiles come from the
    plan's merge list (PLAN: the plan buffer, whose header field 7 says where the list starts; its first int is
    the number of entries, then MERGE_FIELDS per tile). MLA's partial states are large (heads x 512 fp32 per
    token and chunk): one CTA merging a tile's 64 heads, as the attention kernel's last chunk does, reads
    megabytes through one SM (~200 us for 64 chunks in the Gluon kernel's first version); narrow column slices
    spread a few long tiles' merges over the grid."""
    MERGES = PLAN + tl.load(COUNTERS + 7)
    n_hb = tl.cdiv(num_heads, BLOCK_H)
    offs_h = tl.arange(0, BLOCK_H)
    DC: tl.constexpr = D // D_SPLIT
    for t in range(tl.program_id(0), tl.load(MERGES) * n_hb * D_SPLIT, tl.num_programs(0)):
        e = MERGES + 1 + (t // (n_hb * D_SPLIT)) * _MERGE_FIELDS
        first = tl.load(e)
        n_chunks = tl.load(e + 1)
        q_start = tl.load(e + 2)
        q_len = tl.load(e + 3)
        head = (t // D_SPLIT % n_hb) * BLOCK_H + offs_h
        offs_d = (t % D_SPLIT) * DC + tl.arange(0, DC)
        for tok in range(0, q_len):
            if BLOCKED:
                _merge_chunk_blocks(O, LSE, TMP_O, TMP_LSE, first, n_chunks, q_len, tok,
                                    (q_start + tok).to(tl.int64), head, head < num_heads, offs_d, stride_ot,
                                    stride_oh, stride_lt, stride_tt, stride_th, stride_tl, BLOCK_H, DC, WRITE_LSE,
                                    CHUNKS)
            else:
                tokv = tl.zeros([BLOCK_H], tl.int32) + tok
                _merge_partials(O, LSE, TMP_O, TMP_LSE, first, n_chunks, q_len, tokv,
                                (q_start + tokv).to(tl.int64), head, head < num_heads, offs_d, stride_ot, stride_oh,
                                stride_lt, stride_tt, stride_th, stride_tl, BLOCK_H, DC, WRITE_LSE, CHUNKS)
