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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,n,k", [(1, 40, 64), (2, 37, 70)])
def test_small_m_kernel_silu_and_mul(dtype, rows, n, k):
    """activation='silu_and_mul': x = [gate | up] (2K columns), silu(gate) * up applied inside the kernel, K
    masked or not; against float64 (with the activation rounded to dtype, as the separate op stores it), and
    the torch path gives the same."""
    x = torch.randn(rows, 2 * k, dtype=dtype, device=DEVICE) * 2
    w = torch.randn(n, k, dtype=dtype, device=DEVICE) / k ** 0.5
    out = torch.full((rows, n), float("nan"), dtype=dtype, device=DEVICE)
    pagoda.ops.linear(x, w, out=out, small_m=True, activation="silu_and_mul")
    g, u = x[:, :k].double(), x[:, k:].double()
    h = (g * torch.sigmoid(g) * u).to(dtype).double()
    assert rel(out, h @ w.double().T) < TOL[dtype]
    torch_path = pagoda.ops.linear(x, w, small_m=False, activation="silu_and_mul")
    assert rel(torch_path, h @ w.double().T) < TOL[dtype]
    with pytest.raises(ValueError, match="silu_and_mul"):
        pagoda.ops.linear(x[:, :k], w, activation="silu_and_mul")
    with pytest.raises(ValueError, match="activation"):
        pagoda.ops.linear(x, w, activation="gelu")


def _rms_ref(h, g, eps):
    h = h.double()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * g.double()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,n,k", [(1, 40, 64), (3, 37, 70), (16, 33, 100)])
@pytest.mark.parametrize("fused_add", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_small_m_kernel_rmsnorm(dtype, rows, n, k, fused_add, bias):
    """norm_weight: rmsnorm(x) (or, with residual, of h = x + residual, which lands in residual_out) in front
    of the projection, inside the kernel: against float64; x, residual and norm weight random with a non-zero
    mean (the norm is not the identity), outputs poisoned; the torch path gives the same."""
    x = torch.randn(rows, k, dtype=dtype, device=DEVICE) * 3 + 0.5
    r = torch.randn(rows, k, dtype=dtype, device=DEVICE) * 2 if fused_add else None
    g = torch.rand(k, dtype=dtype, device=DEVICE) + 0.5
    w = torch.randn(n, k, dtype=dtype, device=DEVICE) / k ** 0.5
    b = torch.randn(n, dtype=dtype, device=DEVICE) if bias else None
    eps = 1e-5
    h = (x.double() + r.double()).to(dtype) if fused_add else x
    ref = _rms_ref(h, g, eps) @ w.double().T + (b.double() if bias else 0.0)
    for small_m in (True, False):
        out = torch.full((rows, n), float("nan"), dtype=dtype, device=DEVICE)
        r_out = torch.full((rows, k), float("nan"), dtype=dtype, device=DEVICE) if fused_add else None
        pagoda.ops.linear(x, w, b, out=out, small_m=small_m, norm_weight=g, eps=eps, residual=r, residual_out=r_out)
        assert rel(out, ref) < TOL[dtype], small_m
        if fused_add:  # x + residual rounded to the dtype (to nearest on the GPU; Triton's interpreter truncates
            # float32 -> bfloat16 whatever the rounding asked for: one unit in the last place there)
            if DEVICE.type == "cuda" or not small_m:
                assert torch.equal(r_out.cpu(), h.cpu())
            else:
                ulp = 2.0 ** -(7 if dtype == torch.bfloat16 else 10)
                assert ((r_out.double() - h.double()).abs() <= h.double().abs() * ulp).all()


def test_small_m_rmsnorm_bad_input():
    x = torch.randn(1, 32, dtype=torch.bfloat16)
    w = torch.randn(16, 32, dtype=torch.bfloat16)
    g = torch.ones(32, dtype=torch.bfloat16)
    r = torch.randn(1, 32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="norm_weight"):
        pagoda.ops.linear(x, w, norm_weight=torch.ones(31))
    with pytest.raises(ValueError, match="norm_weight"):
        pagoda.ops.linear(x, w, norm_weight=torch.ones(32, dtype=torch.int32))
    with pytest.raises(ValueError, match="eps"):
        pagoda.ops.linear(x, w, norm_weight=g, eps=-1.0)
    with pytest.raises(ValueError, match="residual needs norm_weight"):
        pagoda.ops.linear(x, w, residual=r, residual_out=torch.empty_like(r))
    with pytest.raises(ValueError, match="residual_out"):
        pagoda.ops.linear(x, w, norm_weight=g, residual=r)
    with pytest.raises(ValueError, match="residual_out must not alias"):
        pagoda.ops.linear(x, w, norm_weight=g, residual=r, residual_out=r)
    with pytest.raises(ValueError, match="residual must be"):
        pagoda.ops.linear(x, w, norm_weight=g, residual=r.float(), residual_out=torch.empty_like(r))
    with pytest.raises(ValueError, match="do not combine"):
        pagoda.ops.linear(torch.randn(1, 64, dtype=torch.bfloat16), w, norm_weight=g, activation="silu_and_mul")
