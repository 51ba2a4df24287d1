"""GPU tests at real sizes (run on the device: scripts/gpu_check.sh)."""
import pytest
import torch

import pagoda

from .helpers import TOL, PagedBatch, check_lse, oracle, poisoned_like, rel_err, workspace

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _need_cuda():
    if not torch.cuda.is_available():
        pytest.fail("gpu tests need CUDA: deselect them with -m 'not gpu' on a CPU machine")


@pytest.mark.parametrize("page_size", [1, 16, 37, 128])
@pytest.mark.parametrize("heads", [(32, 8), (32, 32), (64, 8), (32, 1), (40, 8)])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_decode_real_sizes(page_size, heads, head_dim):
    decode_against_reference(page_size, heads, head_dim)


def decode_against_reference(page_size, heads, head_dim, kv_lens=(1, 4096, 333, 17, 2048, 8191), planned=None,
                             **kw):
    """A bf16 decode batch (by default 1 token .. 8k, ends mid-page) against the float64 oracle; returns the
    wrapper. planned(w): checks of the plan, before the run. kw: plan() arguments (window_left, logits_soft_cap)."""
    kv_lens = list(kv_lens)
    batch = PagedBatch(kv_lens, heads[1], head_dim, page_size, torch.bfloat16)
    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(workspace(256))
    w.plan(batch.indptr, batch.indices, batch.last_page_len, heads[0], heads[1], head_dim, page_size,
           q_data_type=torch.bfloat16, **kw)
    if planned is not None:
        planned(w)
    q = torch.randn(len(kv_lens), heads[0], head_dim, dtype=torch.bfloat16, device="cuda")
    out, lse = poisoned_like(q)
    w.run(q, batch.cache, out=out, lse=lse)
    ro, rl = oracle(q.cpu(), list(range(len(kv_lens) + 1)), [k.cpu() for k in batch.k], [v.cpu() for v in batch.v],
                    **kw)
    assert rel_err(out, ro) < TOL[torch.bfloat16]
    check_lse(lse, rl)
    return w


@pytest.mark.parametrize("kv_lens,page_size,head_dim", [
    ([1024], 16, 128), ([1025], 16, 128), ([65], 16, 128), ([32768], 16, 128), ([2048] * 64, 16, 128),
    ([700, 5, 3000, 64], 1, 64), ([1, 129, 4096], 16, 128), ([1, 129, 4096, 32768], 16, 256)])
def test_decode_early_kv(kv_lens, page_size, head_dim):
    """run(enable_pdl=True, pdl_early_kv=True) (decode_sm90's EARLY_KV: round 0's KV blocks before the one that
    holds the request's last token copied before the PDL wait) right behind a kernel that writes each request's
    last K / V token, as the engine's RoPE + append does: that slot holds NaN until the write, so a block read
    ahead of the wait that held it would show. The same bits as pdl_early_kv=False; in CUDA graphs too; both
    wrappers take the argument (the engine runs decode steps through the prefill wrapper)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon decode kernel is for sm_90")
    hq, hk = 32, 8
    batch = PagedBatch(kv_lens, hk, head_dim, page_size, torch.bfloat16)
    last = [(int(batch.indices[int(batch.indptr[b]) + (n - 1) // page_size]), (n - 1) % page_size)
            for b, n in enumerate(kv_lens)]
    pages = torch.tensor([p for p, _ in last], device="cuda")
    slots = torch.tensor([s for _, s in last], device="cuda")
    new_kv = torch.stack([torch.stack([batch.k[b][-1], batch.v[b][-1]]) for b in range(len(kv_lens))])

    def write_last():  # one kernel: the last tokens' K and V into their slots
        batch.cache[pages, :, slots] = new_kv

    def stale():
        batch.cache[pages, :, slots] = float("nan")

    q0 = torch.randn(len(kv_lens), hq, head_dim, dtype=torch.bfloat16, device="cuda")
    res = {}
    for early in (False, True):
        for cls in (pagoda.BatchDecodeWithPagedKVCacheWrapper, pagoda.BatchPrefillWithPagedKVCacheWrapper):
            w = cls(workspace(256))
            if cls is pagoda.BatchDecodeWithPagedKVCacheWrapper:
                w.plan(batch.indptr, batch.indices, batch.last_page_len, hq, hk, head_dim, page_size,
                       q_data_type=torch.bfloat16)
            else:
                w.plan(torch.arange(len(kv_lens) + 1, dtype=torch.int32), batch.indptr, batch.indices,
                       batch.last_page_len, hq, hk, head_dim, page_size, causal=True, q_data_type=torch.bfloat16)
            out, lse = poisoned_like(q0)
            for _ in range(3):
                stale()
                q = q0 * 1.0
                write_last()  # (the kernel right before the PDL launch)
                w.run(q, batch.cache, out=out, lse=lse, enable_pdl=True, pdl_early_kv=early)
                torch.cuda.synchronize()
                assert torch.isfinite(out).all()
                if (early, cls) in res:
                    assert torch.equal(out, res[early, cls][0])
                res[early, cls] = (out.clone(), lse.clone())
            og = torch.empty_like(q0)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                qg = q0 * 1.0
                write_last()
                w.run(qg, batch.cache, out=og, enable_pdl=True, pdl_early_kv=early)
            for _ in range(2):
                stale()
                og.fill_(float("nan"))
                g.replay()
                torch.cuda.synchronize()
                assert torch.equal(og, res[early, cls][0])
    for cls in (pagoda.BatchDecodeWithPagedKVCacheWrapper, pagoda.BatchPrefillWithPagedKVCacheWrapper):
        assert torch.equal(res[False, cls][0], res[True, cls][0]) and torch.equal(res[False, cls][1],
                                                                                   res[True, cls][1])
    ro, rl = oracle(q0.cpu(), list(range(len(kv_lens) + 1)), [k.cpu() for k in batch.k], [v.cpu() for v in batch.v])
    assert rel_err(res[True, pagoda.BatchDecodeWithPagedKVCacheWrapper][0], ro) < TOL[torch.bfloat16]
    check_lse(res[True, pagoda.BatchDecodeWithPagedKVCacheWrapper][1], rl)


@pytest.mark.parametrize("kv_lens,page_size,head_dim,kv_dtype", [
    ([1024], 16, 128, torch.bfloat16), ([32768], 16, 128, torch.bfloat16), ([2048] * 64, 16, 128, torch.bfloat16),
    ([700, 5, 3000], 1, 64, torch.bfloat16), ([4096] * 4, 16, 128, torch.float8_e4m3fn)])
def test_decode_early_pages(kv_lens, page_size, head_dim, kv_dtype, monkeypatch):
    """PAGODA_DECODE_EARLY_PAGES=1 (decode_sm90's EARLY_PAGES: round 0's first page ids loaded before the PDL
    wait): as a PDL launch right behind the kernel that writes q, the same bits as the default kernel, for one
    round (1 x 1024, 1 x 32768) and several (64 x 2048: rounds past 0 load their page ids as before), page size 1,
    fp8; again in CUDA-graph replays after new plans."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon decode kernel is for sm_90")
    from .test_fp8 import quantized_batch

    hq, hk = 32, 8
    if kv_dtype == torch.bfloat16:
        batch = PagedBatch(kv_lens, hk, head_dim, page_size, torch.bfloat16)
        cache, scales = batch.cache, {}
    else:
        batch, cache, ks, vs, _, _ = quantized_batch(kv_lens, hk, head_dim, page_size, kv_dtype, per_head=False,
                                                     dtype=torch.bfloat16)
        scales = dict(k_scale=ks, v_scale=vs)
    q0 = torch.randn(len(kv_lens), hq, head_dim, dtype=torch.bfloat16, device="cuda")
    res = {}
    for early in ("0", "1"):
        monkeypatch.setenv("PAGODA_DECODE_EARLY_PAGES", early)
        w = pagoda.BatchDecodeWithPagedKVCacheWrapper(workspace(256))
        w.plan(batch.indptr, batch.indices, batch.last_page_len, hq, hk, head_dim, page_size,
               q_data_type=torch.bfloat16, kv_data_type=kv_dtype)
        assert w._plan.decode_sm90_constexprs["EARLY_PAGES"] == (early == "1")
        out, lse = poisoned_like(q0)
        for _ in range(3):
            q = q0 * 1.0  # (the kernel right before the PDL launch writes its q)
            w.run(q, cache, out=out, lse=lse, enable_pdl=True, **scales)
        res[early] = (out.clone(), lse.clone())
        wg = pagoda.BatchDecodeWithPagedKVCacheWrapper(workspace(256), use_cuda_graph=True)
        wg.plan(batch.indptr, batch.indices, batch.last_page_len, hq, hk, head_dim, page_size,
                q_data_type=torch.bfloat16, kv_data_type=kv_dtype)
        qg, og = torch.empty_like(q0), torch.empty_like(q0)
        qg.copy_(q0)
        wg.run(qg, cache, out=og, enable_pdl=True, **scales)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            qg.copy_(q0)
            wg.run(qg, cache, out=og, enable_pdl=True, **scales)
        for _ in range(2):
            wg.plan(batch.indptr, batch.indices, batch.last_page_len, hq, hk, head_dim, page_size,
                    q_data_type=torch.bfloat16, kv_data_type=kv_dtype)
            og.fill_(float("nan"))
            g.replay()
            torch.cuda.synchronize()
            assert torch.equal(og, res[early][0])
    assert torch.equal(res["0"][0], res["1"][0]) and torch.equal(res["0"][1], res["1"][1])
    if kv_dtype == torch.bfloat16:
        ro, rl = oracle(q0.cpu(), list(range(len(kv_lens) + 1)), [k.cpu() for k in batch.k],
                        [v.cpu() for v in batch.v])
        assert rel_err(res["1"][0], ro) < TOL[torch.bfloat16]
        check_lse(res["1"][1], rl)


