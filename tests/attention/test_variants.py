"""Attention variants (score_mod / mask_mod as Triton functions), custom masks, block-sparse attention.

Every check is against a float64 reference written here from the definition (an explicit bias,
an explicit boolean mask over the dense logits), not through the variant's own PyTorch form."""
import math

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import pagoda

from ..conftest import DEVICE
from .helpers import TOL, PagedBatch, check_lse, poisoned_like, rel_err, workspace

BF16 = torch.bfloat16


def dense_ref(q, k, v, *, bias=None, keep=None, sm_scale=None, cap=None):
    """Float64 attention of one request with explicit bias [h, q, k] and keep mask [h or 1, q, k]."""
    qo, hq, d = q.shape
    group = hq // k.shape[1]
    sm_scale = sm_scale or 1.0 / math.sqrt(d)
    kf = k.double().cpu().repeat_interleave(group, 1)
    vf = v.double().cpu().repeat_interleave(group, 1)
    logits = torch.einsum("qhd,khd->hqk", q.double().cpu(), kf) * sm_scale
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    if bias is not None:
        logits = logits + bias
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(logits, -1)
    p = torch.exp(logits - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.einsum("hqk,khd->qhd", p, vf), (lse / math.log(2)).transpose(0, 1).float()


def positions(qo, kv):
    qpos = torch.arange(qo)[:, None] + (kv - qo)
    kpos = torch.arange(kv)[None, :]
    return qpos, kpos


def rand(*shape):
    return torch.randn(*shape, dtype=BF16, device=DEVICE)


# -- built-in variants, every wrapper --------------------------------------------------------------
def test_alibi_single_prefill_and_decode():
    hq, hk, d, qo, kv = 8, 2, 64, 19, 45
    slopes = pagoda.variants.alibi_slopes(hq)
    var = pagoda.variants.alibi(slopes)
    q, k, v = rand(qo, hq, d), rand(kv, hk, d), rand(kv, hk, d)
    qpos, kpos = positions(qo, kv)
    bias = slopes.double()[:, None, None] * (kpos - qpos).double()[None]
    out, lse = pagoda.single_prefill_with_kv_cache(q, k, v, causal=True, variant=var, return_lse=True,
                                                   backend="triton")
    ro, rl = dense_ref(q, k, v, bias=bias, keep=(kpos <= qpos)[None])
    assert rel_err(out, ro) < TOL[BF16]
    check_lse(lse, rl)
    od = pagoda.single_decode_with_kv_cache(q[-1], k, v, variant=var, backend="triton")
    rd, _ = dense_ref(q[-1:], k, v, bias=bias[:, -1:])
    assert rel_err(od, rd[0]) < TOL[BF16]


def test_sink_window_batch_paged_prefill_and_decode():
    """StreamingLLM: the first 4 tokens plus a window of 10, in a paged batch (append and decode)."""
    hq, hk, d, ps = 4, 2, 64, 8
    kv_lens, qo_lens = [60, 33, 7], [12, 1, 7]
    batch = PagedBatch(kv_lens, hk, d, ps, BF16)
    var = pagoda.variants.sink_window(4, 10)
    qo = torch.tensor([0] + qo_lens).cumsum(0).to(torch.int32)
    w = pagoda.BatchPrefillWithPagedKVCacheWrapper(workspace(), variant=var, backend="triton")
    w.plan(qo, batch.indptr, batch.indices, batch.last_page_len, hq, hk, d, ps, q_data_type=BF16)
    q = rand(int(qo[-1]), hq, d)
    out, lse = poisoned_like(q)
    w.run(q, batch.cache, out=out, lse=lse, return_lse=True)
    for b in range(3):
        s, e = int(qo[b]), int(qo[b + 1])
        qpos, kpos = positions(e - s, kv_lens[b])
        keep = (kpos <= qpos) & ((kpos < 4) | (kpos >= qpos - 10))
        ro, rl = dense_ref(q[s:e], batch.k[b], batch.v[b], keep=keep[None])
        assert rel_err(out[s:e], ro) < TOL[BF16]
        check_lse(lse[s:e], rl)
    wd = pagoda.BatchDecodeWithPagedKVCacheWrapper(workspace(), variant=var, backend="triton")
    wd.plan(batch.indptr, batch.indices, batch.last_page_len, hq, hk, d, ps, q_data_type=BF16)
    qd = rand(3, hq, d)
    od = wd.run(qd, batch.cache)
    for b in range(3):
        kpos = torch.arange(kv_lens[b])
        keep = (kpos < 4) | (kpos >= kv_lens[b] - 1 - 10)
        rd, _ = dense_ref(qd[b:b + 1], batch.k[b], batch.v[b], keep=keep[None, None])
        assert rel_err(od[b:b + 1], rd) < TOL[BF16]


@pytest.mark.parametrize("name", ["causal", "sliding_window", "soft_cap"])
def test_builtins_match_the_plan_flags(name):
    """causal / sliding window / soft cap as variants equal the reference of the same math (ragged)."""
    hq, hk, d = 4, 4, 64
    q, k, v = rand(16, hq, d), rand(40, hk, d), rand(40, hk, d)
    qpos, kpos = positions(16, 40)
    var, kw = {"causal": (pagoda.variants.causal(), dict(keep=(kpos <= qpos)[None])),
               "sliding_window": (pagoda.variants.sliding_window(7),
                                  dict(keep=((kpos <= qpos) & (kpos >= qpos - 7))[None])),
               "soft_cap": (pagoda.variants.soft_cap(2.0), dict(cap=2.0))}[name]
    w = pagoda.BatchPrefillWithRaggedKVCacheWrapper(workspace(), variant=var, backend="triton")
    w.plan([0, 16], [0, 40], hq, hk, d, q_data_type=BF16)
    out = w.run(q, k, v)
    ro, _ = dense_ref(q, k, v, **kw)
    assert rel_err(out, ro) < TOL[BF16]


@triton.jit
def _head_bias(score, b, h, q_pos, kv_pos, params):
    return score + tl.load(params + h) + 0.01 * b


def test_user_variant_per_head_bias_and_torch_backend():
    """A variant written by a user (per-head bias + request-dependent term) on the Triton kernel and
    the PyTorch path agree with the explicit reference."""
    hq, hk, d = 4, 2, 64
    bias = torch.tensor([0.5, -1.0, 2.0, 0.0])
    var = pagoda.AttentionVariant("head_bias", score_mod=_head_bias, params=bias,
                                  torch_score_mod=lambda s, b, h, q, k, p: s + p[h].to(s.dtype) + 0.01 * b)
    qo = [0, 5, 12]
    kv = [0, 20, 29]
    q, k, v = rand(12, hq, d), rand(29, hk, d), rand(29, hk, d)
    for backend in ("triton", "torch"):
        w = pagoda.BatchPrefillWithRaggedKVCacheWrapper(workspace(), variant=var, backend=backend)
        w.plan(qo, kv, hq, hk, d, q_data_type=BF16)
        out = w.run(q, k, v)
        for b in range(2):
            s, e, ks, ke = qo[b], qo[b + 1], kv[b], kv[b + 1]
            ro, _ = dense_ref(q[s:e], k[ks:ke], v[ks:ke],
                              bias=bias.double()[:, None, None] + 0.01 * b)
            assert rel_err(out[s:e], ro) < TOL[BF16], backend


@triton.jit
def _bad_mask(b, h, q_pos, kv_pos, params):
    return (kv_pos - q_pos).to(tl.float32)  # not a boolean


@triton.jit
def _bad_score(score, b, h, q_pos, kv_pos, params):
    return tl.sum(score, 1)  # [rows] instead of [rows, cols]


def test_bad_variants_name_themselves():
    q, k, v = rand(4, 2, 64), rand(9, 2, 64), rand(9, 2, 64)
    bad = pagoda.AttentionVariant("floaty_mask", mask_mod=_bad_mask, torch_mask_mod=lambda b, h, q, k, p: k <= q)
    with pytest.raises(ValueError, match="floaty_mask"):
        pagoda.single_prefill_with_kv_cache(q, k, v, variant=bad, backend="triton")
    bad = pagoda.AttentionVariant("reducing_score", score_mod=_bad_score,
                                  torch_score_mod=lambda s, b, h, q, k, p: s.sum(-1))
    with pytest.raises(ValueError, match="reducing_score"):
        pagoda.single_prefill_with_kv_cache(q, k, v, variant=bad, backend="triton")
    with pytest.raises(ValueError, match="reducing_score"):
        pagoda.single_prefill_with_kv_cache(q, k, v, variant=bad, backend="torch")
    with pytest.raises(ValueError, match="score_mod must be a @triton.jit"):
        pagoda.AttentionVariant("plain", score_mod=lambda *a: a, torch_score_mod=lambda *a: a)
    with pytest.raises(ValueError, match="go together"):
        pagoda.AttentionVariant("half", mask_mod=_bad_mask)
    with pytest.raises(ValueError, match="variant"):
        pagoda.BatchDecodeWithPagedKVCacheWrapper(workspace(), variant="alibi")
    w = pagoda.BatchPrefillWithRaggedKVCacheWrapper(workspace(), variant=pagoda.variants.soft_cap(3.0))
    with pytest.raises(ValueError, match="logits_soft_cap"):
        w.plan([0, 4], [0, 9], 2, 2, 64, logits_soft_cap=5.0, q_data_type=BF16)


# -- custom masks --------------------------------------------------------------------------------
@pytest.mark.parametrize("packed", [False, True])
def test_custom_mask_batch_paged_prefill(packed):
    """Random masks (one request fully masked on some rows) and a speculative-decoding tree mask."""
    hq, hk, d, ps = 4, 2, 64, 4
    kv_lens, qo_lens = [30, 11, 16], [6, 11, 5]
    batch = PagedBatch(kv_lens, hk, d, ps, BF16)
    masks = [torch.rand(qo, kv) > 0.4 for qo, kv in zip(qo_lens, kv_lens)]
    masks[0][2] = False  # a row that sees nothing: output 0, lse -inf
    # request 2: a draft tree of 5 tokens after 11 verified ones: token i sees the prefix and its ancestors
    parent = [-1, 0, 0, 1, 2]
    tree = torch.zeros(5, 16, dtype=torch.bool)
    tree[:, :11] = True
    for i in range(5):
        j = i
        while j >= 0:
            tree[i, 11 + j] = True
            j = parent[j]
    masks[2] = tree
    flat = torch.cat([m.reshape(-1) for m in masks])
    qo = torch.tensor([0] + qo_lens).cumsum(0).to(torch.int32)
    kw = {}
    if packed:
        sizes = torch.tensor([0] + [q * k for q, k in zip(qo_lens, kv_lens)]).cumsum(0)
        pm, mask_indptr = pagoda.segment_packbits(flat, sizes)
        kw = dict(packed_custom_mask=pm, mask_indptr=mask_indptr)
    else:
        kw = dict(custom_mask=flat)
    w = pagoda.BatchPrefillWithPagedKVCacheWrapper(workspace(), backend="triton")
    w.plan(qo, batch.indptr, batch.indices, batch.last_page_len, hq, hk, d, ps, q_data_type=BF16, **kw)
    q = rand(int(qo[-1]), hq, d)
    out, lse = poisoned_like(q)
    w.run(q, batch.cache, out=out, lse=lse, return_lse=True)
    for b in range(3):
        s, e = int(qo[b]), int(qo[b + 1])
        ro, rl = dense_ref(q[s:e], batch.k[b], batch.v[b], keep=masks[b][None])
        assert rel_err(out[s:e], ro) < TOL[BF16] or torch.equal(ro, torch.zeros_like(ro))
        check_lse(lse[s:e], rl)
    assert torch.equal(out[2].float().cpu(), torch.zeros(hq, d))  # the fully masked row


def test_custom_mask_torch_backend_and_bad_input():
    q, k, v = rand(6, 2, 64), rand(10, 2, 64), rand(10, 2, 64)
    m = torch.rand(60) > 0.3
    out = pagoda.single_prefill_with_kv_cache(q.cpu(), k.cpu(), v.cpu(), custom_mask=m, backend="torch")
    ro, _ = dense_ref(q, k, v, keep=m.view(1, 6, 10))
    assert rel_err(out, ro) < 5e-3
    w = pagoda.BatchPrefillWithRaggedKVCacheWrapper(workspace(), backend="triton")
    with pytest.raises(ValueError, match="custom_mask"):
        w.plan([0, 6], [0, 10], 2, 2, 64, custom_mask=m[:59], q_data_type=BF16)
    with pytest.raises(ValueError, match="custom_mask"):
        w.plan([0, 6], [0, 10], 2, 2, 64, custom_mask=m.int(), q_data_type=BF16)
    with pytest.raises(ValueError, match="packed_custom_mask"):
        w.plan([0, 6], [0, 10], 2, 2, 64, packed_custom_mask=torch.zeros(3, dtype=torch.uint8), q_data_type=BF16)
    with pytest.raises(ValueError, match="mask_indptr"):
        w.plan([0, 6, 6], [0, 10, 10], 2, 2, 64, packed_custom_mask=torch.zeros(8, dtype=torch.uint8),
               mask_indptr=torch.tensor([0, 7, 8]), q_data_type=BF16)


# -- block-sparse attention ------------------------------------------------------------------------
def _dense_from_bsr(M, N, R, C, indptr, indices, block_mask=None, causal=False):
    keep = torch.zeros(M, N, dtype=torch.bool)
    for i in range(M // R):
        for n, j in enumerate(indices[indptr[i]:indptr[i + 1]].tolist()):
            blk = torch.ones(R, C, dtype=torch.bool) if block_mask is None else block_mask[indptr[i] + n]
            keep[i * R:(i + 1) * R, j * C:(j + 1) * C] = blk
    if causal:
        keep &= torch.arange(N)[None, :] <= torch.arange(M)[:, None]
    return keep


def _random_bsr(mb, nb, density, gen):
    rows = [sorted(np.random.default_rng(gen + i).choice(nb, size=max(1, int(nb * density)), replace=False).tolist())
            for i in range(mb)]
    indptr = torch.tensor([0] + np.cumsum([len(r) for r in rows]).tolist())
    return indptr, torch.tensor(sum(rows, []))


@pytest.mark.parametrize("R,C", [(1, 16), (16, 16), (16, 1), (32, 8)])
@pytest.mark.parametrize("kind", ["plain", "mask", "packed", "causal"])
def test_block_sparse_matches_dense(R, C, kind):
    M, N, hq, hk, d = 64, 64, 4, 2, 64
    indptr, indices = _random_bsr(M // R, N // C, 0.5, R * 100 + C)
    nnz = int(indptr[-1])
    bm = torch.rand(nnz, R, C) > 0.3 if kind in ("mask", "packed") else None
    kw = {}
    if kind == "mask":
        kw["mask"] = bm
    elif kind == "packed":
        kw["packed_mask"] = pagoda.packbits(bm.reshape(-1))
    q, k, v = rand(M, hq, d), rand(N, hk, d), rand(N, hk, d)
    w = pagoda.BlockSparseAttentionWrapper(workspace(), backend="triton")
    w.plan(indptr, indices, M, N, R, C, hq, hk, d, causal=kind == "causal", q_data_type=BF16, **kw)
    out, lse = poisoned_like(q)
    w.run(q, k, v, out=out, lse=lse, return_lse=True)
    keep = _dense_from_bsr(M, N, R, C, indptr, indices, bm, causal=kind == "causal")
    ro, rl = dense_ref(q, k, v, keep=keep[None])
    seen = keep.any(1)
    assert rel_err(out[seen], ro[seen]) < TOL[BF16]
    assert torch.equal(out[~seen].float().cpu(), torch.zeros_like(out[~seen].float().cpu()))
    check_lse(lse, rl)


def test_block_sparse_bad_input():
    w = pagoda.BlockSparseAttentionWrapper(workspace())
    ip, ix = torch.tensor([0, 1, 2]), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="R"):
        w.plan(ip, ix, 30, 32, 16, 16, 2, 2, 64, q_data_type=BF16)
    with pytest.raises(ValueError, match="C"):
        w.plan(ip, ix, 32, 30, 16, 16, 2, 2, 64, q_data_type=BF16)
    with pytest.raises(ValueError, match="indices"):
        w.plan(ip, torch.tensor([0, 2]), 32, 32, 16, 16, 2, 2, 64, q_data_type=BF16)
    with pytest.raises(ValueError, match="indptr"):
        w.plan(torch.tensor([0, 1]), ix, 32, 32, 16, 16, 2, 2, 64, q_data_type=BF16)
    with pytest.raises(ValueError, match="mask"):
        w.plan(ip, ix, 32, 32, 16, 16, 2, 2, 64, mask=torch.ones(2, 16, 8, dtype=torch.bool), q_data_type=BF16)
    with pytest.raises(RuntimeError, match="before plan"):
        pagoda.BlockSparseAttentionWrapper(workspace()).run(rand(32, 2, 64), rand(32, 2, 64), rand(32, 2, 64))


@pytest.mark.parametrize("causal", [False, True])
def test_variable_block_sparse(causal):
    hq, hk, d = 4, 2, 64
    row_sz = torch.tensor([[5, 11, 8], [8, 8, 8]])
    col_sz = torch.tensor([[7, 13, 4, 6], [10, 10, 5, 5]])
    bmap = torch.rand(hk, 3, 4) > 0.4
    bmap[:, :, 0] = True
    q, k, v = rand(hq, 24, d), rand(hk, 30, d), rand(hk, 30, d)
    w = pagoda.VariableBlockSparseAttentionWrapper(workspace(), backend="triton")
    w.plan(bmap, row_sz, col_sz, hq, hk, d, causal=causal, q_data_type=BF16)
    out = w.run(q, k, v)
    for g in range(hk):
        keep = torch.zeros(24, 30, dtype=torch.bool)
        r0 = [0] + row_sz[g].cumsum(0).tolist()
        c0 = [0] + col_sz[g].cumsum(0).tolist()
        for i in range(3):
            for j in range(4):
                if bmap[g, i, j]:
                    keep[r0[i]:r0[i + 1], c0[j]:c0[j + 1]] = True
        if causal:
            keep &= torch.arange(30)[None, :] <= torch.arange(24)[:, None]
        sl = slice(g * 2, g * 2 + 2)
        ro, _ = dense_ref(q[sl].transpose(0, 1), k[g][:, None], v[g][:, None], keep=keep[None])
        seen = keep.any(1)
        assert rel_err(out[sl].transpose(0, 1)[seen], ro[seen]) < TOL[BF16]


@pytest.mark.parametrize("R,C", [(64, 64), (128, 128), (128, 64)])
def test_block_sparse_large_blocks(R, C):
    """R and C of 64 and 128 (the sizes of the issue), with in-block masks."""
    M = N = 256
    hq, hk, d = 2, 1, 64
    indptr, indices = _random_bsr(M // R, N // C, 0.5, R + C)
    nnz = int(indptr[-1])
    bm = torch.rand(nnz, R, C) > 0.2
    q, k, v = rand(M, hq, d), rand(N, hk, d), rand(N, hk, d)
    w = pagoda.BlockSparseAttentionWrapper(workspace(), backend="triton")
    w.plan(indptr, indices, M, N, R, C, hq, hk, d, mask=bm, q_data_type=BF16)
    out, _ = poisoned_like(q)
    w.run(q, k, v, out=out)
    keep = _dense_from_bsr(M, N, R, C, indptr, indices, bm)
    ro, _ = dense_ref(q, k, v, keep=keep[None])
    seen = keep.any(1)
    assert rel_err(out[seen], ro[seen]) < TOL[BF16]
