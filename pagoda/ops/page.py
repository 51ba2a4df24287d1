"""Paged KV cache writes (FlashInfer names and arguments)."""
from __future__ import annotations

import torch
import triton

from ..attention.formats import (FP8_DTYPES, FP8_MAX, check_int, check_kv_layout, check_kv_scale, paged_cache_geometry,
                                 paged_strides, unpack_paged_kv_cache)
from ._dispatch import use_triton
from .kernels.page import append_paged_kv_kernel


def get_batch_indices_positions(append_indptr: torch.Tensor, seq_lens: torch.Tensor, nnz: int):
    """For appended tokens laid out by ``append_indptr`` [batch + 1]: each token's request and
    its position in that request's KV, given ``seq_lens`` [batch] = KV lengths *after* the
    append. Returns (batch_indices [nnz] int32, positions [nnz] int32) on append_indptr's device.
    """
    if append_indptr.dim() != 1 or seq_lens.dim() != 1 or seq_lens.shape[0] != append_indptr.shape[0] - 1:
        raise ValueError(f"append_indptr must be [batch + 1] and seq_lens [batch], got "
                         f"{tuple(append_indptr.shape)} and {tuple(seq_lens.shape)}")
    indptr = append_indptr.long()
    lens = indptr[1:] - indptr[:-1]
    batch = torch.repeat_interleave(torch.arange(len(lens), device=indptr.device), lens, output_size=nnz)
    tok = torch.arange(nnz, device=indptr.device)
    pos = tok - indptr[batch] + seq_lens.to(indptr.device).long()[batch] - lens[batch]
    return batch.to(torch.int32), pos.to(torch.int32)


