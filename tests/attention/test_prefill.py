import pytest
import torch

import pagoda
from pagoda.attention import reference

from ..conftest import DEVICE
from .helpers import TOL, PagedBatch, check_lse, oracle, poisoned_like, rel_err, workspace

BACKEND = "triton"


def ragged_indptr(lens):
    return [0] + torch.tensor(lens).cumsum(0).tolist()


def run_paged_prefill(qo_lens, kv_lens, heads, head_dim, page_size, dtype, layout="NHD", ws_mb=16, **kw):
    batch = PagedBatch(kv_lens, heads[1], head_dim, page_size, dtype, layout)
    qo_indptr = ragged_indptr(qo_lens)
    w = pagoda.BatchPrefillWithPagedKVCacheWrapper(workspace(ws_mb), layout, backend=BACKEND)
    w.plan(torch.tensor(qo_indptr, dtype=torch.int32), batch.indptr, batch.indices, batch.last_page_len,
           heads[0], heads[1], head_dim, page_size, q_data_type=dtype, **kw)
    q = torch.randn(qo_indptr[-1], heads[0], head_dim, dtype=dtype, device=DEVICE)
    out, lse = poisoned_like(q)
    w.run(q, batch.cache, out=out, lse=lse, return_lse=True)
    ro, rl = oracle(q, qo_indptr, batch.k, batch.v, **kw)
    return w, out, lse, ro, rl


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (3, 1)])
@pytest.mark.parametrize("page_size", [1, 16])
def test_paged_prefill(dtype, causal, heads, page_size):
    # full prefill, append (qo < kv), a single token, a page-crossing odd length
    qo_lens, kv_lens = [37, 5, 1, 20], [37, 50, 13, 20]
    _, o, l2, ro, rl = run_paged_prefill(qo_lens, kv_lens, heads, 64, page_size, dtype, causal=causal)
    assert rel_err(o, ro) < TOL[dtype]
    check_lse(l2, rl)


@pytest.mark.parametrize("kw", [{"causal": True, "window_left": 8}, {"causal": False, "window_left": 5},
                                {"causal": True, "logits_soft_cap": 2.0}, {"causal": True, "sm_scale": 0.05}])
def test_paged_prefill_variants(kw):
    _, o, l2, ro, rl = run_paged_prefill([30, 9], [30, 61], (4, 2), 64, 8, torch.float16, "HND", **kw)
    assert rel_err(o, ro) < TOL[torch.float16]
    check_lse(l2, rl)


@pytest.mark.parametrize("head_dim", [128, 256])
def test_paged_prefill_head_dims(head_dim):
    _, o, l2, ro, rl = run_paged_prefill([18], [40], (4, 2), head_dim, 16, torch.bfloat16, causal=True)
    assert rel_err(o, ro) < TOL[torch.bfloat16]
    check_lse(l2, rl)


def test_prefill_split_kv():
    """Few query tiles over a long KV: the planner splits the KV and merges."""
    w, o, l2, ro, rl = run_paged_prefill([3, 2], [900, 40], (4, 2), 64, 16, torch.bfloat16, causal=True)
    assert len(w._plan.work.splits) > 0, "expected a split plan"
    assert rel_err(o, ro) < TOL[torch.bfloat16]
    check_lse(l2, rl)


def test_prefill_rows_that_see_nothing():
    """Causal with qo_len > kv_len: the first queries see no key (out 0, lse -inf)."""
    _, o, l2, ro, rl = run_paged_prefill([6], [2], (2, 1), 64, 4, torch.float16, causal=True)
    assert torch.equal(o[:4].cpu(), torch.zeros_like(o[:4]).cpu())
    assert torch.isinf(l2[:4]).all()
    assert rel_err(o, ro) < TOL[torch.float16]
    check_lse(l2, rl)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("causal", [False, True])
