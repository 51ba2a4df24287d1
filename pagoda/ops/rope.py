"""Rotary position embedding (FlashInfer names and arguments).

q: [nnz, num_qo_heads, head_dim], k: [nnz, num_kv_heads, head_dim]. The first ``rotary_dim``
dims (default head_dim) rotate: pairs (i, i + rotary_dim/2) by default (NeoX / Llama) or
(2i, 2i + 1) with ``interleave=True`` (GPT-J), by angle ``pos / rope_scale * rope_theta **
(-2i / rotary_dim)``. Positions come from ``pos_ids`` [nnz] or from ``indptr`` [batch + 1]
and ``offsets`` [batch] (token j of request b sits at offsets[b] + j - indptr[b]).
Math in fp32; outputs in the input dtype. One kernel launch rotates q and k.
The cos/sin-cache forms check positions on the host when they live on the CPU; positions in a
CUDA tensor are not read back (that would synchronize): a row whose position falls outside the
cache is written as NaN.
"""
from __future__ import annotations

import functools
import math

import torch
import triton

from ._dispatch import check_eps, check_scale, pdl_launch, use_triton
from ..attention.formats import FP8_DTYPES, FP8_MAX, paged_cache_geometry, paged_strides, unpack_paged_kv_cache
from .kernels.rope import rope_append_kernel, rope_kernel, rope_quantize_kernel
from .norm import rms_norm_float
from .page import append_paged_kv_cache, get_batch_indices_positions


def _pos_from_indptr(indptr: torch.Tensor, offsets: torch.Tensor, nnz: int) -> torch.Tensor:
    if indptr.dim() != 1 or offsets.dim() != 1 or offsets.shape[0] != indptr.shape[0] - 1:
        raise ValueError(f"indptr must be [batch + 1] and offsets [batch], got {tuple(indptr.shape)}, "
                         f"{tuple(offsets.shape)}")
    # token j of request b: offsets[b] + j - indptr[b], i.e. an append that ends at offsets + lengths
    lens = indptr[1:].long() - indptr[:-1].long()
    return get_batch_indices_positions(indptr, offsets.to(indptr.device).long() + lens, nnz)[1]


def rope_inv_freq(rotary_dim: int, rope_theta: float, rope_scale: float = 1.0, llama31: dict | None = None,
                  device=None) -> torch.Tensor:
    """Per-pair angular frequencies [rotary_dim / 2] (float32), Llama 3.1's scaling optional.
    Cached per arguments and device, so a call in a decode step copies nothing to the GPU."""
    key = tuple(sorted(llama31.items())) if llama31 is not None else None
    return _inv_freq(int(rotary_dim), float(rope_theta), float(rope_scale), key, torch.device(device or "cpu"))


