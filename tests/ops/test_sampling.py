"""Statistical tests: empirical distributions against the renormalized targets.

With n draws the expected total-variation distance of a correct sampler over v tokens is at
most 0.4 * sqrt(v / n) (0.09 for 500 draws over 24 tokens, 0.004 for 200k). The bounds below
are about twice that: a correct sampler fails them with negligible probability, a wrong filter
moves whole tokens' mass and fails. On the CPU the kernels run in Triton's interpreter, so
fewer draws; on the GPU the same tests use 200k.
"""
import pytest
import torch

import pagoda
from pagoda.ops import sampling as sampling_mod

from ..conftest import DEVICE

N = 200_000 if DEVICE.type == "cuda" else 500
BOUND = 0.8 * (24 / N) ** 0.5 + 0.01


def empirical(tokens, vocab):
    return torch.bincount(tokens.long().cpu(), minlength=vocab).double() / tokens.numel()


def tv(a, b):
    return 0.5 * (a - b).abs().sum().item()


@pytest.fixture
def dist():
    g = torch.Generator().manual_seed(7)
    p = torch.softmax(torch.randn(24, generator=g) * 1.5, 0)
    p[3] = p[5] = p.max()  # ties at the top
    return (p / p.sum()).double()


def rows(p):
    return p.float().to(DEVICE)[None].expand(N, -1).contiguous()


def test_plain_sampling(dist):
    t = pagoda.sampling_from_probs(rows(dist), generator=torch.Generator().manual_seed(1))
    assert tv(empirical(t, 24), dist) < BOUND


@pytest.mark.parametrize("k", [1, 3, 10, 24, 1000])
def test_top_k(dist, k):
    t = pagoda.top_k_sampling_from_probs(rows(dist), k, generator=torch.Generator().manual_seed(2))
    kth = dist.sort(descending=True).values[min(k, 24) - 1]
    target = torch.where(dist >= kth, dist, 0.0)
    target /= target.sum()
    emp = empirical(t, 24)
    assert (emp[target == 0] == 0).all(), "a token outside the top-k was drawn"
    assert tv(emp, target) < BOUND


@pytest.mark.parametrize("top_p", [0.2, 0.5, 0.9, 1.0])
def test_top_p(dist, top_p):
    t = pagoda.top_p_sampling_from_probs(rows(dist), top_p, generator=torch.Generator().manual_seed(3))
    inside = sort_based_keep(dist[None], p=top_p)[0]  # ties with the last kept token stay in
    target = torch.where(inside, dist, 0.0)
    target /= target.sum()
    emp = empirical(t, 24)
    assert (emp[~inside] == 0).all(), "a token outside the nucleus was drawn"
    assert tv(emp, target) < BOUND


def test_min_p_and_joint(dist):
    t = pagoda.min_p_sampling_from_probs(rows(dist), 0.3, generator=torch.Generator().manual_seed(4))
    keep = dist >= 0.3 * dist.max()
    target = torch.where(keep, dist, 0.0) / dist[keep].sum()
    assert tv(empirical(t, 24), target) < BOUND
    t = pagoda.top_k_top_p_sampling_from_logits(rows(dist).log(), 4, 0.5, generator=torch.Generator().manual_seed(5))
    emp = empirical(t, 24)
    kth = dist.sort(descending=True).values[3]
    assert (emp[dist < kth] == 0).all()


