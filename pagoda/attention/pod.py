"""POD-Attention's wrappers (FlashInfer's ``PODWithPagedKVCacheWrapper`` and ``BatchPODWithPagedKVCacheWrapper``,
after Kamath et al., arXiv 2410.18038): a serving step's prefill attention and its decode attention in one call.

FlashInfer runs the two parts as one kernel, its thread blocks sharing the SMs. pagoda runs each part in its own
kernel, one launch after the other on the stream: the prompt part in the paged (or single-request) prefill kernel
and the one-query requests in the decode kernel, which over an fp8 cache is the Gluon fp8 decode kernel (the prefill
kernels read fp8 pages through the Triton kernel). The same split serves pagoda's engine for its mixed steps
(PAGODA_SPLIT_MIXED: on the H200, Llama-3.1-8B with 64 x 4k decoding beside a 2k prompt in 512-token chunks, two
launches against one took 23.7 vs 23.8 ms a step over a bf16 cache and 24.5 vs 33.3 over fp8: session 43) and
BatchAttention's mixed batches (prefill.split_mixed).

Differences from FlashInfer's wrappers, by argument:
  - the prefill part's mask is a run() argument in FlashInfer (causal_p, custom_mask_p) while pagoda's planner needs
    it in plan(): plan() plans the prefill part for causal_p=False (FlashInfer's default) and the first run() with
    another mask plans that part again on the host (a run() of the same mask after it launches only);
  - q_scale (fp8 queries in FlashInfer; pagoda's queries are 16-bit) is folded into k_scale: the scores are
    q_scale * k_scale * sm_scale * q.k, as in FlashInfer's decode part;
  - k_scale / v_scale apply to both parts' caches (one cache in a serving step; required where a cache is fp8);
  - return_lse (return_lse_p / return_lse_d): the part's (out, lse) pair in place of its out (FlashInfer 0.6.0 returns
    the outputs only); lse float32, base 2, as every pagoda wrapper's.
"""
from __future__ import annotations

import numpy as np
import torch

from .decode import BatchDecodeWithPagedKVCacheWrapper
from .formats import check_qo_indptr, not_planned
from .prefill import BatchPrefillWithPagedKVCacheWrapper, _check_unsupported, single_prefill_with_kv_cache


def _fold_q_scale(q_scale, k_scale):
    """k_scale with q_scale folded in (both scale the scores): a float, or a per-head float32 tensor."""
    if q_scale is None:
        return k_scale
    if isinstance(q_scale, bool) or not isinstance(q_scale, (int, float)) or not 0 < q_scale < float("inf"):
        raise ValueError(f"q_scale must be a positive finite float, got {q_scale!r}")
    if k_scale is None:
        return float(q_scale)
    if isinstance(k_scale, torch.Tensor):
        return k_scale * float(q_scale)
    if isinstance(k_scale, bool) or not isinstance(k_scale, (int, float)):
        raise ValueError(f"k_scale must be a positive finite float or a float32 tensor, got {k_scale!r}")
    return float(k_scale) * float(q_scale)


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return bool(value)


class _DecodePart:
    """The decode part of a POD plan: the decode wrapper where every request has one query (FlashInfer's decode
    requests), else a paged prefill wrapper without a causal mask (FlashInfer's POD runs its decode part
    NON_CAUSAL)."""

    def __init__(self, workspace, kv_layout, backend):
        self.decode = BatchDecodeWithPagedKVCacheWrapper(workspace, kv_layout, backend=backend)
        self.multi = None  # (made at the first plan with several queries a request)
        self.workspace, self.kv_layout, self.backend = workspace, kv_layout, backend
        self.active = None

    def plan(self, qo_indptr, kv_indptr, kv_indices, last_page_len, num_qo_heads, num_kv_heads, head_dim,
             page_size, **kw):
        qo, _, one_query = check_qo_indptr("qo_indptr_d", qo_indptr)
        if qo.shape[0] != len(kv_indptr):
            raise ValueError(f"qo_indptr_d has {qo.shape[0]} entries, kv_indptr_d {len(kv_indptr)}")
        if one_query:
            self.decode.plan(kv_indptr, kv_indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size,
                             **kw)
            self.active = self.decode
            return
        if self.multi is None:
            self.multi = BatchPrefillWithPagedKVCacheWrapper(self.workspace, self.kv_layout, backend=self.backend)
        self.multi.plan(qo_indptr, kv_indptr, kv_indices, last_page_len, num_qo_heads, num_kv_heads, head_dim,
                        page_size, causal=False, **kw)
        self.active = self.multi

    def run(self, owner, q, cache, return_lse, k_scale, v_scale, enable_pdl):
        """owner: the POD wrapper (named in the error of a run() before plan())."""
        if self.active is None:
            raise not_planned(owner)
        return self.active.run(q, cache, return_lse=return_lse, k_scale=k_scale, v_scale=v_scale,
                               enable_pdl=enable_pdl)


