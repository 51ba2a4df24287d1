"""The PyTorch forms of the ops (used without CUDA and without the interpreter) agree with the kernels."""
import pytest
import torch

import pagoda
from pagoda.ops import activation, norm, page, rope, sampling

from ..conftest import DEVICE


@pytest.fixture
def torch_path(monkeypatch):
    def use(flag):
        for mod in (activation, norm, page, rope, sampling):
            monkeypatch.setattr(mod, "use_triton", lambda t: flag)
    return use


def both(torch_path, fn):
    torch_path(True)
    a = fn()
    torch_path(False)
    b = fn()
    return a, b


def close(a, b, tol=1e-2):
    return ((a.double() - b.double()).norm() / b.double().norm()).item() < tol


def test_ops_torch_forms(torch_path):
    x = torch.randn(6, 256, dtype=torch.bfloat16, device=DEVICE)
    w = torch.randn(256, dtype=torch.bfloat16, device=DEVICE)
    a, b = both(torch_path, lambda: pagoda.gemma_rmsnorm(x, w))
    assert close(a, b)
    a, b = both(torch_path, lambda: pagoda.gelu_tanh_and_mul(x))
    assert close(a, b)

    def fused():
        xi, r = x.clone(), (x * 0.5).clone()
        pagoda.fused_add_rmsnorm(xi, r, w)
        return torch.cat([xi, r])
    a, b = both(torch_path, fused)
    assert close(a, b)
    q = torch.randn(4, 4, 64, dtype=torch.float16, device=DEVICE)
    k = torch.randn(4, 2, 64, dtype=torch.float16, device=DEVICE)
    for inter in (False, True):
        a, b = both(torch_path, lambda: torch.cat(
            [t.reshape(4, -1) for t in pagoda.apply_rope_pos_ids(q, k, torch.tensor([0, 9, 99, 999]),
                                                                   rotary_dim=32, interleave=inter)], 1))
        assert close(a, b, 2e-3)


def test_append_torch_form(torch_path):
    cache_a = torch.zeros(3, 2, 4, 2, 64, dtype=torch.float16, device=DEVICE)
    cache_b = cache_a.clone()
    k = torch.randn(5, 2, 64, dtype=torch.float16, device=DEVICE)
    v = torch.randn(5, 2, 64, dtype=torch.float16, device=DEVICE)
    args = (torch.tensor([0, 0, 0, 1, 1]), torch.tensor([0, 1, 2, 3, 4]))
    table = (torch.tensor([2, 0, 1]), torch.tensor([0, 1, 3]), torch.tensor([3, 1]))
    torch_path(True)
    pagoda.append_paged_kv_cache(k, v, *args, cache_a, *table)
    torch_path(False)
    pagoda.append_paged_kv_cache(k, v, *args, cache_b, *table)
    assert torch.equal(cache_a, cache_b) and cache_a.abs().sum() > 0


def test_sampling_torch_form(torch_path):
    torch_path(False)
    p = torch.softmax(torch.randn(2000, 12, device=DEVICE) * 2, -1)
    assert torch.equal(pagoda.top_k_sampling_from_probs(p, 1).long(), p.argmax(-1))
    t = pagoda.top_p_sampling_from_probs(p, 0.6, generator=torch.Generator().manual_seed(0)).long()
    s, order = p.sort(-1, descending=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(12).expand(2000, -1))
    before = (s.cumsum(-1) - s).gather(1, rank.gather(1, t[:, None]))
    assert (before < 0.6 + 1e-6).all()
    t = pagoda.min_p_sampling_from_probs(p, 0.5).long()
    assert (p.gather(1, t[:, None]) >= 0.5 * p.max(-1, keepdim=True).values - 1e-7).all()


def test_filters_torch_form(torch_path):
    p = torch.softmax(torch.randn(4, 90, device=DEVICE) * 2, -1)
    logits = torch.randn(4, 90, device=DEVICE) - 3
    for fn, arg, x in ((pagoda.top_k_renorm_probs, 7, p), (pagoda.top_p_renorm_probs, 0.7, p),
                       (pagoda.top_k_mask_logits, 9, logits)):
        a, b = both(torch_path, lambda: fn(x, arg))
        assert torch.equal(torch.isfinite(a) & (a != 0), torch.isfinite(b) & (b != 0))
        keep = torch.isfinite(a) & (a != 0)
        assert torch.allclose(a[keep], b[keep], atol=1e-6)
