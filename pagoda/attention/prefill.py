"""Prefill / append attention: many query tokens per request, paged or ragged KV.

FlashInfer-compatible: ``BatchPrefillWithPagedKVCacheWrapper`` (also chunked prefill and
append: qo_len < kv_len, causal bottom-right aligned), ``BatchPrefillWithRaggedKVCacheWrapper``,
``single_prefill_with_kv_cache``, and FlashInfer's ``BatchAttention`` (one plan for a batch mixing prefill and
decode, given each request's KV length). In prefill the GQA group is folded into the query
tile: a tile of block_m rows holds (block_m // group) tokens x group heads.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .formats import (MAX_PAGE_SIZE, check_indptr, check_int, check_kv_layout, check_page_indices, check_paged_lens,
                      check_qo_indptr, check_sinks, last_page_lens, paged_cache_geometry, paged_strides, to_host_array,
                      unpack_paged_kv_cache)
from .plan import segment_ranges
from .reference import gather_paged_kv
from .runner import BatchAttention as WrapperBase  # (pagoda.BatchAttention is FlashInfer's class below)


def _check_unsupported(head_dim_qk, head_dim_vo, pos_encoding_mode):
    if head_dim_vo is not None and head_dim_vo != head_dim_qk:
        raise ValueError(f"head_dim_vo ({head_dim_vo}) must equal head_dim_qk ({head_dim_qk})")
    if pos_encoding_mode != "NONE":
        raise ValueError(f"pos_encoding_mode={pos_encoding_mode!r} is not supported: apply RoPE before "
                         f"attention (pagoda.ops) and pass 'NONE'")


class BatchPrefillWithPagedKVCacheWrapper(WrapperBase):
    """Batch prefill / append attention: ragged queries against a paged KV cache.

    Request b's queries are q[qo_indptr[b]:qo_indptr[b+1]]; its KV is the paged cache's
    pages paged_kv_indices[paged_kv_indptr[b]:paged_kv_indptr[b+1]] with
    paged_kv_last_page_len[b] tokens in the last page. qo_len may be smaller than kv_len
    (append / chunked prefill): with causal=True query i sees keys j <= i + kv_len - qo_len.
    """

    _mode = "prefill"
    _paged = True

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD",
                 use_cuda_graph: bool = False, qo_indptr_buf=None, paged_kv_indptr_buf=None,
                 paged_kv_indices_buf: torch.Tensor | None = None, paged_kv_last_page_len_buf=None,
                 custom_mask_buf=None, mask_indptr_buf=None, backend: str = "auto", variant=None) -> None:
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph, backend, paged_kv_indices_buf, variant)
        if custom_mask_buf is not None:
            self._mask = custom_mask_buf.view(torch.uint8).reshape(-1)

    def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len,
             num_qo_heads: int, num_kv_heads: int, head_dim_qk: int, page_size: int,
             head_dim_vo: int | None = None, custom_mask=None, packed_custom_mask=None,
             causal: bool = False, pos_encoding_mode: str = "NONE", use_fp16_qk_reduction: bool = False,
             sm_scale: float | None = None, window_left: int = -1, logits_soft_cap: float | None = None,
             rope_scale=None, rope_theta=None, q_data_type="float16", kv_data_type=None,
             non_blocking: bool = True, mask_indptr=None) -> None:
        """Plan a batch. qo_indptr: [batch + 1]; paged_kv_indptr: [batch + 1];
        paged_kv_indices: [paged_kv_indptr[-1]]; paged_kv_last_page_len: [batch] in 1..page_size.
        custom_mask: bool [sum(qo_len * kv_len)] (request by request, row-major: True keeps the pair;
        combined with causal / window_left when given); packed_custom_mask: the same bits packed
        little-endian per request (pagoda.segment_packbits), request b starting at byte mask_indptr[b]."""
        _check_unsupported(head_dim_qk, head_dim_vo, pos_encoding_mode)
        qo, qo_lens, one_query = check_qo_indptr("qo_indptr", qo_indptr)
        batch = qo.shape[0] - 1
        kv_indptr, kv_lens = check_paged_lens(paged_kv_indptr, paged_kv_last_page_len, page_size,
                                              ("paged_kv_indptr", "paged_kv_last_page_len"), batch + 1)
        idx, max_page = check_page_indices(paged_kv_indices, kv_indptr)
        self._plan_batch(qo_indptr=qo, qo_lens=qo_lens, one_query=one_query, kv_lens=kv_lens,
                         kv_base=kv_indptr[:-1], indices=idx, max_page=max_page,
                         num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads, head_dim=head_dim_qk,
                         page_size=page_size, causal=causal, window_left=window_left,
                         logits_soft_cap=logits_soft_cap, sm_scale=sm_scale, q_data_type=q_data_type,
                         kv_data_type=kv_data_type, custom_mask=custom_mask,
                         packed_custom_mask=packed_custom_mask, mask_indptr=mask_indptr)

    begin_forward = plan

    def run(self, q: torch.Tensor, paged_kv_cache, out: torch.Tensor | None = None,
            lse: torch.Tensor | None = None, return_lse: bool = False, *, k_scale=None, v_scale=None,
            enable_pdl: bool | None = None, pdl_early_kv: bool = False, sinks: torch.Tensor | None = None):
        """q: [qo_indptr[-1], num_qo_heads, head_dim]; paged_kv_cache as in the decode wrapper.
        Returns out like q, and lse [qo_indptr[-1], num_qo_heads] float32 (base 2) when return_lse.
        k_scale / v_scale: the cache holds K / k_scale and V / v_scale (float, or float32 per-KV-head
        tensor); required when kv_data_type is fp8, 1.0 by default otherwise. enable_pdl: as the decode
        wrapper's (the Triton kernel only; the sm_90 prefill kernel ignores it). pdl_early_kv: as the decode
        wrapper's (the kernel ahead writes no KV but this step's own tokens; taken by the Gluon decode kernel,
        which runs plans of one query per request). sinks: as the decode wrapper's."""
        return run_paged(self, q, paged_kv_cache, out, lse, return_lse, k_scale, v_scale, enable_pdl,
                         pdl_early_kv, sinks)

    forward = run


