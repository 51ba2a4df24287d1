"""Attention sinks (gpt-oss; FlashInfer's run(sinks=)): one learned logit per query head in the softmax's sum.

The kernels add the sink where they write the final out / lse: an unsplit tile's epilogue and the merge of a
split tile (never a chunk's partial state). These run the Triton kernel (Triton's interpreter on the CPU) and the
PyTorch path against the float64 oracle with the same sinks; tests/attention/test_gpu.py runs the Gluon kernels.
"""
import math

import pytest
import torch

import pagoda
from pagoda.attention import reference

from ..conftest import DEVICE
from .helpers import TOL, PagedBatch, check_lse, check_requests, oracle, poisoned_like, rel_err, run_decode, workspace

BACKEND = "triton"


def sinks_for(num_qo_heads: int) -> torch.Tensor:
    """Sink logits spread over -2 .. 9 across the heads (shuffled, with noise): a row's natural-log sum over
    n random keys is ~ln(n) + 0.5, so every request from a few keys to ~1000 has heads whose output the sink
    scales by a visible fraction (and heads where it takes nearly all or nothing)."""
    s = torch.linspace(-2.0, 9.0, num_qo_heads) + 0.3 * torch.randn(num_qo_heads)
    return s[torch.randperm(num_qo_heads)].to(DEVICE)


def test_reference_sink_is_a_scale_of_the_plain_softmax():
    """The oracle itself, against an independent form: with a sink s, out = out_plain * e^lse / (e^lse + e^s)
    and lse = log2(2^lse_plain + e^s); a -inf sink changes nothing; a row that sees no key gets 0 and s log2(e)."""
    q = torch.randn(5, 6, 32, dtype=torch.float64)
    k = torch.randn(9, 2, 32, dtype=torch.float64)
    v = torch.randn(9, 2, 32, dtype=torch.float64)
    s = torch.randn(6, dtype=torch.float64) * 2
    kw = dict(causal=True, compute_dtype=torch.float64, out_dtype=torch.float64)
    o0, l0 = reference.attention(q, k, v, **kw)
    o1, l1 = reference.attention(q, k, v, sinks=s, **kw)
    lse_nat = l0.double() * math.log(2.0)  # [q, h]
    frac = torch.exp(lse_nat) / (torch.exp(lse_nat) + torch.exp(s)[None, :])
    assert torch.allclose(o1, o0 * frac[..., None], atol=1e-12)
    assert torch.allclose(l1.double(), torch.log2(torch.exp(lse_nat) + torch.exp(s)[None, :]), atol=1e-5)
    assert (frac < 0.999).any(), "the sinks should change the output"
    o2, l2 = reference.attention(q, k, v, sinks=torch.full((6,), float("-inf"), dtype=torch.float64), **kw)
    assert torch.allclose(o2, o0) and torch.allclose(l2, l0)
    o3, l3 = reference.attention(q, k[:0], v[:0], sinks=s, **kw)
    assert torch.equal(o3, torch.zeros_like(o3))
    assert torch.allclose(l3.double(), (s / math.log(2.0))[None, :].expand(5, 6), atol=1e-6)


def _decode(kv_lens, heads, head_dim, dtype, *, page_size=16, **kw):
    """helpers.run_decode of a random batch of kv_lens with sinks_for(num_qo_heads)."""
    return run_decode(PagedBatch(kv_lens, heads[1], head_dim, page_size, dtype), heads[0], head_dim, dtype,
                      sinks=sinks_for(heads[0]), **kw)


@pytest.mark.parametrize("heads", [(8, 2), (4, 4), (6, 2)])
def test_decode_with_sinks_unsplit_split_and_empty(heads):
    """Unsplit tiles (short requests), a split one (the merge adds the sink once), an empty request (out 0,
    lse = the sink)."""
    w, out, lse, ro, rl = _decode([700, 3, 0, 41], heads, 64, torch.bfloat16)
    assert len(w._plan.work.splits) > 0, "expected a split tile"
    check_requests(out, lse, ro, rl, range(5), TOL[torch.bfloat16])
    assert torch.equal(out[2].cpu(), torch.zeros_like(out[2]).cpu())


