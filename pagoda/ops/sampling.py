"""Sampling on the GPU without sorting the vocabulary (FlashInfer names and arguments).

probs: [batch, vocab] float (rows need not be normalized); per-request parameters are
scalars or [batch] tensors. Returns int32 token ids [batch]. ``generator`` (a
torch.Generator) makes draws reproducible: the same seed gives the same tokens.
Bad input raises ValueError naming the argument when it can be seen without reading the GPU:
shapes, dtypes, and parameters given as Python numbers or CPU tensors (top_p outside (0, 1],
top_k < 1, min_p outside [0, 1]); NaN probabilities with ``check_nan=True`` (a device
synchronization, as in FlashInfer; off by default). What can only be seen on the GPU is
reported in the result, never as a token: a row with NaN, negative or infinite probabilities,
zero total mass, or a parameter (given as a CUDA tensor) out of range samples -1; the filters
(top_k_renorm_probs, top_p_renorm_probs, top_k_mask_logits) write that row as NaN.
"""
from __future__ import annotations

import torch
import triton

from ._dispatch import use_triton
from .kernels.sampling import filter_kernel, greedy_kernel, sample_kernel

NONE, TOP_K, TOP_P, MIN_P, TOP_K_TOP_P = 0, 1, 2, 3, 4


class _Param:
    """A sampling parameter: a Python scalar, or a [batch] tensor on the probabilities' device."""

    def __init__(self, name, value, batch, dtype, device, lo, hi, lo_open=False):
        self.name, self.tensor, self.scalar = name, None, value
        if isinstance(value, torch.Tensor):
            if value.dim() == 0 and value.device.type == "cpu":
                self.scalar = value.item()
            else:
                t = value.expand(batch) if value.dim() == 0 else value
                if t.shape != (batch,):
                    raise ValueError(f"{name} must be a scalar or a [{batch}] tensor, got {tuple(t.shape)}")
                if t.device.type == "cpu":  # free to check here; a GPU tensor is checked in the kernel
                    self._check(t, lo, hi, lo_open)
                self.tensor = t.to(device=device, dtype=dtype).contiguous()
                return
        if not isinstance(self.scalar, (int, float)):
            raise ValueError(f"{name} must be a number or a tensor, got {type(value).__name__}")
        self._check(torch.tensor([self.scalar], dtype=torch.float64), lo, hi, lo_open)
        self.scalar = int(self.scalar) if dtype == torch.int32 else float(self.scalar)
        self.dtype, self.batch, self.device = dtype, batch, device

    def _check(self, t, lo, hi, lo_open):
        bad = (t <= lo) if lo_open else (t < lo)
        bad |= (t > hi) | torch.isnan(t.double())
        if bad.any():
            raise ValueError(f"{self.name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {t.tolist()[:8]}")

    def as_tensor(self):
        if self.tensor is not None:
            return self.tensor
        return torch.full((self.batch,), self.scalar, dtype=self.dtype, device=self.device)

    def kernel_args(self, dummy):
        """(pointer, scalar, per-row flag) for a kernel launch."""
        if self.tensor is not None:
            return self.tensor, 0, True
        return dummy, self.scalar, False


