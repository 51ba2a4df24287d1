"""pagoda.ops.linear: the small-M kernel (kernels/matmul.py) against a float64 reference, in the interpreter
on the CPU (and on the GPU when there is one)."""
import pytest
import torch

import pagoda
from pagoda.ops import matmul as linear_mod

from ..conftest import DEVICE

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2, torch.float32: 1e-5}


def rel(out, ref):
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) output"
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,n,k", [(1, 48, 96), (1, 37, 70), (3, 40, 64), (16, 33, 100), (1, 16, 32)])
@pytest.mark.parametrize("bias", [False, True])
def test_small_m_kernel(dtype, rows, n, k, bias):
    """Rows 1..16, N past a block (37, 33: the last program's rows past N), K past a block and not a multiple
    of it (70, 100: masked K steps), with and without bias; output poisoned first."""
    x = torch.randn(rows, k, dtype=dtype, device=DEVICE)
    w = torch.randn(n, k, dtype=dtype, device=DEVICE) / k ** 0.5
    b = torch.randn(n, dtype=dtype, device=DEVICE) if bias else None
    out = torch.full((rows, n), float("nan"), dtype=dtype, device=DEVICE)
    y = pagoda.ops.linear(x, w, b, out=out, small_m=True)
    assert y is out
    ref = x.double() @ w.double().T + (b.double() if bias else 0.0)
    assert rel(out, ref) < TOL[dtype]


def rms_factor(x):
    return torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,n,k", [(1, 48, 96), (1, 37, 70), (2, 40, 64), (3, 33, 100), (4, 16, 32)])
@pytest.mark.parametrize("bias", [False, True])
def test_small_m_rms_norm_and_residual(dtype, rows, n, k, bias):
    """rms_norm_eps: y = rmsnorm(x) (no weight) @ w.T + bias, each row's factor from the row (rows of different
    scale, so a factor applied to the wrong row shows); residual: + r, in place when out is r; output poisoned;
    the same through the torch fallback (small_m=False)."""
    scales = torch.tensor([0.5, 3.0, 1.0, 8.0][:rows], device=DEVICE)[:, None]
    x = (torch.randn(rows, k, device=DEVICE) * scales).to(dtype)
    w = (torch.randn(n, k, device=DEVICE) / k ** 0.5).to(dtype)
    b = torch.randn(n, dtype=dtype, device=DEVICE) if bias else None
    ref = (x.double() * rms_factor(x)) @ w.double().T + (b.double() if bias else 0.0)
    for small_m in (True, False):
        out = torch.full((rows, n), float("nan"), dtype=dtype, device=DEVICE)
        pagoda.ops.linear(x, w, b, out=out, small_m=small_m, rms_norm_eps=1e-5)
        assert rel(out, ref) < TOL[dtype], small_m
        r = torch.randn(rows, n, dtype=dtype, device=DEVICE)
        r0 = r.double()
        y = pagoda.ops.linear(x, w, b, out=r, small_m=small_m, rms_norm_eps=1e-5, residual=r)
        assert y is r
        assert rel(r, ref + r0) < TOL[dtype], small_m
        res = torch.randn(rows, n, dtype=dtype, device=DEVICE)
        out = torch.full((rows, n), float("nan"), dtype=dtype, device=DEVICE)
        pagoda.ops.linear(x, w, b, out=out, small_m=small_m, residual=res)  # residual alone
        assert rel(out, x.double() @ w.double().T + (b.double() if bias else 0.0) + res.double()) < TOL[dtype]


