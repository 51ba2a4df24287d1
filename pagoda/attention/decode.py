"""Decode attention: one query token per request against a paged KV cache.

FlashInfer-compatible: ``BatchDecodeWithPagedKVCacheWrapper`` (plan()/run()) and
``single_decode_with_kv_cache``. Decode is the batch kernel with one-token query
tiles; the GQA group of a KV head fills the tile's rows (tensor cores even in decode).
"""
from __future__ import annotations

import numpy as np
import torch

from .formats import check_page_indices, check_paged_lens
from .prefill import run_paged, single_prefill_with_kv_cache
from .runner import BatchAttention


class BatchDecodeWithPagedKVCacheWrapper(BatchAttention):
    """Batch decode over a paged KV cache.

    Example::

        ws = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device="cuda")
        wrapper = pagoda.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
        wrapper.plan(kv_indptr, kv_indices, kv_last_page_len, 32, 8, 128, 16)
        out = wrapper.run(q, paged_kv_cache)   # q [batch, 32, 128]

    With ``use_cuda_graph=True`` all device buffers are preallocated, so a captured
    ``run()`` replays correctly after any later ``plan()`` of a batch that fits them.
    ``backend``: "auto" (Triton on CUDA, the PyTorch reference elsewhere), "triton", "torch".
    """

    _mode = "decode"
    _paged = True

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD",
                 use_cuda_graph: bool = False, use_tensor_cores: bool = False,
                 paged_kv_indptr_buffer: torch.Tensor | None = None,
                 paged_kv_indices_buffer: torch.Tensor | None = None,
                 paged_kv_last_page_len_buffer: torch.Tensor | None = None,
                 backend: str = "auto", variant=None) -> None:
        # use_tensor_cores is accepted for FlashInfer compatibility: the kernel always
        # packs the GQA group into tensor-core tiles. The indptr / last_page_len
        # buffers are not needed: the plan reduces them to the work list.
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph, backend, paged_kv_indices_buffer,
                         variant)

    def plan(self, indptr, indices, last_page_len, num_qo_heads: int, num_kv_heads: int, head_dim: int,
             page_size: int, pos_encoding_mode: str = "NONE", window_left: int = -1,
             logits_soft_cap: float | None = None, q_data_type="float16", kv_data_type=None,
             data_type=None, sm_scale: float | None = None, rope_scale=None, rope_theta=None,
             non_blocking: bool = True) -> None:
        """Plan a decode step.

        indptr: [batch + 1] int, request b owns pages indices[indptr[b]:indptr[b+1]].
        indices: [indptr[-1]] int page ids into the cache's first dimension.
        last_page_len: [batch] int in 1..page_size, tokens in each request's last page
            (ignored for a request with no pages: its kv_len is 0, output 0, lse -inf).
        Host tensors keep plan() free of device syncs; device tensors are copied back.
        """
        if pos_encoding_mode != "NONE":
            raise ValueError(f"pos_encoding_mode={pos_encoding_mode!r} is not supported: apply RoPE before "
                             f"attention (pagoda.ops) and pass 'NONE'")
        if data_type is not None and kv_data_type is None:
            kv_data_type = data_type
        kv_indptr, kv_lens = check_paged_lens(indptr, last_page_len, page_size)
        batch = kv_indptr.shape[0] - 1
        idx, max_page = check_page_indices(indices, kv_indptr)
        self._plan_batch(qo_indptr=np.arange(batch + 1, dtype=np.int64), kv_lens=kv_lens,
                         kv_base=kv_indptr[:-1], indices=idx, max_page=max_page,
                         num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                         page_size=page_size, causal=False, window_left=window_left,
                         logits_soft_cap=logits_soft_cap, sm_scale=sm_scale, q_data_type=q_data_type,
                         kv_data_type=kv_data_type, one_query=True)

    begin_forward = plan

    def run(self, q: torch.Tensor, paged_kv_cache, out: torch.Tensor | None = None,
            lse: torch.Tensor | None = None, return_lse: bool = False, *, k_scale=None, v_scale=None,
            enable_pdl: bool | None = None, pdl_early_kv: bool = False, sinks: torch.Tensor | None = None):
        """q: [batch, num_qo_heads, head_dim]; paged_kv_cache: [max_num_pages, 2, page_size,
        num_kv_heads, head_dim] (NHD; HND swaps page_size and num_kv_heads) or a (k, v) tuple of
        [max_num_pages, page_size, num_kv_heads, head_dim].
        Returns out [batch, num_qo_heads, head_dim] (q.dtype), and lse [batch, num_qo_heads]
        float32 base-2 log-sum-exp when return_lse.
        k_scale / v_scale: the cache holds K / k_scale and V / v_scale (a float, or a float32 tensor
        of per-KV-head scales); required for an fp8 cache (kv_data_type=torch.float8_e4m3fn or
        float8_e5m2 in plan()), which the kernel dequantizes after the load.
        enable_pdl: launch the kernel as a programmatic dependent launch on a Hopper GPU (it may start while
        the kernel before it runs, and waits for it before touching memory: ops/kernels/pdl.py); None: off.
        It applies to the Triton attention kernel and the Gluon decode kernel (kernels/decode_sm90.py, which
        runs most decode plans on sm_90; the Gluon prefill kernel launches plainly).
        pdl_early_kv (pagoda's, with enable_pdl): the caller promises that the kernel launched right before this
        one writes no KV but each request's last token (a decode step's own K / V, as RoPE + append does), so the
        Gluon decode kernel may copy its first KV blocks before its PDL wait (kernels/decode_sm90.py EARLY_KV);
        elsewhere it changes nothing. A wrong promise reads stale KV.
        sinks: attention sinks (gpt-oss; FlashInfer's run(sinks=)): float32 [num_qo_heads] learned logits, one per
        query head, each a term exp(sinks[h]) in its softmax's sum and no value (on the logits' scale, not
        multiplied by sm_scale); the returned lse counts it (reference.py). A CUDA graph reads the tensor it
        captured: update it in place."""
        return run_paged(self, q, paged_kv_cache, out, lse, return_lse, k_scale, v_scale, enable_pdl, pdl_early_kv,
                         sinks)

    forward = run


