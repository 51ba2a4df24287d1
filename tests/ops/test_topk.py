"""Top-k selection (FlashInfer's top_k and its sparse-attention transforms) against a per-row Python reference."""
import importlib

import pytest
import torch

import pagoda

from ..conftest import DEVICE


def _scores(rows, width, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, width, generator=g).to(DEVICE)  # (distinct values: a unique top-k set)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_top_k_values_and_indices(dtype):
    x = _scores(6, 1000, 0).to(dtype)
    for sorted_ in (False, True):
        v, i = pagoda.top_k(x, 37, sorted=sorted_)
        assert v.dtype == dtype and i.dtype == torch.int64 and v.shape == i.shape == (6, 37)
        assert torch.equal(torch.gather(x, 1, i), v)
        want = torch.topk(x.float(), 37).values
        assert torch.equal(v.float().sort(-1).values, want.sort(-1).values)
        if sorted_:
            assert (v[:, :-1] >= v[:, 1:]).all()
    assert pagoda.topk is pagoda.top_k
    v, i = pagoda.top_k(x[:0], 5)  # (no rows)
    assert v.shape == i.shape == (0, 5)
    for args, msg in [((x, 0), "k"), ((x, 1001), "k"), ((x[0], 3), "input"), ((x, 2.0), "k")]:
        with pytest.raises(ValueError, match=msg):
            pagoda.top_k(*args)


def _ref_positions(row, n, k):
    """A row's top-k positions among its first n (all n in order when n <= k)."""
    if n <= k:
        return list(range(n))
    return sorted(torch.topk(row[:n].float(), k).indices.tolist())


def test_top_k_page_table_transform():
    """Each row's top-k positions among its first lengths[i], through its batch's page table (row_to_batch, or
    row i's), -1 past its length; rows shorter than k keep all positions in order; a length past the row's width is
    the whole row."""
    rows, width, k = 5, 64, 8
    x = _scores(rows, width, 1)
    table = torch.randint(0, 10_000, (3, width), dtype=torch.int32).to(DEVICE)
    lengths = torch.tensor([64, 5, 8, 0, 30], dtype=torch.int32, device=DEVICE)
    r2b = torch.tensor([2, 0, 1, 1, 2], dtype=torch.int32, device=DEVICE)
    out = pagoda.top_k_page_table_transform(x, table, lengths, k, row_to_batch=r2b)
    assert out.dtype == torch.int32 and out.shape == (rows, k)
    for i in range(rows):
        n, b = int(lengths[i]), int(r2b[i])
        pos = _ref_positions(x[i].cpu(), n, k)
        got = out[i].tolist()
        want = [int(table[b, p]) for p in pos]
        if n <= k:
            assert got == want + [-1] * (k - len(want))
        else:
            assert sorted(got) == sorted(want)
    out2 = pagoda.top_k_page_table_transform(x[:3], table, lengths[:3], k)  # (row i's own table row)
    assert sorted(out2[1].tolist()) == sorted([int(table[1, p]) for p in range(5)] + [-1] * 3)
    with pytest.raises(ValueError, match="src_page_table"):
        pagoda.top_k_page_table_transform(x, table, lengths, k)  # (5 rows, 3 table rows, no row_to_batch)
    with pytest.raises(ValueError, match="lengths"):
        pagoda.top_k_page_table_transform(x, table, lengths[:4], k, row_to_batch=r2b)
    with pytest.raises(ValueError, match="row_to_batch"):
        pagoda.top_k_page_table_transform(x, table, lengths, k, row_to_batch=r2b.float())


def test_top_k_ragged_transform():
    rows, width, k = 4, 50, 6
    x = _scores(rows, width, 2)
    offsets = torch.tensor([0, 50, 100, 150], dtype=torch.int32, device=DEVICE)
    lengths = torch.tensor([50, 6, 2, 20], dtype=torch.int32, device=DEVICE)
    out = pagoda.top_k_ragged_transform(x, offsets, lengths, k)
    assert out.dtype == torch.int32 and out.shape == (rows, k)
    for i in range(rows):
        n = int(lengths[i])
        want = [int(offsets[i]) + p for p in _ref_positions(x[i].cpu(), n, k)]
        got = out[i].tolist()
        if n <= k:
            assert got == want + [-1] * (k - n)
        else:
            assert sorted(got) == sorted(want)
    out_wide = pagoda.top_k_ragged_transform(x[:, :4], offsets, lengths.clamp(max=4), k)  # (k past the width)
    assert out_wide[0].tolist() == [0, 1, 2, 3, -1, -1]
    with pytest.raises(ValueError, match="offsets"):
        pagoda.top_k_ragged_transform(x, offsets[:2], lengths, k)


