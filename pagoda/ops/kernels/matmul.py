"""Linear layer for a few rows (decode at small batch): Y[m, n] = sum_k X[m, k] * W[n, k] (+ bias[n]).

A decode step of batch 1 multiplies one token's activations by every weight matrix: its time is reading W
once. cuBLAS picks split-K kernels for the attention projections at M = 1 (128-row tiles of W are too few
for the SMs) and adds a reduction launch. Here each program owns BLOCK_N whole rows of W (row-major [N, K]),
walks K in BLOCK_K steps and multiplies them with all M <= 16 rows of X at once (one tensor-core tile: the
MMA's 16 rows are mostly padding, and its time is nothing next to the loads), so W is read exactly once,
K is not split, and there is no second launch. Written as a dot, the W tiles go through Triton's
multi-stage cp.async pipeline (plain loads in a loop are not pipelined: each step would wait for its loads).

The X tile goes into the dot as loaded. Transforming it on the way (session 11, H200, one 1-row projection
per CUDA-graph replay, scripts/pdl_probe.py) made the kernel 2.4-3.6x slower: RMSNorm of X inside the qkv
projection (X * norm weight in the loop, the RMS factored out to the end) 23.1 -> 55.3 us, with the residual
add 96.5 us; silu(gate) * up inside the down projection 42.8 -> 155.6 us. Those fusions were removed.

Two epilogues for the engine's batch-1 decode (models/llama.py): NORM_ROWS rows of X scaled by their RMSNorm
factor rsqrt(mean(x^2) + eps) (the norm's weight folded into W when the model is loaded: y = rmsnorm(x) @ W.T
without a norm launch; X goes into the dot unchanged, each row is read once more, as one vector loaded before
the loop and reduced after it, so the dot's pipeline is as without), and a residual added to Y (Y may be the
residual itself: each program reads and writes only its own columns).

PDL: a programmatic dependent launch (kernels/pdl.py). A decode step at batch 1 is a chain of ~10 short
kernels a layer: PDL hides a launch and a program start behind the previous kernel's tail (32 o projections
in a graph: 11.99 -> 11.34 us each, H200; scripts/pdl_probe.py). Letting the next
kernel launch at the program's start instead (before the wait) was slower (17.0 us: kernels queued up
behind each other, holding SM slots), and prefetching the program's weight rows into L2 before the wait
(cp.async.bulk.prefetch) slower too (14.6-15.3 us).
"""
import triton
import triton.language as tl

from .activation import _tanh
from .pdl import pdl_enter
from .rope import _cached_cos_sin, quantize


@triton.jit
def _rms_factor(x_row, K, eps):
    """rsqrt(mean(x^2) + eps) of one row (padding loaded as 0), in fp32 (RMSNorm's)."""
    xf = x_row.to(tl.float32)
    return tl.rsqrt(tl.sum(xf * xf, axis=0) / K + eps)


@triton.jit
def _step(acc, x_ptrs, w_ptrs, x_mask, w_mask, K_MASKED: tl.constexpr):
    """acc += X tile @ W tile.T (masked columns: 0)."""
    if K_MASKED:
        w = tl.load(w_ptrs, mask=w_mask, other=0.0)
    else:
        w = tl.load(w_ptrs)
    x = tl.load(x_ptrs, mask=x_mask, other=0.0)
    return tl.dot(x, tl.trans(w), acc)


@triton.jit
def _finish(acc, X, BIAS, R, Y, M, N, K, stride_xm, stride_rm, stride_ym, eps, offs_m, offs_n, mask_m, n_ok,
            x_row0, x_row1, x_row2, x_row3, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
            NORM_ROWS: tl.constexpr, HAS_RES: tl.constexpr):
    """The epilogue: norm factors, bias, residual, store."""
    if NORM_ROWS > 0:
        scale = tl.zeros([BLOCK_M], dtype=tl.float32)
        scale = tl.where(offs_m == 0, _rms_factor(x_row0, K, eps), scale)
        if NORM_ROWS > 1:
            scale = tl.where(offs_m == 1, _rms_factor(x_row1, K, eps), scale)
        if NORM_ROWS > 2:
            scale = tl.where(offs_m == 2, _rms_factor(x_row2, K, eps), scale)
        if NORM_ROWS > 3:
            scale = tl.where(offs_m == 3, _rms_factor(x_row3, K, eps), scale)
        acc = acc * scale[:, None]
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        acc += tl.load(R + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask_m[:, None] & n_ok[None, :],
                       other=0.0).to(tl.float32)
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=mask_m[:, None] & n_ok[None, :])


