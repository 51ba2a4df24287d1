"""Attention states and their exact merge.

An attention state over a KV set is (v, s): v the softmax-weighted values and s the
log-sum-exp of the logits **in base 2** (FlashInfer's convention):
``s = log2(sum_j exp(logit_j))``, logits = (q . k) * sm_scale. Two states over disjoint
KV sets A and B merge into the state over A u B:

    m = max(s_a, s_b);  w_a = 2^(s_a - m);  w_b = 2^(s_b - m)
    v = (w_a v_a + w_b v_b) / (w_a + w_b);  s = m + log2(w_a + w_b)

A state over an empty set is (0, -inf) and is the identity. Split-KV decode, cascade
(shared prefix + unique suffix) and sparse + dense compositions all use this operator.

``MultiLevelCascadeAttentionWrapper`` composes formats with it: each level is a batch
prefill over pages that a group of requests shares (the group's queries packed together,
so the shared KV is read once per query tile instead of once per request), and the levels'
states merge exactly. ``cascade_levels_from_page_table`` builds the levels from a batch's
page tables (longest common full-page prefix of consecutive requests).
"""
from __future__ import annotations

import os

import numpy as np
import torch
import triton

from . import reference
from .kernels.attention import merge_states_kernel, merge_two_kernel
from .decode import BatchDecodeWithPagedKVCacheWrapper
from .formats import check_indptr, not_planned, to_host_array
from .plan import _segment_index
from .prefill import BatchPrefillWithPagedKVCacheWrapper, BatchPrefillWithRaggedKVCacheWrapper


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
    block_h = min(triton.next_power_of_2(heads), max(1, 4096 // dim))
    grid = (rows, triton.cdiv(heads, block_h))
    merge_two_kernel[grid](
        v_a, s_a, v_b, s_b, v_o, s_o, mask if mask is not None else s_a, rows, heads,
        v_a.stride(0), v_a.stride(1), s_a.stride(0), v_b.stride(0), v_b.stride(1), s_b.stride(0),
        v_o.stride(0), v_o.stride(1), s_o.stride(0),
        HEAD_DIM=dim, BLOCK_H=block_h, HAS_MASK=mask is not None, num_warps=4,
    )


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


class MultiLevelCascadeAttentionWrapper:
    """Attention over KV stored as levels of a shared page pool (FlashInfer-compatible).

    Level i groups the queries with ``qo_indptr_arr[i]`` (group g owns query rows
    qo_indptr_arr[i][g] .. qo_indptr_arr[i][g+1]-1) and gives each group its pages with
    ``paged_kv_indptr_arr[i]``, ``paged_kv_indices_arr[i]`` and ``paged_kv_last_page_len[i]``;
    the last level is usually one group per request (its unique suffix). A query's result
    is attention over the concatenation of its groups' KV across levels, in level order.
    ``causal`` masks the last level only (bottom-right aligned): queries must come after
    the KV of the shared levels, as in decode, append and parallel sampling.

    Every level runs the batch prefill kernel (one plan() per level, CUDA-graph safe with
    ``use_cuda_graph=True``); a level after the first merges its state into the running (out, lse) in
    the attention kernel's epilogue (no merge launch), or, where its plan runs the sm_90 prefill kernel
    or the PyTorch reference, through ``merge_state_in_place``.
    """

    def __init__(self, num_levels: int, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD",
                 use_cuda_graph: bool = False, qo_indptr_buf_arr=None, paged_kv_indptr_buf_arr=None,
                 paged_kv_indices_buf_arr=None, paged_kv_last_page_len_buf_arr=None, backend: str = "auto"):
        if not isinstance(num_levels, int) or num_levels < 1:
            raise ValueError(f"num_levels must be an int >= 1, got {num_levels!r}")
        if paged_kv_indices_buf_arr is not None and len(paged_kv_indices_buf_arr) != num_levels:
            raise ValueError(f"paged_kv_indices_buf_arr must have num_levels ({num_levels}) buffers")
        self._planned = False  # (every level planned by the last plan(): run() checks it)
        self._levels = [
            BatchPrefillWithPagedKVCacheWrapper(
                float_workspace_buffer, kv_layout, use_cuda_graph,
                paged_kv_indices_buf=None if paged_kv_indices_buf_arr is None else paged_kv_indices_buf_arr[i],
                backend=backend)
            for i in range(num_levels)]
        if use_cuda_graph:  # shared levels pack many queries per group: their kernel is the prefill one, fixed
            for w in self._levels[:-1]:  # now (a captured run() keeps the kernel of the first plan)
                w._fixed_mode = "prefill"
        # (out, lse) of the levels after the first, one pair per (shape, dtype) of q and kept: a CUDA graph
        # captured for one batch size keeps pointing at its pair while graphs of other sizes are captured
        self._states: dict = {}

    def plan(self, qo_indptr_arr, paged_kv_indptr_arr, paged_kv_indices_arr, paged_kv_last_page_len,
             num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int, causal: bool = False,
             pos_encoding_mode: str = "NONE", use_fp16_qk_reduction: bool = False, sm_scale: float | None = None,
             window_left: int = -1, logits_soft_cap: float | None = None, rope_scale=None, rope_theta=None,
             q_data_type="float16", kv_data_type=None) -> None:
        """Plan every level; each *_arr is a list with one entry per level."""
        n = len(self._levels)
        arrays = dict(qo_indptr_arr=qo_indptr_arr, paged_kv_indptr_arr=paged_kv_indptr_arr,
                      paged_kv_indices_arr=paged_kv_indices_arr, paged_kv_last_page_len=paged_kv_last_page_len)
        for name, arr in arrays.items():
            if not isinstance(arr, (list, tuple)) or len(arr) != n:
                raise ValueError(f"{name} must be a list of num_levels ({n}) entries")
        if window_left != -1:
            raise ValueError("window_left is not supported across cascade levels (it would cut shared levels)")
        nnz = None
        for i, qo in enumerate(qo_indptr_arr):
            qo_host = check_indptr(f"qo_indptr_arr[{i}]", qo)
            if qo_host[0] != 0:
                raise ValueError(f"qo_indptr_arr[{i}] must start at 0")
            if nnz is not None and qo_host[-1] != nnz:
                raise ValueError(f"qo_indptr_arr[{i}] covers {qo_host[-1]} queries, level 0 covers {nnz}")
            nnz = qo_host[-1]
        self._planned = False  # (a level whose plan() raises leaves the wrapper unplanned)
        for i, w in enumerate(self._levels):
            w.plan(qo_indptr_arr[i], paged_kv_indptr_arr[i], paged_kv_indices_arr[i], paged_kv_last_page_len[i],
                   num_qo_heads, num_kv_heads, head_dim, page_size, causal=causal and i == n - 1,
                   pos_encoding_mode=pos_encoding_mode, sm_scale=sm_scale, logits_soft_cap=logits_soft_cap,
                   q_data_type=q_data_type, kv_data_type=kv_data_type)
            # levels after the first merge into the running (out, lse) in their kernel's epilogue where the
            # plan runs the Triton kernel (not the sm_90 prefill kernel or the reference path)
            w._merge_out = i > 0 and w._can_merge_into_out()
        self._planned = True

    begin_forward = plan

    def run(self, q: torch.Tensor, paged_kv_cache, out: torch.Tensor | None = None,
            lse: torch.Tensor | None = None, return_lse: bool = False, *, k_scale=None, v_scale=None):
        """q: [nnz, num_qo_heads, head_dim]; paged_kv_cache as in the batch wrappers (one pool for
        all levels). Returns out like q (and lse [nnz, num_qo_heads], base 2, when return_lse).
        k_scale / v_scale: dequantization scales of an fp8 cache (as in the batch wrappers)."""
        if not self._planned:
            raise not_planned(self)
        sc = dict(k_scale=k_scale, v_scale=v_scale)
        out, lse = self._levels[0].run(q, paged_kv_cache, out=out, lse=lse, return_lse=True, **sc)
        for w in self._levels[1:]:
            if w._merge_out:  # the kernel's epilogue merges into (out, lse): no merge launch
                w.run(q, paged_kv_cache, out=out, lse=lse, return_lse=True, **sc)
                continue
            key = (tuple(q.shape), q.dtype, q.device)
            if key not in self._states:
                self._states[key] = (torch.empty_like(q),
                                     torch.empty(q.shape[:2], dtype=torch.float32, device=q.device))
            o_i, s_i = self._states[key]
            w.run(q, paged_kv_cache, out=o_i, lse=s_i, return_lse=True, **sc)
            merge_state_in_place(out, lse, o_i, s_i)
        return (out, lse) if return_lse else out

    forward = run


class _SharedPrefix:
    """The shared part of the shared-prefix wrappers: every query over the whole contiguous prefix, one request of a
    batch prefill, planned for each (queries, prefix length, heads, dtypes, scale) as it comes: its planner splits
    the long prefix over the SMs (single_prefill_with_kv_cache does not split: 64 queries over an 8192-token prefix
    took 690 us on the H200 that way, a ragged request 354, session 46)."""

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str, backend: str):
        # NHD: the prefix seen as a paged cache of one request (pages of 16 tokens, or 1 where its length is no
        # multiple of 16: views, no copy), planned as MultiLevelCascadeAttentionWrapper's shared level is (the paged
        # prefill kernels; on sm_90 the Gluon one); HND: a ragged request (its pages would not be views)
        self._nhd = kv_layout == "NHD"
        self._ws, self._layout, self._backend = float_workspace_buffer, kv_layout, backend
        self._paged = BatchPrefillWithPagedKVCacheWrapper(float_workspace_buffer, "NHD", backend=backend) \
            if self._nhd else None
        self._ragged = None  # (made at the first prefix that needs it: HND, or a strided NHD one)
        self._key = None

    def run(self, q: torch.Tensor, k_shared: torch.Tensor, v_shared: torch.Tensor, sm_scale, soft_cap):
        if not isinstance(q, torch.Tensor) or q.dim() != 3:
            raise ValueError(f"q must be [nnz, num_qo_heads, head_dim], got {getattr(q, 'shape', q)}")
        for name, t in (("k_shared", k_shared), ("v_shared", v_shared)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3:
                raise ValueError(f"{name} must be a 3-D tensor, got {getattr(t, 'shape', t)}")
        if k_shared.shape != v_shared.shape:
            raise ValueError(f"k_shared and v_shared must have one shape, got {tuple(k_shared.shape)} and "
                             f"{tuple(v_shared.shape)}")
        length, heads = (k_shared.shape[0], k_shared.shape[1]) if self._nhd else (k_shared.shape[1], k_shared.shape[0])
        paged = self._nhd and length > 0 and k_shared.is_contiguous() and v_shared.is_contiguous()
        ps = (16 if length % 16 == 0 else 1) if paged else 0
        key = (q.shape[0], length, q.shape[1], heads, q.shape[2], q.dtype, k_shared.dtype, sm_scale, soft_cap, ps)
        if key != self._key:
            self._key = None
            qo = torch.tensor([0, q.shape[0]], dtype=torch.int32)
            kw = dict(causal=False, sm_scale=sm_scale, logits_soft_cap=soft_cap, q_data_type=q.dtype,
                      kv_data_type=k_shared.dtype)
            if paged:
                pages = length // ps
                self._paged.plan(qo, torch.tensor([0, pages], dtype=torch.int32),
                                 torch.arange(pages, dtype=torch.int32), torch.tensor([ps], dtype=torch.int32),
                                 q.shape[1], heads, q.shape[2], ps, **kw)
            else:
                if self._ragged is None:
                    self._ragged = BatchPrefillWithRaggedKVCacheWrapper(self._ws, self._layout, backend=self._backend)
                self._ragged.plan(qo, torch.tensor([0, length], dtype=torch.int32), q.shape[1], heads, q.shape[2], **kw)
            self._key = key
        if paged:
            cache = (k_shared.view(length // ps, ps, heads, -1), v_shared.view(length // ps, ps, heads, -1))
            return self._paged.run(q, cache, return_lse=True)
        return self._ragged.run(q, k_shared, v_shared, return_lse=True)

    def reset_workspace_buffer(self, float_workspace_buffer: torch.Tensor) -> None:
        self._ws = float_workspace_buffer
        for w in (self._paged, self._ragged):
            if w is not None:
                w.reset_workspace_buffer(float_workspace_buffer)
        self._key = None


class BatchDecodeWithSharedPrefixPagedKVCacheWrapper:
    """FlashInfer's shared-prefix decode (its older cascade API; MultiLevelCascadeAttentionWrapper is the general
    one): every request's query attends to one shared prefix, given as contiguous k_shared / v_shared, then to its
    own pages of a paged cache; the two states merge exactly (merge_state_in_place). The shared part runs as one
    non-causal ragged prefill of all the batch's queries over the prefix (the prefix read once for the batch, split
    over the SMs), planned at the first forward() of each prefix length."""

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD", backend: str = "auto") -> None:
        self._batch_decode_wrapper = BatchDecodeWithPagedKVCacheWrapper(float_workspace_buffer, kv_layout,
                                                                        backend=backend)
        self._shared = _SharedPrefix(float_workspace_buffer, kv_layout, backend)
        self._kv_layout = kv_layout

    def reset_workspace_buffer(self, float_workspace_buffer: torch.Tensor, int_workspace_buffer=None) -> None:
        self._batch_decode_wrapper.reset_workspace_buffer(float_workspace_buffer, int_workspace_buffer)
        self._shared.reset_workspace_buffer(float_workspace_buffer)

    def begin_forward(self, unique_kv_indptr, unique_kv_indices, unique_kv_last_page_len, num_qo_heads: int,
                      num_kv_heads: int, head_dim: int, page_size: int, data_type="float16", *,
                      q_data_type=None, sm_scale: float | None = None,
                      logits_soft_cap: float | None = None) -> None:
        """Plan the unique (paged) part: the batch's page tables as in BatchDecodeWithPagedKVCacheWrapper.plan;
        data_type the cache's (and the queries', unless q_data_type); sm_scale / logits_soft_cap (pagoda's
        keywords) apply to both parts."""
        self._batch_decode_wrapper.plan(unique_kv_indptr, unique_kv_indices, unique_kv_last_page_len, num_qo_heads,
                                        num_kv_heads, head_dim, page_size, q_data_type=q_data_type or data_type,
                                        kv_data_type=data_type, sm_scale=sm_scale, logits_soft_cap=logits_soft_cap)

    plan = begin_forward

    def forward(self, q: torch.Tensor, k_shared: torch.Tensor, v_shared: torch.Tensor, unique_kv_cache,
                return_lse: bool = False):
        """q [batch, num_qo_heads, head_dim]; k_shared / v_shared [shared_len, num_kv_heads, head_dim] (NHD) or
        [num_kv_heads, shared_len, head_dim] (HND); unique_kv_cache as BatchDecodeWithPagedKVCacheWrapper.run
        takes it. Returns out like q (and the merged lse [batch, num_qo_heads], base 2, with return_lse)."""
        w = self._batch_decode_wrapper
        if w._plan is None:
            raise not_planned(self)
        p = w._plan
        v_s, s_s = self._shared.run(q, k_shared, v_shared, p.sm_scale, p.logits_soft_cap or None)
        v_u, s_u = w.run(q, unique_kv_cache, return_lse=True)
        merge_state_in_place(v_s, s_s, v_u, s_u)
        return (v_s, s_s) if return_lse else v_s

    run = forward

    def end_forward(self) -> None:
        """FlashInfer's (deprecated there, no effect)."""


class BatchPrefillWithSharedPrefixPagedKVCacheWrapper:
    """FlashInfer's shared-prefix prefill / append (its older cascade API): each request's queries attend to one
    shared prefix (contiguous k_shared / v_shared, no mask: the queries come after it) and to the request's own
    pages, causally when forward(causal=True) (bottom-right aligned); the states merge exactly. As FlashInfer's,
    causal and the scale come with forward(): the paged part is planned at the first forward() of each (causal,
    sm_scale) after begin_forward()."""

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD", backend: str = "auto") -> None:
        self._batch_prefill_wrapper = BatchPrefillWithPagedKVCacheWrapper(float_workspace_buffer, kv_layout,
                                                                          backend=backend)
        self._shared = _SharedPrefix(float_workspace_buffer, kv_layout, backend)
        self._kv_layout = kv_layout
        self._args = None  # begin_forward()'s arguments
        self._planned_for = None  # (causal, sm_scale, dtypes) of the paged part's last plan

    def reset_workspace_buffer(self, float_workspace_buffer: torch.Tensor, int_workspace_buffer=None) -> None:
        self._batch_prefill_wrapper.reset_workspace_buffer(float_workspace_buffer, int_workspace_buffer)
        self._shared.reset_workspace_buffer(float_workspace_buffer)
        self._planned_for = None

    def begin_forward(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len,
                      num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int) -> None:
        """The batch's queries (qo_indptr) and their unique pages, as BatchPrefillWithPagedKVCacheWrapper.plan
        takes them; checked here (a plan without a mask), planned again by forward() as it needs."""
        self._args = None
        self._batch_prefill_wrapper.plan(qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len,
                                         num_qo_heads, num_kv_heads, head_dim, page_size)
        self._args = (qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads,
                      num_kv_heads, head_dim, page_size)
        self._planned_for = None

    plan = begin_forward

    def forward(self, q: torch.Tensor, k_shared: torch.Tensor, v_shared: torch.Tensor, unique_kv_cache,
                causal: bool = False, use_fp16_qk_reduction: bool = False, sm_scale: float | None = None,
                rope_scale=None, rope_theta=None, return_lse: bool = False):
        """q [qo_indptr[-1], num_qo_heads, head_dim]; k_shared / v_shared [shared_len, num_kv_heads, head_dim]
        (NHD) or [num_kv_heads, shared_len, head_dim] (HND); unique_kv_cache as the paged wrappers take it.
        Returns out like q (and the merged lse, base 2, with return_lse). rope_scale / rope_theta: RoPE is the
        caller's (pagoda.ops); None only."""
        if self._args is None:
            raise not_planned(self)
        if rope_scale is not None or rope_theta is not None:
            raise ValueError("rope_scale / rope_theta: apply RoPE before attention (pagoda.ops) and pass None")
        if not isinstance(causal, bool):
            raise ValueError(f"causal must be a bool, got {causal!r}")
        cache_dtype = (unique_kv_cache[0] if isinstance(unique_kv_cache, (tuple, list)) else unique_kv_cache).dtype
        want = (causal, sm_scale, q.dtype, cache_dtype)
        if self._planned_for != want:
            self._batch_prefill_wrapper.plan(*self._args, causal=causal, sm_scale=sm_scale, q_data_type=q.dtype,
                                             kv_data_type=cache_dtype)
            self._planned_for = want
        v_s, s_s = self._shared.run(q, k_shared, v_shared, sm_scale, None)
        v_u, s_u = self._batch_prefill_wrapper.run(q, unique_kv_cache, return_lse=True)
        merge_state_in_place(v_s, s_s, v_u, s_u)
        return (v_s, s_s) if return_lse else v_s

    run = forward

    def end_forward(self) -> None:
        """FlashInfer's (deprecated there, no effect)."""


def cascade_levels_from_page_table(paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, page_size: int,
                                   qo_indptr=None):
    """Two cascade levels from a batch's page tables (for a serving engine's prefix cache).

    Consecutive requests whose page lists start with the same page form a group; the group
    shares its longest common prefix of *full* pages (level 0) and each request keeps the
    rest of its pages (level 1). A request alone in its group shares nothing. qo_indptr
    defaults to one query per request (decode).

    Returns a dict with ``qo_indptr_arr``, ``paged_kv_indptr_arr``, ``paged_kv_indices_arr``
    and ``paged_kv_last_page_len`` (lists of two int32 tensors each, on the host), ready for
    ``MultiLevelCascadeAttentionWrapper(2, ...).plan(**levels, ...)``.
    """
    indptr = check_indptr("paged_kv_indptr", paged_kv_indptr)
    batch = len(indptr) - 1
    indices = to_host_array("paged_kv_indices", paged_kv_indices)
    if len(indices) < indptr[-1]:
        raise ValueError(f"paged_kv_indices has {len(indices)} entries but paged_kv_indptr needs {indptr[-1]}")
    last = to_host_array("paged_kv_last_page_len", paged_kv_last_page_len, batch)
    qo = np.arange(batch + 1) if qo_indptr is None else check_indptr("qo_indptr", qo_indptr, batch + 1)
    # NumPy throughout (a serving engine calls this every step): no loop over requests or groups
    num_pages = np.diff(indptr)
    full = num_pages - ((last < page_size) & (num_pages > 0))
    first_page = np.full(batch, -1, dtype=np.int64)
    has = num_pages > 0
    first_page[has] = indices[indptr[:-1][has]]
    new_group = np.ones(batch, dtype=bool)
    new_group[1:] = (first_page[1:] < 0) | (first_page[1:] != first_page[:-1])
    starts = np.flatnonzero(new_group) if batch else np.zeros(1, dtype=np.int64)  # no requests: one empty group
    sizes = np.diff(np.append(starts, batch))
    leader = np.repeat(starts, sizes)
    # each request's common prefix with its group's first request (compared page by page, followers
    # only), then the group's minimum
    lcp = np.minimum(full, full[leader])
    follow = np.flatnonzero(leader != np.arange(batch))
    cap = lcp[follow]
    owner, j = _segment_index(cap)
    pos = indptr[follow][owner] + j
    differ = indices[pos] != indices[pos + (indptr[leader[follow]] - indptr[follow])[owner]]
    od, jd = owner[differ], j[differ]
    if len(od):  # the first mismatch of each follower (od is sorted)
        first = np.flatnonzero(np.r_[True, od[1:] != od[:-1]])
        lcp[follow[od[first]]] = jd[first]
    n_shared = np.minimum.reduceat(lcp, starts) if batch else np.zeros(1, dtype=np.int64)
    n_shared[sizes < 2] = 0
    shared = np.repeat(n_shared, sizes)
    g_owner, g_j = _segment_index(n_shared)
    l0_indices = indices[indptr[starts[g_owner]] + g_j]
    rest = num_pages - shared
    r_owner, r_j = _segment_index(rest)
    l1_indices = indices[indptr[r_owner] + shared[r_owner] + r_j]
    as_t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64)).to(torch.int32)  # noqa: E731
    return dict(
        qo_indptr_arr=[as_t(np.append(qo[starts], qo[batch])), as_t(qo)],
        paged_kv_indptr_arr=[as_t(np.concatenate([[0], np.cumsum(n_shared)])),
                             as_t(np.concatenate([[0], np.cumsum(rest)]))],
        paged_kv_indices_arr=[as_t(l0_indices), as_t(l1_indices)],
        paged_kv_last_page_len=[as_t(np.full(len(starts), page_size)), as_t(np.where(rest > 0, last, page_size))],
    )