@pytest.mark.parametrize("heads,head_dim", [((32, 8), 128), ((32, 32), 128), ((64, 8), 128), ((40, 8), 64),
                                            ((128, 8), 128), ((32, 8), 256), ((16, 8), 256), ((64, 8), 256)])
@pytest.mark.parametrize("kv_lens", [[32768], [32768, 5, 3000], [65536]])
def test_decode_many_chunks(heads, head_dim, kv_lens):
    """Split tiles of many chunks (a lone 32k request is ~32 per KV head at head_dim 128, ~16 at 256): the Gluon
    decode kernel's one-query merge (prefill_sm90._merge_one_query) takes several rounds of chunks there, with
    groups 1, 2, 4, 5, 8 and 16 (merge rows 1, 2, 4, 8, 8, 16; head_dim 256: 8 fp32 a lane), against the float64
    oracle; output and LSE poisoned first."""
    def many_chunks(w):  # more chunks than one round of the merge's loads (4 to 16 chunks)
        assert int(w._plan.work.splits[:, 1].max()) > 8
        if torch.cuda.get_device_capability() == (9, 0):
            assert w._plan.decode_sm90_constexprs is not None, "expected the Gluon decode kernel"

    decode_against_reference(16, heads, head_dim, kv_lens, many_chunks)


@pytest.mark.parametrize("page_size,heads,head_dim", [(16, (32, 8), 128), (1, (64, 8), 64), (37, (40, 8), 128),
                                                      (16, (32, 32), 64), (16, (16, 8), 256)])
@pytest.mark.parametrize("kw", [{"window_left": 0}, {"window_left": 100}, {"window_left": 5000},
                                {"logits_soft_cap": 30.0}, {"logits_soft_cap": 5.0, "window_left": 777}])
def test_decode_gluon_window_soft_cap(page_size, heads, head_dim, kw):
    """Sliding windows (the plan's KV range, which starts mid-page and mid-block; 0: the last token only; 5000:
    the split 32k request's window still splits) and logits soft caps (decode_sm90's SOFTCAP; a cap of 5 bends
    most logits) on the Gluon decode kernel, against the float64 oracle with output and LSE poisoned."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon decode kernel is for sm_90")

    def gluon(w):
        assert w._plan.decode_sm90_constexprs is not None, "expected the Gluon decode kernel"
        assert w._plan.decode_sm90_constexprs["SOFTCAP"] == ("logits_soft_cap" in kw)
        if kw.get("window_left", -1) >= 5000:
            assert w._plan.work.partial_rows > 0, "the windowed 32k request did not split"

    decode_against_reference(page_size, heads, head_dim, (1, 4096, 333, 17, 32768, 8191), gluon, **kw)


@pytest.mark.parametrize("page_size,heads,head_dim", [(16, (32, 8), 128), (1, (64, 8), 64), (37, (40, 8), 128),
                                                      (16, (16, 8), 256)])
def test_decode_triton_kernel_where_gluon_is_default(page_size, heads, head_dim, monkeypatch):
    """PAGODA_DECODE_KERNEL=triton: the Triton decode kernel (what GPUs other than sm_90 run) on plans the Gluon
    kernel serves by default on sm_90, against the same reference as test_decode_real_sizes."""
    monkeypatch.setenv("PAGODA_DECODE_KERNEL", "triton")
    assert decode_against_reference(page_size, heads, head_dim)._plan.decode_sm90_constexprs is None


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("heads", [(32, 8), (16, 16)])
@pytest.mark.parametrize("kw", [{"causal": True}, {"causal": False}, {"causal": True, "window_left": 300},
                                {"causal": True, "logits_soft_cap": 30.0}])
def test_prefill_real_sizes(head_dim, heads, kw):
    qo_lens, kv_lens = [1000, 129, 1, 512], [1000, 700, 64, 4608]
    batch = PagedBatch(kv_lens, heads[1], head_dim, 16, torch.float16, "HND")
    qo_indptr = [0] + torch.tensor(qo_lens).cumsum(0).tolist()
    w = pagoda.BatchPrefillWithPagedKVCacheWrapper(workspace(128), "HND")
    w.plan(torch.tensor(qo_indptr, dtype=torch.int32), batch.indptr, batch.indices, batch.last_page_len,
           heads[0], heads[1], head_dim, 16, q_data_type=torch.float16, **kw)
    q = torch.randn(qo_indptr[-1], heads[0], head_dim, dtype=torch.float16, device="cuda")
    out, lse = poisoned_like(q)
    w.run(q, batch.cache, out=out, lse=lse)
    ro, rl = oracle(q.cpu(), qo_indptr, [k.cpu() for k in batch.k], [v.cpu() for v in batch.v], **kw)
    assert rel_err(out, ro) < TOL[torch.float16]
    check_lse(lse, rl)


@pytest.mark.parametrize("kv_lens", [[32768], [1024] * 4, [1, 129, 4096]])
def test_decode_trimmed_grid(kv_lens, monkeypatch):
    """A wrapper without CUDA graphs launches the Gluon decode kernel on as many programs as its plan has tasks
    (PAGODA_DECODE_TRIM_GRID, default on): against the float64 oracle, and the same bits as on the whole
    persistent grid (the same tasks, each program's first); a CUDA-graph wrapper keeps the whole grid (its
    captured launch stays valid for later plans with more tasks)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon decode kernel is for sm_90")
    hq, hk, d, ps = 32, 8, 128, 16
    batch = PagedBatch(kv_lens, hk, d, ps, torch.bfloat16)
    q = torch.randn(len(kv_lens), hq, d, dtype=torch.bfloat16, device="cuda")
    outs, grids = [], []
    for trim, graph in (("1", False), ("0", False), ("1", True)):
        monkeypatch.setenv("PAGODA_DECODE_TRIM_GRID", trim)
        w = pagoda.BatchDecodeWithPagedKVCacheWrapper(workspace(256), use_cuda_graph=graph)
        w.plan(batch.indptr, batch.indices, batch.last_page_len, hq, hk, d, ps, q_data_type=torch.bfloat16)
        assert w._plan.decode_sm90_constexprs is not None, "expected the Gluon decode kernel"
        tasks = int(w._counters[2])
        out, lse = poisoned_like(q)
        w.run(q, batch.cache, out=out, lse=lse)
        outs.append((out, lse))
        grids.append((w._plan.grid, tasks, w._grid[1]))
    (t_grid, tasks, full), (u_grid, _, _), (g_grid, _, _) = grids
    assert tasks < full, "a plan with fewer tasks than the persistent grid's programs expected"
    assert t_grid == tasks and u_grid == full and g_grid == full, grids
    ro, rl = oracle(q.cpu(), list(range(len(kv_lens) + 1)), [k.cpu() for k in batch.k], [v.cpu() for v in batch.v])
    for out, lse in outs[0], outs[2]:
        assert rel_err(out, ro) < TOL[torch.bfloat16]
        check_lse(lse, rl)
    assert torch.equal(outs[1][0], outs[0][0]) and torch.equal(outs[1][1], outs[0][1])


