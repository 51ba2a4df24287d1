"""Builders shared by the attention tests: random paged batches and float64 oracles."""
from __future__ import annotations

import math

import torch

import pagoda
from pagoda.attention import reference

from ..conftest import DEVICE

# Relative L2 error bounds (METHOD.md): bf16 operands land between 1e-3 and 1e-2.
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), "output has NaN/inf (unwritten or poisoned elements read)"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_lse(lse: torch.Tensor, ref: torch.Tensor, atol: float = 2e-2):
    lse, ref = lse.cpu(), ref.cpu()
    assert not torch.isnan(lse).any(), "lse has NaN (unwritten)"
    inf = torch.isinf(ref)
    assert torch.equal(torch.isinf(lse), inf), "lse -inf pattern differs from the reference"
    if (~inf).any():
        assert (lse[~inf] - ref[~inf]).abs().max().item() <= atol


class PagedBatch:
    """A random paged KV cache holding ``kv_lens`` requests in shuffled pages.

    Pages no request uses, and slots past each request's end, hold NaN: a kernel that
    reads them produces NaN and fails.
    """

    def __init__(self, kv_lens, num_kv_heads, head_dim, page_size, dtype, layout="NHD", spare_pages=3,
                 device=DEVICE):
        self.kv_lens = list(kv_lens)
        self.page_size, self.layout = page_size, layout
        pages_per = [math.ceil(n / page_size) for n in self.kv_lens]
        total = sum(pages_per) + spare_pages
        perm = torch.randperm(total)
        self.indptr = torch.tensor([0] + list(torch.tensor(pages_per).cumsum(0).tolist()), dtype=torch.int32)
        self.indices = perm[:sum(pages_per)].to(torch.int32)
        self.last_page_len = torch.tensor([(n - 1) % page_size + 1 if n else 0 for n in self.kv_lens],
                                          dtype=torch.int32)
        shape = (total, 2, page_size, num_kv_heads, head_dim) if layout == "NHD" else \
            (total, 2, num_kv_heads, page_size, head_dim)
        self.cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
        self.k, self.v = [], []  # per request [kv_len, H, D]
        for b, n in enumerate(self.kv_lens):
            k = torch.randn(n, num_kv_heads, head_dim, dtype=dtype, device=device)
            v = torch.randn(n, num_kv_heads, head_dim, dtype=dtype, device=device)
            self.k.append(k)
            self.v.append(v)
            for j in range(pages_per[b]):
                page = int(self.indices[int(self.indptr[b]) + j])
                s, e = j * page_size, min(n, (j + 1) * page_size)
                for which, src in ((0, k), (1, v)):
                    if layout == "NHD":
                        self.cache[page, which, :e - s] = src[s:e]
                    else:
                        self.cache[page, which, :, :e - s] = src[s:e].transpose(0, 1)

    def tuple_cache(self):
        return self.cache[:, 0].contiguous(), self.cache[:, 1].contiguous()


def oracle(q, qo_indptr, ks, vs, **kw):
    """Float64 reference over a batch: (out float64, lse float32)."""
    outs, lses = [], []
    for b in range(len(ks)):
        s, e = int(qo_indptr[b]), int(qo_indptr[b + 1])
        o, l2 = reference.attention(q[s:e], ks[b], vs[b], compute_dtype=torch.float64,
                                    out_dtype=torch.float64, **kw)
        outs.append(o)
        lses.append(l2)
    return torch.cat(outs), torch.cat(lses)


def check_requests(out, lse, ro, rl, qo_indptr, tol):
    """Each request's rows against the oracle on their own (a batch-wide norm would let a short request's
    error hide behind a long one's output); lse too unless it is None."""
    for b in range(len(qo_indptr) - 1):
        s, e = int(qo_indptr[b]), int(qo_indptr[b + 1])
        if ro[s:e].norm() > 0:
            assert rel_err(out[s:e], ro[s:e]) < tol, f"request {b}"
        else:
            assert torch.equal(out[s:e].cpu().double(), ro[s:e].cpu()), f"request {b}"
    if lse is not None:
        check_lse(lse, rl)


def poisoned_like(q):
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:2], float("nan"), dtype=torch.float32, device=q.device)
    return out, lse


def workspace(mb=16, device=DEVICE):
    return torch.empty(mb * 1024 * 1024, dtype=torch.uint8, device=device)


def run_decode(batch: PagedBatch, num_qo_heads, head_dim, dtype, *, cache_form="tensor", ws_mb=16,
               backend="triton", sinks=None, **plan_kw):
    """A decode of ``batch`` (random q, output and lse poisoned) and the float64 oracle of it: (wrapper, out, lse,
    oracle out, oracle lse). backend "triton" is Triton's interpreter on the CPU (conftest); sinks: run()'s."""
    num_kv_heads = batch.k[0].shape[1] if batch.k else 1
    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(workspace(ws_mb), batch.layout, backend=backend)
    w.plan(batch.indptr, batch.indices, batch.last_page_len, num_qo_heads, num_kv_heads, head_dim,
           batch.page_size, q_data_type=dtype, **plan_kw)
    q = torch.randn(len(batch.kv_lens), num_qo_heads, head_dim, dtype=dtype, device=DEVICE)
    out, lse = poisoned_like(q)
    cache = batch.cache if cache_form == "tensor" else batch.tuple_cache()
    o, l2 = w.run(q, cache, out=out, lse=lse, return_lse=True, sinks=sinks)
    assert o.data_ptr() == out.data_ptr() and l2.data_ptr() == lse.data_ptr()
    ref_kw = {k: plan_kw[k] for k in ("window_left", "logits_soft_cap", "sm_scale") if k in plan_kw}
    ro, rl = oracle(q[:, None].reshape(-1, num_qo_heads, head_dim), list(range(len(batch.kv_lens) + 1)),
                    batch.k, batch.v, sinks=sinks, **ref_kw)
    return w, o, l2, ro, rl