def test_ragged_prefill(layout, causal):
    qo_lens, kv_lens = [21, 4, 33], [21, 40, 33]
    heads, d, dtype = (8, 2), 64, torch.bfloat16
    q = torch.randn(sum(qo_lens), heads[0], d, dtype=dtype, device=DEVICE)
    ks = [torch.randn(n, heads[1], d, dtype=dtype, device=DEVICE) for n in kv_lens]
    vs = [torch.randn(n, heads[1], d, dtype=dtype, device=DEVICE) for n in kv_lens]
    k, v = torch.cat(ks), torch.cat(vs)
    if layout == "HND":
        k, v = k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()
    w = pagoda.BatchPrefillWithRaggedKVCacheWrapper(workspace(), layout, backend=BACKEND)
    w.plan(ragged_indptr(qo_lens), ragged_indptr(kv_lens), heads[0], heads[1], d, causal=causal,
           q_data_type=dtype)
    out, lse = poisoned_like(q)
    w.run(q, k, v, out=out, lse=lse, return_lse=True)
    ro, rl = oracle(q, ragged_indptr(qo_lens), ks, vs, causal=causal)
    assert rel_err(out, ro) < TOL[dtype]
    check_lse(lse, rl)


@pytest.mark.parametrize("causal", [False, True])
def test_single_prefill(causal):
    q = torch.randn(24, 4, 64, dtype=torch.float16, device=DEVICE)
    k = torch.randn(50, 4, 64, dtype=torch.float16, device=DEVICE)
    v = torch.randn(50, 4, 64, dtype=torch.float16, device=DEVICE)
    o = pagoda.single_prefill_with_kv_cache(q, k, v, causal=causal, backend=BACKEND)
    ro, _ = reference.attention(q, k, v, causal=causal, compute_dtype=torch.float64, out_dtype=torch.float64)
    assert rel_err(o, ro) < TOL[torch.float16]


def test_torch_backend_prefill():
    batch = PagedBatch([30, 12], 2, 64, 5, torch.float16)
    w = pagoda.BatchPrefillWithPagedKVCacheWrapper(workspace(), backend="torch")
    w.plan([0, 10, 22], batch.indptr, batch.indices, batch.last_page_len, 4, 2, 64, 5, causal=True,
           q_data_type=torch.float16)
    q = torch.randn(22, 4, 64, dtype=torch.float16, device=DEVICE)
    o, l2 = w.run(q, batch.cache, return_lse=True)
    ro, rl = oracle(q, [0, 10, 22], batch.k, batch.v, causal=True)
    assert rel_err(o, ro) < TOL[torch.float16]
    check_lse(l2, rl)


def test_prefill_kernel_choice_is_validated(monkeypatch):
    """PAGODA_PREFILL_KERNEL picks between the Gluon sm_90 kernel and the Triton one: a typo is an error,
    not a silent fallback; on the CPU no plan uses the sm_90 kernel."""
    batch = PagedBatch([20], 2, 64, 16, torch.bfloat16)
    w = pagoda.BatchPrefillWithPagedKVCacheWrapper(workspace(4), backend=BACKEND)
    args = (torch.tensor([0, 20], dtype=torch.int32), batch.indptr, batch.indices, batch.last_page_len, 4, 2, 64, 16)
    monkeypatch.setenv("PAGODA_PREFILL_KERNEL", "gluon")
    with pytest.raises(ValueError, match="PAGODA_PREFILL_KERNEL"):
        w.plan(*args, causal=True, q_data_type=torch.bfloat16)
    monkeypatch.setenv("PAGODA_PREFILL_KERNEL", "triton")
    w.plan(*args, causal=True, q_data_type=torch.bfloat16)
    assert not w._plan.sm90


