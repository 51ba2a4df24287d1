"""Write appended tokens' K/V into a paged cache."""
import triton
import triton.language as tl


@triton.jit
def append_paged_kv_kernel(
    K, V, KC, VC, BATCH, POS, KV_INDICES, KV_INDPTR,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cp, stride_cs, stride_ch, stride_vcp, stride_vcs, stride_vch,
    num_heads, head_dim, page_size, KS, VS, k_inv, v_inv, clamp,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, QUANT: tl.constexpr, SCALE_PTR: tl.constexpr,
):
    """Token t of request BATCH[t] at position POS[t] goes to page
    KV_INDICES[KV_INDPTR[b] + pos // page_size], slot pos % page_size, all heads.
    QUANT (an fp8 cache): stores clamp(x * k_inv [/ KS[h]], +-clamp) rounded to the cache dtype."""
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
    if QUANT:
        ks = tl.full([BLOCK_H], k_inv, tl.float32)
        vs = tl.full([BLOCK_H], v_inv, tl.float32)
        if SCALE_PTR:
            ks = ks / tl.load(KS + h, mask=h < num_heads, other=1.0)
            vs = vs / tl.load(VS + h, mask=h < num_heads, other=1.0)
        k = tl.minimum(tl.maximum(k.to(tl.float32) * ks[:, None], -clamp), clamp)
        v = tl.minimum(tl.maximum(v.to(tl.float32) * vs[:, None], -clamp), clamp)
    tl.store(KC + page * stride_cp + slot * stride_cs + h[:, None] * stride_ch + d[None, :],
             k.to(KC.dtype.element_ty), mask=m)
    tl.store(VC + page * stride_vcp + slot * stride_vcs + h[:, None] * stride_vch + d[None, :],
             v.to(VC.dtype.element_ty), mask=m)
