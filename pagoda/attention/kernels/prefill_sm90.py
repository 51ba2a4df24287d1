"""Prefill attention for Hopper (sm_90) in Gluon: the work list of kernels/attention.py, with
the scheduling Triton's compiler does not do for us.

Why a second kernel (notes.md, Session 4): in the Triton kernel every warp both loads and
computes, each Q K^T wgmma is waited for right away, and a CTA-wide barrier per KV block keeps the
two warp groups in lockstep: Nsight Compute shows the tensor pipe 37% busy, warps stalled on
barriers and on short dependency chains. Here, as in FlashAttention-3:

- a producer warp group streams K / V blocks through a ring of ``STAGES`` shared-memory slots
  and runs ahead across task boundaries, so a task's first blocks load during the last ones of
  the previous task. A block is TMA bulk copies, one per page (the cache viewed as token rows:
  tma_views), except the block holding the end of a request's KV, which is cp.async row gathers
  with the rows past the end zero-filled (and every block of a cache TMA cannot address: pages of
  fewer than 8 tokens, say). The bulk copies took the producer's instructions off the consumers'
  issue slots: 1 x 8192 1207 -> 1008 us, 1 x 16384 4611 -> 3801 (H200, notes.md session 14);
- two consumer warp groups, each 64 rows of the 128-row query tile, wait only on the slot's
  "ready" barrier and release it through an "empty" one, so they drift apart and one group's
  softmax overlaps the other's MMAs (FA3's explicit ping-pong on top measured no better, with
  cp.async in sessions 4 and 14 and with TMA in session 14: removed);
- inside a group, the P V wgmma of block j - 1 is queued behind S_j = Q K_j^T, meant to run during
  the softmax of block j (Q stays in registers: the Q K^T wgmma then reads only K from shared
  memory). With P in registers ptxas serializes the two (it waits for the wgmma before the softmax:
  notes.md, session 7). P through a double-buffered shared-memory tile overlaps them in the SASS, but
  ran 5-14% slower on the H200 (session 8: the extra shared-memory traffic and barrier; removed).

Tasks (item, KV head, head split) go over the persistent grid in a fixed snake order that both
roles compute (no task counter to share); split tiles write partial states and the last chunk to
arrive merges them, as in kernels/attention.py. A long prefill's tasks go in bands, KV head by KV head,
so that the programs running at once read fewer heads' KV from L2 (_ws_task, plan.prefill_band:
1 x 16384 +5-8%, notes.md session 13).

KV blocks: 64 tokens, Q in registers; or (Q_SMEM) 128 tokens with Q read from shared memory, which
leaves the registers a 128-column S needs (runner.SM90_LONG_CONFIG, for long items: +7-9% there).
Q_AHEAD (runner config q_ahead, on by default since session 15): the consumers cp.async the next task's
Q into shared memory while this task runs, for plans of many short tasks where each task's Q load waits at
its start (8 x 1024: -3%).

head_dim 256 (runner.SM90_CONFIG_D256): O takes 128 registers a consumer thread, so Q is read from shared memory and
the ring holds 4 stages of 32-token blocks beside it; a split tile's merge sums its outputs in column slices of 128
(1 x 8192: the Triton kernel's 6313 us -> 2267, 1.07x FlashInfer, H200 session 29).

Logits soft cap (SOFTCAP: cap * tanh(s / cap) with tanh.approx, as FlashInfer) and sliding windows (WINDOW: the plan's
items start where their first row's window does; with bulk copies their blocks start on the page below, and the
columns before the item's start are masked like those left of a row's window).

Scope: 16-bit queries and cache, head_dim 64 / 128 / 256, causal or not, windows and soft caps, no variant /
custom mask / fp8. The runner uses it for such prefill plans on sm_90 (with the Triton version it was
written for) and the Triton kernel for everything else.
"""
from __future__ import annotations

import triton

# (a @triton.jit function, which the Gluon kernels here call as it is: the same PTX as a gluon.jit copy of it)
from .attention import _sink_divisor, _with_sinks

# Gluon is experimental and its API changes between releases (Triton 3.9 renamed the cp.async and
# barrier calls used here): the kernel is used only with the Triton it was written and tested for.
GLUON_TRITON = ("3.6",)