def test_cuda_graph_wrapper_keeps_its_first_kernel():
    """A CUDA-graph wrapper's first plan fixes the kernel (a captured run() replays it): a decode-shaped
    first plan keeps the decode configuration for a later prefill-shaped batch (whose answer must still be
    right), and a plan that changes a compiled-in parameter is refused, naming it."""
    heads, d, ps, dt = (8, 2), 64, 4, torch.bfloat16
    w = pagoda.BatchPrefillWithPagedKVCacheWrapper(workspace(16), use_cuda_graph=True, backend=BACKEND)
    first = PagedBatch([5, 9], heads[1], d, ps, dt)
    w.plan(torch.tensor([0, 1, 2], dtype=torch.int32), first.indptr, first.indices, first.last_page_len,
           *heads, d, ps, causal=True, q_data_type=dt)
    decode_config = w._plan.config
    nxt = PagedBatch([23, 40], heads[1], d, ps, dt)
    qo = [0, 17, 30]
    w.plan(torch.tensor(qo, dtype=torch.int32), nxt.indptr, nxt.indices, nxt.last_page_len, *heads, d, ps,
           causal=True, q_data_type=dt)
    assert w._plan.config is decode_config
    q = torch.randn(qo[-1], heads[0], d, dtype=dt, device=DEVICE)
    out, lse = poisoned_like(q)
    w.run(q, nxt.cache, out=out, lse=lse, return_lse=True)
    ro, rl = oracle(q, qo, nxt.k, nxt.v, causal=True)
    assert rel_err(out, ro) < TOL[dt]
    check_lse(lse, rl)
    # an eager wrapper chooses again (the prefill configuration for this batch)
    e = pagoda.BatchPrefillWithPagedKVCacheWrapper(workspace(16), backend=BACKEND)
    e.plan(torch.tensor(qo, dtype=torch.int32), nxt.indptr, nxt.indices, nxt.last_page_len, *heads, d, ps,
           causal=True, q_data_type=dt)
    assert e._plan.config != decode_config
    with pytest.raises(ValueError, match="causal"):
        w.plan(torch.tensor(qo, dtype=torch.int32), nxt.indptr, nxt.indices, nxt.last_page_len, *heads, d, ps,
               causal=False, q_data_type=dt)
    with pytest.raises(ValueError, match="page_size"):
        w.plan(torch.tensor(qo, dtype=torch.int32), nxt.indptr, nxt.indices, nxt.last_page_len, *heads, d, 8,
               causal=True, q_data_type=dt)


def test_replans_with_other_parameters_use_them():
    """plan() reuses the previous plan's launch arguments when nothing they depend on changed: a re-plan
    that changes causal, sm_scale or the split layout on the same wrapper must still get its own."""
    heads, d, ps, dt = (4, 2), 64, 4, torch.bfloat16
    w = pagoda.BatchPrefillWithPagedKVCacheWrapper(workspace(16), backend=BACKEND)
    hits = 0
    for kv_lens, qo_lens, kw in (([30, 7], [5, 7], dict(causal=True)), ([12, 20], [4, 6], dict(causal=True)),
                                 ([30, 7], [5, 7], dict(causal=False)),
                                 ([30, 7], [5, 7], dict(causal=False, sm_scale=0.3)),
                                 ([300, 9], [3, 9], dict(causal=True, sm_scale=0.3)),
                                 ([30, 7], [5, 7], dict(causal=True))):
        batch = PagedBatch(kv_lens, heads[1], d, ps, dt)
        qo = ragged_indptr(qo_lens)
        before = getattr(w, "_launch_cache", None)
        w.plan(torch.tensor(qo, dtype=torch.int32), batch.indptr, batch.indices, batch.last_page_len, *heads, d, ps,
               q_data_type=dt, **kw)
        hits += w._launch_cache is before
        q = torch.randn(qo[-1], heads[0], d, dtype=dt, device=DEVICE)
        out, lse = poisoned_like(q)
        w.run(q, batch.cache, out=out, lse=lse, return_lse=True)
        ro, rl = oracle(q, qo, batch.k, batch.v, **kw)
        assert rel_err(out, ro) < TOL[dt], kw
        check_lse(lse, rl)
    assert hits == 1, "the second plan (same parameters) should reuse the launch arguments"