def append_paged_kv_cache(append_key: torch.Tensor, append_value: torch.Tensor, batch_indices: torch.Tensor,
                          positions: torch.Tensor, paged_kv_cache, kv_indices: torch.Tensor,
                          kv_indptr: torch.Tensor, kv_last_page_len: torch.Tensor, kv_layout: str = "NHD",
                          *, k_scale=None, v_scale=None, check: bool = True) -> None:
    """Write append_key / append_value [nnz, num_kv_heads, head_dim] into the paged cache (one
    tensor [pages, 2, ...] or a (k, v) tuple, NHD or HND) at each token's (request, position).

    The page table (kv_indices, kv_indptr, kv_last_page_len) must already cover the new tokens;
    a position outside its request's pages is a ValueError (checked on the host: a device sync
    when the indices live on the GPU). ``check=False`` (pagoda's extension, for callers that
    built the indices themselves, e.g. a serving engine inside a CUDA graph) skips those reads:
    shapes are still checked, positions and page ids are trusted.

    An fp8 cache (torch.float8_e4m3fn / float8_e5m2) with fp16 / bf16 / fp32 inputs is quantized
    on write: the cache gets ``clamp(x / scale, -max, max)`` rounded to the nearest fp8 value,
    with ``k_scale`` / ``v_scale`` (required then: a float or a float32 tensor of per-head
    scales; the same ones go to the attention wrappers' ``run()``). Inputs already in the cache's
    dtype are copied as they are (scales must then be None).
    """
    check_kv_layout(kv_layout)
    k_cache, v_cache = unpack_paged_kv_cache(paged_kv_cache, kv_layout)
    num_pages, page_size, heads, dim = paged_cache_geometry(k_cache, kv_layout)
    for name, t in (("append_key", append_key), ("append_value", append_value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or tuple(t.shape[1:]) != (heads, dim):
            raise ValueError(f"{name} must be [nnz, {heads}, {dim}], got {getattr(t, 'shape', t)}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim")
        if t.device != k_cache.device:
            raise ValueError(f"{name} must be on the cache's device {k_cache.device}")
    quant = k_cache.dtype in FP8_DTYPES and append_key.dtype != k_cache.dtype
    if k_cache.dtype in FP8_DTYPES and append_key.dtype == k_cache.dtype:
        if k_scale is not None or v_scale is not None:
            raise ValueError("k_scale / v_scale are for quantizing on write: append_key is already in the "
                             f"cache's dtype {k_cache.dtype}")
    if append_value.dtype != append_key.dtype:
        raise ValueError(f"append_value dtype {append_value.dtype} differs from append_key's {append_key.dtype}")
    if quant:
        scales = (check_kv_scale("k_scale", k_scale, heads, k_cache.device, True),
                  check_kv_scale("v_scale", v_scale, heads, k_cache.device, True))
    elif k_scale is not None or v_scale is not None:
        raise ValueError("k_scale / v_scale apply to an fp8 cache only")
    else:
        scales = None
    nnz = append_key.shape[0]
    if append_value.shape[0] != nnz or batch_indices.shape != (nnz,) or positions.shape != (nnz,):
        raise ValueError(f"append_value, batch_indices and positions must have {nnz} tokens")
    if nnz == 0:
        return
    if not check and use_triton(append_key):  # (the PyTorch path reads them anyway: it checks)
        return _launch_append(append_key, append_value, k_cache, v_cache, batch_indices, positions, kv_indices,
                              kv_indptr, kv_layout, heads, dim, page_size, scales)
    _check_targets(batch_indices, positions, kv_indices, kv_indptr, kv_last_page_len, page_size, num_pages)
    if not use_triton(append_key):
        page, slot = _page_slots(batch_indices, positions, kv_indices, kv_indptr, page_size, k_cache.device)
        for i, (cache, src) in enumerate(((k_cache, append_key), (v_cache, append_value))):
            if scales is not None:
                src = quantize_fp8(src, scales[i], cache.dtype)
            if kv_layout == "NHD":
                cache[page, slot] = src.to(cache.dtype)
            else:
                cache[page, :, slot] = src.to(cache.dtype)
        return
    _launch_append(append_key, append_value, k_cache, v_cache, batch_indices, positions, kv_indices, kv_indptr,
                   kv_layout, heads, dim, page_size, scales)


def _check_targets(batch_indices, positions, kv_indices, kv_indptr, kv_last_page_len, page_size: int,
                   num_pages: int) -> None:
    """Host checks of an append's targets (a device sync for tables on the GPU): every token's request exists and
    its position lies within that request's pages, and the page ids those pages use lie in the cache."""
    indptr = kv_indptr.detach().cpu().long()
    last = kv_last_page_len.detach().cpu().long()
    b_host, p_host = batch_indices.detach().cpu().long(), positions.detach().cpu().long()
    if b_host.min() < 0 or b_host.max() >= len(last):
        raise ValueError(f"batch_indices must be in 0..{len(last) - 1}")
    pages = indptr[1:] - indptr[:-1]
    kv_len = torch.where(pages > 0, (pages - 1) * page_size + last, torch.zeros_like(pages))
    bad = (p_host < 0) | (p_host >= kv_len[b_host])
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"positions[{i}]={int(p_host[i])} is outside request {int(b_host[i])}'s "
                         f"{int(kv_len[b_host[i]])} KV slots")
    used = kv_indices.detach().cpu().long()[: int(indptr[-1])]
    if used.numel() and (used.min() < 0 or used.max() >= num_pages):
        raise ValueError(f"kv_indices must be in 0..{num_pages - 1}")


def _page_slots(batch_indices, positions, kv_indices, kv_indptr, page_size: int, device):
    """Each appended token's (page id, slot in the page) as int64 tensors on device (the PyTorch paths' targets)."""
    pos = positions.to(device).long()
    first = kv_indptr.to(device).long()[batch_indices.to(device).long()]
    return kv_indices.to(device).long()[first + pos // page_size], pos % page_size


def get_seq_lens(kv_indptr: torch.Tensor, kv_last_page_len: torch.Tensor, page_size: int) -> torch.Tensor:
    """Each request's KV length from a page table (FlashInfer's): (pages - 1) * page_size + last_page_len, a
    request without pages 0 + its last_page_len entry, as FlashInfer computes it."""
    for name, t in (("kv_indptr", kv_indptr), ("kv_last_page_len", kv_last_page_len)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a 1-D integer tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if kv_indptr.shape[0] != kv_last_page_len.shape[0] + 1:
        raise ValueError(f"kv_indptr must have one entry more than kv_last_page_len, got {kv_indptr.shape[0]} and "
                         f"{kv_last_page_len.shape[0]}")
    if check_int("page_size", page_size) < 1:
        raise ValueError(f"page_size must be an int >= 1, got {page_size!r}")
    return torch.clamp(kv_indptr[1:] - kv_indptr[:-1] - 1, min=0) * page_size + kv_last_page_len


def append_paged_mla_kv_cache(append_ckv: torch.Tensor, append_kpe: torch.Tensor, batch_indices: torch.Tensor,
                              positions: torch.Tensor, ckv_cache: torch.Tensor, kpe_cache: torch.Tensor,
                              kv_indices: torch.Tensor, kv_indptr: torch.Tensor, kv_last_page_len: torch.Tensor, *,
                              check: bool = True) -> None:
    """MLA's paged cache write (FlashInfer's): append_ckv [nnz, ckv_dim] and append_kpe [nnz, kpe_dim] into
    ckv_cache [pages, page_size, ckv_dim] and kpe_cache [pages, page_size, kpe_dim] (BatchMLAPagedAttentionWrapper's
    caches) at each token's (request, position), as append_paged_kv_cache does for K / V: the page table must
    already cover the new tokens (checked on the host unless check=False, pagoda's extension for callers that built
    the targets themselves, e.g. inside a CUDA graph). Any ckv / kpe dims (FlashInfer's kernel: 512 / 64); the
    write is PyTorch indexing, on any device."""
    for name, src, cache in (("append_ckv", append_ckv, ckv_cache), ("append_kpe", append_kpe, kpe_cache)):
        cname = name.replace("append_", "") + "_cache"
        if not isinstance(cache, torch.Tensor) or cache.dim() != 3:
            raise ValueError(f"{cname} must be [pages, page_size, dim], got {getattr(cache, 'shape', cache)}")
        if not isinstance(src, torch.Tensor) or src.dim() != 2 or src.shape[1] != cache.shape[2]:
            raise ValueError(f"{name} must be [nnz, {cache.shape[2]}], got {getattr(src, 'shape', src)}")
        if src.dtype != cache.dtype or src.device != cache.device:
            raise ValueError(f"{name} must be {cache.dtype} on {cache.device} like {cname}, got {src.dtype} on "
                             f"{src.device}")
    if tuple(kpe_cache.shape[:2]) != tuple(ckv_cache.shape[:2]):
        raise ValueError(f"kpe_cache's pages and page_size {tuple(kpe_cache.shape[:2])} differ from ckv_cache's "
                         f"{tuple(ckv_cache.shape[:2])}")
    nnz = append_ckv.shape[0]
    for name, t in (("append_kpe", append_kpe), ("batch_indices", batch_indices), ("positions", positions)):
        if t.shape[0] != nnz or (t.dim() != 1 and name != "append_kpe"):
            raise ValueError(f"{name} must have {nnz} tokens, got {tuple(t.shape)}")
    if nnz == 0:
        return
    num_pages, page_size = ckv_cache.shape[:2]
    if check:
        _check_targets(batch_indices, positions, kv_indices, kv_indptr, kv_last_page_len, page_size, num_pages)
    page, slot = _page_slots(batch_indices, positions, kv_indices, kv_indptr, page_size, ckv_cache.device)
    ckv_cache[page, slot] = append_ckv
    kpe_cache[page, slot] = append_kpe


def quantize_fp8(x: torch.Tensor, scale, dtype: torch.dtype) -> torch.Tensor:
    """The reference of quantize-on-write: x [..., heads, dim] -> clamp(x / scale) in ``dtype``;
    scale is (float, per-head float32 tensor or None) as check_kv_scale returns it."""
    f, t = scale
    inv = torch.full((x.shape[-2],), 1.0 / f, dtype=torch.float32, device=x.device)  # as the kernel rounds it
    if t is not None:
        inv = inv / t.float()
    y = x.float() * inv[:, None]
    m = FP8_MAX[dtype]
    return y.clamp(-m, m).to(dtype)


def _launch_append(append_key, append_value, k_cache, v_cache, batch_indices, positions, kv_indices, kv_indptr,
                   kv_layout, heads, dim, page_size, scales=None):
    nnz = append_key.shape[0]
    sk, sv = paged_strides(k_cache, kv_layout), paged_strides(v_cache, kv_layout)
    dev = k_cache.device
    (kf, kt), (vf, vt) = scales if scales is not None else ((1.0, None), (1.0, None))
    per_head = kt is not None or vt is not None
    if per_head:
        kt = kt.contiguous() if kt is not None else torch.ones(heads, dtype=torch.float32, device=dev)
        vt = vt.contiguous() if vt is not None else torch.ones(heads, dtype=torch.float32, device=dev)
    clamp = FP8_MAX.get(k_cache.dtype, 0.0)
    append_paged_kv_kernel[(nnz,)](
        append_key, append_value, k_cache, v_cache, batch_indices.to(dev, torch.int32),
        positions.to(dev, torch.int32), kv_indices.to(dev, torch.int32), kv_indptr.to(dev, torch.int32),
        append_key.stride(0), append_key.stride(1), append_value.stride(0), append_value.stride(1),
        *sk, *sv, heads, dim, page_size, kt if per_head else append_key, vt if per_head else append_key,
        1.0 / kf, 1.0 / vf, clamp,
        BLOCK_H=triton.next_power_of_2(heads), BLOCK_D=max(16, triton.next_power_of_2(dim)),
        QUANT=scales is not None, SCALE_PTR=per_head, num_warps=4)