@pytest.mark.parametrize("split_k", [2, 3, 5])
@pytest.mark.parametrize("rows,n,k", [(1, 48, 96), (1, 37, 70), (3, 33, 100), (16, 40, 128)])
def test_small_m_split_k(split_k, rows, n, k):
    """split_k: K over several programs per tile, the last to arrive adds the partials and runs the epilogue
    (norm factor, bias, residual in place); K not a multiple of a block (70, 100: the last piece masked); more
    splits than K blocks (5 over 96 = 3 blocks: as many pieces as blocks). A second call gives the same bits (the
    arrival counters were reset; the partials are added in a fixed order)."""
    dtype = torch.bfloat16
    x = torch.randn(rows, k, dtype=dtype, device=DEVICE) * 2
    w = (torch.randn(n, k, device=DEVICE) / k ** 0.5).to(dtype)
    b = torch.randn(n, dtype=dtype, device=DEVICE)
    norm = rows <= linear_mod.NORM_MAX_ROWS
    f = rms_factor(x) if norm else 1.0
    r = torch.randn(rows, n, dtype=dtype, device=DEVICE)
    ref = (x.double() * f) @ w.double().T + b.double() + r.double()
    outs = []
    for _ in range(2):
        out = r.clone()
        pagoda.ops.linear(x, w, b, out=out, small_m=True, rms_norm_eps=1e-5 if norm else None, residual=out,
                          split_k=split_k)
        assert rel(out, ref) < TOL[dtype]
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    plain = torch.full((rows, n), float("nan"), dtype=dtype, device=DEVICE)
    pagoda.ops.linear(x, w, out=plain, small_m=True, split_k=split_k)
    assert rel(plain, x.double() @ w.double().T) < TOL[dtype]
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="split_k"):
            pagoda.ops.linear(x, w, small_m=True, split_k=bad)


def test_small_m_split_env(monkeypatch):
    monkeypatch.setenv("PAGODA_SMALL_M_SPLIT", "down=4,o=2")
    assert linear_mod.small_m_split() == {"down": 4, "o": 2}
    monkeypatch.delenv("PAGODA_SMALL_M_SPLIT")
    assert linear_mod.small_m_split() == {"down": 2}
    for none in ("", "none"):
        monkeypatch.setenv("PAGODA_SMALL_M_SPLIT", none)
        assert linear_mod.small_m_split() == {}
    for bad in ("down=0", "lm_head=2", "down", "down=x"):
        monkeypatch.setenv("PAGODA_SMALL_M_SPLIT", bad)
        with pytest.raises(ValueError, match="PAGODA_SMALL_M_SPLIT"):
            linear_mod.small_m_split()


def test_small_m_rms_norm_more_rows_and_bad_input():
    """More rows than the kernel reduces (NORM_MAX_ROWS) go to the torch form, same numbers; bad arguments
    name themselves."""
    x = torch.randn(6, 64, dtype=torch.bfloat16, device=DEVICE)
    w = torch.randn(24, 64, dtype=torch.bfloat16, device=DEVICE) / 8
    y = pagoda.ops.linear(x, w, small_m=True, rms_norm_eps=1e-5)
    assert rel(y, (x.double() * rms_factor(x)) @ w.double().T) < TOL[torch.bfloat16]
    for eps in (-1.0, True, "1e-5"):
        with pytest.raises(ValueError, match="rms_norm_eps"):
            pagoda.ops.linear(x, w, rms_norm_eps=eps)
    with pytest.raises(ValueError, match="residual"):
        pagoda.ops.linear(x, w, residual=torch.randn(6, 23, dtype=torch.bfloat16, device=DEVICE))
    with pytest.raises(ValueError, match="residual"):
        pagoda.ops.linear(x, w, residual=torch.randn(6, 24, device=DEVICE))
    sq = torch.randn(2, 64, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="overlap"):  # y = x @ w.T + x written over x
        pagoda.ops.linear(sq, torch.randn(64, 64, dtype=torch.bfloat16, device=DEVICE), out=sq, residual=sq)


def test_small_m_kernel_leading_dims_and_strided_weight():
    """x [1, 1, K] keeps its leading dimensions; a weight whose rows are strided (a slice of a wider matrix)."""
    x = torch.randn(1, 1, 64, dtype=torch.bfloat16, device=DEVICE)
    wide = torch.randn(40, 96, dtype=torch.bfloat16, device=DEVICE)
    w = wide[:, :64]
    y = pagoda.ops.linear(x, w, small_m=True)
    assert y.shape == (1, 1, 40)
    assert rel(y, x.double() @ w.double().T) < TOL[torch.bfloat16]


