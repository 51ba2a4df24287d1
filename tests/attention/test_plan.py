"""The planner: every (query row, visible KV position) is covered exactly once."""
import time

import numpy as np
import pytest

from pagoda.attention.plan import LATENCY_BOUND_TILES, KernelConfig, plan_work


def coverage(plan, qo_indptr, T):
    """Per query token: the set of KV positions some item covers for it, and the partial rows."""
    seen = {}
    for q_start, q_len, _, kv_s, kv_e, _, partial, _, req in plan.work:
        assert qo_indptr[req] <= q_start and q_start + q_len <= qo_indptr[req + 1], "item's request field"
        for t in range(q_len):
            seen.setdefault(q_start + t, []).append((kv_s, kv_e, partial))
    return seen


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window_left", [-1, 7])
@pytest.mark.parametrize("num_ctas", [1, 8, 132])
def test_plan_covers_each_visible_position_once(causal, window_left, num_ctas):
    rng = np.random.default_rng(0)
    qo_lens = rng.integers(0, 40, size=9)
    kv_lens = qo_lens + rng.integers(0, 300, size=9)
    qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)])
    cfg = KernelConfig(32, 16, 4, 2, 1, 4)
    plan = plan_work(qo_indptr, kv_lens, np.arange(9) * 1000, causal=causal, window_left=window_left,
                     config=cfg, tasks_per_item=2, num_ctas=num_ctas, max_partial_rows=10_000)
    seen = coverage(plan, qo_indptr, cfg.tokens_per_tile)
    assert sorted(seen) == list(range(qo_indptr[-1])), "every query row has an item"
    for b in range(9):
        for i in range(qo_lens[b]):
            row = qo_indptr[b] + i
            spans = sorted(seen[row])
            hi = i + kv_lens[b] - qo_lens[b] + 1 if causal else kv_lens[b]
            lo = max(0, i + kv_lens[b] - qo_lens[b] - window_left) if window_left >= 0 else 0
            covered = set()
            for s, e, _ in spans:
                assert not covered & set(range(s, e)), "overlapping chunks"
                covered |= set(range(s, e))
            visible = set(range(max(lo, 0), max(hi, 0)))
            assert visible <= covered, "a visible key is never attended"
            assert len(spans) == 1 or all(p >= 0 for _, _, p in spans), "split chunks go to partial rows"
    # split tiles: n_chunks items each, whose partial rows are first + c * q_len + t, all distinct
    rows = []
    for sid, (first, n_chunks) in enumerate(plan.splits):
        items = plan.work[plan.work[:, 7] == sid]
        assert len(items) == n_chunks
        q_len = items[0, 1]
        assert sorted(items[:, 6]) == [first + c * q_len for c in range(n_chunks)]
        rows += [p + t for p in items[:, 6] for t in range(q_len)]
    assert len(rows) == len(set(rows)) == plan.partial_rows
    assert np.all(plan.work[plan.work[:, 7] < 0, 6] == -1), "unsplit items write out directly"


def test_plan_splits_a_long_request_to_fill_the_gpu():
    cfg = KernelConfig(16, 64, 4, 3, 4, 4)
    plan = plan_work(np.array([0, 1]), np.array([32768]), np.array([0]), causal=False, window_left=-1,
                     config=cfg, tasks_per_item=8, num_ctas=528, max_partial_rows=100_000)
    assert len(plan.work) * 8 >= 264, f"only {len(plan.work)} items for 132 SMs"
    lengths = plan.work[:, 4] - plan.work[:, 3]
    assert lengths.sum() == 32768 and lengths.max() <= plan.chunk_len


def test_plan_balances_skewed_batch():
    """One 32k request among 63 of 512: the long one is split so no task dominates."""
    cfg = KernelConfig(16, 64, 4, 3, 4, 4)
    kv = np.array([32768] + [512] * 63)
    plan = plan_work(np.arange(65), kv, np.zeros(64, dtype=np.int64), causal=False, window_left=-1,
                     config=cfg, tasks_per_item=8, num_ctas=528, max_partial_rows=100_000)
    lengths = plan.work[:, 4] - plan.work[:, 3]
    per_cta = kv.sum() * 8 / 528
    assert lengths.max() <= 2 * per_cta, (lengths.max(), per_cta)
    assert np.all(np.diff(lengths) <= 0), "items are ordered longest first"


def test_plan_respects_partial_capacity():
    cfg = KernelConfig(16, 64, 4, 3, 4, 4)
    plan = plan_work(np.array([0, 1]), np.array([32768]), np.array([0]), causal=False, window_left=-1,
                     config=cfg, tasks_per_item=8, num_ctas=528, max_partial_rows=0)
    assert len(plan.work) == 1 and len(plan.splits) == 0


