"""FlashInfer's older cascade API (shared-prefix decode / prefill wrappers), its CUDA-graph decode wrapper class,
fast_decode_plan and reset_workspace_buffer, against the float64 oracle over the concatenated KV."""
import pytest
import torch

import pagoda
from pagoda.attention import reference
from pagoda.attention.formats import NotPlannedError

from ..conftest import DEVICE
from .helpers import TOL, PagedBatch, check_lse, rel_err, workspace


def _shared(n, hk, d, dtype, layout):
    k = torch.randn(n, hk, d, dtype=dtype, device=DEVICE)
    v = torch.randn(n, hk, d, dtype=dtype, device=DEVICE)
    if layout == "NHD":
        return k, v, k, v
    return k, v, k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()


def _check(out, lse, q, qo, shared, batch, causal=False, sm_scale=None, dtype=torch.bfloat16):
    for b in range(len(qo) - 1):
        rows = slice(qo[b], qo[b + 1])
        k, v = torch.cat([shared[0], batch.k[b]]), torch.cat([shared[1], batch.v[b]])
        ro, rl = reference.attention(q[rows], k, v, causal=causal, sm_scale=sm_scale, compute_dtype=torch.float64,
                                     out_dtype=torch.float64)
        assert rel_err(out[rows], ro) < TOL[dtype], b
        if lse is not None:
            check_lse(lse[rows], rl)


@pytest.mark.parametrize("layout,prefix", [("NHD", 19), ("NHD", 32), ("HND", 19)])
def test_shared_prefix_decode(layout, prefix):
    """Each request's query over a shared prefix (contiguous: NHD seen as pages of 16 tokens, or of 1 where its
    length is no multiple of 16; HND a ragged request) and its own pages (none for one request), merged: the oracle
    over the concatenation; the lse too; sm_scale through begin_forward's keywords."""
    hq, hk, d, ps, dtype = 8, 2, 64, 8, torch.bfloat16
    batch = PagedBatch([0, 5, 16, 23], hk, d, ps, dtype, layout=layout)
    k0, v0, ks, vs = _shared(prefix, hk, d, dtype, layout)
    w = pagoda.BatchDecodeWithSharedPrefixPagedKVCacheWrapper(workspace(), layout, backend="triton")
    q = torch.randn(4, hq, d, dtype=dtype, device=DEVICE)
    with pytest.raises(NotPlannedError):
        w.forward(q, ks, vs, batch.cache)
    w.begin_forward(batch.indptr, batch.indices, batch.last_page_len, hq, hk, d, ps, data_type=dtype)
    out, lse = w.forward(q, ks, vs, batch.cache, return_lse=True)
    _check(out, lse, q, list(range(5)), (k0, v0), batch)
    w.begin_forward(batch.indptr, batch.indices, batch.last_page_len, hq, hk, d, ps, data_type=dtype, sm_scale=0.05)
    _check(w.forward(q, ks, vs, batch.cache), None, q, list(range(5)), (k0, v0), batch, sm_scale=0.05)
    w.end_forward()
    with pytest.raises(ValueError, match="k"):  # (a shared prefix of the wrong head count)
        w.forward(q, ks[..., :32], vs[..., :32], batch.cache)


