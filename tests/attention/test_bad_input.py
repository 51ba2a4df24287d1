"""Bad input gets a clear exception naming the argument."""
import numpy as np
import pytest
import torch

import pagoda

from ..conftest import DEVICE
from .helpers import PagedBatch, workspace


def decode_wrapper():
    return pagoda.BatchDecodeWithPagedKVCacheWrapper(workspace(1), "NHD", backend="triton")


@pytest.fixture
def batch():
    return PagedBatch([10, 20], 2, 64, 4, torch.float16)


def plan(w, b, **kw):
    args = dict(indptr=b.indptr, indices=b.indices, last_page_len=b.last_page_len, num_qo_heads=4,
                num_kv_heads=2, head_dim=64, page_size=4, q_data_type=torch.float16)
    args.update(kw)
    w.plan(**args)


@pytest.mark.parametrize("catch", [ValueError, RuntimeError])
@pytest.mark.parametrize("make", ["decode", "prefill", "cascade", "block_sparse", "variable_block_sparse"])
def test_run_before_plan(make, catch):
    """run() before plan() raises an error naming the wrapper that is both a ValueError (as every misuse of the
    API) and a RuntimeError (as before, and as FlashInfer's wrappers fail)."""
    ws = torch.empty(1 << 20, dtype=torch.uint8, device=DEVICE)
    q = torch.randn(2, 4, 64, dtype=torch.float16, device=DEVICE)
    cache = torch.zeros(1, 2, 4, 2, 64, dtype=torch.float16, device=DEVICE)
    w, args = {
        "decode": (lambda: decode_wrapper(), (q, cache)),
        "prefill": (lambda: pagoda.BatchPrefillWithPagedKVCacheWrapper(ws), (q, cache)),
        "cascade": (lambda: pagoda.MultiLevelCascadeAttentionWrapper(2, ws), (q, cache)),
        "block_sparse": (lambda: pagoda.BlockSparseAttentionWrapper(ws), (q, q, q)),
        "variable_block_sparse": (lambda: pagoda.VariableBlockSparseAttentionWrapper(ws), (q, q, q)),
    }[make]
    w = w()
    with pytest.raises(catch, match=f"{type(w).__name__}.run\\(\\) called before plan"):
        w.run(*args)


@pytest.mark.parametrize("kw, match", [
    ({"num_qo_heads": 5}, "multiple of num_kv_heads"),
    ({"head_dim": 96}, "head_dim"),
    ({"indptr": torch.tensor([0, 5, 3], dtype=torch.int32)}, "indptr.*non-decreasing"),
    ({"last_page_len": torch.tensor([3], dtype=torch.int32)}, "last_page_len must have 2"),
    ({"last_page_len": torch.tensor([5, 4], dtype=torch.int32)}, r"last_page_len\[0\]"),
    ({"last_page_len": torch.tensor([2, 0], dtype=torch.int32)}, r"last_page_len\[1\]"),
    ({"indices": torch.tensor([0, 1], dtype=torch.int32)}, "paged_kv_indices has 2 entries"),
    ({"indices": torch.tensor([0, 1, 2, -1, 4, 5, 6, 7], dtype=torch.int32)}, "paged_kv_indices must be >= 0"),
    ({"page_size": 0}, "page_size"),
    ({"page_size": 129}, "page_size"),
    ({"q_data_type": torch.float32}, "q_data_type"),
    ({"kv_data_type": torch.bfloat16}, "kv_data_type"),
    ({"window_left": -3}, "window_left"),
    ({"logits_soft_cap": -1.0}, "logits_soft_cap"),
    ({"sm_scale": float("nan")}, "sm_scale"),
    ({"indptr": torch.tensor([0.0, 3.0, 8.0])}, "indptr must be an integer"),
    ({"num_qo_heads": 4.0}, "num_qo_heads must be an int"),
    ({"num_kv_heads": "2"}, "num_kv_heads must be an int"),
    ({"head_dim": None}, "head_dim must be an int"),
    ({"page_size": "4"}, "page_size must be an int"),
    ({"page_size": 4.0}, "page_size must be an int"),
])
def test_plan_rejects(batch, kw, match):
    with pytest.raises(ValueError, match=match):
        plan(decode_wrapper(), batch, **kw)


def test_plan_checks_scalars_again_when_only_their_type_changes(batch):
    """plan() checks its scalar parameters once while they repeat; 4.0 == 4, so the types count as a change."""
    w = decode_wrapper()
    plan(w, batch)
    with pytest.raises(ValueError, match="num_qo_heads must be an int"):
        plan(w, batch, num_qo_heads=4.0)
    plan(w, batch, num_qo_heads=np.int64(4))  # (NumPy ints are ints)