@pytest.mark.parametrize("plan_kw", [{"logits_soft_cap": 4.0}, {"window_left": 20}, {"sm_scale": 0.3}])
def test_decode_with_sinks_and_other_options(plan_kw):
    """A soft cap / window / sm_scale changes the logits, not the sink (it is on the logits' scale)."""
    _, out, lse, ro, rl = _decode([90, 17], (4, 2), 64, torch.float16, page_size=8, **plan_kw)
    check_requests(out, lse, ro, rl, range(3), TOL[torch.float16])


def test_decode_sinks_without_workspace_and_on_the_torch_path():
    for kw in (dict(ws_mb=0), dict(backend="torch")):
        w, out, lse, ro, rl = _decode([300, 5], (8, 2), 64, torch.bfloat16, **kw)
        check_requests(out, lse, ro, rl, range(3), TOL[torch.bfloat16])


def test_decode_sinks_many_chunks(monkeypatch):
    """A request in more chunks than a merge round loads (8): the sink enters after the last round."""
    from pagoda.attention import plan as plan_mod

    monkeypatch.setattr(plan_mod, "_choose_chunk_len_small", lambda *a: 16)
    monkeypatch.setattr(plan_mod, "_choose_chunk_len", lambda *a: 16)
    w, out, lse, ro, rl = _decode([400, 9], (8, 2), 64, torch.bfloat16)
    assert int(w._plan.work.splits[0, 1]) == 25
    check_requests(out, lse, ro, rl, range(3), TOL[torch.bfloat16])


@pytest.mark.parametrize("causal", [True, False])
def test_paged_prefill_with_sinks(causal):
    """Prefill tiles of many query rows, one request split over its KV (a long append), rows that see nothing
    (causal with qo_len > kv_len is not a case; here a request with no KV)."""
    kv_lens, qo_lens = [600, 40, 0], [3, 40, 2]
    batch = PagedBatch(kv_lens, 2, 64, 16, torch.bfloat16)
    w = pagoda.BatchPrefillWithPagedKVCacheWrapper(workspace(), "NHD", backend=BACKEND)
    qo_indptr = torch.tensor([0] + torch.tensor(qo_lens).cumsum(0).tolist(), dtype=torch.int32)
    w.plan(qo_indptr, batch.indptr, batch.indices, batch.last_page_len, 8, 2, 64, 16, causal=causal,
           q_data_type=torch.bfloat16)
    q = torch.randn(int(qo_indptr[-1]), 8, 64, dtype=torch.bfloat16, device=DEVICE)
    sinks = sinks_for(8)
    out, lse = poisoned_like(q)
    w.run(q, batch.cache, out=out, lse=lse, sinks=sinks)
    ro, rl = oracle(q, qo_indptr.tolist(), batch.k, batch.v, causal=causal, sinks=sinks)
    check_requests(out, lse, ro, rl, qo_indptr.tolist(), TOL[torch.bfloat16])


def test_ragged_and_single_prefill_and_decode_with_sinks():
    qo_lens, kv_lens = [5, 33], [20, 33]
    k = torch.randn(sum(kv_lens), 2, 64, dtype=torch.float16, device=DEVICE)
    v = torch.randn_like(k)
    q = torch.randn(sum(qo_lens), 4, 64, dtype=torch.float16, device=DEVICE)
    sinks = sinks_for(4)
    w = pagoda.BatchPrefillWithRaggedKVCacheWrapper(workspace(), "NHD", backend=BACKEND)
    w.plan([0, 5, 38], [0, 20, 53], 4, 2, 64, causal=True, q_data_type=torch.float16)
    out, lse = poisoned_like(q)
    w.run(q, k, v, out=out, lse=lse, sinks=sinks)
    ro, rl = oracle(q, [0, 5, 38], [k[:20], k[20:]], [v[:20], v[20:]], causal=True, sinks=sinks)
    check_requests(out, lse, ro, rl, [0, 5, 38], TOL[torch.float16])

    o, l2 = pagoda.single_prefill_with_kv_cache(q[5:], k[20:], v[20:], causal=True, return_lse=True,
                                                sinks=sinks, backend=BACKEND)
    ro, rl = reference.attention(q[5:], k[20:], v[20:], causal=True, sinks=sinks, compute_dtype=torch.float64,
                                 out_dtype=torch.float64)
    assert rel_err(o, ro) < TOL[torch.float16]
    check_lse(l2, rl)
    o, l2 = pagoda.single_decode_with_kv_cache(q[0], k, v, return_lse=True, sinks=sinks, backend=BACKEND)
    ro, rl = reference.attention(q[:1], k, v, sinks=sinks, compute_dtype=torch.float64, out_dtype=torch.float64)
    assert rel_err(o, ro[0]) < TOL[torch.float16]
    check_lse(l2, rl[0])


