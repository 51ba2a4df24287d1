"""One token's whole SwiGLU MLP in one persistent launch: r += silu(x @ Wg.T) * (x @ Wu.T) @ Wd.T, x = RMSNorm(r).

At decode batch 1 the MLP is two weight reads (gate / up, then down) with a SwiGLU between. As three kernels
(cuBLAS gate / up, the activation, the small-M down projection) each boundary costs a launch, the programs'
start and the first loads' round trip behind the previous kernel's tail (sessions 17-22: each GEMV ~7 us over
its bytes at the copy rate in isolation). Here one grid of resident programs does both reads:

* phase 1: each program takes tiles of BH columns (BH gate rows and BH up rows of W_gu, side by side in one
  dot, the pairs meeting in one thread) from a shared counter (the first one by its program id), applies the
  deferred RMSNorm's factor and SwiGLU to the fp32 accumulators and stores H (the model's dtype);
* a grid barrier (all programs resident: the host sizes the grid from the compiled kernel's occupancy);
* phase 2: pieces of the down projection, BLOCK_N rows of W_d by K / SPLIT columns, again from a counter; each
  piece's fp32 partial goes to WS and the last of a row tile's SPLIT pieces to arrive adds them in a fixed
  order (deterministic) with the residual and writes r in place.

PHASE 0 runs both with the barrier (CUDA); PHASE 1 / 2 one each, two launches (the interpreter runs programs
one after another, so no barrier can be waited on there; the host then zeroes the counters itself).

SYNC (int32, zero when first made): [0] arrivals at the barrier, [1] the barrier's generation, [2] phase 1's
tile counter, [3] phase 2's piece counter. The barrier's last arrival resets [0], [2] and [3] before it bumps
[1], so a CUDA graph can replay the launch; CNT (int32 per row tile, zero) is reset by each tile's last piece.
"""
import triton
import triton.language as tl

from .matmul import _paired_rows
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .pdl import pdl_enter


@triton.jit
def _globaltimer():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _grid_barrier(SYNC, num_programs):
    """Every program of the grid arrives before any goes on (sense-reversing: the generation read before the
    arrival, the last to arrive resets the counters and bumps it, the others spin until it moves). Each program's
    stores before it are visible to every program after it (CTA barrier, then a gpu-scope release / acquire)."""
    tl.debug_barrier()
    gen = tl.atomic_add(SYNC + 1, 0, sem="relaxed")
    if tl.atomic_add(SYNC, 1, sem="acq_rel") == num_programs - 1:
        tl.atomic_xchg(SYNC, 0, sem="relaxed")
        tl.atomic_xchg(SYNC + 2, 0, sem="relaxed")
        tl.atomic_xchg(SYNC + 3, 0, sem="relaxed")
        tl.atomic_add(SYNC + 1, 1, sem="release")
    else:
        while tl.atomic_add(SYNC + 1, 0, sem="acquire") == gen:
            pass
    tl.debug_barrier()


