"""Serving ops at real sizes on the GPU (scripts/gpu_check.sh)."""
import pytest
import torch

import pagoda
from pagoda.attention import reference

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _need_cuda():
    if not torch.cuda.is_available():
        pytest.fail("gpu tests need CUDA: deselect them with -m 'not gpu' on a CPU machine")


def rel(out, ref):
    assert torch.isfinite(out).all()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("hidden", [4096, 8192])
def test_norms_real_sizes(hidden):
    x = torch.randn(512, hidden, dtype=torch.bfloat16, device="cuda")
    r = torch.randn_like(x)
    w = torch.randn(hidden, dtype=torch.bfloat16, device="cuda")
    ref = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    assert rel(pagoda.rmsnorm(x, w), ref) < 1.2e-2
    s = (x.double() + r.double()).bfloat16().double()
    ref = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + w.double())
    pagoda.gemma_fused_add_rmsnorm(x, r, w)
    assert rel(x, ref) < 1.2e-2


def test_silu_and_mul_real_size():
    x = torch.randn(512, 2 * 14336, dtype=torch.bfloat16, device="cuda")
    ref = torch.nn.functional.silu(x[:, :14336].double()) * x[:, 14336:].double()
    assert rel(pagoda.silu_and_mul(x), ref) < 1.2e-2


def test_append_paged_kv_real_size():
    hk, d, ps = 8, 128, 16
    lens = [1000, 1, 4096, 33]
    pages = [-(-n // ps) for n in lens]
    indices = torch.randperm(sum(pages)).to(torch.int32)
    indptr = torch.tensor([0] + torch.tensor(pages).cumsum(0).tolist(), dtype=torch.int32)
    last = torch.tensor([(n - 1) % ps + 1 for n in lens], dtype=torch.int32)
    cache = torch.full((sum(pages), 2, ps, hk, d), float("nan"), dtype=torch.bfloat16, device="cuda")
    k = torch.randn(sum(lens), hk, d, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    append_indptr = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    b, p = pagoda.get_batch_indices_positions(append_indptr, torch.tensor(lens, device="cuda"), sum(lens))
    pagoda.append_paged_kv_cache(k, v, b, p, cache, indices.cuda(), indptr.cuda(), last.cuda())
    start = 0
    for r, n in enumerate(lens):
        gk, gv = reference.gather_paged_kv(cache[:, 0], cache[:, 1], indices[indptr[r]:indptr[r + 1]], n)
        assert torch.equal(gk, k[start:start + n]) and torch.equal(gv, v[start:start + n])
        start += n
