"""Multi-level cascade attention equals flat attention over the concatenated KV."""
import pytest
import torch

import pagoda
from pagoda.attention import reference

from ..conftest import DEVICE
from .helpers import TOL, check_lse, poisoned_like, rel_err, workspace


class PagePool:
    """A page pool holding token blocks; unused slots are NaN so stray reads show."""

    def __init__(self, num_pages, page_size, heads, dim, dtype):
        self.ps = page_size
        self.cache = torch.full((num_pages, 2, page_size, heads, dim), float("nan"), dtype=dtype, device=DEVICE)
        self.free = list(torch.randperm(num_pages).tolist())

    def store(self, k, v):
        """Writes k/v [n, heads, dim] into fresh pages; returns (page ids, last_page_len)."""
        pages = []
        for s in range(0, k.shape[0], self.ps):
            p = self.free.pop()
            e = min(k.shape[0], s + self.ps)
            self.cache[p, 0, :e - s] = k[s:e]
            self.cache[p, 1, :e - s] = v[s:e]
            pages.append(p)
        last = (k.shape[0] - 1) % self.ps + 1 if k.shape[0] else self.ps
        return pages, last


def kv(n, heads, dim, dtype):
    return (torch.randn(n, heads, dim, dtype=dtype, device=DEVICE),
            torch.randn(n, heads, dim, dtype=dtype, device=DEVICE))


def level(groups, pool):
    """groups: list of (k, v) per group -> (kv_indptr, kv_indices, last_page_len)."""
    indptr, indices, last = [0], [], []
    for k, v in groups:
        pages, lp = pool.store(k, v)
        indices += pages
        indptr.append(len(indices))
        last.append(lp)
    t = lambda a: torch.tensor(a, dtype=torch.int32)  # noqa: E731
    return t(indptr), t(indices), t(last)


@pytest.mark.parametrize("heads", [(8, 2), (4, 4)])
@pytest.mark.parametrize("prefix_len", [21, 24])  # ends mid-page / on a page boundary (page_size 8)
@pytest.mark.parametrize("qo_len,causal", [(1, False), (3, True)])
def test_two_levels(heads, prefix_len, qo_len, causal):
    hq, hk, d, ps, dtype = heads[0], heads[1], 64, 8, torch.bfloat16
    pool = PagePool(64, ps, hk, d, dtype)
    prefix = kv(prefix_len, hk, d, dtype)
    suffix_lens = [0, 7, 16] if qo_len == 1 else [3, 7, 16]  # empty suffix only where no query sits there
    suffixes = [kv(n, hk, d, dtype) for n in suffix_lens]
    l0, l1 = level([prefix], pool), level(suffixes, pool)
    b = len(suffix_lens)
    qo_group = torch.tensor([0, b * qo_len], dtype=torch.int32)
    qo_req = torch.arange(0, b * qo_len + 1, qo_len, dtype=torch.int32)
    w = pagoda.MultiLevelCascadeAttentionWrapper(2, workspace(), "NHD", backend="triton")
    w.plan([qo_group, qo_req], [l0[0], l1[0]], [l0[1], l1[1]], [l0[2], l1[2]], hq, hk, d, ps, causal=causal,
           q_data_type=dtype)
    q = torch.randn(b * qo_len, hq, d, dtype=dtype, device=DEVICE)
    out, lse = poisoned_like(q)
    w.run(q, pool.cache, out=out, lse=lse, return_lse=True)
    for r in range(b):
        k = torch.cat([prefix[0], suffixes[r][0]])
        v = torch.cat([prefix[1], suffixes[r][1]])
        rows = slice(r * qo_len, (r + 1) * qo_len)
        ro, rl = reference.attention(q[rows], k, v, causal=causal, compute_dtype=torch.float64,
                                     out_dtype=torch.float64)
        assert rel_err(out[rows], ro) < TOL[dtype]
        check_lse(lse[rows], rl)