class BatchAttentionWithAttentionSinkWrapper(BatchPrefillWithPagedKVCacheWrapper):
    """FlashInfer's wrapper for attention sinks (gpt-oss), by its name and arguments: the paged prefill wrapper
    (decode is a batch of one-query requests, which plan() gives the decode kernels) whose run() takes the sinks,
    and FlashInfer's sm_scale, positionally::

        w = pagoda.BatchAttentionWithAttentionSinkWrapper(ws, "NHD", q_data_type=torch.bfloat16,
                                                          kv_data_type=torch.bfloat16, head_dim_qk=64, head_dim_vo=64)
        w.plan(qo_indptr, kv_indptr, kv_indices, last_page_len, 64, 8, 64, 16, causal=True, q_data_type=...)
        out = w.run(q, paged_kv_cache, sinks, sm_scale)   # sinks: float32 [num_qo_heads]

    The constructor's dtypes, head dims and window (FlashInfer's JIT keys) are accepted and taken from plan() instead
    (head_dim_vo must equal head_dim_qk, as everywhere in pagoda). Every wrapper's run(sinks=) does the same
    (reference.py's definition)."""

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD", use_cuda_graph: bool = False,
                 qo_indptr_buf=None, paged_kv_indptr_buf=None, paged_kv_indices_buf: torch.Tensor | None = None,
                 paged_kv_last_page_len_buf=None, custom_mask_buf=None, mask_indptr_buf=None, backend: str = "auto",
                 pos_encoding_mode: str = "NONE", use_fp16_qk_reduction: bool = False, q_data_type=torch.bfloat16,
                 kv_data_type=torch.bfloat16, head_dim_qk: int = 128, head_dim_vo: int = 128,
                 window_left: int = -1) -> None:
        if backend in ("fa2", "fa3"):  # (FlashInfer's CUDA backends: pagoda picks its kernels by GPU)
            backend = "auto"
        _check_unsupported(head_dim_qk, head_dim_vo, pos_encoding_mode)
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph, qo_indptr_buf, paged_kv_indptr_buf,
                         paged_kv_indices_buf, paged_kv_last_page_len_buf, custom_mask_buf, mask_indptr_buf, backend)

    def run(self, q: torch.Tensor, paged_kv_cache, sinks: torch.Tensor, sm_scale: float | None = None,
            out: torch.Tensor | None = None, lse: torch.Tensor | None = None, return_lse: bool = False, *,
            k_scale=None, v_scale=None, enable_pdl: bool | None = None):
        """FlashInfer's run(q, paged_kv_cache, sink, sm_scale): sinks float32 [num_qo_heads]; sm_scale, if given,
        must be plan()'s (the default 1 / sqrt(head_dim) there too): pagoda folds the scale into the plan."""
        p = self._require_plan()
        if sm_scale is not None and not math.isclose(float(sm_scale), p.sm_scale, rel_tol=1e-6):
            raise ValueError(f"sm_scale {sm_scale!r} differs from plan()'s {p.sm_scale!r}: pass it to plan()")
        return run_paged(self, q, paged_kv_cache, out, lse, return_lse, k_scale, v_scale, enable_pdl, False, sinks)

    forward = run


