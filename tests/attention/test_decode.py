import numpy as np
import pytest
import torch

import pagoda
from pagoda.attention import reference

from ..conftest import DEVICE
from .helpers import TOL, PagedBatch, check_lse, oracle, poisoned_like, rel_err, run_decode, workspace

BACKEND = "triton"  # on the CPU this is Triton's interpreter (conftest)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("page_size", [1, 5, 16])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (6, 2), (4, 1)])
def test_decode_matches_reference(dtype, layout, page_size, heads):
    kv_lens = [1, 17, 33, 70]
    batch = PagedBatch(kv_lens, heads[1], 64, page_size, dtype, layout)
    _, o, l2, ro, rl = run_decode(batch, heads[0], 64, dtype)
    assert rel_err(o, ro) < TOL[dtype]
    check_lse(l2, rl)


@pytest.mark.parametrize("head_dim", [128, 256])
def test_decode_head_dims(head_dim):
    batch = PagedBatch([9, 40], 2, head_dim, 16, torch.bfloat16, "NHD")
    _, o, l2, ro, rl = run_decode(batch, 8, head_dim, torch.bfloat16, cache_form="tuple")
    assert rel_err(o, ro) < TOL[torch.bfloat16]
    check_lse(l2, rl)


@pytest.mark.parametrize("plan_kw", [{"window_left": 10}, {"window_left": 0}, {"logits_soft_cap": 3.0},
                                     {"sm_scale": 0.3}, {"window_left": 25, "logits_soft_cap": 30.0}])
def test_decode_variants(plan_kw):
    batch = PagedBatch([1, 31, 64, 90], 2, 64, 8, torch.float16, "NHD")
    _, o, l2, ro, rl = run_decode(batch, 8, 64, torch.float16, **plan_kw)
    assert rel_err(o, ro) < TOL[torch.float16]
    check_lse(l2, rl)


def test_decode_split_kv_on_and_off():
    """One long request among short ones: with a workspace the planner splits its KV
    (and merges); with no room for partial rows it cannot. Both must match."""
    kv_lens = [700, 3, 20]
    batch = PagedBatch(kv_lens, 2, 64, 16, torch.bfloat16, "NHD")
    w, o, l2, ro, rl = run_decode(batch, 8, 64, torch.bfloat16)
    assert w._plan.work.chunk_len < 700 and len(w._plan.work.splits) > 0, "expected a split plan"
    assert rel_err(o, ro) < TOL[torch.bfloat16]
    check_lse(l2, rl)
    w, o, l2, ro, rl = run_decode(batch, 8, 64, torch.bfloat16, ws_mb=0)
    assert len(w._plan.work.splits) == 0, "no workspace: no split"
    assert rel_err(o, ro) < TOL[torch.bfloat16]
    check_lse(l2, rl)


@pytest.mark.parametrize("heads,head_dim", [((8, 2), 64), ((16, 2), 128), ((3, 3), 64)])
def test_decode_merges_many_chunks(monkeypatch, heads, head_dim):
    """A request split into many more chunks than one round of the merge loads (kernels/attention.py
    _merge_partials: 8 a round; here 90 and 12) next to one that is not split: the merge's rounds, its chunk
    mask and the heads of a program (group 4 and 8, MHA) against the reference."""
    from pagoda.attention import plan as plan_mod

    monkeypatch.setattr(plan_mod, "_choose_chunk_len_small", lambda *a: 16)
    monkeypatch.setattr(plan_mod, "_choose_chunk_len", lambda *a: 16)
    batch = PagedBatch([1440, 190, 5], heads[1], head_dim, 16, torch.bfloat16, "NHD")
    w, o, l2, ro, rl = run_decode(batch, heads[0], head_dim, torch.bfloat16)
    assert [int(c) for c in w._plan.work.splits[:, 1]] == [90, 12]
    assert rel_err(o, ro) < TOL[torch.bfloat16]
    check_lse(l2, rl)


def test_decode_empty_request_gives_zero_and_minus_inf():
    batch = PagedBatch([5, 0, 12], 2, 64, 4, torch.float16, "NHD")
    _, o, l2, ro, rl = run_decode(batch, 4, 64, torch.float16)
    assert torch.equal(o[1].cpu(), torch.zeros_like(o[1]).cpu())
    assert torch.isinf(l2[1]).all() and (l2[1] < 0).all()
    assert rel_err(o, ro) < TOL[torch.float16]
    check_lse(l2, rl)


