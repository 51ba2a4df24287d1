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
