"""KV-cache formats and their validation; every format lowers to one BSR description.

The kernel sees a batch as rows of query tiles and columns of KV: for a paged cache a
column block is a page (``kv_indices[kv_indptr[b] : kv_indptr[b + 1]]`` are request b's
pages, the last one holding ``last_page_len`` tokens); for a ragged KV a request's KV
is one dense column block starting at token ``kv_indptr[b]``. Either way the planner
needs, per request, a KV length and a base offset, which is what these helpers return.
"""
from __future__ import annotations

import numpy as np
import torch

SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
# KV caches may also be fp8: the kernels dequantize after the load (value * scale).
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
MAX_PAGE_SIZE = 128


class NotPlannedError(ValueError, RuntimeError):
    """run() called before plan(): a ValueError, as every misuse of the API is, and a RuntimeError, as it was
    before (and as FlashInfer's wrappers fail), so that either ``except`` catches it."""


def not_planned(wrapper) -> NotPlannedError:
    return NotPlannedError(f"{type(wrapper).__name__}.run() called before plan(): call plan() first")


# indptrs of up to this many entries (7 requests) are checked on Python lists (check_paged_lens, check_qo_indptr):
# 16 -> ~6 us and 8 -> ~5 us per plan on the CPU machine (session 25)
SMALL_INDPTR = 8


def to_host_array(name: str, x, length: int | None = None) -> np.ndarray:
    """A 1-D integer tensor/sequence as an int64 NumPy array (copies device tensors)."""
    if isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {x.dtype}")
        if x.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(x.shape)}")
        if x.is_cpu and x.dtype in (torch.int32, torch.int64):  # no torch dispatch (plan() per step)
            arr = x.detach().numpy().astype(np.int64)
        else:
            arr = x.detach().to("cpu", torch.int64).numpy()
    else:
        arr = np.asarray(x, dtype=np.int64)
        if arr.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if length is not None and arr.shape[0] != length:
        raise ValueError(f"{name} must have {length} entries, got {arr.shape[0]}")
    return arr


def check_indptr(name: str, x, length: int | None = None) -> np.ndarray:
    """An indptr: at least 1 entry, non-negative, non-decreasing."""
    arr = to_host_array(name, x, length)
    if arr.shape[0] < 1:
        raise ValueError(f"{name} must have at least one entry (batch_size + 1)")
    if arr[0] < 0:
        raise ValueError(f"{name} must start at a non-negative offset, got {arr[0]}")
    dec = arr[1:] < arr[:-1]
    if dec.any():
        bad = int(np.argmax(dec))
        raise ValueError(f"{name} must be non-decreasing: {name}[{bad}]={arr[bad]} > "
                         f"{name}[{bad + 1}]={arr[bad + 1]}")
    return arr