def test_replan_with_other_lengths_reuses_wrapper():
    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(workspace(), "NHD", backend=BACKEND)
    for kv_lens in ([3, 50], [100, 1, 1, 7], [260]):
        batch = PagedBatch(kv_lens, 2, 64, 16, torch.float16)
        w.plan(batch.indptr, batch.indices, batch.last_page_len, 4, 2, 64, 16, q_data_type=torch.float16)
        q = torch.randn(len(kv_lens), 4, 64, dtype=torch.float16, device=DEVICE)
        o = w.run(q, batch.cache)
        ro, _ = oracle(q, list(range(len(kv_lens) + 1)), batch.k, batch.v)
        assert rel_err(o, ro) < TOL[torch.float16]


def test_replans_that_grow_the_plan_buffer():
    """An eager wrapper starts with room for 256 work items, 64 split tiles and 256 page ids in its plan
    buffer; plans past each grow it (page ids move behind a longer work list / split table) and later
    smaller plans reuse it. Every run must match the reference."""
    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(workspace(), "NHD", backend=BACKEND)
    rng = np.random.default_rng(3)
    for kv_lens, page_size in (([3, 50], 4),                                          # small
                               (rng.integers(1, 6, 300).tolist(), 1),                 # 300 items, ~900 pages
                               ([700, 650, 2] + [1] * 70, 1),                         # split tiles, 1.4k pages
                               ([9, 1, 33], 16)):                                     # small again
        batch = PagedBatch(kv_lens, 1, 64, page_size, torch.float16)
        w.plan(batch.indptr, batch.indices, batch.last_page_len, 2, 1, 64, page_size, q_data_type=torch.float16)
        q = torch.randn(len(kv_lens), 2, 64, dtype=torch.float16, device=DEVICE)
        out, lse = poisoned_like(q)
        w.run(q, batch.cache, out=out, lse=lse)
        ro, rl = oracle(q, list(range(len(kv_lens) + 1)), batch.k, batch.v)
        assert rel_err(out, ro) < TOL[torch.float16], kv_lens[:5]
        check_lse(lse, rl)
        if kv_lens[0] == 700:
            assert len(w._plan.work.splits) > 0, "expected split tiles"
    assert w._max_items >= 300 and w._max_pages >= 1400


def test_runs_without_replan_reset_the_counters():
    """A plan runs any number of times (a CUDA graph replays run() without a new plan): the kernel's last
    program puts the task counters back, so every run computes every task. Three programs (the interpreter's
    grid) over 24 tasks: most come from the counter, the first of each program does not."""
    batch = PagedBatch([700, 3, 20, 55, 1, 130], 2, 64, 16, torch.float16)
    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(workspace(), "NHD", backend=BACKEND)
    w.plan(batch.indptr, batch.indices, batch.last_page_len, 4, 2, 64, 16, q_data_type=torch.float16)
    q = torch.randn(6, 4, 64, dtype=torch.float16, device=DEVICE)
    ro, rl = oracle(q, list(range(7)), batch.k, batch.v)
    assert int(w._counters[2]) > w._plan.grid, "more tasks than programs expected"
    for _ in range(3):
        out, lse = poisoned_like(q)
        w.run(q, batch.cache, out=out, lse=lse)
        assert rel_err(out, ro) < TOL[torch.float16]
        check_lse(lse, rl)
        assert w._counters[:2].tolist() == [0, 0], "counters not reset for the next run"


def test_single_decode_layouts():
    for layout in ("NHD", "HND"):
        q = torch.randn(8, 64, dtype=torch.bfloat16, device=DEVICE)
        k = torch.randn(45, 2, 64, dtype=torch.bfloat16, device=DEVICE)
        v = torch.randn(45, 2, 64, dtype=torch.bfloat16, device=DEVICE)
        kk, vv = (k, v) if layout == "NHD" else (k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous())
        o, l2 = pagoda.single_decode_with_kv_cache(q, kk, vv, kv_layout=layout, return_lse=True,
                                                   backend=BACKEND)
        ro, rl = reference.attention(q[None], k, v, compute_dtype=torch.float64, out_dtype=torch.float64)
        assert o.shape == (8, 64) and l2.shape == (8,)
        assert rel_err(o, ro[0]) < TOL[torch.bfloat16]
        check_lse(l2, rl[0])


