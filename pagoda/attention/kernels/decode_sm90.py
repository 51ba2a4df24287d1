"""Decode on Hopper (sm_90), in Gluon, over 16-bit and fp8 (e4m3 / e5m2) paged caches: the Triton kernel's work
list, with the operands of both MMAs swapped (the KV block is the MMA's M).

Why (benchmarks/results/notes.md, sessions 9-12): P V contracts over tokens, so an MMA operand built from V holds
pairs of tokens at one head-dim column, a transposed read that no load gives for 8-bit data on sm_90. The Triton
kernel reads fp8 V one byte per instruction and marshals q's fragments every block: 706 instructions per 64-token
block, issue-bound at ~1.25x the bf16 decode's KV tokens/s where the halved bytes promise ~1.8x. And its decode
tile is 16 query rows of which one-query decode uses the group's 4.

Here S^T = K Q^T and O^T = V^T P^T (wgmma, one warpgroup): the KV block is the MMA's M (64 tokens, or the
head_dim rows of O^T), the tile's query rows its N (the group's heads, at least 8: nothing padded to 64 rows),
and K and V are the A operands:
- a 16-bit cache: both read straight from the shared-memory ring (wgmma transposes 16-bit A operands for V^T);
- fp8, in registers. K (tokens x head_dim) is read from the ring in the A-fragment layout itself: a thread's
  pairs are two adjacent bytes of a row (16-bit loads, conflict-free under the ring's 16-byte swizzle),
  converted in place. V^T (head_dim x tokens) wants pairs of tokens at one head-dim row: the head-dim rows are
  renumbered (MMA row m is head-dim column unperm(m)) so that a thread's register rows are adjacent bytes of one
  token: 32-bit loads through a shared-memory view (_v_view) with the renumbering and the ring's swizzle in it,
  a conversion, then a register shuffle (one PRMT per pair) into A fragments. O^T's rows come out renumbered
  and the epilogue stores them through the same map (prefill_sm90._epilogue's DIM_PERM).
Q^T and P^T are the B operands in shared memory; the softmax runs along M (each warp's column max over its 16
tokens, one exchange through shared memory), the row sums stay per thread until the task ends. SASS per
64-token block at head_dim 128 and 8 rows, 2 stages (`python scripts/sass_loop.py decode_sm90`): fp8 356
instructions (the Triton kernel 706), bf16 362 (the Triton kernel ~580). On the H200 (session 12,
scripts/fp8_probe.py): fp8 1.7-1.9x the bf16 decode's KV tokens/s where that is bandwidth-bound; over bf16
1.00-1.22x the Triton kernel (the long and small decodes gain most).

fp8: queries compute in fp16 (bf16 queries are clamped to fp16's range, as in kernels/attention.py), the cache's
scales fold into the logits' scale and the output. Tasks (item, KV head, head split) go over the persistent grid
in the snake order of kernels/prefill_sm90.py; split tiles write partial states and the last chunk merges them
(_epilogue). Scope: decode plans (one query per request), head_dim 64 / 128 / 256, groups up to 16, sliding windows
and logits soft caps, no variant / custom mask, not a cascade level; the runner uses the Triton kernel for everything
else (PAGODA_DECODE_KERNEL=triton / PAGODA_FP8_DECODE_KERNEL=triton force it).
"""
from __future__ import annotations

from .prefill_sm90 import HAVE_GLUON