def check_int(name: str, value) -> int:
    """An integer argument (a Python or NumPy int, not a bool / float / string): ValueError naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r}")
    return int(value)


def check_qo_indptr(name: str, x) -> tuple[np.ndarray, np.ndarray, bool]:
    """check_indptr for a query indptr, with what the planner needs of it from the same pass: (indptr as int64,
    query rows per request, whether every request has exactly one: a decode step, which the engine plans through
    the prefill wrapper)."""
    if (isinstance(x, torch.Tensor) and x.is_cpu and x.dtype in (torch.int32, torch.int64)
            and x.dim() == 1 and 2 <= x.shape[0] <= SMALL_INDPTR):  # a few requests: Python on a list
        xl = x.tolist()
        lens_l = [b - a for a, b in zip(xl, xl[1:])]
        if xl[0] >= 0 and min(lens_l) >= 0:
            return np.array(xl, dtype=np.int64), np.array(lens_l, dtype=np.int64), all(n == 1 for n in lens_l)
    arr = to_host_array(name, x)
    if arr.shape[0] < 2:
        return check_indptr(name, arr), np.zeros(0, dtype=np.int64), False
    lens = arr[1:] - arr[:-1]
    lo = int(lens.min())
    if lo < 0 or arr[0] < 0:
        check_indptr(name, arr)  # (raises, with its message)
    # every length >= 1 and their sum the request count: all ones (no max() pass)
    return arr, lens, lo >= 1 and int(arr[-1] - arr[0]) == lens.shape[0]


def check_heads(num_qo_heads: int, num_kv_heads: int, head_dim: int, any_head_dim: bool = False) -> None:
    """any_head_dim: the PyTorch reference path takes any head_dim >= 1 (the kernels: 64, 128, 256)."""
    check_int("num_qo_heads", num_qo_heads)
    check_int("num_kv_heads", num_kv_heads)
    check_int("head_dim", head_dim)
    if num_kv_heads < 1 or num_qo_heads < 1:
        raise ValueError(f"num_qo_heads and num_kv_heads must be >= 1, got {num_qo_heads}, {num_kv_heads}")
    if num_qo_heads % num_kv_heads != 0:
        raise ValueError(f"num_qo_heads ({num_qo_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if (head_dim not in SUPPORTED_HEAD_DIMS) if not any_head_dim else head_dim < 1:
        raise ValueError(f"head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim}")


def check_dtype(name: str, dtype, allow_fp32: bool = False) -> torch.dtype:
    """allow_fp32: the PyTorch reference path also takes float32 (the kernels: fp16 / bf16)."""
    dtype = canonical_dtype(name, dtype)
    if dtype not in SUPPORTED_DTYPES and not (allow_fp32 and dtype == torch.float32):
        raise ValueError(f"{name} must be float16 or bfloat16{' or float32' if allow_fp32 else ''}, got {dtype}")
    return dtype


def check_kv_dtype(kv_data_type, q_dtype: torch.dtype, allow_fp32: bool = False) -> torch.dtype:
    """The KV dtype of a plan: q's dtype (default), or fp8 (e4m3fn / e5m2) under fp16 / bf16 queries."""
    if kv_data_type is None:
        return q_dtype
    kv = canonical_dtype("kv_data_type", kv_data_type)
    if kv in FP8_DTYPES:
        if q_dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"an fp8 KV cache needs float16 or bfloat16 queries, q_data_type is {q_dtype}")
        return kv
    kv = check_dtype("kv_data_type", kv, allow_fp32=allow_fp32)
    if kv != q_dtype:
        raise ValueError(f"kv_data_type ({kv}) must equal q_data_type ({q_dtype}) or be an fp8 type "
                         f"(torch.float8_e4m3fn, torch.float8_e5m2)")
    return kv


def check_kv_scale(name: str, scale, num_kv_heads: int, device: torch.device, required: bool):
    """k_scale / v_scale of run(): None (1.0; an error when ``required``, i.e. for an fp8 cache), a
    positive float, or a float32 tensor of num_kv_heads per-head scales (or one) on the KV's device.
    Returns (float factor, tensor or None)."""
    if scale is None:
        if required:
            raise ValueError(f"{name} is required for an fp8 KV cache (the cache holds value / {name}); "
                             f"pass a float or a per-head float32 tensor")
        return 1.0, None
    if isinstance(scale, torch.Tensor):
        if scale.dtype != torch.float32:
            raise ValueError(f"{name} must be float32, got {scale.dtype}")
        if scale.device != device:
            raise ValueError(f"{name} is on {scale.device} but the KV cache is on {device}")
        if scale.numel() == 1:
            scale = scale.reshape(1).expand(num_kv_heads)
        elif tuple(scale.shape) != (num_kv_heads,):
            raise ValueError(f"{name} must be a float or a tensor of num_kv_heads ({num_kv_heads}) scales, "
                             f"got shape {tuple(scale.shape)}")
        return 1.0, scale
    if not isinstance(scale, (int, float)) or not (scale > 0 and scale < float("inf")):
        raise ValueError(f"{name} must be a positive finite float or a float32 tensor, got {scale!r}")
    return float(scale), None


def check_sinks(sinks, num_qo_heads: int, device: torch.device):
    """run()'s sinks (attention sinks, reference.py): None, or a float32 tensor of num_qo_heads logits on the
    queries' device, contiguous (the kernels read sinks[h]). Returns the tensor or None."""
    if sinks is None:
        return None
    if not isinstance(sinks, torch.Tensor):
        raise ValueError(f"sinks must be a float32 tensor of num_qo_heads ({num_qo_heads}) logits, got "
                         f"{type(sinks).__name__}")
    if sinks.dtype != torch.float32:
        raise ValueError(f"sinks must be float32, got {sinks.dtype}")
    if tuple(sinks.shape) != (num_qo_heads,):
        raise ValueError(f"sinks must have shape ({num_qo_heads},) (one logit per query head), got "
                         f"{tuple(sinks.shape)}")
    if sinks.device != device:
        raise ValueError(f"sinks is on {sinks.device} but q is on {device}")
    if num_qo_heads > 1 and sinks.stride(0) != 1:
        raise ValueError(f"sinks must be contiguous, got stride {sinks.stride(0)}")
    return sinks


