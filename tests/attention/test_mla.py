"""MLA (DeepSeek absorbed form) against a float64 reference of the same math."""
import math

import pytest
import torch

import pagoda
from pagoda.attention import mla as mla_mod
from pagoda.attention.mla import mla_reference

from ..conftest import DEVICE
from .helpers import TOL, check_lse, rel_err, workspace

DC, DP = 512, 64


class MLABatch:
    """A random paged latent cache: pages shuffled, unused slots NaN (a kernel reading them fails)."""

    def __init__(self, kv_lens, page_size, dtype=torch.bfloat16, dc=DC, dp=DP, spare=2):
        self.kv_lens, self.page_size = list(kv_lens), page_size
        pages = [-(-n // page_size) for n in kv_lens]
        total = sum(pages) + spare
        perm = torch.randperm(total)
        self.indptr = torch.tensor([0] + torch.tensor(pages).cumsum(0).tolist(), dtype=torch.int32)
        self.indices = perm[:sum(pages)].to(torch.int32)
        self.ckv = torch.full((total, page_size, dc), float("nan"), dtype=dtype, device=DEVICE)
        self.kpe = torch.full((total, page_size, dp), float("nan"), dtype=dtype, device=DEVICE)
        self.c, self.r = [], []
        for b, n in enumerate(kv_lens):
            c = torch.randn(n, dc, dtype=dtype, device=DEVICE)
            r = torch.randn(n, dp, dtype=dtype, device=DEVICE)
            self.c.append(c)
            self.r.append(r)
            for j in range(pages[b]):
                pg = int(self.indices[int(self.indptr[b]) + j])
                s, e = j * page_size, min(n, (j + 1) * page_size)
                self.ckv[pg, :e - s] = c[s:e]
                self.kpe[pg, :e - s] = r[s:e]


def run_mla(batch, qo_lens, heads, *, causal=False, backend="triton", ws_mb=16, sm_scale=None, dtype=torch.bfloat16):
    qo = torch.tensor([0] + list(qo_lens)).cumsum(0).to(torch.int32)
    nnz = int(qo[-1])
    dc, dp = batch.ckv.shape[-1], batch.kpe.shape[-1]
    sm_scale = sm_scale or 1.0 / math.sqrt(128 + 64)
    w = pagoda.BatchMLAPagedAttentionWrapper(workspace(ws_mb), backend=backend)
    w.plan(qo, batch.indptr, batch.indices, torch.tensor(batch.kv_lens, dtype=torch.int32), heads, dc, dp,
           batch.page_size, causal, sm_scale, dtype, dtype)
    q_nope = torch.randn(nnz, heads, dc, dtype=dtype, device=DEVICE) * 0.3
    q_pe = torch.randn(nnz, heads, dp, dtype=dtype, device=DEVICE)
    out = torch.full((nnz, heads, dc), float("nan"), dtype=dtype, device=DEVICE)
    lse = torch.full((nnz, heads), float("nan"), dtype=torch.float32, device=DEVICE)
    w.run(q_nope, q_pe, batch.ckv, batch.kpe, out=out, lse=lse, return_lse=True)
    ros, rls = [], []
    for b in range(len(qo_lens)):
        s, e = int(qo[b]), int(qo[b + 1])
        o, l2 = mla_reference(q_nope[s:e], q_pe[s:e], batch.c[b], batch.r[b], sm_scale=sm_scale, causal=causal,
                              compute_dtype=torch.float64, out_dtype=torch.float64)
        ros.append(o)
        rls.append(l2)
    return w, out, lse, torch.cat(ros), torch.cat(rls)


@pytest.mark.parametrize("heads", [16, 20, 128])
@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_mla_decode(heads, page_size):
    batch = MLABatch([1, 37, 90], page_size)
    _, out, lse, ro, rl = run_mla(batch, [1, 1, 1], heads)
    assert rel_err(out, ro) < TOL[torch.bfloat16]
    check_lse(lse, rl)


@pytest.mark.parametrize("causal", [True, False])
def test_mla_append(causal):
    """Chunked prefill / append: qo_len < kv_len and qo_len == kv_len, one empty query set."""
    batch = MLABatch([40, 23, 16, 9], 8)
    _, out, lse, ro, rl = run_mla(batch, [5, 23, 0, 3], 16, causal=causal)
    assert rel_err(out, ro) < TOL[torch.bfloat16]
    check_lse(lse, rl)


def test_mla_split_kv_and_fp16():
    """A long request among short ones: its KV splits into chunks, merged by the second launch (fp16)."""
    batch = MLABatch([400, 3, 7], 16, dtype=torch.float16)
    w, out, lse, ro, rl = run_mla(batch, [1, 1, 1], 16, dtype=torch.float16)
    assert w._plan.partial_rows > 0 and w._plan.combine  # the plan really split
    assert rel_err(out, ro) < TOL[torch.float16]
    check_lse(lse, rl)


@pytest.mark.parametrize("return_lse", [True, False])
@pytest.mark.parametrize("merge", [(16, 1, 2, 8, False), (16, 2, 4, 8, False), (4, 8, 32, 2, True),
                                   (8, 8, 2, 4, True)])
@pytest.mark.parametrize("heads", [20, 4])
def test_mla_split_append_merge(return_lse, merge, heads, monkeypatch):
    """Split tiles of a causal append: 20 heads (not a multiple of the merge launch's head block; a tile per
    token) or 4 (a tile holds the request's 3 tokens: the merge goes token by token over the merge list's query
    rows); with and without the LSE; the merge launch's settings (heads, column slices, chunks in flight, warps):
    whole rows, halves, slices of 64."""
    monkeypatch.setattr(mla_mod, "MLA_COMBINE", [merge])
    batch = MLABatch([1200, 3, 37], 16)
    qo_lens = [3, 1, 2]
    qo = torch.tensor([0] + qo_lens).cumsum(0).to(torch.int32)
    sm = 1.0 / math.sqrt(192)
    w = pagoda.BatchMLAPagedAttentionWrapper(workspace(), backend="triton")
    w.plan(qo, batch.indptr, batch.indices, torch.tensor(batch.kv_lens, dtype=torch.int32), heads, DC, DP, 16,
           True, sm, torch.bfloat16, torch.bfloat16)
    assert w._plan.partial_rows > 0 and w._plan.combine and w._plan.merge_config == merge
    buf = w._int_buf.cpu()  # the merge list in the plan buffer (header field 7): query rows per split tile
    at = int(buf[7])
    rows = buf[at + 1:at + 1 + 4 * int(buf[at])].view(-1, 4)[:, 3]
    assert rows.numel() > 0 and (rows.max() > 1) == (heads == 4)
    q_nope = torch.randn(int(qo[-1]), heads, DC, dtype=torch.bfloat16, device=DEVICE) * 0.3
    q_pe = torch.randn(int(qo[-1]), heads, DP, dtype=torch.bfloat16, device=DEVICE)
    out = torch.full((int(qo[-1]), heads, DC), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    lse = torch.full((int(qo[-1]), heads), float("nan"), device=DEVICE) if return_lse else None
    w.run(q_nope, q_pe, batch.ckv, batch.kpe, out=out, lse=lse, return_lse=return_lse)
    for b in range(3):
        s, e = int(qo[b]), int(qo[b + 1])
        o, l2 = mla_reference(q_nope[s:e], q_pe[s:e], batch.c[b], batch.r[b], sm_scale=sm, causal=True,
                              compute_dtype=torch.float64, out_dtype=torch.float64)
        assert rel_err(out[s:e], o) < TOL[torch.bfloat16], b
        if return_lse:
            check_lse(lse[s:e], l2)


def test_mla_cuda_graph_buffers_name_the_merge_list():
    """A CUDA-graph wrapper cannot grow its plan buffer (the captured launches read it): a plan whose split tiles
    and merge list need more split-table rows than it holds is a ValueError that counts those rows, and the plan
    before stays."""
    batch = MLABatch([400, 3, 7], 16)
    w = pagoda.BatchMLAPagedAttentionWrapper(workspace(16), use_cuda_graph=True, backend="triton")
    args = (torch.tensor([0, 1, 2, 3], dtype=torch.int32), batch.indptr, batch.indices,
            torch.tensor(batch.kv_lens, dtype=torch.int32), 16, DC, DP, 16, False, 0.1, torch.bfloat16,
            torch.bfloat16)
    w.plan(*args)
    kept = w._plan
    assert kept.partial_rows > 0 and kept.combine  # split tiles, and a merge list after them
    w._max_splits = 1
    with pytest.raises(ValueError, match=r"split-table rows \(max 1; one per split tile, then MLA's merge list\)"):
        w.plan(*args)
    assert w._plan is kept


def test_mla_merge_config():
    """The merge launch's setting by the plan's split tiles (the H200's grid of 264 programs, two rounds of it,
    128 heads): one or two long tiles in blocked units of 4 heads x 64 columns, up to 33 split tiles in halves,
    more in whole rows; head_dim_ckv 128 caps the slices at 2."""
    first, halves, whole = mla_mod.MLA_COMBINE
    assert mla_mod.MERGE_ROUNDS == 2
    assert mla_mod.merge_config(1, 128, 512, 264) == first  # 32 head blocks x 8 slices = 256 units
    assert mla_mod.merge_config(2, 128, 512, 264) == first  # 512 <= 528
    assert mla_mod.merge_config(3, 128, 512, 264) == halves  # 768 > 528; 3 x 8 x 2 = 48
    assert mla_mod.merge_config(33, 128, 512, 264) == halves  # 528
    assert mla_mod.merge_config(34, 128, 512, 264) == whole  # 544
    assert mla_mod.merge_config(0, 128, 512, 264) == first
    assert mla_mod.merge_config(8, 128, 128, 264) == first  # 32 x 2 x 8 = 512


def test_mla_empty_request_and_small_dims():
    """kv_len 0: output 0, lse -inf; head_dim_ckv 128 / kpe 32 (the other supported dims)."""
    batch = MLABatch([0, 21], 4, dc=128, dp=32)
    _, out, lse, ro, rl = run_mla(batch, [2, 2], 16)
    assert torch.equal(out[:2].float().cpu(), torch.zeros(2, 16, 128))
    assert torch.isinf(lse[:2]).all()
    assert rel_err(out[2:], ro[2:]) < TOL[torch.bfloat16]
    check_lse(lse, rl)


def test_mla_torch_backend():
    batch = MLABatch([9, 30], 4)
    _, out, lse, ro, rl = run_mla(batch, [1, 4], 16, causal=True, backend="torch")
    assert rel_err(out, ro) < 5e-3
    check_lse(lse, rl)


def test_mla_bad_input():
    batch = MLABatch([9, 30], 4)
    w = pagoda.BatchMLAPagedAttentionWrapper(workspace())
    kv_lens = torch.tensor([9, 30])
    args = (torch.tensor([0, 1, 2]), batch.indptr, batch.indices, kv_lens, 16, DC, DP, 4, False, 0.1,
            torch.bfloat16, torch.bfloat16)
    q_nope = torch.randn(2, 16, DC, dtype=torch.bfloat16, device=DEVICE)
    q_pe = torch.randn(2, 16, DP, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(RuntimeError, match="before plan"):
        w.run(q_nope, q_pe, batch.ckv, batch.kpe)
    for i, bad, name in ((5, 576, "head_dim_ckv"), (6, 128, "head_dim_kpe"), (9, -1.0, "sm_scale"),
                         (3, torch.tensor([9, 33]), "kv_len_arr"), (3, torch.tensor([8, 30]), "kv_len_arr"),
                         (11, torch.float16, "kv_data_type"), (1, torch.tensor([0, 5, 3]), "kv_indptr")):
        a = list(args)
        a[i] = bad
        with pytest.raises(ValueError, match=name):
            w.plan(*a)
    w.plan(*args)
    with pytest.raises(ValueError, match="q_pe"):
        w.run(q_nope, q_pe[:, :8], batch.ckv, batch.kpe)
    with pytest.raises(ValueError, match="q_nope"):
        w.run(q_nope.half(), q_pe, batch.ckv, batch.kpe)
    with pytest.raises(ValueError, match="kpe_cache"):
        w.run(q_nope, q_pe, batch.ckv, batch.kpe[:, :2])
    with pytest.raises(ValueError, match="pages"):
        w.run(q_nope, q_pe, batch.ckv[:3], batch.kpe[:3])
