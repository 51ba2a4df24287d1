"""Attention states and their exact merge.

An attention state over a KV set is (v, s): v the softmax-weighted values and s the
log-sum-exp of the logits **in base 2** (FlashInfer's convention):
``s = log2(sum_j exp(logit_j))``, logits = (q . k) * sm_scale. Two states over disjoint
KV sets A and B merge into the state over A u B:

    m = max(s_a, s_b);  w_a = 2^(s_a - m);  w_b = 2^(s_b - m)
    v = (w_a v_a + w_b v_b) / (w_a + w_b);  s = m + log2(w_a + w_b)

A state over an empty set is (0, -inf) and is the identity. Split-KV decode, cascade
(shared prefix + unique suffix) and sparse + dense compositions all use this operator.
"""
from __future__ import annotations

import os

import torch

from . import reference
from .kernels.attention import merge_states_kernel, merge_two_kernel
from .runner import triton_next_pow2


def _use_triton(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _check_state(name_v, v, name_s, s, rank):
    if not isinstance(v, torch.Tensor) or v.dim() != rank:
        raise ValueError(f"{name_v} must be a {rank}-D tensor, got {getattr(v, 'shape', type(v))}")
    if not isinstance(s, torch.Tensor) or tuple(s.shape) != tuple(v.shape[:-1]):
        raise ValueError(f"{name_s} must have shape {tuple(v.shape[:-1])}, got {getattr(s, 'shape', type(s))}")
    if s.dtype != torch.float32:
        raise ValueError(f"{name_s} must be float32, got {s.dtype}")
    if v.device != s.device:
        raise ValueError(f"{name_v} and {name_s} must be on one device")
    if v.shape[-1] not in (64, 128, 256) and v.shape[-1] & (v.shape[-1] - 1):
        raise ValueError(f"{name_v}: head_dim must be a power of two, got {v.shape[-1]}")


def _check_pair(v_a, s_a, v_b, s_b, names):
    _check_state(names[0], v_a, names[1], s_a, 3)
    _check_state(names[2], v_b, names[3], s_b, 3)
    if v_a.shape != v_b.shape or v_a.dtype != v_b.dtype or v_a.device != v_b.device:
        raise ValueError(f"{names[0]} and {names[2]} must share shape, dtype and device: "
                         f"{tuple(v_a.shape)} {v_a.dtype} vs {tuple(v_b.shape)} {v_b.dtype}")


def _merge_two(v_a, s_a, v_b, s_b, v_o, s_o, mask=None):
    v_a, v_b, v_o = (t if t.stride(-1) == 1 else t.contiguous() for t in (v_a, v_b, v_o))
    rows, heads, dim = v_a.shape
    if rows == 0:
        return
    block_h = min(triton_next_pow2(heads), max(1, 4096 // dim))
    grid = (rows, triton_cdiv(heads, block_h))
    merge_two_kernel[grid](
        v_a, s_a, v_b, s_b, v_o, s_o, mask if mask is not None else s_a, rows, heads,
        v_a.stride(0), v_a.stride(1), s_a.stride(0), v_b.stride(0), v_b.stride(1), s_b.stride(0),
        v_o.stride(0), v_o.stride(1), s_o.stride(0),
        HEAD_DIM=dim, BLOCK_H=block_h, HAS_MASK=mask is not None, num_warps=4,
    )


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def merge_state(v_a: torch.Tensor, s_a: torch.Tensor, v_b: torch.Tensor, s_b: torch.Tensor):
    """Merge two attention states.

    v_a, v_b: [seq_len, num_heads, head_dim] (fp16/bf16/fp32); s_a, s_b: [seq_len, num_heads]
    float32, base-2 LSE. Returns (v [seq_len, num_heads, head_dim] in v_a.dtype, s [seq_len,
    num_heads] float32): the state over the union of the two KV sets.
    """
    _check_pair(v_a, s_a, v_b, s_b, ("v_a", "s_a", "v_b", "s_b"))
    if not _use_triton(v_a):
        return reference.merge_state(v_a, s_a, v_b, s_b)
    v = torch.empty_like(v_a, memory_format=torch.contiguous_format)
    s = torch.empty(s_a.shape, dtype=torch.float32, device=s_a.device)
    _merge_two(v_a, s_a.contiguous(), v_b, s_b.contiguous(), v, s)
    return v, s


def merge_state_in_place(v: torch.Tensor, s: torch.Tensor, v_other: torch.Tensor, s_other: torch.Tensor,
                         mask: torch.Tensor | None = None) -> None:
    """(v, s) <- merge((v, s), (v_other, s_other)), in place. mask: optional [seq_len] bool;
    rows where it is False are left unchanged (useful with CUDA graphs)."""
    _check_pair(v, s, v_other, s_other, ("v", "s", "v_other", "s_other"))
    if v.stride(-1) != 1 or s.stride(-1) != 1:
        raise ValueError("v and s must be contiguous in their last dimension to be updated in place")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (v.shape[0],):
            raise ValueError(f"mask must be a [{v.shape[0]}] tensor, got {getattr(mask, 'shape', type(mask))}")
        if mask.device != v.device:
            raise ValueError("mask must be on the device of v")
    if not _use_triton(v):
        merged_v, merged_s = reference.merge_state(v, s, v_other, s_other)
        if mask is not None:
            keep = ~mask.bool()
            merged_v[keep], merged_s[keep] = v[keep], s[keep]
        v.copy_(merged_v)
        s.copy_(merged_s)
        return
    _merge_two(v, s, v_other, s_other.contiguous(), v, s,
               None if mask is None else mask.to(torch.int8))


def merge_states(v: torch.Tensor, s: torch.Tensor):
    """Merge many attention states.

    v: [seq_len, num_states, num_heads, head_dim]; s: [seq_len, num_states, num_heads] float32
    (base-2 LSE). Returns (v [seq_len, num_heads, head_dim] in v.dtype, s [seq_len, num_heads]).
    """
    _check_state("v", v, "s", s, 4)
    if not _use_triton(v):
        return reference.merge_states(v, s)
    seq, states, heads, dim = v.shape
    v = v.contiguous()
    s = s.contiguous()
    out = torch.empty(seq, heads, dim, dtype=v.dtype, device=v.device)
    lse = torch.empty(seq, heads, dtype=torch.float32, device=v.device)
    if seq == 0:
        return out, lse
    grid = min(seq * heads, 4096)
    merge_states_kernel[(grid,)](
        out, lse, v, s, seq, states, heads, out.stride(0), out.stride(1), lse.stride(0),
        v.stride(1), v.stride(2), s.stride(1), HEAD_DIM=dim, BLOCK_C=16, num_warps=4)
    return out, lse