@triton.jit
def linear_small_m_kernel(X, W, BIAS, R, Y, WS, CNT, M, N, K, K_SPLIT, stride_xm, stride_wn, stride_rm, stride_ym,
                          eps, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, NORM_ROWS: tl.constexpr = 0,
                          NORM_K: tl.constexpr = 16, HAS_RES: tl.constexpr = False, SPLIT_K: tl.constexpr = 1,
                          PDL: tl.constexpr = False):
    """EVEN_K: K % BLOCK_K == 0. The loop runs over whole K blocks without K masks (a loop with masks that
    depend on k0 is not pipelined: no cp.async in the sm_90 PTX), then one masked step for the rest.
    Rows of W past N read row 0 (in bounds, dropped). NORM_ROWS (= M, at most 4; 0: none): each row's
    accumulator times rsqrt(mean(x^2) + eps), NORM_K = next_power_of_2(K), before the bias; HAS_RES: + R.

    SPLIT_K > 1: program (n, s) sums K_SPLIT (a multiple of BLOCK_K) columns from s * K_SPLIT, stores its fp32
    partial in WS[s, n] and bumps CNT[n] (acq_rel); the last of the tile's SPLIT_K programs to arrive adds the
    partials in the order s = 0, 1, ... (the same bits whichever arrives last), runs the epilogue and resets
    CNT[n] to 0 for the next launch: one launch, no separate reduction kernel.

    (The first W blocks loaded before the PDL wait, W being no kernel's output, gained nothing behind kernels
    that let it launch only at their end, nor behind the decode kernel with an early trigger: sessions 17 and
    19, removed in session 20.)"""
    offs_m = tl.arange(0, BLOCK_M)
    offs_bn = tl.arange(0, BLOCK_N)
    offs_n = tl.program_id(0) * BLOCK_N + offs_bn
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    n_ok = offs_n < N
    if SPLIT_K > 1:
        # (a multiple of BLOCK_K: said, the piece's loads are 16-byte aligned and stay cp.async-pipelined)
        k_lo = tl.multiple_of(tl.program_id(1) * K_SPLIT, BLOCK_K)
        k_hi = tl.minimum(K, k_lo + K_SPLIT)
    else:
        k_lo = 0
        k_hi = K
    x_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = W + tl.where(n_ok, offs_n, 0).to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    pdl_enter(PDL)  # (X, and Y that a kernel before may still read, belong to the previous kernels)
    x_row0 = 0.0
    x_row1 = 0.0
    x_row2 = 0.0
    x_row3 = 0.0
    if NORM_ROWS > 0:  # the rows for their norms: loaded here, used after the loop (the loads overlap it)
        offs_nk = tl.arange(0, NORM_K)
        x_row0 = tl.load(X + offs_nk, mask=offs_nk < K, other=0.0)
        if NORM_ROWS > 1:
            x_row1 = tl.load(X + stride_xm + offs_nk, mask=offs_nk < K, other=0.0)
        if NORM_ROWS > 2:
            x_row2 = tl.load(X + 2 * stride_xm + offs_nk, mask=offs_nk < K, other=0.0)
        if NORM_ROWS > 3:
            x_row3 = tl.load(X + 3 * stride_xm + offs_nk, mask=offs_nk < K, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_main = k_hi if EVEN_K else k_lo + (k_hi - k_lo) // BLOCK_K * BLOCK_K
    for k0 in range(k_lo, k_main, BLOCK_K):
        acc = _step(acc, x_ptrs + k0, w_ptrs + k0, mask_m[:, None], None, False)
    if not EVEN_K:
        if k_main < k_hi:
            mask_k = k_main + offs_k < k_hi
            acc = _step(acc, x_ptrs + k_main, w_ptrs + k_main, mask_m[:, None] & mask_k[None, :],
                        mask_k[None, :], True)
    if SPLIT_K > 1:
        n_tiles = tl.num_programs(0)
        tile = offs_m[:, None] * BLOCK_N + offs_bn[None, :]
        tl.store(WS + (tl.program_id(1) * n_tiles + tl.program_id(0)) * (BLOCK_M * BLOCK_N) + tile, acc)
        # every thread's part of the partial stored before the bump (a CTA barrier), which is acq_rel: the last
        # one to arrive sees them all
        tl.debug_barrier()
        if tl.atomic_add(CNT + tl.program_id(0), 1) == SPLIT_K - 1:
            tl.store(CNT + tl.program_id(0), 0)
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                acc += tl.load(WS + (s * n_tiles + tl.program_id(0)) * (BLOCK_M * BLOCK_N) + tile,
                               cache_modifier=".cg")
            _finish(acc, X, BIAS, R, Y, M, N, K, stride_xm, stride_rm, stride_ym, eps, offs_m, offs_n, mask_m,
                    n_ok, x_row0, x_row1, x_row2, x_row3, HAS_BIAS, BLOCK_M, NORM_ROWS, HAS_RES)
    else:
        _finish(acc, X, BIAS, R, Y, M, N, K, stride_xm, stride_rm, stride_ym, eps, offs_m, offs_n, mask_m, n_ok,
                x_row0, x_row1, x_row2, x_row3, HAS_BIAS, BLOCK_M, NORM_ROWS, HAS_RES)


@triton.jit
def _paired_rows(X, x_ptrs, w_ptrs, K, eps, mask_m, offs_k, NORM: tl.constexpr, NORM_K: tl.constexpr,
                 BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BH: tl.constexpr):
    """One token (row 0 of the X tiles) times two sets of BH rows of W side by side (x @ W1.T, x @ W2.T: the two
    halves of rotary pairs, or gate and up), K in BLOCK_K steps (whole blocks unmasked, so pipelined); NORM: times
    x's RMSNorm factor. w_ptrs: [2 BH, BLOCK_K], W1's rows then W2's (gathered rows: one load and one dot per
    step, as linear_small_m_kernel's BLOCK_N = 2 BH; session 19 measured two loads and two BH-wide dots 6 us
    slower than it on Llama-3.1-8B's qkv), split into the two accumulators at the end."""
    if NORM:
        offs_nk = tl.arange(0, NORM_K)
        x_row = tl.load(X + offs_nk, mask=offs_nk < K, other=0.0)
    acc = tl.zeros([BLOCK_M, 2 * BH], dtype=tl.float32)
    k_main = K if EVEN_K else K - K % BLOCK_K
    for k0 in range(0, k_main, BLOCK_K):
        x = tl.load(x_ptrs + k0, mask=mask_m[:, None], other=0.0)
        acc = tl.dot(x, tl.trans(tl.load(w_ptrs + k0)), acc)
    if not EVEN_K:
        mk = (k_main + offs_k < K)[None, :]
        x = tl.load(x_ptrs + k_main, mask=mask_m[:, None] & mk, other=0.0)
        acc = tl.dot(x, tl.trans(tl.load(w_ptrs + k_main, mask=mk, other=0.0)), acc)
    if NORM:
        acc = acc * _rms_factor(x_row, K, eps)
    # columns h * BH + j -> (j, h): the two halves as the last dimension, then apart
    acc1, acc2 = tl.split(tl.permute(tl.reshape(acc, [BLOCK_M, 2, BH]), (0, 2, 1)))
    return acc1, acc2


@triton.jit
def qkv_rope_append_kernel(X, W, BIAS, Q, KC, VC, POS, BATCH, KV_INDICES, KV_INDPTR, COS_SIN, K, stride_wn,
                           stride_qh, stride_cp, stride_cs, stride_ch, stride_vcp, stride_vcs, stride_vch, stride_cos,
                           max_pos, page_size, eps, NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                           HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr,
                           NORM_K: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                           PDL: tl.constexpr = False, k_inv=1.0, v_inv=1.0, clamp=0.0, QUANT: tl.constexpr = False):
    """One token's qkv projection with RoPE (NeoX pairs, from a [cos | sin] cache) and the paged-cache append in
    its epilogue: rope_append_kernel's work without its launch. Program p: head p // CHUNKS (q heads, then k,
    then v), rotary pairs (c * 16 + j, c * 16 + j + HEAD_DIM / 2), c = p % CHUNKS: its 32 rows of W are the
    pairs' two halves, two accumulators side by side, so each pair's two outputs meet in one thread. q rows
    rotated go to Q [heads, HEAD_DIM]; k rows rotated and v rows to the token's cache slot. NORM: the input's
    RMSNorm factor (its weight folded into W), as linear_small_m_kernel's. The positions, the cos / sin rows and
    the page chain load before the PDL wait (step inputs: host copies made before the step). QUANT (an fp8 cache):
    k / v stored as rope_append_kernel's quantize() stores them."""
    BLOCK_M: tl.constexpr = 16
    BH: tl.constexpr = 16
    HALF: tl.constexpr = HEAD_DIM // 2
    CHUNKS: tl.constexpr = HALF // BH
    pid = tl.program_id(0)
    head = pid // CHUNKS
    offs_j = (pid % CHUNKS) * BH + tl.arange(0, BH)
    rows1 = head * HEAD_DIM + offs_j
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < 1
    x_ptrs = X + offs_m[:, None] * 0 + offs_k[None, :]
    offs_r = tl.arange(0, 2 * BH)  # the pairs' first halves, then their second halves
    w_rows = head * HEAD_DIM + (offs_r // BH) * HALF + (pid % CHUNKS) * BH + offs_r % BH
    w_ptrs = W + w_rows.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    is_kv = head >= NUM_Q_HEADS
    pos = tl.load(POS)
    b = tl.load(BATCH, mask=is_kv, other=0)
    cos, sin = _cached_cos_sin(COS_SIN, pos, offs_j, offs_j < HALF, HALF, max_pos, stride_cos)
    cos = cos[None, :]
    sin = sin[None, :]
    page = tl.load(KV_INDICES + tl.load(KV_INDPTR + b, mask=is_kv, other=0) + pos // page_size, mask=is_kv,
                   other=0).to(tl.int64)
    pdl_enter(PDL)
    acc1, acc2 = _paired_rows(X, x_ptrs, w_ptrs, K, eps, mask_m, offs_k, NORM, NORM_K, BLOCK_K, EVEN_K, BLOCK_M, BH)
    if HAS_BIAS:
        acc1 += tl.load(BIAS + rows1).to(tl.float32)[None, :]
        acc2 += tl.load(BIAS + rows1 + HALF).to(tl.float32)[None, :]
    row0 = mask_m[:, None]
    cols = offs_m[:, None] * 0 + offs_j[None, :]
    # (a pointer per branch: with an fp8 cache the q and cache pointers differ in type)
    if head < NUM_Q_HEADS:
        q_dst = Q + head * stride_qh + cols
        tl.store(q_dst, (acc1 * cos - acc2 * sin).to(Q.dtype.element_ty), mask=row0)
        tl.store(q_dst + HALF, (acc2 * cos + acc1 * sin).to(Q.dtype.element_ty), mask=row0)
    elif head < NUM_Q_HEADS + NUM_KV_HEADS:
        k_dst = KC + page * stride_cp + (pos % page_size) * stride_cs + (head - NUM_Q_HEADS) * stride_ch + cols
        tl.store(k_dst, quantize(acc1 * cos - acc2 * sin, k_inv, clamp, QUANT).to(KC.dtype.element_ty), mask=row0)
        tl.store(k_dst + HALF, quantize(acc2 * cos + acc1 * sin, k_inv, clamp, QUANT).to(KC.dtype.element_ty),
                 mask=row0)
    else:
        v_dst = (VC + page * stride_vcp + (pos % page_size) * stride_vcs
                 + (head - NUM_Q_HEADS - NUM_KV_HEADS) * stride_vch + cols)
        tl.store(v_dst, quantize(acc1, v_inv, clamp, QUANT).to(VC.dtype.element_ty), mask=row0)
        tl.store(v_dst + HALF, quantize(acc2, v_inv, clamp, QUANT).to(VC.dtype.element_ty), mask=row0)


@triton.jit
def gate_up_act_kernel(X, W, Y, K, D, stride_wn, eps, NORM: tl.constexpr, NORM_K: tl.constexpr,
                       BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr = False, ACT: tl.constexpr = 0):
    """One token's gate / up projection with SwiGLU in the epilogue (ACT 0; 2: GeGLU with the tanh GELU, as
    act_and_mul_kernel's codes): Y[j] = silu(g_j) * u_j, g = x @ W[j],
    u = x @ W[D + j] (W = [gate; up], [2 D, K]). Program p: columns 16 p .. 16 p + 15, its rows of W the 16 gate
    rows and the 16 up rows of those columns, two accumulators side by side (the pairs meet in one thread):
    act_and_mul_kernel's work without its launch. NORM: x's RMSNorm factor (its weight folded into W), as
    linear_small_m_kernel's."""
    BLOCK_M: tl.constexpr = 16
    BH: tl.constexpr = 16
    offs_j = tl.program_id(0) * BH + tl.arange(0, BH)
    j_ok = offs_j < D
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < 1
    x_ptrs = X + offs_m[:, None] * 0 + offs_k[None, :]
    offs_r = tl.arange(0, 2 * BH)  # the columns' gate rows, then their up rows
    j_r = tl.program_id(0) * BH + offs_r % BH
    rows = tl.where(j_r < D, j_r, 0).to(tl.int64) + (offs_r // BH).to(tl.int64) * D
    w_ptrs = W + rows[:, None] * stride_wn + offs_k[None, :]
    pdl_enter(PDL)
    acc1, acc2 = _paired_rows(X, x_ptrs, w_ptrs, K, eps, mask_m, offs_k, NORM, NORM_K, BLOCK_K, EVEN_K, BLOCK_M, BH)
    if ACT == 0:
        h = acc1 / (1.0 + tl.exp(-acc1)) * acc2
    else:
        h = 0.5 * acc1 * (1.0 + _tanh(0.7978845608028654 * (acc1 + 0.044715 * acc1 * acc1 * acc1))) * acc2
    tl.store(Y + offs_m[:, None] * 0 + offs_j[None, :], h.to(Y.dtype.element_ty), mask=mask_m[:, None] & j_ok[None, :])
