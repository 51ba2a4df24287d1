"""Customizable attention: variants written as plain Triton functions (FlashInfer's JIT variants,
the Python way), and FlashInfer's custom masks.

A variant is two optional ``@triton.jit`` functions that the attention kernel receives as
``tl.constexpr`` arguments and calls on each [rows, cols] tile of logits:

    score_mod(score, batch_idx, qo_head_idx, q_pos, kv_pos, params) -> new score
    mask_mod(batch_idx, qo_head_idx, q_pos, kv_pos, params) -> bool (True: keep)

``score`` is the float32 tile of natural-log logits ``q.k * sm_scale`` ([rows, cols]);
``qo_head_idx`` [rows, 1] and ``q_pos`` [rows, 1] describe the rows, ``kv_pos`` [1, cols] the
columns; ``batch_idx`` is the request (a scalar). Positions are in the request's KV
coordinates: query i of a request with qo_len queries and kv_len keys has
``q_pos = kv_len - qo_len + i`` (so ``kv_pos <= q_pos`` is causal, decode's query has
``q_pos = kv_len - 1``). ``params`` points at the variant's float32 parameter tensor (ALiBi
slopes, a per-head bias, window sizes...). Both functions must broadcast their inputs to
[rows, cols]. Each variant also has a PyTorch form of the same math (``torch_score_mod`` /
``torch_mask_mod`` over [heads, q, k] float64 tensors), which ``backend="torch"`` and the
tests use.

Tiles that the mask (mask_mod, causal, window, custom mask) leaves empty are skipped before
any K/V is loaded. Compiling a new variant is one Triton compilation of the attention kernel
(seconds); it is cached like any Triton kernel.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl


def _jit_types():
    types = [triton.runtime.JITFunction]
    try:  # under TRITON_INTERPRET=1, @triton.jit makes an InterpretedFunction
        from triton.runtime.interpreter import InterpretedFunction
        types.append(InterpretedFunction)
    except ImportError:  # pragma: no cover - other Triton versions
        pass
    return tuple(types)


_JIT_TYPES = _jit_types()


class AttentionVariant:
    """A named pair of (score_mod, mask_mod) Triton functions, their PyTorch forms and parameters.

    Example (ALiBi, as ``pagoda.variants.alibi`` builds it)::

        @triton.jit
        def alibi_score(score, b, h, q_pos, kv_pos, params):
            return score + tl.load(params + h) * (kv_pos - q_pos).to(tl.float32)

        v = pagoda.AttentionVariant("alibi", score_mod=alibi_score,
                                    torch_score_mod=lambda s, b, h, q, k, p: s + p[h] * (k - q),
                                    params=slopes)
        wrapper = pagoda.BatchPrefillWithPagedKVCacheWrapper(ws, variant=v)

    ``kv_ranges`` (optional, host side): ``f(q_first, q_last, kv_len) -> [(lo, hi), ...]`` over NumPy
    arrays (one entry per query tile: the KV positions of its first and last query, its request's
    kv_len), the KV intervals a tile may see. The planner schedules only those (a sliding window
    then costs the window, not the causal triangle); the mask still decides inside them. Without
    it every block of the tile's range is visited and masked.
    """

    def __init__(self, name: str, *, score_mod=None, mask_mod=None, torch_score_mod=None, torch_mask_mod=None,
                 params: torch.Tensor | None = None, kv_ranges=None):
        if not isinstance(name, str) or not name:
            raise ValueError("AttentionVariant needs a non-empty name")
        for fname, fn, tfn, tname in (("score_mod", score_mod, torch_score_mod, "torch_score_mod"),
                                      ("mask_mod", mask_mod, torch_mask_mod, "torch_mask_mod")):
            if fn is not None and not isinstance(fn, _JIT_TYPES):
                raise ValueError(f"variant {name!r}: {fname} must be a @triton.jit function, got {type(fn).__name__}")
            if (fn is None) != (tfn is None):
                raise ValueError(f"variant {name!r}: {fname} and {tname} go together (the kernel and the "
                                 f"PyTorch reference must compute the same thing)")
            if tfn is not None and not callable(tfn):
                raise ValueError(f"variant {name!r}: {tname} must be callable")
        if score_mod is None and mask_mod is None:
            raise ValueError(f"variant {name!r} has neither a score_mod nor a mask_mod")
        if params is not None:
            if not isinstance(params, torch.Tensor) or params.dtype != torch.float32 or params.dim() != 1:
                raise ValueError(f"variant {name!r}: params must be a 1-D float32 tensor, got "
                                 f"{getattr(params, 'dtype', type(params))} {tuple(getattr(params, 'shape', ()))}")
            params = params.contiguous()
        if kv_ranges is not None and not callable(kv_ranges):
            raise ValueError(f"variant {name!r}: kv_ranges must be callable")
        self.name = name
        self.kv_ranges = kv_ranges
        self.score_mod, self.mask_mod = score_mod, mask_mod
        self.torch_score_mod, self.torch_mask_mod = torch_score_mod, torch_mask_mod
        self.params = params

    def __repr__(self) -> str:
        return f"AttentionVariant({self.name!r})"

    def params_on(self, device: torch.device) -> torch.Tensor | None:
        if self.params is None:
            return None
        if self.params.device != device:
            self.params = self.params.to(device)
        return self.params

    # -- the PyTorch form, used by backend="torch" and the tests --------------------------------
    def apply_torch(self, logits: torch.Tensor, batch_idx: int, q_pos: torch.Tensor, kv_pos: torch.Tensor):
        """logits [heads, q, k] (natural log, after sm_scale) -> (logits, keep [heads, q, k] bool or None)."""
        h = torch.arange(logits.shape[0], device=logits.device)[:, None, None]
        qp, kp = q_pos[None, :, None], kv_pos[None, None, :]
        params = self.params.to(logits.device) if self.params is not None else None
        keep = None
        if self.torch_score_mod is not None:
            out = self.torch_score_mod(logits, batch_idx, h, qp, kp, params)
            if not isinstance(out, torch.Tensor) or out.shape != logits.shape:
                raise ValueError(f"variant {self.name!r}: torch_score_mod must return a tensor of shape "
                                 f"{tuple(logits.shape)}, got {tuple(getattr(out, 'shape', ()))}")
            logits = out.to(logits.dtype)
        if self.torch_mask_mod is not None:
            m = self.torch_mask_mod(batch_idx, h, qp, kp, params)
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
                raise ValueError(f"variant {self.name!r}: torch_mask_mod must return a bool tensor, got "
                                 f"{getattr(m, 'dtype', type(m))}")
            try:
                keep = torch.broadcast_to(m, logits.shape)
            except RuntimeError:
                raise ValueError(f"variant {self.name!r}: torch_mask_mod returned shape {tuple(m.shape)}, which "
                                 f"does not broadcast to {tuple(logits.shape)}") from None
        return logits, keep


def check_variant(variant) -> AttentionVariant | None:
    if variant is not None and not isinstance(variant, AttentionVariant):
        raise ValueError(f"variant must be a pagoda.AttentionVariant or None, got {type(variant).__name__}")
    return variant


# -- built-in variants ---------------------------------------------------------------------------
@triton.jit
def _alibi_score(score, b, h, q_pos, kv_pos, params):
    return score + tl.load(params + h) * (kv_pos - q_pos).to(tl.float32)


def alibi(slopes: torch.Tensor) -> AttentionVariant:
    """ALiBi (Press et al.): logit + slope[h] * (kv_pos - q_pos). slopes: [num_qo_heads] float32
    (``alibi_slopes(num_heads)`` gives the paper's geometric sequence). Combine with causal=True."""
    if not isinstance(slopes, torch.Tensor) or slopes.dim() != 1:
        raise ValueError("alibi slopes must be a 1-D tensor [num_qo_heads]")
    return AttentionVariant("alibi", score_mod=_alibi_score, params=slopes.float(),
                            torch_score_mod=lambda s, b, h, q, k, p: s + p[h].to(s.dtype) * (k - q).to(s.dtype))


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The ALiBi paper's slopes: 2^(-8 i / n) for the closest power of two n, interleaved beyond it."""
    n = 2 ** math.floor(math.log2(num_heads))
    base = [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]
    extra = [2.0 ** (-4.0 * (2 * i + 1) / n) for i in range(num_heads - n)]
    return torch.tensor(base + extra, dtype=torch.float32)


@triton.jit
def _softcap_score(score, b, h, q_pos, kv_pos, params):
    cap = tl.load(params)
    x = score / cap
    e = tl.exp2(-2.8853900817779268 * tl.abs(x))  # tanh through exp2, as the kernel's own soft cap
    t = (1.0 - e) / (1.0 + e)
    return cap * tl.where(x >= 0, t, -t)


def soft_cap(cap: float) -> AttentionVariant:
    """Gemma-2's logits soft cap, cap * tanh(logit / cap), as a variant (the wrappers'
    ``logits_soft_cap=`` does the same inside the kernel)."""
    if not (isinstance(cap, (int, float)) and cap > 0):
        raise ValueError(f"soft cap must be a positive float, got {cap!r}")
    return AttentionVariant("soft_cap", score_mod=_softcap_score, params=torch.tensor([float(cap)]),
                            torch_score_mod=lambda s, b, h, q, k, p: p[0].to(s.dtype) * torch.tanh(s / p[0]))


@triton.jit
def _causal_mask(b, h, q_pos, kv_pos, params):
    return kv_pos <= q_pos


def causal() -> AttentionVariant:
    """Causal masking as a mask_mod (the wrappers' ``causal=True`` does it without a variant)."""
    return AttentionVariant("causal", mask_mod=_causal_mask, torch_mask_mod=lambda b, h, q, k, p: k <= q,
                            kv_ranges=lambda q0, q1, n: [(0, q1 + 1)])


@triton.jit
def _window_mask(b, h, q_pos, kv_pos, params):
    w = tl.load(params).to(tl.int32)
    return (kv_pos <= q_pos) & (kv_pos >= q_pos - w)


def sliding_window(window_left: int) -> AttentionVariant:
    """Causal sliding window as a mask_mod: kv_pos in [q_pos - window_left, q_pos]. (``window_left=``
    in plan() does the same and also trims each tile's KV range in the planner.)"""
    if not isinstance(window_left, int) or window_left < 0:
        raise ValueError(f"window_left must be an int >= 0, got {window_left!r}")
    return AttentionVariant("sliding_window", mask_mod=_window_mask, params=torch.tensor([float(window_left)]),
                            torch_mask_mod=lambda b, h, q, k, p: (k <= q) & (k >= q - int(p[0])),
                            kv_ranges=lambda q0, q1, n: [(q0 - window_left, q1 + 1)])


@triton.jit
def _sink_window_mask(b, h, q_pos, kv_pos, params):
    sinks = tl.load(params).to(tl.int32)
    w = tl.load(params + 1).to(tl.int32)
    return (kv_pos <= q_pos) & ((kv_pos < sinks) | (kv_pos >= q_pos - w))


def sink_window(sink_tokens: int, window_left: int) -> AttentionVariant:
    """StreamingLLM: causal, the first ``sink_tokens`` keys always visible, the rest within a
    sliding window of ``window_left`` keys."""
    for n, v in (("sink_tokens", sink_tokens), ("window_left", window_left)):
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"{n} must be an int >= 0, got {v!r}")
    return AttentionVariant(
        "sink_window", mask_mod=_sink_window_mask, params=torch.tensor([float(sink_tokens), float(window_left)]),
        torch_mask_mod=lambda b, h, q, k, p: (k <= q) & ((k < int(p[0])) | (k >= q - int(p[1]))),
        # the sinks, then the window (from the sinks on: the two never overlap)
        kv_ranges=lambda q0, q1, n: [(0, np.minimum(sink_tokens, q1 + 1)),
                                     (np.maximum(sink_tokens, q0 - window_left), q1 + 1)])