class CUDAGraphBatchDecodeWithPagedKVCacheWrapper(BatchDecodeWithPagedKVCacheWrapper):
    """FlashInfer's CUDA-graph decode wrapper: BatchDecodeWithPagedKVCacheWrapper(use_cuda_graph=True) with the
    caller's buffers (indices_buffer sizes the page ids a plan may hold; the indptr / last-page buffers are
    accepted: the plan reduces them to its work list)."""

    def __init__(self, workspace_buffer: torch.Tensor, indptr_buffer: torch.Tensor, indices_buffer: torch.Tensor,
                 last_page_len_buffer: torch.Tensor, kv_layout: str = "NHD", use_tensor_cores: bool = False,
                 backend: str = "auto") -> None:
        super().__init__(workspace_buffer, kv_layout, use_cuda_graph=True, use_tensor_cores=use_tensor_cores,
                         paged_kv_indptr_buffer=indptr_buffer, paged_kv_indices_buffer=indices_buffer,
                         paged_kv_last_page_len_buffer=last_page_len_buffer, backend=backend)


def fast_decode_plan(self: BatchDecodeWithPagedKVCacheWrapper, indptr, indices, last_page_len, num_qo_heads: int,
                     num_kv_heads: int, head_dim: int, page_size: int, pos_encoding_mode: str = "NONE",
                     window_left: int = -1, logits_soft_cap: float | None = None, q_data_type=None,
                     kv_data_type=None, data_type=None, sm_scale: float | None = None, rope_scale=None,
                     rope_theta=None, non_blocking: bool = True, fixed_split_size: int | None = None,
                     disable_split_kv: bool = False, global_override_indptr_cpu=None) -> None:
    """FlashInfer's fast_decode_plan (SGLang binds it to its decode wrappers as their plan): the wrapper's plan();
    pagoda's plan() copies nothing device-to-device already. global_override_indptr_cpu: a host copy of indptr
    (no device read). fixed_split_size / disable_split_kv (FlashInfer's deterministic split) are not taken:
    ValueError unless at their defaults."""
    if fixed_split_size not in (None, -1) or disable_split_kv:
        raise ValueError("fast_decode_plan: fixed_split_size / disable_split_kv are not supported by pagoda's "
                         "planner (it sizes the splits from its cost model); leave them at None / False")
    if data_type is not None:
        q_data_type = data_type if q_data_type is None else q_data_type
        kv_data_type = data_type if kv_data_type is None else kv_data_type
    self.plan(indptr if global_override_indptr_cpu is None else global_override_indptr_cpu, indices, last_page_len,
              num_qo_heads, num_kv_heads, head_dim, page_size, pos_encoding_mode=pos_encoding_mode,
              window_left=window_left, logits_soft_cap=logits_soft_cap,
              q_data_type="float16" if q_data_type is None else q_data_type, kv_data_type=kv_data_type,
              sm_scale=sm_scale, rope_scale=rope_scale, rope_theta=rope_theta, non_blocking=non_blocking)


def single_decode_with_kv_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layout: str = "NHD",
                                pos_encoding_mode: str = "NONE", use_tensor_cores: bool = False,
                                sm_scale: float | None = None, window_left: int = -1,
                                logits_soft_cap: float | None = None, return_lse: bool = False,
                                backend: str = "auto", k_scale=None, v_scale=None, variant=None,
                                sinks: torch.Tensor | None = None):
    """Decode attention of one query against one request's KV.

    q: [num_qo_heads, head_dim]; k, v: [kv_len, num_kv_heads, head_dim] (NHD) or
    [num_kv_heads, kv_len, head_dim] (HND). Returns out [num_qo_heads, head_dim], and
    lse [num_qo_heads] (float32, base 2) when return_lse. sinks: float32 [num_qo_heads] attention-sink logits
    (reference.py).
    """
    if not isinstance(q, torch.Tensor) or q.dim() != 2:
        raise ValueError(f"q must be [num_qo_heads, head_dim], got {getattr(q, 'shape', q)}")
    if pos_encoding_mode != "NONE":
        raise ValueError(f"pos_encoding_mode={pos_encoding_mode!r} is not supported; pass 'NONE'")
    res = single_prefill_with_kv_cache(q[None], k, v, causal=False, kv_layout=kv_layout, sm_scale=sm_scale,
                                       window_left=window_left, logits_soft_cap=logits_soft_cap,
                                       return_lse=return_lse, backend=backend, k_scale=k_scale,
                                       v_scale=v_scale, variant=variant, sinks=sinks, _mode="decode")
    if return_lse:
        return res[0][0], res[1][0]
    return res[0]