class BatchPODWithPagedKVCacheWrapper:
    """A batch of prefill requests and a batch of decode requests, each with its own page table (and cache at
    run())::

        w = pagoda.BatchPODWithPagedKVCacheWrapper(workspace, "NHD")
        w.plan(qo_indptr_p, kv_indptr_p, kv_indices_p, last_page_len_p,
               qo_indptr_d, kv_indptr_d, kv_indices_d, last_page_len_d,
               num_qo_heads, num_kv_heads, head_dim, page_size, q_data_type=torch.bfloat16)
        out_p, out_d = w.run(q_p, kv_cache, q_d, kv_cache, causal_p=True)

    The prefill part in the paged prefill kernel, the decode part in the decode kernel (one launch each; the module
    docstring has the differences from FlashInfer's one kernel). The two parts share the workspace: their runs are in
    turn on one stream."""

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD", *, backend: str = "auto"):
        self._prefill = BatchPrefillWithPagedKVCacheWrapper(float_workspace_buffer, kv_layout, backend=backend)
        self._decode = _DecodePart(float_workspace_buffer, kv_layout, backend)
        self._p = None  # the prefill part's plan() arguments (a run() with another mask plans it again)
        self._p_mask = None  # the mask the prefill wrapper is planned for: (causal, mask tensor or None); None: none

    def plan(self, qo_indptr_p, kv_indptr_p, kv_indices_p, last_page_len_p, qo_indptr_d, kv_indptr_d, kv_indices_d,
             last_page_len_d, num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
             pos_encoding_mode: str = "NONE", window_left: int = -1, q_data_type="float16", kv_data_type=None,
             data_type=None, sm_scale: float | None = None, rope_scale=None, rope_theta=None,
             non_blocking: bool = True) -> None:
        """Plan both parts: the *_p tables (prefill requests, [batch_p + 1] indptrs, pages, last pages' lengths) and
        the *_d tables (decode requests); heads, head_dim and page_size are common. data_type: FlashInfer's alias of
        q_data_type and kv_data_type."""
        _check_unsupported(head_dim, None, pos_encoding_mode)
        if data_type is not None:
            q_data_type = data_type
            kv_data_type = data_type if kv_data_type is None else kv_data_type
        common = dict(window_left=window_left, q_data_type=q_data_type, kv_data_type=kv_data_type, sm_scale=sm_scale)
        self._p = self._p_mask = None
        self._prefill.plan(qo_indptr_p, kv_indptr_p, kv_indices_p, last_page_len_p, num_qo_heads, num_kv_heads,
                           head_dim, page_size, causal=False, **common)
        self._decode.active = None
        self._decode.plan(qo_indptr_d, kv_indptr_d, kv_indices_d, last_page_len_d, num_qo_heads, num_kv_heads,
                          head_dim, page_size, **common)
        self._p = (qo_indptr_p, kv_indptr_p, kv_indices_p, last_page_len_p, num_qo_heads, num_kv_heads, head_dim,
                   page_size, common)
        self._p_mask = (False, None)

    def _prefill_for(self, causal, custom_mask, packed_custom_mask):
        """The prefill wrapper planned for this mask (planned again when it differs from the last one)."""
        mask = packed_custom_mask if packed_custom_mask is not None else custom_mask
        key = (bool(causal) and mask is None, mask)
        if self._p_mask is None or self._p_mask[0] != key[0] or self._p_mask[1] is not key[1]:
            qo, kv, idx, last, hq, hk, d, ps, common = self._p
            # (a packed mask's per-request byte offsets: the plan's default, FlashInfer's segment_packbits layout)
            name = "packed_custom_mask" if packed_custom_mask is not None else "custom_mask"
            masks = {} if mask is None else {name: mask}
            self._p_mask = None  # (until this plan is made: a plan that fails leaves no plan to trust)
            self._prefill.plan(qo, kv, idx, last, hq, hk, d, ps, causal=key[0], **masks, **common)
            self._p_mask = key
        return self._prefill

    def run(self, q_p: torch.Tensor, paged_kv_cache_p, q_d: torch.Tensor, paged_kv_cache_d,
            custom_mask_p: torch.Tensor | None = None, packed_custom_mask_p: torch.Tensor | None = None,
            causal_p: bool = False, q_scale: float | None = None, k_scale=None, v_scale=None,
            return_lse: bool = False, use_fp16_qk_reduction: bool = False, enable_pdl: bool | None = None):
        """q_p [qo_indptr_p[-1], num_qo_heads, head_dim] over paged_kv_cache_p, q_d [qo_indptr_d[-1], ...] over
        paged_kv_cache_d (the two may be one cache). Returns (out_p, out_d), or ((out_p, out_d), (lse_p, lse_d))
        with return_lse, as FlashInfer's. custom_mask_p (bool, request by request, row-major) / packed_custom_mask_p
        (pagoda.segment_packbits' bits) replace causal_p where given."""
        if self._p is None:
            raise not_planned(self)
        causal_p = _check_flag("causal_p", causal_p)
        return_lse = _check_flag("return_lse", return_lse)
        _check_flag("use_fp16_qk_reduction", use_fp16_qk_reduction)  # (accepted: pagoda's MMAs accumulate fp32)
        k_scale = _fold_q_scale(q_scale, k_scale)
        prefill = self._prefill_for(causal_p, custom_mask_p, packed_custom_mask_p)
        rp = prefill.run(q_p, paged_kv_cache_p, return_lse=return_lse, k_scale=k_scale, v_scale=v_scale,
                         enable_pdl=enable_pdl)
        rd = self._decode.run(self, q_d, paged_kv_cache_d, return_lse, k_scale, v_scale, enable_pdl)
        if return_lse:
            return (rp[0], rd[0]), (rp[1], rd[1])
        return rp, rd

    forward = run

    def end_forward(self) -> None:
        """FlashInfer's deprecated no-op."""