@functools.lru_cache(maxsize=64)
def _inv_freq(rotary_dim, rope_theta, rope_scale, llama31, device):
    inv = 1.0 / (rope_theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    if llama31 is not None:
        c = dict(llama31)
        factor, low, high, old = c["factor"], c["low_freq_factor"], c["high_freq_factor"], c["old_context_len"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        mid = (wavelen <= old / low) & (wavelen >= old / high)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    else:
        inv = inv / rope_scale
    return inv.to(device=device, dtype=torch.float32)


def _check(q, k, pos, rotary_dim):
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be [nnz, num_heads, head_dim], got {getattr(t, 'shape', t)}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim")
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2] or k.device != q.device:
        raise ValueError(f"q and k must share nnz, head_dim and device: {tuple(q.shape)} vs {tuple(k.shape)}")
    if pos.shape != (q.shape[0],):
        raise ValueError(f"positions must be [{q.shape[0]}], got {tuple(pos.shape)}")
    rd = q.shape[2] if rotary_dim is None else rotary_dim
    if rd % 2 or not 0 < rd <= q.shape[2]:
        raise ValueError(f"rotary_dim must be even and in 2..head_dim ({q.shape[2]}), got {rotary_dim}")
    return rd


def _rotate_torch(x, out, pos, freq, cos_sin, half, interleave):
    """out <- rope(x) in PyTorch (the CPU path); out may be x (in place)."""
    xf = x.float()
    if cos_sin is not None:
        c, s = cos_sin[pos.long(), :half].float(), cos_sin[pos.long(), half:2 * half].float()
    else:
        ang = pos.float()[:, None] * freq[None, :]
        c, s = torch.cos(ang), torch.sin(ang)
    c, s = c[:, None, :], s[:, None, :]
    idx = torch.arange(half, device=x.device)
    i1, i2 = (2 * idx, 2 * idx + 1) if interleave else (idx, idx + half)
    x1, x2 = xf[..., i1], xf[..., i2]
    y = xf.clone()
    y[..., i1], y[..., i2] = x1 * c - x2 * s, x2 * c + x1 * s
    out.copy_(y.to(out.dtype))


def _apply(q, k, pos, rotary_dim, interleave, inplace, *, theta=1e4, scale=1.0, llama31=None, cos_sin=None):
    rd = _check(q, k, pos, rotary_dim)
    pos = pos.to(q.device, torch.int32)
    half = rd // 2
    freq = None if cos_sin is not None else rope_inv_freq(rd, theta, scale, llama31, q.device)
    q_out = q if inplace else torch.empty_like(q)
    k_out = k if inplace else torch.empty_like(k)
    nnz, dim = q.shape[0], q.shape[2]
    if nnz:
        if not use_triton(q):
            _rotate_torch(q, q_out, pos, freq, cos_sin, half, interleave)
            _rotate_torch(k, k_out, pos, freq, cos_sin, half, interleave)
        else:
            bh = min(32, triton.next_power_of_2(max(q.shape[1], k.shape[1])))
            grid = (nnz, triton.cdiv(q.shape[1], bh) + triton.cdiv(k.shape[1], bh))
            rope_kernel[grid](
                q, k, q_out, k_out, pos, freq if freq is not None else q, cos_sin if cos_sin is not None else q,
                q.shape[1], k.shape[1], dim, half, cos_sin.shape[0] if cos_sin is not None else 0,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), q_out.stride(0), q_out.stride(1),
                k_out.stride(0), k_out.stride(1), cos_sin.stride(0) if cos_sin is not None else 0,
                BLOCK_H=bh, BLOCK_R=triton.next_power_of_2(half), BLOCK_D=triton.next_power_of_2(dim),
                INTERLEAVE=interleave, FROM_CACHE=cos_sin is not None, COPY_REST=not inplace and 2 * half < dim,
                num_warps=4)
    return None if inplace else (q_out, k_out)


def apply_rope_pos_ids(q, k, pos_ids, rotary_dim=None, interleave=False, rope_scale=1.0, rope_theta=1e4):
    """Returns (q_rope, k_rope) for positions pos_ids [nnz]."""
    return _apply(q, k, pos_ids, rotary_dim, interleave, False, theta=rope_theta, scale=rope_scale)


def apply_rope_pos_ids_inplace(q, k, pos_ids, rotary_dim=None, interleave=False, rope_scale=1.0, rope_theta=1e4):
    _apply(q, k, pos_ids, rotary_dim, interleave, True, theta=rope_theta, scale=rope_scale)


def apply_rope(q, k, indptr, offsets, rotary_dim=None, interleave=False, rope_scale=1.0, rope_theta=1e4):
    """Returns (q_rope, k_rope); positions from indptr / offsets (module docstring)."""
    return apply_rope_pos_ids(q, k, _pos_from_indptr(indptr, offsets, q.shape[0]), rotary_dim, interleave,
                              rope_scale, rope_theta)


def apply_rope_inplace(q, k, indptr, offsets, rotary_dim=None, interleave=False, rope_scale=1.0, rope_theta=1e4):
    apply_rope_pos_ids_inplace(q, k, _pos_from_indptr(indptr, offsets, q.shape[0]), rotary_dim, interleave,
                               rope_scale, rope_theta)


def _llama31(rope_scale, low_freq_factor, high_freq_factor, old_context_len):
    return dict(factor=rope_scale, low_freq_factor=low_freq_factor, high_freq_factor=high_freq_factor,
                old_context_len=old_context_len)