# -- custom masks (FlashInfer's custom_mask / packed_custom_mask) ----------------------------------
def packbits(x: torch.Tensor, bitorder: str = "little") -> torch.Tensor:
    """Pack a bool tensor into uint8, 8 per byte (FlashInfer's ``packbits``; little-endian bits)."""
    if bitorder not in ("little", "big"):
        raise ValueError(f"bitorder must be 'little' or 'big', got {bitorder!r}")
    arr = x.detach().to("cpu", torch.bool).numpy().reshape(-1)
    return torch.from_numpy(np.packbits(arr, bitorder=bitorder)).to(x.device)


def segment_packbits(x: torch.Tensor, indptr: torch.Tensor, bitorder: str = "little"):
    """Pack each segment x[indptr[i]:indptr[i+1]] separately (padded to whole bytes).
    Returns (packed uint8, new_indptr): segment i's bytes are packed[new_indptr[i]:new_indptr[i+1]]."""
    ip = np.asarray(indptr.detach().cpu() if isinstance(indptr, torch.Tensor) else indptr, dtype=np.int64)
    arr = x.detach().to("cpu", torch.bool).numpy().reshape(-1)
    segs = [np.packbits(arr[ip[i]:ip[i + 1]], bitorder=bitorder) for i in range(len(ip) - 1)]
    lens = np.array([len(s) for s in segs], dtype=np.int64)
    new = np.concatenate([[0], np.cumsum(lens)])
    packed = np.concatenate(segs) if segs else np.zeros(0, np.uint8)
    return torch.from_numpy(packed).to(x.device), torch.from_numpy(new).to(x.device)