def test_variant_with_sinks():
    """A variant (ALiBi: its own kernel path, the same epilogue) with sinks."""
    q = torch.randn(7, 8, 64, dtype=torch.float16, device=DEVICE)
    k = torch.randn(30, 2, 64, dtype=torch.float16, device=DEVICE)
    v = torch.randn_like(k)
    sinks = sinks_for(8)
    var = pagoda.variants.alibi(pagoda.variants.alibi_slopes(8))
    o, l2 = pagoda.single_prefill_with_kv_cache(q, k, v, causal=True, return_lse=True, variant=var, sinks=sinks,
                                                backend=BACKEND)
    ro, rl = reference.attention(q, k, v, causal=True, variant=var, sinks=sinks, compute_dtype=torch.float64,
                                 out_dtype=torch.float64)
    assert rel_err(o, ro) < TOL[torch.float16]
    check_lse(l2, rl)


def test_bad_sinks_name_the_argument():
    batch = PagedBatch([9, 3], 2, 64, 16, torch.float16)
    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(workspace(), "NHD", backend=BACKEND)
    w.plan(batch.indptr, batch.indices, batch.last_page_len, 4, 2, 64, 16, q_data_type=torch.float16)
    q = torch.randn(2, 4, 64, dtype=torch.float16, device=DEVICE)
    for bad, match in ((torch.zeros(4, dtype=torch.float16, device=DEVICE), "sinks must be float32"),
                       (torch.zeros(8, device=DEVICE), r"sinks must have shape \(4,\)"),
                       (torch.zeros(4, 1, device=DEVICE), r"sinks must have shape \(4,\)"),
                       ([0.0] * 4, "sinks must be a float32 tensor"),
                       (torch.zeros(4, 2, device=DEVICE)[:, 0], "sinks must be contiguous"),
                       (torch.zeros(4, device="meta"), "sinks is on meta")):
        with pytest.raises(ValueError, match=match):
            w.run(q, batch.cache, sinks=bad)
    k = torch.randn(9, 2, 64, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="sinks must be float32"):
        pagoda.single_prefill_with_kv_cache(q[:1], k, k, sinks=torch.zeros(4, dtype=torch.int32, device=DEVICE),
                                            backend=BACKEND)


# -- GPU: the Gluon kernels (sm_90) and the Triton kernel at real sizes ---------------------------------------------

def _gluon_only():
    if not torch.cuda.is_available():
        pytest.fail("gpu tests need CUDA: deselect them with -m 'not gpu' on a CPU machine")
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon kernels are for sm_90")


@pytest.mark.gpu
@pytest.mark.parametrize("page_size,heads,head_dim,kv_dtype", [
    (16, (32, 8), 128, torch.bfloat16), (1, (64, 8), 64, torch.bfloat16), (16, (16, 8), 256, torch.bfloat16),
    (16, (32, 8), 128, torch.float8_e4m3fn), (16, (32, 32), 128, torch.bfloat16)])