def apply_llama31_rope_pos_ids(q, k, pos_ids, rotary_dim=None, interleave=False, rope_scale=8.0, rope_theta=5e5,
                               low_freq_factor=1.0, high_freq_factor=4.0, old_context_len=8192):
    """Llama 3.1 frequency scaling: rope_scale is the low-frequency factor."""
    return _apply(q, k, pos_ids, rotary_dim, interleave, False, theta=rope_theta,
                  llama31=_llama31(rope_scale, low_freq_factor, high_freq_factor, old_context_len))


def apply_llama31_rope_pos_ids_inplace(q, k, pos_ids, rotary_dim=None, interleave=False, rope_scale=8.0,
                                       rope_theta=5e5, low_freq_factor=1.0, high_freq_factor=4.0,
                                       old_context_len=8192):
    _apply(q, k, pos_ids, rotary_dim, interleave, True, theta=rope_theta,
           llama31=_llama31(rope_scale, low_freq_factor, high_freq_factor, old_context_len))


def apply_llama31_rope(q, k, indptr, offsets, rotary_dim=None, interleave=False, rope_scale=8.0, rope_theta=5e5,
                       low_freq_factor=1.0, high_freq_factor=4.0, old_context_len=8192):
    return apply_llama31_rope_pos_ids(q, k, _pos_from_indptr(indptr, offsets, q.shape[0]), rotary_dim, interleave,
                                      rope_scale, rope_theta, low_freq_factor, high_freq_factor, old_context_len)


def apply_llama31_rope_inplace(q, k, indptr, offsets, rotary_dim=None, interleave=False, rope_scale=8.0,
                               rope_theta=5e5, low_freq_factor=1.0, high_freq_factor=4.0, old_context_len=8192):
    apply_llama31_rope_pos_ids_inplace(q, k, _pos_from_indptr(indptr, offsets, q.shape[0]), rotary_dim,
                                       interleave, rope_scale, rope_theta, low_freq_factor, high_freq_factor,
                                       old_context_len)


def _cos_sin_args(positions, query, key, head_size, cos_sin_cache):
    if query.dim() != 2 or key.dim() != 2 or query.shape[1] % head_size or key.shape[1] % head_size:
        raise ValueError(f"query and key must be [nnz, heads * head_size ({head_size})], got "
                         f"{tuple(query.shape)}, {tuple(key.shape)}")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] % 2 or cos_sin_cache.shape[1] > head_size:
        raise ValueError(f"cos_sin_cache must be [max_position, rotary_dim <= head_size], got "
                         f"{tuple(cos_sin_cache.shape)}")
    if cos_sin_cache.dtype != torch.float32:
        raise ValueError(f"cos_sin_cache must be float32, got {cos_sin_cache.dtype}")
    # Checked here when that is free (positions on the CPU); on the GPU the kernel writes NaN for a
    # position outside the cache rather than synchronize to look.
    if positions.device.type == "cpu" and positions.numel() and (
            int(positions.min()) < 0 or int(positions.max()) >= cos_sin_cache.shape[0]):
        raise ValueError(f"positions must be in 0..{cos_sin_cache.shape[0] - 1}")
    q = query.view(query.shape[0], -1, head_size)
    k = key.view(key.shape[0], -1, head_size)
    return q, k, cos_sin_cache.shape[1]


def apply_rope_with_cos_sin_cache(positions, query, key, head_size: int, cos_sin_cache, is_neox: bool = True):
    """vLLM / SGLang form: query [nnz, heads * head_size], cos_sin_cache [max_pos, rotary_dim]
    = [cos | sin] float32. Returns (query_out, key_out) shaped like the inputs."""
    q, k, rd = _cos_sin_args(positions, query, key, head_size, cos_sin_cache)
    q_out, k_out = _apply(q, k, positions, rd, not is_neox, False, cos_sin=cos_sin_cache)
    return q_out.view_as(query), k_out.view_as(key)


def apply_rope_with_cos_sin_cache_inplace(positions, query, key, head_size: int, cos_sin_cache,
                                          is_neox: bool = True) -> None:
    q, k, rd = _cos_sin_args(positions, query, key, head_size, cos_sin_cache)
    _apply(q, k, positions, rd, not is_neox, True, cos_sin=cos_sin_cache)