@pytest.mark.parametrize("form", ["NHD", "HND", "NHD-tuple", "ragged", "ragged-HND", "ragged-qkv"])
@pytest.mark.parametrize("page_size,block_n", [(16, 128), (8, 64), (128, 64), (64, 64)])
def test_gluon_prefill_tma_views(form, page_size, block_n):
    """The geometry of the Gluon prefill producer's bulk copies (kernels/prefill_sm90.tma_views; the kernel
    itself runs only on the device, test_gpu.py): a copy at row page * rows_per_page + slot + head * head_rows
    (ragged: token + head * head_rows), column head * head_cols of the descriptor's 2-D view must read exactly
    the cache's K / V rows of that page, slot and head, and the view must lie inside the tensor's storage."""
    from pagoda.attention.formats import paged_strides, unpack_paged_kv_cache
    from pagoda.attention.kernels import prefill_sm90

    if not prefill_sm90.HAVE_GLUON:
        pytest.skip("the Gluon kernel targets another Triton version")
    pages, h, d = 6, 4, 64
    torch.manual_seed(0)
    paged = not form.startswith("ragged")
    if paged:
        layout = form[:3]
        shape = (pages, 2, page_size, h, d) if layout == "NHD" else (pages, 2, h, page_size, d)
        cache = torch.randn(shape, dtype=torch.bfloat16)
        if form.endswith("tuple"):
            cache = (cache[:, 0].contiguous(), cache[:, 1].contiguous())
        k, v = unpack_paged_kv_cache(cache, layout)
        sk, sv = paged_strides(k, layout), paged_strides(v, layout)
    else:
        t = 50
        if form == "ragged-qkv":  # K and V as slices of one fused projection [T, (Hq + 2 Hk) * D]
            qkv = torch.randn(t, (8 + 2 * h) * d, dtype=torch.bfloat16)
            k = qkv[:, 8 * d:(8 + h) * d].view(t, h, d)
            v = qkv[:, (8 + h) * d:].view(t, h, d)
        else:
            k, v = torch.randn(2, t, h, d, dtype=torch.bfloat16).unbind(0)
            if form == "ragged-HND":  # [H, T, D]
                k, v = k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()
        nhd = form != "ragged-HND"
        sk, sv = [(x.stride(0), 0, x.stride(1)) if nhd else (x.stride(1), 0, x.stride(0)) for x in (k, v)]
    views = prefill_sm90.tma_views(k, v, sk, sv, paged, page_size, block_n, d, h)
    assert views is not None
    kd, vd, rpp, hrows, hcols = views
    assert kd.block_shape == [min(page_size, block_n) if paged else block_n, d]
    for desc, x in ((kd, k), (vd, v)):
        flat = torch.as_strided(x, desc.shape, desc.strides)  # raises if the view leaves the storage
        for _ in range(20):
            head = int(torch.randint(h, ()))
            if paged:
                page, slot = int(torch.randint(pages, ())), int(torch.randint(page_size, ()))
                row = page * rpp + slot + head * hrows
                want = x[page, slot, head] if form[:3] == "NHD" else x[page, head, slot]
            else:
                tok = int(torch.randint(x.shape[0] if nhd else x.shape[1], ()))
                row = tok * rpp + head * hrows
                want = x[tok, head] if nhd else x[head, tok]
            assert torch.equal(flat[row, head * hcols:head * hcols + d], want)


def test_gluon_prefill_tma_views_refused():
    """Caches the bulk copies cannot address give None (the producer's cp.async gathers serve them): pages of
    fewer than 8 or a non-power-of-two number of tokens, K and V of different geometries, rows not 16-byte
    aligned."""
    from pagoda.attention.formats import paged_strides
    from pagoda.attention.kernels import prefill_sm90

    if not prefill_sm90.HAVE_GLUON:
        pytest.skip("the Gluon kernel targets another Triton version")
    for ps in (1, 4, 24):
        c = torch.randn(5, 2, ps, 2, 64, dtype=torch.bfloat16)
        k, v = c[:, 0], c[:, 1]
        assert prefill_sm90.tma_views(k, v, paged_strides(k, "NHD"), paged_strides(v, "NHD"), True, ps, 64, 64,
                                      2) is None
    c = torch.randn(5, 2, 16, 2, 64, dtype=torch.bfloat16)
    k, v = c[:, 0], c[:, 1].contiguous()
    assert prefill_sm90.tma_views(k, v, paged_strides(k, "NHD"), paged_strides(v, "NHD"), True, 16, 64, 64,
                                  2) is None
    # rows 248 bytes apart (not a multiple of 16), the base 8 bytes past an aligned one
    x = torch.randn(40, 2 * 60 + 4, dtype=torch.bfloat16)[:, 4:].view(40, 2, 60)
    assert prefill_sm90.tma_views(x, x, (x.stride(0), 0, x.stride(1)), (x.stride(0), 0, x.stride(1)), False, 16,
                                  64, 60, 2) is None
