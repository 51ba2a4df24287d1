"""MLA (absorbed form) for Hopper (sm_90) in Gluon: head_dim_ckv 512, head_dim_kpe 64, 16-bit.

Why a second MLA kernel (benchmarks/results/mla_h100.md): at 128 heads MLA decode is compute-bound
(2 x 128 x 1088 FLOP per 1152-byte latent token), and the Triton kernel holds a [rows, 512] fp32
accumulator plus the query tile in registers: it spills and reaches 130-230 TFLOP/s, 0.15-0.42x
FlashInfer. This kernel follows FlashMLA's division of the work over three roles of one CTA:

- a producer warp group fills a ring of shared-memory slots with the latent rows of each KV block (ckv
  in two 256-column halves, and kpe): TMA bulk copies for a block inside one page of a contiguous cache,
  zero-filled cp.async gathers otherwise (page ids one block ahead); it runs ahead across tasks;
- warp group 0 keeps the 64-row query tile (64 heads, or tokens x heads) with q_nope in shared memory
  and q_pe in registers, computes S = Q_pe kpe^T + Q_nope ckv^T (three wgmmas), the online softmax, and
  O[:, :256] += P ckv[:, :256]; it hands P (16-bit) and the rescale factor to warp group 1 through a
  double buffer in shared memory, and its own P V reads P from there too (with P in registers, ptxas
  made every softmax wait for the previous P V);
- warp group 1 rescales and accumulates O[:, 256:] += P ckv[:, 256:].

Each consumer holds a [64, 256] fp32 accumulator (128 registers per thread). Shared memory (mla.py's
MLA_SM90_CONFIG, 64-token blocks): q_nope 64 KB, two ring slots of 72 KB (TMA fills one while the MMAs read
the other), P 2 x 8 KB: 225 KB of the 227 an SM allows. (32-token blocks in four slots also work: each score
MMA then reads its 2 KB Q tile for 1 KB of K, and the kernel ran 17% slower at 128 x 8192.)
Tasks (item, head split) go over the persistent grid in the snake order of kernels/prefill_sm90.py; a
split tile's chunks write partial states, which a second launch merges in parallel (kernels/mla.py's
mla_combine_kernel).
"""
from __future__ import annotations

from .prefill_sm90 import HAVE_GLUON

TILE_ROWS = 64  # query rows of a tile (heads x tokens): one wgmma M