def test_torch_backend_matches_triton():
    batch = PagedBatch([4, 29, 50], 2, 64, 7, torch.float16, "HND")
    _, o_t, l_t, ro, rl = run_decode(batch, 8, 64, torch.float16, backend="torch")
    assert rel_err(o_t, ro) < TOL[torch.float16]
    check_lse(l_t, rl)


def test_replan_with_changed_scalars_and_bad_ones():
    """plan() reuses its checks of the scalar arguments while they repeat: a changed sm_scale / soft cap must
    still take effect, and a bad value after good plans must still be rejected."""
    batch = PagedBatch([9, 40, 3], 2, 64, 16, torch.bfloat16, "NHD")
    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(workspace(16), "NHD", backend=BACKEND)
    q = torch.randn(3, 4, 64, dtype=torch.bfloat16, device=DEVICE)
    for kw in ({"sm_scale": 0.05}, {"sm_scale": 0.05}, {"sm_scale": 0.4}, {"sm_scale": 0.4, "logits_soft_cap": 5.0}):
        w.plan(batch.indptr, batch.indices, batch.last_page_len, 4, 2, 64, 16, q_data_type=torch.bfloat16, **kw)
        out, _ = poisoned_like(q)
        w.run(q, batch.cache, out=out)
        ro, _ = oracle(q, list(range(4)), batch.k, batch.v, **kw)
        assert rel_err(out, ro) < TOL[torch.bfloat16], kw
    for bad, match in (({"sm_scale": -1.0}, "sm_scale"), ({"logits_soft_cap": float("nan")}, "logits_soft_cap"),
                       ({"window_left": -5}, "window_left")):
        with pytest.raises(ValueError, match=match):
            w.plan(batch.indptr, batch.indices, batch.last_page_len, 4, 2, 64, 16, q_data_type=torch.bfloat16, **bad)


@pytest.mark.parametrize("batch", [3, 12])
@pytest.mark.parametrize("form", ["int32", "int64", "list", "zero-page request"])
def test_decode_lens_fast_path_equals_checks(form, batch):
    """check_paged_lens (the decode plan's few-call path for host int tensors: Python lists up to
    formats.SMALL_INDPTR entries, NumPy past it) and the general checks it falls back to give the same lengths;
    bad input gets the general path's errors."""
    from pagoda.attention.formats import SMALL_INDPTR, check_indptr, check_paged_lens, paged_kv_lens, to_host_array

    indptr, last = [0, 3, 4, 9], [16, 1, 7]
    if form == "zero-page request":
        indptr, last = [0, 3, 3, 9], [16, 5, 7]
    if batch > 3:  # the same requests four times: past SMALL_INDPTR
        indptr = [0] + [indptr[-1] * k + p for k in range(4) for p in indptr[1:]]
        last = last * 4
        assert len(indptr) > SMALL_INDPTR
    args = {"int32": lambda x: torch.tensor(x, dtype=torch.int32), "int64": lambda x: torch.tensor(x),
            "list": list, "zero-page request": lambda x: torch.tensor(x, dtype=torch.int32)}[form]
    ip, lens = check_paged_lens(args(indptr), args(last), 16)
    ref_ip = check_indptr("indptr", indptr)
    np.testing.assert_array_equal(ip, ref_ip)
    np.testing.assert_array_equal(lens, paged_kv_lens(ref_ip, to_host_array("last", last), 16))
    assert ip.dtype == np.int64 and lens.dtype == np.int64
    with pytest.raises(ValueError, match="non-decreasing"):
        check_paged_lens(args(indptr[:2] + [2] + indptr[3:]), args(last), 16)
    with pytest.raises(ValueError, match="last_page_len"):
        check_paged_lens(args(indptr), args(last[:-1] + [17]), 16)
    with pytest.raises(ValueError, match="last_page_len"):
        check_paged_lens(args(indptr), args(last[:-1]), 16)