def canonical_dtype(name: str, dtype) -> torch.dtype:
    if isinstance(dtype, str):
        value = getattr(torch, dtype, None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"{name}: unknown dtype {dtype!r}")
        return value
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name} must be a torch.dtype or its name, got {dtype!r}")
    return dtype


def check_kv_layout(kv_layout: str) -> str:
    if kv_layout not in ("NHD", "HND"):
        raise ValueError(f"kv_layout must be 'NHD' or 'HND', got {kv_layout!r}")
    return kv_layout


def paged_kv_lens(indptr: np.ndarray, last_page_len: np.ndarray, page_size: int) -> np.ndarray:
    """Tokens per request of a paged cache; validates last_page_len."""
    if not 1 <= check_int("page_size", page_size) <= MAX_PAGE_SIZE:
        raise ValueError(f"page_size must be in 1..{MAX_PAGE_SIZE}, got {page_size}")
    num_pages = np.diff(indptr)
    if not len(num_pages):
        return num_pages
    if last_page_len.min() >= 1 and last_page_len.max() <= page_size and num_pages.min() > 0:  # the usual case
        return (num_pages - 1) * page_size + last_page_len
    has = num_pages > 0
    bad = has & ((last_page_len < 1) | (last_page_len > page_size))
    if np.any(bad):
        i = int(np.nonzero(bad)[0][0])
        raise ValueError(f"last_page_len[{i}]={last_page_len[i]} must be in 1..page_size ({page_size})")
    return np.where(has, (num_pages - 1) * page_size + last_page_len, 0)


def last_page_lens(kv_indptr: np.ndarray, lens: np.ndarray, page_size: int) -> np.ndarray:
    """Each request's tokens in its last page from its KV length (FlashInfer's kv_len_arr, on the host) and its page
    count: a request of n pages holds (n - 1) * page_size + 1 .. n * page_size tokens, one of no pages none (its
    entry is 1, which paged_kv_lens ignores)."""
    pages = np.diff(kv_indptr)
    fits = np.where(pages > 0, (lens > (pages - 1) * page_size) & (lens <= pages * page_size), lens == 0)
    if not fits.all():
        i = int(np.nonzero(~fits)[0][0])
        raise ValueError(f"kv_len_arr[{i}]={int(lens[i])} does not fit its {int(pages[i])} pages of {page_size} "
                         f"tokens (kv_indptr)")
    return np.where(pages > 0, lens - (pages - 1) * page_size, 1).astype(np.int32)