if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (async_copy, fence_async_shared, mbarrier, tma,
                                                                  warpgroup_mma, warpgroup_mma_init,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from .prefill_sm90 import (_cta_barrier, _page_ids, _q_tile, _softmax_block, _tile_rows, _ws_item, _ws_schedule,
                               _ws_task, _ws_wait_ready)

    HALF = gl.constexpr(256)  # the ckv columns (and output columns) of one consumer warp group
    BLOCK_M = gl.constexpr(TILE_ROWS)  # query rows of a tile: one wgmma M

    @gluon.jit
    def _mla_gather(SRC, dst, pages, start, kv_end, stride_p, stride_s, col0,
                    BLOCK_N: gl.constexpr, WIDTH: gl.constexpr, LAYOUT: gl.constexpr, PAGE_SIZE: gl.constexpr):
        """cp.async of columns col0 .. col0 + WIDTH of rows start .. start + BLOCK_N into dst (rows past
        kv_end read as zeros)."""
        offs_n = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LAYOUT))
        offs_d = col0 + gl.arange(0, WIDTH, layout=gl.SliceLayout(0, LAYOUT))
        row = pages.to(gl.int64) * stride_p + (offs_n % PAGE_SIZE) * stride_s
        async_copy.async_copy_global_to_shared(dst, SRC + gl.expand_dims(row, 1) + gl.expand_dims(offs_d, 0),
                                               mask=gl.expand_dims(offs_n < kv_end, 1))

    @gluon.jit
    def _mla_gather_block(CKV, KPE, KV_INDICES, lo, hi, pe, pc, pp, kv_base, st, kv_end, stride_cp, stride_cs,
                          stride_pp, stride_ps, D_KPE: gl.constexpr, BLOCK_N: gl.constexpr, PAGE_SIZE: gl.constexpr,
                          C_LAYOUT: gl.constexpr, P_LAYOUT: gl.constexpr):
        """cp.async of one block's ckv halves and kpe rows (page ids pc / pp in the two load layouts)."""
        _mla_gather(CKV, lo, pc, st, kv_end, stride_cp, stride_cs, 0, BLOCK_N, HALF, C_LAYOUT, PAGE_SIZE)
        _mla_gather(CKV, hi, pc, st, kv_end, stride_cp, stride_cs, HALF, BLOCK_N, HALF, C_LAYOUT, PAGE_SIZE)
        _mla_gather(KPE, pe, pp, st, kv_end, stride_pp, stride_ps, 0, BLOCK_N, D_KPE, P_LAYOUT, PAGE_SIZE)

    @gluon.jit
    def _mla_producer(CKV, KPE, CKV_DESC, KPE_DESC, WORK, COUNTERS, KV_INDICES, lo_ring, hi_ring, pe_ring,
                      ready, empty, stride_cp, stride_cs, stride_pp, stride_ps, num_heads, heads_per_prog,
                      D_KPE: gl.constexpr, BLOCK_N: gl.constexpr, PAGE_SIZE: gl.constexpr, STAGES: gl.constexpr,
                      TMA: gl.constexpr, ABLATE: gl.constexpr):
        """Fills ring slot it % STAGES with each task's KV blocks in turn. TMA (a contiguous cache, pages of
        >= BLOCK_N tokens): a block that lies in one page and before the end of the KV is three bulk copies
        (ckv halves and kpe rows of the cache viewed as [pages * page_size, dim]); the others (and every
        block without TMA) are cp.async gathers with the rows past the end zero-filled: a page's unused
        slots may hold anything, and 0 x NaN in P V would poison the output. The slot's "ready" barrier
        takes 129 arrivals: every producer thread's (cp.async: when its copies land) and one more that is
        the bulk copies' byte count (TMA) or plain."""
        C_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [4, 1], [1, 0])
        P_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (D_KPE // 8), D_KPE // 8], [4, 1], [1, 0])
        BLOCK_BYTES: gl.constexpr = BLOCK_N * (2 * HALF + D_KPE) * 2
        n_rounds, tasks_per_item, n_hsplit = _ws_schedule(COUNTERS, 1, num_heads, heads_per_prog)
        KV_INDICES = KV_INDICES + gl.load(COUNTERS + 4)  # where the page ids start in the plan buffer
        it = 0
        for rnd in range(0, n_rounds):
            wp, _, _, _ = _ws_task(WORK, rnd, tasks_per_item, n_hsplit)
            kv_base = gl.load(wp + 2)
            kv_start = gl.load(wp + 3)
            kv_end = gl.load(wp + 4)
            # page ids one block ahead: their latency hides behind this block's copies
            if TMA:
                pg_next = gl.load(KV_INDICES + kv_base + kv_start // PAGE_SIZE, mask=kv_end > kv_start, other=0)
            else:
                pc_next = _page_ids(KV_INDICES, kv_base, kv_start, kv_end, BLOCK_N, PAGE_SIZE, True, C_LAYOUT)
                pp_next = _page_ids(KV_INDICES, kv_base, kv_start, kv_end, BLOCK_N, PAGE_SIZE, True, P_LAYOUT)
            for j in range(0, gl.cdiv(kv_end - kv_start, BLOCK_N)):
                st = kv_start + j * BLOCK_N
                if TMA:
                    pg = pg_next
                    nxt = st + BLOCK_N
                    pg_next = gl.load(KV_INDICES + kv_base + nxt // PAGE_SIZE, mask=nxt < kv_end, other=0)
                else:
                    pc = pc_next
                    pp = pp_next
                    pc_next = _page_ids(KV_INDICES, kv_base, st + BLOCK_N, kv_end, BLOCK_N, PAGE_SIZE, True, C_LAYOUT)
                    pp_next = _page_ids(KV_INDICES, kv_base, st + BLOCK_N, kv_end, BLOCK_N, PAGE_SIZE, True, P_LAYOUT)
                slot = it % STAGES
                # both consumers released this slot's previous block (a fresh barrier passes parity 1)
                mbarrier.wait(empty.index(slot), ((it // STAGES) & 1) ^ 1)
                if ABLATE % 2 == 0:
                    if TMA:
                        if (st + BLOCK_N <= kv_end) & (st % PAGE_SIZE + BLOCK_N <= PAGE_SIZE):
                            row = pg * PAGE_SIZE + st % PAGE_SIZE
                            mbarrier.expect(ready.index(slot), BLOCK_BYTES)
                            tma.async_copy_global_to_shared(CKV_DESC, [row, 0], ready.index(slot),
                                                            lo_ring.index(slot))
                            tma.async_copy_global_to_shared(CKV_DESC, [row, HALF], ready.index(slot),
                                                            hi_ring.index(slot))
                            tma.async_copy_global_to_shared(KPE_DESC, [row, 0], ready.index(slot),
                                                            pe_ring.index(slot))
                        else:
                            pc = _page_ids(KV_INDICES, kv_base, st, kv_end, BLOCK_N, PAGE_SIZE, True, C_LAYOUT)
                            pp = _page_ids(KV_INDICES, kv_base, st, kv_end, BLOCK_N, PAGE_SIZE, True, P_LAYOUT)
                            _mla_gather_block(CKV, KPE, KV_INDICES, lo_ring.index(slot), hi_ring.index(slot),
                                              pe_ring.index(slot), pc, pp, kv_base, st, kv_end, stride_cp, stride_cs,
                                              stride_pp, stride_ps, D_KPE, BLOCK_N, PAGE_SIZE, C_LAYOUT, P_LAYOUT)
                            mbarrier.arrive(ready.index(slot))
                    else:
                        _mla_gather_block(CKV, KPE, KV_INDICES, lo_ring.index(slot), hi_ring.index(slot),
                                          pe_ring.index(slot), pc, pp, kv_base, st, kv_end, stride_cp, stride_cs,
                                          stride_pp, stride_ps, D_KPE, BLOCK_N, PAGE_SIZE, C_LAYOUT, P_LAYOUT)
                        mbarrier.arrive(ready.index(slot))
                else:
                    mbarrier.arrive(ready.index(slot))
                async_copy.mbarrier_arrive(ready.index(slot), increment_count=False)
                it += 1

    @gluon.jit
    def _mla_load_q(QN, QP, q_lo, q_hi, q_start, q_len, hsplit, num_heads, heads_per_prog,
                    stride_qnt, stride_qnh, stride_qpt, stride_qph, D_KPE: gl.constexpr, QPE_LAYOUT: gl.constexpr):
        """The task's query tile: q_nope into shared memory, q_pe returned in registers (rows past the
        tile's tokens / heads are zeros)."""
        C_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [4, 1], [1, 0])
        ptr, rows = _q_tile(QN, 0, BLOCK_M, HALF, C_LAYOUT, q_start, q_len, 0, hsplit, num_heads, heads_per_prog,
                            stride_qnt, stride_qnh)
        q_lo.store(gl.load(ptr, mask=rows, other=0.0))
        q_hi.store(gl.load(ptr + HALF, mask=rows, other=0.0))
        # straight into the wgmma operand layout (a layout conversion would take 8 KB of scratch memory)
        ptr, rows = _q_tile(QP, 0, BLOCK_M, D_KPE, QPE_LAYOUT, q_start, q_len, 0, hsplit, num_heads, heads_per_prog,
                            stride_qpt, stride_qph)
        q_pe = gl.load(ptr, mask=rows, other=0.0)
        fence_async_shared()  # the stores (generic proxy) before the wgmmas read them (async proxy)
        _cta_barrier()
        return q_pe

    @gluon.jit
    def _mla_scores(q_lo, q_hi, q_pe, lo_ring, hi_ring, pe_ring, slot, S_LAYOUT: gl.constexpr,
                    BLOCK_N: gl.constexpr):
        """S = Q_pe kpe^T + Q_lo ckv_lo^T + Q_hi ckv_hi^T of one ring slot, issued (not waited for)."""
        s = warpgroup_mma(q_pe, pe_ring.index(slot).permute((1, 0)),
                          gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=S_LAYOUT), use_acc=False, is_async=True)
        s = warpgroup_mma(q_lo, lo_ring.index(slot).permute((1, 0)), s, is_async=True)
        return warpgroup_mma(q_hi, hi_ring.index(slot).permute((1, 0)), s, is_async=True)

    @gluon.jit
    def _mla_publish(p_f, alpha, p_ring, alpha0, alpha1, pfree, pfull, it):
        """Block it's P (16-bit) and rescale factor into buffer it % 2, for both warp groups' P V, once
        warp group 1 is done with the block that used it before."""
        b = it % 2
        mbarrier.wait(pfree.index(b), ((it // 2) & 1) ^ 1)
        p_ring.index(b).store(p_f.to(p_ring.dtype))
        if b == 0:
            alpha0.store(alpha)
        else:
            alpha1.store(alpha)
        fence_async_shared()  # P is read by the wgmmas (async proxy)
        _cta_barrier()
        mbarrier.arrive(pfull.index(b))
        return b

    @gluon.jit
    def _mla_epilogue(acc, m_i, l_i, partial, q_start, q_len, hsplit, num_heads, heads_per_prog, O, LSE, TMP_O,
                      TMP_LSE, stride_ot, stride_oh, stride_lt, stride_tt, stride_th, stride_tl,
                      WRITE_LSE: gl.constexpr, O_LAYOUT: gl.constexpr, LEAD: gl.constexpr):
        """A warp group's output columns (O and TMP_O point at them) normalized into out / lse, or, for a
        chunk of a split tile, its partial state: kernels/mla.py's mla_combine_kernel merges those in a
        second launch (a merge here, by the last chunk, ran ~200 us at 1 x 32k: one CTA reading every
        chunk's [64, 512] fp32 state). LEAD: warp group 0, which writes the (partial) LSE."""
        OROW_L: gl.constexpr = gl.SliceLayout(1, O_LAYOUT)
        l_o = gl.convert_layout(l_i, OROW_L)
        empty = l_o == 0.0
        l_safe = gl.where(empty, 1.0, l_o)
        out = acc / gl.expand_dims(l_safe, 1)
        _, qh, valid, q_row = _tile_rows(0, BLOCK_M, OROW_L, q_start, q_len, 0, hsplit, num_heads, heads_per_prog)
        offs_d = gl.arange(0, HALF, layout=gl.SliceLayout(0, O_LAYOUT))
        lse = gl.where(empty, float("-inf"), gl.convert_layout(m_i, OROW_L) + gl.log2(l_safe))
        if partial < 0:
            gl.store(O + gl.expand_dims(q_row * stride_ot + qh * stride_oh, 1) + gl.expand_dims(offs_d, 0),
                     out.to(O.dtype.element_ty), mask=gl.expand_dims(valid, 1))
            if WRITE_LSE and LEAD:
                gl.store(LSE + q_row * stride_lt + qh, lse, mask=valid)
        else:
            p_row = (partial + gl.arange(0, BLOCK_M, layout=OROW_L) // heads_per_prog).to(gl.int64)
            gl.store(TMP_O + gl.expand_dims(p_row * stride_tt + qh * stride_th, 1) + gl.expand_dims(offs_d, 0),
                     out, mask=gl.expand_dims(valid, 1))
            if LEAD:
                gl.store(TMP_LSE + p_row * stride_tl + qh, lse, mask=valid)

    @gluon.jit
    def _mla_softmax_wg(QN, QP, O, LSE, TMP_O, TMP_LSE, WORK, COUNTERS,
                        q_lo, q_hi, lo_ring, hi_ring, pe_ring, p_ring, alpha0, alpha1, m_smem, l_smem,
                        ready, empty, pfull, pfree, statfull, statfree,
                        stride_qnt, stride_qnh, stride_qpt, stride_qph, stride_ot, stride_oh, stride_lt,
                        stride_tt, stride_th, stride_tl, num_heads, heads_per_prog, qk_scale,
                        D_KPE: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
                        WRITE_LSE: gl.constexpr, STAGES: gl.constexpr, ABLATE: gl.constexpr):
        """Warp group 0: scores, online softmax, output columns 0 .. 255 (module docstring).

        Per block j: wait for P_{j-1} V_{j-1}, release block j - 1's slot, S_j, wait, softmax, rescale O,
        publish P_j, queue P_j V_j: the softmax runs while warp group 1's P V holds the tensor cores,
        and P_j V_j while this group waits for the next block."""
        S_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        O_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HALF, 16])
        QPE_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=S_LAYOUT, k_width=2)
        SROW_L: gl.constexpr = gl.SliceLayout(1, S_LAYOUT)
        OROW_L: gl.constexpr = gl.SliceLayout(1, O_LAYOUT)
        n_rounds, tasks_per_item, n_hsplit = _ws_schedule(COUNTERS, 1, num_heads, heads_per_prog)
        it = 0
        for rnd in range(0, n_rounds):
            wp, _, _, hsplit = _ws_task(WORK, rnd, tasks_per_item, n_hsplit)
            q_start, q_len, kv_start, _, kv_end, diag, partial, n_blocks, _, full_hi = _ws_item(
                wp, 0, BLOCK_N, CAUSAL, False, 1)  # (no window: MLA plans have none; blocks from the item's start)
            q_pe = _mla_load_q(QN, QP, q_lo, q_hi, q_start, q_len, hsplit, num_heads, heads_per_prog,
                               stride_qnt, stride_qnh, stride_qpt, stride_qph, D_KPE, QPE_LAYOUT)

            row_hi = diag + gl.arange(0, BLOCK_M, layout=SROW_L) // heads_per_prog
            m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=SROW_L)
            l_i = gl.full([BLOCK_M], 0.0, gl.float32, layout=SROW_L)
            # (a pending-wgmma accumulator, as the loop leaves it)
            acc = warpgroup_mma_init(gl.zeros([BLOCK_M, HALF], gl.float32, layout=O_LAYOUT))
            prev = 0
            for j in range(0, n_blocks):
                start = kv_start + j * BLOCK_N
                # P_{j-1} V_{j-1} done: block j - 1's slot goes back to the producer now, before S_j is issued (was:
                # after S_j, which P V precedes in the wgmma queue; with two slots, block j + 1's copies then have
                # S_j's time more to land: 128 x 8192 566 -> 512 us, H200, session 38; waiting for P V with
                # wait_group 1 after S_j is issued instead makes ptxas serialize every wgmma, C7514)
                acc = warpgroup_mma_wait(0, deps=(acc,))
                if j > 0:
                    mbarrier.arrive(empty.index(prev))  # (every warp passed the publish barrier since)
                slot = _ws_wait_ready(ready, it, STAGES)
                if (ABLATE // 2) % 2 == 0:
                    s = _mla_scores(q_lo, q_hi, q_pe, lo_ring, hi_ring, pe_ring, slot, S_LAYOUT, BLOCK_N)
                else:  # (timing: no Q K^T)
                    s = warpgroup_mma_init(gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=S_LAYOUT))
                s = warpgroup_mma_wait(0, deps=(s,))
                p_f, m_i, l_i, alpha = _softmax_block(s, m_i, l_i, start, kv_end, row_hi, row_hi, qk_scale, 1.0,
                                                      start >= full_hi, CAUSAL, False, False, BLOCK_N, S_LAYOUT)
                acc = acc * gl.expand_dims(gl.convert_layout(alpha, OROW_L), 1)
                b = _mla_publish(p_f, alpha, p_ring, alpha0, alpha1, pfree, pfull, it)
                if (ABLATE // 4) % 2 == 0:
                    acc = warpgroup_mma(p_ring.index(b), lo_ring.index(slot), acc, is_async=True)
                else:  # (timing: no P V)
                    acc = warpgroup_mma_init(acc)
                prev = slot
                it += 1
            acc = warpgroup_mma_wait(0, deps=(acc,))
            _cta_barrier()
            if n_blocks > 0:
                mbarrier.arrive(empty.index(prev))
            # the row max and sum for warp group 1's epilogue
            mbarrier.wait(statfree, (rnd & 1) ^ 1)
            m_smem.store(m_i)
            l_smem.store(l_i)
            _cta_barrier()
            mbarrier.arrive(statfull)
            _mla_epilogue(acc, m_i, l_i, partial, q_start, q_len, hsplit, num_heads, heads_per_prog, O, LSE, TMP_O,
                          TMP_LSE, stride_ot, stride_oh, stride_lt, stride_tt, stride_th, stride_tl, WRITE_LSE,
                          O_LAYOUT, True)

    @gluon.jit
    def _mla_pv_wg(O, LSE, TMP_O, TMP_LSE, WORK, COUNTERS, hi_ring, p_ring, alpha0, alpha1,
                   m_smem, l_smem, ready, empty, pfull, pfree, statfull, statfree,
                   stride_ot, stride_oh, stride_lt, stride_tt, stride_th, stride_tl, num_heads, heads_per_prog,
                   BLOCK_N: gl.constexpr, STAGES: gl.constexpr, ABLATE: gl.constexpr):
        """Warp group 1: output columns 256 .. 511 from warp group 0's P (module docstring)."""
        O_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HALF, 16])
        OROW_L: gl.constexpr = gl.SliceLayout(1, O_LAYOUT)
        n_rounds, tasks_per_item, n_hsplit = _ws_schedule(COUNTERS, 1, num_heads, heads_per_prog)
        it = 0
        for rnd in range(0, n_rounds):
            wp, _, _, hsplit = _ws_task(WORK, rnd, tasks_per_item, n_hsplit)
            q_start, q_len, _, _, _, _, partial, n_blocks, _, _ = _ws_item(wp, 0, BLOCK_N, False, False, 1)
            acc = gl.zeros([BLOCK_M, HALF], gl.float32, layout=O_LAYOUT)
            for j in range(0, n_blocks):
                slot = _ws_wait_ready(ready, it, STAGES)
                b = it % 2
                mbarrier.wait(pfull.index(b), (it // 2) & 1)
                if b == 0:
                    alpha = alpha0.load(OROW_L)
                else:
                    alpha = alpha1.load(OROW_L)
                acc = acc * gl.expand_dims(alpha, 1)
                if (ABLATE // 4) % 2 == 0:
                    acc = warpgroup_mma(p_ring.index(b), hi_ring.index(slot), acc, is_async=True)
                    acc = warpgroup_mma_wait(0, deps=(acc,))
                _cta_barrier()  # every warp is done with P and the slot
                mbarrier.arrive(pfree.index(b))
                mbarrier.arrive(empty.index(slot))
                it += 1
            mbarrier.wait(statfull, rnd & 1)
            m_i = m_smem.load(OROW_L)
            l_i = l_smem.load(OROW_L)
            _cta_barrier()
            mbarrier.arrive(statfree)
            _mla_epilogue(acc, m_i, l_i, partial, q_start, q_len, hsplit, num_heads, heads_per_prog, O + HALF, LSE,
                          TMP_O + HALF, TMP_LSE, stride_ot, stride_oh, stride_lt, stride_tt, stride_th, stride_tl,
                          False, O_LAYOUT, False)

    @gluon.jit
    def mla_sm90_kernel(
        QN, QP, CKV, KPE, CKV_DESC, KPE_DESC, O, LSE, TMP_O, TMP_LSE, WORK, COUNTERS, KV_INDICES,
        stride_qnt, stride_qnh, stride_qpt, stride_qph,
        stride_cp, stride_cs, stride_pp, stride_ps,
        stride_ot, stride_oh, stride_lt,
        stride_tt, stride_th, stride_tl,
        num_heads, heads_per_prog, qk_scale,
        D_KPE: gl.constexpr, BLOCK_N: gl.constexpr, PAGE_SIZE: gl.constexpr, CAUSAL: gl.constexpr,
        WRITE_LSE: gl.constexpr, STAGES: gl.constexpr, PV_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
        TMA: gl.constexpr, num_warps: gl.constexpr, ABLATE: gl.constexpr = 0,
    ):
        """The arguments of kernels/mla.py's mla_kernel that a 16-bit MLA with head_dim_ckv 512 uses
        (qk_scale = sm_scale * log2(e)), plus the register budgets of warp group 1 and the producer, and
        with TMA the caches' tensor descriptors (tma_descriptors(); else None).
        Launch with num_warps=4 (warp group 0); warp group 1 and the producer are 8 more warps.
        Split tiles leave partial states in TMP_O / TMP_LSE for kernels/mla.py's mla_combine_kernel.
        ABLATE (timing only, wrong results): bit 0 skips the loads, bit 1 Q K^T, bit 2 P V
        (scripts/mla_probe.py times the kernel without each stage)."""
        gl.static_assert(num_warps == 4, "launch with num_warps=4 (warp group 0)")
        dtype: gl.constexpr = QN.dtype.element_ty
        SMEM: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        VEC: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
        q_lo = gl.allocate_shared_memory(dtype, [BLOCK_M, HALF], SMEM)
        q_hi = gl.allocate_shared_memory(dtype, [BLOCK_M, HALF], SMEM)
        lo_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HALF], SMEM)
        hi_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HALF], SMEM)
        pe_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D_KPE], SMEM)
        P_SMEM: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=min(128, BLOCK_N * 2), element_bitwidth=16,
                                                     rank=2)
        p_ring = gl.allocate_shared_memory(dtype, [2, BLOCK_M, BLOCK_N], P_SMEM)
        alpha0 = gl.allocate_shared_memory(gl.float32, [BLOCK_M], VEC)
        alpha1 = gl.allocate_shared_memory(gl.float32, [BLOCK_M], VEC)
        m_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_M], VEC)
        l_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_M], VEC)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        pfull = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        pfree = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        sync = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=4 * 32 + 1)  # (_mla_producer)
            mbarrier.init(empty.index(i), count=2)  # one arrival per consumer warp group
        for i in gl.static_range(2):
            mbarrier.init(pfull.index(i), count=1)
            mbarrier.init(pfree.index(i), count=1)
            mbarrier.init(sync.index(i), count=1)
        statfull = sync.index(0)
        statfree = sync.index(1)
        gl.warp_specialize([
            (_mla_softmax_wg, (QN, QP, O, LSE, TMP_O, TMP_LSE, WORK, COUNTERS,
                               q_lo, q_hi, lo_ring, hi_ring, pe_ring, p_ring, alpha0, alpha1, m_smem, l_smem,
                               ready, empty, pfull, pfree, statfull, statfree,
                               stride_qnt, stride_qnh, stride_qpt, stride_qph, stride_ot, stride_oh, stride_lt,
                               stride_tt, stride_th, stride_tl, num_heads, heads_per_prog, qk_scale,
                               D_KPE, BLOCK_N, CAUSAL, WRITE_LSE, STAGES, ABLATE)),
            (_mla_pv_wg, (O, LSE, TMP_O, TMP_LSE, WORK, COUNTERS, hi_ring, p_ring, alpha0, alpha1,
                          m_smem, l_smem, ready, empty, pfull, pfree, statfull, statfree,
                          stride_ot, stride_oh, stride_lt, stride_tt, stride_th, stride_tl, num_heads,
                          heads_per_prog, BLOCK_N, STAGES, ABLATE)),
            (_mla_producer, (CKV, KPE, CKV_DESC, KPE_DESC, WORK, COUNTERS, KV_INDICES, lo_ring, hi_ring, pe_ring,
                             ready, empty, stride_cp, stride_cs, stride_pp, stride_ps, num_heads, heads_per_prog,
                             D_KPE, BLOCK_N, PAGE_SIZE, STAGES, TMA, ABLATE)),
        ], [4, 4], [PV_REGS, PRODUCER_REGS])

    def tma_descriptors(ckv, kpe, page_size: int, block_n: int):
        """Tensor descriptors of the caches for the producer's bulk copies, or (None, None) when they do not
        apply: pages shorter than a KV block, or a cache whose pages are not one contiguous row block
        ([pages, page_size, dim] with rows of dim elements)."""
        if page_size < block_n or any(t.stride(1) != t.shape[2] or t.stride(0) != page_size * t.shape[2]
                                      for t in (ckv, kpe)):
            return None, None
        layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        return (TensorDescriptor.from_tensor(ckv.view(-1, ckv.shape[2]), [block_n, HALF.value], layout),
                TensorDescriptor.from_tensor(kpe.view(-1, kpe.shape[2]), [block_n, kpe.shape[2]], layout))