def test_top_k_1_is_argmax_and_seeds_repeat():
    p = torch.softmax(torch.randn(64, 300, device=DEVICE), -1)
    assert torch.equal(pagoda.top_k_sampling_from_probs(p, 1).long(), p.argmax(-1))
    a = pagoda.top_p_sampling_from_probs(p, 0.8, generator=torch.Generator().manual_seed(9))
    b = pagoda.top_p_sampling_from_probs(p, 0.8, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


def test_per_request_parameters():
    p = torch.softmax(torch.randn(4, 100, device=DEVICE), -1)
    t = pagoda.top_k_sampling_from_probs(p, torch.tensor([1, 2, 1, 100], device=DEVICE))
    assert t[0] == p[0].argmax() and t[2] == p[2].argmax()
    assert p[1, t[1]] >= p[1].topk(2).values[1]


def test_sampling_bad_input():
    p = torch.softmax(torch.randn(2, 10, device=DEVICE), -1)
    with pytest.raises(ValueError, match="top_p"):
        pagoda.top_p_sampling_from_probs(p, 0.0)
    with pytest.raises(ValueError, match="top_p"):
        pagoda.top_p_sampling_from_probs(p, 1.5)
    with pytest.raises(ValueError, match="top_k"):
        pagoda.top_k_sampling_from_probs(p, 0)
    with pytest.raises(ValueError, match="min_p"):
        pagoda.min_p_sampling_from_probs(p, -0.1)
    bad = p.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pagoda.sampling_from_probs(bad, check_nan=True)
    t = pagoda.sampling_from_probs(bad)  # without the (synchronizing) check: that row says -1
    assert t[1] == -1 and 0 <= t[0] < 10
    neg = p.clone()
    neg[0, 2] = -0.5
    assert pagoda.top_p_sampling_from_probs(neg, 0.9)[0] == -1
    assert (pagoda.sampling_from_probs(torch.zeros(2, 10, device=DEVICE)) == -1).all()
    with pytest.raises(ValueError, match="probs"):
        pagoda.sampling_from_probs(p[0])


def test_device_tensor_parameters_out_of_range(monkeypatch):
    """Parameters in a CUDA tensor are checked in the kernel (reading them on the host would
    synchronize): a row with a bad one samples -1 and a filter writes it as NaN. On the CPU the
    host check is switched off to reach the same kernel path."""
    if DEVICE.type == "cpu":
        monkeypatch.setattr(pagoda.ops.sampling._Param, "_check", lambda *a: None)
    p = torch.softmax(torch.randn(4, 50, device=DEVICE), -1)
    t = pagoda.top_p_sampling_from_probs(p, torch.tensor([0.5, 0.0, 1.5, 1.0], device=DEVICE))
    assert t[1] == -1 and t[2] == -1 and 0 <= t[0] < 50 and 0 <= t[3] < 50
    t = pagoda.top_k_sampling_from_probs(p, torch.tensor([0, 3, 1, -2], dtype=torch.int32, device=DEVICE))
    assert t[0] == -1 and t[3] == -1 and t[2] == p[2].argmax()
    t = pagoda.min_p_sampling_from_probs(p, torch.tensor([0.1, -1.0, 2.0, 0.0], device=DEVICE))
    assert t[1] == -1 and t[2] == -1 and t[0] >= 0 and t[3] >= 0
    r = pagoda.top_k_renorm_probs(p, torch.tensor([0, 3, 1, 2], dtype=torch.int32, device=DEVICE))
    assert torch.isnan(r[0]).all() and torch.isfinite(r[1:]).all()
    r = pagoda.top_p_renorm_probs(p, torch.tensor([0.5, 0.5, 1.5, 0.5], device=DEVICE))
    assert torch.isnan(r[2]).all() and torch.isfinite(r[[0, 1, 3]]).all()


def sort_based_keep(x, k=None, p=None):
    s, order = x.double().sort(-1, descending=True)
    if k is not None:
        thr = s[:, min(k, x.shape[1]) - 1:min(k, x.shape[1])]
    else:
        inside = (s.cumsum(-1) - s) < p * x.double().sum(-1, keepdim=True)
        thr = torch.where(inside, s, float("inf")).min(-1, keepdim=True).values
    return x.double() >= thr


@pytest.mark.parametrize("k", [1, 5, 33, 500])
def test_top_k_renorm_and_mask(k):
    p = torch.softmax(torch.randn(6, 300, device=DEVICE) * 2, -1)
    p[0, 10] = p[0, 11] = p[0].max()  # a tie at the top
    r = pagoda.top_k_renorm_probs(p, k)
    keep = sort_based_keep(p.cpu(), k=k)
    assert torch.equal(r.cpu() > 0, keep)
    assert torch.allclose(r.cpu().double(), torch.where(keep, p.cpu().double(), 0.0)
                          / torch.where(keep, p.cpu().double(), 0.0).sum(-1, keepdim=True), atol=1e-6)
    logits = torch.randn(6, 300, device=DEVICE) * 4 - 2  # mostly negative
    m = pagoda.top_k_mask_logits(logits, k)
    keep = sort_based_keep(logits.cpu(), k=k)
    assert torch.equal(torch.isfinite(m).cpu(), keep)
    assert torch.equal(m.cpu()[keep], logits.cpu()[keep])


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.95, 1.0])
def test_top_p_renorm(top_p):
    p = torch.softmax(torch.randn(5, 257, device=DEVICE) * 2, -1)
    r = pagoda.top_p_renorm_probs(p, top_p)
    keep = sort_based_keep(p.cpu(), p=top_p) if top_p < 1 else torch.ones(5, 257, dtype=torch.bool)
    assert torch.equal(r.cpu() > 0, keep)
    assert torch.allclose(r.sum(-1).cpu(), torch.ones(5), atol=1e-5)


