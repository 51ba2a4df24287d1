"""Linear layer for a few rows (decode at small batch): Y[m, n] = sum_k X[m, k] * W[n, k] (+ bias[n]).

A decode step of batch 1 multiplies one token's activations by every weight matrix: its time is reading W
once. cuBLAS picks split-K kernels for the attention projections at M = 1 (128-row tiles of W are too few
for the SMs) and adds a reduction launch. Here each program owns BLOCK_N whole rows of W (row-major [N, K]),
walks K in BLOCK_K steps and multiplies them with all M <= 16 rows of X at once (one tensor-core tile: the
MMA's 16 rows are mostly padding, and its time is nothing next to the loads), so W is read exactly once,
K is not split, and there is no second launch. Written as a dot, the W tiles go through Triton's
multi-stage cp.async pipeline (plain loads in a loop are not pipelined: each step would wait for its loads).

ACT = 1 takes X = [gate | up] (2K columns) and multiplies silu(gate) * up, rounded to X's dtype as the
separate silu_and_mul would store it: an MLP's activation and down projection in one launch (each program
recomputes the activation of the K columns it walks; X is a few rows, read from L2).

PDL (programmatic dependent launch, CUDA only; the launch sets launch_pdl): the kernel may be launched while
the one before it in the stream still runs; each program waits for it (griddepcontrol.wait) before touching
memory, then lets the next kernel launch (griddepcontrol.launch_dependents). A decode step at batch 1 is a
chain of ~10 short kernels a layer: this hides a launch and a program start behind the previous kernel's
tail (32 o projections in a graph: 11.99 -> 11.34 us each, H200; scripts/pdl_probe.py). Letting the next
kernel launch at the program's start instead (before the wait) was slower (17.0 us: kernels queued up
behind each other, holding SM slots), and prefetching the program's weight rows into L2 before the wait
(cp.async.bulk.prefetch) slower too (14.6-15.3 us).
"""
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _step(acc, ssq, x_ptrs, w_ptrs, r_ptrs, ro_ptrs, g_ptrs, K, x_mask, w_mask, k_mask, store_res,
          ACT: tl.constexpr, NORM: tl.constexpr, K_MASKED: tl.constexpr):
    """acc += X tile @ W tile.T (X tile through silu(gate) * up when ACT == 1; masked columns: 0). NORM 1:
    the tile is X * G and ssq collects X's squares (the caller scales by the RMS at the end); NORM 2: X + R
    in its place (rounded to X's dtype, stored to RO where store_res)."""
    if K_MASKED:
        w = tl.load(w_ptrs, mask=w_mask, other=0.0)
    else:
        w = tl.load(w_ptrs)
    x = tl.load(x_ptrs, mask=x_mask, other=0.0)
    if ACT == 1:
        g = x.to(tl.float32)
        u = tl.load(x_ptrs + K, mask=x_mask, other=0.0).to(tl.float32)
        x = (g / (1.0 + tl.exp(-g)) * u).to(x_ptrs.dtype.element_ty)
    if NORM > 0:
        if NORM == 2:
            x = (x.to(tl.float32) + tl.load(r_ptrs, mask=x_mask, other=0.0).to(tl.float32)).to(
                x.dtype, fp_downcast_rounding="rtne")
            tl.store(ro_ptrs, x, mask=x_mask & store_res)
        xf = x.to(tl.float32)
        ssq += tl.sum(xf * xf, 1)
        if K_MASKED:
            gw = tl.load(g_ptrs, mask=k_mask, other=0.0)
        else:
            gw = tl.load(g_ptrs)
        x = (xf * gw.to(tl.float32)[None, :]).to(x_ptrs.dtype.element_ty)
    return tl.dot(x, tl.trans(w), acc), ssq


@triton.jit
def linear_small_m_kernel(X, W, BIAS, Y, M, N, K, stride_xm, stride_wn, stride_ym, HAS_BIAS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          EVEN_K: tl.constexpr, ACT: tl.constexpr = 0, PDL: tl.constexpr = False,
                          R=None, R_OUT=None, G=None, eps=1e-6, stride_rm=0, stride_rom=0, NORM: tl.constexpr = 0):
    """EVEN_K: K % BLOCK_K == 0. The loop runs over whole K blocks without K masks (a loop with masks that
    depend on k0 is not pipelined: no cp.async in the sm_90 PTX), then one masked step for the rest.
    Rows of W past N read row 0 (in bounds, dropped).

    NORM 1: Y = rmsnorm(X) * G @ W.T; NORM 2: first X + R (the residual stream), which program 0 also stores to
    R_OUT. The RMS of a row is a scalar, so it factors out of the product: the loop multiplies (X * G) by W and
    sums X's squares on the way, and the accumulator is scaled by 1 / RMS at the end. No pass over X before
    the weight stream starts, and no separate norm launch (FlashInfer's fused_add_rmsnorm then a linear)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    n_ok = offs_n < N
    x_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = W + tl.where(n_ok, offs_n, 0).to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    if PDL:
        gdc_wait()  # X, R (and Y, R_OUT, which a kernel before may still read) belong to the previous kernels
        gdc_launch_dependents()
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    ssq = tl.zeros([BLOCK_M], dtype=tl.float32)
    if NORM > 0:
        g_ptrs = G + offs_k
        if NORM == 2:
            r_ptrs = R + offs_m[:, None] * stride_rm + offs_k[None, :]
            ro_ptrs = R_OUT + offs_m[:, None] * stride_rom + offs_k[None, :]
        else:
            r_ptrs, ro_ptrs = x_ptrs, x_ptrs
    else:
        g_ptrs, r_ptrs, ro_ptrs = X, x_ptrs, x_ptrs
    store_res = tl.program_id(0) == 0
    k_main = K if EVEN_K else K - K % BLOCK_K
    for k0 in range(0, k_main, BLOCK_K):
        acc, ssq = _step(acc, ssq, x_ptrs + k0, w_ptrs + k0, r_ptrs + k0, ro_ptrs + k0, g_ptrs + k0, K,
                         mask_m[:, None], None, None, store_res, ACT, NORM, False)
    if not EVEN_K:
        mask_k = k_main + offs_k < K
        acc, ssq = _step(acc, ssq, x_ptrs + k_main, w_ptrs + k_main, r_ptrs + k_main, ro_ptrs + k_main,
                         g_ptrs + k_main, K, mask_m[:, None] & mask_k[None, :], mask_k[None, :], mask_k, store_res,
                         ACT, NORM, True)
    if NORM > 0:
        acc = acc * tl.rsqrt(ssq / K + eps)[:, None]
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=mask_m[:, None] & n_ok[None, :])
