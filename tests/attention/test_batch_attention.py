"""pagoda.BatchAttention, FlashInfer's mixed prefill / decode API (plan with kv_len_arr, run -> (out, lse)), against
the float64 oracle: the Triton kernel in the interpreter and the PyTorch path on the CPU; the sm_90 kernels on the
GPU (gpu marker)."""
import numpy as np
import pytest
import torch

import pagoda
from pagoda.attention import prefill

from ..conftest import DEVICE
from .helpers import TOL, PagedBatch, check_requests, oracle, poisoned_like


def mixed(qo_lens, kv_lens, hq, hk, d, ps, dtype, device=DEVICE):
    batch = PagedBatch(kv_lens, hk, d, ps, dtype, device=device)
    qo_indptr = torch.tensor([0] + torch.tensor(qo_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(int(qo_indptr[-1]), hq, d, dtype=dtype, device=device)
    return batch, qo_indptr, q


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend", ["triton", "triton one launch", "torch"])
def test_mixed_prefill_and_decode(causal, backend, monkeypatch):
    """Prefill, chunked prefill (qo < kv), decode and an empty request in one plan, kv_len_arr instead of
    last_page_len; out and lse poisoned first, each request checked on its own. On the Triton kernel this batch
    splits (its decodes' KV outweighs its prefills' MMAs); "one launch" turns the split off."""
    qo_lens, kv_lens = [37, 1, 5, 1, 0, 20], [37, 70, 21, 1, 0, 20]
    hq, hk, d, ps = 8, 2, 64, 16
    batch, qo_indptr, q = mixed(qo_lens, kv_lens, hq, hk, d, ps, torch.bfloat16)
    if backend == "triton one launch":
        monkeypatch.setattr(prefill, "split_mixed", lambda *a: None)
    w = pagoda.BatchAttention("NHD", device=DEVICE, backend=backend.split()[0])
    w.plan(qo_indptr, batch.indptr, batch.indices, torch.tensor(kv_lens, dtype=torch.int32), hq, hk, d, d, ps,
           causal=causal, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
    assert (w._split is not None) == (backend == "triton")
    out, lse = poisoned_like(q)
    o, l2 = w.run(q, batch.cache, out=out, lse=lse)
    assert o is out and l2 is lse
    ro, rl = oracle(q, qo_indptr.tolist(), batch.k, batch.v, causal=causal)
    check_requests(out, lse, ro, rl, qo_indptr.tolist(), TOL[torch.bfloat16])
    o2, l3 = w.forward(q, batch.tuple_cache())  # (new outputs, the (k, v) form of the cache)
    assert torch.equal(o2, out) and torch.equal(l3, lse)


def test_soft_cap_and_scale_as_planned():
    qo_lens, kv_lens = [9, 1], [40, 33]
    batch, qo_indptr, q = mixed(qo_lens, kv_lens, 4, 4, 64, 8, torch.float16)
    w = pagoda.BatchAttention(device=DEVICE)
    w.plan(qo_indptr, batch.indptr, batch.indices, torch.tensor(kv_lens), 4, 4, 64, 64, 8, causal=True,
           sm_scale=0.2, logits_soft_cap=5.0, q_data_type=torch.float16, kv_data_type=torch.float16)
    out, lse = w.run(q, batch.cache, logits_soft_cap=5.0)
    ro, rl = oracle(q, qo_indptr.tolist(), batch.k, batch.v, causal=True, sm_scale=0.2, logits_soft_cap=5.0)
    check_requests(out, lse, ro, rl, qo_indptr.tolist(), TOL[torch.float16])
    assert torch.equal(w.run(q, batch.cache)[0], out)  # (0.0, FlashInfer's default: plan()'s cap)


def test_bad_input_names_the_argument():
    qo_lens, kv_lens = [3, 1], [20, 16]
    batch, qo_indptr, q = mixed(qo_lens, kv_lens, 4, 2, 64, 16, torch.bfloat16)
    w = pagoda.BatchAttention(device=DEVICE)
    with pytest.raises(ValueError, match="plan"):
        w.run(q, batch.cache)

    def plan(**kw):
        args = dict(qo_indptr=qo_indptr, kv_indptr=batch.indptr, kv_indices=batch.indices,
                    kv_len_arr=torch.tensor(kv_lens), num_qo_heads=4, num_kv_heads=2, head_dim_qk=64,
                    head_dim_vo=64, page_size=16, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
        args.update(kw)
        w.plan(**args)
    for kw, msg in [(dict(kv_len_arr=torch.tensor([20, 17])), r"kv_len_arr\[1\]=17 does not fit its 1 pages"),
                    (dict(kv_len_arr=torch.tensor([16, 16])), r"kv_len_arr\[0\]=16 does not fit its 2 pages"),
                    (dict(kv_len_arr=torch.tensor([20])), "kv_len_arr"),
                    (dict(kv_indptr=torch.tensor([0, 2, 1])), "kv_indptr"),
                    (dict(head_dim_vo=32), "head_dim_vo"),
                    (dict(use_profiler=True), "use_profiler"),
                    (dict(page_size=0), "page_size")]:
        with pytest.raises(ValueError, match=msg):
            plan(**kw)
    plan(logits_soft_cap=3.0)
    with pytest.raises(ValueError, match="logits_soft_cap 4.0 differs"):
        w.run(q, batch.cache, logits_soft_cap=4.0)
    with pytest.raises(ValueError, match="profiler_buffer"):
        w.run(q, batch.cache, profiler_buffer=torch.empty(4))
    with pytest.raises(ValueError, match="q"):
        w.run(q[:2], batch.cache)


@pytest.mark.parametrize("order", ["ranges", "interleaved"])
def test_mixed_batch_split_into_two_launches(order):
    """A mixed batch whose decodes' KV outweighs its prefills' MMAs runs in two launches (decode kernels for the
    one-query requests, prefill kernel for the rest): rows in two ranges (views) or interleaved (index copies),
    with a one-query request of no KV and an empty request among them; out and lse poisoned first."""
    if order == "ranges":
        qo_lens, kv_lens = [3, 2, 0, 1, 1, 1, 1], [3, 2, 0, 0, 300, 500, 190]
    else:
        qo_lens, kv_lens = [1, 3, 1, 0, 1, 2, 1], [300, 3, 500, 0, 0, 2, 190]
    hq, hk, d, ps = 8, 2, 64, 16
    batch, qo_indptr, q = mixed(qo_lens, kv_lens, hq, hk, d, ps, torch.bfloat16)
    w = pagoda.BatchAttention(device=DEVICE, backend="triton")  # (the PyTorch path never splits)
    w.plan(qo_indptr, batch.indptr, batch.indices, torch.tensor(kv_lens), hq, hk, d, d, ps, causal=True)
    assert w._split is not None and w._plan is None
    spans = [span for span, _ in w._split[0]]
    assert (spans[0] is not None and spans[1] is not None) == (order == "ranges")
    out, lse = poisoned_like(q)
    w.run(q, batch.cache, out=out, lse=lse)
    ro, rl = oracle(q, qo_indptr.tolist(), batch.k, batch.v, causal=True)
    check_requests(out, lse, ro, rl, qo_indptr.tolist(), TOL[torch.bfloat16])
    o2, l2 = w.run(q, batch.cache)  # (outputs of its own)
    assert torch.equal(o2, out) and torch.equal(l2, lse)
    with pytest.raises(ValueError, match="q must be"):
        w.run(q[1:], batch.cache)
    # the next plan of the same wrapper is one launch again when the prefill dominates
    w.plan(qo_indptr, batch.indptr, batch.indices, torch.tensor(kv_lens), hq, hk, d, d, ps, causal=False)
    assert w._split is not None  # (non-causal: the same pairs here, still split)
    w.plan(torch.tensor([0, 3]), batch.indptr[:2] - batch.indptr[0], batch.indices, torch.tensor(kv_lens[:1]), hq,
           hk, d, d, ps, causal=True)
    assert w._split is None and w._plan is not None


def test_split_choice():
    """split_mixed: decodes whose KV read outweighs the prefills' MMAs split; a long prefill chunk, a batch of only
    decodes or only prefills does not."""
    f = prefill.split_mixed
    dec, pre = np.array([1] * 128), np.array([512] * 4)
    assert f(np.concatenate([pre, dec]), np.concatenate([pre, [1024] * 128]), 32, 8, 128, True) is not None
    assert f(np.array([2048] + [1] * 63), np.array([8192] + [4096] * 63), 32, 8, 128, True) is None
    assert f(dec, np.array([1024] * 128), 32, 8, 128, True) is None
    assert f(pre, pre, 32, 8, 128, True) is None


def test_last_page_lens():
    """kv_len_arr -> last_page_len for full, partial and empty requests."""
    ip = np.array([0, 2, 2, 3, 7])
    assert prefill.last_page_lens(ip, np.array([32, 0, 1, 50]), 16).tolist() == [16, 1, 1, 2]


@pytest.mark.gpu
def test_batch_attention_real_sizes():
    """A serving step's mixed batch at Llama-3.1-8B's heads (a 512-token prefill chunk over a 3.5k prefix, 63
    decode requests of 1..8k), on the sm_90 kernels, against the float64 oracle."""
    if not torch.cuda.is_available():
        pytest.fail("gpu tests need CUDA")
    g = torch.Generator().manual_seed(0)
    qo_lens = [512] + [1] * 63
    kv_lens = [4096] + torch.randint(1, 8192, (63,), generator=g).tolist()
    batch, qo_indptr, q = mixed(qo_lens, kv_lens, 32, 8, 128, 16, torch.bfloat16, "cuda")
    w = pagoda.BatchAttention(device="cuda")
    w.plan(qo_indptr.cuda(), batch.indptr.cuda(), batch.indices.cuda(), torch.tensor(kv_lens, device="cuda"), 32,
           8, 128, 128, 16, causal=True)
    out, lse = poisoned_like(q)
    w.run(q, batch.cache, out=out, lse=lse)
    ro, rl = oracle(q.cpu(), qo_indptr.tolist(), [k.cpu() for k in batch.k], [v.cpu() for v in batch.v],
                    causal=True)
    check_requests(out, lse, ro, rl, qo_indptr.tolist(), TOL[torch.bfloat16])
