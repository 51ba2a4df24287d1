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
"""
import triton
import triton.language as tl


@triton.jit
def _step(acc, x_ptrs, w_ptrs, K, x_mask, w_mask, ACT: tl.constexpr, K_MASKED: tl.constexpr):
    """acc += X tile @ W tile.T (X tile through silu(gate) * up when ACT == 1; masked columns: 0)."""
    if K_MASKED:
        w = tl.load(w_ptrs, mask=w_mask, other=0.0)
    else:
        w = tl.load(w_ptrs)
    x = tl.load(x_ptrs, mask=x_mask, other=0.0)
    if ACT == 1:
        g = x.to(tl.float32)
        u = tl.load(x_ptrs + K, mask=x_mask, other=0.0).to(tl.float32)
        x = (g / (1.0 + tl.exp(-g)) * u).to(x_ptrs.dtype.element_ty)
    return tl.dot(x, tl.trans(w), acc)


@triton.jit
def linear_small_m_kernel(X, W, BIAS, Y, M, N, K, stride_xm, stride_wn, stride_ym, HAS_BIAS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          EVEN_K: tl.constexpr, ACT: tl.constexpr = 0):
    """EVEN_K: K % BLOCK_K == 0. The loop runs over whole K blocks without K masks (a loop with masks that
    depend on k0 is not pipelined: no cp.async in the sm_90 PTX), then one masked step for the rest.
    Rows of W past N read row 0 (in bounds, dropped)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    n_ok = offs_n < N
    x_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = W + tl.where(n_ok, offs_n, 0).to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_main = K if EVEN_K else K - K % BLOCK_K
    for k0 in range(0, k_main, BLOCK_K):
        acc = _step(acc, x_ptrs + k0, w_ptrs + k0, K, mask_m[:, None], None, ACT, False)
    if not EVEN_K:
        mask_k = k_main + offs_k < K
        acc = _step(acc, x_ptrs + k_main, w_ptrs + k_main, K, mask_m[:, None] & mask_k[None, :], mask_k[None, :],
                    ACT, True)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=mask_m[:, None] & n_ok[None, :])
