"""Linear layer for a few rows (decode at small batch): Y[m, n] = sum_k X[m, k] * W[n, k] (+ bias[n]).

A decode step of batch 1 multiplies one token's activations by every weight matrix: its time is reading W
once. cuBLAS picks split-K kernels for the attention projections at M = 1 (128-row tiles of W are too few
for the SMs) and adds a reduction launch. Here each program owns BLOCK_N whole rows of W (row-major [N, K]),
walks K in BLOCK_K steps and multiplies them with all M <= 16 rows of X at once (one tensor-core tile: the
MMA's 16 rows are mostly padding, and its time is nothing next to the loads), so W is read exactly once,
K is not split, and there is no second launch. Written as a dot, the W tiles go through Triton's
multi-stage cp.async pipeline (plain loads in a loop are not pipelined: each step would wait for its loads).
"""
import triton
import triton.language as tl


@triton.jit
def linear_small_m_kernel(X, W, BIAS, Y, M, N, K, stride_xm, stride_wn, stride_ym, HAS_BIAS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          EVEN_K: tl.constexpr):
    """EVEN_K: K % BLOCK_K == 0 (no K masks in the loop). Rows of W past N read row 0 (in bounds, dropped)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    n_ok = offs_n < N
    x_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = W + tl.where(n_ok, offs_n, 0).to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs + k0, mask=mask_m[:, None], other=0.0)
            w = tl.load(w_ptrs + k0)
        else:
            mask_k = k0 + offs_k < K
            x = tl.load(x_ptrs + k0, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs + k0, mask=mask_k[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=mask_m[:, None] & n_ok[None, :])