def test_three_levels():
    hq, hk, d, ps, dtype = 8, 2, 64, 4, torch.float16
    pool = PagePool(64, ps, hk, d, dtype)
    top = kv(10, hk, d, dtype)                      # all 4 requests
    mid = [kv(6, hk, d, dtype), kv(9, hk, d, dtype)]  # requests {0,1} and {2,3}
    own = [kv(n, hk, d, dtype) for n in (5, 1, 0, 12)]
    levels = [level([top], pool), level(mid, pool), level(own, pool)]
    qo = [torch.tensor(x, dtype=torch.int32) for x in ([0, 4], [0, 2, 4], [0, 1, 2, 3, 4])]
    w = pagoda.MultiLevelCascadeAttentionWrapper(3, workspace(), backend="triton")
    w.plan(qo, [l[0] for l in levels], [l[1] for l in levels], [l[2] for l in levels], hq, hk, d, ps,
           q_data_type=dtype)
    q = torch.randn(4, hq, d, dtype=dtype, device=DEVICE)
    out = w.run(q, pool.cache)
    for r in range(4):
        parts = [top, mid[r // 2], own[r]]
        k = torch.cat([p[0] for p in parts])
        v = torch.cat([p[1] for p in parts])
        ro, _ = reference.attention(q[r:r + 1], k, v, compute_dtype=torch.float64, out_dtype=torch.float64)
        assert rel_err(out[r:r + 1], ro) < TOL[dtype]


def test_levels_from_page_table_match_flat_decode():
    """A prefix-cached batch: requests 0-2 share 3 pages, 3-4 share 2, 5 shares nothing."""
    hq, hk, d, ps, dtype = 8, 2, 64, 4, torch.bfloat16
    pool = PagePool(80, ps, hk, d, dtype)
    shared_a, _ = pool.store(*kv(12, hk, d, dtype))
    shared_b, _ = pool.store(*kv(8, hk, d, dtype))
    tables, lasts = [], []
    for shared, tail in ((shared_a, 5), (shared_a, 4), (shared_a, 1), (shared_b, 9), (shared_b, 3), ([], 6)):
        pages, lp = pool.store(*kv(tail, hk, d, dtype))
        tables.append(shared + pages)
        lasts.append(lp)
    indptr = torch.tensor([0] + torch.tensor([len(t) for t in tables]).cumsum(0).tolist(), dtype=torch.int32)
    indices = torch.tensor(sum(tables, []), dtype=torch.int32)
    last = torch.tensor(lasts, dtype=torch.int32)
    levels = pagoda.cascade_levels_from_page_table(indptr, indices, last, ps)
    assert levels["qo_indptr_arr"][0].tolist() == [0, 3, 5, 6]
    assert levels["paged_kv_indptr_arr"][0].tolist() == [0, 3, 5, 5]
    q = torch.randn(6, hq, d, dtype=dtype, device=DEVICE)
    flat = pagoda.BatchDecodeWithPagedKVCacheWrapper(workspace(), backend="triton")
    flat.plan(indptr, indices, last, hq, hk, d, ps, q_data_type=dtype)
    ref, ref_lse = flat.run(q, pool.cache, return_lse=True)
    w = pagoda.MultiLevelCascadeAttentionWrapper(2, workspace(), backend="triton")
    w.plan(**levels, num_qo_heads=hq, num_kv_heads=hk, head_dim=d, page_size=ps, q_data_type=dtype)
    out, lse = w.run(q, pool.cache, return_lse=True)
    assert rel_err(out, ref) < TOL[dtype]
    check_lse(lse, ref_lse)


def test_cascade_bad_input():
    w = pagoda.MultiLevelCascadeAttentionWrapper(2, workspace(1), backend="triton")
    one = torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="qo_indptr_arr must be a list of num_levels"):
        w.plan([one], [one, one], [one, one], [one, one], 4, 2, 64, 4)
    with pytest.raises(ValueError, match="covers 2 queries"):
        w.plan([one, torch.tensor([0, 2], dtype=torch.int32)], [one, one], [one, one], [one, one], 4, 2, 64, 4)
    with pytest.raises(ValueError, match="num_levels"):
        pagoda.MultiLevelCascadeAttentionWrapper(0, workspace(1))


@pytest.mark.parametrize("suffix_lens", [[0, 5, 9], [5, 600]])  # short / long enough to split (3 programs)
def test_levels_merge_in_the_kernel_epilogue(monkeypatch, suffix_lens):
    """Levels after the first merge into (out, lse) in the attention kernel's epilogue (unsplit tiles) or in
    the split tiles' merge: no merge_state_in_place call, and the answer equals flat attention and the
    separate-merge path, for empty, short and split suffixes."""
    from pagoda.attention import cascade as cascade_mod

    hq, hk, d, ps, dtype = 8, 2, 64, 4, torch.bfloat16
    pool = PagePool(200, ps, hk, d, dtype)
    prefix = kv(22, hk, d, dtype)
    suffixes = [kv(n, hk, d, dtype) for n in suffix_lens]
    l0, l1 = level([prefix], pool), level(suffixes, pool)
    b = len(suffix_lens)
    q = torch.randn(b, hq, d, dtype=dtype, device=DEVICE)
    levels = dict(qo_indptr_arr=[torch.tensor([0, b], dtype=torch.int32), torch.arange(b + 1, dtype=torch.int32)],
                  paged_kv_indptr_arr=[l0[0], l1[0]], paged_kv_indices_arr=[l0[1], l1[1]],
                  paged_kv_last_page_len=[l0[2], l1[2]])
    w = pagoda.MultiLevelCascadeAttentionWrapper(2, workspace(), backend="triton")
    w.plan(**levels, num_qo_heads=hq, num_kv_heads=hk, head_dim=d, page_size=ps, q_data_type=dtype)
    assert w._levels[1]._can_merge_into_out() and w._levels[1]._merge_out
    assert (len(w._levels[1]._plan.work.splits) > 0) == (max(suffix_lens) > 300), "split coverage as intended"

    def no_merge(*a, **k):
        raise AssertionError("the fused path should not call merge_state_in_place")
    monkeypatch.setattr(cascade_mod, "merge_state_in_place", no_merge)
    out, lse = poisoned_like(q)
    w.run(q, pool.cache, out=out, lse=lse, return_lse=True)
    monkeypatch.undo()
    for r in range(b):
        k = torch.cat([prefix[0], suffixes[r][0]])
        v = torch.cat([prefix[1], suffixes[r][1]])
        ro, rl = reference.attention(q[r:r + 1], k, v, compute_dtype=torch.float64, out_dtype=torch.float64)
        assert rel_err(out[r:r + 1], ro) < TOL[dtype]
        check_lse(lse[r:r + 1], rl)
    # the separate-merge path (what the sm_90 / reference plans take) gives the same answer
    monkeypatch.setattr(type(w._levels[1]), "_can_merge_into_out", lambda self: False)
    w.plan(**levels, num_qo_heads=hq, num_kv_heads=hk, head_dim=d, page_size=ps, q_data_type=dtype)
    assert not w._levels[1]._merge_out
    out2, lse2 = w.run(q, pool.cache, return_lse=True)
    assert rel_err(out2, out) < TOL[dtype]
    check_lse(lse2, lse)