def test_shared_prefix_prefill():
    """Each request's queries over a shared prefix (no mask) and their own pages (causal, bottom-right aligned, when
    forward(causal=True)): the oracle over the concatenation with the same causal rule; forward() plans again when
    causal / sm_scale change; rope arguments and forward() before begin_forward() are ValueErrors."""
    hq, hk, d, ps, dtype = 8, 2, 64, 8, torch.bfloat16
    batch = PagedBatch([5, 1, 9], hk, d, ps, dtype)
    k0, v0, ks, vs = _shared(13, hk, d, dtype, "NHD")
    qo = [0, 3, 4, 8]
    qo_indptr = torch.tensor(qo, dtype=torch.int32)
    w = pagoda.BatchPrefillWithSharedPrefixPagedKVCacheWrapper(workspace(), "NHD", backend="triton")
    q = torch.randn(8, hq, d, dtype=dtype, device=DEVICE)
    with pytest.raises(NotPlannedError):
        w.forward(q, ks, vs, batch.cache)
    w.begin_forward(qo_indptr, batch.indptr, batch.indices, batch.last_page_len, hq, hk, d, ps)
    for causal, sm_scale in ((True, None), (False, None), (True, 0.07)):
        out, lse = w.forward(q, ks, vs, batch.cache, causal=causal, sm_scale=sm_scale, return_lse=True)
        _check(out, lse, q, qo, (k0, v0), batch, causal=causal, sm_scale=sm_scale)
    _check(w.forward(q, ks, vs, batch.tuple_cache(), causal=True), None, q, qo, (k0, v0), batch, causal=True)
    with pytest.raises(ValueError, match="rope"):
        w.forward(q, ks, vs, batch.cache, rope_theta=1e4)
    with pytest.raises(ValueError, match="causal"):
        w.forward(q, ks, vs, batch.cache, causal="yes")


def test_cuda_graph_decode_class_fast_plan_and_workspace_reset():
    """CUDAGraphBatchDecodeWithPagedKVCacheWrapper (FlashInfer's constructor: the caller's buffers) and
    fast_decode_plan bound to it as SGLang binds it (data_type, a host indptr override) decode as the oracle;
    fast_decode_plan's deterministic-split options are ValueErrors; reset_workspace_buffer needs a new plan, then
    decodes the same."""
    hq, hk, d, ps, dtype = 8, 2, 64, 4, torch.float16
    batch = PagedBatch([7, 12, 1], hk, d, ps, dtype)
    w = pagoda.CUDAGraphBatchDecodeWithPagedKVCacheWrapper(
        workspace(), torch.empty(4, dtype=torch.int32), torch.empty(64, dtype=torch.int32),
        torch.empty(3, dtype=torch.int32), backend="triton")
    assert w._use_cuda_graph
    w.plan(batch.indptr, batch.indices, batch.last_page_len, hq, hk, d, ps, q_data_type=dtype, kv_data_type=dtype)
    q = torch.randn(3, hq, d, dtype=dtype, device=DEVICE)
    plain = pagoda.BatchDecodeWithPagedKVCacheWrapper(workspace(), backend="triton")
    from functools import partial

    plain.begin_forward = partial(pagoda.fast_decode_plan, plain)
    plain.begin_forward(batch.indptr.to(DEVICE), batch.indices, batch.last_page_len, hq, hk, d, ps, data_type=dtype,
                        global_override_indptr_cpu=batch.indptr)
    for wrapper in (w, plain):
        out, lse = wrapper.run_return_lse(q, batch.cache)  # (FlashInfer's name for run(return_lse=True))
        for b in range(3):
            ro, rl = reference.attention(q[b:b + 1], batch.k[b], batch.v[b], compute_dtype=torch.float64,
                                         out_dtype=torch.float64)
            assert rel_err(out[b:b + 1], ro) < TOL[dtype]
            check_lse(lse[b:b + 1], rl)
    for kw in ({"disable_split_kv": True}, {"fixed_split_size": 64}):
        with pytest.raises(ValueError, match="split"):
            pagoda.fast_decode_plan(plain, batch.indptr, batch.indices, batch.last_page_len, hq, hk, d, ps, **kw)
    plain.reset_workspace_buffer(workspace(), torch.empty(8, dtype=torch.uint8))
    with pytest.raises(NotPlannedError):
        plain.run(q, batch.cache)
    plain.plan(batch.indptr, batch.indices, batch.last_page_len, hq, hk, d, ps, q_data_type=dtype)
    ro, _ = reference.attention(q[1:2], batch.k[1], batch.v[1], compute_dtype=torch.float64, out_dtype=torch.float64)
    assert rel_err(plain.run(q, batch.cache)[1:2], ro) < TOL[dtype]
    with pytest.raises(ValueError, match="float_workspace_buffer"):
        plain.reset_workspace_buffer("x")
    with pytest.raises(ValueError, match="CUDA-graph"):
        w.reset_workspace_buffer(workspace())