try:
    if not triton.__version__.startswith(GLUON_TRITON):
        raise ImportError(f"the Gluon prefill kernel targets Triton {GLUON_TRITON}, not {triton.__version__}")
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (async_copy, fence_async_shared, mbarrier, tma,
                                                                  warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    HAVE_GLUON = True
    # a CTA-wide barrier: gl.thread_barrier in Triton 3.5 / 3.6, gl.barrier later
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
except ImportError:  # other Triton versions: the Triton kernel serves every plan
    HAVE_GLUON = False

if HAVE_GLUON:
    # In-kernel timeline probes (decode_sm90's TRACE; scripts/decode_timeline.py): %globaltimer stamps, per program
    # its start then TRACE_SLOTS per round: 1 task start, 2 first KV block landed, 3 loop end, 4 epilogue end,
    # 5 a split chunk's partial state stored (issued), 6 its arrival counted, 7 the merging chunk's first round of
    # partial states summed (slots 5-7 stay -1 where a task does not get there).
    TRACE_ROUNDS = gl.constexpr(6)  # rounds a TRACE buffer has room for (later rounds are not stamped)
    TRACE_SLOTS = gl.constexpr(7)

    @gluon.jit
    def _globaltimer():
        return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=gl.int64, is_pure=False,
                                         pack=1)

    @gluon.jit
    def _stamp(trace, rnd, k: gl.constexpr):
        if rnd < TRACE_ROUNDS:
            gl.store(trace + 1 + rnd * TRACE_SLOTS + (k - 1), _globaltimer())

    @gluon.jit
    def _issue_kv_load(K, V, k_smem, v_smem, kv_base, start, kv_end, k_head_off, v_head_off,
                       stride_kp, stride_ks, stride_vp, stride_vs, pages,
                       BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, PAGE_SIZE: gl.constexpr,
                       PAGED: gl.constexpr, LOAD_LAYOUT: gl.constexpr, SAME_STRIDES: gl.constexpr = False):
        """cp.async of K and V rows start .. start + BLOCK_N into one ring slot (rows past kv_end read
        as zeros). ``pages``: the page ids of those rows, loaded earlier (paged caches). Positions are never
        negative: unsigned slot arithmetic (a mask, not a signed remainder). SAME_STRIDES: K and V have the same
        page and slot strides, one row offset serves both."""
        offs_n = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LOAD_LAYOUT))
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, LOAD_LAYOUT))
        valid = offs_n < kv_end
        if PAGED:
            slot = (offs_n.to(gl.uint32) % PAGE_SIZE).to(gl.int32)
            row_k = pages.to(gl.int64) * stride_kp + slot * stride_ks
            if SAME_STRIDES:
                row_v = row_k
            else:
                row_v = pages.to(gl.int64) * stride_vp + slot * stride_vs
        else:
            tok = (kv_base + offs_n).to(gl.int64)
            row_k = tok * stride_kp
            row_v = tok * stride_vp
        mask = gl.expand_dims(valid, 1)
        async_copy.async_copy_global_to_shared(
            k_smem, K + k_head_off + gl.expand_dims(row_k, 1) + gl.expand_dims(offs_d, 0), mask=mask)
        async_copy.async_copy_global_to_shared(
            v_smem, V + v_head_off + gl.expand_dims(row_v, 1) + gl.expand_dims(offs_d, 0), mask=mask)

    @gluon.jit
    def _page_ids(KV_INDICES, kv_base, start, kv_end, BLOCK_N: gl.constexpr, PAGE_SIZE: gl.constexpr,
                  PAGED: gl.constexpr, LOAD_LAYOUT: gl.constexpr):
        offs_n = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LOAD_LAYOUT))
        if PAGED:
            # rows past the end read the request's first page id (their copy is masked off); unsigned: a shift,
            # not a signed division
            pos = gl.where(offs_n < kv_end, offs_n, 0).to(gl.uint32)
            return gl.load(KV_INDICES + kv_base + (pos // PAGE_SIZE).to(gl.int32))
        else:
            return offs_n

    @gluon.jit
    def _tanh(x):
        """tanh.approx.f32 (one MUFU instruction, max relative error 2^-10.99, as FlashInfer's soft cap uses)."""
        return gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=gl.float32, is_pure=True,
                                         pack=1)

    @gluon.jit
    def _soft_cap(s, qk_scale, soft_cap_log2, SOFTCAP: gl.constexpr):
        """(scores, the scale still to apply to them): with SOFTCAP, cap * tanh(s * sm_scale / cap) in the log2
        domain (qk_scale = sm_scale / cap, soft_cap_log2 = cap * log2(e): kernels/attention.py's convention),
        already scaled; else s and qk_scale (folded into the exponent's FMA)."""
        if SOFTCAP:
            return soft_cap_log2 * _tanh(s * qk_scale), 1.0
        else:
            return s, qk_scale

    @gluon.jit
    def _softmax_block(s, m_i, l_i, start, kv_end, row_hi, row_lo, qk_scale, soft_cap_log2, masked,
                       CAUSAL: gl.constexpr, WINDOW: gl.constexpr, SOFTCAP: gl.constexpr, BLOCK_N: gl.constexpr,
                       S_LAYOUT: gl.constexpr):
        """Online softmax of one score block (log2 domain): P, new row max, row sum, rescale factor.
        ``masked``: the block crosses the causal diagonal, the end of the KV or (WINDOW) a row's first visible
        column row_lo (else no mask)."""
        s, scale = _soft_cap(s, qk_scale, soft_cap_log2, SOFTCAP)
        if masked:
            offs_n = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, S_LAYOUT))
            keep = gl.expand_dims(offs_n < kv_end, 0)
            if CAUSAL:
                keep = keep & (gl.expand_dims(offs_n, 0) <= gl.expand_dims(row_hi, 1))
            if WINDOW:
                keep = keep & (gl.expand_dims(offs_n, 0) >= gl.expand_dims(row_lo, 1))
            s = gl.where(keep, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1) * scale)
        # a row that has seen nothing keeps m = -inf: shift by 0 (no inf - inf)
        m_new = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s * scale - gl.expand_dims(m_new, 1))
        l_i = l_i * alpha + gl.sum(p, 1)
        return p, m_new, l_i, alpha

    @gluon.jit
    def _tile_rows(ROW0: gl.constexpr, BLOCK_M: gl.constexpr, LAYOUT: gl.constexpr, q_start, q_len, kvh, hsplit,
                   group_size, heads_per_prog):
        """Rows ROW0 .. ROW0 + BLOCK_M of a query tile (token-major, the heads of the group packed):
        (token in the tile, query head, row in use, row of q / out), in LAYOUT's row slice."""
        offs_m = ROW0 + gl.arange(0, BLOCK_M, layout=LAYOUT)
        tok = offs_m // heads_per_prog
        head_in_group = hsplit * heads_per_prog + offs_m % heads_per_prog
        valid = (tok < q_len) & (head_in_group < group_size)
        return tok, kvh * group_size + head_in_group, valid, (q_start + tok).to(gl.int64)

    @gluon.jit
    def _q_tile(Q, ROW0: gl.constexpr, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr, LAYOUT: gl.constexpr, q_start,
                q_len, kvh, hsplit, group_size, heads_per_prog, stride_qt, stride_qh):
        """(pointers, row mask) of rows ROW0 .. ROW0 + BLOCK_M of a query tile, [BLOCK_M, HEAD_DIM] in LAYOUT."""
        _, qo_head, valid, q_row = _tile_rows(ROW0, BLOCK_M, gl.SliceLayout(1, LAYOUT), q_start, q_len, kvh, hsplit,
                                              group_size, heads_per_prog)
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, LAYOUT))
        return (Q + gl.expand_dims(q_row * stride_qt + qo_head * stride_qh, 1) + gl.expand_dims(offs_d, 0),
                gl.expand_dims(valid, 1))

    @gluon.jit
    def _slot_rows(ring, slot, first: gl.constexpr, n: gl.constexpr, BLOCK_N: gl.constexpr):
        """Rows first .. first + n of ring slot ``slot`` (the whole slot when n is BLOCK_N)."""
        dst = ring.index(slot)
        if n < BLOCK_N:
            dst = dst.slice(first, n)
        return dst

    @gluon.constexpr_function
    def _merge_layout(layout, cols):
        """``layout`` (rows of 8-element vectors, a warp across a row's HEAD_DIM columns) for a slice of ``cols``
        columns: the same vectors, a warp across the slice (more rows a warp)."""
        tpw = cols // 8
        if layout.threads_per_warp[1] <= tpw:
            return layout
        return gl.BlockedLayout([1, 8], [32 // tpw, tpw], layout.warps_per_cta, [1, 0])

    @gluon.jit
    def _merge_partials(O, LSE, TMP_O, TMP_LSE, first, n_chunks, q_start, q_len, kvh, hsplit, group_size,
                        heads_per_prog, stride_ot, stride_oh, stride_lt, stride_tt, stride_th, stride_tl,
                        BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr, WRITE_LSE: gl.constexpr,
                        LAYOUT: gl.constexpr, ROW0: gl.constexpr, SINKS=None):
        """Merge the n_chunks partial states of a split tile through their LSE (base 2) into out / lse,
        as kernels/attention.py's _merge_partials (.cg loads: other SMs wrote them; SINKS: attention-sink logits
        per query head, _with_sinks)."""
        # the outputs go in column slices of at most 128 (head_dim 256: a [64, 256] fp32 sum and its chunk's load
        # at once would hold 256 registers a thread)
        DC: gl.constexpr = min(HEAD_DIM, 128)
        ML: gl.constexpr = _merge_layout(LAYOUT, DC)
        tok, qh, valid, q_row = _tile_rows(ROW0, BLOCK_M, gl.SliceLayout(1, ML), q_start, q_len, kvh, hsplit,
                                           group_size, heads_per_prog)
        # Two passes, so that no load waits for the one before it (one chunk after another, a merge of 32 chunks
        # was 32 dependent round trips; this cut 2.4 us off a 1 x 32k fp8 decode, notes.md session 12). 1: the
        # LSEs, CB chunks per load, give the final max m and sum d. 2: the partial outputs weighted by
        # exp2(lse - m), UNROLL chunks' loads in flight (as many as fit in ~64 registers per thread). Both callers
        # run this in a 4-warp group.
        CB: gl.constexpr = 32
        LSE_L: gl.constexpr = gl.BlockedLayout([1, 1], [32 // BLOCK_M if BLOCK_M < 32 else 1,
                                                        BLOCK_M if BLOCK_M < 32 else 32], [4, 1], [0, 1])
        offs_c = gl.arange(0, CB, layout=gl.SliceLayout(1, LSE_L))
        tok2, qh2, valid2, _ = _tile_rows(ROW0, BLOCK_M, gl.SliceLayout(0, LSE_L), q_start, q_len, kvh, hsplit,
                                          group_size, heads_per_prog)
        m2 = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(0, LSE_L))
        d2 = gl.full([BLOCK_M], 0.0, gl.float32, layout=gl.SliceLayout(0, LSE_L))
        for c0 in range(0, n_chunks, CB):
            c = gl.expand_dims(c0 + offs_c, 1)
            live = gl.expand_dims(valid2, 0) & (c < n_chunks)
            r = (first + c * q_len + gl.expand_dims(tok2, 0)).to(gl.int64)
            s = gl.load(TMP_LSE + r * stride_tl + gl.expand_dims(qh2, 0), mask=live, other=float("-inf"),
                        cache_modifier=".cg")
            m_new = gl.maximum(m2, gl.max(s, 0))
            m_new = gl.where(m_new == float("-inf"), 0.0, m_new)
            d2 = d2 * gl.exp2(m2 - m_new) + gl.sum(gl.exp2(s - gl.expand_dims(m_new, 0)), 0)
            m2 = m_new
        # the sink as one more term of the sum (no value): out = acc / d and lse hold it, and nothing more lives
        # across the loops (a factor computed here spilled in the prefill kernel's task loop, notes.md session 36)
        if SINKS is not None:
            sink = gl.load(SINKS + qh2, mask=valid2, other=float("-inf")) * 1.4426950408889634
            m_new = gl.maximum(m2, sink)
            m_new = gl.where(m_new == float("-inf"), 0.0, m_new)
            d2 = d2 * gl.exp2(m2 - m_new) + gl.exp2(sink - m_new)
            m2 = m_new
        m = gl.convert_layout(m2, gl.SliceLayout(1, ML))
        d = gl.convert_layout(d2, gl.SliceLayout(1, ML))
        UNROLL: gl.constexpr = max(1, 8192 // (BLOCK_M * DC))
        for h in gl.static_range(HEAD_DIM // DC):
            offs_d = h * DC + gl.arange(0, DC, layout=gl.SliceLayout(0, ML))
            acc = gl.zeros([BLOCK_M, DC], gl.float32, layout=ML)
            for c0 in range(0, n_chunks, UNROLL):
                for j in gl.static_range(UNROLL):
                    live = valid & (c0 + j < n_chunks)
                    r = (first + (c0 + j) * q_len + tok).to(gl.int64)
                    s = gl.load(TMP_LSE + r * stride_tl + qh, mask=live, other=float("-inf"), cache_modifier=".cg")
                    v = gl.load(TMP_O + gl.expand_dims(r * stride_tt + qh * stride_th, 1) + gl.expand_dims(offs_d, 0),
                                mask=gl.expand_dims(live, 1), other=0.0, cache_modifier=".cg")
                    acc = acc + gl.expand_dims(gl.exp2(s - m), 1) * v
            empty = d == 0.0
            d_safe = gl.where(empty, 1.0, d)
            # (in the order of the expressions before SINKS: without it the kernels compile to the same PTX)
            o_ptrs = O + gl.expand_dims(q_row * stride_ot + qh * stride_oh, 1) + gl.expand_dims(offs_d, 0)
            out = acc / gl.expand_dims(d_safe, 1)
            gl.store(o_ptrs, out.to(O.dtype.element_ty), mask=gl.expand_dims(valid, 1))
        if WRITE_LSE:
            lse_ptrs = LSE + q_row * stride_lt + qh
            lse = gl.where(empty, float("-inf"), m + gl.log2(d_safe))
            gl.store(lse_ptrs, lse, mask=valid)

    @gluon.jit
    def _merge_one_query(O, LSE, TMP_O, TMP_LSE, first, n_chunks, q_start, kvh, hsplit, group_size, heads_per_prog,
                         stride_ot, stride_oh, stride_lt, stride_tt, stride_th, stride_tl, ROWS: gl.constexpr,
                         HEAD_DIM: gl.constexpr, WRITE_LSE: gl.constexpr, trace=None, rnd=0, SINKS=None):
        """_merge_partials for a tile of one query token (decode: chunk c's partial is row first + c) and only its
        ROWS first rows (its query heads; decode_sm90's tiles are 8 or 16 rows for a group of 4): one pass with an
        online rescale, CH chunks' states and LSEs loaded at once. The two-pass merge of all BLOCK_M rows made
        1 + n_chunks / 8 dependent round trips to L2 (1 x 32768: 5 for 32 chunks, ~5 us at the end of the kernel,
        scripts/decode_timeline.py); this makes n_chunks / CH (2 for 32 chunks at ROWS 4). SINKS: attention-sink
        logits per query head (_with_sinks)."""
        VEC: gl.constexpr = max(4, HEAD_DIM // 32)  # fp32 per thread and row (16 bytes; head_dim 256: 32)
        TPD: gl.constexpr = HEAD_DIM // VEC  # lanes along head_dim
        L3: gl.constexpr = gl.BlockedLayout([1, 1, VEC], [1, 32 // TPD, TPD], [1, 4, 1], [2, 1, 0])
        RPT: gl.constexpr = max(1, ROWS // (32 // TPD * 4))  # rows per thread
        # chunks per load: 16 chunks' states (64 fp32 a thread; head_dim 256: 128, a kernel of one program per SM)
        CH: gl.constexpr = 16 // RPT
        S_L: gl.constexpr = gl.SliceLayout(2, L3)  # [CH, ROWS]
        A_L: gl.constexpr = gl.SliceLayout(0, L3)  # [ROWS, HEAD_DIM]
        offs_c = gl.arange(0, CH, layout=gl.SliceLayout(1, S_L))
        offs_r = gl.arange(0, ROWS, layout=gl.SliceLayout(0, S_L))
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, A_L))
        head = hsplit * heads_per_prog + offs_r
        r_ok = (offs_r < heads_per_prog) & (head < group_size)
        qh = kvh * group_size + head
        o3 = gl.expand_dims(gl.expand_dims(qh * stride_th, 0), 2) + gl.expand_dims(gl.expand_dims(offs_d, 0), 0)
        m = gl.full([ROWS], float("-inf"), gl.float32, layout=gl.SliceLayout(0, S_L))
        d = gl.zeros([ROWS], gl.float32, layout=gl.SliceLayout(0, S_L))
        acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=A_L)
        for c0 in range(0, n_chunks, CH):
            row = (first + c0 + offs_c).to(gl.int64)
            live = gl.expand_dims(c0 + offs_c < n_chunks, 1) & gl.expand_dims(r_ok, 0)
            s = gl.load(TMP_LSE + gl.expand_dims(row * stride_tl, 1) + gl.expand_dims(qh, 0), mask=live,
                        other=float("-inf"), cache_modifier=".cg")
            v = gl.load(TMP_O + gl.expand_dims(gl.expand_dims(row * stride_tt, 1), 2) + o3,
                        mask=gl.expand_dims(live, 2), other=0.0, cache_modifier=".cg")
            m_new = gl.maximum(m, gl.max(s, 0))
            m_new = gl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = gl.exp2(m - m_new)
            w = gl.exp2(s - gl.expand_dims(m_new, 0))
            d = d * alpha + gl.sum(w, 0)
            alpha_a = gl.convert_layout(alpha, gl.SliceLayout(1, A_L))
            acc = acc * gl.expand_dims(alpha_a, 1) + gl.sum(gl.expand_dims(w, 2) * v, 0)
            m = m_new
            if trace is not None:
                if c0 == 0:
                    _stamp(trace, rnd, 7)
        empty = d == 0.0
        d_safe = gl.where(empty, 1.0, d)
        qh_a = gl.convert_layout(qh, gl.SliceLayout(1, A_L))
        ok_a = gl.convert_layout(r_ok, gl.SliceLayout(1, A_L))
        if SINKS is None:
            out = acc / gl.expand_dims(gl.convert_layout(d_safe, gl.SliceLayout(1, A_L)), 1)
        else:
            out = acc / gl.expand_dims(gl.convert_layout(_sink_divisor(d, m, SINKS, qh, r_ok),
                                                         gl.SliceLayout(1, A_L)), 1)
        q_row = q_start.to(gl.int64)
        gl.store(O + q_row * stride_ot + gl.expand_dims(qh_a * stride_oh, 1) + gl.expand_dims(offs_d, 0),
                 out.to(O.dtype.element_ty), mask=gl.expand_dims(ok_a, 1))
        if WRITE_LSE:
            lse_ptrs = LSE + q_row * stride_lt + qh
            lse = gl.where(empty, float("-inf"), m + gl.log2(d_safe))
            if SINKS is not None:
                _, lse = _with_sinks(lse, SINKS, qh, r_ok)
            gl.store(lse_ptrs, lse, mask=r_ok)

    @gluon.jit
    def _unperm_cols(m, perm: gl.constexpr):
        """The head-dim column of renumbered column m: bit i of the column is bit perm[i] (a power of two) of m."""
        d = m * 0
        for i in gl.static_range(len(perm)):
            d = d | (((m // perm[i]) & 1) << i)
        return d

    @gluon.jit
    def _epilogue(acc, m_i, l_i, partial, wp, rem, tasks_per_item, q_start, q_len, kvh, hsplit, group_size,
                  heads_per_prog, O, LSE, TMP_O, TMP_LSE, SPLITS, ARRIVALS, stride_ot, stride_oh, stride_lt,
                  stride_tt, stride_th, stride_tl, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr,
                  WRITE_LSE: gl.constexpr, O_LAYOUT: gl.constexpr, LOAD_LAYOUT: gl.constexpr,
                  ROW0: gl.constexpr, WG: gl.constexpr, NUM_WG: gl.constexpr, DIM_PERM: gl.constexpr = None,
                  MERGE_ROWS: gl.constexpr = 0, trace=None, rnd=0, SINKS=None):
        """Normalize a finished tile and write out / lse, or, for a chunk of a split tile, its partial
        state; the chunk that arrives last merges the tile (as kernels/attention.py's _finish_tile).
        ROW0: the first of the tile's rows this warp group holds (WG of NUM_WG, each with its own
        arrival counter). DIM_PERM: acc's columns are head-dim columns renumbered (decode_sm90's row order).
        MERGE_ROWS > 0: the tile is one query token whose heads are its first MERGE_ROWS rows (_merge_one_query).
        trace, rnd: a TRACE program row and the round (probes: stamps 5-7, _stamp). SINKS: attention-sink logits
        per query head (_with_sinks), added where the final out / lse are written (not to a chunk's partial)."""
        OROW_L: gl.constexpr = gl.SliceLayout(1, O_LAYOUT)
        OCOL_L: gl.constexpr = gl.SliceLayout(0, O_LAYOUT)
        l_o = gl.convert_layout(l_i, OROW_L)
        empty = l_o == 0.0
        l_safe = gl.where(empty, 1.0, l_o)
        if SINKS is None:
            out = acc / gl.expand_dims(l_safe, 1)
        tok_o, qh_o, valid_o, qr_o = _tile_rows(ROW0, BLOCK_M, OROW_L, q_start, q_len, kvh, hsplit, group_size,
                                                heads_per_prog)
        offs_do = gl.arange(0, HEAD_DIM, layout=OCOL_L)
        if DIM_PERM is not None:
            offs_do = _unperm_cols(offs_do, DIM_PERM)
        lse_o = gl.where(empty, float("-inf"), gl.convert_layout(m_i, OROW_L) + gl.log2(l_safe))
        if partial < 0:
            if SINKS is not None:
                # (the sink folded into the rows' divisor, not a factor on the [BLOCK_M, HEAD_DIM] tile: with the
                # merge's below, 8 x 1024 prefill's cost of sinks +8.2% -> +1.1%, notes.md session 36)
                out = acc / gl.expand_dims(_sink_divisor(l_o, gl.convert_layout(m_i, OROW_L), SINKS, qh_o,
                                                         valid_o), 1)
                if WRITE_LSE:
                    _, lse_o = _with_sinks(lse_o, SINKS, qh_o, valid_o)
            gl.store(O + gl.expand_dims(qr_o * stride_ot + qh_o * stride_oh, 1) + gl.expand_dims(offs_do, 0),
                     out.to(O.dtype.element_ty), mask=gl.expand_dims(valid_o, 1))
            if WRITE_LSE:
                gl.store(LSE + qr_o * stride_lt + qh_o, lse_o, mask=valid_o)
        else:  # one KV chunk of a split tile: its partial state; the last chunk to arrive merges
            if SINKS is not None:
                out = acc / gl.expand_dims(l_safe, 1)
            p_row = (partial + tok_o).to(gl.int64)
            gl.store(TMP_O + gl.expand_dims(p_row * stride_tt + qh_o * stride_th, 1) + gl.expand_dims(offs_do, 0),
                     out, mask=gl.expand_dims(valid_o, 1))
            gl.store(TMP_LSE + p_row * stride_tl + qh_o, lse_o, mask=valid_o)
            split = gl.load(wp + 7)
            first = gl.load(SPLITS + split * 2)
            n_chunks = gl.load(SPLITS + split * 2 + 1)
            arrival = ARRIVALS + (split * tasks_per_item + rem) * NUM_WG + WG
            if trace is not None:
                _stamp(trace, rnd, 5)
            _cta_barrier()  # every thread's partial is written before the (acq_rel) arrival
            arrived = gl.atomic_add(arrival, 1)
            if trace is not None:
                _stamp(trace, rnd, 6)
            if arrived == n_chunks - 1:
                # the counter back to 0 for the next launch by a plain store: every chunk has arrived, so nothing
                # else touches it in this one (an acq_rel exchange was a fence in front of the merge's loads)
                gl.store(arrival, 0)
                if MERGE_ROWS > 0:
                    _merge_one_query(O, LSE, TMP_O, TMP_LSE, first, n_chunks, q_start, kvh, hsplit, group_size,
                                     heads_per_prog, stride_ot, stride_oh, stride_lt, stride_tt, stride_th, stride_tl,
                                     MERGE_ROWS, HEAD_DIM, WRITE_LSE, trace, rnd, SINKS)
                else:
                    _merge_partials(O, LSE, TMP_O, TMP_LSE, first, n_chunks, q_start, q_len, kvh, hsplit,
                                    group_size, heads_per_prog, stride_ot, stride_oh, stride_lt, stride_tt,
                                    stride_th, stride_tl, BLOCK_M, HEAD_DIM, WRITE_LSE, LOAD_LAYOUT, ROW0, SINKS)

    # -- warp-specialized version -------------------------------------------------------------
    # A producer warpgroup streams K / V blocks through the ring (page ids, cp.async, then a
    # per-thread mbarrier arrival when its copies land) and runs ahead across task boundaries, so
    # a task's first blocks load during the previous task's last ones; the two consumer
    # warpgroups only wait on "ready" barriers, compute, and release slots through "empty" ones.
    # Tasks go over the persistent grid in a snake order (both roles walk the same sequence).

    @gluon.jit
    def _ws_task_index(rnd, nprog=None):
        """The task of this program in round rnd: programs take tasks in a snake order (left to right,
        then right to left), which balances a list sorted longest first better than round-robin. nprog: the
        programs that take tasks (None: the whole grid)."""
        if nprog is None:
            nprog = gl.num_programs(0)
        pid = gl.program_id(0)
        return rnd * nprog + gl.where(rnd % 2 == 0, pid, nprog - 1 - pid)

    @gluon.jit
    def _ws_schedule(COUNTERS, num_kv_heads, group_size, heads_per_prog, nprog=None):
        """(rounds this program takes, tasks per work item, head splits per KV head); a task of the last
        round may be past the end of the plan's tasks (COUNTERS[2]). nprog: the programs that take tasks, the
        first nprog of the grid (None: all; the others take none)."""
        num_tasks = gl.load(COUNTERS + 2)
        n_hsplit = gl.cdiv(group_size, heads_per_prog)
        if nprog is None:
            takers = gl.num_programs(0)
        else:
            takers = nprog
        n = gl.cdiv(num_tasks, takers)
        rounds = gl.where(_ws_task_index(n - 1, takers) < num_tasks, n, n - 1)
        if nprog is not None:
            rounds = gl.where(gl.program_id(0) < nprog, rounds, 0)
        return rounds, num_kv_heads * n_hsplit, n_hsplit

    @gluon.jit
    def _ws_band(COUNTERS, tasks_per_item):
        """(task band, work items) of the plan: header fields BAND_AT and the task count (kernels/attention.py)."""
        return gl.load(COUNTERS + 5), gl.load(COUNTERS + 2) // tasks_per_item

    @gluon.jit
    def _ws_task(WORK, rnd, tasks_per_item, n_hsplit, band=0, n_items=0, nprog=None):
        """Round rnd's task of this program: (its work item's fields, task slot, KV head, head split).
        Tasks are the items' task slots (KV head x head split) item by item, or, with ``band`` > 0 (of
        ``n_items``), band items at a time slot by slot: the programs running together then read the KV of
        fewer heads (a long causal prefill's KV of all heads does not fit in L2; plan.prefill_band). nprog: as in
        _ws_task_index."""
        task = _ws_task_index(rnd, nprog)
        if band > 0:
            span = band * tasks_per_item
            first = task // span * band
            r = task % span
            blen = gl.minimum(band, n_items - first)
            rem = r // blen
            item = first + r % blen
        else:
            rem = task % tasks_per_item
            item = task // tasks_per_item
        return WORK + item * 9, rem, rem // n_hsplit, rem % n_hsplit

    @gluon.jit
    def _block_pages(KV_INDICES, kv_base, st, ok, NP: gl.constexpr, TR: gl.constexpr, PAGE_SIZE: gl.constexpr):
        """The page ids of a KV block's NP bulk copies of TR rows (rows st + i * TR ..), a tuple of scalars
        (masked off: zeros)."""
        pages = ()
        for i in gl.static_range(NP):
            pos = (st + i * TR).to(gl.uint32)
            pages = pages + (gl.load(KV_INDICES + kv_base + (pos // PAGE_SIZE).to(gl.int32), mask=ok, other=0),)
        return pages

    @gluon.jit
    def _ws_producer(K, V, KD, VD, WORK, COUNTERS, KV_INDICES, k_ring, v_ring, ready, empty,
                     stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
                     tma_rpp, tma_hrows, tma_hcols, num_kv_heads, group_size, heads_per_prog,
                     HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, PAGE_SIZE: gl.constexpr, PAGED: gl.constexpr,
                     STAGES: gl.constexpr, PRODUCER_WARPS: gl.constexpr, TMA: gl.constexpr, KV_ALIGN: gl.constexpr):
        """Fills ring slot it % STAGES with each task's KV blocks in turn. Without TMA every block is cp.async
        row gathers (page ids one copy ahead) and each producer thread's arrival when its copies land completes
        the slot's "ready" barrier. TMA (tensor descriptors KD / VD of the caches viewed as rows, tma_views()):
        a block that ends before the KV does (and, paged, starts on a copy boundary) is bulk copies of TR rows,
        one per page (or one per block: ragged, and pages of >= BLOCK_N tokens); the block holding the end of
        the KV stays a cp.async gather, whose masked rows read as zeros (a page's unused slots may hold
        anything, and 0 x NaN in P V would poison the output). Then "ready" takes one arrival more: the bulk
        copies' byte count, or plain after a gather (as in mla_sm90)."""
        TPW_D: gl.constexpr = HEAD_DIM // 8
        LOAD_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_D, TPW_D], [PRODUCER_WARPS, 1], [1, 0])
        # a block's copies go out 64 rows at a time (a 128-row block's page ids and row addresses at once
        # spill the producer's registers), 32 at head_dim 256
        SUB: gl.constexpr = min(BLOCK_N, 64, 8192 // HEAD_DIM)
        TR: gl.constexpr = min(PAGE_SIZE, BLOCK_N) if PAGED else BLOCK_N  # rows per bulk copy
        NP: gl.constexpr = BLOCK_N // TR
        BLOCK_BYTES: gl.constexpr = 2 * BLOCK_N * HEAD_DIM * K.dtype.element_ty.primitive_bitwidth // 8
        n_rounds, tasks_per_item, n_hsplit = _ws_schedule(COUNTERS, num_kv_heads, group_size, heads_per_prog)
        KV_INDICES = KV_INDICES + gl.load(COUNTERS + 4)  # where the page ids start in the plan buffer
        band, n_items = _ws_band(COUNTERS, tasks_per_item)
        it = 0
        for rnd in range(0, n_rounds):
            wp, _, kvh, _ = _ws_task(WORK, rnd, tasks_per_item, n_hsplit, band, n_items)
            kv_base = gl.load(wp + 2)
            kv_start = _ws_kv_start(wp, KV_ALIGN)
            kv_end = gl.load(wp + 4)
            k_head_off = kvh.to(gl.int64) * stride_kh
            v_head_off = kvh.to(gl.int64) * stride_vh
            if TMA:
                head_row = kvh * tma_hrows
                head_col = kvh * tma_hcols
                aligned = kv_start.to(gl.uint32) % TR == 0
                for j in range(0, gl.cdiv(kv_end - kv_start, BLOCK_N)):
                    slot = it % STAGES
                    st = kv_start + j * BLOCK_N
                    bulk = (st + BLOCK_N <= kv_end) & aligned
                    if PAGED:  # loaded before the wait: their latency hides behind it
                        pages = _block_pages(KV_INDICES, kv_base, st, bulk, NP, TR, PAGE_SIZE)
                    mbarrier.wait(empty.index(slot), ((it // STAGES) & 1) ^ 1)
                    if bulk:
                        mbarrier.expect(ready.index(slot), BLOCK_BYTES)
                        for i in gl.static_range(NP):
                            if PAGED:
                                row = pages[i] * tma_rpp + ((st + i * TR).to(gl.uint32) % PAGE_SIZE).to(gl.int32)
                            else:
                                row = kv_base + st + i * TR
                            tma.async_copy_global_to_shared(KD, [row + head_row, head_col], ready.index(slot),
                                                            _slot_rows(k_ring, slot, i * TR, TR, BLOCK_N))
                            tma.async_copy_global_to_shared(VD, [row + head_row, head_col], ready.index(slot),
                                                            _slot_rows(v_ring, slot, i * TR, TR, BLOCK_N))
                    else:
                        for h in gl.static_range(BLOCK_N // SUB):
                            sub = st + h * SUB
                            pg = _page_ids(KV_INDICES, kv_base, sub, kv_end, SUB, PAGE_SIZE, PAGED, LOAD_LAYOUT)
                            _issue_kv_load(K, V, _slot_rows(k_ring, slot, h * SUB, SUB, BLOCK_N),
                                           _slot_rows(v_ring, slot, h * SUB, SUB, BLOCK_N), kv_base, sub, kv_end,
                                           k_head_off, v_head_off,
                                           stride_kp, stride_ks, stride_vp, stride_vs, pg, SUB, HEAD_DIM, PAGE_SIZE,
                                           PAGED, LOAD_LAYOUT)
                        mbarrier.arrive(ready.index(slot))
                    async_copy.mbarrier_arrive(ready.index(slot), increment_count=False)
                    it += 1
            else:
                pg_next = _page_ids(KV_INDICES, kv_base, kv_start, kv_end, SUB, PAGE_SIZE, PAGED, LOAD_LAYOUT)
                for j in range(0, gl.cdiv(kv_end - kv_start, BLOCK_N)):
                    slot = it % STAGES
                    for h in gl.static_range(BLOCK_N // SUB):
                        st = kv_start + j * BLOCK_N + h * SUB
                        # page ids one copy ahead: their load latency hides behind the wait and the copies
                        pg = pg_next
                        pg_next = _page_ids(KV_INDICES, kv_base, st + SUB, kv_end, SUB, PAGE_SIZE, PAGED,
                                            LOAD_LAYOUT)
                        if h == 0:
                            # the consumers released this slot's previous block (a fresh barrier passes parity 1)
                            mbarrier.wait(empty.index(slot), ((it // STAGES) & 1) ^ 1)
                        _issue_kv_load(K, V, _slot_rows(k_ring, slot, h * SUB, SUB, BLOCK_N),
                                       _slot_rows(v_ring, slot, h * SUB, SUB, BLOCK_N), kv_base, st, kv_end,
                                       k_head_off, v_head_off, stride_kp,
                                       stride_ks, stride_vp, stride_vs, pg, SUB, HEAD_DIM, PAGE_SIZE, PAGED,
                                       LOAD_LAYOUT)
                    async_copy.mbarrier_arrive(ready.index(slot), increment_count=False)
                    it += 1

    @gluon.jit
    def _ws_kv_start(wp, KV_ALIGN: gl.constexpr):
        """Where a work item's KV blocks start: its first KV position (field 3), rounded down to a multiple of
        KV_ALIGN (> 1 with a window, whose items start anywhere: the producer's bulk copies want blocks that start
        on a page; the positions before the item's own start are masked off, _ws_item's kv_lo)."""
        kv_start = gl.load(wp + 3)
        if KV_ALIGN > 1:
            kv_start = kv_start - (kv_start.to(gl.uint32) % KV_ALIGN).to(gl.int32)
        return kv_start

    @gluon.jit
    def _ws_item(wp, window_left, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr, WINDOW: gl.constexpr,
                 KV_ALIGN: gl.constexpr):
        """A work item's fields and KV blocks: (q_start, q_len, kv_start (_ws_kv_start), kv_lo (the item's own
        first position), kv_end, diag, partial, blocks, and the blocks that need no mask: [full_lo, full_hi), all
        rows of the tile see all their columns (the others cross the causal diagonal, the end of the KV, or with
        a window a row's first visible column or the item's start))."""
        q_start = gl.load(wp)
        q_len = gl.load(wp + 1)
        kv_lo = gl.load(wp + 3)
        kv_start = _ws_kv_start(wp, KV_ALIGN)
        kv_end = gl.load(wp + 4)
        diag = gl.load(wp + 5)
        partial = gl.load(wp + 6)
        hi_lim = kv_end
        if CAUSAL:
            hi_lim = gl.minimum(kv_end, diag + 1)
        full_hi = kv_start + gl.maximum(hi_lim - kv_start, 0) // BLOCK_N * BLOCK_N
        full_lo = kv_start
        if WINDOW:  # the tile's last row sees from diag + q_len - 1 - window_left on
            need = gl.maximum(diag + q_len - 1 - window_left, kv_lo)
            full_lo = kv_start + gl.cdiv(gl.maximum(need - kv_start, 0), BLOCK_N) * BLOCK_N
        return (q_start, q_len, kv_start, kv_lo, kv_end, diag, partial, gl.cdiv(kv_end - kv_start, BLOCK_N),
                full_lo, full_hi)

    @gluon.jit
    def _needs_mask(start, full_lo, full_hi, WINDOW: gl.constexpr):
        """Whether the KV block at ``start`` needs a mask (_ws_item's full_lo / full_hi; full_lo is the item's
        start without a window)."""
        if WINDOW:
            return (start >= full_hi) | (start < full_lo)
        else:
            return start >= full_hi

    @gluon.jit
    def _ws_wait_ready(ready, it, STAGES: gl.constexpr):
        slot = it % STAGES
        mbarrier.wait(ready.index(slot), (it // STAGES) & 1)
        fence_async_shared()  # the producer's copies (generic proxy) before the wgmma reads (async proxy)
        return slot

    @gluon.jit
    def _ws_fetch_q(Q, q_dst, WORK, rnd, n_rounds, tasks_per_item, n_hsplit, band, n_items, stride_qt, stride_qh,
                    group_size, heads_per_prog, ROW0: gl.constexpr, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr,
                    LOAD_LAYOUT: gl.constexpr):
        """cp.async of rows ROW0 .. ROW0 + BLOCK_M of round rnd's query tile into q_dst (rows not in use, and
        every row from rnd = n_rounds on, a round this program does not take, read as zeros), one commit group."""
        # (a program with no task has n_rounds 0: round 0's item is not read, and no index goes negative)
        ok = rnd < n_rounds
        wp, _, kvh, hsplit = _ws_task(WORK, gl.maximum(gl.minimum(rnd, n_rounds - 1), 0), tasks_per_item, n_hsplit,
                                      band, n_items)
        ptrs, rows = _q_tile(Q, ROW0, BLOCK_M, HEAD_DIM, LOAD_LAYOUT, gl.load(wp, mask=ok, other=0),
                             gl.load(wp + 1, mask=ok, other=0), kvh, hsplit, group_size, heads_per_prog, stride_qt,
                             stride_qh)
        async_copy.async_copy_global_to_shared(q_dst, ptrs, mask=rows & ok)
        async_copy.commit_group()

    @gluon.jit
    def _ws_consumer(Q, O, LSE, TMP_O, TMP_LSE, WORK, COUNTERS, SPLITS, ARRIVALS, k_ring, v_ring, ready, empty,
                     stride_qt, stride_qh, stride_ot, stride_oh, stride_lt, stride_tt, stride_th, stride_tl,
                     num_kv_heads, group_size, heads_per_prog, qk_scale, soft_cap_log2, window_left, q_all,
                     HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
                     WRITE_LSE: gl.constexpr, STAGES: gl.constexpr, CONSUMER_WARPS: gl.constexpr,
                     WG: gl.constexpr, Q_SMEM: gl.constexpr, Q_AHEAD: gl.constexpr, SOFTCAP: gl.constexpr,
                     WINDOW: gl.constexpr, KV_ALIGN: gl.constexpr, SINKS):
        """One consumer warp group: rows WG * BLOCK_M .. of each task's tile (BLOCK_M = 64). Q_SMEM: the
        Q K^T wgmma reads Q from shared memory (q_all[WG]) instead of registers (32 registers per thread
        fewer at head_dim 128: room for 128-token KV blocks). Q_AHEAD: the next task's Q is copied into q_all[WG]
        ahead of time (cp.async: no registers held), as soon as this task's MMAs no longer read it (Q in
        registers: right after it is loaded; Q_SMEM: after the KV loop), so that its latency does not delay the
        next task's first wgmma (many short tasks: batched short prompts)."""
        ROW0: gl.constexpr = WG * BLOCK_M
        dtype: gl.constexpr = Q.dtype.element_ty
        S_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[CONSUMER_WARPS, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        O_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[CONSUMER_WARPS, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        P_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_LAYOUT, k_width=2)
        Q_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=S_LAYOUT, k_width=2)
        TPW_D: gl.constexpr = HEAD_DIM // 8
        LOAD_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_D, TPW_D], [CONSUMER_WARPS, 1], [1, 0])
        SROW_L: gl.constexpr = gl.SliceLayout(1, S_LAYOUT)
        OROW_L: gl.constexpr = gl.SliceLayout(1, O_LAYOUT)
        n_rounds, tasks_per_item, n_hsplit = _ws_schedule(COUNTERS, num_kv_heads, group_size, heads_per_prog)
        SPLITS = SPLITS + gl.load(COUNTERS + 3)  # where the split table starts in the plan buffer
        band, n_items = _ws_band(COUNTERS, tasks_per_item)
        it = 0
        if Q_AHEAD:
            _ws_fetch_q(Q, q_all.index(WG), WORK, 0, n_rounds, tasks_per_item, n_hsplit, band, n_items, stride_qt,
                        stride_qh, group_size, heads_per_prog, ROW0, BLOCK_M, HEAD_DIM, LOAD_LAYOUT)
        for rnd in range(0, n_rounds):
            wp, rem, kvh, hsplit = _ws_task(WORK, rnd, tasks_per_item, n_hsplit, band, n_items)
            q_start, q_len, kv_start, kv_lo, kv_end, diag, partial, n_blocks, full_lo, full_hi = _ws_item(
                wp, window_left, BLOCK_N, CAUSAL, WINDOW, KV_ALIGN)

            if Q_AHEAD:
                async_copy.wait_group(0)  # this thread's copies of the task's Q landed
                if Q_SMEM:
                    fence_async_shared()  # (the wgmma reads them)
                _cta_barrier()  # everyone's
                if Q_SMEM:
                    q_op = q_all.index(WG)
                else:
                    q_op = q_all.index(WG).load(Q_LAYOUT)
                    _cta_barrier()  # every warp has read it: the next task's Q may come in now
                    _ws_fetch_q(Q, q_all.index(WG), WORK, rnd + 1, n_rounds, tasks_per_item, n_hsplit, band,
                                n_items, stride_qt, stride_qh, group_size, heads_per_prog, ROW0, BLOCK_M, HEAD_DIM,
                                LOAD_LAYOUT)
            else:
                ptrs, rows = _q_tile(Q, ROW0, BLOCK_M, HEAD_DIM, LOAD_LAYOUT, q_start, q_len, kvh, hsplit, group_size,
                                     heads_per_prog, stride_qt, stride_qh)
                q = gl.load(ptrs, mask=rows, other=0.0)
                if Q_SMEM:
                    q_op = q_all.index(WG)
                    _cta_barrier()  # the group's MMAs of the last task are done with it
                    q_op.store(q)
                    fence_async_shared()
                    _cta_barrier()
                else:
                    q_op = gl.convert_layout(q, Q_LAYOUT)

            row_hi = diag + (ROW0 + gl.arange(0, BLOCK_M, layout=SROW_L)) // heads_per_prog
            row_lo = row_hi
            if WINDOW:  # a row's first visible column: its window's, or the item's first (a chunk of a split tile)
                row_lo = gl.maximum(row_hi - window_left, kv_lo)
            m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=SROW_L)
            l_i = gl.full([BLOCK_M], 0.0, gl.float32, layout=SROW_L)
            acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=O_LAYOUT)
            if n_blocks > 0:
                slot = _ws_wait_ready(ready, it, STAGES)
                s = warpgroup_mma(q_op, k_ring.index(slot).permute((1, 0)),
                                  gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=S_LAYOUT), use_acc=False,
                                  is_async=True)
                s = warpgroup_mma_wait(0, deps=(s,))
                p_f, m_i, l_i, alpha = _softmax_block(s, m_i, l_i, kv_start, kv_end, row_hi, row_lo, qk_scale,
                                                      soft_cap_log2, _needs_mask(kv_start, full_lo, full_hi, WINDOW),
                                                      CAUSAL, WINDOW, SOFTCAP, BLOCK_N, S_LAYOUT)
                p = gl.convert_layout(p_f.to(dtype), P_LAYOUT)
                prev = slot
                it += 1
                for j in range(1, n_blocks):
                    start = kv_start + j * BLOCK_N
                    slot = _ws_wait_ready(ready, it, STAGES)
                    s = warpgroup_mma(q_op, k_ring.index(slot).permute((1, 0)),
                                      gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=S_LAYOUT), use_acc=False,
                                      is_async=True)
                    # O += P_{j-1} V_{j-1}, queued behind S_j: it runs during this block's softmax
                    acc = warpgroup_mma(p, v_ring.index(prev), acc, is_async=True)
                    s = warpgroup_mma_wait(1, deps=(s,))
                    p_f, m_i, l_i, alpha = _softmax_block(s, m_i, l_i, start, kv_end, row_hi, row_lo, qk_scale,
                                                          soft_cap_log2, _needs_mask(start, full_lo, full_hi, WINDOW),
                                                          CAUSAL, WINDOW, SOFTCAP, BLOCK_N, S_LAYOUT)
                    acc = warpgroup_mma_wait(0, deps=(acc,))
                    _cta_barrier()  # every warp of this group is done with block j - 1's slot
                    mbarrier.arrive(empty.index(prev))
                    acc = acc * gl.expand_dims(gl.convert_layout(alpha, OROW_L), 1)
                    p = gl.convert_layout(p_f.to(dtype), P_LAYOUT)
                    prev = slot
                    it += 1
                acc = warpgroup_mma(p, v_ring.index(prev), acc, is_async=True)
                acc = warpgroup_mma_wait(0, deps=(acc,))
                _cta_barrier()
                mbarrier.arrive(empty.index(prev))
            if Q_AHEAD and Q_SMEM:
                _cta_barrier()  # the group's MMAs are done with q_all[WG] (also when the task had no KV block)
                _ws_fetch_q(Q, q_all.index(WG), WORK, rnd + 1, n_rounds, tasks_per_item, n_hsplit, band, n_items,
                            stride_qt, stride_qh, group_size, heads_per_prog, ROW0, BLOCK_M, HEAD_DIM, LOAD_LAYOUT)
            _epilogue(acc, m_i, l_i, partial, wp, rem, tasks_per_item, q_start, q_len, kvh, hsplit, group_size,
                      heads_per_prog, O, LSE, TMP_O, TMP_LSE, SPLITS, ARRIVALS, stride_ot, stride_oh, stride_lt,
                      stride_tt, stride_th, stride_tl, BLOCK_M, HEAD_DIM, WRITE_LSE, O_LAYOUT, LOAD_LAYOUT,
                      ROW0, WG, 2, SINKS=SINKS)

    @gluon.jit
    def prefill_sm90_ws_kernel(
        Q, K, V, O, LSE, TMP_O, TMP_LSE, WORK, COUNTERS, KV_INDICES, SPLITS, ARRIVALS, KD, VD,
        stride_qt, stride_qh,
        stride_kp, stride_ks, stride_kh,
        stride_vp, stride_vs, stride_vh,
        stride_ot, stride_oh, stride_lt,
        stride_tt, stride_th, stride_tl,
        num_kv_heads, group_size, heads_per_prog, qk_scale, tma_rpp, tma_hrows, tma_hcols, soft_cap_log2,
        window_left,
        HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, PAGE_SIZE: gl.constexpr,
        PAGED: gl.constexpr, CAUSAL: gl.constexpr, WRITE_LSE: gl.constexpr, STAGES: gl.constexpr,
        PRODUCER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr,
        Q_SMEM: gl.constexpr = False, TMA: gl.constexpr = False, Q_AHEAD: gl.constexpr = False,
        SOFTCAP: gl.constexpr = False, WINDOW: gl.constexpr = False, SINKS=None,
    ):
        """The arguments of kernels/attention.py's attention_kernel that a 16-bit prefill uses, plus the
        register budgets of the producer and of the second consumer (module docstring). Launch with
        num_warps=4: the first consumer warp group (rows 0-63 of each 128-row tile); the second (rows
        64-127) and the producer are 8 more warps. Q_SMEM: Q K^T reads Q from shared memory (for 128-token
        blocks); TMA: the producer bulk-copies whole KV blocks through the tensor descriptors KD / VD, row
        page * tma_rpp + slot + kv_head * tma_hrows, column kv_head * tma_hcols (tma_views(); without TMA,
        KD / VD are not read); Q_AHEAD: each consumer group copies the next task's Q into shared memory while
        this task runs (_ws_consumer). SOFTCAP: logits soft cap (qk_scale = sm_scale / cap, soft_cap_log2 = cap *
        log2(e), kernels/attention.py's convention); WINDOW: a sliding window of window_left columns left of each
        row's diagonal (the plan's items start where their first row's window does; with TMA the blocks start on
        the page below, _ws_kv_start). SINKS (None: none): float32 attention-sink logits per query head
        (_epilogue)."""
        gl.static_assert(num_warps == 4, "launch with num_warps=4 (one consumer warp group)")
        # with a window and bulk copies, blocks start on a copy boundary (_ws_kv_start); elsewhere where the item does
        KV_ALIGN: gl.constexpr = ((min(PAGE_SIZE, BLOCK_N) if PAGED else BLOCK_N) if (WINDOW and TMA) else 1)
        dtype: gl.constexpr = Q.dtype.element_ty
        SMEM_LAYOUT: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        k_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], SMEM_LAYOUT)
        v_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], SMEM_LAYOUT)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            # one cp.async arrival per producer thread (and with TMA one more: _ws_producer)
            mbarrier.init(ready.index(i), count=4 * 32 + (1 if TMA else 0))
            mbarrier.init(empty.index(i), count=2)  # one arrival per consumer warp group
        HALF: gl.constexpr = BLOCK_M // 2
        if Q_SMEM or Q_AHEAD:
            q_all = gl.allocate_shared_memory(dtype, [2, HALF, HEAD_DIM], SMEM_LAYOUT)
        else:
            q_all = k_ring  # (not read)
        gl.warp_specialize([
            (_ws_consumer, (Q, O, LSE, TMP_O, TMP_LSE, WORK, COUNTERS, SPLITS, ARRIVALS, k_ring, v_ring, ready, empty,
                            stride_qt, stride_qh, stride_ot, stride_oh, stride_lt, stride_tt, stride_th,
                            stride_tl, num_kv_heads, group_size, heads_per_prog, qk_scale, soft_cap_log2,
                            window_left, q_all, HEAD_DIM, HALF, BLOCK_N, CAUSAL, WRITE_LSE, STAGES, 4, 0, Q_SMEM,
                            Q_AHEAD, SOFTCAP, WINDOW, KV_ALIGN, SINKS)),
            (_ws_consumer, (Q, O, LSE, TMP_O, TMP_LSE, WORK, COUNTERS, SPLITS, ARRIVALS, k_ring, v_ring, ready, empty,
                            stride_qt, stride_qh, stride_ot, stride_oh, stride_lt, stride_tt, stride_th,
                            stride_tl, num_kv_heads, group_size, heads_per_prog, qk_scale, soft_cap_log2,
                            window_left, q_all, HEAD_DIM, HALF, BLOCK_N, CAUSAL, WRITE_LSE, STAGES, 4, 1, Q_SMEM,
                            Q_AHEAD, SOFTCAP, WINDOW, KV_ALIGN, SINKS)),
            (_ws_producer, (K, V, KD, VD, WORK, COUNTERS, KV_INDICES, k_ring, v_ring, ready, empty,
                            stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
                            tma_rpp, tma_hrows, tma_hcols, num_kv_heads, group_size, heads_per_prog,
                            HEAD_DIM, BLOCK_N, PAGE_SIZE, PAGED, STAGES, 4, TMA, KV_ALIGN)),
        ], [4, 4], [CONSUMER_REGS, PRODUCER_REGS])

    def tma_views(k, v, strides_k, strides_v, paged: bool, page_size: int, block_n: int, head_dim: int,
                  num_kv_heads: int):
        """(KD, VD, rows per page, rows per KV head, columns per KV head) for the producer's bulk copies
        (prefill_sm90_ws_kernel's TMA), or None where they do not apply. The cache (or ragged K / V) is viewed
        as a 2-D tensor of token rows (its slot stride; ragged: token stride) with the KV heads side by side in
        a row (NHD) or in whole rows apart (HND); a copy is [TR, head_dim] with TR = min(page_size, block_n)
        (ragged: block_n). Needs K and V of one geometry, 16-byte aligned rows and bases, pages of >= 8 tokens
        that split or fill a KV block (a power of two)."""
        if strides_k != strides_v or k.dtype != v.dtype or k.element_size() != 2:
            return None
        sp, ss, sh = strides_k
        if paged:
            if page_size < 8 or page_size & (page_size - 1):
                return None
            rs, tr = ss, min(page_size, block_n)
        else:
            rs, tr = sp, block_n
        if rs <= 0 or rs % 8 or sp % rs or min(sh, sp) < 0:
            return None
        if (num_kv_heads - 1) * sh + head_dim <= rs:  # heads side by side in a row (NHD, ragged)
            hrows, hcols, cols = 0, sh, (num_kv_heads - 1) * sh + head_dim
        elif sh % rs == 0 and head_dim <= rs:  # heads whole rows apart (HND)
            hrows, hcols, cols = sh // rs, 0, head_dim
        else:
            return None
        layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        descs = []
        for t in (k, v):
            if t.data_ptr() % 16 or t.numel() == 0:
                return None
            rows = sum((n - 1) * st for n, st in zip(t.shape, t.stride())) // rs + 1
            if rows >= 2**31:  # (copy coordinates are 32-bit)
                return None
            descs.append(TensorDescriptor(t, [rows, cols], [rs, 1], [tr, head_dim], layout))
        return descs[0], descs[1], sp // rs, hrows, hcols