def check_paged_lens(indptr, last_page_len, page_size: int, names=("indptr", "last_page_len"),
                     length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(indptr as int64, kv_lens) of a paged batch: check_indptr + to_host_array + paged_kv_lens in few
    NumPy calls for the usual input (host int tensors, every request with pages, valid last_page_len);
    anything else goes through those checks (and their error messages, naming ``names``). length: the
    entries indptr must have (None: any)."""
    if (isinstance(indptr, torch.Tensor) and isinstance(last_page_len, torch.Tensor)
            and indptr.is_cpu and last_page_len.is_cpu
            and indptr.dtype in (torch.int32, torch.int64) and last_page_len.dtype in (torch.int32, torch.int64)
            and indptr.dim() == 1 and last_page_len.dim() == 1 and indptr.shape[0] == last_page_len.shape[0] + 1
            and indptr.shape[0] > 1 and type(page_size) is int and 1 <= page_size <= MAX_PAGE_SIZE
            and (length is None or indptr.shape[0] == length)):
        if indptr.shape[0] <= SMALL_INDPTR:  # a few requests: Python on lists (NumPy calls cost ~1 us each)
            ipl, ll = indptr.tolist(), last_page_len.tolist()
            if ipl[0] >= 0 and all(a < b for a, b in zip(ipl, ipl[1:])) and all(0 < x <= page_size for x in ll):
                return (np.array(ipl, dtype=np.int64),
                        np.array([(b - a - 1) * page_size + x for a, b, x in zip(ipl, ipl[1:], ll)], dtype=np.int64))
        ip = indptr.numpy().astype(np.int64)  # (integer tensors carry no autograd history: no detach)
        last = last_page_len.numpy()
        num_pages = ip[1:] - ip[:-1]
        # 1 <= last <= page_size in one reduction: last - 1 read as unsigned wraps 0 and negatives past page_size
        last_u = (last - 1).view(np.uint32 if last.dtype == np.int32 else np.uint64)
        if ip[0] >= 0 and num_pages.min() > 0 and last_u.max() < page_size:
            return ip, num_pages * page_size + (last - page_size)
    ip = check_indptr(names[0], indptr, length)
    last = to_host_array(names[1], last_page_len, ip.shape[0] - 1)
    return ip, paged_kv_lens(ip, last, page_size)


def check_page_indices(indices, indptr: np.ndarray) -> tuple[torch.Tensor, int]:
    """Returns (indices as an int32 tensor, largest index or -1); checks its length and sign."""
    if not isinstance(indices, torch.Tensor):
        indices = torch.as_tensor(np.asarray(indices, dtype=np.int64))
    if indices.dim() != 1 or indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(f"paged_kv_indices must be a 1-D integer tensor, got {indices.dtype} {tuple(indices.shape)}")
    if indices.shape[0] < indptr[-1]:
        raise ValueError(f"paged_kv_indices has {indices.shape[0]} entries but the indptr needs {indptr[-1]}")
    if indices.is_cpu and indices.dtype == torch.int32:  # the usual host page table: NumPy only
        host = indices.numpy()[int(indptr[0]):int(indptr[-1])]
        if host.size == 0:
            return indices, -1
        hi_u = int(host.view(np.uint32).max())  # one pass: negative ids read as huge unsigned ones
        if hi_u < 2**31:
            return indices, hi_u
    used = indices[int(indptr[0]):int(indptr[-1])]
    if used.numel() == 0:
        return indices.to(torch.int32), -1
    # one reduction and one copy of its two values back (on a GPU a sync: build page tables on the host). Page ids
    # on the device cost a plan() +63..69 us over host ones with the min and the max apart (two syncs; one of
    # session 24's device hosts), +50 with this (another host: plan_time_h200_s24.txt)
    lo, hi = torch.stack(torch.aminmax(used)).tolist()
    if lo < 0:
        raise ValueError(f"paged_kv_indices must be >= 0, found {lo}")
    if hi >= 2**31:
        raise ValueError(f"paged_kv_indices must fit in int32, found {hi}")
    return indices.to(torch.int32), hi


def unpack_paged_kv_cache(paged_kv_cache, kv_layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(k_cache, v_cache), each [max_num_pages, page_size, num_kv_heads, head_dim] (NHD)
    or [max_num_pages, num_kv_heads, page_size, head_dim] (HND), from either the single
    tensor [max_num_pages, 2, ...] or a (k_cache, v_cache) tuple."""
    if isinstance(paged_kv_cache, (tuple, list)):
        if len(paged_kv_cache) != 2:
            raise ValueError("paged_kv_cache as a tuple must be (k_cache, v_cache)")
        k, v = paged_kv_cache
        if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
            raise ValueError("paged_kv_cache tuple must hold two tensors")
        if k.dim() != 4 or k.shape != v.shape:
            raise ValueError(f"paged_kv_cache k/v must be 4-D and of one shape, got "
                             f"{tuple(k.shape)} and {tuple(v.shape)}")
        if k.dtype != v.dtype or k.device != v.device:
            raise ValueError("paged_kv_cache k and v must share dtype and device")
    elif isinstance(paged_kv_cache, torch.Tensor):
        if paged_kv_cache.dim() != 5 or paged_kv_cache.shape[1] != 2:
            raise ValueError("paged_kv_cache must be [max_num_pages, 2, page_size, num_kv_heads, head_dim] "
                             f"(NHD) or its HND form, got {tuple(paged_kv_cache.shape)}")
        k, v = paged_kv_cache[:, 0], paged_kv_cache[:, 1]
    else:
        raise ValueError(f"paged_kv_cache must be a tensor or a (k, v) tuple, got {type(paged_kv_cache)}")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("paged_kv_cache must be contiguous in head_dim")
    return k, v


def paged_cache_geometry(k: torch.Tensor, kv_layout: str) -> tuple[int, int, int, int]:
    """(max_num_pages, page_size, num_kv_heads, head_dim) of one unpacked cache tensor."""
    if kv_layout == "NHD":
        return k.shape[0], k.shape[1], k.shape[2], k.shape[3]
    return k.shape[0], k.shape[2], k.shape[1], k.shape[3]


def paged_strides(t: torch.Tensor, kv_layout: str) -> tuple[int, int, int]:
    """(page, slot, head) strides in elements of an unpacked cache tensor."""
    if kv_layout == "NHD":
        return t.stride(0), t.stride(1), t.stride(2)
    return t.stride(0), t.stride(2), t.stride(1)