@triton.jit
def _gate_up_tile(R, WGU, H, SLICE, tile, K, D, D_SPLIT, stride_gu, eps, NORM: tl.constexpr, NORM_K: tl.constexpr,
                  BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, BH: tl.constexpr, FLOW: tl.constexpr):
    """H[j] = silu(g_j) * u_j for the tile's BH columns j (gate_up_act_kernel's program)."""
    BLOCK_M: tl.constexpr = 16
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < 1
    x_ptrs = R + offs_m[:, None] * 0 + offs_k[None, :]
    offs_r = tl.arange(0, 2 * BH)  # the columns' gate rows, then their up rows
    j_r = tile * BH + offs_r % BH
    rows = tl.where(j_r < D, j_r, 0).to(tl.int64) + (offs_r // BH).to(tl.int64) * D
    w_ptrs = WGU + rows[:, None] * stride_gu + offs_k[None, :]
    acc1, acc2 = _paired_rows(R, x_ptrs, w_ptrs, K, eps, mask_m, offs_k, NORM, NORM_K, BLOCK_K, EVEN_K, BLOCK_M, BH)
    h = acc1 / (1.0 + tl.exp(-acc1)) * acc2
    offs_j = tile * BH + tl.arange(0, BH)
    tl.store(H + offs_m[:, None] * 0 + offs_j[None, :], h.to(H.dtype.element_ty),
             mask=mask_m[:, None] & (offs_j < D)[None, :])
    if FLOW:  # (the tile's columns stored by every thread, then counted for its slice: a release)
        tl.debug_barrier()
        tl.atomic_add(SLICE + (tile * BH) // D_SPLIT, 1, sem="release")


@triton.jit
def _down_piece(H, WD, R, WS, CNT, piece, N, D, D_SPLIT, stride_d, n_tiles, SPLIT: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_D: tl.constexpr):
    """Piece (tile t, split s) = piece // SPLIT, piece % SPLIT: H[s D_SPLIT : (s + 1) D_SPLIT] @ WD[t rows].T; the
    tile's last piece adds the SPLIT partials in order, the residual R, and stores R (linear_small_m_kernel's
    split-K program, H read from L2: another program wrote it in this launch)."""
    BLOCK_M: tl.constexpr = 16
    t = piece // SPLIT
    s = piece % SPLIT
    offs_m = tl.arange(0, BLOCK_M)
    offs_bn = tl.arange(0, BLOCK_N)
    offs_n = t * BLOCK_N + offs_bn
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < 1
    n_ok = offs_n < N
    k_lo = tl.multiple_of(s * D_SPLIT, BLOCK_K)
    k_hi = tl.minimum(D, k_lo + D_SPLIT)
    x_ptrs = H + offs_m[:, None] * 0 + offs_k[None, :]
    w_ptrs = WD + tl.where(n_ok, offs_n, 0).to(tl.int64)[:, None] * stride_d + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_main = k_hi if EVEN_D else k_lo + (k_hi - k_lo) // BLOCK_K * BLOCK_K
    for k0 in range(k_lo, k_main, BLOCK_K):
        x = tl.load(x_ptrs + k0, mask=mask_m[:, None], other=0.0, cache_modifier=".cg")
        acc = tl.dot(x, tl.trans(tl.load(w_ptrs + k0)), acc)
    if not EVEN_D:
        if k_main < k_hi:
            mk = (k_main + offs_k < k_hi)[None, :]
            x = tl.load(x_ptrs + k_main, mask=mask_m[:, None] & mk, other=0.0, cache_modifier=".cg")
            acc = tl.dot(x, tl.trans(tl.load(w_ptrs + k_main, mask=mk, other=0.0)), acc)
    tile = offs_m[:, None] * BLOCK_N + offs_bn[None, :]
    out_mask = mask_m[:, None] & n_ok[None, :]
    r_ptrs = R + offs_m[:, None] * 0 + offs_n[None, :]
    if SPLIT > 1:
        tl.store(WS + (s * n_tiles + t) * (BLOCK_M * BLOCK_N) + tile, acc)
        tl.debug_barrier()  # (the whole partial stored before the acq_rel bump: the last piece sees them all)
        if tl.atomic_add(CNT + t, 1, sem="acq_rel") == SPLIT - 1:
            tl.store(CNT + t, 0)
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for i in tl.static_range(SPLIT):
                acc += tl.load(WS + (i * n_tiles + t) * (BLOCK_M * BLOCK_N) + tile, cache_modifier=".cg")
            acc += tl.load(r_ptrs, mask=out_mask, other=0.0).to(tl.float32)
            tl.store(r_ptrs, acc.to(R.dtype.element_ty), mask=out_mask)
    else:
        acc += tl.load(r_ptrs, mask=out_mask, other=0.0).to(tl.float32)
        tl.store(r_ptrs, acc.to(R.dtype.element_ty), mask=out_mask)


@triton.jit
def mlp_one_token_kernel(R, WGU, WD, H, WS, CNT, SYNC, K, D, D_SPLIT, stride_gu, stride_d, eps,
                         PHASE: tl.constexpr, NORM: tl.constexpr, NORM_K: tl.constexpr, BLOCK_K: tl.constexpr,
                         EVEN_K: tl.constexpr, BH: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
                         EVEN_D: tl.constexpr, PDL: tl.constexpr = False, TRACE=None):
    """R [1, K] the residual stream (read in phase 1, += the MLP's output in phase 2), WGU [2 D, K] = [gate; up]
    (the post-attention norm's weight folded in; NORM: x = r * rsqrt(mean(r^2) + eps)), WD [K, D], H [1, D] the
    activation, WS / CNT the split partials and their counters, SYNC the grid's counters (module docstring).
    TRACE (int64 [programs, 4], scripts/mlp_timeline.py): %globaltimer at the program's start (after the PDL
    wait), its last phase-1 tile done, the barrier left, its last phase-2 piece done."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    N = K  # (the down projection's rows: back to the hidden size)
    if PHASE == 3:  # (the dependents launch once phase 2 begins: early ones held SM slots, session 23)
        if PDL:
            gdc_wait()
    else:
        pdl_enter(PDL)  # (R is the o projection's output; H and WS may still be read by the previous launch)
    if TRACE is not None:
        tl.store(TRACE + pid * 4, _globaltimer())
    if PHASE != 2:
        n_tiles1 = tl.cdiv(D, BH)
        tile = pid
        nxt = num_programs + tl.atomic_add(SYNC + 2, 1, sem="relaxed")  # (its round trip under the tile's loads)
        while tile < n_tiles1:
            _gate_up_tile(R, WGU, H, SYNC + 4, tile, K, D, D_SPLIT, stride_gu, eps, NORM, NORM_K, BLOCK_K, EVEN_K,
                          BH, PHASE == 3)
            tile = nxt
            if tile < n_tiles1:
                nxt = num_programs + tl.atomic_add(SYNC + 2, 1, sem="relaxed")
    if TRACE is not None:
        tl.store(TRACE + pid * 4 + 1, _globaltimer())
    if PHASE == 0:
        _grid_barrier(SYNC, num_programs)
    if TRACE is not None:
        tl.store(TRACE + pid * 4 + 2, _globaltimer())
    if PHASE == 3 and PDL:
        gdc_launch_dependents()
    if PHASE != 1:
        n_tiles2 = tl.cdiv(N, BLOCK_N)
        n_pieces = n_tiles2 * SPLIT
        piece = pid
        nxt = num_programs + tl.atomic_add(SYNC + 3, 1, sem="relaxed")
        ready = -1  # (the slices of H this program has seen complete: they complete in order, mostly)
        while piece < n_pieces:
            if PHASE == 3:
                s = piece // n_tiles2  # (pieces slice-major: the early slices' first)
                if s > ready:
                    need = tl.cdiv(tl.minimum(D, (s + 1) * D_SPLIT) - s * D_SPLIT, BH)
                    while tl.atomic_add(SYNC + 4 + s, 0, sem="acquire") < need:
                        pass
                    tl.debug_barrier()
                    ready = s
                _down_piece(H, WD, R, WS, CNT, (piece % n_tiles2) * SPLIT + s, N, D, D_SPLIT, stride_d, n_tiles2,
                            SPLIT, BLOCK_N, BLOCK_K, EVEN_D)
            else:
                _down_piece(H, WD, R, WS, CNT, piece, N, D, D_SPLIT, stride_d, n_tiles2, SPLIT, BLOCK_N, BLOCK_K,
                            EVEN_D)
            piece = nxt
            if piece < n_pieces:
                nxt = num_programs + tl.atomic_add(SYNC + 3, 1, sem="relaxed")
    if TRACE is not None:
        tl.store(TRACE + pid * 4 + 3, _globaltimer())
    if PHASE == 3:  # (the last program out resets the counters for the next launch: nobody reads them after it)
        tl.debug_barrier()
        if tl.atomic_add(SYNC, 1, sem="acq_rel") == num_programs - 1:
            tl.atomic_xchg(SYNC, 0, sem="relaxed")
            tl.atomic_xchg(SYNC + 2, 0, sem="relaxed")
            tl.atomic_xchg(SYNC + 3, 0, sem="relaxed")
            for i in tl.static_range(SPLIT):
                tl.atomic_xchg(SYNC + 4 + i, 0, sem="relaxed")