class BatchPrefillWithRaggedKVCacheWrapper(WrapperBase):
    """Batch prefill attention with ragged (contiguous, variable-length) KV.

    Request b's queries are q[qo_indptr[b]:qo_indptr[b+1]] and its keys/values
    k[kv_indptr[b]:kv_indptr[b+1]] (NHD: k [nnz_kv, num_kv_heads, head_dim]; HND:
    [num_kv_heads, nnz_kv, head_dim]).
    """

    _mode = "prefill"
    _paged = False

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD",
                 use_cuda_graph: bool = False, qo_indptr_buf=None, kv_indptr_buf=None,
                 custom_mask_buf=None, mask_indptr_buf=None, backend: str = "auto", variant=None) -> None:
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph, backend, variant=variant)
        if custom_mask_buf is not None:
            self._mask = custom_mask_buf.view(torch.uint8).reshape(-1)

    def plan(self, qo_indptr, kv_indptr, num_qo_heads: int, num_kv_heads: int, head_dim_qk: int,
             head_dim_vo: int | None = None, custom_mask=None, packed_custom_mask=None,
             causal: bool = False, pos_encoding_mode: str = "NONE", use_fp16_qk_reduction: bool = False,
             window_left: int = -1, logits_soft_cap: float | None = None, sm_scale: float | None = None,
             rope_scale=None, rope_theta=None, q_data_type="float16", kv_data_type=None,
             non_blocking: bool = True, mask_indptr=None) -> None:
        """Plan a batch. qo_indptr, kv_indptr: [batch + 1] row offsets into q and k/v; custom_mask /
        packed_custom_mask / mask_indptr as in BatchPrefillWithPagedKVCacheWrapper.plan."""
        _check_unsupported(head_dim_qk, head_dim_vo, pos_encoding_mode)
        qo, qo_lens, one_query = check_qo_indptr("qo_indptr", qo_indptr)
        kv = check_indptr("kv_indptr", kv_indptr, qo.shape[0])
        self._plan_batch(qo_indptr=qo, qo_lens=qo_lens, one_query=one_query, kv_lens=np.diff(kv), kv_base=kv[:-1],
                         indices=None, max_page=int(kv[-1]) - 1, num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads,
                         head_dim=head_dim_qk, page_size=1, causal=causal, window_left=window_left,
                         logits_soft_cap=logits_soft_cap, sm_scale=sm_scale, q_data_type=q_data_type,
                         kv_data_type=kv_data_type, custom_mask=custom_mask,
                         packed_custom_mask=packed_custom_mask, mask_indptr=mask_indptr)

    begin_forward = plan

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None = None,
            lse: torch.Tensor | None = None, return_lse: bool = False, *, k_scale=None, v_scale=None,
            sinks: torch.Tensor | None = None):
        """q: [qo_indptr[-1], num_qo_heads, head_dim]; k, v: [kv_indptr[-1] or more, num_kv_heads,
        head_dim] (NHD). Returns out like q (and lse [nnz, num_qo_heads] float32, base 2). sinks: as the decode
        wrapper's."""
        p = self._require_plan()
        self._check_q(q, p)
        sinks = check_sinks(sinks, p.num_qo_heads, q.device)
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3:
                raise ValueError(f"{name} must be a 3-D tensor [nnz_kv, num_kv_heads, head_dim]")
            if t.stride(-1) != 1:
                raise ValueError(f"{name} must be contiguous in head_dim")
        if k.shape != v.shape:
            raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        nhd = self._kv_layout == "NHD"
        nnz, heads = (k.shape[0], k.shape[1]) if nhd else (k.shape[1], k.shape[0])
        self._check_kv("k", k, p, heads, k.shape[2])
        self._check_kv("v", v, p, heads, v.shape[2])
        if p.max_page >= nnz:
            raise ValueError(f"kv_indptr needs {p.max_page + 1} KV tokens but k has {nnz}")
        scales = self._kv_scales(p, k_scale, v_scale)
        out, lse = self._outputs(q, p, out, lse, return_lse)
        if self._backend == "torch":
            kk, vv = (k, v) if nhd else (k.transpose(0, 1), v.transpose(0, 1))

            def kv_of(b):
                s = int(p.host_kv_base[b])
                return kk[s:s + int(p.host_kv_lens[b])], vv[s:s + int(p.host_kv_lens[b])]
            self._run_reference(q, kv_of, out, lse, p, scales, sinks)
        else:
            def strides(t):
                return (t.stride(0), 0, t.stride(1)) if nhd else (t.stride(1), 0, t.stride(0))
            self._launch(q, k, v, strides(k), strides(v), out, lse, p, scales, sinks=sinks)
        return (out, lse) if return_lse else out

    forward = run


