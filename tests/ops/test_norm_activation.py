import pytest
import torch

import pagoda

from ..conftest import DEVICE

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2, torch.float32: 1e-5}


def rel(out, ref):
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) output"
    return ((out - ref).norm() / ref.norm()).item()


def rms_ref(x, w, eps, offset=0.0):
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (w.double() + offset)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(7, 64), (3, 5, 200), (2, 5000)])  # 5000 > one block: two passes
@pytest.mark.parametrize("gemma", [False, True])
def test_rmsnorm(dtype, shape, gemma):
    x = torch.randn(shape, dtype=dtype, device=DEVICE) * 3
    w = torch.randn(shape[-1], dtype=dtype, device=DEVICE)
    out = torch.full_like(x, float("nan"))
    fn = pagoda.gemma_rmsnorm if gemma else pagoda.rmsnorm
    y = fn(x, w, eps=1e-5, out=out)
    assert y is out
    assert rel(out, rms_ref(x, w, 1e-5, 1.0 if gemma else 0.0)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("hidden", [300, 5000])  # one pass, two passes
def test_fused_add_rmsnorm_in_place(dtype, gemma, hidden):
    x = torch.randn(9, hidden, dtype=dtype, device=DEVICE)
    r = torch.randn(9, hidden, dtype=dtype, device=DEVICE)
    w = torch.randn(hidden, dtype=dtype, device=DEVICE)
    ref_r = (x.double() + r.double())
    ref_y = rms_ref(ref_r.to(dtype), w, 1e-6, 1.0 if gemma else 0.0)
    (pagoda.gemma_fused_add_rmsnorm if gemma else pagoda.fused_add_rmsnorm)(x, r, w)
    assert rel(r, ref_r) < TOL[dtype]
    assert rel(x, ref_y) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hidden", [300, 5000])  # one pass, two passes
def test_gemma_rmsnorm_add_in_place(dtype, hidden, monkeypatch):
    """residual <- residual + gemma_rmsnorm(input): rows of different scales (a factor from another row shows), the
    input left as it was; the norm rounded to the residual's dtype before the sum: the two-launch form
    (gemma_rmsnorm, then +) to the last bit (to one unit of it in bf16 under the Triton interpreter, which rounds
    float32 to bf16 towards zero where torch rounds to nearest); the PyTorch form too."""
    scales = torch.linspace(0.25, 6.0, 9, device=DEVICE)[:, None]
    x = (torch.randn(9, hidden, device=DEVICE) * scales).to(dtype)
    r0 = torch.randn(9, hidden, dtype=dtype, device=DEVICE) * 2
    w = torch.randn(hidden, dtype=dtype, device=DEVICE)
    ref = r0.double() + rms_ref(x, w, 1e-6, 1.0)
    from pagoda.ops import norm

    for triton_path in (True, False):
        if not triton_path:
            monkeypatch.setattr(norm, "use_triton", lambda t: False)
        two_launches = r0 + pagoda.gemma_rmsnorm(x, w)
        r, x_before = r0.clone(), x.clone()
        assert pagoda.gemma_rmsnorm_add(x, r, w) is None
        assert torch.equal(x, x_before)
        assert rel(r, ref) < TOL[dtype]
        if triton_path and dtype == torch.bfloat16 and not r.is_cuda:
            ulp = two_launches.float().abs() * 2.0 ** -7
            assert ((r.float() - two_launches.float()).abs() <= ulp).all()
        else:
            assert torch.equal(r, two_launches)
    with pytest.raises(ValueError, match="residual"):
        pagoda.gemma_rmsnorm_add(x, r0[:2].clone(), w)
    with pytest.raises(ValueError, match="weight"):
        pagoda.gemma_rmsnorm_add(x, r0.clone(), w[:-1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fn,ref", [
    (pagoda.silu_and_mul, lambda a: torch.nn.functional.silu(a)),
    (pagoda.gelu_and_mul, lambda a: torch.nn.functional.gelu(a)),
    (pagoda.gelu_tanh_and_mul, lambda a: torch.nn.functional.gelu(a, approximate="tanh")),
])
@pytest.mark.parametrize("shape", [(5, 2 * 48), (2, 3, 2 * 1500)])
def test_act_and_mul(dtype, fn, ref, shape):
    x = torch.randn(shape, dtype=dtype, device=DEVICE) * 2
    d = shape[-1] // 2
    out = torch.full((*shape[:-1], d), float("nan"), dtype=dtype, device=DEVICE)
    fn(x, out=out)
    xd = x.double()
    assert rel(out, ref(xd[..., :d]) * xd[..., d:]) < TOL[dtype]
    assert fn(x).shape == (*shape[:-1], d)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,hidden", [((5, 2 * 48), 40), ((2, 3, 2 * 1500), 96)])
@pytest.mark.parametrize("fn,act", [(pagoda.silu_and_mul, torch.nn.functional.silu),
                                    (pagoda.gelu_tanh_and_mul,
                                     lambda a: torch.nn.functional.gelu(a, approximate="tanh"))])
def test_silu_and_mul_norm_input(dtype, shape, hidden, fn, act, monkeypatch):
    """norm_input: gate and up scaled by the RMSNorm factor of their row of norm_input first (rows of different
    scale: a factor from the wrong row shows); output poisoned; the PyTorch form gives the same numbers. SwiGLU and
    GeGLU (Gemma's)."""
    x = torch.randn(shape, dtype=dtype, device=DEVICE) * 2
    scales = torch.linspace(0.25, 6.0, x[..., 0].numel(), device=DEVICE).view(x.shape[:-1])[..., None]
    n_in = (torch.randn(*shape[:-1], hidden, device=DEVICE) * scales).to(dtype)
    d = shape[-1] // 2
    f = torch.rsqrt(n_in.double().pow(2).mean(-1, keepdim=True) + 1e-5)
    xd = x.double() * f
    ref = act(xd[..., :d]) * xd[..., d:]
    out = torch.full((*shape[:-1], d), float("nan"), dtype=dtype, device=DEVICE)
    fn(x, out=out, norm_input=n_in, norm_eps=1e-5)
    assert rel(out, ref) < TOL[dtype]
    from pagoda.ops import activation

    monkeypatch.setattr(activation, "use_triton", lambda t: False)  # the PyTorch form (CPU without Triton)
    out = torch.full((*shape[:-1], d), float("nan"), dtype=dtype, device=DEVICE)
    fn(x, out=out, norm_input=n_in, norm_eps=1e-5)
    assert rel(out, ref) < TOL[dtype]
    with pytest.raises(ValueError, match="norm_input"):
        fn(x, norm_input=n_in[..., :1, :] if x.dim() == 3 else n_in[:2])
    with pytest.raises(ValueError, match="norm_eps"):
        fn(x, norm_input=n_in, norm_eps=-1.0)


def test_bad_input():
    x = torch.randn(4, 64, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        pagoda.rmsnorm(x, torch.randn(63, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="residual"):
        pagoda.fused_add_rmsnorm(x, x[:2].clone(), torch.randn(64, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="out"):
        pagoda.rmsnorm(x, torch.randn(64, dtype=torch.float16, device=DEVICE), out=torch.empty(4, 64))
    with pytest.raises(ValueError, match="2 \\* d"):
        pagoda.silu_and_mul(torch.randn(3, 7, device=DEVICE))
    with pytest.raises(ValueError, match="out"):
        pagoda.silu_and_mul(x, out=torch.empty(4, 64, dtype=torch.float16, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(3, 1000), (2, 5, 4097)])  # (one block and a part; blocks over rows)
def test_soft_cap(dtype, shape, monkeypatch):
    """cap * tanh(x / cap) in float32 against float64: logits from near 0 (the series branch) through the cap's
    range to far past it (saturated), a non-contiguous input; output poisoned; the PyTorch form too; bad input."""
    cap = 30.0
    x = (torch.randn(shape, device=DEVICE) * torch.logspace(-4, 2.5, shape[-1], device=DEVICE)).to(dtype)
    ref = torch.tanh(x.double() / cap) * cap
    from pagoda.ops import activation

    for triton_path in (True, False):
        if not triton_path:
            monkeypatch.setattr(activation, "use_triton", lambda t: False)
        out = torch.full(shape, float("nan"), dtype=torch.float32, device=DEVICE)
        assert pagoda.soft_cap(x, cap, out=out) is out
        assert torch.isfinite(out).all()
        err = ((out.double() - ref).abs() / ref.abs().clamp_min(1e-30)).max().item()
        assert err < 1e-5, (triton_path, err)  # (relative, element by element: small logits too)
        t = pagoda.soft_cap(x.transpose(-1, -2), cap)
        assert t.dtype == torch.float32 and torch.allclose(t.double(), ref.transpose(-1, -2), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="cap"):
        pagoda.soft_cap(x, 0.0)
    with pytest.raises(ValueError, match="out"):
        pagoda.soft_cap(x, cap, out=torch.empty(shape, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="out"):
        pagoda.soft_cap(x, cap, out=torch.empty(shape[:-1], dtype=torch.float32, device=DEVICE))
    with pytest.raises(ValueError, match="input"):
        pagoda.soft_cap(torch.ones(3, dtype=torch.int32), cap)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("hidden", [100, 5000])  # (one pass; three passes past the 4096-element block)
def test_layernorm(dtype, hidden):
    """FlashInfer's layernorm(input, gemma, beta, eps) against float64 (biased variance), rows offset from zero so
    the mean matters; 3-D input; bad input names the argument."""
    g = torch.Generator().manual_seed(hidden)
    x = (torch.randn(3, 4, hidden, generator=g) * 2 + 5).to(dtype).to(DEVICE)
    gemma = (torch.rand(hidden, generator=g) + 0.5).to(DEVICE)
    beta = torch.randn(hidden, generator=g).to(DEVICE)
    y = pagoda.layernorm(x, gemma, beta, 1e-5)
    xd = x.double().cpu()
    want = (xd - xd.mean(-1, keepdim=True)) / torch.sqrt(xd.var(-1, unbiased=False, keepdim=True) + 1e-5)
    want = want * gemma.double().cpu() + beta.double().cpu()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}[dtype]
    assert y.dtype == dtype and y.shape == x.shape
    assert ((y.double().cpu() - want).norm() / want.norm()).item() < tol
    for kw, msg in [(dict(beta=beta[:10]), "beta"), (dict(gemma=gemma[:10]), "weight"), (dict(eps=-1.0), "eps"),
                    (dict(beta=beta.int()), "beta")]:
        args = dict(input=x, gemma=gemma, beta=beta)
        args.update(kw)
        with pytest.raises(ValueError, match=msg):
            pagoda.layernorm(**args)


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("hidden", [300, 5000])  # one pass, two passes
@pytest.mark.parametrize("fused", [False, True])
def test_rmsnorm_quant(fp8, hidden, fused, monkeypatch):
    """FlashInfer's rmsnorm_quant / fused_add_rmsnorm_quant: out (fp8, poisoned first) = the norm / scale clamped
    to the fp8 range: against the float64 norm so quantized, equal but for rounding ties (one fp8 step at most),
    the clamped elements at the range's end (scale 0.004 pushes the largest past it); fused: residual <- input +
    residual, input untouched; the PyTorch form alike; bad out / scale are ValueErrors naming them."""
    dtype = torch.bfloat16
    x = torch.randn(9, hidden, dtype=dtype, device=DEVICE) * 3
    r0 = torch.randn(9, hidden, dtype=dtype, device=DEVICE)
    w = torch.randn(hidden, dtype=dtype, device=DEVICE)
    big = float(torch.finfo(fp8).max)
    for scale in (0.05, 0.004 if fp8 == torch.float8_e4m3fn else 1e-5):
        for triton_path in (True, False):
            if not triton_path:
                monkeypatch.setattr("pagoda.ops.norm.use_triton", lambda t: False)
            xi, r = x.clone(), r0.clone()
            out = torch.full(x.shape, float("nan"), device=DEVICE).to(fp8)
            if fused:
                assert pagoda.fused_add_rmsnorm_quant(out, xi, r, w, scale, eps=1e-6) is None
                summed = x.double() + r0.double()
                assert torch.equal(xi, x) and rel(r, summed) < TOL[dtype]
                # (a two-pass row normalizes the sum rounded to bf16 by the float sum's rms)
                base = summed if hidden <= 4096 else r.double()
            else:
                assert pagoda.rmsnorm_quant(out, xi, w, scale, eps=1e-6) is out
                summed = base = x.double()
            want = (base * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double() / scale)
            want = want.clamp(-big, big)
            got = out.double()
            assert torch.isfinite(got).all()
            exact = want.to(fp8).double()
            assert (got == exact).double().mean() > 0.99, (scale, triton_path)
            step = 0.13 if fp8 == torch.float8_e4m3fn else 0.26
            assert ((got - want).abs() <= step * want.abs() + 2.0 ** -9).all()
            if scale < 0.01:
                assert (got.abs() == big).any()  # (clamped, not inf / NaN)
            monkeypatch.undo()
    bad_out = torch.empty(9, hidden, dtype=dtype, device=DEVICE)
    with pytest.raises(ValueError, match="out"):
        pagoda.rmsnorm_quant(bad_out, x, w, 1.0)
    for scale in (0.0, -1.0, float("nan"), True, "1"):
        with pytest.raises(ValueError, match="scale"):
            pagoda.rmsnorm_quant(torch.empty(9, hidden, device=DEVICE).to(fp8), x, w, scale)