def _heads3(name: str, t, nnz: int | None = None) -> torch.Tensor:
    """t as [nnz, heads, dim] (a 2-D MLA tensor [nnz, dim] as one head), its last dimension contiguous."""
    if not isinstance(t, torch.Tensor) or t.dim() not in (2, 3):
        raise ValueError(f"{name} must be [nnz, heads, dim] (or [nnz, dim] for MLA's k), got "
                         f"{getattr(t, 'shape', t)}")
    if nnz is not None and t.shape[0] != nnz:
        raise ValueError(f"{name} must have nnz = {nnz} rows, got {tuple(t.shape)}")
    if t.numel() and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension")
    return t if t.dim() == 3 else t.unsqueeze(1)


def rope_quantize_fp8(q_rope, k_rope, q_nope, k_nope, cos_sin_cache, pos_ids, is_neox: bool = True,
                      quantize_dtype=None, quant_scale_q: float = 1.0, quant_scale_kv: float = 1.0, q_rope_out=None,
                      k_rope_out=None, q_nope_out=None, k_nope_out=None, enable_pdl: bool = False):
    """FlashInfer's: RoPE on the rotary parts and every part quantized to fp8, in one launch. q_rope [nnz,
    num_qo_heads, rope_dim], k_rope [nnz, num_kv_heads, rope_dim] (MLA: [nnz, rope_dim]), 16-bit; q_nope / k_nope the
    same with no_rope_dim (None: none); cos_sin_cache float32 [max_pos, rope_dim] = [cos | sin]; pos_ids [nnz];
    is_neox: pairs (i, i + rope_dim / 2), else (2i, 2i + 1). Each output = value * quant_scale_q (q) or
    quant_scale_kv (k), saturated to the fp8 range, in quantize_dtype (float8_e4m3fn by default, or the given
    outputs'). Returns (q_rope_out, k_rope_out, q_nope_out, k_nope_out), allocated where not given. A position
    outside the cache writes NaN (positions on the GPU are not read back)."""
    nnz = q_rope.shape[0] if isinstance(q_rope, torch.Tensor) else None
    qr, kr = _heads3("q_rope", q_rope), _heads3("k_rope", k_rope, nnz)
    if q_rope.dim() != 3:
        raise ValueError(f"q_rope must be [nnz, num_qo_heads, rope_dim], got {tuple(q_rope.shape)}")
    for name, t in (("q_rope", q_rope), ("k_rope", k_rope)):
        if t.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"{name} must be float16 / bfloat16, got {t.dtype}")
    rope_dim = q_rope.shape[-1]
    if k_rope.shape[-1] != rope_dim or rope_dim % 2:
        raise ValueError(f"q_rope and k_rope must share an even rope_dim, got {q_rope.shape[-1]} / {k_rope.shape[-1]}")
    dev = q_rope.device
    if q_nope is None:
        q_nope = torch.empty(nnz, q_rope.shape[1], 0, dtype=q_rope.dtype, device=dev)
    if k_nope is None:
        k_nope = torch.empty(*k_rope.shape[:-1], 0, dtype=k_rope.dtype, device=dev)
    qn, kn = _heads3("q_nope", q_nope, nnz), _heads3("k_nope", k_nope, nnz)
    nope = q_nope.shape[-1]
    if qn.shape[:2] != qr.shape[:2] or kn.shape[:2] != kr.shape[:2] or k_nope.shape[-1] != nope or \
            q_nope.dim() != q_rope.dim() or k_nope.dim() != k_rope.dim():
        raise ValueError(f"q_nope / k_nope must match q_rope / k_rope but for their last dimension (one no_rope_dim): "
                         f"{tuple(q_nope.shape)}, {tuple(k_nope.shape)} against {tuple(q_rope.shape)}, "
                         f"{tuple(k_rope.shape)}")
    if not isinstance(cos_sin_cache, torch.Tensor) or cos_sin_cache.dtype != torch.float32 or \
            cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != rope_dim:
        raise ValueError(f"cos_sin_cache must be float32 [max_pos, rope_dim ({rope_dim})], got "
                         f"{getattr(cos_sin_cache, 'dtype', None)} {tuple(getattr(cos_sin_cache, 'shape', ()))}")
    if not isinstance(pos_ids, torch.Tensor) or pos_ids.shape != (nnz,) or pos_ids.dtype.is_floating_point:
        raise ValueError(f"pos_ids must be an integer [{nnz}] tensor, got {getattr(pos_ids, 'shape', pos_ids)}")
    for name, t in (("k_rope", k_rope), ("q_nope", q_nope), ("k_nope", k_nope), ("cos_sin_cache", cos_sin_cache),
                    ("pos_ids", pos_ids)):
        if t.device != dev:
            raise ValueError(f"{name} must be on q_rope's device {dev}, got {t.device}")
    if pos_ids.device.type == "cpu" and nnz and (int(pos_ids.min()) < 0 or
                                                 int(pos_ids.max()) >= cos_sin_cache.shape[0]):
        raise ValueError(f"pos_ids must be in 0..{cos_sin_cache.shape[0] - 1}")
    outs = [q_rope_out, k_rope_out, q_nope_out, k_nope_out]
    if quantize_dtype is None:
        quantize_dtype = next((o.dtype for o in outs if o is not None), torch.float8_e4m3fn)
    if quantize_dtype not in FP8_DTYPES:
        raise ValueError(f"quantize_dtype must be float8_e4m3fn / float8_e5m2, got {quantize_dtype}")
    quant_scale_q, quant_scale_kv = check_scale("quant_scale_q", quant_scale_q), check_scale("quant_scale_kv",
                                                                                           quant_scale_kv)
    names = ("q_rope_out", "k_rope_out", "q_nope_out", "k_nope_out")
    for i, (name, src) in enumerate(zip(names, (q_rope, k_rope, q_nope, k_nope))):
        if outs[i] is None:
            outs[i] = torch.empty(src.shape, dtype=quantize_dtype, device=dev)
        elif not isinstance(outs[i], torch.Tensor) or outs[i].shape != src.shape or outs[i].dtype != quantize_dtype \
                or outs[i].device != dev:
            raise ValueError(f"{name} must be {quantize_dtype} {tuple(src.shape)} on {dev}, got "
                             f"{getattr(outs[i], 'dtype', type(outs[i]))} {tuple(getattr(outs[i], 'shape', ()))}")
    clamp = FP8_MAX[quantize_dtype]
    if nnz:
        ys = [_heads3(n, o) for n, o in zip(names, outs)]
        if not use_triton(q_rope):
            half = rope_dim // 2
            for x, y, xn, yn, sc in ((qr, ys[0], qn, ys[2], quant_scale_q), (kr, ys[1], kn, ys[3], quant_scale_kv)):
                rot = torch.empty(x.shape, dtype=torch.float32, device=dev)
                _rotate_torch(x, rot, pos_ids, None, cos_sin_cache, half, not is_neox)
                y.copy_((rot * sc).clamp(-clamp, clamp).to(quantize_dtype))
                yn.copy_((xn.float() * sc).clamp(-clamp, clamp).to(quantize_dtype))
        else:
            bh = min(32, triton.next_power_of_2(max(qr.shape[1], kr.shape[1])))
            grid = (nnz, triton.cdiv(qr.shape[1], bh) + triton.cdiv(kr.shape[1], bh))
            st = [s for t in (qr, kr, qn, kn, *ys) for s in (t.stride(0), t.stride(1))]
            rope_quantize_kernel[grid](qr, kr, qn, kn, *ys, pos_ids, cos_sin_cache, qr.shape[1], kr.shape[1],
                                       rope_dim // 2, nope, cos_sin_cache.shape[0], *st, cos_sin_cache.stride(0),
                                       quant_scale_q, quant_scale_kv, clamp, BLOCK_H=bh,
                                       BLOCK_R=triton.next_power_of_2(rope_dim // 2),
                                       BLOCK_N=triton.next_power_of_2(max(nope, 1)), INTERLEAVE=not is_neox,
                                       HAS_NOPE=nope > 0, num_warps=4, **pdl_launch(enable_pdl, q_rope))
    return tuple(outs)


mla_rope_quantize_fp8 = rope_quantize_fp8  # (FlashInfer's MLA name for the same function)


def fused_store_args(cache_dtype: torch.dtype, k_scale, v_scale) -> dict:
    """The fused RoPE + append kernels' store arguments for a cache of cache_dtype (rope_append_kernel,
    qkv_rope_append_kernel): {} for a 16-bit cache (the scales must be None), for an fp8 one the quantize-on-write
    constants of append_paged_kv_cache, from k_scale / v_scale floats > 0 (ValueError otherwise)."""
    if cache_dtype not in FP8_DTYPES:
        if k_scale is not None or v_scale is not None:
            raise ValueError("k_scale / v_scale are for an fp8 paged_kv_cache")
        return {}
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in (k_scale, v_scale)):
        raise ValueError(f"paged_kv_cache is fp8: quantizing on write needs k_scale / v_scale floats > 0, got "
                         f"{k_scale!r} / {v_scale!r} (per-head scale tensors: apply_rope_with_cos_sin_cache_inplace "
                         f"and append_paged_kv_cache(k_scale=, v_scale=))")
    return dict(k_inv=1.0 / k_scale, v_inv=1.0 / v_scale, clamp=FP8_MAX[cache_dtype], QUANT=True)