def test_linear_dispatch_and_bad_input(monkeypatch):
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    w = torch.randn(16, 32, dtype=torch.bfloat16)
    # small_m=None on the CPU is torch (the same numbers as torch.nn.functional.linear); fp32 is torch always
    assert torch.equal(pagoda.ops.linear(x, w), torch.nn.functional.linear(x, w))
    xf, wf = x.float(), w.float()
    assert torch.equal(pagoda.ops.linear(xf, wf, small_m=True), torch.nn.functional.linear(xf, wf))
    with pytest.raises(ValueError, match="weight"):
        pagoda.ops.linear(x, torch.randn(16, 31, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="weight"):
        pagoda.ops.linear(x, w.float())
    with pytest.raises(ValueError, match="x must be a floating"):
        pagoda.ops.linear(torch.ones(2, 32, dtype=torch.int32), w)
    with pytest.raises(ValueError, match="bias"):
        pagoda.ops.linear(x, w, torch.randn(15, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out"):
        pagoda.ops.linear(x, w, out=torch.empty(2, 15, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="at most 16 rows"):
        pagoda.ops.linear(torch.randn(17, 32, dtype=torch.bfloat16), w, small_m=True)
    monkeypatch.setenv("PAGODA_SMALL_M_LINEAR", "qkv,down")
    assert linear_mod.small_m_projections() == {"qkv", "down"}
    monkeypatch.setenv("PAGODA_SMALL_M_LINEAR", "none")
    assert linear_mod.small_m_projections() == frozenset()
    monkeypatch.setenv("PAGODA_SMALL_M_LINEAR", "qkv,lm_head")
    with pytest.raises(ValueError, match="PAGODA_SMALL_M_LINEAR"):
        linear_mod.small_m_projections()


def test_pdl_switches(monkeypatch):
    """A programmatic dependent launch only on a CUDA GPU of compute capability 9 or more (the interpreter and
    the CPU launch without); PAGODA_PDL takes 0 or 1, 1 when unset."""
    from pagoda.ops._dispatch import pdl_default, pdl_launch

    assert pdl_launch(True, torch.zeros(1)) == {"PDL": False}
    assert pdl_launch(None, torch.zeros(1)) == {"PDL": False}
    monkeypatch.delenv("PAGODA_PDL", raising=False)
    assert pdl_default() is True  # on by default since session 17
    monkeypatch.setenv("PAGODA_PDL", "1")
    assert pdl_default() is True
    monkeypatch.setenv("PAGODA_PDL", "0")
    assert pdl_default() is False
    monkeypatch.setenv("PAGODA_PDL", "yes")
    with pytest.raises(ValueError, match="PAGODA_PDL"):
        pdl_default()


@pytest.mark.parametrize("head_dim,hq,hk", [(64, 4, 2), (128, 2, 1)])
@pytest.mark.parametrize("k", [96, 64])
@pytest.mark.parametrize("bias,norm", [(False, True), (True, False)])
def test_linear_rope_append(head_dim, hq, hk, k, bias, norm):
    """One token's qkv projection with RoPE and the K / V append in the epilogue (linear_rope_append) against
    float64: q rotated into q_out, k rotated and v at the token's slot of its page; every other cache entry
    untouched (the cache poisoned with NaN first, q_out too); the norm factor and a bias; K not a multiple of a
    block (96)."""
    import math

    dtype, page_size = torch.bfloat16, 4
    n_rows = (hq + 2 * hk) * head_dim
    x = torch.randn(1, k, dtype=dtype, device=DEVICE) * 3
    w = (torch.randn(n_rows, k, device=DEVICE) / k ** 0.5).to(dtype)
    b = torch.randn(n_rows, dtype=dtype, device=DEVICE) if bias else None
    max_pos, half = 64, head_dim // 2
    inv = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float64) / half))
    ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None, :]
    cos_sin = torch.cat([ang.cos(), ang.sin()], -1).float().to(DEVICE)
    pos = 22  # the request's sixth page, slot 2
    kv_indices = torch.tensor([5, 0, 7, 3, 9, 1, 6, 2], dtype=torch.int32, device=DEVICE)
    kv_indptr = torch.tensor([0, 8], dtype=torch.int32, device=DEVICE)
    cache = torch.full((10, 2, page_size, hk, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    q_out = torch.full((1, hq, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    pagoda.ops.linear_rope_append(x, w, b, q_out, torch.tensor([pos], dtype=torch.int32, device=DEVICE), cos_sin,
                                  cache, torch.zeros(1, dtype=torch.int32, device=DEVICE), kv_indices, kv_indptr,
                                  torch.tensor([3], dtype=torch.int32, device=DEVICE), hq, hk, head_dim,
                                  rms_norm_eps=1e-5 if norm else None)
    xd = x.double() * (rms_factor(x) if norm else 1.0)
    qkv = (xd @ w.double().T + (b.double() if bias else 0.0))[0]
    q, kk, v = qkv.split([hq * head_dim, hk * head_dim, hk * head_dim])
    c, s_ = ang[pos].cos().to(DEVICE), ang[pos].sin().to(DEVICE)

    def rope(t):
        t = t.view(-1, head_dim)
        t1, t2 = t[:, :half], t[:, half:]
        return torch.cat([t1 * c - t2 * s_, t2 * c + t1 * s_], -1)

    assert rel(q_out[0], rope(q)) < TOL[dtype]
    page, slot = int(kv_indices[pos // page_size]), pos % page_size
    assert rel(cache[page, 0, slot], rope(kk)) < TOL[dtype]
    assert rel(cache[page, 1, slot], v.view(hk, head_dim)) < TOL[dtype]
    written = torch.zeros_like(cache, dtype=torch.bool)
    written[page, :, slot] = True
    assert torch.isnan(cache[~written].float()).all(), "an entry other than the token's slot was written"
    assert math.isfinite(float(q_out.float().abs().max()))
    with pytest.raises(ValueError, match="x must be one token"):
        pagoda.ops.linear_rope_append(x.repeat(2, 1), w, b, q_out, None, cos_sin, cache, None, kv_indices,
                                      kv_indptr, None, hq, hk, head_dim)
    with pytest.raises(ValueError, match="positions"):
        pagoda.ops.linear_rope_append(x, w, b, q_out, torch.tensor([pos], device=DEVICE), cos_sin, cache,
                                      torch.zeros(1, dtype=torch.int32, device=DEVICE), kv_indices, kv_indptr, None,
                                      hq, hk, head_dim)
    with pytest.raises(ValueError, match="q_out"):
        pagoda.ops.linear_rope_append(x, w, b, q_out[:, :1], None, cos_sin, cache, None, kv_indices, kv_indptr,
                                      None, hq, hk, head_dim)


@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_linear_rope_append_fp8_cache(kv_dtype):
    """linear_rope_append into an fp8 cache (the engine's kv_cache_dtype): k rotated and v quantized on write with
    k_scale / v_scale (clamp(x / scale) rounded to the cache dtype) against float64 quantized the same way, one
    fp8 step at most (float32 accumulators rounded once); every other entry of the poisoned cache untouched; q as
    with a 16-bit cache. Without the scales: a ValueError."""
    dtype, page_size, head_dim, hq, hk, k = torch.bfloat16, 4, 64, 4, 2, 96
    n_rows = (hq + 2 * hk) * head_dim
    x = torch.randn(1, k, dtype=dtype, device=DEVICE) * 3
    w = (torch.randn(n_rows, k, device=DEVICE) / k ** 0.5).to(dtype)
    max_pos, half, pos = 64, head_dim // 2, 9
    inv = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float64) / half))
    ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None, :]
    cos_sin = torch.cat([ang.cos(), ang.sin()], -1).float().to(DEVICE)
    kv_indices = torch.tensor([2, 0, 3, 1], dtype=torch.int32, device=DEVICE)
    kv_indptr = torch.tensor([0, 4], dtype=torch.int32, device=DEVICE)
    cache = torch.randn(4, 2, page_size, hk, head_dim).to(kv_dtype).to(DEVICE)
    before = cache.clone()
    q_out = torch.full((1, hq, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    args = (x, w, None, q_out, torch.tensor([pos], dtype=torch.int32, device=DEVICE), cos_sin, cache,
            torch.zeros(1, dtype=torch.int32, device=DEVICE), kv_indices, kv_indptr,
            torch.tensor([2], dtype=torch.int32, device=DEVICE), hq, hk, head_dim)
    ks, vs = 0.5, 2.0
    pagoda.ops.linear_rope_append(*args, rms_norm_eps=1e-5, k_scale=ks, v_scale=vs)
    qkv = (x.double() * rms_factor(x)) @ w.double().T
    q, kk, v = qkv[0].split([hq * head_dim, hk * head_dim, hk * head_dim])
    c, s_ = ang[pos].cos().to(DEVICE), ang[pos].sin().to(DEVICE)

    def rope(t):
        t = t.view(-1, head_dim)
        return torch.cat([t[:, :half] * c - t[:, half:] * s_, t[:, half:] * c + t[:, :half] * s_], -1)

    fmax = torch.finfo(kv_dtype).max
    step = 2.0 ** -(3 if kv_dtype == torch.float8_e4m3fn else 2)
    page, slot = int(kv_indices[pos // page_size]), pos % page_size
    for i, (ref, scale) in enumerate(((rope(kk), ks), (v.view(hk, head_dim), vs))):
        want = (ref / scale).clamp(-fmax, fmax).to(kv_dtype).double()
        assert torch.allclose(cache[page, i, slot].double(), want, rtol=step, atol=1e-2 * step)
    assert rel(q_out[0], rope(q)) < TOL[dtype]
    written = torch.zeros(cache.shape, dtype=torch.bool, device=DEVICE)
    written[page, :, slot] = True
    assert torch.equal(cache.view(torch.uint8)[~written], before.view(torch.uint8)[~written])
    with pytest.raises(ValueError, match="k_scale"):
        pagoda.ops.linear_rope_append(*args)


@pytest.mark.parametrize("d,k", [(48, 96), (40, 70), (16, 32)])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_linear_silu_and_mul(d, k, norm, act):
    """One token's gate / up projection with SwiGLU (linear_silu_and_mul) or GeGLU (linear_gelu_tanh_and_mul) in
    the epilogue against float64: d not a multiple of the 16 columns a program takes (40), K not a multiple of a
    block (70), with the norm factor; output poisoned."""
    dtype = torch.bfloat16
    fn = getattr(pagoda.ops, f"linear_{act}_and_mul")
    x = torch.randn(1, k, dtype=dtype, device=DEVICE) * 3
    w = (torch.randn(2 * d, k, device=DEVICE) / k ** 0.5 * 2).to(dtype)
    out = torch.full((1, d), float("nan"), dtype=dtype, device=DEVICE)
    y = fn(x, w, out=out, rms_norm_eps=1e-5 if norm else None)
    assert y is out
    h = (x.double() * (rms_factor(x) if norm else 1.0)) @ w.double().T
    g = (torch.nn.functional.silu(h[:, :d]) if act == "silu"
         else torch.nn.functional.gelu(h[:, :d], approximate="tanh"))
    ref = g * h[:, d:]
    assert rel(out, ref) < TOL[dtype]
    other = (torch.nn.functional.gelu(h[:, :d], approximate="tanh") if act == "silu"
             else torch.nn.functional.silu(h[:, :d])) * h[:, d:]
    assert rel(out, other) > 3 * rel(out, ref)  # (the other activation is further off: the right one ran)
    with pytest.raises(ValueError, match="x must be one token"):
        fn(x.repeat(2, 1), w)
    with pytest.raises(ValueError, match="weight"):
        fn(x, w[:-1])
    with pytest.raises(ValueError, match="out"):
        fn(x, w, out=torch.empty(1, d + 1, dtype=dtype, device=DEVICE))
