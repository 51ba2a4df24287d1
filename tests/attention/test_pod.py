"""POD-Attention's wrappers (FlashInfer's PODWithPagedKVCacheWrapper / BatchPODWithPagedKVCacheWrapper: a step's
prefill and decode attention in one call) against the float64 oracle: the Triton kernels in the interpreter and the
PyTorch path on the CPU. The caches' unused pages and slots hold NaN (helpers.PagedBatch), and every row of both
outputs is checked."""
import pytest
import torch

import pagoda

from ..conftest import DEVICE
from .helpers import TOL, PagedBatch, check_lse, check_requests, oracle, rel_err, workspace

HQ, HK, D, PS = 8, 2, 64, 16
BF = torch.bfloat16


def _indptr(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


def _batch_pod(qo_p, kv_p, qo_d, kv_d, backend="triton"):
    """Two paged batches (separate caches), their queries and a planned BatchPOD wrapper."""
    bp, bd = PagedBatch(kv_p, HK, D, PS, BF), PagedBatch(kv_d, HK, D, PS, BF)
    qp = torch.randn(sum(qo_p), HQ, D, dtype=BF, device=DEVICE)
    qd = torch.randn(sum(qo_d), HQ, D, dtype=BF, device=DEVICE)
    w = pagoda.BatchPODWithPagedKVCacheWrapper(workspace(), "NHD", backend=backend)
    w.plan(_indptr(qo_p), bp.indptr, bp.indices, bp.last_page_len, _indptr(qo_d), bd.indptr, bd.indices,
           bd.last_page_len, HQ, HK, D, PS, q_data_type=BF, kv_data_type=BF)
    return bp, bd, qp, qd, w


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_batch_pod_prefill_and_decode(backend):
    """Prefill requests (a new prompt, chunked prefills over earlier KV) and one-query decode requests over another
    cache, causal and not: both parts' out and lse against the oracle; a run() with the other mask plans the prefill
    part again, and the first mask's results come back after it."""
    qo_p, kv_p, qo_d, kv_d = [20, 7, 3], [20, 30, 50], [1, 1, 1, 1], [33, 1, 70, 16]
    bp, bd, qp, qd, w = _batch_pod(qo_p, kv_p, qo_d, kv_d, backend)
    assert w._decode.active is w._decode.decode  # (one query a request: the decode wrapper)
    rd, rld = oracle(qd, _indptr(qo_d).tolist(), bd.k, bd.v)
    results = {}
    for causal in (True, False, True):
        (op, od), (lp, ld) = w.run(qp, bp.cache, qd, bd.cache, causal_p=causal, return_lse=True)
        ro, rl = oracle(qp, _indptr(qo_p).tolist(), bp.k, bp.v, causal=causal)
        check_requests(op, lp, ro, rl, _indptr(qo_p).tolist(), TOL[BF])
        check_requests(od, ld, rd, rld, _indptr(qo_d).tolist(), TOL[BF])
        if causal in results:
            assert torch.equal(results[causal], op)
        results[causal] = op
    assert rel_err(results[True], results[False].double()) > 0.05  # (the mask matters in this batch)
    op, od = w.forward(qp, bp.cache, qd, bd.cache)  # FlashInfer's defaults: causal_p False, outputs only
    assert torch.equal(op, results[False])


def test_batch_pod_decode_part_with_several_queries():
    """FlashInfer plans the decode part by its qo_indptr_d and runs it without a mask: requests of several queries
    there run in the prefill kernel, non-causal."""
    qo_p, kv_p, qo_d, kv_d = [5], [40], [2, 1, 3], [17, 40, 9]
    bp, bd, qp, qd, w = _batch_pod(qo_p, kv_p, qo_d, kv_d)
    assert w._decode.active is w._decode.multi
    op, od = w.run(qp, bp.cache, qd, bd.cache, causal_p=True)
    ro, _ = oracle(qp, _indptr(qo_p).tolist(), bp.k, bp.v, causal=True)
    rd, _ = oracle(qd, _indptr(qo_d).tolist(), bd.k, bd.v, causal=False)
    check_requests(op, None, ro, None, _indptr(qo_p).tolist(), TOL[BF])
    check_requests(od, None, rd, None, _indptr(qo_d).tolist(), TOL[BF])


def test_batch_pod_custom_mask_and_scales():
    """custom_mask_p (bool, request by request) and the same bits packed (pagoda.segment_packbits) give the masked
    oracle's prefill; q_scale and k_scale scale the scores, v_scale the outputs, in both parts (one 16-bit cache
    here, as a serving step passes it)."""
    qo_p, kv_p, qo_d, kv_d = [6, 4], [12, 30], [1, 1], [25, 8]
    b = PagedBatch(kv_p + kv_d, HK, D, PS, BF)
    n = len(kv_p)
    ip = b.indptr
    w = pagoda.BatchPODWithPagedKVCacheWrapper(workspace(), "NHD")
    w.plan(_indptr(qo_p), ip[:n + 1], b.indices[:int(ip[n])], b.last_page_len[:n], _indptr(qo_d), ip[n:] - ip[n],
           b.indices[int(ip[n]):], b.last_page_len[n:], HQ, HK, D, PS, q_data_type=BF)
    qp = torch.randn(sum(qo_p), HQ, D, dtype=BF, device=DEVICE)
    qd = torch.randn(sum(qo_d), HQ, D, dtype=BF, device=DEVICE)
    masks = [torch.rand(q, k) < 0.6 for q, k in zip(qo_p, kv_p)]
    for m in masks:
        m[:, 0] = True  # (every row keeps a key)
    flat = torch.cat([m.reshape(-1) for m in masks]).to(DEVICE)
    packed, _ = pagoda.segment_packbits(flat, torch.tensor([0] + [m.numel() for m in masks]).cumsum(0).to(DEVICE),
                                        bitorder="little")
    sm = D ** -0.5
    ro = torch.cat([pagoda.attention.reference.attention(qp[s:e], b.k[i], b.v[i], mask=masks[i].to(DEVICE),
                                                         sm_scale=sm * 0.5 * 0.8, compute_dtype=torch.float64,
                                                         out_dtype=torch.float64)[0]
                    for i, (s, e) in enumerate(zip(_indptr(qo_p)[:-1].tolist(), _indptr(qo_p)[1:].tolist()))])
    rd, _ = oracle(qd, _indptr(qo_d).tolist(), b.k[n:], b.v[n:], sm_scale=sm * 0.5 * 0.8)
    outs = []
    for kw in (dict(custom_mask_p=flat), dict(packed_custom_mask_p=packed)):
        op, od = w.run(qp, b.cache, qd, b.cache, q_scale=0.5, k_scale=0.8, v_scale=1.5, **kw)
        assert rel_err(op, ro * 1.5) < TOL[BF] and rel_err(od, rd * 1.5) < TOL[BF]
        outs.append(op)
    assert torch.equal(outs[0], outs[1])
    op, _ = w.run(qp, b.cache, qd, b.cache, causal_p=True)  # (the mask's plan replaced: a causal one)
    rc, _ = oracle(qp, _indptr(qo_p).tolist(), b.k[:n], b.v[:n], causal=True)
    check_requests(op, None, rc, None, _indptr(qo_p).tolist(), TOL[BF])


def test_batch_pod_with_an_empty_part():
    """A step of prefills only or decodes only: the empty part's output is [0, heads, head_dim], the other part's the
    oracle's."""
    b = PagedBatch([20, 5], HK, D, PS, BF)
    z, none = torch.tensor([0], dtype=torch.int32), torch.zeros(0, dtype=torch.int32)
    w = pagoda.BatchPODWithPagedKVCacheWrapper(workspace())
    q4, q0, q2 = (torch.randn(n, HQ, D, dtype=BF, device=DEVICE) for n in (4, 0, 2))
    w.plan(_indptr([3, 1]), b.indptr, b.indices, b.last_page_len, z, z, none, none, HQ, HK, D, PS, q_data_type=BF)
    op, od = w.run(q4, b.cache, q0, b.cache, causal_p=True)
    ro, _ = oracle(q4, [0, 3, 4], b.k, b.v, causal=True)
    assert od.shape == (0, HQ, D)
    check_requests(op, None, ro, None, [0, 3, 4], TOL[BF])
    w.plan(z, z, none, none, _indptr([1, 1]), b.indptr, b.indices, b.last_page_len, HQ, HK, D, PS, q_data_type=BF)
    op, od = w.run(q0, b.cache, q2, b.cache, causal_p=True)
    rd, _ = oracle(q2, [0, 1, 2], b.k, b.v)
    assert op.shape == (0, HQ, D)
    check_requests(od, None, rd, None, [0, 1, 2], TOL[BF])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_pod_single_prefill_beside_a_decode_batch(backend):
    """PODWithPagedKVCacheWrapper: one prompt over its contiguous K / V (single_prefill_with_kv_cache's arguments by
    the *_p names, HND included) beside a planned decode batch; return_lse_p / return_lse_d give that part's
    (out, lse)."""
    bd = PagedBatch([40, 3, 66], HK, D, PS, BF)
    w = pagoda.PODWithPagedKVCacheWrapper(workspace(), "NHD", backend=backend)
    assert not w.is_cuda_graph_enabled()
    with pytest.raises(ValueError, match="plan"):
        w.run(*[torch.zeros(1)] * 5)
    w.plan(bd.indptr, bd.indices, bd.last_page_len, HQ, HK, D, PS, q_data_type=BF)
    qp = torch.randn(12, HQ, D, dtype=BF, device=DEVICE)
    kp = torch.randn(30, HK, D, dtype=BF, device=DEVICE)
    vp = torch.randn(30, HK, D, dtype=BF, device=DEVICE)
    qd = torch.randn(3, HQ, D, dtype=BF, device=DEVICE)
    ro, rl = oracle(qp, [0, 12], [kp], [vp], causal=True)
    rd, rld = oracle(qd, [0, 1, 2, 3], bd.k, bd.v)
    (op, lp), (od, ld) = w.run(qp, kp, vp, qd, bd.cache, causal_p=True, return_lse_p=True, return_lse_d=True)
    assert rel_err(op, ro) < TOL[BF] and rel_err(od, rd) < TOL[BF]
    check_lse(lp, rl)
    check_lse(ld, rld)
    op2, od2 = w.run(qp, kp.transpose(0, 1).contiguous(), vp.transpose(0, 1).contiguous(), qd, bd.cache,
                     causal_p=True, kv_layout_p="HND")
    assert rel_err(op2, ro) < TOL[BF] and torch.equal(od2, od)


def test_pod_bad_input_names_the_argument():
    bd = PagedBatch([20, 5], HK, D, PS, BF)
    with pytest.raises(ValueError, match="jit_args"):
        pagoda.PODWithPagedKVCacheWrapper(workspace(), jit_args=["x"])
    w = pagoda.PODWithPagedKVCacheWrapper(workspace())
    with pytest.raises(ValueError, match="pos_encoding_mode"):
        w.plan(bd.indptr, bd.indices, bd.last_page_len, HQ, HK, D, PS, pos_encoding_mode="ROPE_LLAMA")
    w.plan(bd.indptr, bd.indices, bd.last_page_len, HQ, HK, D, PS, q_data_type=BF)
    qp, kp = torch.randn(4, HQ, D, dtype=BF), torch.randn(9, HK, D, dtype=BF)
    qd = torch.randn(2, HQ, D, dtype=BF)
    args = (qp.to(DEVICE), kp.to(DEVICE), kp.to(DEVICE), qd.to(DEVICE), bd.cache)
    for kw, msg in [(dict(causal_d=True), "causal_d"), (dict(window_left_d=8), "window_left_d"),
                    (dict(sm_scale_d=0.1), "sm_scale_d"), (dict(q_scale=-1.0), "q_scale"),
                    (dict(return_lse_p=1), "return_lse_p"), (dict(k_scale="x", q_scale=2.0), "k_scale")]:
        with pytest.raises(ValueError, match=msg):
            w.run(*args, **kw)
    bw = pagoda.BatchPODWithPagedKVCacheWrapper(workspace())
    with pytest.raises(ValueError, match="plan"):
        bw.run(qp, bd.cache, qd, bd.cache)
    ip = torch.tensor([0, 4], dtype=torch.int32)
    plan = (ip, bd.indptr[:2], bd.indices[:int(bd.indptr[1])], bd.last_page_len[:1], torch.tensor([0, 1, 2]),
            bd.indptr, bd.indices, bd.last_page_len, HQ, HK, D, PS)
    for qo_d in (torch.tensor([0, 2, 1]), torch.tensor([0, 1])):  # (not monotonic; one request for kv's two)
        with pytest.raises(ValueError, match="qo_indptr_d"):
            bw.plan(*plan[:4], qo_d, *plan[5:])
    with pytest.raises(ValueError, match="pos_encoding_mode"):
        bw.plan(*plan, pos_encoding_mode="ROPE_LLAMA")
    bw.plan(*plan, q_data_type=BF)
    for kw, msg in [(dict(causal_p="yes"), "causal_p"), (dict(return_lse=None), "return_lse"),
                    (dict(q_scale=float("inf")), "q_scale")]:
        with pytest.raises(ValueError, match=msg):
            bw.run(qp.to(DEVICE), bd.cache, qd.to(DEVICE), bd.cache, **kw)
    with pytest.raises(ValueError, match="q"):  # (the prefill part's q must be as planned)
        bw.run(torch.randn(5, HQ, D, dtype=BF, device=DEVICE), bd.cache, qd.to(DEVICE), bd.cache)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_batch_pod_real_size(kv_dtype):
    """A serving step's shape (Llama-3-8B's 32 / 8 heads of 128, page 16): two 1024-token prompt chunks over 2k of
    earlier KV beside 64 decodes of 2048, one cache (fp8 with scales 1): both parts against the float64 oracle."""
    hq, hk, d, ps = 32, 8, 128, 16
    qo_p, kv_p, kv_d = [1024, 1024], [3072, 3072], [2048] * 64
    b = PagedBatch(kv_p + kv_d, hk, d, ps, BF, device="cuda")
    cache = b.cache if kv_dtype == BF else b.cache.to(kv_dtype)
    ks = [k.to(kv_dtype).to(BF) for k in b.k]  # (what an fp8 cache holds)
    vs = [v.to(kv_dtype).to(BF) for v in b.v]
    n, ip = len(kv_p), b.indptr
    w = pagoda.BatchPODWithPagedKVCacheWrapper(workspace(256, "cuda"), "NHD")
    w.plan(_indptr(qo_p), ip[:n + 1], b.indices[:int(ip[n])], b.last_page_len[:n], _indptr([1] * 64),
           ip[n:] - ip[n], b.indices[int(ip[n]):], b.last_page_len[n:], hq, hk, d, ps, q_data_type=BF,
           kv_data_type=kv_dtype)
    qp = torch.randn(sum(qo_p), hq, d, dtype=BF, device="cuda")
    qd = torch.randn(64, hq, d, dtype=BF, device="cuda")
    scales = {} if kv_dtype == BF else dict(k_scale=1.0, v_scale=1.0)
    op, od = w.run(qp, cache, qd, cache, causal_p=True, **scales)
    ro, _ = oracle(qp, _indptr(qo_p).tolist(), ks[:n], vs[:n], causal=True)
    rd, _ = oracle(qd, list(range(65)), ks[n:], vs[n:])
    check_requests(op, None, ro, None, _indptr(qo_p).tolist(), TOL[BF])
    check_requests(od, None, rd, None, list(range(65)), TOL[BF])