@pytest.mark.parametrize("kernel", ["auto", "triton"])
def test_decode_sinks_real_sizes(page_size, heads, head_dim, kv_dtype, kernel, monkeypatch):
    """The Gluon decode kernel (auto on sm_90: unsplit tiles' epilogue and the one-query merge of a 32k request's
    ~32 chunks) and the Triton kernel, 16-bit and fp8 caches, against the float64 oracle with the same sinks."""
    _gluon_only()
    monkeypatch.setenv("PAGODA_DECODE_KERNEL", kernel)
    monkeypatch.setenv("PAGODA_FP8_DECODE_KERNEL", kernel)
    kv_lens = [1, 4096, 333, 0, 32768, 8191]
    batch = PagedBatch(kv_lens, heads[1], head_dim, page_size, torch.bfloat16)
    cache = batch.cache.to(kv_dtype)
    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(workspace(256))
    w.plan(batch.indptr, batch.indices, batch.last_page_len, heads[0], heads[1], head_dim, page_size,
           q_data_type=torch.bfloat16, kv_data_type=kv_dtype)
    assert (w._plan.decode_sm90_constexprs is not None) == (kernel == "auto")
    assert w._plan.work.partial_rows > 0, "expected split tiles"
    q = torch.randn(len(kv_lens), heads[0], head_dim, dtype=torch.bfloat16, device="cuda")
    sinks = sinks_for(heads[0])
    out, lse = poisoned_like(q)
    kw = {} if kv_dtype == torch.bfloat16 else dict(k_scale=1.0, v_scale=1.0)
    w.run(q, cache, out=out, lse=lse, sinks=sinks, **kw)
    ks = [k.to(kv_dtype).double().cpu() for k in batch.k]
    vs = [v.to(kv_dtype).double().cpu() for v in batch.v]
    ro, rl = oracle(q.cpu(), list(range(len(kv_lens) + 1)), ks, vs, sinks=sinks.cpu())
    check_requests(out, lse, ro, rl, range(len(kv_lens) + 1), TOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("paged,head_dim", [(True, 128), (False, 128), (True, 64), (True, 256)])
@pytest.mark.parametrize("lens", ["unsplit", "split"])
def test_prefill_sinks_gluon_kernel(paged, head_dim, lens):
    """The Gluon prefill kernel: unsplit tiles' epilogue and the two-pass merge of split tiles (head_dim 256:
    its column slices), paged and ragged, causal, against the float64 oracle with the same sinks."""
    _gluon_only()
    hq, hk = 16, 4
    qo_lens, kv_lens = ([1000, 129, 1, 512], [1000, 700, 64, 4608]) if lens == "unsplit" else \
        ([64, 1, 20], [8192, 3000, 5000])
    qo_indptr = torch.tensor([0] + torch.tensor(qo_lens).cumsum(0).tolist(), dtype=torch.int32)
    batch = PagedBatch(kv_lens, hk, head_dim, 16, torch.bfloat16)
    q = torch.randn(int(qo_indptr[-1]), hq, head_dim, dtype=torch.bfloat16, device="cuda")
    sinks = sinks_for(hq)
    out, lse = poisoned_like(q)
    if paged:
        w = pagoda.BatchPrefillWithPagedKVCacheWrapper(workspace(128))
        w.plan(qo_indptr, batch.indptr, batch.indices, batch.last_page_len, hq, hk, head_dim, 16, causal=True,
               q_data_type=torch.bfloat16)
        w.run(q, batch.cache, out=out, lse=lse, sinks=sinks)
    else:
        kv_indptr = torch.tensor([0] + torch.tensor(kv_lens).cumsum(0).tolist(), dtype=torch.int32)
        w = pagoda.BatchPrefillWithRaggedKVCacheWrapper(workspace(128))
        w.plan(qo_indptr, kv_indptr, hq, hk, head_dim, causal=True, q_data_type=torch.bfloat16)
        w.run(q, torch.cat(batch.k), torch.cat(batch.v), out=out, lse=lse, sinks=sinks)
    assert w._plan.sm90, "expected the Gluon prefill kernel"
    if lens == "split":
        assert w._plan.work.partial_rows > 0, "expected split tiles"
    ro, rl = oracle(q.cpu(), qo_indptr.tolist(), [k.cpu() for k in batch.k], [v.cpu() for v in batch.v], causal=True,
                    sinks=sinks.cpu())
    check_requests(out, lse, ro, rl, qo_indptr.tolist(), TOL[torch.bfloat16])


@pytest.mark.gpu
def test_decode_sinks_in_cuda_graph():
    """A captured run(sinks=) reads the sinks tensor it captured: new values written in place and a new plan
    (a long request split, an empty one) both take effect at the next replay."""
    if not torch.cuda.is_available():
        pytest.fail("gpu tests need CUDA")
    hq, hk, d, ps, bsz = 32, 8, 128, 16, 8
    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(workspace(128), use_cuda_graph=True)
    first = PagedBatch([100] * bsz, hk, d, ps, torch.bfloat16, spare_pages=2000)
    w.plan(first.indptr, first.indices, first.last_page_len, hq, hk, d, ps, q_data_type=torch.bfloat16)
    q = torch.randn(bsz, hq, d, dtype=torch.bfloat16, device="cuda")
    sinks = sinks_for(hq)
    out = torch.empty_like(q)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            w.run(q, first.cache, out=out, sinks=sinks)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        w.run(q, first.cache, out=out, sinks=sinks)
    for lens in ([100] * bsz, [20000, 0] + [300] * (bsz - 2)):
        nxt = PagedBatch(lens, hk, d, ps, torch.bfloat16, spare_pages=0)
        first.cache.fill_(float("nan"))
        first.cache[: nxt.cache.shape[0]] = nxt.cache
        w.plan(nxt.indptr, nxt.indices, nxt.last_page_len, hq, hk, d, ps, q_data_type=torch.bfloat16)
        sinks.copy_(sinks_for(hq))
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        ro, rl = oracle(q.cpu(), list(range(bsz + 1)), [k.cpu() for k in nxt.k], [v.cpu() for v in nxt.v],
                        sinks=sinks.cpu())
        check_requests(out, None, ro, rl, range(bsz + 1), TOL[torch.bfloat16])


def test_flashinfer_sink_wrapper_by_its_name():
    """BatchAttentionWithAttentionSinkWrapper: FlashInfer's constructor and run(q, cache, sinks, sm_scale), for
    prefill and for decode (one-query requests), equal to the prefill wrapper's run(sinks=); an sm_scale other than
    plan()'s is refused."""
    batch = PagedBatch([50, 300], 2, 64, 16, torch.bfloat16)
    sinks = sinks_for(8)
    for qo_lens in ([7, 20], [1, 1]):
        qo_indptr = torch.tensor([0] + torch.tensor(qo_lens).cumsum(0).tolist(), dtype=torch.int32)
        q = torch.randn(int(qo_indptr[-1]), 8, 64, dtype=torch.bfloat16, device=DEVICE)
        w = pagoda.BatchAttentionWithAttentionSinkWrapper(workspace(), "NHD", q_data_type=torch.bfloat16,
                                                          kv_data_type=torch.bfloat16, head_dim_qk=64,
                                                          head_dim_vo=64, backend="fa3")
        w.plan(qo_indptr, batch.indptr, batch.indices, batch.last_page_len, 8, 2, 64, 16, causal=True,
               q_data_type=torch.bfloat16)
        out, lse = w.run(q, batch.cache, sinks, 64 ** -0.5, return_lse=True)
        ro, rl = oracle(q, qo_indptr.tolist(), batch.k, batch.v, causal=True, sinks=sinks)
        check_requests(out, lse, ro, rl, qo_indptr.tolist(), TOL[torch.bfloat16])
        with pytest.raises(ValueError, match="sm_scale 0.5 differs from plan"):
            w.run(q, batch.cache, sinks, 0.5)
    with pytest.raises(ValueError, match="head_dim_vo"):
        pagoda.BatchAttentionWithAttentionSinkWrapper(workspace(), head_dim_qk=64, head_dim_vo=128)