def test_filters_bad_input():
    p = torch.softmax(torch.randn(2, 10, device=DEVICE), -1)
    with pytest.raises(ValueError, match="top_k"):
        pagoda.top_k_renorm_probs(p, 0)
    with pytest.raises(ValueError, match="top_p"):
        pagoda.top_p_renorm_probs(p, 2.0)
    with pytest.raises(ValueError, match="logits"):
        pagoda.top_k_mask_logits(p[0], 3)


def test_top_k_first_order():
    """top_k_first: nucleus of the renormalized top-k; with top_k=2 and top_p=0.5 only the argmax
    (whose renormalized mass is > 0.5 when it beats the runner-up) can be drawn."""
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1]] * 200, device=DEVICE)
    t = pagoda.top_k_top_p_sampling_from_probs(p, 2, 0.5, filter_apply_order="top_k_first")
    assert (t == 0).all()
    t = pagoda.top_k_top_p_sampling_from_probs(p, 3, 0.5, filter_apply_order="joint")
    assert set(t.tolist()) <= {0, 1}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 37, 20000])
@pytest.mark.parametrize("small_grid", [4096, 0])
def test_greedy_sample_matches_argmax(dtype, vocab, small_grid, monkeypatch):
    """One launch, several programs per row (20000 columns: 10 per row of one block each, or 3 of four blocks
    when the grid would be larger than GREEDY_SMALL_GRID): torch.argmax's index, the first of tied maxima (ties
    planted across programs), -1 for rows with NaN / +inf / -inf; repeated calls (the kernel resets its own
    state) and a larger batch after a smaller one."""
    monkeypatch.setattr(sampling_mod, "GREEDY_SMALL_GRID", small_grid)
    g = torch.Generator().manual_seed(vocab)
    for batch in (5, 70, 6):
        x = torch.randn(batch, vocab, generator=g).to(dtype)
        if vocab > 10:
            x[0, vocab - 3] = x[0, 2] = 100.0  # a tie: the first index wins, across programs
            x[4] = -1.0
            x[4, 6], x[4, 9] = -0.0, 0.0  # the maximum 0 first as -0.0: torch.argmax takes index 6
            x[1, 5] = float("nan")
            x[2, vocab - 1] = float("inf")
            x[3, 0] = float("-inf")
        x = x.to(DEVICE)
        want = torch.where(torch.isfinite(x.float()).all(-1), x.float().argmax(-1), -1)
        got = pagoda.greedy_sample(x)
        assert got.dtype == torch.int64 and got.tolist() == want.tolist()
        if vocab > 10:
            assert got[:5].tolist() == [2, -1, -1, -1, 6]
        for dt in (torch.int32, torch.int64):  # next_ids: the same launch writes the next step's input ids too
            nxt = torch.full((batch,), -7, dtype=dt, device=DEVICE)
            got = pagoda.greedy_sample(x, next_ids=nxt)
            assert got.tolist() == want.tolist() and nxt.tolist() == want.clamp(min=0).tolist()


