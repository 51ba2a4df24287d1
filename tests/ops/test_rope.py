import math

import pytest
import torch

import pagoda
from pagoda.ops.rope import rope_inv_freq

from ..conftest import DEVICE

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2}


def rope_ref(x, pos, rotary_dim, interleave, inv_freq):
    """Float64 rotary embedding of x [nnz, heads, dim]."""
    x = x.double()
    half = rotary_dim // 2
    ang = pos.double()[:, None] * inv_freq.double()[None, :]
    c, s = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]
    i = torch.arange(half)
    i1, i2 = (2 * i, 2 * i + 1) if interleave else (i, i + half)
    y = x.clone()
    y[..., i1] = x[..., i1] * c - x[..., i2] * s
    y[..., i2] = x[..., i2] * c + x[..., i1] * s
    return y


def freq64(rd, theta, scale=1.0):
    return 1.0 / (theta ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd)) / scale


def rel(out, ref):
    out = out.double().cpu()
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("rotary_dim", [None, 32])
@pytest.mark.parametrize("inplace", [False, True])
def test_apply_rope_indptr_offsets(dtype, interleave, rotary_dim, inplace):
    q = torch.randn(11, 6, 64, dtype=dtype, device=DEVICE)
    k = torch.randn(11, 2, 64, dtype=dtype, device=DEVICE)
    indptr, offsets = torch.tensor([0, 4, 4, 11]), torch.tensor([100, 7, 3000])
    pos = torch.tensor([100, 101, 102, 103, 3000, 3001, 3002, 3003, 3004, 3005, 3006])
    rd = rotary_dim or 64
    rq, rk = (rope_ref(t.cpu(), pos, rd, interleave, freq64(rd, 1e4, 2.0)) for t in (q, k))
    if inplace:
        pagoda.apply_rope_inplace(q, k, indptr, offsets, rotary_dim, interleave, rope_scale=2.0)
        qo, ko = q, k
    else:
        qo, ko = pagoda.apply_rope(q, k, indptr, offsets, rotary_dim, interleave, rope_scale=2.0)
    assert rel(qo, rq) < TOL[dtype] and rel(ko, rk) < TOL[dtype]


def test_apply_rope_pos_ids_matches_indptr_form():
    q = torch.randn(5, 4, 128, dtype=torch.float16, device=DEVICE)
    k = torch.randn(5, 4, 128, dtype=torch.float16, device=DEVICE)
    a = pagoda.apply_rope(q, k, torch.tensor([0, 2, 5]), torch.tensor([10, 0]))
    b = pagoda.apply_rope_pos_ids(q, k, torch.tensor([10, 11, 0, 1, 2]))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_llama31_frequencies_and_rope():
    inv = rope_inv_freq(128, 5e5, llama31=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                               old_context_len=8192)).double()
    base = freq64(128, 5e5)
    wavelen = 2 * math.pi / base
    assert torch.allclose(inv[wavelen < 8192 / 4], base[wavelen < 8192 / 4].float().double())
    assert torch.allclose(inv[wavelen > 8192], (base[wavelen > 8192] / 8).float().double())
    q = torch.randn(3, 4, 128, dtype=torch.bfloat16, device=DEVICE)
    k = torch.randn(3, 2, 128, dtype=torch.bfloat16, device=DEVICE)
    pos = torch.tensor([0, 5000, 20000])
    qo, ko = pagoda.apply_llama31_rope_pos_ids(q, k, pos)
    assert rel(qo, rope_ref(q.cpu(), pos, 128, False, inv)) < TOL[torch.bfloat16]
    pagoda.apply_llama31_rope_pos_ids_inplace(q, k, pos)
    assert torch.equal(q, qo) and torch.equal(k, ko)


@pytest.mark.parametrize("is_neox", [True, False])
def test_cos_sin_cache_form(is_neox):
    head, rd, maxpos = 64, 48, 512
    inv = freq64(rd, 1e4)
    ang = torch.arange(maxpos, dtype=torch.float64)[:, None] * inv[None, :]
    cache = torch.cat([torch.cos(ang), torch.sin(ang)], dim=1).float().to(DEVICE)
    q = torch.randn(7, 3 * head, dtype=torch.float16, device=DEVICE)
    k = torch.randn(7, 1 * head, dtype=torch.float16, device=DEVICE)
    pos = torch.tensor([0, 1, 2, 100, 200, 300, 511], device=DEVICE)
    qo, ko = pagoda.apply_rope_with_cos_sin_cache(pos, q, k, head, cache, is_neox=is_neox)
    assert qo.shape == q.shape
    rq = rope_ref(q.view(7, 3, head).cpu(), pos.cpu(), rd, not is_neox, inv).view(7, -1)
    assert rel(qo, rq) < TOL[torch.float16]
    pagoda.apply_rope_with_cos_sin_cache_inplace(pos, q, k, head, cache, is_neox=is_neox)
    assert torch.equal(q, qo) and torch.equal(k, ko)


def test_rope_bad_input():
    q = torch.randn(3, 2, 64, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="rotary_dim"):
        pagoda.apply_rope_pos_ids(q, q, torch.arange(3), rotary_dim=65)
    with pytest.raises(ValueError, match="positions"):
        pagoda.apply_rope_pos_ids(q, q, torch.arange(4))
    with pytest.raises(ValueError, match="offsets"):
        pagoda.apply_rope(q, q, torch.tensor([0, 3]), torch.tensor([0, 1]))
    cache = torch.zeros(8, 64)
    with pytest.raises(ValueError, match="positions must be in"):
        pagoda.apply_rope_with_cos_sin_cache(torch.tensor([0, 1, 9]), q.view(3, -1), q.view(3, -1), 64, cache)