_SINGLE_WS: dict = {}


def _single_workspace(device: torch.device) -> torch.Tensor:
    """One 32 MB workspace per device for the single_* functions (as FlashInfer caches its tmp buffer):
    launches on one stream run in order, so calls can share it."""
    key = str(device)
    if key not in _SINGLE_WS:
        _SINGLE_WS[key] = torch.empty(32 * 1024 * 1024, dtype=torch.uint8, device=device)
    return _SINGLE_WS[key]


def single_prefill_with_kv_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, custom_mask=None,
                                 packed_custom_mask=None, causal: bool = False, kv_layout: str = "NHD",
                                 pos_encoding_mode: str = "NONE", use_fp16_qk_reduction: bool = False,
                                 sm_scale: float | None = None, window_left: int = -1,
                                 logits_soft_cap: float | None = None, rope_scale=None, rope_theta=None,
                                 return_lse: bool = False, backend: str = "auto", k_scale=None, v_scale=None,
                                 variant=None, sinks: torch.Tensor | None = None, _mode: str = "prefill"):
    """Attention of one request: q [qo_len, num_qo_heads, head_dim]; k, v [kv_len, num_kv_heads,
    head_dim] (NHD) or [num_kv_heads, kv_len, head_dim] (HND). Causal is bottom-right aligned.
    Returns out [qo_len, num_qo_heads, head_dim] (and lse [qo_len, num_qo_heads] float32, base 2).
    sinks: float32 [num_qo_heads] attention-sink logits (reference.py)."""
    check_kv_layout(kv_layout)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-D tensor, got {getattr(t, 'shape', type(t))}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.device != k.device or k.device != v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    kv_len, heads = (k.shape[0], k.shape[1]) if kv_layout == "NHD" else (k.shape[1], k.shape[0])
    ws = _single_workspace(q.device)
    wrapper = BatchPrefillWithRaggedKVCacheWrapper(ws, kv_layout, backend=backend, variant=variant)
    wrapper._mode = _mode
    wrapper.plan([0, q.shape[0]], [0, kv_len], q.shape[1], heads, q.shape[2], custom_mask=custom_mask,
                 packed_custom_mask=packed_custom_mask, causal=causal, pos_encoding_mode=pos_encoding_mode,
                 window_left=window_left, logits_soft_cap=logits_soft_cap, sm_scale=sm_scale,
                 q_data_type=q.dtype, kv_data_type=k.dtype)
    return wrapper.run(q, k, v, return_lse=return_lse, k_scale=k_scale, v_scale=v_scale, sinks=sinks)


