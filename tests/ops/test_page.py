import pytest
import torch

import pagoda
from pagoda.attention import reference

from ..conftest import DEVICE


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("page_size", [1, 5, 16])
@pytest.mark.parametrize("form", ["tensor", "tuple"])
def test_append_then_attend(layout, page_size, form):
    """Append new tokens to requests of different lengths; the cache then holds old + new KV."""
    hk, d, dtype = 2, 64, torch.bfloat16
    old = [3, 0, 17]
    new = [4, 6, 1]
    total = [o + n for o, n in zip(old, new)]
    pages = [-(-t // page_size) for t in total]
    n_pages = sum(pages) + 2
    perm = torch.randperm(n_pages).to(torch.int32)
    indices = perm[: sum(pages)]
    indptr = torch.tensor([0] + torch.tensor(pages).cumsum(0).tolist(), dtype=torch.int32)
    last = torch.tensor([(t - 1) % page_size + 1 for t in total], dtype=torch.int32)
    shape = (n_pages, 2, page_size, hk, d) if layout == "NHD" else (n_pages, 2, hk, page_size, d)
    cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    full_k = [torch.randn(t, hk, d, dtype=dtype, device=DEVICE) for t in total]
    full_v = [torch.randn(t, hk, d, dtype=dtype, device=DEVICE) for t in total]
    kc, vc = (cache[:, 0], cache[:, 1])
    # write the old tokens through the op too (positions 0..old-1), then the new ones
    for part in ("old", "new"):
        lens = old if part == "old" else new
        append_indptr = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
        seq_lens = torch.tensor(old if part == "old" else total, dtype=torch.int32)
        nnz = sum(lens)
        b, p = pagoda.get_batch_indices_positions(append_indptr, seq_lens, nnz)
        sl = [slice(0, o) if part == "old" else slice(o, t) for o, t in zip(old, total)]
        k = torch.cat([full_k[r][sl[r]] for r in range(3)])
        v = torch.cat([full_v[r][sl[r]] for r in range(3)])
        target = cache if form == "tensor" else (kc, vc)
        pagoda.append_paged_kv_cache(k, v, b, p, target, indices, indptr, last, kv_layout=layout)
    for r in range(3):
        gk, gv = reference.gather_paged_kv(kc, vc, indices[indptr[r]:indptr[r + 1]], total[r], layout)
        assert torch.equal(gk.cpu(), full_k[r].cpu()) and torch.equal(gv.cpu(), full_v[r].cpu())


def test_batch_indices_positions():
    b, p = pagoda.get_batch_indices_positions(torch.tensor([0, 2, 2, 5]), torch.tensor([10, 4, 3]), 5)
    assert b.tolist() == [0, 0, 2, 2, 2] and p.tolist() == [8, 9, 0, 1, 2]


def test_append_bad_input():
    cache = torch.zeros(4, 2, 4, 2, 64, dtype=torch.float16, device=DEVICE)
    k = torch.randn(2, 2, 64, dtype=torch.float16, device=DEVICE)
    indptr, indices, last = torch.tensor([0, 1]), torch.tensor([3]), torch.tensor([2])
    with pytest.raises(ValueError, match=r"positions\[1\]=2"):
        pagoda.append_paged_kv_cache(k, k, torch.tensor([0, 0]), torch.tensor([1, 2]), cache, indices, indptr, last)
    with pytest.raises(ValueError, match="batch_indices"):
        pagoda.append_paged_kv_cache(k, k, torch.tensor([0, 1]), torch.tensor([0, 1]), cache, indices, indptr, last)
    with pytest.raises(ValueError, match="append_key"):
        pagoda.append_paged_kv_cache(k[:, :1], k, torch.tensor([0, 0]), torch.tensor([0, 1]), cache, indices,
                                     indptr, last)
    with pytest.raises(ValueError, match="kv_indices"):
        pagoda.append_paged_kv_cache(k, k, torch.tensor([0, 0]), torch.tensor([0, 1]), cache, torch.tensor([9]),
                                     indptr, last)


@pytest.mark.parametrize("check", [True, False])
def test_append_paged_mla_kv_cache(check):
    """MLA's cache write: appended tokens land at their (request, position) slots in both caches, pages in a
    shuffled order; every other slot keeps its poison."""
    page_size, ckv_dim, kpe_dim = 4, 32, 8
    old_lens, new_lens = [3, 0, 6], [2, 5, 1]
    kv_lens = [a + b for a, b in zip(old_lens, new_lens)]
    pages = [-(-n // page_size) for n in kv_lens]
    perm = torch.randperm(sum(pages) + 2)
    kv_indices = perm[:sum(pages)].to(torch.int32)
    kv_indptr = torch.tensor([0] + torch.tensor(pages).cumsum(0).tolist(), dtype=torch.int32)
    last = torch.tensor([(n - 1) % page_size + 1 for n in kv_lens], dtype=torch.int32)
    assert pagoda.get_seq_lens(kv_indptr, last, page_size).tolist() == kv_lens
    ckv_cache = torch.full((len(perm), page_size, ckv_dim), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    kpe_cache = torch.full((len(perm), page_size, kpe_dim), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    append_indptr = torch.tensor([0] + torch.tensor(new_lens).cumsum(0).tolist(), dtype=torch.int32)
    nnz = int(append_indptr[-1])
    batch, pos = pagoda.get_batch_indices_positions(append_indptr, torch.tensor(kv_lens), nnz)
    ckv = torch.randn(nnz, ckv_dim, dtype=torch.bfloat16, device=DEVICE)
    kpe = torch.randn(nnz, kpe_dim, dtype=torch.bfloat16, device=DEVICE)
    pagoda.append_paged_mla_kv_cache(ckv, kpe, batch.to(DEVICE), pos.to(DEVICE), ckv_cache, kpe_cache,
                                     kv_indices.to(DEVICE), kv_indptr.to(DEVICE), last.to(DEVICE), check=check)
    written = torch.zeros(len(perm), page_size, dtype=torch.bool)
    for t in range(nnz):
        b, p = int(batch[t]), int(pos[t])
        page = int(kv_indices[int(kv_indptr[b]) + p // page_size])
        assert torch.equal(ckv_cache[page, p % page_size], ckv[t]) and torch.equal(kpe_cache[page, p % page_size],
                                                                                    kpe[t])
        written[page, p % page_size] = True
    assert torch.isnan(ckv_cache.float().cpu()[~written]).all() and torch.isnan(kpe_cache.float().cpu()[~written]).all()


def test_append_paged_mla_kv_cache_bad_input():
    ckv_cache = torch.zeros(3, 4, 16, dtype=torch.bfloat16)
    kpe_cache = torch.zeros(3, 4, 8, dtype=torch.bfloat16)
    ckv, kpe = torch.zeros(2, 16, dtype=torch.bfloat16), torch.zeros(2, 8, dtype=torch.bfloat16)
    table = dict(kv_indices=torch.tensor([2, 0], dtype=torch.int32), kv_indptr=torch.tensor([0, 1, 2]),
                 kv_last_page_len=torch.tensor([2, 4]))

    def call(**kw):
        args = dict(append_ckv=ckv, append_kpe=kpe, batch_indices=torch.tensor([0, 1]),
                    positions=torch.tensor([1, 3]), ckv_cache=ckv_cache, kpe_cache=kpe_cache, **table)
        args.update(kw)
        pagoda.append_paged_mla_kv_cache(**args)
    call()  # (valid)
    for kw, msg in [(dict(append_ckv=ckv[:, :8]), "append_ckv must be"), (dict(append_kpe=kpe.half()), "append_kpe"),
                    (dict(kpe_cache=kpe_cache[:2]), "kpe_cache's pages"), (dict(ckv_cache=ckv_cache[0]), "ckv_cache"),
                    (dict(positions=torch.tensor([2, 3])), r"positions\[0\]=2 is outside request 0's 2"),
                    (dict(batch_indices=torch.tensor([0, 2])), "batch_indices"),
                    (dict(positions=torch.tensor([1])), "positions must have 2 tokens"),
                    (dict(kv_indices=torch.tensor([5, 0], dtype=torch.int32)), "kv_indices")]:
        with pytest.raises(ValueError, match=msg):
            call(**kw)
    with pytest.raises(ValueError, match="page_size"):
        pagoda.get_seq_lens(table["kv_indptr"], table["kv_last_page_len"], 0)
    with pytest.raises(ValueError, match="one entry more"):
        pagoda.get_seq_lens(table["kv_indptr"][:2], table["kv_last_page_len"], 4)