def test_greedy_sample_bad_input():
    for bad in (torch.zeros(3, dtype=torch.int32), torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 0), "x"):
        with pytest.raises(ValueError, match="logits"):
            pagoda.greedy_sample(bad)
    x = torch.randn(3, 10, device=DEVICE)
    for bad in (torch.zeros(4, dtype=torch.int32, device=DEVICE), torch.zeros(3, device=DEVICE),
                torch.zeros(3, 2, dtype=torch.int64, device=DEVICE)[:, 0], [0, 0, 0]):
        with pytest.raises(ValueError, match="next_ids"):
            pagoda.greedy_sample(x, next_ids=bad)


def test_sampling_from_probs_takes_a_seed():
    """seed / offset (FlashInfer's arguments) give a reproducible draw; another seed another one."""
    p = torch.softmax(torch.randn(256, 50, device=DEVICE), -1)
    a = pagoda.sampling_from_probs(p, seed=3, offset=0)
    assert torch.equal(a, pagoda.sampling_from_probs(p, seed=3, offset=0))
    assert not torch.equal(a, pagoda.sampling_from_probs(p, seed=4, offset=0))


def test_chain_speculative_sampling():
    """FlashInfer's documented example exactly (the first draft token always passes, the second never: the
    residual has one token); the emitted tokens follow the target distribution whatever the draft (the first one,
    over many rows, against target[0] when the draft tokens are drawn from the draft distribution); the counters
    (emitted <= accepted, -1 after the drawn token, given tensors added to); seeds repeat; bad input names the
    argument."""
    d = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.2, 0.3, 0.4, 0.1]]], device=DEVICE)
    t = torch.tensor([[[0.0, 0.1, 0.6, 0.3], [1.0, 0.0, 0.0, 0.0], [0.7, 0.1, 0.1, 0.1]]], device=DEVICE)
    out, acc, emit = pagoda.chain_speculative_sampling(d, torch.tensor([[2, 1]], dtype=torch.int32, device=DEVICE), t)
    assert out.tolist() == [[2, 0, -1]] and acc.tolist() == [1] and emit.tolist() == [1]
    g = torch.Generator().manual_seed(0)
    n, vocab, rows_ = 3, 6, 20000 if DEVICE.type == "cuda" else 4000
    q = torch.softmax(torch.randn(n, vocab, generator=g) * 1.5, -1)
    p = torch.softmax(torch.randn(n + 1, vocab, generator=g) * 1.5, -1)
    ids = torch.stack([torch.multinomial(q[i], rows_, replacement=True, generator=g) for i in range(n)], 1)
    dq, tp = q[None].expand(rows_, -1, -1).to(DEVICE), p[None].expand(rows_, -1, -1).to(DEVICE)
    acc0 = torch.full((rows_,), 5, dtype=torch.int32, device=DEVICE)
    out, acc, emit = pagoda.chain_speculative_sampling(dq, ids.to(DEVICE), tp, maybe_output_accepted_token_num=acc0,
                                                       seed=11, offset=2)
    assert acc is acc0
    acc, emit, out = (acc - 5).cpu(), emit.cpu(), out.cpu()
    first = out[:, 0].long()
    assert (first >= 0).all()
    assert tv(empirical(first, vocab), p[0].double()) < 3.0 / rows_ ** 0.5 + 0.01  # (~0.02 of sampling noise)
    # the chance of accepting the first draft token is sum_x min(q(x), p(x))
    rate = (emit >= 1).double().mean().item()
    assert abs(rate - torch.minimum(q[0], p[0]).sum().item()) < 4.5 * (0.25 / rows_) ** 0.5
    assert (emit <= acc).all() and (acc <= n).all()
    k = torch.arange(n + 1)[None]
    assert ((out >= 0) == (k <= emit[:, None])).all()
    assert (out[:, :n][k[:, :n] < emit[:, None]] == ids[k[:, :n] < emit[:, None]]).all()
    again = pagoda.chain_speculative_sampling(dq, ids.to(DEVICE), tp, seed=11, offset=2)[0].cpu()
    assert torch.equal(again, out)
    with pytest.raises(ValueError, match="target_probs"):
        pagoda.chain_speculative_sampling(d, torch.tensor([[2, 1]], device=DEVICE), t[:, :2])
    with pytest.raises(ValueError, match="draft_token_ids"):
        pagoda.chain_speculative_sampling(d, torch.tensor([[2]], device=DEVICE), t)
    with pytest.raises(ValueError, match="draft_token_ids"):
        pagoda.chain_speculative_sampling(d.cpu(), torch.tensor([[2, 9]]), t.cpu())
    with pytest.raises(ValueError, match="maybe_output_emitted_draft_token_num"):
        pagoda.chain_speculative_sampling(d, torch.tensor([[2, 1]], device=DEVICE), t,
                                          maybe_output_emitted_draft_token_num=torch.zeros(3, device=DEVICE))