def test_plan_time_for_256_requests():
    """Host cost of a decode plan (reported; the bound is generous for slow CI machines)."""
    rng = np.random.default_rng(1)
    kv = rng.integers(128, 8192, size=256)
    cfg = KernelConfig(16, 64, 4, 3, 4, 4)
    args = dict(causal=False, window_left=-1, config=cfg, tasks_per_item=8, num_ctas=528,
                max_partial_rows=100_000)
    plan_work(np.arange(257), kv, np.zeros(256, dtype=np.int64), **args)
    t0 = time.perf_counter()
    for _ in range(20):
        plan_work(np.arange(257), kv, np.zeros(256, dtype=np.int64), **args)
    per = (time.perf_counter() - t0) / 20
    print(f"plan_work(256 requests): {per * 1e6:.0f} us")
    assert per < 5e-3


def test_plan_with_variant_kv_ranges_covers_only_the_visible_intervals():
    """A sink + window variant: each row's visible keys are covered exactly once, and the middle
    of a long sequence (neither sink nor window) is not planned at all."""
    import pagoda

    var = pagoda.variants.sink_window(16, 100)
    qo_lens = np.array([300, 1, 57])
    kv_lens = np.array([2000, 3000, 57])
    qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)])
    cfg = KernelConfig(32, 16, 4, 2, 1, 4)
    plan = plan_work(qo_indptr, kv_lens, np.zeros(3, dtype=np.int64), causal=True, window_left=-1, config=cfg,
                     tasks_per_item=2, num_ctas=8, max_partial_rows=100_000, kv_ranges=var.kv_ranges)
    seen = coverage(plan, qo_indptr, cfg.tokens_per_tile)
    for b in range(3):
        for i in range(qo_lens[b]):
            q = i + kv_lens[b] - qo_lens[b]
            covered = []
            for s, e, _ in seen[qo_indptr[b] + i]:
                covered.extend(range(s, e))
            assert len(covered) == len(set(covered)), "overlapping chunks"
            visible = {j for j in range(q + 1) if j < 16 or j >= q - 100}
            assert visible <= set(covered)
            assert len(covered) <= len(visible) + 2 * cfg.tokens_per_tile  # tile-wide window, nothing more
    planned = int((plan.work[:, 4] - plan.work[:, 3]).sum())
    assert planned < 0.2 * int(kv_lens[0] * qo_lens[0] / cfg.tokens_per_tile)


def test_plan_with_kv_ranges_falls_back_without_workspace():
    """Several intervals per tile need partial rows; with no room for them the plan covers each
    tile's whole range in one item (still exact: the kernel's mask decides)."""
    import pagoda

    var = pagoda.variants.sink_window(16, 100)
    cfg = KernelConfig(32, 16, 4, 2, 1, 4)
    qo_indptr, kv = np.array([0, 64]), np.array([1000])
    plan = plan_work(qo_indptr, kv, np.zeros(1, dtype=np.int64), causal=True, window_left=-1, config=cfg,
                     tasks_per_item=2, num_ctas=8, max_partial_rows=0, kv_ranges=var.kv_ranges)
    assert plan.partial_rows == 0 and np.all(plan.work[:, 6] == -1)
    assert np.all(plan.work[:, 3] == 0)  # from the first key: the whole causal range


@pytest.mark.parametrize("decode", [True, False])
def test_unsplit_fast_path_equals_general_path(decode):
    """Plans with no split chunk are built directly; the general path (forced here through kv_ranges that
    state each tile's whole range) must give the same work list."""
    rng = np.random.default_rng(2)
    kv = rng.integers(1, 3000, size=40)
    qo = np.ones(40, dtype=np.int64) if decode else np.minimum(rng.integers(1, 300, size=40), kv)
    qo_indptr = np.concatenate([[0], np.cumsum(qo)])
    cfg = KernelConfig(16, 64, 4, 3, 4, 4) if decode else KernelConfig(64, 32, 4, 3, 1, 4)
    args = dict(causal=not decode, window_left=-1, config=cfg, tasks_per_item=8, num_ctas=8, max_partial_rows=0)
    base = np.cumsum(kv) - kv
    fast = plan_work(qo_indptr, kv, base, **args)
    general = plan_work(qo_indptr, kv, base, kv_ranges=lambda q0, q1, n: [(0, n)], **args)
    assert len(fast.splits) == 0 and fast.partial_rows == 0
    np.testing.assert_array_equal(fast.work, general.work)


@pytest.mark.parametrize("window_left", [-1, 0, 700, 5000])
@pytest.mark.parametrize("num_ctas", [4, 132, 528])
def test_decode_path_equals_general_path(num_ctas, window_left):
    """Decode batches (split or not, with or without a window) are planned by _plan_decode; the general path
    (forced through kv_ranges that state each request's whole range) must give the same work list, split table
    and partial rows."""
    rng = np.random.default_rng(num_ctas)
    split_tiles = 0
    for kv in (rng.integers(1, 40000, size=7), np.array([32768] + [512] * 63), rng.integers(0, 3000, size=50)):
        qo_indptr = np.arange(len(kv) + 1)
        args = dict(causal=False, window_left=window_left, config=KernelConfig(16, 64, 4, 3, 4, 4), tasks_per_item=8,
                    num_ctas=num_ctas, max_partial_rows=100_000)
        base = rng.integers(0, 1000, size=len(kv))
        fast = plan_work(qo_indptr, kv, base, **args)
        general = plan_work(qo_indptr, kv, base, kv_ranges=lambda q0, q1, n: [(0, n)], **args)
        assert fast.chunk_len == general.chunk_len and fast.partial_rows == general.partial_rows
        np.testing.assert_array_equal(fast.work, general.work)
        np.testing.assert_array_equal(fast.splits, general.splits)
        split_tiles += len(fast.splits)
        if window_left >= 0:  # the items cover each request's window, from its first token
            lo = np.maximum(kv - window_left - 1, 0)
            firsts = {}
            for r, a in zip(fast.work[:, 8], fast.work[:, 3]):
                firsts[r] = min(firsts.get(r, a), a)
            assert [firsts[r] for r in range(len(kv))] == lo.tolist()
    assert split_tiles > 0 or window_left in (0, 700), "no case split: the split path went untested"