def _poisoned(rows, k, dtype):
    return torch.full((rows, k), -7 if not dtype.is_floating_point else float("nan"), dtype=dtype, device=DEVICE)


# (ops.topk.RADIX_BITS, COMPACT, programs a row: 1 topk_kernel's one, 3 / 7 the split kernels')
RADIX_CONFIGS = [(8, True, 1), (4, True, 1), (8, False, 1), (8, True, 7), (4, True, 3)]


@pytest.mark.parametrize("radix,compact,split", RADIX_CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_ties_blocks_and_every_slot(dtype, radix, compact, split, monkeypatch):
    """The radix-select kernels (ops.topk._launch into poisoned outputs, every slot written), in each digit
    width, with and without compaction, one program a row or a row split over several (slices 1728 / 768 wide: ties
    across slices): rows of several blocks (5000 wide, blocks of 4096) with many ties (values
    from a few dozen levels, negative and positive, -0.0 among them): the positions come in position order, hold the
    k largest values, and among the values equal to the k-th largest the first positions are taken; the transforms
    map the same positions (page table, offsets) and fill -1 past a short row."""
    from pagoda.ops.topk import _launch

    topk_mod = importlib.import_module("pagoda.ops.topk")  # (pagoda.ops.topk the attribute is top_k's alias)

    monkeypatch.setattr(topk_mod, "RADIX_BITS", radix)
    monkeypatch.setattr(topk_mod, "SPLIT_RADIX_BITS", radix)
    monkeypatch.setattr(topk_mod, "COMPACT", compact)

    g = torch.Generator().manual_seed(3)
    rows, width = 5, 5000
    x = ((torch.randint(-40, 40, (rows, width), generator=g) / 8.0)).to(dtype).to(DEVICE)
    x[0, 10:20] = -0.0
    for k in (1, 300, 4500):
        idx, vals = _poisoned(rows, k, torch.int64), _poisoned(rows, k, dtype)
        _launch(x, k, idx, 0, vals=vals, split=split)
        for i in range(rows):
            row = x[i].double().cpu()
            kth = torch.topk(row, k).values[-1]
            above = (row > kth).nonzero()[:, 0]
            ties = (row == kth).nonzero()[:, 0][:k - len(above)]
            want = sorted(above.tolist() + ties.tolist())
            assert idx[i].tolist() == want, (k, i)
            assert torch.equal(vals[i].cpu(), x[i, idx[i]].cpu())
    lengths = torch.tensor([5000, 4000, 299, 0, 1], dtype=torch.int64, device=DEVICE)
    table = torch.randperm(rows * width, generator=g).view(rows, width).to(torch.int32).to(DEVICE)
    offsets = torch.tensor([3, 0, 9, 1, 100], dtype=torch.int64, device=DEVICE)
    k = 300
    pt, rg = _poisoned(rows, k, torch.int32), _poisoned(rows, k, torch.int32)
    _launch(x, k, pt, 1, lens=lengths, table=table, split=split)
    _launch(x, k, rg, 2, lens=lengths, offsets=offsets, split=split)
    for i in range(rows):
        n = int(lengths[i])
        if n <= k:
            pos = list(range(n))
        else:
            row = x[i, :n].double().cpu()
            kth = torch.topk(row, k).values[-1]
            above = (row > kth).nonzero()[:, 0]
            pos = sorted(above.tolist() + (row == kth).nonzero()[:, 0][:k - len(above)].tolist())
        pad = [-1] * (k - len(pos))
        assert pt[i].tolist() == [int(table[i, p]) for p in pos] + pad, i
        assert rg[i].tolist() == [int(offsets[i]) + p for p in pos] + pad, i


def test_row_to_batch_out_of_range():
    x = _scores(2, 16, 4)
    table = torch.zeros(2, 16, dtype=torch.int32, device=DEVICE)
    lengths = torch.full((2,), 16, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="row_to_batch"):
        pagoda.top_k_page_table_transform(x, table, lengths, 4,
                                          row_to_batch=torch.tensor([0, 2], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="src_page_table"):
        pagoda.top_k_page_table_transform(x, table[:, :8], lengths, 4)


def test_split_rule():
    """How many programs a row takes (ops.topk._slices): split only few wide rows, never an empty batch."""
    slices = importlib.import_module("pagoda.ops.topk")._slices
    assert slices(0, 1 << 17, 132) == 1 and slices(1, 1 << 14, 132) == 1 and slices(16, 1 << 17, 132) == 1
    assert slices(1, 1 << 17, 132) == 128 and slices(8, 1 << 17, 132) == 33 and slices(1, 1 << 15, 132) == 32


def _order_key(v: torch.Tensor) -> torch.Tensor:
    """float32 values -> int64 keys that order like them (kernels/sampling.py's order_key, widened)."""
    b = v.float().view(torch.int32).long()
    return torch.where(b >= 0, b, b ^ 0x7FFFFFFF)


@pytest.mark.parametrize("radix", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_compacting_passes(dtype, radix, monkeypatch):
    """Bell-shaped rows (randn, 6000 wide, a few all-equal and constant-prefix rows among them), k 1 / 350 / 5999:
    the compacting passes give the same positions as the reference (the k largest, the first among ties, in
    position order), and on rows where the first pass keeps under half the values the scratch row (poisoned) starts
    with the row's values that share the k-th largest key's top 8 bits, in order: the later passes read those."""
    topk_mod = importlib.import_module("pagoda.ops.topk")
    monkeypatch.setattr(topk_mod, "RADIX_BITS", radix)
    monkeypatch.setattr(topk_mod, "COMPACT", True)
    g = torch.Generator().manual_seed(5)
    rows, width = 4, 6000
    x = torch.randn(rows, width, generator=g)
    x[1] = 0.75  # (every value tied)
    x[2] = 1.0 + torch.rand(width, generator=g) / 64  # (one exponent, close mantissas: the first bytes all equal)
    x = x.to(dtype)
    for k in (1, 350, 5999):
        idx = _poisoned(rows, k, torch.int64)
        vals = _poisoned(rows, k, dtype)
        scratch = torch.full((rows, width), float("nan"), dtype=dtype, device=DEVICE)
        topk_mod._launch(x.to(DEVICE), k, idx, 0, vals=vals, scratch=scratch)
        for i in range(rows):
            row = x[i].double()
            kth = torch.topk(row, k).values[-1]
            above = (row > kth).nonzero()[:, 0]
            ties = (row == kth).nonzero()[:, 0][:k - len(above)]
            assert idx[i].tolist() == sorted(above.tolist() + ties.tolist()), (k, i)
            assert torch.equal(vals[i].cpu(), x[i, idx[i].cpu()])
            # the first compacting pass: the first digit after which at most half the row shares the k-th
            # largest key's digits so far (its first RADIX, 2 RADIX, ... bits)
            ukeys = (_order_key(x[i]) ^ 0x80000000) & 0xFFFFFFFF
            ukth = (int(_order_key(kth.float().reshape(1))[0]) ^ 0x80000000) & 0xFFFFFFFF
            bits = next((b for b in range(radix, 32, radix)
                         if 2 * int(((ukeys >> (32 - b)) == (ukth >> (32 - b))).sum()) <= width), None)
            if i == 0 and bits is not None and bits <= 8:  # (the randn row: it compacts within its first byte)
                share = x[i][(ukeys >> (32 - bits)) == (ukth >> (32 - bits))]
                # (the first compaction wrote share at [0, len(share)); a later one an ordered part of it in place,
                # at the front: the end of share stays, and nothing past it is written)
                got = scratch[i].cpu()
                assert not torch.isnan(got[:len(share)]).any() and torch.isnan(got[len(share):]).all()
                assert got[len(share) - 1] == share[-1]
                assert torch.isin(got[:len(share)], share).all()
