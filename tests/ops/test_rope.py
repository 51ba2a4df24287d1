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


@pytest.mark.parametrize("is_neox,rd,head,layout,page_size,check", [(True, 128, 128, "NHD", 16, False),
                                                                   (False, 48, 64, "HND", 1, False),
                                                                   (True, 64, 64, "NHD", 4, False),
                                                                   (False, 48, 64, "NHD", 16, True)])
@pytest.mark.parametrize("early", [False, True])
def test_rope_and_append_fused(is_neox, rd, head, layout, page_size, check, early):
    """The fused op (one launch, check=False) against RoPE then append: q rotated in place as the RoPE op
    does (and matching the float64 reference), the cache written exactly as appending the rotated key
    would (partial rotary: dims past rd copied), nothing else in the poisoned cache touched, key unchanged;
    GQA (40 q heads over 8 KV heads: two q head blocks), three requests at scattered positions. check=True
    takes the two ops inside (host-checked page tables). early: pdl_tables_early (the tables read before the PDL
    wait; the same results)."""
    g = torch.Generator().manual_seed(rd + head)
    hq, hk, maxpos = 40, 8, 4096
    inv = freq64(rd, 1e4)
    ang = torch.arange(maxpos, dtype=torch.float64)[:, None] * inv[None, :]
    cos_sin = torch.cat([torch.cos(ang), torch.sin(ang)], dim=1).float().to(DEVICE)
    kv_lens, new = [37, 5, 300], [3, 5, 1]  # tokens already there + appended now
    pages = [-(-n // page_size) for n in kv_lens]
    perm = torch.randperm(sum(pages) + 3, generator=g)
    kv_indices = perm[:sum(pages)].to(torch.int32).to(DEVICE)
    kv_indptr = torch.tensor([0] + torch.tensor(pages).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    last = torch.tensor([(n - 1) % page_size + 1 for n in kv_lens], dtype=torch.int32, device=DEVICE)
    bidx = torch.tensor(sum(([b] * m for b, m in enumerate(new)), []), dtype=torch.int32, device=DEVICE)
    pos = torch.tensor(sum((list(range(n - m, n)) for n, m in zip(kv_lens, new)), []), dtype=torch.int32,
                       device=DEVICE)
    nnz = int(pos.numel())
    shape = (sum(pages) + 3, 2, page_size, hk, head) if layout == "NHD" else (sum(pages) + 3, 2, hk, page_size, head)
    base = torch.randn(shape, generator=g).to(torch.bfloat16).to(DEVICE)
    q = torch.randn(nnz, hq * head, generator=g).to(torch.bfloat16).to(DEVICE)
    k = torch.randn(nnz, hk * head, generator=g).to(torch.bfloat16).to(DEVICE)
    v = torch.randn(nnz, hk, head, generator=g).to(torch.bfloat16).to(DEVICE)
    q2, k_before, cache2, q_before, base0 = q.clone(), k.clone(), base.clone(), q.clone(), base.clone()
    pagoda.apply_rope_with_cos_sin_cache_and_append(pos, q, k, v, head, cos_sin, is_neox, base, bidx, kv_indices,
                                                    kv_indptr, last, layout, check=check, pdl_tables_early=early)
    assert torch.equal(k, k_before)
    k2 = k.clone()
    pagoda.apply_rope_with_cos_sin_cache_inplace(pos, q2, k2, head, cos_sin, is_neox=is_neox)
    pagoda.append_paged_kv_cache(k2.view(nnz, hk, head), v, bidx, pos, cache2, kv_indices, kv_indptr, last, layout)
    assert torch.equal(q, q2) and torch.equal(base, cache2)
    rq = rope_ref(q_before.view(nnz, hq, head).cpu(), pos.cpu(), rd, not is_neox, inv).view(nnz, -1)
    assert rel(q, rq) < TOL[torch.bfloat16]
    assert (base != base0).sum() > 0.9 * 2 * nnz * hk * head  # the appended slots were written, K and V


@pytest.mark.parametrize("kv_dtype,scales", [(torch.float8_e4m3fn, (1.0, 1.0)), (torch.float8_e4m3fn, (0.5, 2.0)),
                                             (torch.float8_e5m2, (1.0, 0.25))])
def test_rope_and_append_fused_fp8_cache(kv_dtype, scales):
    """An fp8 cache (the engine's kv_cache_dtype): the fused op quantizes the rotated key and the value on write
    (k_scale / v_scale floats) as RoPE then append_paged_kv_cache(k_scale=, v_scale=) does (V bit for bit, K up to
    the two ops' extra rounding to bf16), values past the fp8 range clamped; the rest of the poisoned cache
    untouched (compared whole), q rotated as the RoPE op rotates it."""
    g = torch.Generator().manual_seed(7)
    hq, hk, head, page_size, maxpos = 8, 2, 64, 4, 256
    inv = freq64(head, 1e4)
    ang = torch.arange(maxpos, dtype=torch.float64)[:, None] * inv[None, :]
    cos_sin = torch.cat([torch.cos(ang), torch.sin(ang)], dim=1).float().to(DEVICE)
    kv_indices = torch.tensor([3, 0, 5, 1], dtype=torch.int32, device=DEVICE)
    kv_indptr = torch.tensor([0, 2, 4], dtype=torch.int32, device=DEVICE)
    last = torch.tensor([3, 2], dtype=torch.int32, device=DEVICE)
    bidx = torch.tensor([0, 0, 1], dtype=torch.int32, device=DEVICE)
    pos = torch.tensor([5, 6, 5], dtype=torch.int32, device=DEVICE)
    base = torch.randn(6, 2, page_size, hk, head, generator=g).to(kv_dtype).to(DEVICE)
    q = torch.randn(3, hq * head, generator=g).to(torch.bfloat16).to(DEVICE)
    k = (torch.randn(3, hk * head, generator=g) * 200).to(torch.bfloat16).to(DEVICE)  # (some past e4m3 448)
    v = torch.randn(3, hk, head, generator=g).to(torch.bfloat16).to(DEVICE)
    q2, cache2 = q.clone(), base.clone()
    ks, vs = scales
    pagoda.apply_rope_with_cos_sin_cache_and_append(pos, q, k, v, head, cos_sin, True, base, bidx, kv_indices,
                                                    kv_indptr, last, check=False, k_scale=ks, v_scale=vs)
    k2 = k.clone()
    pagoda.apply_rope_with_cos_sin_cache_inplace(pos, q2, k2, head, cos_sin, is_neox=True)
    pagoda.append_paged_kv_cache(k2.view(3, hk, head), v, bidx, pos, cache2, kv_indices, kv_indptr, last,
                                 k_scale=ks, v_scale=vs)
    assert torch.equal(q, q2)
    # V bit for bit; K rotated in float32 and rounded once where the two ops round it to bf16 first: one fp8 step
    # apart where that double rounding lands on the other side of a midpoint
    assert torch.equal(base[:, 1].view(torch.uint8), cache2[:, 1].view(torch.uint8))
    got, want = base[:, 0].float(), cache2[:, 0].float()
    step = 2.0 ** -(3 if kv_dtype == torch.float8_e4m3fn else 2)
    assert (got == want).float().mean() > 0.97 and torch.allclose(got, want, rtol=step, atol=0)
    if kv_dtype == torch.float8_e4m3fn and ks == 1.0:  # (values past e4m3's range clamped to 448, not NaN)
        assert got.abs().amax() == torch.finfo(kv_dtype).max and not got.isnan().any()


def _head_norm64(x, w, eps, offset):
    """Float64 per-head RMSNorm of x [nnz, heads, d] with weight w [d] (+ offset)."""
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (w.double() + offset)


@pytest.mark.parametrize("is_neox,rd,head,page_size,check,offset,kv_dtype", [
    (True, 128, 128, 16, False, 0.0, torch.bfloat16),  # Qwen3's form
    (True, 64, 64, 4, False, 1.0, torch.bfloat16),  # Gemma 3's (1 + w)
    (False, 48, 64, 1, False, 0.0, torch.bfloat16),  # interleaved, partial rotary: the dims past rd normalized too
    (True, 64, 64, 4, True, 1.0, torch.bfloat16),  # check=True: the PyTorch ops inside
    (True, 64, 64, 4, False, 0.0, torch.float8_e4m3fn)])
def test_rope_and_append_fused_qk_norm(is_neox, rd, head, page_size, check, offset, kv_dtype):
    """q_norm_weight / k_norm_weight: each head of q and k RMS-normalized (weight + offset) before RoPE, in the same
    launch. Against float64: q (in place) and the appended K slots are RoPE(norm(x)), the V slots v; every other
    element of the poisoned cache untouched; key unchanged. GQA (12 q heads over 4 KV heads), three requests at
    scattered positions, heads of very different scales (the norm must be per head, not per token)."""
    g = torch.Generator().manual_seed(rd + head + int(offset) + page_size)
    hq, hk, maxpos, eps = 12, 4, 1024, 1e-6
    inv = freq64(rd, 1e4)
    ang = torch.arange(maxpos, dtype=torch.float64)[:, None] * inv[None, :]
    cos_sin = torch.cat([torch.cos(ang), torch.sin(ang)], dim=1).float().to(DEVICE)
    kv_lens, new = [37, 5, 300], [3, 5, 1]
    pages = [-(-n // page_size) for n in kv_lens]
    npages = sum(pages) + 3
    perm = torch.randperm(npages, generator=g)
    kv_indices = perm[:sum(pages)].to(torch.int32)
    kv_indptr = torch.tensor([0] + torch.tensor(pages).cumsum(0).tolist(), dtype=torch.int32)
    last = torch.tensor([(n - 1) % page_size + 1 for n in kv_lens], dtype=torch.int32)
    bidx = torch.tensor(sum(([b] * m for b, m in enumerate(new)), []), dtype=torch.int32)
    pos = torch.tensor(sum((list(range(n - m, n)) for n, m in zip(kv_lens, new)), []), dtype=torch.int32)
    nnz = int(pos.numel())
    base = (torch.randn(npages, 2, page_size, hk, head, generator=g) * 3).to(kv_dtype)
    head_scale = torch.rand(1, hq + hk, 1, generator=g) * 8 + 0.05
    qk = (torch.randn(nnz, hq + hk, head, generator=g) * head_scale).to(torch.bfloat16)
    q, k = qk[:, :hq].reshape(nnz, -1).contiguous(), qk[:, hq:].reshape(nnz, -1).contiguous()
    v = torch.randn(nnz, hk, head, generator=g).to(torch.bfloat16)
    qw, kw = torch.randn(head, generator=g).to(torch.bfloat16), torch.randn(head, generator=g).to(torch.bfloat16)
    q_before, k_before, base0 = q.clone(), k.clone(), base.clone()
    fp8 = dict(k_scale=1.0, v_scale=1.0) if kv_dtype != torch.bfloat16 else {}
    qd, kd, cache = q.to(DEVICE), k.to(DEVICE), base.to(DEVICE)
    pagoda.apply_rope_with_cos_sin_cache_and_append(
        pos.to(DEVICE), qd, kd, v.to(DEVICE), head, cos_sin, is_neox, cache, bidx.to(DEVICE), kv_indices.to(DEVICE),
        kv_indptr.to(DEVICE), last.to(DEVICE), check=check, q_norm_weight=qw.to(DEVICE), k_norm_weight=kw.to(DEVICE),
        norm_eps=eps, norm_weight_offset=offset, **fp8)
    assert torch.equal(kd.cpu(), k_before)
    rq = rope_ref(_head_norm64(q_before.view(nnz, hq, head), qw, eps, offset), pos, rd, not is_neox, inv)
    rk = rope_ref(_head_norm64(k_before.view(nnz, hk, head), kw, eps, offset), pos, rd, not is_neox, inv)
    assert rel(qd.view(nnz, hq, head), rq) < TOL[torch.bfloat16]
    # the appended slots against the reference, every other element exactly as it was
    cache = cache.cpu()
    page = kv_indices[kv_indptr[bidx.long()].long() + pos.long() // page_size].long()
    slot = pos.long() % page_size
    tol = TOL[torch.bfloat16] if kv_dtype == torch.bfloat16 else 4e-2
    assert rel(cache[page, 0, slot], rk) < tol and rel(cache[page, 1, slot], v.double()) < tol
    written = torch.zeros(npages, page_size, dtype=torch.bool)
    written[page, slot] = True
    assert torch.equal(cache.float()[~written[:, None, :].expand(-1, 2, -1)],
                       base0.float()[~written[:, None, :].expand(-1, 2, -1)])
    # without the norms the same call gives what the norms change (the weights are not a no-op)
    assert rel(qd.view(nnz, hq, head), rope_ref(q_before.view(nnz, hq, head), pos, rd, not is_neox, inv)) > 0.3


def test_rope_and_append_qk_norm_bad_input():
    q = torch.randn(2, 64, dtype=torch.bfloat16)
    pos = torch.tensor([0, 1], dtype=torch.int32)
    t = torch.zeros(2, dtype=torch.int32)
    cache = torch.zeros(2, 2, 4, 1, 64, dtype=torch.bfloat16)
    args = (pos, q, q.clone(), q.clone(), 64, torch.randn(16, 64), True, cache, t, t[:1], torch.tensor([0, 1]),
            torch.tensor([2]))
    w = torch.ones(64)
    for kwargs, match in [(dict(q_norm_weight=w), "k_norm_weight"), (dict(k_norm_weight=w), "q_norm_weight"),
                          (dict(q_norm_weight=torch.ones(32), k_norm_weight=w), "q_norm_weight.*64"),
                          (dict(q_norm_weight=w, k_norm_weight=torch.ones(64, dtype=torch.int32)), "k_norm_weight"),
                          (dict(q_norm_weight=w, k_norm_weight=torch.ones(128)[::2]), "k_norm_weight.*contiguous"),
                          (dict(q_norm_weight=w, k_norm_weight=w, norm_eps=-1.0), "norm_eps"),
                          (dict(q_norm_weight=w, k_norm_weight=w, norm_weight_offset=float("nan")),
                           "norm_weight_offset")]:
        with pytest.raises(ValueError, match=match):
            pagoda.apply_rope_with_cos_sin_cache_and_append(*args, **kwargs)


def test_rope_and_append_bad_input():
    q = torch.randn(2, 64, dtype=torch.bfloat16)
    k = torch.randn(2, 64, dtype=torch.bfloat16)
    cos_sin = torch.randn(16, 64)
    pos = torch.tensor([0, 1], dtype=torch.int32)
    t = torch.zeros(2, dtype=torch.int32)
    cache = torch.zeros(2, 2, 4, 1, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="value"):
        pagoda.apply_rope_with_cos_sin_cache_and_append(pos, q, k, torch.randn(2, 32), 64, cos_sin, True, cache, t,
                                                        t[:1], torch.tensor([0, 1]), torch.tensor([2]))
    with pytest.raises(ValueError, match="fp8"):
        pagoda.apply_rope_with_cos_sin_cache_and_append(pos, q, k, k, 64, cos_sin, True,
                                                        cache.to(torch.float8_e4m3fn), t, t[:1], torch.tensor([0, 1]),
                                                        torch.tensor([2]))
    with pytest.raises(ValueError, match="k_scale"):  # (per-head tensors: the two ops)
        pagoda.apply_rope_with_cos_sin_cache_and_append(pos, q, k, k, 64, cos_sin, True,
                                                        cache.to(torch.float8_e4m3fn), t, t[:1], torch.tensor([0, 1]),
                                                        torch.tensor([2]), k_scale=torch.ones(1), v_scale=1.0)
    with pytest.raises(ValueError, match="k_scale / v_scale are for an fp8"):
        pagoda.apply_rope_with_cos_sin_cache_and_append(pos, q, k, k, 64, cos_sin, True, cache, t, t[:1],
                                                        torch.tensor([0, 1]), torch.tensor([2]), k_scale=1.0,
                                                        v_scale=1.0)


def _rot64(x, pos, cos_sin, interleave):
    """float64 rotation of x [nnz, h, d] by a [cos | sin] cache at pos."""
    half = x.shape[-1] // 2
    c = cos_sin[pos.long(), :half].double()[:, None, :]
    s = cos_sin[pos.long(), half:].double()[:, None, :]
    xd = x.double()
    idx = torch.arange(half)
    i1, i2 = (2 * idx, 2 * idx + 1) if interleave else (idx, idx + half)
    y = xd.clone()
    y[..., i1], y[..., i2] = xd[..., i1] * c - xd[..., i2] * s, xd[..., i2] * c + xd[..., i1] * s
    return y


@pytest.mark.parametrize("mla", [False, True])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_rope_quantize_fp8(mla, is_neox, fp8, monkeypatch):
    """FlashInfer's rope_quantize_fp8 (and its MLA name): the rotary parts rotated by the cache at pos_ids, every part
    times its side's scale, saturated and rounded to fp8, into outputs poisoned first (given ones and allocated
    ones): against float64 so quantized, equal but for rounding ties and at most one fp8 step off; GQA (q 8 heads, k 2)
    and MLA (k 2-D), the interpreter's kernel and the PyTorch form; bad arguments are ValueErrors naming them."""
    nnz, hq, hk, rope, nope = 5, 8, 2, 64, 48
    q_r = torch.randn(nnz, hq, rope, dtype=torch.bfloat16) * 4
    q_n = torch.randn(nnz, hq, nope, dtype=torch.bfloat16) * 4
    kshape = (nnz, rope) if mla else (nnz, hk, rope)
    k_r = torch.randn(kshape, dtype=torch.bfloat16) * 4
    k_n = torch.randn(kshape[:-1] + (nope,), dtype=torch.bfloat16) * 4
    pos = torch.tensor([0, 7, 3, 30, 12], dtype=torch.int32)
    ang = torch.arange(32, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(rope // 2) / (rope // 2))
    cache = torch.cat([ang.cos(), ang.sin()], 1).float()
    big = float(torch.finfo(fp8).max)
    sq, sk = 3.0, (60.0 if fp8 == torch.float8_e4m3fn else 20000.0)  # (k's scale saturates some values)
    fn = pagoda.mla_rope_quantize_fp8 if mla else pagoda.rope_quantize_fp8
    for torch_path in (False, True):
        if torch_path:
            monkeypatch.setattr("pagoda.ops.rope.use_triton", lambda t: False)
        given = torch.full(q_r.shape, float("nan")).to(fp8)
        outs = fn(q_r, k_r, q_n, k_n, cache, pos, is_neox=is_neox, quant_scale_q=sq, quant_scale_kv=sk,
                  q_rope_out=given)
        assert outs[0] is given and all(o.dtype == fp8 for o in outs)
        k3 = lambda t: t if t.dim() == 3 else t[:, None]  # noqa: E731
        want = [_rot64(q_r, pos, cache, not is_neox) * sq, _rot64(k3(k_r), pos, cache, not is_neox) * sk,
                q_n.double() * sq, k3(k_n).double() * sk]
        for got, w in zip(outs, want):
            got, w = k3(got).double(), w.clamp(-big, big)
            assert torch.isfinite(got).all()
            assert (got == w.to(fp8).double()).double().mean() > 0.97, torch_path
            step = 0.13 if fp8 == torch.float8_e4m3fn else 0.26
            assert ((got - w).abs() <= step * w.abs() + 2.0 ** -9 * max(sq, sk)).all()
        assert (k3(outs[1]).double().abs() == big).any()  # (saturated, not inf)
        monkeypatch.undo()
    # no nope parts: size-0 outputs
    outs = pagoda.rope_quantize_fp8(q_r, k_r, None, None, cache, pos)
    assert outs[2].shape == (nnz, hq, 0) and outs[0].dtype == torch.float8_e4m3fn
    bad = [(dict(cos_sin_cache=cache.double()), "cos_sin_cache"), (dict(pos_ids=pos[:3]), "pos_ids"),
           (dict(pos_ids=torch.tensor([0, 1, 2, 3, 99])), "pos_ids"),
           (dict(quantize_dtype=torch.int8), "quantize_dtype"),
           (dict(quant_scale_q=0.0), "quant_scale_q"), (dict(k_rope_out=torch.empty(3).to(fp8)), "k_rope_out"),
           (dict(q_rope=q_r.float()), "q_rope"), (dict(k_nope=k_n[..., :8]), "q_nope / k_nope")]
    base = dict(q_rope=q_r, k_rope=k_r, q_nope=q_n, k_nope=k_n, cos_sin_cache=cache, pos_ids=pos)
    for kw, name in bad:
        with pytest.raises(ValueError, match=name.split()[0]):
            pagoda.rope_quantize_fp8(**{**base, **kw})