def apply_rope_with_cos_sin_cache_and_append(positions, query, key, value, head_size: int, cos_sin_cache,
                                             is_neox: bool, paged_kv_cache, batch_indices, kv_indices, kv_indptr,
                                             kv_last_page_len, kv_layout: str = "NHD", check: bool = True,
                                             enable_pdl: bool | None = None, pdl_tables_early: bool = False, *,
                                             k_scale: float | None = None, v_scale: float | None = None,
                                             q_norm_weight: torch.Tensor | None = None,
                                             k_norm_weight: torch.Tensor | None = None, norm_eps: float = 1e-6,
                                             norm_weight_offset: float = 0.0) -> None:
    """apply_rope_with_cos_sin_cache_inplace on query, then append_paged_kv_cache of the rotated key and of value,
    in one launch on the GPU (pagoda's extension: the rotated key goes straight to the cache and ``key`` itself is
    left as it was). query / key [nnz, heads * head_size] as in the RoPE ops, value [nnz, kv_heads * head_size] or
    [nnz, kv_heads, head_size]; the cache and page-table arguments (and ``check``) as in append_paged_kv_cache. An
    fp8 cache is quantized on write as append_paged_kv_cache does it, with k_scale / v_scale floats (required then;
    per-head scale tensors: use the two ops). enable_pdl: the one-launch kernel as a programmatic dependent launch
    on a Hopper GPU (ops/kernels/pdl.py; None: off). pdl_tables_early (with enable_pdl): positions, batch_indices,
    kv_indices and kv_indptr are not the output of the kernel launched right before this one (host copies made
    before it, as the engine's step inputs are): the kernel reads them, and the cos / sin rows, before waiting for
    that kernel, and only the query / key / value reads wait (pagoda's extension; ignored where an index tensor
    needs a conversion, which would be that kernel). q_norm_weight / k_norm_weight ([head_size] each, both or
    neither: pagoda's extension for Qwen3's and Gemma 3's per-head q / k RMSNorms): each head of query and of key is
    first normalized, x * rsqrt(mean(x^2) + norm_eps) * (weight + norm_weight_offset) (offset 1 for Gemma's
    (1 + w) form), in float32 and rounded once after RoPE."""
    q, k, rd = _cos_sin_args(positions, query, key, head_size, cos_sin_cache)
    norm = _qk_norm_args(q, q_norm_weight, k_norm_weight, norm_eps, norm_weight_offset)
    if not isinstance(value, torch.Tensor) or value.shape[0] != key.shape[0] or value.numel() != key.numel():
        raise ValueError(f"value must hold key's {tuple(key.shape)} elements, got {getattr(value, 'shape', value)}")
    v = value.reshape(k.shape)
    k_cache, v_cache = unpack_paged_kv_cache(paged_kv_cache, kv_layout)
    store = fused_store_args(k_cache.dtype, k_scale, v_scale)
    if check or not use_triton(q) or positions.shape != (q.shape[0],):
        # host-checked page tables, or the PyTorch path: the two ops (append checks what the kernel trusts)
        # (the per-head norms in float32 over each head: [nnz, heads, d])
        qn, kn = (q, k) if norm is None else (rms_norm_float(q, norm[0], norm_eps, norm_weight_offset),
                                              rms_norm_float(k, norm[1], norm_eps, norm_weight_offset))
        q_out, k_out = _apply(qn, kn, positions, rd, not is_neox, False, cos_sin=cos_sin_cache)
        q.copy_(q_out)
        append_paged_kv_cache(k_out.to(k.dtype), v, batch_indices, positions, paged_kv_cache, kv_indices, kv_indptr,
                              kv_last_page_len, kv_layout, check=check, k_scale=k_scale, v_scale=v_scale)
        return
    _, page_size, heads, dim = paged_cache_geometry(k_cache, kv_layout)
    if (heads, dim) != tuple(k.shape[1:]) or v.stride(-1) != 1 or k.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError(f"key / value must be [nnz, {heads} * {dim}] contiguous in head_size for this cache, "
                         f"got {tuple(key.shape)}")
    if batch_indices.shape != positions.shape:
        raise ValueError(f"batch_indices and positions must have {q.shape[0]} tokens")
    nnz = q.shape[0]
    if nnz == 0:
        return
    dev = q.device
    # (heads a program: with the norms, 16 of head_size 256, under ptxas's 255 registers without spills)
    bh = min(16 if norm is not None and dim > 128 else 32, triton.next_power_of_2(max(q.shape[1], heads)))
    grid = (nnz, triton.cdiv(q.shape[1], bh) + triton.cdiv(heads, bh))
    tables = [positions, batch_indices, kv_indices, kv_indptr]
    conv = [t.to(dev, torch.int32) for t in tables]
    early = bool(pdl_tables_early) and all(c is t for c, t in zip(conv, tables))
    rope_append_kernel[grid](
        q, k, v, k_cache, v_cache, *conv, cos_sin_cache,
        q.shape[1], heads, dim, rd // 2, cos_sin_cache.shape[0], page_size,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *paged_strides(k_cache, kv_layout), *paged_strides(v_cache, kv_layout), cos_sin_cache.stride(0),
        BLOCK_H=bh, BLOCK_R=triton.next_power_of_2(rd // 2), BLOCK_D=max(16, triton.next_power_of_2(dim)),
        INTERLEAVE=not is_neox, TABLES_EARLY=early, num_warps=4, **pdl_launch(enable_pdl, q),
        **store, **({} if norm is None else dict(QW=norm[0], KW=norm[1], norm_eps=float(norm_eps),
                                                 norm_offset=float(norm_weight_offset), QK_NORM=True,
                                                 NORM_REST=rd < dim)))


def _qk_norm_args(q, q_norm_weight, k_norm_weight, norm_eps, norm_weight_offset):
    """None without per-head norms, else (q_norm_weight, k_norm_weight), checked against q [nnz, heads, head_size]."""
    if q_norm_weight is None and k_norm_weight is None:
        return None
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if not isinstance(w, torch.Tensor):
            raise ValueError(f"{name} must be a [{q.shape[2]}] tensor with the other norm weight, got {w!r}")
        if w.shape != (q.shape[2],) or w.stride(0) != 1:
            raise ValueError(f"{name} must be a contiguous [{q.shape[2]}] tensor (head_size), got {tuple(w.shape)}")
        if not w.is_floating_point() or w.dtype in FP8_DTYPES:
            raise ValueError(f"{name} must be float32 / bfloat16 / float16, got {w.dtype}")
        if w.device != q.device:
            raise ValueError(f"{name} must be on query's device {q.device}, got {w.device}")
    check_eps("norm_eps", norm_eps)
    x = norm_weight_offset
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ValueError(f"norm_weight_offset must be a finite float, got {x!r}")
    return q_norm_weight, k_norm_weight