class PODWithPagedKVCacheWrapper:
    """One prefill request over its own contiguous K / V beside a batch of decode requests over a paged cache::

        w = pagoda.PODWithPagedKVCacheWrapper(workspace, "NHD")
        w.plan(kv_indptr_d, kv_indices_d, last_page_len_d, num_qo_heads, num_kv_heads, head_dim, page_size,
               q_data_type=torch.bfloat16)
        out_p, out_d = w.run(q_p, k_p, v_p, q_d, kv_cache, causal_p=True)

    plan() is the decode part's (BatchDecodeWithPagedKVCacheWrapper.plan's arguments; use_cuda_graph and the
    buffers as its); the prefill part is single_prefill_with_kv_cache's (its arguments by the *_p names). One
    launch each (the module docstring has the differences from FlashInfer's one kernel). The *_d arguments that
    FlashInfer's run() takes and ignores (the decode part's mask, layout, position encoding, scale, window: plan()'s)
    are checked the same way here: a value other than FlashInfer's default is a ValueError."""

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD", use_cuda_graph: bool = False,
                 paged_kv_indptr_buffer: torch.Tensor | None = None, paged_kv_indices_buffer: torch.Tensor | None = None,
                 paged_kv_last_page_len_buffer: torch.Tensor | None = None, jit_args=None, *,
                 backend: str = "auto"):
        if jit_args is not None:
            raise ValueError("jit_args: FlashInfer's JIT module arguments have no pagoda counterpart (no JIT build)")
        self._decode = BatchDecodeWithPagedKVCacheWrapper(
            float_workspace_buffer, kv_layout, use_cuda_graph=use_cuda_graph, backend=backend,
            paged_kv_indptr_buffer=paged_kv_indptr_buffer, paged_kv_indices_buffer=paged_kv_indices_buffer,
            paged_kv_last_page_len_buffer=paged_kv_last_page_len_buffer)
        self._backend = backend
        self._planned = False

    def is_cuda_graph_enabled(self) -> bool:
        return self._decode._use_cuda_graph

    def plan(self, indptr, indices, last_page_len, num_qo_heads: int, num_kv_heads: int, head_dim: int,
             page_size: int, pos_encoding_mode: str = "NONE", window_left: int = -1, q_data_type="float16",
             kv_data_type=None, data_type=None, sm_scale: float | None = None, rope_scale=None, rope_theta=None,
             non_blocking: bool = True) -> None:
        self._planned = False
        self._decode.plan(indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size,
                          pos_encoding_mode=pos_encoding_mode, window_left=window_left, q_data_type=q_data_type,
                          kv_data_type=kv_data_type, data_type=data_type, sm_scale=sm_scale, rope_scale=rope_scale,
                          rope_theta=rope_theta, non_blocking=non_blocking)
        self._planned = True

    def run(self, q_p: torch.Tensor, k_p: torch.Tensor, v_p: torch.Tensor, q_d: torch.Tensor, paged_kv_cache_d,
            custom_mask_p: torch.Tensor | None = None, packed_custom_mask_p: torch.Tensor | None = None,
            causal_p: bool = False, kv_layout_p: str = "NHD", pos_encoding_mode_p: str = "NONE",
            sm_scale_p: float | None = None, window_left_p: int = -1, rope_scale_p=None, rope_theta_p=None,
            return_lse_p: bool = False, custom_mask_d=None, packed_custom_mask_d=None, causal_d: bool = False,
            kv_layout_d: str = "NHD", pos_encoding_mode_d: str = "NONE", sm_scale_d: float | None = None,
            window_left_d: int = -1, rope_scale_d=None, rope_theta_d=None, q_scale: float | None = None,
            k_scale=None, v_scale=None, return_lse_d: bool = False, use_fp16_qk_reduction: bool = False,
            enable_pdl: bool | None = None):
        """q_p [qo_len, num_qo_heads, head_dim] against k_p / v_p [kv_len, num_kv_heads, head_dim] (NHD; HND:
        kv_layout_p), q_d [batch, num_qo_heads, head_dim] over paged_kv_cache_d. Returns (out_p, out_d); with
        return_lse_p / return_lse_d that part's (out, lse) pair in place of its out. q_scale / k_scale / v_scale: the
        decode part's cache scales (q_scale folded into k_scale)."""
        if not self._planned:
            raise not_planned(self)
        for name, value, default in (("custom_mask_d", custom_mask_d, None),
                                     ("packed_custom_mask_d", packed_custom_mask_d, None),
                                     ("causal_d", causal_d, False), ("kv_layout_d", kv_layout_d, "NHD"),
                                     ("pos_encoding_mode_d", pos_encoding_mode_d, "NONE"),
                                     ("sm_scale_d", sm_scale_d, None), ("window_left_d", window_left_d, -1),
                                     ("rope_scale_d", rope_scale_d, None), ("rope_theta_d", rope_theta_d, None)):
            if not (value is default or (isinstance(value, (bool, int, str)) and type(value) is type(default)
                                         and value == default)):
                raise ValueError(f"{name}: the decode part's options are plan()'s (FlashInfer's run() ignores "
                                 f"this one), got {value!r}")
        return_lse_p = _check_flag("return_lse_p", return_lse_p)
        return_lse_d = _check_flag("return_lse_d", return_lse_d)
        _check_flag("use_fp16_qk_reduction", use_fp16_qk_reduction)
        rp = single_prefill_with_kv_cache(q_p, k_p, v_p, custom_mask=custom_mask_p,
                                          packed_custom_mask=packed_custom_mask_p, causal=causal_p,
                                          kv_layout=kv_layout_p, pos_encoding_mode=pos_encoding_mode_p,
                                          sm_scale=sm_scale_p, window_left=window_left_p, rope_scale=rope_scale_p,
                                          rope_theta=rope_theta_p, return_lse=return_lse_p, backend=self._backend)
        rd = self._decode.run(q_d, paged_kv_cache_d, return_lse=return_lse_d, k_scale=_fold_q_scale(q_scale, k_scale),
                              v_scale=v_scale, enable_pdl=enable_pdl)
        return rp, rd

    forward = run

    def end_forward(self) -> None:
        """FlashInfer's deprecated no-op."""