def _seed_offset(generator, seed=None, offset=None):
    """Philox seed and offset for one call: an explicit seed (and offset), as FlashInfer's ops take them; else a
    CUDA generator advances its own offset (no device read, so no synchronization); any other generator (or the
    default CPU one) draws them."""
    if seed is not None:
        return int(seed) & 0x7FFFFFFF, int(offset or 0) & 0x3FFFFFFF
    if generator is not None and generator.device.type == "cuda":
        seed, off = generator.initial_seed() & 0x7FFFFFFF, generator.get_offset()
        generator.set_offset(off + 4)
        return seed, (off // 4) & 0x3FFFFFFF
    draw = torch.randint(0, 2**31 - 1, (2,), generator=generator)
    return int(draw[0]), int(draw[1]) & 0x3FFFFFFF


def _sample(probs, filt, top_k=None, top_p=None, min_p=None, indices=None, generator=None, check_nan=False,
            seed=None, offset=None):
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2 or not probs.dtype.is_floating_point:
        raise ValueError(f"probs must be a float [batch, vocab] tensor, got {getattr(probs, 'shape', probs)}")
    if indices is not None:
        probs = probs[indices.long()]
    if probs.stride(-1) != 1:
        probs = probs.contiguous()
    batch, vocab = probs.shape
    dev = probs.device
    if check_nan and torch.isnan(probs).any():
        raise ValueError("probs contains NaN")
    k = _Param("top_k", top_k if top_k is not None else 1, batch, torch.int32, dev, 1, 2**31 - 1)
    p = _Param("top_p", top_p if top_p is not None else 1.0, batch, torch.float32, dev, 0.0, 1.0, lo_open=True)
    m = _Param("min_p", min_p if min_p is not None else 0.0, batch, torch.float32, dev, 0.0, 1.0)
    out = torch.empty(batch, dtype=torch.int32, device=dev)
    if batch == 0:
        return out
    seed, offset = _seed_offset(generator, seed, offset)
    if not use_triton(probs):
        return _sample_torch(probs.float(), filt, k.as_tensor(), p.as_tensor(), m.as_tensor(), seed,
                             offset).to(torch.int32)
    kt, kv, kr = k.kernel_args(out)
    pt, pv, pr = p.kernel_args(out)
    mt, mv, mr = m.kernel_args(out)
    block = min(4096, max(16, triton.next_power_of_2(vocab)))
    sample_kernel[(batch,)](probs, out, kt, pt, mt, kv, pv, mv, probs.stride(0), vocab, seed, offset,
                            FILTER=filt, K_ROWS=kr, P_ROWS=pr, M_ROWS=mr, BLOCK=block,
                            num_warps=max(1, min(16, block // 256)))
    return out


def _sample_torch(probs, filt, k, p, m, seed, offset):
    """PyTorch form (CPU fallback): filter by sorting, then inverse-CDF sampling."""
    g = torch.Generator(device=probs.device).manual_seed(seed + offset)
    keep = torch.ones_like(probs, dtype=torch.bool)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    if filt in (TOP_K, TOP_K_TOP_P):
        kth = sorted_p.gather(1, (k.long().clamp(max=probs.shape[1]) - 1)[:, None])
        keep &= probs >= kth
    if filt in (TOP_P, TOP_K_TOP_P):
        above = sorted_p.cumsum(-1) - sorted_p  # mass strictly before each sorted position
        inside = above < p[:, None] * probs.sum(-1, keepdim=True)
        keep &= torch.zeros_like(keep).scatter(1, order, inside)
    if filt == MIN_P:
        keep &= probs >= m[:, None] * probs.max(-1, keepdim=True).values
    w = torch.where(keep, probs, 0.0)
    invalid = ~(torch.isfinite(probs).all(-1) & (probs >= 0).all(-1) & (probs.sum(-1) > 0))
    invalid |= (k < 1) | ~((p > 0) & (p <= 1)) | ~((m >= 0) & (m <= 1))  # device tensors, unchecked
    w[invalid] = 1.0
    tokens = torch.multinomial(w, 1, generator=g)[:, 0]
    return torch.where(invalid, -1, tokens)


def sampling_from_probs(probs, indices=None, deterministic=True, generator=None, check_nan=False, seed=None,
                        offset=None):
    """Sample one token per row from probs (seed / offset: a reproducible draw instead of the generator's)."""
    return _sample(probs, NONE, indices=indices, generator=generator, check_nan=check_nan, seed=seed, offset=offset)


def top_k_sampling_from_probs(probs, top_k, indices=None, deterministic=True, generator=None, check_nan=False):
    """Sample among the top_k most likely tokens (ties at the k-th probability are kept)."""
    return _sample(probs, TOP_K, top_k=top_k, indices=indices, generator=generator, check_nan=check_nan)


def top_p_sampling_from_probs(probs, top_p, indices=None, deterministic=True, generator=None, check_nan=False):
    """Sample from the nucleus: the most likely tokens whose preceding mass is below top_p."""
    return _sample(probs, TOP_P, top_p=top_p, indices=indices, generator=generator, check_nan=check_nan)


def min_p_sampling_from_probs(probs, min_p, indices=None, deterministic=True, generator=None, check_nan=False):
    """Sample among tokens with p >= min_p * max(p)."""
    return _sample(probs, MIN_P, min_p=min_p, indices=indices, generator=generator, check_nan=check_nan)


def top_k_top_p_sampling_from_probs(probs, top_k, top_p, indices=None, filter_apply_order="top_k_first",
                                    deterministic=True, generator=None, check_nan=False):
    """Sample with both filters: "joint" applies both to the original probabilities; "top_k_first"
    renormalizes the top-k set first and takes the nucleus of that."""
    if filter_apply_order == "top_k_first":
        return _sample(top_k_renorm_probs(probs if indices is None else probs[indices.long()], top_k), TOP_P,
                       top_p=top_p, generator=generator, check_nan=check_nan)
    if filter_apply_order != "joint":
        raise ValueError(f"filter_apply_order must be 'top_k_first' or 'joint', got {filter_apply_order!r}")
    return _sample(probs, TOP_K_TOP_P, top_k=top_k, top_p=top_p, indices=indices, generator=generator,
                   check_nan=check_nan)


def top_k_top_p_sampling_from_logits(logits, top_k, top_p, indices=None, filter_apply_order="top_k_first",
                                     deterministic=True, generator=None, check_nan=False):
    """softmax(logits) then top_k_top_p_sampling_from_probs."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError("logits must be a [batch, vocab] tensor")
    return top_k_top_p_sampling_from_probs(torch.softmax(logits.float(), dim=-1), top_k, top_p, indices,
                                           filter_apply_order, deterministic, generator, check_nan)


def softmax(logits, temperature=None, enable_pdl=None) -> torch.Tensor:
    """softmax(logits / temperature) of each row, float32 [batch, vocab] (FlashInfer's sampling.softmax; PyTorch's
    softmax kernel). temperature: None (1), a float > 0, or a [batch] tensor of each row's (a CUDA tensor is not
    read back: a row of temperature <= 0 or NaN gives NaN probabilities, which the samplers answer with -1).
    enable_pdl: accepted for FlashInfer's signature (PyTorch's kernel)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be a float [batch, vocab] tensor, got {getattr(logits, 'shape', logits)}")
    x = logits.float()
    if temperature is not None:
        t = _Param("temperature", temperature, logits.shape[0], torch.float32, logits.device, 0.0, float("inf"),
                   lo_open=True)
        if t.tensor is not None:
            bad = ~(t.tensor > 0)  # (NaN and <= 0: NaN rows, as the docstring says)
            x = x / torch.where(bad, float("nan"), t.tensor)[:, None]
        elif t.scalar != 1.0:
            x = x / t.scalar
    return torch.softmax(x, dim=-1)


def sampling_from_logits(logits, indices=None, deterministic=True, generator=None, check_nan=False, seed=None,
                         offset=None):
    """Sample one token per row from softmax(logits) (FlashInfer's name; indices / seed / offset as
    sampling_from_probs'). check_nan: NaN logits are a ValueError (a device synchronization)."""
    probs = softmax(logits)
    if check_nan and torch.isnan(logits).any():
        raise ValueError("logits hold NaN")
    return sampling_from_probs(probs, indices, deterministic, generator, False, seed, offset)


def _filter(x, mode, top_k=None, top_p=None, name="probs"):
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be a float [batch, vocab] tensor, got {getattr(x, 'shape', x)}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    batch, vocab = x.shape
    k = _Param("top_k", top_k if top_k is not None else 1, batch, torch.int32, x.device, 1, 2**31 - 1)
    p = _Param("top_p", top_p if top_p is not None else 1.0, batch, torch.float32, x.device, 0.0, 1.0,
               lo_open=True)
    out = torch.empty_like(x)
    if batch == 0:
        return out
    if not use_triton(x):
        xf = x.float()
        kk, pp = k.as_tensor(), p.as_tensor()
        if mode == 1:
            s, order = xf.sort(-1, descending=True)
            inside = (s.cumsum(-1) - s) < pp[:, None] * xf.sum(-1, keepdim=True)
            thr = torch.where(inside, s, float("inf")).min(-1, keepdim=True).values
            invalid = ~((pp > 0) & (pp <= 1))
        else:
            kc = kk.long().clamp(1, vocab)
            thr = xf.topk(int(kc.max()), dim=-1).values.gather(1, (kc - 1)[:, None])
            invalid = kk < 1
        keep = xf >= thr
        y = torch.where(keep, xf, float("-inf")) if mode == 2 else torch.where(keep, xf, 0.0)
        if mode != 2:
            y = y / y.sum(-1, keepdim=True)
        y[invalid] = float("nan")
        return out.copy_(y.to(out.dtype))
    kt, kv, kr = k.kernel_args(out)
    pt, pv, pr = p.kernel_args(out)
    block = min(4096, max(16, triton.next_power_of_2(vocab)))
    filter_kernel[(batch,)](x, out, kt, pt, kv, pv, x.stride(0), out.stride(0), vocab, MODE=mode, K_ROWS=kr,
                            P_ROWS=pr, BLOCK=block, num_warps=max(1, min(16, block // 256)))
    return out


def top_k_renorm_probs(probs, top_k):
    """Keep the top_k most likely tokens (ties at the k-th value kept), renormalized; others 0."""
    return _filter(probs, 0, top_k=top_k)


def top_p_renorm_probs(probs, top_p):
    """Keep the nucleus (tokens whose more likely mass is below top_p), renormalized; others 0."""
    return _filter(probs, 1, top_p=top_p)


def top_k_mask_logits(logits, top_k):
    """Logits of the top_k largest kept, the others set to -inf."""
    return _filter(logits, 2, top_k=top_k, name="logits")


_GREEDY_STATE: dict = {}  # device -> (keys, count) of greedy_kernel, reset by each launch
GREEDY_SMALL_GRID = 4096  # greedy_kernel takes one block a program up to this many programs, else four


def greedy_sample(logits: torch.Tensor, next_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy decoding of logits [batch, vocab] (any float dtype): int64 [batch], the first index of each
    row's maximum (torch.argmax's choice), or -1 for a row with a NaN or an infinite logit. One launch
    for the whole batch on the GPU (several programs per row, reducing through a small per-device state
    that each launch resets: calls on one stream, or synchronized, as a serving loop makes them); the
    PyTorch form elsewhere. next_ids (pagoda's, for a serving loop): an integer [batch] tensor on logits'
    device that also gets the indices, -1 written as 0 (the next decode step's input ids, in the same
    launch)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be a float [batch, vocab] tensor, got {getattr(logits, 'shape', logits)}")
    batch, vocab = logits.shape
    if vocab == 0:
        raise ValueError("logits must have at least one column")
    if next_ids is not None and (not isinstance(next_ids, torch.Tensor) or tuple(next_ids.shape) != (batch,)
                                 or next_ids.dtype not in (torch.int32, torch.int64)
                                 or next_ids.device != logits.device or not next_ids.is_contiguous()):
        raise ValueError(f"next_ids must be a contiguous int32 / int64 [{batch}] tensor on {logits.device}, got "
                         f"{getattr(next_ids, 'dtype', type(next_ids))} {tuple(getattr(next_ids, 'shape', ()))}")
    if not use_triton(logits):
        out = torch.where(torch.isfinite(logits).all(-1), logits.argmax(-1), -1)
        if next_ids is not None:
            next_ids.copy_(out.clamp(min=0))
        return out
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    if batch == 0:
        return out
    state = _GREEDY_STATE.get(logits.device)
    if state is None or state[0].numel() < batch:
        n = max(batch, 2 * state[0].numel() if state is not None else 64)
        state = (torch.full((n,), -2**63, dtype=torch.int64, device=logits.device),
                 torch.zeros(n, dtype=torch.int32, device=logits.device))
        _GREEDY_STATE[logits.device] = state
    block = min(2048, triton.next_power_of_2(vocab))
    # one block per program while the grid stays small (a 128k vocabulary: 63 programs a row, one load round
    # each), 4 blocks per program for large batches
    span = block if batch * triton.cdiv(vocab, block) <= GREEDY_SMALL_GRID else block * 4
    greedy_kernel[(batch, triton.cdiv(vocab, span))](logits, out, *state, logits.stride(0), vocab, span,
                                                     BLOCK=block, NEXT=next_ids, num_warps=4)
    return out


def chain_speculative_sampling(draft_probs, draft_token_ids, target_probs, maybe_output_accepted_token_num=None,
                               maybe_output_emitted_draft_token_num=None, deterministic=True, generator=None,
                               seed=None, offset=None):
    """Verify a chain of draft tokens against the target model (speculative sampling, Chen et al. 2023), as
    FlashInfer's ``chain_speculative_sampling``: draft token i of row b is accepted while u_i * q < p (q, p: the
    draft's and the target's probability of that token at position i, u_i uniform); at the first rejection the
    output's position i is drawn from max(0, target - draft) at i, renormalized (from target itself where that
    is all zero); when all are accepted, position n (the bonus token) is drawn from target[:, n]. The emitted
    tokens are distributed as the target model's.

    draft_probs [batch, n, vocab], draft_token_ids [batch, n], target_probs [batch, n + 1, vocab]. Returns
    (output_token_ids int32 [batch, n + 1], -1 after the first drawn token; accepted_num int32 [batch], the draft
    tokens that pass their test each on its own (a measure of the models' agreement); emitted_num int32 [batch],
    the accepted prefix's length). Given output tensors are added to in place, as FlashInfer does. Randomness:
    ``generator``, or ``seed`` (and ``offset``) for a reproducible draw; not the Philox stream of FlashInfer's
    kernel, so the same seed gives the same tokens here but not the ones FlashInfer would draw. PyTorch on any
    device (a handful of [batch, vocab] operations a step)."""
    for name, t in (("draft_probs", draft_probs), ("target_probs", target_probs)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a float [batch, n, vocab] tensor, got {getattr(t, 'shape', t)}")
    b, n, vocab = draft_probs.shape
    if tuple(target_probs.shape) != (b, n + 1, vocab):
        raise ValueError(f"target_probs must be [{b}, {n + 1}, {vocab}] (one more position than draft_probs), got "
                         f"{tuple(target_probs.shape)}")
    if (not isinstance(draft_token_ids, torch.Tensor) or tuple(draft_token_ids.shape) != (b, n)
            or draft_token_ids.dtype.is_floating_point):
        raise ValueError(f"draft_token_ids must be an integer [{b}, {n}] tensor, got "
                         f"{getattr(draft_token_ids, 'shape', draft_token_ids)}")
    dev = draft_probs.device
    if target_probs.device != dev or draft_token_ids.device != dev:
        raise ValueError(f"draft_token_ids and target_probs must be on {dev} like draft_probs")
    ids = draft_token_ids.long()
    if ids.numel() and (draft_token_ids.device.type == "cpu") and not ((ids >= 0) & (ids < vocab)).all():
        raise ValueError(f"draft_token_ids must be in 0..{vocab - 1}")
    ids = ids.clamp(0, max(vocab - 1, 0))  # (a device tensor is not read back to check it)
    outs = []
    for name, t in (("maybe_output_accepted_token_num", maybe_output_accepted_token_num),
                    ("maybe_output_emitted_draft_token_num", maybe_output_emitted_draft_token_num)):
        if t is None:
            t = torch.zeros(b, dtype=torch.int32, device=dev)
        elif not isinstance(t, torch.Tensor) or tuple(t.shape) != (b,) or t.device != dev:
            raise ValueError(f"{name} must be a [{b}] tensor on {dev}, got {getattr(t, 'shape', t)}")
        outs.append(t)
    out = torch.full((b, n + 1), -1, dtype=torch.int32, device=dev)
    if b == 0:
        return out, outs[0], outs[1]
    seed, offset = _seed_offset(generator, seed, offset)
    g = torch.Generator(device=dev).manual_seed(seed * 1000003 + offset)
    u = torch.rand((b, n + 1), generator=g, device=dev)
    draft, target = draft_probs.float(), target_probs.float()
    q = draft.gather(2, ids[..., None])[..., 0]
    p = target[:, :n].gather(2, ids[..., None])[..., 0]
    accepted = u[:, :n] * q < p
    emitted = accepted.int().cumprod(1).sum(1)  # the accepted prefix
    rows = torch.arange(b, device=dev)
    final = target[rows, emitted]  # [b, vocab]: the bonus row where all were accepted
    resid = (final - torch.cat([draft, torch.zeros_like(draft[:, :1])], 1)[rows, emitted]).clamp(min=0)
    resid = torch.where(resid.sum(-1, keepdim=True) > 0, resid, final)
    cdf = resid.cumsum(-1)
    token = torch.searchsorted(cdf, (u[:, n] * cdf[:, -1])[:, None], right=True)[:, 0].clamp(max=vocab - 1)
    pos = torch.arange(n, device=dev)[None, :]
    out[:, :n] = torch.where(pos < emitted[:, None], ids, -1).to(torch.int32)
    out[rows, emitted] = token.to(torch.int32)
    outs[0] += accepted.sum(1).to(outs[0].dtype)
    outs[1] += emitted.to(outs[1].dtype)
    return out, outs[0], outs[1]