def test_softmax_with_temperature():
    """softmax(logits / temperature) against float64, per-row temperatures and a scalar; float32 out; a CPU
    temperature <= 0 is a ValueError naming it, a device one's row NaN."""
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(5, 300, generator=g) * 4).to(torch.bfloat16).to(DEVICE)
    t = torch.tensor([0.5, 1.0, 2.0, 0.1, 7.0])
    for temp, tt in ((None, torch.ones(5)), (0.7, torch.full((5,), 0.7)), (t, t), (t.to(DEVICE), t)):
        p = pagoda.softmax(logits, temperature=temp)
        want = torch.softmax(logits.double().cpu() / tt.double()[:, None], -1)
        assert p.dtype == torch.float32 and (p.double().cpu() - want).abs().max() < 1e-6
    for bad in (0.0, -1.0, torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0]), float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            pagoda.softmax(logits, temperature=bad)
    with pytest.raises(ValueError, match="temperature"):
        pagoda.softmax(logits, temperature=torch.ones(4))
    with pytest.raises(ValueError, match="logits"):
        pagoda.softmax(torch.arange(6).view(2, 3))
    if DEVICE.type == "cuda":
        p = pagoda.softmax(logits, temperature=torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0], device=DEVICE))
        assert p[1].isnan().all() and not p[0].isnan().any()


def test_sampling_from_logits(dist):
    """Tokens drawn from softmax(logits) (the empirical distribution within the sampling bound), a seed repeats its
    draw, indices map outputs to rows, NaN logits with check_nan are a ValueError."""
    logits = dist.log().float().to(DEVICE)[None].expand(N, -1).contiguous() + 3.0  # (a shift softmax ignores)
    tokens = pagoda.sampling_from_logits(logits)
    assert tokens.dtype == torch.int32 and tv(empirical(tokens, 24), dist) < BOUND
    a = pagoda.sampling_from_logits(logits[:64], seed=5, offset=0)
    assert torch.equal(a, pagoda.sampling_from_logits(logits[:64], seed=5, offset=0))
    two = torch.tensor([[0.0, 50.0, 0.0], [50.0, 0.0, 0.0]], device=DEVICE)
    idx = torch.tensor([1, 0, 1, 1], dtype=torch.int64, device=DEVICE)
    assert pagoda.sampling_from_logits(two, indices=idx).tolist() == [0, 1, 0, 0]
    with pytest.raises(ValueError, match="NaN"):
        pagoda.sampling_from_logits(torch.tensor([[0.0, float("nan")]], device=DEVICE), check_nan=True)
