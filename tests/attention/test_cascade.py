"""merge_state(s): exact combination of attention over disjoint KV sets (base-2 LSE)."""
import pytest
import torch

import pagoda
from pagoda.attention import reference

from ..conftest import DEVICE
from .helpers import TOL, check_lse, rel_err


def states(n, h, d, dtype, k=None):
    shape = (n, h, d) if k is None else (n, k, h, d)
    v = torch.randn(shape, dtype=dtype, device=DEVICE)
    s = torch.randn(shape[:-1], dtype=torch.float32, device=DEVICE) * 3
    return v, s


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_merge_state_matches_reference(dtype):
    va, sa = states(7, 5, 64, dtype)
    vb, sb = states(7, 5, 64, dtype)
    sa[0, 1] = float("-inf")  # an empty state on one side
    v, s = pagoda.merge_state(va, sa, vb, sb)
    rv, rs = reference.merge_state(va.double(), sa, vb.double(), sb)
    assert rel_err(v, rv) < TOL[dtype]
    check_lse(s, rs, atol=1e-5)
    assert torch.allclose(v[0, 1].float(), vb[0, 1].float(), atol=1e-2), "merging an empty state is the identity"


def test_merge_of_split_attention_equals_full_attention():
    """The defining identity: attention over [A:B] = merge(attention(A), attention(B))."""
    q = torch.randn(3, 8, 64, dtype=torch.float16, device=DEVICE)
    k = torch.randn(70, 2, 64, dtype=torch.float16, device=DEVICE)
    v = torch.randn(70, 2, 64, dtype=torch.float16, device=DEVICE)
    oa, la = pagoda.single_prefill_with_kv_cache(q, k[:25], v[:25], return_lse=True, backend="triton")
    ob, lb = pagoda.single_prefill_with_kv_cache(q, k[25:], v[25:], return_lse=True, backend="triton")
    o, lse = pagoda.merge_state(oa, la, ob, lb)
    ro, rl = reference.attention(q, k, v, compute_dtype=torch.float64, out_dtype=torch.float64)
    assert rel_err(o, ro) < TOL[torch.float16]
    check_lse(lse, rl)


def test_merge_both_empty_gives_zero_and_minus_inf():
    va, sa = states(2, 4, 64, torch.float16)
    vb, sb = states(2, 4, 64, torch.float16)
    sa[:] = float("-inf")
    sb[:] = float("-inf")
    v, s = pagoda.merge_state(va, sa, vb, sb)
    assert torch.equal(v.cpu(), torch.zeros_like(v).cpu()) and torch.isinf(s).all()


@pytest.mark.parametrize("use_mask", [False, True])
def test_merge_state_in_place(use_mask):
    v, s = states(6, 4, 128, torch.bfloat16)
    vo, so = states(6, 4, 128, torch.bfloat16)
    mask = torch.tensor([True, False, True, True, False, True], device=DEVICE) if use_mask else None
    rv, rs = reference.merge_state(v.double(), s, vo.double(), so)
    v0, s0 = v.clone(), s.clone()
    pagoda.merge_state_in_place(v, s, vo, so, mask=mask)
    keep = mask.cpu() if use_mask else torch.ones(6, dtype=torch.bool)
    assert rel_err(v[keep], rv[keep]) < TOL[torch.bfloat16]
    check_lse(s[keep], rs[keep], atol=1e-5)
    if use_mask:
        assert torch.equal(v[~keep].cpu(), v0[~keep].cpu()) and torch.equal(s[~keep].cpu(), s0[~keep].cpu())


@pytest.mark.parametrize("num_states", [1, 3, 10])
def test_merge_states(num_states):
    v, s = states(5, 6, 64, torch.float16, k=num_states)
    s[1, 0] = float("-inf")
    o, lse = pagoda.merge_states(v, s)
    ro, rl = reference.merge_states(v.double(), s)
    assert o.shape == (5, 6, 64) and lse.shape == (5, 6)
    assert rel_err(o, ro) < TOL[torch.float16]
    check_lse(lse, rl, atol=1e-5)


def test_merge_states_equals_pairwise_merges():
    v, s = states(4, 2, 64, torch.float32, k=3)
    o, lse = pagoda.merge_states(v, s)
    o2, l2 = pagoda.merge_state(v[:, 0], s[:, 0], v[:, 1], s[:, 1])
    o3, l3 = pagoda.merge_state(o2, l2, v[:, 2], s[:, 2])
    assert rel_err(o, o3) < 1e-5
    check_lse(lse, l3, atol=1e-5)


def test_merge_bad_input():
    va, sa = states(3, 4, 64, torch.float16)
    with pytest.raises(ValueError, match="s_b"):
        pagoda.merge_state(va, sa, va, sa[:2])
    with pytest.raises(ValueError, match="float32"):
        pagoda.merge_state(va, sa.half(), va, sa)
    with pytest.raises(ValueError, match="v_b"):
        pagoda.merge_state(va, sa, va.float(), sa)
    with pytest.raises(ValueError, match="mask"):
        pagoda.merge_state_in_place(va, sa, va.clone(), sa.clone(), mask=torch.ones(5, dtype=torch.bool))
