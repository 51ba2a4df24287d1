"""Write appended tokens' K/V into a paged cache."""
import triton
import triton.language as tl


@triton.jit
def append_paged_kv_kernel(
    K, V, KC, VC, BATCH, POS, KV_INDICES, KV_INDPTR,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cp, stride_cs, stride_ch, stride_vcp, stride_vcs, stride_vch,
    num_heads, head_dim, page_size,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Token t of request BATCH[t] at position POS[t] goes to page
    KV_INDICES[KV_INDPTR[b] + pos // page_size], slot pos % page_size, all heads."""
    t = tl.program_id(0).to(tl.int64)
    b = tl.load(BATCH + t)
    pos = tl.load(POS + t)
    page = tl.load(KV_INDICES + tl.load(KV_INDPTR + b) + pos // page_size).to(tl.int64)
    slot = pos % page_size
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    m = (h[:, None] < num_heads) & (d[None, :] < head_dim)
    k = tl.load(K + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=m)
    v = tl.load(V + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=m)
    tl.store(KC + page * stride_cp + slot * stride_cs + h[:, None] * stride_ch + d[None, :],
             k.to(KC.dtype.element_ty), mask=m)
    tl.store(VC + page * stride_vcp + slot * stride_vcs + h[:, None] * stride_vch + d[None, :],
             v.to(VC.dtype.element_ty), mask=m)