def _chunk_len_full_search(rng, tlen, config, tasks_per_item, num_ctas, max_partial_rows):
    """The cost model's search written plainly (every candidate, every tile): what _choose_chunk_len's
    candidate pruning and counting must reproduce exactly."""
    bn = config.block_n
    longest = int(max(rng, default=0))
    no_split = max(bn, -(-longest // bn) * bn)
    latency_bound = config.small_item_cost is not None and len(rng) <= LATENCY_BOUND_TILES
    cands, L = [], bn * (2 if latency_bound else 4)  # (a latency-bound batch may split into 2-block chunks)
    while L < no_split:
        cands.append(L)
        L *= 2
    cands.append(no_split)
    best, best_est = None, None
    item_cost = config.small_item_cost if latency_bound else config.item_cost
    for L in cands:
        n_chunks = [max(1, -(-int(x) // L)) for x in rng]
        rows = sum(c * (1 if tlen is None else int(t)) for c, t in zip(n_chunks, tlen if tlen is not None
                                                                         else [1] * len(rng)) if c > 1)
        total = tasks_per_item * (float(sum(int(x) for x in rng)) + sum(n_chunks) * item_cost
                                  + rows * config.partial_cost * config.heads_per_prog)
        est = total / num_ctas + min(L, longest) + item_cost
        if rows <= max_partial_rows and (best_est is None or est < best_est):
            best, best_est = L, est
    return best


def test_chunk_len_equals_full_search():
    from pagoda.attention.plan import _choose_chunk_len

    rng = np.random.default_rng(5)
    chosen = set()
    for trial in range(400):
        n = int(rng.integers(1, 200)) if trial % 5 else int(rng.integers(1, 12))  # some latency-bound batches
        kind = trial % 4
        if kind == 0:
            lens = rng.integers(0, 40000, n)
        elif kind == 1:
            lens = np.full(n, int(rng.integers(1, 9000)))
        elif kind == 2:  # one long request among short ones (the skewed case)
            lens = np.r_[rng.integers(1, 600, n - 1), rng.integers(1, 70000)]
        else:
            lens = rng.integers(0, 3000, n)
        cfg = KernelConfig(16, int(rng.choice([32, 64])), 4, 3, 4, 4, item_cost=int(rng.choice([32, 512, 2048])),
                           small_item_cost=[None, 512][trial % 2])
        tlen = None if trial % 3 else rng.integers(1, 17, n)
        args = (cfg, int(rng.choice([2, 8, 32])), int(rng.choice([3, 132, 528])),
                int(rng.choice([0, 100, 10**6])))
        got = _choose_chunk_len(lens.astype(np.int64), tlen, *args)
        assert got == _chunk_len_full_search(lens, tlen, *args), (trial, n, kind)
        if tlen is None:  # the decode planner's call, with the sorted lengths (a tighter candidate filter)
            neg_sorted = np.sort(-lens.astype(np.int64))
            assert _choose_chunk_len(lens.astype(np.int64), None, *args, neg_sorted) == got, (trial, n, kind)
        chosen.add(got >= int(lens.max()))
    assert chosen == {True, False}, "both split and unsplit answers must be exercised"


@pytest.mark.parametrize("num_ctas", [3, 528])
def test_one_query_flag_equals_detection(num_ctas):
    """The decode wrapper tells plan_work that every request has one query; the plan must be the one the
    general entry point finds by looking at qo_indptr."""
    rng = np.random.default_rng(num_ctas)
    kv = rng.integers(0, 20000, size=33)
    args = dict(causal=False, window_left=-1, config=KernelConfig(16, 32, 4, 3, 4, 4, item_cost=2048),
                tasks_per_item=8, num_ctas=num_ctas, max_partial_rows=100_000)
    base = rng.integers(0, 1000, size=33)
    a = plan_work(np.arange(34), kv, base, one_query=True, **args)
    b = plan_work(np.arange(34), kv, base, **args)
    np.testing.assert_array_equal(a.work, b.work)
    np.testing.assert_array_equal(a.splits, b.splits)


def test_small_decode_batches_equal_numpy_path(monkeypatch):
    """Decode batches of up to SMALL_BATCH requests are planned in plain Python; the NumPy path (forced by
    setting SMALL_BATCH to 0) must give the same work list, split table, partial rows and chunk length."""
    from pagoda.attention import plan as plan_mod

    rng = np.random.default_rng(11)
    small_batch = plan_mod.SMALL_BATCH
    seen_split = seen_unsplit = False
    for trial in range(300):
        n = int(rng.integers(1, small_batch + 1))
        kv = rng.integers(0, 40000, size=n) if trial % 3 else rng.integers(0, 3, size=n) * rng.integers(1, 9000)
        args = dict(causal=False, window_left=-1, tasks_per_item=int(rng.choice([2, 8, 32])),
                    config=KernelConfig(16, int(rng.choice([32, 64])), 4, 3, 4, 4, item_cost=int(rng.choice([32, 2048])),
                                        small_item_cost=[None, 512][trial % 2]),
                    num_ctas=int(rng.choice([3, 132, 528])), max_partial_rows=int(rng.choice([0, 5, 100_000])),
                    one_query=True)
        base = rng.integers(0, 1000, size=n)
        small = plan_work(np.arange(n + 1), kv, base, **args)
        monkeypatch.setattr(plan_mod, "SMALL_BATCH", 0)
        full = plan_work(np.arange(n + 1), kv, base, **args)
        monkeypatch.setattr(plan_mod, "SMALL_BATCH", small_batch)
        assert small.chunk_len == full.chunk_len and small.partial_rows == full.partial_rows, trial
        np.testing.assert_array_equal(small.work, full.work)
        np.testing.assert_array_equal(small.splits, full.splits)
        assert small.work.dtype == full.work.dtype and small.splits.shape == full.splits.shape
        seen_split |= len(full.splits) > 0
        seen_unsplit |= len(full.splits) == 0
    assert seen_split and seen_unsplit


def test_latency_bound_batches_use_their_item_cost():
    """A few decode requests are planned with small_item_cost (shorter chunks, more of them); past
    LATENCY_BOUND_TILES requests the tuned item_cost is back."""
    cfg = KernelConfig(16, 32, 4, 3, 4, 4, item_cost=2048)
    small = KernelConfig(16, 32, 4, 3, 4, 4, item_cost=2048, small_item_cost=512)
    args = dict(causal=False, window_left=-1, tasks_per_item=8, num_ctas=528, max_partial_rows=10**6,
                one_query=True)
    n = LATENCY_BOUND_TILES
    kv = np.full(n, 1024)
    # 8 x 1024 on 528 programs: 512-token chunks with the throughput cost, 256 with the latency-bound one
    assert plan_work(np.arange(n + 1), kv, np.zeros(n, dtype=np.int64), config=cfg, **args).chunk_len == 512
    assert plan_work(np.arange(n + 1), kv, np.zeros(n, dtype=np.int64), config=small, **args).chunk_len == 256
    kv = np.full(n + 1, 1024)
    assert (plan_work(np.arange(n + 2), kv, np.zeros(n + 1, dtype=np.int64), config=small, **args).chunk_len
            == plan_work(np.arange(n + 2), kv, np.zeros(n + 1, dtype=np.int64), config=cfg, **args).chunk_len)


def test_head_dim_256_latency_bound_chunks():
    """head_dim 256 decode on the Gluon kernel (one program per SM, 64-token blocks; Gemma-2-9B's 16 / 8 heads): a
    few requests take the latency-bound item cost, which picks the chunk lengths measured fastest (plan.py's
    SMALL_BATCH_ITEM_COST note, session 42), where the tuned item cost split 1 x 2048 into 4 chunks a KV head and 8 x
    1024 not at all."""
    from pagoda.attention import runner
    from pagoda.attention.plan import select_config

    cfg = runner._gluon_decode_config(select_config("decode", 256, 2, True), 2, 256)
    assert (cfg.block_n, cfg.ctas_per_sm, cfg.small_item_cost) == (64, 1, 512)
    args = dict(causal=False, window_left=-1, tasks_per_item=8, num_ctas=132, max_partial_rows=10**6, one_query=True)
    want = {(1, 1024): 128, (1, 2048): 256, (1, 4096): 256, (2, 1024): 256, (4, 1024): 256, (8, 1024): 512,
            (16, 1024): 1024}
    got = {(b, n): plan_work(np.arange(b + 1), np.full(b, n), np.zeros(b, dtype=np.int64), config=cfg,
                             **args).chunk_len for b, n in want}
    assert got == want


@pytest.mark.parametrize("hq,head_dim,want", [
    (32, 128, {(1, 1024): 128, (1, 2048): 128, (2, 1024): 128, (1, 4096): 128, (4, 1024): 128, (8, 1024): 256,
               (16, 1024): 512}),
    (16, 256, {(1, 1024): 128, (1, 2048): 128, (1, 4096): 256, (2, 1024): 128, (4, 1024): 256, (8, 1024): 256,
               (16, 1024): 1024})])
def test_fp8_latency_bound_chunks(hq, head_dim, want):
    """Decode over an fp8 cache (the Gluon fp8 kernel's configs: 4 / 2 programs per SM at head_dim 128 / 256): a few
    requests take the latency-bound item cost, which picks the chunk lengths measured fastest (plan.py's
    SMALL_BATCH_ITEM_COST note, session 43: 1 x 1024 in 128-token chunks 10.2 us against the tuned cost's 256, 12.1);
    16 requests are past LATENCY_BOUND_TILES and keep the tuned cost's chunks."""
    from pagoda.attention import runner
    from pagoda.attention.plan import select_config

    cfg = runner._gluon_decode_config(select_config("decode", head_dim, hq // 8, True, 1), 1, head_dim)
    assert cfg.small_item_cost == 512 and cfg.item_cost == 2048
    args = dict(causal=False, window_left=-1, tasks_per_item=8, num_ctas=132 * cfg.ctas_per_sm,
                max_partial_rows=10**6, one_query=True)
    got = {(b, n): plan_work(np.arange(b + 1), np.full(b, n), np.zeros(b, dtype=np.int64), config=cfg,
                             **args).chunk_len for b, n in want}
    assert got == want


@pytest.mark.parametrize("group,rows", [(1, 8), (4, 8), (8, 8), (16, 16)])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_gluon_decode_config_rows(group, rows, head_dim):
    """The Gluon decode kernel's tile is the group's query heads (the wgmma's N), at least 8 rows, whatever the
    Triton decode config's minimum (16); its KV block, programs per SM and register cap come from
    runner.DECODE_GLUON_CONFIG per KV element size, or DECODE_GLUON_CONFIG_BY_HEAD_DIM where it names the element
    size and head_dim (16-bit head_dim 64: 4 programs per SM), and the same config gives the same object (stable
    grid)."""
    from pagoda.attention import runner
    from pagoda.attention.plan import select_config

    base = select_config("decode", head_dim, group, True)
    for kv_bytes in (1, 2):
        cfg = runner._gluon_decode_config(base, kv_bytes, head_dim)
        want = runner.DECODE_GLUON_CONFIG_BY_HEAD_DIM.get((kv_bytes, head_dim), runner.DECODE_GLUON_CONFIG[kv_bytes])
        assert (cfg.block_m, cfg.heads_per_prog, cfg.block_n) == (rows, group, want["block_n"])
        assert (cfg.num_stages, cfg.ctas_per_sm, cfg.maxnreg) == (want["stages"], want["ctas_per_sm"], want["maxnreg"])
        assert cfg.tokens_per_tile == rows // group
        assert runner._gluon_decode_config(base, kv_bytes, head_dim) is cfg
    if head_dim == 64:
        assert runner._gluon_decode_config(base, 2, 64).ctas_per_sm == 4
        assert runner._gluon_decode_config(base, 2, 64).maxnreg == 128
    if head_dim == 256:  # 64 KB a stage (16-bit): one program per SM, no register cap under the hardware's
        assert runner._gluon_decode_config(base, 2, 256).ctas_per_sm == 1
        assert runner._gluon_decode_config(base, 2, 256).maxnreg is None


def test_prefill_band_threshold():
    """plan.prefill_band: no band while the longest item's KV over all heads fits PREFILL_L2_BYTES, else
    num_ctas / 2 items per head split (a round of tasks then reads about two KV heads); force bands anyway."""
    from pagoda.attention.plan import PREFILL_L2_BYTES, prefill_band

    assert prefill_band(PREFILL_L2_BYTES, 132, 1) == 0
    assert prefill_band(PREFILL_L2_BYTES + 1, 132, 1) == 66
    assert prefill_band(PREFILL_L2_BYTES + 1, 132, 2) == 33
    assert prefill_band(1, 132, 1, force=True) == 66
    assert prefill_band(10**12, 1, 1) == 1


@pytest.mark.parametrize("graph", [False, True])
def test_gluon_prefill_plan_choices(graph, monkeypatch):
    """What a plan for the Gluon prefill kernel chooses (on the CPU, with the kernel's eligibility forced; only
    plan() runs): long items (>= SM90_LONG_KV KV tokens on average) take SM90_LONG_CONFIG, short ones SM90_CONFIG;
    the band goes into the plan buffer's header (field BAND_AT) when the KV of all heads exceeds L2's share; a
    CUDA-graph wrapper keeps its first plan's configuration (a captured run() replays that kernel)."""
    import torch

    import pagoda
    from pagoda.attention import runner
    from pagoda.attention.kernels.attention import BAND_AT

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(runner.BatchAttention, "_sm90_eligible", lambda self, *a: True)
    monkeypatch.setattr(runner, "num_programs", lambda device, cfg: 132)
    w = pagoda.BatchPrefillWithPagedKVCacheWrapper(torch.empty(64 << 20, dtype=torch.uint8), backend="triton",
                                                   use_cuda_graph=graph)

    def plan(qo_lens, kv_lens, head_dim=128):
        pages = [-(-n // 16) for n in kv_lens]
        indptr = torch.tensor([0] + np.cumsum(pages).tolist(), dtype=torch.int32)
        last = torch.tensor([(n - 1) % 16 + 1 for n in kv_lens], dtype=torch.int32)
        qo = torch.tensor([0] + np.cumsum(qo_lens).tolist(), dtype=torch.int32)
        w.plan(qo, indptr, torch.randperm(int(indptr[-1]), dtype=torch.int32), last, 32, 8, head_dim, 16,
               causal=True, q_data_type=torch.bfloat16)
        work = w._plan.work.work
        return float((work[:, 4] - work[:, 3]).mean()), w._plan.sm90_constexprs["BLOCK_N"], int(w._counters[BAND_AT])

    mean, block_n, band = plan([16384], [16384])  # 64 MB of KV over 8 heads: banded, long items
    assert mean >= runner.SM90_LONG_KV and block_n == runner.SM90_LONG_CONFIG["block_n"] == 128 and band == 66
    assert w._plan.sm90_constexprs["Q_SMEM"] == bool(runner.SM90_LONG_CONFIG["q_smem"])
    if not graph:  # head_dim 64's long configuration: Q in registers, 4 stages
        plan([16384], [16384], head_dim=64)
        assert (w._plan.sm90_constexprs["BLOCK_N"], w._plan.sm90_constexprs["STAGES"],
                w._plan.sm90_constexprs["Q_SMEM"]) == (128, runner.SM90_LONG_CONFIG_D64["stages"], False)
        plan([16384], [16384])  # (back to head_dim 128)
    mean, block_n, band = plan([64] * 4, [256] * 4)
    assert mean < runner.SM90_LONG_KV and band == 0
    assert block_n == (128 if graph else runner.SM90_CONFIG["block_n"])
    monkeypatch.setattr(runner, "PREFILL_BAND", "sometimes")
    with pytest.raises(ValueError, match="PAGODA_PREFILL_BAND"):
        plan([64], [256])
    monkeypatch.setattr(runner, "PREFILL_BAND", "auto")
    if not graph:  # head_dim 64: its KV over all heads is half as large: 32 MB at 16k fits PREFILL_L2_BYTES (no
        # band), 64 MB at 32k does not
        mean, block_n, band = plan([16384], [16384], head_dim=64)
        assert mean >= runner.SM90_LONG_KV and block_n == 128 and band == 0
        assert plan([16384], [32768], head_dim=64)[1:] == (128, 66)


def test_check_qo_indptr_finds_one_query_batches():
    """formats.check_qo_indptr: lengths and the one-query flag from one pass (all lengths >= 1 summing to the
    request count), and check_indptr's errors."""
    import torch

    from pagoda.attention.formats import check_qo_indptr

    many = list(range(12))  # (past formats.SMALL_INDPTR: the NumPy path; the others the Python one)
    for qo, one in (([0, 1, 2, 3], True), ([5, 6, 7], True), ([0, 0, 2, 3], False), ([0, 2, 3, 4], False),
                    ([0, 1, 1, 3], False), ([0], False), ([0, 3], False), (many, True), (many[:-1] + [12], False),
                    ([0] + many[2:], False)):
        arr, lens, got = check_qo_indptr("qo_indptr", torch.tensor(qo, dtype=torch.int32))
        assert got == one and arr.dtype == np.int64 and arr.tolist() == qo, qo
        assert lens.tolist() == np.diff(qo).tolist()
    for form in (list, lambda x: torch.tensor(x, dtype=torch.int32)):
        with pytest.raises(ValueError, match="qo_indptr must be non-decreasing"):
            check_qo_indptr("qo_indptr", form([0, 2, 1]))
        with pytest.raises(ValueError, match="non-negative"):
            check_qo_indptr("qo_indptr", form([-1, 0, 1]))
        with pytest.raises(ValueError, match="qo_indptr must be non-decreasing"):
            check_qo_indptr("qo_indptr", form(many[:5] + [3] + many[6:]))


def test_wrapper_keeps_its_config_choice_only_while_its_key_repeats(monkeypatch):
    """A wrapper reuses its last kernel configuration choice while the kernel key and the long-decode class
    (plan.LONG_DECODE_KV, select_config's only use of the lengths) repeat: across batches that cross that class,
    head counts or dtypes, each plan's configuration is the one a fresh wrapper picks (the CUDA table, as a GPU
    host would choose)."""
    import torch

    import pagoda
    from pagoda.attention import plan as plan_mod, runner

    select = runner.select_config
    monkeypatch.setattr(runner, "select_config", lambda mode, hd, g, on_cuda, *a: select(mode, hd, g, True, *a))
    ws = torch.empty(1 << 20, dtype=torch.uint8)

    def plan(w, lens, heads=(32, 8), dtype=torch.bfloat16):
        pages = [-(-n // 16) for n in lens]
        indptr = torch.tensor(np.concatenate([[0], np.cumsum(pages)]), dtype=torch.int32)
        last = torch.tensor([(n - 1) % 16 + 1 for n in lens], dtype=torch.int32)
        w.plan(indptr, torch.arange(int(indptr[-1]), dtype=torch.int32), last, *heads, 128, 16, q_data_type=dtype)
        return w._plan.config

    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(ws, backend="triton")
    long = plan_mod.LONG_DECODE_KV
    seen = set()
    for lens, heads, dtype in (([100] * 4, (32, 8), torch.bfloat16), ([long] * 2, (32, 8), torch.bfloat16),
                               ([long - 1] * 2, (32, 8), torch.bfloat16), ([long, long - 1], (32, 8), torch.bfloat16),
                               ([2 * long, 1], (32, 8), torch.bfloat16), ([100] * 4, (32, 4), torch.bfloat16),
                               ([100] * 4, (32, 4), torch.float16), ([long] * 2, (32, 8), torch.bfloat16)):
        got = plan(w, lens, heads, dtype)
        want = plan(pagoda.BatchDecodeWithPagedKVCacheWrapper(ws, backend="triton"), lens, heads, dtype)
        assert got is want, (lens, heads, dtype)
        seen.add((got.block_n, got.num_stages, got.heads_per_prog))
    assert len(seen) >= 3  # the long and the short decode configurations, and another group's


@pytest.mark.parametrize("ctas", [3, 4])
def test_balanced_grid(ctas):
    """runner.balanced_grid: the fewest programs per SM (2 .. ctas) taking the tasks in as many rounds as the whole
    grid, against a brute-force search over task counts; the measured cases of its docstring (132 SMs, 3 a SM)."""
    from pagoda.attention.runner import balanced_grid

    sms = 132
    grid = sms * ctas
    for tasks in range(1, 4 * grid):
        got = balanced_grid(tasks, grid, ctas)
        rounds = -(-tasks // grid)
        want = min([sms * k for k in range(2, ctas + 1) if -(-tasks // (sms * k)) == rounds])
        assert got == want, (tasks, got, want)
        assert got % sms == 0 and 2 * sms <= got <= grid and -(-tasks // got) == rounds
    if ctas == 3:
        assert balanced_grid(512, 396, 3) == 264  # 64 x 2048, 32 x 8192
        assert balanced_grid(1024, 396, 3) == 396 and balanced_grid(2048, 396, 3) == 396  # 128 x 1024, 256 x 512
        assert balanced_grid(760, 396, 3) == 396  # the skewed case
    # a grid that is not whole SMs of ctas programs (the interpreter's 3 programs) stays as it is
    assert balanced_grid(4, 3, 4) == 3 and balanced_grid(100, 2 * ctas + 1, ctas) == 2 * ctas + 1


@pytest.mark.parametrize("eligible", [True, False])
def test_head_dim_256_prefill_tiles_follow_the_kernel(eligible, monkeypatch):
    """A head_dim 256 prefill plan takes the Gluon prefill kernel's tiles (CUDA_CONFIGS ("prefill-sm90", 256): 128
    rows, its two consumer warp groups' 64 each) and runner.SM90_CONFIG_D256 where that kernel serves it, and the
    Triton kernel's 64-row tiles where not (the CUDA tables as a GPU host would choose; the kernel's eligibility
    stood in for)."""
    import torch

    import pagoda
    from pagoda.attention import runner

    select = runner.select_config
    monkeypatch.setattr(runner, "select_config", lambda mode, hd, g, on_cuda, *a: select(mode, hd, g, True, *a))
    monkeypatch.setattr(runner.BatchAttention, "_sm90_eligible", lambda self, *a: eligible)
    w = pagoda.BatchPrefillWithPagedKVCacheWrapper(torch.empty(1 << 22, dtype=torch.uint8), backend="triton")
    qo = torch.tensor([0, 300, 301], dtype=torch.int32)
    kv_lens = [300, 1000]
    pages = [-(-n // 16) for n in kv_lens]
    indptr = torch.tensor(np.concatenate([[0], np.cumsum(pages)]), dtype=torch.int32)
    last = torch.tensor([(n - 1) % 16 + 1 for n in kv_lens], dtype=torch.int32)
    w.plan(qo, indptr, torch.arange(int(indptr[-1]), dtype=torch.int32), last, 16, 4, 256, 16, causal=True,
           q_data_type=torch.bfloat16)
    cfg = w._plan.config
    assert cfg.block_m == (128 if eligible else 64)
    assert cfg.heads_per_prog == 4 and cfg.tokens_per_tile == cfg.block_m // 4
    if eligible:
        sm90 = w._plan.sm90_constexprs
        want = runner.SM90_CONFIG_D256
        assert (sm90["BLOCK_M"], sm90["BLOCK_N"], sm90["STAGES"], sm90["Q_SMEM"]) == (
            128, want["block_n"], want["stages"], bool(want["q_smem"]))
        assert (sm90["CONSUMER_REGS"], sm90["PRODUCER_REGS"]) == (want["consumer_regs"], want["producer_regs"])
    else:
        assert w._plan.sm90_constexprs is None


@pytest.mark.parametrize("kw", [{}, {"window_left": 300}, {"logits_soft_cap": 30.0},
                                {"window_left": 0, "logits_soft_cap": 5.0}])
def test_gluon_kernels_take_windows_and_soft_caps(kw, monkeypatch):
    """Windowed and soft-capped plans run on the Gluon kernels (prefill and decode) where those serve the plan,
    with the kernels' WINDOW / SOFTCAP switches set from the plan and the scalars they read (cap * log2(e),
    window_left; qk_scale = sm_scale / cap under a cap, kernels/attention.py's convention) in the launch's
    arguments (on the CPU, the kernels' eligibility stood in for; only plan() runs)."""
    import math

    import torch

    import pagoda
    from pagoda.attention import runner

    monkeypatch.setattr(runner.BatchAttention, "_sm90_eligible", lambda self, *a: True)
    monkeypatch.setattr(runner.BatchAttention, "_decode_gluon_eligible", lambda self, *a: True)
    kv_lens = [300, 1000]
    pages = [-(-n // 16) for n in kv_lens]
    indptr = torch.tensor(np.concatenate([[0], np.cumsum(pages)]), dtype=torch.int32)
    last = torch.tensor([(n - 1) % 16 + 1 for n in kv_lens], dtype=torch.int32)
    ws = torch.empty(1 << 22, dtype=torch.uint8)
    cap, window = kw.get("logits_soft_cap", 0.0), kw.get("window_left", -1)
    w = pagoda.BatchPrefillWithPagedKVCacheWrapper(ws, backend="triton")
    w.plan(torch.tensor([0, 300, 301], dtype=torch.int32), indptr, torch.arange(int(indptr[-1]), dtype=torch.int32),
           last, 16, 4, 128, 16, causal=True, q_data_type=torch.bfloat16, **kw)
    sm90 = w._plan.sm90_constexprs
    assert (sm90["WINDOW"], sm90["SOFTCAP"]) == (window >= 0, cap > 0)
    sm_scale = 1 / math.sqrt(128)
    scalars = w._plan.scalars
    assert scalars[6] == pytest.approx(sm_scale / cap if cap else sm_scale * math.log2(math.e))
    assert scalars[7:9] == (pytest.approx(cap * math.log2(math.e)), window)
    d = pagoda.BatchDecodeWithPagedKVCacheWrapper(ws, backend="triton")
    d.plan(indptr, torch.arange(int(indptr[-1]), dtype=torch.int32), last, 16, 4, 128, 16,
           q_data_type=torch.bfloat16, **kw)
    assert d._plan.decode_sm90_constexprs["SOFTCAP"] == (cap > 0)
    assert d._plan.scalars[7] == pytest.approx(cap * math.log2(math.e))
    # a window is the decode items' KV range (the kernel reads no window): a request's chunks cover its last
    # window_left + 1 tokens once
    work = d._plan.work.work
    for r, n in enumerate(kv_lens):
        mine = work[work[:, 8] == r]
        lo = max(0, n - 1 - window) if window >= 0 else 0
        assert (mine[:, 3].min(), mine[:, 4].max(), int((mine[:, 4] - mine[:, 3]).sum())) == (lo, n, n - lo)


@pytest.mark.parametrize("graph", [False, True])
def test_window_that_cuts_nothing_is_dropped(graph, monkeypatch):
    """A window no request's KV reaches past (kv_len <= window_left + 1 for all) is planned and run as none by an
    eager wrapper (no window masks compiled in) with the same result as the
    reference with the window; a window that cuts one request is kept, and a CUDA-graph wrapper keeps its window
    whatever the lengths (its captured kernel must serve later plans)."""
    import torch

    import pagoda
    from pagoda.attention import reference

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    hq, hk, d = 4, 2, 64
    kv_lens = [40, 17]
    ks = [torch.randn(n, hk, d, dtype=torch.bfloat16) for n in kv_lens]
    vs = [torch.randn(n, hk, d, dtype=torch.bfloat16) for n in kv_lens]
    q = torch.randn(len(kv_lens), hq, d, dtype=torch.bfloat16)
    kv_indptr = torch.tensor([0, 40, 57], dtype=torch.int32)
    for window, cuts in ((39, False), (100, False), (38, True), (5, True)):
        w = pagoda.BatchPrefillWithRaggedKVCacheWrapper(torch.empty(1 << 22, dtype=torch.uint8), backend="triton",
                                                        use_cuda_graph=graph)
        qo = torch.arange(3, dtype=torch.int32)
        w.plan(qo, kv_indptr, hq, hk, d, causal=True, q_data_type=torch.bfloat16, window_left=window)
        assert w._plan.window_left == (window if cuts or graph else -1)
        assert w._plan.constexprs["WINDOW"] == (cuts or graph)
        out = torch.full_like(q, float("nan"))
        w.run(q, torch.cat(ks), torch.cat(vs), out=out)
        for b in range(2):
            ro, _ = reference.attention(q[b:b + 1].double(), ks[b].double(), vs[b].double(), causal=True,
                                        window_left=window, compute_dtype=torch.float64, out_dtype=torch.float64)
            err = ((out[b:b + 1].double() - ro).norm() / ro.norm()).item()
            assert err < 1e-2, (window, b, err)