def run_paged(wrapper: WrapperBase, q, paged_kv_cache, out, lse, return_lse, k_scale=None, v_scale=None,
              enable_pdl=None, pdl_early_kv=False, sinks=None):
    """run() of the paged wrappers (decode and prefill share it); pdl_early_kv: the decode wrapper's run()."""
    if not isinstance(pdl_early_kv, bool):
        raise ValueError(f"pdl_early_kv must be a bool, got {pdl_early_kv!r}")
    p = wrapper._require_plan()
    wrapper._check_q(q, p)
    sinks = check_sinks(sinks, p.num_qo_heads, q.device)
    k, v = unpack_paged_kv_cache(paged_kv_cache, wrapper._kv_layout)
    num_pages, page_size, num_kv_heads, head_dim = paged_cache_geometry(k, wrapper._kv_layout)
    wrapper._check_kv("paged_kv_cache", k, p, num_kv_heads, head_dim)
    if page_size != p.page_size:
        raise ValueError(f"paged_kv_cache has page_size {page_size}, plan() was given {p.page_size}")
    if p.max_page >= num_pages:
        raise ValueError(f"paged_kv_indices refers to page {p.max_page} but paged_kv_cache has {num_pages} pages")
    wrapper._note_capture(num_pages)
    scales = wrapper._kv_scales(p, k_scale, v_scale)
    out, lse = wrapper._outputs(q, p, out, lse, return_lse)
    if wrapper._backend == "torch":
        def kv_of(b):
            s, e = int(p.host_kv_base[b]), int(p.host_kv_base[b]) + -(-int(p.host_kv_lens[b]) // p.page_size)
            return gather_paged_kv(k, v, p.host_indices[s:e], int(p.host_kv_lens[b]), wrapper._kv_layout)
        wrapper._run_reference(q, kv_of, out, lse, p, scales, sinks)
    else:
        wrapper._launch(q, k, v, paged_strides(k, wrapper._kv_layout), paged_strides(v, wrapper._kv_layout),
                        out, lse, p, scales, enable_pdl, pdl_early_kv, sinks)
    return (out, lse) if return_lse else out


# BatchAttention's choice between one launch and two (a mixed batch's one-query requests to the decode kernels):
# nominal rates of the H100 / H200 class that only their ratio matters for (dense bf16 MMA, DRAM)
_SPLIT_FLOPS, _SPLIT_BYTES_PER_S = 5e14, 3.5e12


class BatchAttention(BatchPrefillWithPagedKVCacheWrapper):
    """FlashInfer's ``BatchAttention`` (the API of its persistent "holistic" kernel), by its name and arguments: one
    plan() for a batch that mixes prefill and decode requests over a paged cache, each request's KV given by its
    length (``kv_len_arr``) instead of its last page's, and run() -> (out, lse)::

        w = pagoda.BatchAttention(kv_layout="NHD", device="cuda")
        w.plan(qo_indptr, kv_indptr, kv_indices, kv_len_arr, num_qo_heads, num_kv_heads, head_dim_qk, head_dim_vo,
               page_size, causal=True, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
        out, lse = w.run(q, paged_kv_cache)        # lse: float32 [nnz_qo, num_qo_heads], base 2

    pagoda plans it as its paged prefill wrapper plans any batch (one load-balanced work list, one launch; one-query
    requests alone run the decode kernels), except a mixed batch whose one-query requests' KV reads outweigh its
    prefill's MMAs (split_mixed): in one launch their rows would fill 4 of the prefill kernel's 128-row tiles (a
    GQA group of 4) and pay a whole tile's MMAs per KV block, so they go to the decode kernels in a launch of their
    own and the rest to the prefill kernel in another (notes.md session 36). head_dim_vo must equal head_dim_qk, as
    everywhere in pagoda (MLA: BatchMLAPagedAttentionWrapper); the profiler of FlashInfer's kernel is not there
    (use_profiler / profiler_buffer: ValueError)."""

    def __init__(self, kv_layout: str = "NHD", device="cuda", *, backend: str = "auto") -> None:
        # (FlashInfer allocates its 384 MB workspace here; pagoda's split-KV scratch lives in 128 MB of it. backend:
        # pagoda's, as the other wrappers' ("torch": the PyTorch path))
        super().__init__(torch.empty(128 << 20, dtype=torch.uint8, device=torch.device(device)), kv_layout,
                         backend=backend)
        self._split = None  # a split plan: (decode wrapper, prefill wrapper, rows of each, nnz, heads, head_dim)
        self._parts = None  # (decode wrapper, prefill wrapper), made at the first split plan, sharing the workspace

    def plan(self, qo_indptr, kv_indptr, kv_indices, kv_len_arr, num_qo_heads: int, num_kv_heads: int,
             head_dim_qk: int, head_dim_vo: int, page_size: int, causal: bool = False, sm_scale: float | None = None,
             logits_soft_cap: float | None = None, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16,
             use_profiler: bool = False) -> None:
        if use_profiler:
            raise ValueError("use_profiler: FlashInfer's kernel profiler has no pagoda counterpart")
        ip = check_indptr("kv_indptr", kv_indptr)
        if not 1 <= check_int("page_size", page_size) <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be in 1..{MAX_PAGE_SIZE}, got {page_size}")
        kv_lens = to_host_array("kv_len_arr", kv_len_arr, ip.shape[0] - 1)  # (once: a sync for a device tensor)
        last = last_page_lens(ip, kv_lens, page_size)
        self._split = None
        kw = dict(causal=causal, sm_scale=sm_scale, logits_soft_cap=logits_soft_cap, q_data_type=q_data_type,
                  kv_data_type=kv_data_type)
        qo, qo_lens, _ = check_qo_indptr("qo_indptr", qo_indptr)
        dec = split_mixed(qo_lens, kv_lens, num_qo_heads, num_kv_heads, head_dim_qk, causal) \
            if self._backend != "torch" else None
        if dec is None:  # (qo: the host copy, so that the wrapper's plan does not copy qo_indptr back again)
            super().plan(qo, ip, kv_indices, torch.from_numpy(last), num_qo_heads, num_kv_heads, head_dim_qk,
                         page_size, head_dim_vo=head_dim_vo, **kw)
            return
        _check_unsupported(head_dim_qk, head_dim_vo, "NONE")
        if qo.shape[0] != ip.shape[0]:
            raise ValueError(f"qo_indptr has {qo.shape[0]} entries, kv_indptr {ip.shape[0]}")
        if self._parts is None:
            from .decode import BatchDecodeWithPagedKVCacheWrapper

            self._parts = (BatchDecodeWithPagedKVCacheWrapper(self._float_ws, self._kv_layout, backend=self._backend),
                           BatchPrefillWithPagedKVCacheWrapper(self._float_ws, self._kv_layout, backend=self._backend))
        dw, pw = self._parts
        pre = ~dec & (qo_lens > 0)
        pages = np.diff(ip)

        def page_ids(sel):  # the selected requests' page ids, in order, on kv_indices' device
            take = segment_ranges(ip, sel)
            if isinstance(kv_indices, torch.Tensor):
                return kv_indices.index_select(0, torch.from_numpy(take).to(kv_indices.device))
            return np.asarray(kv_indices)[take]

        def indptr_of(sel, counts):
            return torch.from_numpy(np.concatenate([[0], np.cumsum(counts[sel])]).astype(np.int32))
        dw.plan(indptr_of(dec, pages), page_ids(dec), torch.from_numpy(last[dec]), num_qo_heads, num_kv_heads,
                head_dim_qk, page_size, window_left=-1, logits_soft_cap=logits_soft_cap, sm_scale=sm_scale,
                q_data_type=q_data_type, kv_data_type=kv_data_type)
        pw.plan(indptr_of(pre, qo_lens), indptr_of(pre, pages), page_ids(pre), torch.from_numpy(last[pre]),
                num_qo_heads, num_kv_heads, head_dim_qk, page_size, **kw)
        rows = [_rows(qo, sel, self.device) for sel in (dec, pre)]
        self._split = (rows, int(qo[-1]), int(num_qo_heads), int(head_dim_qk))
        self._plan = None  # (a plain run() of this wrapper now needs a plan() of its own)

    def run(self, q: torch.Tensor, kv_cache, out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
            k_scale=None, v_scale=None, logits_soft_cap: float = 0.0, profiler_buffer=None):
        """Returns (out, lse). logits_soft_cap: FlashInfer passes the cap again here; 0.0 (its default) runs
        plan()'s, another value must be plan()'s."""
        if self._split is None:
            p = self._require_plan()
            cap = p.logits_soft_cap
        else:
            cap = self._parts[1]._require_plan().logits_soft_cap
        if profiler_buffer is not None:
            raise ValueError("profiler_buffer: FlashInfer's kernel profiler has no pagoda counterpart")
        if isinstance(logits_soft_cap, bool) or not isinstance(logits_soft_cap, (int, float)):
            raise ValueError(f"logits_soft_cap must be a float, got {logits_soft_cap!r}")
        if logits_soft_cap != 0.0 and not math.isclose(float(logits_soft_cap), cap, rel_tol=1e-6):
            raise ValueError(f"logits_soft_cap {logits_soft_cap!r} differs from plan()'s {cap!r}: pass it to plan()")
        if self._split is None:
            return run_paged(self, q, kv_cache, out, lse, True, k_scale, v_scale)
        rows, nnz, heads, head_dim = self._split
        if not isinstance(q, torch.Tensor) or tuple(q.shape) != (nnz, heads, head_dim):
            raise ValueError(f"q must be [{nnz}, {heads}, {head_dim}] as planned, got {getattr(q, 'shape', q)}")
        if out is None:
            out = torch.empty_like(q)
        elif not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype:
            raise ValueError(f"out must be {q.dtype} {tuple(q.shape)}, got {getattr(out, 'shape', out)}")
        if lse is None:
            lse = torch.empty(nnz, heads, dtype=torch.float32, device=q.device)
        elif not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (nnz, heads) or lse.dtype != torch.float32:
            raise ValueError(f"lse must be float32 [{nnz}, {heads}], got {getattr(lse, 'shape', lse)}")
        for wrapper, (span, idx) in zip(self._parts, rows):
            if span is not None:  # the part's rows are one range: views in and out, no copies
                wrapper.run(q[span[0]:span[1]], kv_cache, out[span[0]:span[1]], lse[span[0]:span[1]], True,
                            k_scale=k_scale, v_scale=v_scale)
            elif idx.numel():
                o, part_lse = wrapper.run(q.index_select(0, idx), kv_cache, return_lse=True, k_scale=k_scale,
                                          v_scale=v_scale)
                out.index_copy_(0, idx, o)
                lse.index_copy_(0, idx, part_lse)
        return out, lse

    forward = run


def single_prefill_with_kv_cache_return_lse(*args, **kwargs):
    """single_prefill_with_kv_cache with return_lse=True: (out, lse) (FlashInfer's alias)."""
    if "return_lse" in kwargs:
        raise ValueError("single_prefill_with_kv_cache_return_lse returns the lse always: no return_lse argument")
    return single_prefill_with_kv_cache(*args, return_lse=True, **kwargs)


def split_mixed(qo_lens: np.ndarray, kv_lens: np.ndarray, num_qo_heads: int, num_kv_heads: int, head_dim: int,
                causal: bool) -> np.ndarray | None:
    """BatchAttention's one-query requests (a bool mask) when a mixed batch is better run in two launches, else
    None: when their KV read (bytes at _SPLIT_BYTES_PER_S) takes longer than the other requests' MMAs (FLOPs at
    _SPLIT_FLOPS), the one launch would make them pay prefill tiles' MMAs while a separate prefill launch is short.
    H200, session 36 (scripts/batch_attention_probe.py, 32 / 8 heads x 128): 4 x 512 new prompts beside 128 decodes
    of 1024 202.5 -> 180.3 us in two launches (FlashInfer's BatchAttention 176.8); a 2048-token chunk over 8k beside
    63 decodes stays one launch (646 us; FlashInfer 919)."""
    dec = (qo_lens == 1) & (kv_lens > 0)
    pre = (qo_lens > 1) | ((qo_lens == 1) & (kv_lens == 0))
    if not dec.any() or not pre.any():
        return None
    dec_s = float(kv_lens[dec].sum()) * num_kv_heads * head_dim * 2 * 2 / _SPLIT_BYTES_PER_S
    q, k = qo_lens[pre].astype(np.float64), kv_lens[pre].astype(np.float64)
    pairs = (q * (k - q) + q * (q + 1) / 2) if causal else q * k  # (causal: bottom-right aligned)
    pre_s = float(np.maximum(pairs, 0).sum()) * num_qo_heads * head_dim * 4 / _SPLIT_FLOPS
    return dec if pre_s < dec_s else None


def _rows(qo: np.ndarray, sel: np.ndarray, device) -> tuple:
    """((first, end) when the selected requests' query rows are one range, else None; their rows as an int64
    index on device)."""
    idx = segment_ranges(qo, sel)
    span = (int(idx[0]), int(idx[-1]) + 1) if idx.size and idx[-1] - idx[0] + 1 == idx.size else None
    return span, torch.from_numpy(idx).to(device)