def prepare_custom_mask(custom_mask, packed_custom_mask, mask_indptr, qo_lens: np.ndarray, kv_lens: np.ndarray):
    """Validate a plan's custom mask; returns (packed uint8 NumPy array, bit offset of each request's
    mask [batch] int64) or (None, None) without one. custom_mask: bool [sum(qo_len * kv_len)], row-major
    per request; packed_custom_mask: its bits, little-endian, each request's segment starting on a byte
    (FlashInfer's segment_packbits layout) at mask_indptr[b] bytes (default: the running sum of
    ceil(qo_len * kv_len / 8))."""
    if custom_mask is None and packed_custom_mask is None:
        if mask_indptr is not None:
            raise ValueError("mask_indptr is given without custom_mask / packed_custom_mask")
        return None, None
    if custom_mask is not None and packed_custom_mask is not None:
        raise ValueError("pass custom_mask or packed_custom_mask, not both")
    sizes = qo_lens.astype(np.int64) * kv_lens.astype(np.int64)
    if custom_mask is not None:
        if not isinstance(custom_mask, torch.Tensor) or custom_mask.dim() != 1:
            raise ValueError("custom_mask must be a 1-D bool tensor [sum(qo_len * kv_len)]")
        if custom_mask.dtype != torch.bool:
            raise ValueError(f"custom_mask must be bool, got {custom_mask.dtype}")
        if custom_mask.numel() != int(sizes.sum()):
            raise ValueError(f"custom_mask has {custom_mask.numel()} entries; sum(qo_len * kv_len) is {int(sizes.sum())}")
        if mask_indptr is not None:
            raise ValueError("mask_indptr goes with packed_custom_mask (custom_mask is laid out densely)")
        bits = custom_mask.detach().cpu().numpy()
        return np.packbits(bits, bitorder="little"), np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    if not isinstance(packed_custom_mask, torch.Tensor) or packed_custom_mask.dim() != 1 \
            or packed_custom_mask.dtype != torch.uint8:
        raise ValueError("packed_custom_mask must be a 1-D uint8 tensor (bits little-endian)")
    seg_bytes = -(-sizes // 8)
    if mask_indptr is None:
        starts = np.concatenate([[0], np.cumsum(seg_bytes)])
    else:
        from .formats import check_indptr

        starts = check_indptr("mask_indptr", mask_indptr, len(qo_lens) + 1)
        short = np.diff(starts) < seg_bytes
        if np.any(short):
            b = int(np.nonzero(short)[0][0])
            raise ValueError(f"mask_indptr gives request {b} {int(np.diff(starts)[b])} bytes of mask; its "
                             f"qo_len * kv_len = {int(sizes[b])} bits need {int(seg_bytes[b])}")
    if int(starts[-1]) > packed_custom_mask.numel():
        raise ValueError(f"packed_custom_mask has {packed_custom_mask.numel()} bytes; the batch needs {int(starts[-1])}")
    return packed_custom_mask.detach().cpu().numpy(), starts[:-1].astype(np.int64) * 8


def unpack_request_mask(packed: np.ndarray, bit0: int, qo_len: int, kv_len: int) -> torch.Tensor:
    """Request's [qo_len, kv_len] bool mask from the packed bits (for the reference path)."""
    n = qo_len * kv_len
    if n == 0:
        return torch.zeros(qo_len, kv_len, dtype=torch.bool)
    b0, b1 = bit0 // 8, (bit0 + n + 7) // 8
    bits = np.unpackbits(packed[b0:b1], bitorder="little")[bit0 - b0 * 8:bit0 - b0 * 8 + n]
    return torch.from_numpy(bits.astype(bool)).view(qo_len, kv_len)


__all__ = ["AttentionVariant", "alibi", "alibi_slopes", "soft_cap", "causal", "sliding_window", "sink_window",
           "packbits", "segment_packbits"]