@pytest.mark.parametrize("kv_lens,head_dim", [([2048] * 64, 128), ([1024] * 70 + [3000] * 3, 64), ([700] * 40, 128)])
def test_decode_balanced_grid(kv_lens, head_dim, monkeypatch):
    """PAGODA_DECODE_BALANCE_GRID (default on): an eager wrapper's 16-bit Gluon decode plan launches on
    runner.balanced_grid's programs (64 x 2048 at head_dim 128: 2 a SM instead of 3), against the float64 oracle
    and with the same bits as on the trimmed whole grid (the same tasks, another program each)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon decode kernel is for sm_90")
    from pagoda.attention.runner import balanced_grid

    hq, hk, ps = 32, 8, 16
    batch = PagedBatch(kv_lens, hk, head_dim, ps, torch.bfloat16)
    q = torch.randn(len(kv_lens), hq, head_dim, dtype=torch.bfloat16, device="cuda")
    outs, grids = [], []
    for on in ("1", "0"):
        monkeypatch.setenv("PAGODA_DECODE_BALANCE_GRID", on)
        w = pagoda.BatchDecodeWithPagedKVCacheWrapper(workspace(256))
        w.plan(batch.indptr, batch.indices, batch.last_page_len, hq, hk, head_dim, ps, q_data_type=torch.bfloat16)
        assert w._plan.decode_sm90_constexprs is not None, "expected the Gluon decode kernel"
        tasks, full = int(w._counters[2]), w._grid[1]
        out, lse = poisoned_like(q)
        w.run(q, batch.cache, out=out, lse=lse)
        outs.append((out, lse))
        grids.append(w._plan.grid)
    assert grids == [min(tasks, balanced_grid(tasks, full, w._plan.config.ctas_per_sm)), min(tasks, full)]
    if kv_lens == [2048] * 64:
        assert grids[0] == 2 * full // 3, grids
    ro, rl = oracle(q.cpu(), list(range(len(kv_lens) + 1)), [k.cpu() for k in batch.k], [v.cpu() for v in batch.v])
    assert rel_err(outs[0][0], ro) < TOL[torch.bfloat16]
    check_lse(outs[0][1], rl)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_decode_balanced_grid_in_cuda_graph():
    """A CUDA-graph wrapper's captured launch keeps the whole persistent grid; each plan's header says how many of
    its programs take tasks (ACTIVE_AT, runner.balanced_grid): 2 a SM for 64 x 2048 (512 tasks), the whole grid
    for plans of 760-832 tasks, then 64 x 2048 again, every replay against the float64 oracle (a program past the
    active ones taking a task, or a task no program takes, shows as a wrong or NaN row)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon decode kernel is for sm_90")
    from pagoda.attention.kernels.attention import ACTIVE_AT
    from pagoda.bench.attention import capture_graph  # (two warm-up runs on a side stream, then the capture)

    hq, hk, d, ps, bsz = 32, 8, 128, 16, 64
    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(workspace(256), use_cuda_graph=True)
    cases = ([2048] * bsz, [5000] * 10 + [700] * 54, [8192] * 32 + [1] * 32, [2048] * bsz)
    cache = PagedBatch(cases[0], hk, d, ps, torch.bfloat16, spare_pages=9000).cache
    q = torch.randn(bsz, hq, d, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(q)
    g = None
    for lens in cases:
        nxt = PagedBatch(lens, hk, d, ps, torch.bfloat16, spare_pages=0)
        cache.fill_(float("nan"))
        cache[: nxt.cache.shape[0]] = nxt.cache
        w.plan(nxt.indptr, nxt.indices, nxt.last_page_len, hq, hk, d, ps, q_data_type=torch.bfloat16)
        assert w._plan.decode_sm90_constexprs is not None, "expected the Gluon decode kernel"
        tasks, full = int(w._counters[2]), w._grid[1]
        active = int(w._counters[ACTIVE_AT])
        want = 2 * full // 3 if lens == cases[0] else full
        assert w._plan.grid == full and active == want, (lens[:2], tasks, active, full)
        if g is None:
            g = capture_graph(lambda: w.run(q, cache, out=out))
        q.copy_(torch.randn_like(q))
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        ro, _ = oracle(q.cpu(), list(range(bsz + 1)), [k.cpu() for k in nxt.k], [v.cpu() for v in nxt.v])
        assert rel_err(out, ro) < TOL[torch.bfloat16], (lens[:2], tasks, active)


def test_decode_plan_with_device_page_ids():
    """plan() given its page ids on the GPU (as FlashInfer users pass them): checked with one reduction and one
    copy back (formats.check_page_indices); a negative id or one past the cache still raises ValueError."""
    hq, hk, d, ps = 32, 8, 128, 16
    batch = PagedBatch([1, 700, 4096, 33], hk, d, ps, torch.bfloat16)
    ids = batch.indices.cuda()
    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(workspace(64))
    w.plan(batch.indptr, ids, batch.last_page_len, hq, hk, d, ps, q_data_type=torch.bfloat16)
    assert w._plan.max_page == int(batch.indices[:int(batch.indptr[-1])].max())
    q = torch.randn(4, hq, d, dtype=torch.bfloat16, device="cuda")
    out, lse = poisoned_like(q)
    w.run(q, batch.cache, out=out, lse=lse)
    ro, rl = oracle(q.cpu(), list(range(5)), [k.cpu() for k in batch.k], [v.cpu() for v in batch.v])
    assert rel_err(out, ro) < TOL[torch.bfloat16]
    check_lse(lse, rl)
    bad = ids.clone()
    bad[5] = -1
    with pytest.raises(ValueError, match="paged_kv_indices must be >= 0"):
        w.plan(batch.indptr, bad, batch.last_page_len, hq, hk, d, ps, q_data_type=torch.bfloat16)
    past = ids.clone()
    past[3] = batch.cache.shape[0]
    w.plan(batch.indptr, past, batch.last_page_len, hq, hk, d, ps, q_data_type=torch.bfloat16)
    with pytest.raises(ValueError, match="refers to page"):
        w.run(q, batch.cache)


def test_decode_cuda_graph_replays_after_new_plan():
    hq, hk, d, ps, bsz = 32, 8, 128, 16, 16
    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(workspace(128), use_cuda_graph=True)
    first = PagedBatch([100] * bsz, hk, d, ps, torch.bfloat16, spare_pages=4000)
    q = torch.randn(bsz, hq, d, dtype=torch.bfloat16, device="cuda")
    w.plan(first.indptr, first.indices, first.last_page_len, hq, hk, d, ps, q_data_type=torch.bfloat16)
    out = torch.empty_like(q)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            w.run(q, first.cache, out=out)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        w.run(q, first.cache, out=out)
    # New lengths (one long request gets split, one request is empty), same cache tensor; the second plan
    # takes its page ids on the device (copied into the plan buffer on the device, not through the host)
    for i, lens in enumerate(([5000, 1] + [300] * (bsz - 2), [0] + [2000] * (bsz - 1), [100] * bsz)):
        nxt = PagedBatch(lens, hk, d, ps, torch.bfloat16, spare_pages=0)
        first.cache.fill_(float("nan"))
        first.cache[: nxt.cache.shape[0]] = nxt.cache
        ids = nxt.indices.cuda() if i == 1 else nxt.indices
        w.plan(nxt.indptr, ids, nxt.last_page_len, hq, hk, d, ps, q_data_type=torch.bfloat16)
        q.copy_(torch.randn_like(q))
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        ro, _ = oracle(q.cpu(), list(range(bsz + 1)), [k.cpu() for k in nxt.k], [v.cpu() for v in nxt.v])
        assert rel_err(out, ro) < TOL[torch.bfloat16], lens
    # a replay skips run()'s page check: a plan whose page ids pass the captured cache is refused at plan(), on
    # the host or the device, and the plan before it stays (the next replay still matches it)
    pages = first.cache.shape[0]
    for ids in (nxt.indices.clone(), nxt.indices.cuda()):
        ids[-1] = pages
        with pytest.raises(ValueError, match=f"refers to page {pages} but the paged cache captured"):
            w.plan(nxt.indptr, ids, nxt.last_page_len, hq, hk, d, ps, q_data_type=torch.bfloat16)
    out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    assert rel_err(out, ro) < TOL[torch.bfloat16]
    ids = nxt.indices.clone()
    ids[-1] = pages - 1  # the last page of the captured cache is still in it
    w.plan(nxt.indptr, ids, nxt.last_page_len, hq, hk, d, ps, q_data_type=torch.bfloat16)


def test_prefill_cuda_graph_replays_after_new_plan():
    hq, hk, d, ps = 32, 8, 128, 16
    w = pagoda.BatchPrefillWithPagedKVCacheWrapper(workspace(128), use_cuda_graph=True)
    qo = [0, 256, 512]
    first = PagedBatch([256, 256], hk, d, ps, torch.bfloat16, spare_pages=600)
    w.plan(torch.tensor(qo), first.indptr, first.indices, first.last_page_len, hq, hk, d, ps, causal=True,
           q_data_type=torch.bfloat16)
    q = torch.randn(512, hq, d, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(q)
    w.run(q, first.cache, out=out)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        w.run(q, first.cache, out=out)
    nxt = PagedBatch([4096, 300], hk, d, ps, torch.bfloat16, spare_pages=0)
    first.cache.fill_(float("nan"))
    first.cache[: nxt.cache.shape[0]] = nxt.cache
    w.plan(torch.tensor([0, 12, 512]), nxt.indptr, nxt.indices, nxt.last_page_len, hq, hk, d, ps, causal=True,
           q_data_type=torch.bfloat16)
    out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    ro, _ = oracle(q.cpu(), [0, 12, 512], [k.cpu() for k in nxt.k], [v.cpu() for v in nxt.v], causal=True)
    assert rel_err(out, ro) < TOL[torch.bfloat16]
    bad = nxt.indices.clone()  # a page past the captured cache: refused at plan() (a replay skips run()'s check)
    bad[0] = first.cache.shape[0]
    with pytest.raises(ValueError, match="but the paged cache captured"):
        w.plan(torch.tensor([0, 12, 512]), nxt.indptr, bad, nxt.last_page_len, hq, hk, d, ps, causal=True,
               q_data_type=torch.bfloat16)


def _shared_prefix_batch(n_req, prefix, suffix, hk, d, ps, dtype):
    shared_pages = prefix // ps
    uniq_pages = -(-suffix // ps)
    total = shared_pages + n_req * uniq_pages
    cache = torch.randn(total, 2, ps, hk, d, dtype=dtype, device="cuda")
    perm = torch.randperm(total).to(torch.int32)
    tables = [torch.cat([perm[:shared_pages], perm[shared_pages + r * uniq_pages:shared_pages + (r + 1) * uniq_pages]])
              for r in range(n_req)]
    indptr = torch.tensor([0] + [len(t) * (r + 1) for r, t in enumerate(tables)], dtype=torch.int32)
    last = torch.full((n_req,), (suffix - 1) % ps + 1, dtype=torch.int32)
    return cache, indptr, torch.cat(tables), last


def test_cascade_matches_flat_and_replays_in_cuda_graph():
    hq, hk, d, ps, dtype, n = 32, 8, 128, 16, torch.bfloat16, 32
    cache, indptr, indices, last = _shared_prefix_batch(n, 4096, 200, hk, d, ps, dtype)
    q = torch.randn(n, hq, d, dtype=dtype, device="cuda")
    flat = pagoda.BatchDecodeWithPagedKVCacheWrapper(workspace(128))
    flat.plan(indptr, indices, last, hq, hk, d, ps, q_data_type=dtype)
    levels = pagoda.cascade_levels_from_page_table(indptr, indices, last, ps)
    assert levels["paged_kv_indptr_arr"][0].tolist() == [0, 4096 // ps]
    w = pagoda.MultiLevelCascadeAttentionWrapper(2, workspace(128), use_cuda_graph=True)
    w.plan(**levels, num_qo_heads=hq, num_kv_heads=hk, head_dim=d, page_size=ps, q_data_type=dtype)
    out = torch.empty_like(q)
    w.run(q, cache, out=out)
    assert rel_err(out, flat.run(q, cache)) < TOL[dtype]
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        w.run(q, cache, out=out)
    # replan with another prefix split and replay
    cache2, indptr2, indices2, last2 = _shared_prefix_batch(n, 1024, 250, hk, d, ps, dtype)  # 576 <= 672 pages
    cache[: cache2.shape[0]] = cache2
    levels2 = pagoda.cascade_levels_from_page_table(indptr2, indices2, last2, ps)
    w.plan(**levels2, num_qo_heads=hq, num_kv_heads=hk, head_dim=d, page_size=ps, q_data_type=dtype)
    q.copy_(torch.randn_like(q))
    out.fill_(float("nan"))
    g.replay()
    flat.plan(indptr2, indices2, last2, hq, hk, d, ps, q_data_type=dtype)
    assert rel_err(out, flat.run(q, cache)) < TOL[dtype]


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_decode_gluon_head_dim_256_group_16(kv_dtype):
    """head_dim 256 with 16 query heads a KV head (the Gluon decode kernel's widest tile: 16 rows, merge rows 16,
    4 chunks a merge round; fp8 at the hardware's 255 registers): a split 32k request and short ones against the
    float64 oracle, output and LSE poisoned."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon decode kernel is for sm_90")
    from .test_fp8 import quantized_batch

    hq, hk, d, kv_lens = 64, 4, 256, [32768, 1, 333, 4100]
    if kv_dtype == torch.bfloat16:
        batch = PagedBatch(kv_lens, hk, d, 16, torch.bfloat16)
        cache, scales, dk, dv = batch.cache, {}, [k.cpu() for k in batch.k], [v.cpu() for v in batch.v]
    else:
        batch, cache, ks, vs, dk, dv = quantized_batch(kv_lens, hk, d, 16, kv_dtype, per_head=True,
                                                       dtype=torch.bfloat16)
        scales = dict(k_scale=ks, v_scale=vs)
    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(workspace(256))
    w.plan(batch.indptr, batch.indices, batch.last_page_len, hq, hk, d, 16, q_data_type=torch.bfloat16,
           kv_data_type=kv_dtype)
    assert w._plan.decode_sm90_constexprs is not None, "expected the Gluon decode kernel"
    assert w._plan.decode_sm90_constexprs["BLOCK_M"] == 16 and w._plan.decode_sm90_constexprs["MERGE_ROWS"] == 16
    assert int(w._plan.work.splits[:, 1].max()) > 4  # more chunks than one merge round holds at 16 rows
    q = torch.randn(len(kv_lens), hq, d, dtype=torch.bfloat16, device="cuda")
    out, lse = poisoned_like(q)
    w.run(q, cache, out=out, lse=lse, **scales)
    ro, rl = oracle(q.cpu(), list(range(len(kv_lens) + 1)), dk, dv)
    assert rel_err(out, ro) < TOL[torch.bfloat16]
    check_lse(lse, rl)


# -- fp8 KV cache -----------------------------------------------------------------------------
@pytest.mark.parametrize("fp8,q_dtype", [(torch.float8_e4m3fn, torch.bfloat16), (torch.float8_e5m2, torch.bfloat16),
                                          (torch.float8_e4m3fn, torch.float16)])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("per_head", [True, False])
def test_fp8_decode_real_sizes(fp8, q_dtype, head_dim, per_head):
    """bf16 queries compute in fp16 over the fp8 cache (kernels/attention.py), fp16 ones natively."""
    from .test_fp8 import quantized_batch

    kv_lens = [1, 4096, 333, 17, 2048, 8191]
    batch, cache, ks, vs, dk, dv = quantized_batch(kv_lens, 8, head_dim, 16, fp8, per_head=per_head, dtype=q_dtype)
    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(workspace(128))
    w.plan(batch.indptr, batch.indices, batch.last_page_len, 32, 8, head_dim, 16, q_data_type=q_dtype,
           kv_data_type=fp8)
    q = torch.randn(len(kv_lens), 32, head_dim, dtype=q_dtype, device="cuda")
    out, lse = poisoned_like(q)
    w.run(q, cache, out=out, lse=lse, k_scale=ks, v_scale=vs)
    ro, rl = oracle(q.cpu(), list(range(len(kv_lens) + 1)), dk, dv)
    assert rel_err(out, ro) < TOL[torch.bfloat16]
    check_lse(lse, rl)


@pytest.mark.parametrize("fp8,q_dtype,head_dim,page_size,per_head,kw", [
    (torch.float8_e4m3fn, torch.bfloat16, 128, 16, False, {}), (torch.float8_e4m3fn, torch.bfloat16, 128, 1, True, {}),
    (torch.float8_e5m2, torch.float16, 128, 64, True, {}), (torch.float8_e5m2, torch.float16, 64, 16, True, {}),
    (torch.float8_e4m3fn, torch.bfloat16, 64, 64, False, {}),
    (torch.float8_e4m3fn, torch.bfloat16, 128, 16, True, {"logits_soft_cap": 5.0, "window_left": 9000}),
    (torch.float8_e5m2, torch.float16, 64, 1, False, {"logits_soft_cap": 30.0}),
    (torch.float8_e4m3fn, torch.bfloat16, 256, 16, True, {}),
    (torch.float8_e4m3fn, torch.bfloat16, 256, 1, False, {"logits_soft_cap": 50.0, "window_left": 4095})])
def test_fp8_decode_gluon_kernel(fp8, q_dtype, head_dim, page_size, per_head, kw, monkeypatch):
    """The Gluon fp8 decode kernel (the default on sm_90) against the float64 reference and the Triton kernel
    (PAGODA_FP8_DECODE_KERNEL=triton): lengths that end mid-block and mid-page, a 1-token and a split 32k
    request, GQA 4 and group 8 (at head_dim 64), per-head and scalar scales, a logits soft cap (whose scale takes
    the cache's K scale) and a window, K and V as views of one cache tensor; then CUDA-graph replays after new
    plans."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon fp8 decode kernel is for sm_90")
    from .test_fp8 import quantized_batch

    hq, hk = {128: (32, 8), 64: (64, 8), 256: (16, 8)}[head_dim]
    kv_lens = [1, 4096, 333, 17, 32768, 70, 2047]
    batch, cache, ks, vs, dk, dv = quantized_batch(kv_lens, hk, head_dim, page_size, fp8, per_head=per_head,
                                                   dtype=q_dtype)
    q = torch.randn(len(kv_lens), hq, head_dim, dtype=q_dtype, device="cuda")
    ro, rl = oracle(q.cpu(), list(range(len(kv_lens) + 1)), dk, dv, **kw)
    outs = {}
    for kernel in ("auto", "triton"):
        monkeypatch.setenv("PAGODA_FP8_DECODE_KERNEL", kernel)
        w = pagoda.BatchDecodeWithPagedKVCacheWrapper(workspace(256))
        w.plan(batch.indptr, batch.indices, batch.last_page_len, hq, hk, head_dim, page_size, q_data_type=q_dtype,
               kv_data_type=fp8, **kw)
        assert (w._plan.decode_sm90_constexprs is not None) == (kernel == "auto")
        assert kernel == "triton" or w._plan.work.partial_rows > 0  # the 32k request splits
        out, lse = poisoned_like(q)
        w.run(q, cache, out=out, lse=lse, k_scale=ks, v_scale=vs)
        assert rel_err(out, ro) < TOL[torch.bfloat16], kernel
        check_lse(lse, rl)
        outs[kernel] = out
        if kernel == "auto":
            w_auto = w
    assert rel_err(outs["auto"], outs["triton"].double()) < 1e-2
    # K and V as separate tensors with different page / slot strides (the kernel's SAME_STRIDES=False path)
    v_wide = torch.empty(*cache[:, 1].shape[:2], hk + 3, head_dim, dtype=fp8, device="cuda")[:, :, 2:2 + hk]
    v_wide.copy_(cache[:, 1])
    out = torch.full_like(q, float("nan"))
    w_auto.run(q, (cache[:, 0], v_wide), out=out, k_scale=ks, v_scale=vs)
    assert rel_err(out, ro) < TOL[torch.bfloat16]
    monkeypatch.setenv("PAGODA_FP8_DECODE_KERNEL", "auto")
    wg = pagoda.BatchDecodeWithPagedKVCacheWrapper(workspace(256), use_cuda_graph=True)
    wg.plan(batch.indptr, batch.indices, batch.last_page_len, hq, hk, head_dim, page_size, q_data_type=q_dtype,
            kv_data_type=fp8, **kw)
    out = torch.empty_like(q)
    wg.run(q, cache, out=out, k_scale=ks, v_scale=vs)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        wg.run(q, cache, out=out, k_scale=ks, v_scale=vs)
    for _ in range(2):  # replays after re-planning the same lengths (the snake schedule keeps no state)
        wg.plan(batch.indptr, batch.indices, batch.last_page_len, hq, hk, head_dim, page_size,
                q_data_type=q_dtype, kv_data_type=fp8, **kw)
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert rel_err(out, ro) < TOL[torch.bfloat16]


def test_fp8_prefill_append_and_graph_replay():
    from .test_fp8 import quantized_batch

    fp8, hq, hk, d, ps = torch.float8_e4m3fn, 32, 8, 128, 16
    qo_lens, kv_lens = [1000, 129, 1, 512], [1000, 700, 64, 4608]
    batch, cache, ks, vs, dk, dv = quantized_batch(kv_lens, hk, d, ps, fp8, layout="HND")
    qo = [0] + torch.tensor(qo_lens).cumsum(0).tolist()
    w = pagoda.BatchPrefillWithPagedKVCacheWrapper(workspace(128), "HND", use_cuda_graph=True)
    w.plan(torch.tensor(qo), batch.indptr, batch.indices, batch.last_page_len, hq, hk, d, ps, causal=True,
           q_data_type=torch.bfloat16, kv_data_type=fp8)
    q = torch.randn(qo[-1], hq, d, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(q)
    w.run(q, cache, out=out, k_scale=ks, v_scale=vs)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        w.run(q, cache, out=out, k_scale=ks, v_scale=vs)
    out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    ro, _ = oracle(q.cpu(), qo, dk, dv, causal=True)
    assert rel_err(out, ro) < TOL[torch.bfloat16]


def test_fp8_append_then_decode_matches_bf16():
    """The serving path: quantize-on-write with append_paged_kv_cache, then fp8 decode, vs bf16."""
    hq, hk, d, ps, n = 32, 8, 128, 16, 3000
    k = torch.randn(n, hk, d, dtype=torch.bfloat16, device="cuda")
    v = torch.randn(n, hk, d, dtype=torch.bfloat16, device="cuda")
    ks = (k.float().abs().amax(dim=(0, 2)) / 448).contiguous()
    vs = (v.float().abs().amax(dim=(0, 2)) / 448).contiguous()
    pages = -(-n // ps)
    indptr = torch.tensor([0, pages], dtype=torch.int32, device="cuda")
    indices = torch.randperm(pages, device="cuda").to(torch.int32)
    last = torch.tensor([(n - 1) % ps + 1], dtype=torch.int32, device="cuda")
    c8 = torch.empty(pages, 2, ps, hk, d, dtype=torch.float8_e4m3fn, device="cuda")
    c16 = torch.empty(pages, 2, ps, hk, d, dtype=torch.bfloat16, device="cuda")
    b, pos = pagoda.get_batch_indices_positions(torch.tensor([0, n], dtype=torch.int32, device="cuda"),
                                                torch.tensor([n], dtype=torch.int32, device="cuda"), n)
    pagoda.append_paged_kv_cache(k, v, b, pos, c8, indices, indptr, last, k_scale=ks, v_scale=vs)
    pagoda.append_paged_kv_cache(k, v, b, pos, c16, indices, indptr, last)
    q = torch.randn(1, hq, d, dtype=torch.bfloat16, device="cuda")
    outs = []
    for cache, kv_dt, sc in ((c8, torch.float8_e4m3fn, dict(k_scale=ks, v_scale=vs)), (c16, None, {})):
        w = pagoda.BatchDecodeWithPagedKVCacheWrapper(workspace(64))
        w.plan(indptr.cpu(), indices.cpu(), last.cpu(), hq, hk, d, ps, q_data_type=torch.bfloat16, kv_data_type=kv_dt)
        outs.append(w.run(q, cache, **sc))
    err = rel_err(outs[0], outs[1])
    assert 1e-3 < err < 0.05, err


# -- MLA --------------------------------------------------------------------------------------
@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("qo_lens,kv_lens,causal", [([1] * 8, [1, 100, 1024, 4097, 64, 32768, 7, 2000], False),
                                                    ([300, 1, 64], [300, 5000, 1024], True)])
def test_mla_real_sizes(heads, qo_lens, kv_lens, causal):
    from .test_mla import MLABatch, run_mla

    batch = MLABatch(kv_lens, 64)
    _, out, lse, ro, rl = run_mla(batch, qo_lens, heads, causal=causal, ws_mb=256)
    assert rel_err(out, ro) < TOL[torch.bfloat16]
    check_lse(lse, rl)


@pytest.mark.parametrize("bsz,spare,later,kernel", [
    (8, 2000, ([20000, 1] + [300] * 6, [0] + [3000] * 7), "triton"),
    (8, 2000, ([20000, 1] + [300] * 6, [0] + [3000] * 7), "auto"),  # the Gluon kernel on sm_90
    (96, 4000, ([40000, 1] + [3] * 94, [0] + [2100] * 95), "auto"),
])
def test_mla_cuda_graph_replays_after_new_plan(bsz, spare, later, kernel, monkeypatch):
    """Captured once over a plan without split tiles, replayed after plans of other lengths (a lone long
    request among short ones: split tiles, merged by the captured merge launch; an empty request); both
    kernels (PAGODA_MLA_KERNEL=triton, and auto, which takes the Gluon one on sm_90)."""
    import math

    from .test_mla import MLABatch
    from pagoda.attention.mla import mla_reference

    h, ps = 128, 64
    first = MLABatch([100] * bsz, ps, spare=spare)
    w = pagoda.BatchMLAPagedAttentionWrapper(workspace(512), use_cuda_graph=True)
    sm = 1 / math.sqrt(192)
    qo = torch.arange(bsz + 1, dtype=torch.int32)

    def plan(b):
        w.plan(qo, b.indptr, b.indices, torch.tensor(b.kv_lens), h, 512, 64, ps, False, sm, torch.bfloat16,
               torch.bfloat16)
    monkeypatch.setenv("PAGODA_MLA_KERNEL", kernel)
    plan(first)
    gluon = w._plan.sm90
    assert gluon == (kernel == "auto" and torch.cuda.get_device_capability() == (9, 0))
    qn = torch.randn(bsz, h, 512, dtype=torch.bfloat16, device="cuda") * 0.3
    qp = torch.randn(bsz, h, 64, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(bsz, h, 512, dtype=torch.bfloat16, device="cuda")
    w.run(qn, qp, first.ckv, first.kpe, out=out)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        w.run(qn, qp, first.ckv, first.kpe, out=out)
    for lens in later:
        nxt = MLABatch(lens, ps, spare=0)
        first.ckv.fill_(float("nan"))
        first.kpe.fill_(float("nan"))
        first.ckv[: nxt.ckv.shape[0]] = nxt.ckv
        first.kpe[: nxt.kpe.shape[0]] = nxt.kpe
        plan(nxt)
        assert w._plan.sm90 == gluon and w._plan.combine
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        ro = torch.cat([mla_reference(qn[i:i + 1], qp[i:i + 1], nxt.c[i], nxt.r[i], sm_scale=sm,
                                      compute_dtype=torch.float64)[0] for i in range(bsz)])
        assert rel_err(out, ro) < TOL[torch.bfloat16], lens
    bad = nxt.indices.clone()  # a page past the captured caches: refused at plan() (a replay skips run()'s check)
    bad[-1] = first.ckv.shape[0]
    with pytest.raises(ValueError, match="but the paged cache captured"):
        w.plan(qo, nxt.indptr, bad, torch.tensor(nxt.kv_lens), h, 512, 64, ps, False, sm, torch.bfloat16,
               torch.bfloat16)


@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("heads,dtype", [(128, torch.bfloat16), (16, torch.bfloat16), (64, torch.float16)])
@pytest.mark.parametrize("causal", [False, True])
def test_mla_sm90_kernel(page_size, heads, dtype, causal, monkeypatch):
    """The Gluon MLA kernel (Hopper) against the float64 reference and the Triton kernel: decode and appends
    (qo > 1, several tokens per tile at 16 heads), lengths that end mid-block and mid-page, an empty KV,
    split tiles (32k), one plan run three times (the snake schedule needs no counter reset)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon MLA kernel is for sm_90")
    from .test_mla import MLABatch, run_mla

    qo_lens, kv_lens = ([1] * 6 + [5, 33], [1, 100, 1024, 32768, 0, 4097, 70, 2000]) if not causal else \
        ([300, 1, 64, 7], [300, 5000, 1024, 7])
    batch = MLABatch(kv_lens, page_size, dtype=dtype)
    results = {}
    for kernel in ("gluon", "triton"):
        monkeypatch.setenv("PAGODA_MLA_KERNEL", kernel)
        torch.manual_seed(0)
        w, out, lse, ro, rl = run_mla(batch, qo_lens, heads, causal=causal, ws_mb=256, dtype=dtype)
        assert w._plan.sm90 == (kernel == "gluon"), "the plan did not pick the kernel under test"
        results[kernel] = (out, lse)
        assert rel_err(out, ro) < TOL[dtype], kernel
        check_lse(lse, rl)
    assert rel_err(*[r[0] for r in results.values()]) < TOL[dtype]
    monkeypatch.setenv("PAGODA_MLA_KERNEL", "gluon")
    qn = torch.randn(out.shape, dtype=dtype, device="cuda") * 0.3
    qp = torch.randn(*out.shape[:2], 64, dtype=dtype, device="cuda")
    first = w.run(qn, qp, batch.ckv, batch.kpe)  # w is the Triton kernel's: plan again for the Gluon one
    w.plan(torch.tensor([0] + qo_lens).cumsum(0).to(torch.int32), batch.indptr, batch.indices,
           torch.tensor(kv_lens, dtype=torch.int32), heads, 512, 64, page_size, causal, 1 / 192 ** 0.5, dtype, dtype)
    assert w._plan.sm90
    for _ in range(3):
        again = w.run(qn, qp, batch.ckv, batch.kpe)
        assert rel_err(again, first) < TOL[dtype]


def test_mla_kernel_choice(monkeypatch):
    """auto and gluon: the Gluon kernel for every supported plan, few or many, short or long requests;
    triton: the Triton kernel; head dims the Gluon kernel lacks: the Triton kernel; a bad value is refused."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon MLA kernel is for sm_90")
    from .test_mla import MLABatch

    def picks(batch_size, heads=128, kv=100, ckv=512):
        b = MLABatch([kv] * batch_size, 64)
        w = pagoda.BatchMLAPagedAttentionWrapper(workspace(16))
        w.plan(torch.arange(batch_size + 1, dtype=torch.int32), b.indptr, b.indices, torch.tensor(b.kv_lens),
               heads, ckv, 64, 64, False, 0.1, torch.bfloat16, torch.bfloat16)
        return w._plan.sm90
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert picks(64) and picks(sms) and picks(1) and picks(16, heads=16) and picks(1, kv=32768)
    assert not picks(4, ckv=256)
    monkeypatch.setenv("PAGODA_MLA_KERNEL", "gluon")
    assert picks(1)
    monkeypatch.setenv("PAGODA_MLA_KERNEL", "triton")
    assert not picks(128) and not picks(1)
    monkeypatch.setenv("PAGODA_MLA_KERNEL", "gluon-please")
    with pytest.raises(ValueError, match="PAGODA_MLA_KERNEL"):
        picks(4)


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_dequantization_covers_every_code(fp8):
    """Caches of random fp8 *bit patterns* (every finite code: zeros, subnormals, the largest values)
    against the float64 reference of the same codes: checks the fp8 -> fp16 conversion of every code."""
    hq, hk, d, ps, n = 8, 2, 64, 16, 4096
    codes = torch.randint(0, 256, (n // ps, 2, ps, hk, d), dtype=torch.uint8)
    vals = codes.view(fp8).float()
    codes[~torch.isfinite(vals)] = 0  # NaN / inf codes are not finite values of the cache
    cache = codes.view(fp8).cuda()
    scale = 1.0 / float(vals[torch.isfinite(vals)].abs().max())
    indptr = torch.tensor([0, n // ps], dtype=torch.int32)
    indices = torch.arange(n // ps, dtype=torch.int32)
    last = torch.tensor([ps], dtype=torch.int32)
    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(workspace(64))
    w.plan(indptr, indices, last, hq, hk, d, ps, q_data_type=torch.bfloat16, kv_data_type=fp8)
    q = torch.randn(1, hq, d, dtype=torch.bfloat16, device="cuda")
    out = w.run(q, cache, k_scale=scale, v_scale=scale)
    kv = cache.cpu().double() * scale  # [pages, 2, ps, hk, d]
    k = kv[:, 0].reshape(n, hk, d)
    v = kv[:, 1].reshape(n, hk, d)
    ro, _ = oracle(q.cpu(), [0, 1], [k], [v])
    assert rel_err(out, ro) < TOL[torch.bfloat16]


# -- variants, custom masks, block-sparse (real sizes) ------------------------------------------
def test_variants_real_sizes():
    from .test_variants import dense_ref, positions

    hq, hk, d = 32, 8, 128
    q = torch.randn(1000, hq, d, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(1500, hk, d, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    qpos, kpos = positions(1000, 1500)
    slopes = pagoda.variants.alibi_slopes(hq)
    out = pagoda.single_prefill_with_kv_cache(q, k, v, causal=True, variant=pagoda.variants.alibi(slopes))
    bias = slopes.double()[:, None, None] * (kpos - qpos).double()[None]
    ro, _ = dense_ref(q, k, v, bias=bias, keep=(kpos <= qpos)[None])
    assert rel_err(out, ro) < TOL[torch.bfloat16]
    out = pagoda.single_prefill_with_kv_cache(q, k, v, variant=pagoda.variants.sink_window(64, 256))
    keep = (kpos <= qpos) & ((kpos < 64) | (kpos >= qpos - 256))
    ro, _ = dense_ref(q, k, v, keep=keep[None])
    assert rel_err(out, ro) < TOL[torch.bfloat16]
    m = torch.rand(1000 * 1500) > 0.5
    out = pagoda.single_prefill_with_kv_cache(q, k, v, custom_mask=m)
    ro, _ = dense_ref(q, k, v, keep=m.view(1, 1000, 1500))
    assert rel_err(out, ro) < TOL[torch.bfloat16]


@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse_real_size(causal):
    from .test_variants import _dense_from_bsr, _random_bsr, dense_ref

    M = N = 2048
    R = C = 64
    hq, hk, d = 32, 8, 128
    indptr, indices = _random_bsr(M // R, N // C, 0.3, 7)
    q = torch.randn(M, hq, d, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(N, hk, d, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    w = pagoda.BlockSparseAttentionWrapper(workspace(128))
    w.plan(indptr, indices, M, N, R, C, hq, hk, d, causal=causal, q_data_type=torch.bfloat16)
    out = w.run(q, k, v)
    keep = _dense_from_bsr(M, N, R, C, indptr, indices, causal=causal)
    ro, _ = dense_ref(q, k, v, keep=keep[None])
    seen = keep.any(1)
    assert rel_err(out[seen.cuda()], ro[seen]) < TOL[torch.bfloat16]


@pytest.mark.parametrize("paged", [True, False])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads,dtype", [((32, 8), torch.bfloat16), ((40, 8), torch.bfloat16),
                                         ((32, 1), torch.bfloat16), ((32, 32), torch.float16)])
def test_prefill_sm90_kernel(paged, head_dim, causal, heads, dtype, monkeypatch):
    """The Gluon prefill kernel (Hopper) against the float64
    reference and the Triton kernel: lengths that end mid-block and mid-page, a single-token request, appends
    (qo < kv), a query longer than its KV."""
    prefill_sm90_against_reference(paged, head_dim, causal, heads, dtype, monkeypatch)


@pytest.mark.parametrize("config", [(64, 5, 88, 208, 1), (128, 3, 88, 208, 1), (128, 3, 88, 208, 0),
                                    (128, 3, 88, 208, 1, 0), (64, 5, 88, 208, 0, 0), (64, 5, 88, 208, 0, 1, 1),
                                    (128, 3, 88, 208, 1, 1, 1), (128, 3, 88, 208, 1, 0, 1)])
@pytest.mark.parametrize("band", ["on", "off"])
@pytest.mark.parametrize("paged,head_dim", [(True, 128), (False, 128), (True, 64)])
def test_prefill_sm90_configs(config, band, paged, head_dim, monkeypatch):
    """The Gluon prefill kernel's other configurations (runner.SM90_CONFIG: 128-token KV blocks copied 64 rows at
    a time, Q read from shared memory, the cp.async producer without bulk copies: tma 0, the next task's Q copied
    ahead: q_ahead 1) and the banded task order (plan.prefill_band, forced on: the tasks of band items go KV head by
    KV head; the test's batch is too small for "auto" to band it)."""
    from pagoda.attention import runner

    cfg = dict(block_n=config[0], stages=config[1], producer_regs=config[2], consumer_regs=config[3],
               q_smem=config[4], tma=config[5] if len(config) > 5 else 1, q_ahead=config[6] if len(config) > 6 else 0)
    for name in ("SM90_CONFIG", "SM90_LONG_CONFIG", "SM90_LONG_CONFIG_D64"):
        monkeypatch.setattr(runner, name, cfg)
    monkeypatch.setattr(runner, "PREFILL_BAND", band)
    w = prefill_sm90_against_reference(paged, head_dim, True, (32, 8), torch.bfloat16, monkeypatch)
    assert w._counters[5].item() == (0 if band == "off" else runner.num_programs(w.device, w._plan.config) // 2)
    assert w._plan.sm90_constexprs["BLOCK_N"] == config[0]


@pytest.mark.parametrize("block_n", [64, 128])
@pytest.mark.parametrize("page_size,layout,tuple_cache,head_dim", [
    (16, "NHD", False, 128), (16, "HND", False, 128), (8, "NHD", True, 128), (32, "HND", True, 64),
    (64, "NHD", False, 128), (128, "NHD", False, 64), (128, "HND", False, 128), (1, "NHD", False, 128),
    (24, "NHD", False, 128)])
def test_prefill_sm90_tma(block_n, page_size, layout, tuple_cache, head_dim, monkeypatch):
    """The Gluon prefill producer's bulk copies (prefill_sm90.tma_views): NHD and HND caches, the single tensor
    and the (k, v) tuple, pages smaller than, equal to and larger than a KV block, against the reference (the
    cache's unused slots hold NaN: the block holding a request's end must not be bulk-copied). Page sizes that
    are not a power of two of >= 8 tokens take the cp.async producer."""
    from pagoda.attention import runner

    cfg = dict(runner.SM90_LONG_CONFIG if block_n == 128 else runner.SM90_CONFIG, tma=1)
    for name in ("SM90_CONFIG", "SM90_LONG_CONFIG", "SM90_LONG_CONFIG_D64"):
        monkeypatch.setattr(runner, name, cfg)
    w = prefill_sm90_against_reference(True, head_dim, True, (16, 4), torch.bfloat16, monkeypatch,
                                       qo_lens=(700, 129, 1, 300, 64), kv_lens=(1000, 700, 64, 4100, 200),
                                       page_size=page_size, layout=layout, tuple_cache=tuple_cache)
    tma = page_size >= 8 and page_size & (page_size - 1) == 0
    assert (w._tma_cache[1] is not None) == tma
    if tma:
        assert w._tma_cache[1][0].block_shape == [min(page_size, block_n), head_dim]


@pytest.mark.parametrize("page_size,layout,tuple_cache", [(16, "NHD", False), (16, "HND", True), (64, "NHD", False),
                                                         (1, "NHD", False), (24, "HND", False)])
@pytest.mark.parametrize("causal", [True, False])
def test_prefill_sm90_head_dim_256(page_size, layout, tuple_cache, causal, monkeypatch):
    """head_dim 256 on the Gluon prefill kernel (runner.SM90_CONFIG_D256, plan CUDA_CONFIGS ("prefill-sm90", 256):
    128-row tiles, Q in shared memory, 32-token blocks on 4 stages): bulk copies and cp.async gathers (pages of 1
    and 24 tokens), and a plan that splits its tiles' KV (few tiles, long KV), whose merge sums the outputs in two
    column slices."""
    from pagoda.attention import runner

    w = prefill_sm90_against_reference(True, 256, causal, (16, 4), torch.bfloat16, monkeypatch, page_size=page_size,
                                       layout=layout, tuple_cache=tuple_cache)
    assert w._plan.sm90_constexprs["STAGES"] == runner.SM90_CONFIG_D256["stages"]
    assert w._plan.config.block_m == 128
    w = prefill_sm90_against_reference(True, 256, causal, (16, 4), torch.bfloat16, monkeypatch, qo_lens=(64, 1, 20),
                                       kv_lens=(8192, 3000, 5000), page_size=page_size, layout=layout,
                                       tuple_cache=tuple_cache)
    assert w._plan.work.partial_rows > 0, "the plan split no tile: the merge went untested"


@pytest.mark.parametrize("paged,page_size,head_dim", [(True, 16, 128), (False, 16, 128), (True, 16, 64),
                                                      (False, 16, 64), (True, 16, 256), (True, 1, 128),
                                                      (True, 24, 128), (True, 64, 256)])
@pytest.mark.parametrize("kw", [{"window_left": 0}, {"window_left": 300}, {"window_left": 2000},
                                {"logits_soft_cap": 30.0}, {"logits_soft_cap": 5.0, "window_left": 1000}])
def test_prefill_sm90_window_soft_cap(paged, page_size, head_dim, kw, monkeypatch):
    """Sliding windows and logits soft caps on the Gluon prefill kernel (SOFTCAP / WINDOW): against the float64
    oracle and the Triton kernel, causal, with a window of 0 (the diagonal only) to 2000; the items start where
    their first row's window does (mid-page), so with bulk copies their blocks start on the page below and the
    columns before the item are masked (KV_ALIGN); pages of 1 and 24 tokens take the gathers (no alignment).
    Then a plan that splits its tiles' windowed KV into chunks (few tiles, long KV), whose later chunks start
    mid-page too and must not count the columns of the chunk before them."""
    w = prefill_sm90_against_reference(paged, head_dim, True, (16, 4), torch.bfloat16, monkeypatch,
                                       page_size=page_size, **kw)
    assert w._plan.sm90_constexprs["WINDOW"] == ("window_left" in kw)
    assert w._plan.sm90_constexprs["SOFTCAP"] == ("logits_soft_cap" in kw)
    w = prefill_sm90_against_reference(paged, head_dim, True, (16, 4), torch.bfloat16, monkeypatch, qo_lens=(64, 1, 20),
                                       kv_lens=(8192, 3000, 5000), page_size=page_size, **kw)
    if kw.get("window_left", 10**9) >= 2000:
        assert w._plan.work.partial_rows > 0, "the plan split no tile: later chunks' starts went untested"


@pytest.mark.parametrize("paged,head_dim", [(True, 128), (False, 128), (True, 64), (False, 64)])
def test_prefill_sm90_long_items(paged, head_dim, monkeypatch):
    """A plan whose work items read >= SM90_LONG_KV KV tokens on average runs SM90_LONG_CONFIG (128-token blocks;
    head_dim 64: SM90_LONG_CONFIG_D64, Q in registers, 4 stages), a short one SM90_CONFIG; both against the
    reference. (The items are what the planner made: a few long tiles are split into shorter chunks to fill the
    SMs, so the long case has enough tiles not to be split.)"""
    from pagoda.attention import runner

    w = prefill_sm90_against_reference(paged, head_dim, True, (32, 8), torch.bfloat16, monkeypatch,
                                       qo_lens=[1024, 512, 33], kv_lens=[4096, 3000, 2500])
    long = runner.SM90_LONG_CONFIG if head_dim == 128 else runner.SM90_LONG_CONFIG_D64
    assert w._plan.sm90_constexprs["BLOCK_N"] == long["block_n"] == 128
    assert w._plan.sm90_constexprs["STAGES"] == long["stages"]
    w = prefill_sm90_against_reference(paged, head_dim, True, (32, 8), torch.bfloat16, monkeypatch,
                                       qo_lens=[512, 64], kv_lens=[512, 300])
    assert w._plan.sm90_constexprs["BLOCK_N"] == runner.SM90_CONFIG["block_n"] == 64


def prefill_sm90_against_reference(paged, head_dim, causal, heads, dtype, monkeypatch,
                                   qo_lens=(1000, 129, 1, 512, 77, 300), kv_lens=(1000, 700, 64, 4608, 77, 200),
                                   page_size=16, layout="NHD", tuple_cache=False, **kw):
    """test_prefill_sm90_kernel's check; returns the Gluon kernel's wrapper. kw: plan() arguments (window_left,
    logits_soft_cap)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon prefill kernel is for sm_90")
    hq, hk = heads
    qo_lens, kv_lens = list(qo_lens), list(kv_lens)
    qo_indptr = torch.tensor([0] + torch.tensor(qo_lens).cumsum(0).tolist(), dtype=torch.int32)
    batch = PagedBatch(kv_lens, hk, head_dim, page_size, dtype, layout=layout)
    cache = batch.tuple_cache() if tuple_cache else batch.cache
    q = torch.randn(int(qo_indptr[-1]), hq, head_dim, dtype=dtype, device="cuda")
    results = {}
    for kernel in ("auto", "triton"):
        monkeypatch.setenv("PAGODA_PREFILL_KERNEL", kernel)
        if paged:
            w = pagoda.BatchPrefillWithPagedKVCacheWrapper(workspace(128), kv_layout=layout)
            w.plan(qo_indptr, batch.indptr, batch.indices, batch.last_page_len, hq, hk, head_dim, page_size,
                   causal=causal, q_data_type=dtype, **kw)
            out, lse = poisoned_like(q)
            w.run(q, cache, out=out, lse=lse)
        else:
            kv_indptr = torch.tensor([0] + torch.tensor(kv_lens).cumsum(0).tolist(), dtype=torch.int32)
            w = pagoda.BatchPrefillWithRaggedKVCacheWrapper(workspace(128))
            w.plan(qo_indptr, kv_indptr, hq, hk, head_dim, causal=causal, q_data_type=dtype, **kw)
            out, lse = poisoned_like(q)
            w.run(q, torch.cat(batch.k), torch.cat(batch.v), out=out, lse=lse)
        assert w._plan.sm90 == (kernel == "auto"), "the plan did not pick the kernel under test"
        results[kernel] = (out, lse, w)
    ro, rl = oracle(q.cpu(), qo_indptr.tolist(), [k.cpu() for k in batch.k], [v.cpu() for v in batch.v],
                    causal=causal, **kw)
    for out, lse, _ in results.values():
        assert rel_err(out, ro) < TOL[dtype]
        check_lse(lse, rl)
    return results["auto"][2]