def test_run_rejects_mismatches(batch):
    w = decode_wrapper()
    plan(w, batch)
    q = torch.randn(2, 4, 64, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="q must have shape"):
        w.run(q[:1], batch.cache)
    with pytest.raises(ValueError, match="q dtype"):
        w.run(q.bfloat16(), batch.cache)
    with pytest.raises(ValueError, match="paged_kv_cache dtype"):
        w.run(q, batch.cache.bfloat16())
    with pytest.raises(ValueError, match="page_size"):
        w.run(q, batch.cache.reshape(batch.cache.shape[0], 2, 2, 2, 2, 64)[:, :, :, 0])
    with pytest.raises(ValueError, match="refers to page"):
        w.run(q, batch.cache[:3])
    with pytest.raises(ValueError, match="KV heads"):
        w.run(q, torch.zeros(8, 2, 4, 1, 64, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="out must be"):
        w.run(q, batch.cache, out=torch.empty(2, 4, 32, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="lse must be"):
        w.run(q, batch.cache, lse=torch.empty(2, 4, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="paged_kv_cache"):
        w.run(q, torch.zeros(3, 3, dtype=torch.float16, device=DEVICE))


def test_plan_after_capture_checks_page_ids_against_the_captured_cache(batch):
    """A CUDA-graph wrapper remembers the pages of the cache a run() was captured with (on a GPU: run() under
    torch.cuda.graph, tests/attention/test_gpu.py) and refuses a later plan() whose page ids pass it, since a replay
    skips run()'s check; the plan before stays. Here the capture is stood in for (no graphs on the CPU)."""
    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(workspace(1), "NHD", use_cuda_graph=True, backend="triton")
    plan(w, batch)
    kept = w._plan
    w._captured_pages = int(batch.indices.max())
    with pytest.raises(ValueError, match=f"refers to page {int(batch.indices.max())} but the paged cache captured"):
        plan(w, batch)
    assert w._plan is kept
    w._captured_pages += 1  # the largest page id inside the captured cache: planned
    plan(w, batch)
    assert w._plan is not kept
    w._note_capture(1)  # (not capturing: nothing changes)
    assert w._captured_pages == int(batch.indices.max()) + 1


def test_bad_layout_and_backend():
    with pytest.raises(ValueError, match="kv_layout"):
        pagoda.BatchDecodeWithPagedKVCacheWrapper(workspace(1), "NDH")
    with pytest.raises(ValueError, match="backend"):
        pagoda.BatchDecodeWithPagedKVCacheWrapper(workspace(1), backend="cuda")


def test_prefill_rejects(batch):
    w = pagoda.BatchPrefillWithPagedKVCacheWrapper(workspace(1), backend="triton")
    with pytest.raises(ValueError, match="qo_indptr"):
        w.plan(torch.tensor([0, 3, 1]), batch.indptr, batch.indices, batch.last_page_len, 4, 2, 64, 4)
    with pytest.raises(ValueError, match="paged_kv_indptr must have 3"):
        w.plan(torch.tensor([0, 3, 5]), batch.indptr[:2], batch.indices, batch.last_page_len, 4, 2, 64, 4)
    with pytest.raises(ValueError, match="custom_mask"):
        w.plan(torch.tensor([0, 3, 5]), batch.indptr, batch.indices, batch.last_page_len, 4, 2, 64, 4,
               custom_mask=torch.ones(10, dtype=torch.bool))
    r = pagoda.BatchPrefillWithRaggedKVCacheWrapper(workspace(1), backend="triton")
    r.plan([0, 3], [0, 10], 4, 2, 64, q_data_type=torch.float16)
    q = torch.randn(3, 4, 64, dtype=torch.float16, device=DEVICE)
    k = torch.randn(5, 2, 64, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="needs 10 KV tokens"):
        r.run(q, k, k)
    with pytest.raises(ValueError, match="k and v must have one shape"):
        r.run(q, torch.randn(10, 2, 64, dtype=torch.float16, device=DEVICE), k)


@pytest.mark.parametrize("var,kv_dtype", [("PAGODA_DECODE_KERNEL", torch.float16),
                                          ("PAGODA_FP8_DECODE_KERNEL", torch.float8_e4m3fn)])
def test_decode_kernel_choice_is_validated(batch, monkeypatch, var, kv_dtype):
    """The environment switch between the Gluon and the Triton decode kernels names itself when misspelt (on
    any machine: the choice is read before the device is looked at); "triton" and "auto" plan normally."""
    monkeypatch.setenv(var, "gluon-please")
    with pytest.raises(ValueError, match=var):
        plan(decode_wrapper(), batch, kv_data_type=kv_dtype)
    for ok in ("triton", "auto"):
        monkeypatch.setenv(var, ok)
        w = decode_wrapper()
        plan(w, batch, kv_data_type=kv_dtype)
        assert w._plan.decode_sm90_constexprs is None or DEVICE == "cuda"


def test_decode_early_pages_switch_is_validated(batch, monkeypatch):
    """PAGODA_DECODE_EARLY_PAGES (the Gluon decode kernel's first page ids before its PDL wait) is 0 or 1, read
    when the wrapper is made; anything else is a ValueError naming the variable. The plan is the same either way
    (the switch is a kernel constexpr only)."""
    env, constexpr = "PAGODA_DECODE_EARLY_PAGES", "EARLY_PAGES"
    monkeypatch.setenv(env, "yes")
    with pytest.raises(ValueError, match=env):
        decode_wrapper()
    plans = []
    for v in ("0", "1"):
        monkeypatch.setenv(env, v)
        w = decode_wrapper()
        plan(w, batch)
        plans.append(w._plan)
        if plans[-1].decode_sm90_constexprs is not None:
            assert plans[-1].decode_sm90_constexprs[constexpr] == (v == "1")
    np.testing.assert_array_equal(plans[0].work.work, plans[1].work.work)
    np.testing.assert_array_equal(plans[0].work.splits, plans[1].work.splits)


def test_graph_wrapper_on_the_gluon_decode_kernel_refuses_multi_query_plans(monkeypatch):
    """A CUDA-graph prefill wrapper whose first plan ran the one-query Gluon decode kernel (sm_90) replays it:
    a later plan with several queries in a request would need causal tiles that kernel does not have, so it is
    refused with a ValueError rather than computed wrong. (The kernel choice is forced here: this runs
    anywhere.)"""
    from pagoda.attention import runner

    monkeypatch.setattr(runner.BatchAttention, "_decode_gluon_eligible", lambda self, *a: True)
    b = PagedBatch([10, 20], 2, 64, 4, torch.float16)
    w = pagoda.BatchPrefillWithPagedKVCacheWrapper(workspace(1), "NHD", backend="triton", use_cuda_graph=True)
    args = (b.indptr, b.indices, b.last_page_len, 4, 2, 64, 4)
    w.plan(torch.tensor([0, 1, 2], dtype=torch.int32), *args, causal=True, q_data_type=torch.float16)
    assert w._plan.decode_sm90_constexprs is not None
    w.plan(torch.tensor([0, 1, 2], dtype=torch.int32), *args, causal=True, q_data_type=torch.float16)  # decode again
    with pytest.raises(ValueError, match="one-query decode kernel"):
        w.plan(torch.tensor([0, 1, 3], dtype=torch.int32), *args, causal=True, q_data_type=torch.float16)


def test_pdl_early_kv_argument(batch):
    """run()'s pdl_early_kv (the caller's promise that the kernel ahead writes only each request's last KV token;
    the Gluon decode kernel then copies its first blocks before the PDL wait) must be a bool, in the decode and
    the paged prefill wrapper; where no such kernel runs (here the Triton kernel in the interpreter) it changes
    nothing."""
    w = decode_wrapper()
    plan(w, batch)
    q = torch.randn(2, 4, 64, dtype=torch.float16, device=DEVICE)
    for bad in (1, "yes", None):
        with pytest.raises(ValueError, match="pdl_early_kv"):
            w.run(q, batch.cache, pdl_early_kv=bad)
    a = w.run(q, batch.cache)
    b = w.run(q, batch.cache, enable_pdl=True, pdl_early_kv=True)
    assert torch.equal(a, b)
    p = pagoda.BatchPrefillWithPagedKVCacheWrapper(workspace(1), "NHD", backend="triton")
    p.plan(torch.arange(3, dtype=torch.int32), batch.indptr, batch.indices, batch.last_page_len, 4, 2, 64, 4,
           causal=True, q_data_type=torch.float16)
    with pytest.raises(ValueError, match="pdl_early_kv"):
        p.run(q, batch.cache, pdl_early_kv=1)
    assert torch.equal(p.run(q, batch.cache, pdl_early_kv=True), a)