if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import async_copy, fence_async_shared, warpgroup_mma

    from .prefill_sm90 import (TRACE_ROUNDS, TRACE_SLOTS, _cta_barrier, _epilogue, _globaltimer, _issue_kv_load,
                               _page_ids, _q_tile, _soft_cap, _stamp, _ws_schedule, _ws_task)

    @gluon.constexpr_function
    def _regs_first(ll, dim):
        """The linear layout ll with its register bases along dimension ``dim`` moved first (same lanes /
        warps: converting between the two is a register shuffle)."""
        regs = [b for b in ll.reg_bases if b[1 - dim] == 0 and b[dim] != 0]
        rest = [b for b in ll.reg_bases if b not in regs]
        return gl.DistributedLinearLayout(regs + rest, ll.lane_bases, ll.warp_bases, ll.block_bases, ll.shape)

    @gluon.constexpr_function
    def _row_order(ll):
        """perm[i] = the M row (power of two) that head-dim bit i holds: the register rows of ll first
        (contiguous bytes per thread), then the lanes' and warps' rows."""
        regs = [b[0] for b in ll.reg_bases if b[1] == 0 and b[0] != 0]
        lanes = [b[0] for b in ll.lane_bases if b[1] == 0 and b[0] != 0]
        warps = [b[0] for b in ll.warp_bases if b[1] == 0 and b[0] != 0]
        return tuple(regs + lanes + warps)

    @gluon.constexpr_function
    def _ring_swizzle(HEAD_DIM):
        """(per_phase, max_phase) of the fp8 ring: 16-byte chunks of a row XORed with the row's phase, one phase
        per 128 bytes of rows (Triton's usual swizzle for 8-bit rows of HEAD_DIM bytes)."""
        return max(1, 128 // HEAD_DIM), min(8, HEAD_DIM // 16)

    @gluon.constexpr_function
    def _v_view(perm, BLOCK_N, HEAD_DIM):
        """Shared-memory view of a ring slot (BLOCK_N rows of HEAD_DIM bytes, swizzled as _ring_swizzle says) as
        V^T [HEAD_DIM, BLOCK_N] with the head-dim rows renumbered by perm: offset bit -> (m, t)."""
        per_phase, max_phase = _ring_swizzle(HEAD_DIM)
        bases = [[perm[i], 0] for i in range(len(perm))]
        for b in range(BLOCK_N.bit_length() - 1):
            # row bit b is phase bit k = b - log2(per_phase), which flips chunk bit k (head-dim bit 4 + k)
            k = b - (per_phase.bit_length() - 1)
            bases.append([perm[4 + k] if 0 <= k < max_phase.bit_length() - 1 else 0, 1 << b])
        return gl.SharedLinearLayout(bases)

    @gluon.constexpr_function
    def _warp_partials(ll):
        """[4, N] (one row per warp) with every thread holding the 4 rows of its columns of ll ([M, N], warps along
        M): the max over dimension 0 then lands in ll's column slice."""
        col = lambda bs: [[0, b[1]] for b in bs]  # noqa: E731
        return gl.DistributedLinearLayout([[1, 0], [2, 0]] + [b for b in col(ll.reg_bases) if b[1]],
                                          col(ll.lane_bases), col(ll.warp_bases), [], [4, ll.shape[1]])

    @gluon.constexpr_function
    def _transposed(ll):
        t = lambda bs: [[b[1], b[0]] for b in bs]  # noqa: E731
        return gl.DistributedLinearLayout(t(ll.reg_bases), t(ll.lane_bases), t(ll.warp_bases), t(ll.block_bases),
                                          [ll.shape[1], ll.shape[0]])

    @gluon.jit
    def _decode_task(WORK, rnd, tasks_per_item, n_hsplit, ok, nprog=None):
        """Round rnd's task (prefill_sm90._ws_task, item by item, over the first nprog programs) and the fields of
        its work item that a decode uses, loaded under ``ok``: (wp, task slot, KV head, head split, q_start, q_len,
        kv_base, kv_start, kv_end, partial)."""
        wp, rem, kvh, hsplit = _ws_task(WORK, rnd, tasks_per_item, n_hsplit, 0, 0, nprog)
        return (wp, rem, kvh, hsplit, gl.load(wp, mask=ok, other=0), gl.load(wp + 1, mask=ok, other=0),
                gl.load(wp + 2, mask=ok, other=0), gl.load(wp + 3, mask=ok, other=0), gl.load(wp + 4, mask=ok, other=0),
                gl.load(wp + 6, mask=ok, other=0))

    @gluon.jit
    def _ahead_of_last(st, diag, kv_end, BLOCK_N: gl.constexpr):
        """1 (int32) when KV block st .. st + BLOCK_N holds no token the kernel ahead may write under EARLY_KV: it
        ends at or before the request's last token diag, or lies past the range's end kv_end; else 0."""
        return ((st + BLOCK_N <= diag) | (st >= kv_end)).to(gl.int32)

    @gluon.jit
    def decode_sm90_kernel(
        Q, K, V, O, LSE, TMP_O, TMP_LSE, WORK, COUNTERS, KV_INDICES, SPLITS, ARRIVALS, K_SCALE, V_SCALE,
        stride_qt, stride_qh,
        stride_kp, stride_ks, stride_kh,
        stride_vp, stride_vs, stride_vh,
        stride_ot, stride_oh, stride_lt,
        stride_tt, stride_th, stride_tl,
        num_kv_heads, group_size, heads_per_prog, qk_scale, k_scale, v_scale, stride_ksh, stride_vsh, soft_cap_log2,
        HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, PAGE_SIZE: gl.constexpr,
        WRITE_LSE: gl.constexpr, SCALE_PTR: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr,
        SAME_STRIDES: gl.constexpr = False, MERGE_ROWS: gl.constexpr = 0, TRACE=None, PDL: gl.constexpr = False,
        EARLY_PAGES: gl.constexpr = False, EARLY_KV: gl.constexpr = False, SOFTCAP: gl.constexpr = False,
        SINKS=None,
    ):
        """The arguments of kernels/attention.py's attention_kernel that an fp8 decode uses (qk_scale =
        sm_scale * log2(e); k_scale / v_scale and, with SCALE_PTR, per-KV-head K_SCALE / V_SCALE). One warpgroup
        (num_warps 4), BLOCK_N 64, HEAD_DIM 64, 128 or 256 (a 16-bit ring of 64 KB a stage: one program per SM),
        BLOCK_M (the tile's query rows, the MMA's N) 8 or 16.
        SAME_STRIDES: K and V have the same page and slot strides (one row offset for both). MERGE_ROWS: the
        query heads' rows of a tile, a power of two (prefill_sm90._merge_one_query; 0: merge all BLOCK_M rows).
        TRACE (probes only, scripts/decode_timeline.py): int64 [programs, 1 + TRACE_SLOTS * TRACE_ROUNDS] of
        %globaltimer stamps: the program's start, then per round its task's start, its first KV block landed, its
        loop's end, its epilogue's end, and for a split chunk its partial stored, its arrival counted and (the
        merging chunk) its merge's first round summed (prefill_sm90._stamp).
        PDL (a programmatic dependent launch, ops/kernels/pdl.py): the plan's header and the first work item load
        before griddepcontrol.wait, which the queries and the cache (RoPE + append's output, in the engine) wait
        behind; the plan was written before the kernel ahead of this one ran, as was everything the epilogue
        touches. The kernels after this one launch when it ends (no early trigger: they would hold SM slots; an
        early trigger right after the wait, with the o projection's first weight blocks loaded before its own
        wait, made the engine's batch-1 step 0.05-0.09 ms slower: H200, session 19, removed in session 20).
        EARLY_PAGES (with PDL; PAGODA_DECODE_EARLY_PAGES, default on): round 0's first KV block's page ids
        load before the wait too (the page table is the plan's), so after it the block's copies go out at once
        instead of one page-id round trip later.
        EARLY_KV (with PDL; the caller's promise, run(pdl_early_kv=True): the kernel ahead writes no KV but each
        request's last token, the decode step's own K / V): round 0's first blocks (up to STAGES - 1, those before
        the block that holds the request's last token, work item field 5) are copied into the ring before the
        wait, so their DRAM round trip overlaps the kernel ahead; the rest of the prologue after it, in order
        (one commit group a block either way).
        SOFTCAP: logits soft cap (qk_scale = sm_scale / cap, soft_cap_log2 = cap * log2(e), prefill_sm90._soft_cap).
        A sliding window needs nothing here: a decode item's KV range is the query's window (plan.plan_work).
        SINKS (None: none): float32 attention-sink logits per query head (prefill_sm90._epilogue)."""
        gl.static_assert(num_warps == 4)
        gl.static_assert(BLOCK_N == 64)
        gl.static_assert(HEAD_DIM == 64 or HEAD_DIM == 128 or HEAD_DIM == 256)
        ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, BLOCK_M, 16])
        A_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ACC, k_width=2)
        K_LOAD: gl.constexpr = gl.to_linear_layout(A_L, [BLOCK_N, HEAD_DIM])
        V_LOAD: gl.constexpr = _regs_first(gl.to_linear_layout(A_L, [HEAD_DIM, BLOCK_N]), 0)
        PERM: gl.constexpr = _row_order(V_LOAD)
        V_VIEW: gl.constexpr = _v_view(PERM, BLOCK_N, HEAD_DIM)
        # a 16-bit cache: both MMAs read K / V^T straight from the ring (wgmma transposes 16-bit A operands)
        KV16: gl.constexpr = K.dtype.element_ty.primitive_bitwidth == 16
        CDT: gl.constexpr = K.dtype.element_ty if KV16 else gl.float16  # the MMAs' operand type
        O_T: gl.constexpr = _transposed(gl.to_linear_layout(ACC, [HEAD_DIM, BLOCK_M]))
        TPW_D: gl.constexpr = HEAD_DIM // 8
        LOAD: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_D, TPW_D], [num_warps, 1], [1, 0])
        VEC: gl.constexpr = 8 if KV16 else 16  # the copies: 16 bytes per thread and row
        COPY: gl.constexpr = gl.BlockedLayout([1, VEC], [32 * VEC // HEAD_DIM, HEAD_DIM // VEC], [num_warps, 1], [1, 0])
        if KV16:
            RING: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        else:
            RING: gl.constexpr = gl.SwizzledSharedLayout(16, _ring_swizzle(HEAD_DIM)[0], _ring_swizzle(HEAD_DIM)[1],
                                                         [1, 0])
        Q_SL: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        P_SL: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        COL_L: gl.constexpr = gl.SliceLayout(0, ACC)  # per query row of S^T / O^T
        RED: gl.constexpr = _warp_partials(gl.to_linear_layout(ACC, [BLOCK_N, BLOCK_M]))
        k_ring = gl.allocate_shared_memory(K.dtype.element_ty, [STAGES, BLOCK_N, HEAD_DIM], RING)
        v_ring = gl.allocate_shared_memory(V.dtype.element_ty, [STAGES, BLOCK_N, HEAD_DIM], RING)
        q_s = gl.allocate_shared_memory(CDT, [BLOCK_M, HEAD_DIM], Q_SL)
        p_s = gl.allocate_shared_memory(CDT, [BLOCK_M, BLOCK_N], P_SL)
        red_s = gl.allocate_shared_memory(gl.float32, [4, BLOCK_M], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
        # round 0's work item loads before the plan's header: the header (task count, offsets) and the item go
        # out together, not one round trip after the other (plan() keeps room for grid / tasks_per_item items,
        # so the item of a task past the end is still in the buffer; no such program enters the loop)
        n_hsplit = gl.cdiv(group_size, heads_per_prog)
        tasks_per_item = num_kv_heads * n_hsplit
        (nwp, nrem, nkvh, nhsplit, nq_start, nq_len, nkv_base, nkv_start, nkv_end,
         npartial) = _decode_task(WORK, 0, tasks_per_item, n_hsplit, True)
        # the programs that take tasks: the plan's (header field ACTIVE_AT, runner.balanced_grid; at most the grid,
        # whose other programs take none); round 0's task is the program's own, whatever that count
        nprog = gl.load(COUNTERS + 6)  # (kernels/attention.py ACTIVE_AT)
        n_rounds, _, _ = _ws_schedule(COUNTERS, num_kv_heads, group_size, heads_per_prog, nprog)
        SPLITS = SPLITS + gl.load(COUNTERS + 3)  # where the split table and the page ids start in the plan
        KV_INDICES = KV_INDICES + gl.load(COUNTERS + 4)  # buffer (header fields SPLITS_AT, INDICES_AT)
        if PDL and EARLY_PAGES:  # (a constexpr False short-circuits: without it nothing of this is built)
            # (a program without a task reads its stale item as all zeros: the plan's page ids follow its work
            # list, so a stale kv_base is any page id and could point past the page-id buffer)
            has0 = n_rounds > 0
            pages0 = _page_ids(KV_INDICES, gl.where(has0, nkv_base, 0), gl.where(has0, nkv_start, 0),
                               gl.where(has0, nkv_end, 0), BLOCK_N, PAGE_SIZE, True, COPY)
        diag0 = 0
        if PDL and EARLY_KV:
            # (a program without a task must not read KV through a stale item: the plan keeps room for one)
            early = (n_rounds > 0).to(gl.int32)
            diag0 = gl.load(nwp + 5, mask=n_rounds > 0, other=0)  # the request's last token: the one being written
            for i in gl.static_range(STAGES - 1):
                st = nkv_start + i * BLOCK_N
                early = early * _ahead_of_last(st, diag0, nkv_end, BLOCK_N)  # a prefix of blocks
                if early != 0:
                    if EARLY_PAGES and i == 0:
                        pages = pages0
                    else:
                        pages = _page_ids(KV_INDICES, nkv_base, st, nkv_end, BLOCK_N, PAGE_SIZE, True, COPY)
                    _issue_kv_load(K, V, k_ring.index(i), v_ring.index(i), nkv_base, st, nkv_end,
                                   nkvh.to(gl.int64) * stride_kh, nkvh.to(gl.int64) * stride_vh, stride_kp,
                                   stride_ks, stride_vp, stride_vs, pages, BLOCK_N, HEAD_DIM, PAGE_SIZE, True, COPY,
                                   SAME_STRIDES)
                    async_copy.commit_group()
        if PDL:
            gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False,
                                      pack=1)
        if TRACE is not None:
            trace = TRACE + gl.program_id(0) * (1 + TRACE_SLOTS * TRACE_ROUNDS)
            gl.store(trace, _globaltimer())
            # the SM the program runs on, in the row's last slot (a stamp of round TRACE_ROUNDS - 1 that plans of
            # fewer rounds never write)
            gl.store(trace + TRACE_SLOTS * TRACE_ROUNDS,
                     gl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=gl.int32, is_pure=True,
                                               pack=1).to(gl.int64))
        for rnd in range(0, n_rounds):
            if TRACE is not None:
                _stamp(trace, rnd, 1)
            wp, rem, kvh, hsplit, q_start, q_len, kv_base, kv_start, kv_end, partial = (
                nwp, nrem, nkvh, nhsplit, nq_start, nq_len, nkv_base, nkv_start, nkv_end, npartial)
            # the next round's item loads now; the KV loop hides them
            (nwp, nrem, nkvh, nhsplit, nq_start, nq_len, nkv_base, nkv_start, nkv_end,
             npartial) = _decode_task(WORK, rnd + 1, tasks_per_item, n_hsplit, rnd + 1 < n_rounds, nprog)
            n_blocks = gl.cdiv(kv_end - kv_start, BLOCK_N)
            full_hi = kv_start + (kv_end - kv_start) // BLOCK_N * BLOCK_N
            q_ptrs, q_rows = _q_tile(Q, 0, BLOCK_M, HEAD_DIM, LOAD, q_start, q_len, kvh, hsplit, group_size,
                                     heads_per_prog, stride_qt, stride_qh)
            q = gl.load(q_ptrs, mask=q_rows, other=0.0)
            task_qk = qk_scale * k_scale
            task_v = v_scale
            if SCALE_PTR:
                task_qk = task_qk * gl.load(K_SCALE + kvh * stride_ksh)
                task_v = task_v * gl.load(V_SCALE + kvh * stride_vsh)
            k_head_off = kvh.to(gl.int64) * stride_kh
            v_head_off = kvh.to(gl.int64) * stride_vh
            _cta_barrier()  # the last task's MMAs are done with the ring and q_s
            m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=COL_L)
            l_acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=ACC)  # per-thread row sums, reduced at the end
            acc = gl.zeros([HEAD_DIM, BLOCK_M], gl.float32, layout=ACC)  # O^T, head-dim rows renumbered
            # blocks 0 .. STAGES - 2 in flight before the loop (each a commit group, empty ones past the end)
            early = (rnd == 0).to(gl.int32)
            for i in gl.static_range(STAGES - 1):
                st = kv_start + i * BLOCK_N
                if PDL and EARLY_KV:  # (round 0's blocks before the request's last one went out before the wait)
                    early = early * _ahead_of_last(st, diag0, kv_end, BLOCK_N)
                if (not (PDL and EARLY_KV)) or early == 0:
                    if PDL and EARLY_PAGES and i == 0 and rnd == 0:  # (constexpr False: only the else is built)
                        pages = pages0
                    else:
                        pages = _page_ids(KV_INDICES, kv_base, st, kv_end, BLOCK_N, PAGE_SIZE, True, COPY)
                    _issue_kv_load(K, V, k_ring.index(i), v_ring.index(i), kv_base, st, kv_end, k_head_off,
                                   v_head_off, stride_kp, stride_ks, stride_vp, stride_vs, pages, BLOCK_N, HEAD_DIM,
                                   PAGE_SIZE, True, COPY, SAME_STRIDES)
                    async_copy.commit_group()
            pages = _page_ids(KV_INDICES, kv_base, kv_start + (STAGES - 1) * BLOCK_N, kv_end, BLOCK_N, PAGE_SIZE, True,
                              COPY)
            # q into shared memory only now: waiting for its load before the page ids and the first KV copies went
            # out put one more round trip in front of every task's first block
            if not KV16:
                q = gl.minimum(gl.maximum(q.to(gl.float32), -65504.0), 65504.0).to(gl.float16)
            q_s.store(q)
            fence_async_shared()  # (the loop's first barrier makes every warp's part of q_s visible to the MMAs)
            for j in range(0, n_blocks):
                start = kv_start + j * BLOCK_N
                async_copy.wait_group(STAGES - 2)  # this thread's copies of block j landed
                if KV16:
                    fence_async_shared()  # (the MMAs read them from shared memory)
                _cta_barrier()  # everyone's; every warp is done with block j - 1 (its slot and p_s)
                if TRACE is not None:
                    if j == 0:
                        _stamp(trace, rnd, 2)
                ahead = start + (STAGES - 1) * BLOCK_N
                nxt = (j + STAGES - 1) % STAGES
                # block j + STAGES - 1 into the slot block j - 1 used (every warp passed the barrier above, so
                # none still reads it); the page ids of the block after it load meanwhile
                _issue_kv_load(K, V, k_ring.index(nxt), v_ring.index(nxt), kv_base, ahead, kv_end, k_head_off,
                               v_head_off, stride_kp, stride_ks, stride_vp, stride_vs, pages, BLOCK_N, HEAD_DIM,
                               PAGE_SIZE, True, COPY, SAME_STRIDES)
                async_copy.commit_group()
                pages = _page_ids(KV_INDICES, kv_base, ahead + BLOCK_N, kv_end, BLOCK_N, PAGE_SIZE, True, COPY)
                cur = j % STAGES
                if KV16:
                    k_op = k_ring.index(cur)
                else:
                    k_op = gl.convert_layout(k_ring.index(cur).load(K_LOAD).to(gl.float16), A_L)
                s = warpgroup_mma(k_op, q_s.permute((1, 0)), gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=ACC))
                s, scale = _soft_cap(s, task_qk, soft_cap_log2, SOFTCAP)  # (scale: task_qk, or 1 after a soft cap)
                if start >= full_hi:  # the last block: tokens past the end
                    offs_n = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, ACC))
                    s = gl.where(gl.expand_dims(offs_n < kv_end, 1), s, float("-inf"))
                # the block's column max: each warp's over its 16 rows, then one exchange through shared memory
                red_s.store(gl.max(gl.reshape(s, [4, BLOCK_N // 4, BLOCK_M]), 1))
                _cta_barrier()
                m_blk = gl.convert_layout(gl.max(red_s.load(RED), 0), COL_L)
                m_new = gl.maximum(m_i, m_blk * scale)
                m_new = gl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = gl.exp2(m_i - m_new)
                p = gl.exp2(s * scale - gl.expand_dims(m_new, 0))
                l_acc = l_acc * gl.expand_dims(alpha, 0) + p
                m_i = m_new
                p_s.store(gl.permute(p.to(CDT), (1, 0)))
                fence_async_shared()
                _cta_barrier()
                if KV16:
                    v_op = v_ring.index(cur).permute((1, 0))
                else:
                    v8 = v_ring.index(cur)._reinterpret(V.dtype.element_ty, [HEAD_DIM, BLOCK_N], V_VIEW).load(V_LOAD)
                    v_op = gl.convert_layout(v8.to(gl.float16), A_L)
                acc = warpgroup_mma(v_op, p_s.permute((1, 0)), acc * gl.expand_dims(alpha, 0))
            async_copy.wait_group(0)  # (the copies past the end: nothing is left in flight into the ring)
            if TRACE is not None:
                _stamp(trace, rnd, 3)
            l_i = gl.sum(l_acc, 0)
            out = gl.convert_layout(gl.permute(acc * task_v, (1, 0)), O_T)
            _epilogue(out, m_i, l_i, partial, wp, rem, tasks_per_item, q_start, q_len, kvh, hsplit,
                      group_size, heads_per_prog, O, LSE, TMP_O, TMP_LSE, SPLITS, ARRIVALS, stride_ot, stride_oh,
                      stride_lt, stride_tt, stride_th, stride_tl, BLOCK_M, HEAD_DIM, WRITE_LSE, O_T, LOAD, 0, 0, 1,
                      None if KV16 else PERM, MERGE_ROWS, trace if TRACE is not None else None, rnd, SINKS)
            if TRACE is not None:
                _stamp(trace, rnd, 4)
