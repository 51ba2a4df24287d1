"""Segment GEMM for multi-LoRA serving: FlashInfer's SegmentGEMMWrapper (flashinfer.gemm), on a Triton kernel
(kernels/lora.py) with a PyTorch path that runs anywhere.

    y[seg_indptr[b]:seg_indptr[b + 1]] = x[seg_indptr[b]:seg_indptr[b + 1]] @ W[weight_indices[b]]  (b < batch_size)

weights is [num_weights, d_out, d_in] (weight_column_major=True, nn.Linear's layout: W[i].T is applied) or
[num_weights, d_in, d_out]. A LoRA layer is a shrink (x @ A, d_out = the rank) and an expand (@ B, d_out = the
hidden size); each request's rows form one segment and pick their adapter through weight_indices.

The serving engine's own form (lora_tiles / lora_delta, at the end): rows grouped by adapter on the host, a shrink
and an expand that adds into the projection's output, two launches a projection.
"""
from __future__ import annotations

import numpy as np
import torch
import triton

from ..attention.formats import check_indptr, check_int
from ._dispatch import pdl_launch, use_triton

DTYPES = (torch.float16, torch.bfloat16)


def _check_table(name: str, t, length: int, device: torch.device) -> torch.Tensor:
    """A 1-D integer tensor of `length` entries (int32 / int64), on x's device or the host."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a 1-D integer tensor, got {type(t).__name__}")
    if t.dim() != 1 or t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be a 1-D int32 / int64 tensor, got {t.dtype} {tuple(t.shape)}")
    if t.shape[0] != length:
        raise ValueError(f"{name} must have {length} entries, got {t.shape[0]}")
    if not t.is_cpu and t.device != device:
        raise ValueError(f"{name} must be on {device} or the host, got {t.device}")
    return t


def segment_gemm(x: torch.Tensor, weights: torch.Tensor, batch_size: int, weight_column_major: bool,
                 out: torch.Tensor | None = None, seg_lens: torch.Tensor | None = None,
                 seg_indptr: torch.Tensor | None = None, weight_indices: torch.Tensor | None = None,
                 backend: str = "auto") -> torch.Tensor:
    """y = x @ W per segment (module docstring). x: [rows, d_in] fp16 / bf16 (or fp32 on the PyTorch path: the
    engine's CPU models); seg_indptr ([batch_size + 1]) or
    seg_lens ([batch_size]), int32 / int64, on x's device or the host (seg_indptr wins when both are given, as in
    FlashInfer); weight_indices: [batch_size] (None: segment b takes W[b]). out: [rows, d_out] in x's dtype (None: a
    new one). Tables on the host are checked (indptr from 0 to rows and non-decreasing, indices in range:
    ValueError); tables on the device are not read back (a CUDA graph can capture the call), and the kernel reads
    no row past x and no weight past W: a segment whose index lies outside W gets NaN rows, and rows that such a
    table leaves outside every segment are zeros in a split-K run (segment_config) and untouched otherwise.
    backend: "auto" (the Triton kernel on CUDA or under TRITON_INTERPRET=1, else PyTorch), "triton" or "torch"."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor [rows, d_in], got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in DTYPES + (torch.float32,):
        raise ValueError(f"x must be float16 or bfloat16 (float32 on the PyTorch path), got {x.dtype}")
    if x.stride(-1) != 1:
        raise ValueError("x must be contiguous in its last dimension")
    if not isinstance(weights, torch.Tensor) or weights.dim() != 3:
        raise ValueError(f"weights must be a 3-D tensor, got {getattr(weights, 'shape', type(weights).__name__)}")
    if weights.dtype != x.dtype or weights.device != x.device:
        raise ValueError(f"weights must be {x.dtype} on {x.device} like x, got {weights.dtype} on {weights.device}")
    if not isinstance(weight_column_major, bool):
        raise ValueError(f"weight_column_major must be a bool, got {weight_column_major!r}")
    d_out, d_in = weights.shape[1:] if weight_column_major else weights.shape[:0:-1]
    if d_in != x.shape[1]:
        layout = "[num_weights, d_out, d_in]" if weight_column_major else "[num_weights, d_in, d_out]"
        raise ValueError(f"weights {tuple(weights.shape)} read as {layout} take d_in={d_in}, but x has "
                         f"{x.shape[1]} columns")
    if check_int("batch_size", batch_size) < 0:
        raise ValueError(f"batch_size must be an int >= 0, got {batch_size!r}")
    batch_size = int(batch_size)
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    torch_path = backend == "torch" or (backend == "auto" and not use_triton(x))
    if x.dtype == torch.float32 and not torch_path:
        raise ValueError("x is float32, which only the PyTorch path takes (backend='torch', or 'auto' on a CPU "
                         "tensor without TRITON_INTERPRET=1); the Triton kernel takes float16 / bfloat16")
    rows = x.shape[0]
    if out is None:
        out = torch.zeros(rows, d_out, dtype=x.dtype, device=x.device)
    elif (not isinstance(out, torch.Tensor) or tuple(out.shape) != (rows, d_out) or out.dtype != x.dtype
          or out.device != x.device or out.stride(-1) != 1):
        raise ValueError(f"out must be {x.dtype} {(rows, d_out)} on {x.device}, contiguous in its last dimension; "
                         f"got {getattr(out, 'dtype', type(out).__name__)} {tuple(getattr(out, 'shape', ()))}")
    if seg_indptr is not None:
        indptr = _check_table("seg_indptr", seg_indptr, batch_size + 1, x.device)
    elif seg_lens is not None:
        lens = _check_table("seg_lens", seg_lens, batch_size, x.device)
        indptr = torch.zeros(batch_size + 1, dtype=torch.int64, device=lens.device)
        torch.cumsum(lens, 0, out=indptr[1:])
        if lens.is_cpu and batch_size and int(lens.min()) < 0:
            raise ValueError(f"seg_lens must be >= 0, found {int(lens.min())}")
    else:
        raise ValueError("either seg_lens or seg_indptr must be given")
    if weight_indices is not None:
        weight_indices = _check_table("weight_indices", weight_indices, batch_size, x.device)
    elif batch_size > weights.shape[0]:
        raise ValueError(f"without weight_indices segment b takes weights[b]: {batch_size} segments need "
                         f"{batch_size} weights, got {weights.shape[0]}")
    if indptr.is_cpu:  # (a host table: its values are checked here, as plan() checks an indptr)
        ip = check_indptr("seg_indptr", indptr)
        if ip[0] != 0 or ip[-1] != rows:
            raise ValueError(f"seg_indptr must run from 0 to x's {rows} rows, got {int(ip[0])} .. {int(ip[-1])}")
    if weight_indices is not None and weight_indices.is_cpu and batch_size:
        lo, hi = int(weight_indices.min()), int(weight_indices.max())
        if lo < 0 or hi >= weights.shape[0]:
            raise ValueError(f"weight_indices must be in 0..{weights.shape[0] - 1}, found {lo if lo < 0 else hi}")
    if batch_size == 0 or rows == 0 or d_out == 0:
        return out
    if torch_path:
        return _segment_gemm_torch(x, weights, weight_column_major, out, indptr, weight_indices)
    return _segment_gemm_triton(x, weights, weight_column_major, out, indptr, weight_indices, batch_size)


def _segment_gemm_torch(x, weights, column_major, out, indptr, weight_indices):
    """The PyTorch path (and the reference's form): one matmul per segment (reads the tables back)."""
    ip = indptr.tolist()
    wi = list(range(len(ip) - 1)) if weight_indices is None else weight_indices.tolist()
    rows = x.shape[0]
    for b in range(len(ip) - 1):
        lo, hi = min(max(ip[b], 0), rows), min(max(ip[b + 1], 0), rows)
        if hi <= lo:
            continue
        if not 0 <= wi[b] < weights.shape[0]:
            out[lo:hi] = float("nan")
            continue
        w = weights[wi[b]]
        out[lo:hi] = x[lo:hi] @ (w.T if column_major else w)
    return out


def segment_config(rows: int, batch_size: int, d_in: int, d_out: int, on_cuda: bool) -> tuple[int, int, int, int,
                                                                                                int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) for a run: row tiles of 16 when segments hold
    a few rows on average (decode), 64 otherwise; the shrink's narrow output (one column tile) splits K so that
    each segment's adapter is read by several programs."""
    mean = rows / max(batch_size, 1)
    if not on_cuda:  # (the interpreter: small tiles, every boundary crossed)
        return 16, 16, 16, 2 if d_out <= 16 and d_in > 32 else 1, 1, 1
    bm = 16 if mean <= 16 else 64
    bn = max(16, min(128, triton.next_power_of_2(d_out)))
    bk = max(16, min(128 if bm == 16 else 64, triton.next_power_of_2(d_in)))
    n_tiles = triton.cdiv(d_out, bn)
    programs = n_tiles * (triton.cdiv(rows, bm) + batch_size)
    split = 1
    while split < 8 and programs * split < 264 and triton.cdiv(d_in, bk) >= 4 * split:  # (2 waves of 132 SMs)
        split *= 2
    return bm, bn, bk, split, 4, 3 if bm == 16 else 4


def search_block(batch_size: int) -> int:
    """The kernel's SEARCH: up to 1024 segments their tile ends are one vector load a program (a power of two, so
    batch sizes share compiled kernels), past that a binary search."""
    return triton.next_power_of_2(batch_size) if batch_size <= 1024 else 0


def _segment_gemm_triton(x, weights, column_major, out, indptr, weight_indices, batch_size):
    from .kernels.lora import segment_gemm_kernel, segment_tiles_kernel

    rows, d_in = x.shape
    d_out = out.shape[1]
    dev = x.device
    indptr = indptr.to(dev, non_blocking=True)
    if weight_indices is not None:
        weight_indices = weight_indices.to(dev, non_blocking=True)
    bm, bn, bk, split, warps, stages = segment_config(rows, batch_size, d_in, d_out, dev.type == "cuda")
    tile_indptr = torch.empty(batch_size + 1, dtype=torch.int32, device=dev)
    y = out
    if split > 1:  # float32 sums from each K share (zeroed by segment_tiles_kernel), cast into out after
        y = torch.empty(rows, d_out, dtype=torch.float32, device=dev)
    n_zero = y.numel() if split > 1 else 0
    zero_block = 4096
    segment_tiles_kernel[(max(1, triton.cdiv(n_zero, zero_block)),)](
        indptr, tile_indptr, batch_size, rows, y, n_zero, BLOCK_M=bm,
        BLOCK=min(1024, triton.next_power_of_2(batch_size)), ZERO_BLOCK=zero_block)
    stride_wk, stride_wn = (weights.stride(2), weights.stride(1)) if column_major else \
        (weights.stride(1), weights.stride(2))
    grid = (triton.cdiv(rows, bm) + batch_size, triton.cdiv(d_out, bn), split)
    segment_gemm_kernel[grid](x, weights, y, indptr, weight_indices, tile_indptr, rows, weights.shape[0],
                              batch_size, d_in, d_out, x.stride(0), weights.stride(0), stride_wk, stride_wn,
                              y.stride(0), HAS_INDICES=weight_indices is not None, BLOCK_M=bm, BLOCK_N=bn,
                              BLOCK_K=bk, SPLIT_K=split, SEARCH=search_block(batch_size), num_warps=warps,
                              num_stages=stages)
    if split > 1:
        out.copy_(y)
    return out


class SegmentGEMMWrapper:
    """FlashInfer's SegmentGEMMWrapper: run(x, weights, batch_size, weight_column_major, out=None, seg_lens=None,
    seg_indptr=None, weight_indices=None) -> y (segment_gemm). The workspace is accepted for the API (the Triton
    kernel needs none of it)."""

    def __init__(self, float_workspace_buffer: torch.Tensor, backend: str = "auto") -> None:
        if not isinstance(float_workspace_buffer, torch.Tensor):
            raise ValueError(f"float_workspace_buffer must be a tensor, got {type(float_workspace_buffer).__name__}")
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
        self._float_workspace_buffer = float_workspace_buffer
        self._int_workspace_buffer = None
        self.backend = backend

    def reset_workspace_buffer(self, float_workspace_buffer: torch.Tensor,
                               int_workspace_buffer: torch.Tensor | None = None) -> None:
        self._float_workspace_buffer = float_workspace_buffer
        self._int_workspace_buffer = int_workspace_buffer

    def run(self, x: torch.Tensor, weights: torch.Tensor, batch_size: int, weight_column_major: bool,
            out: torch.Tensor | None = None, seg_lens: torch.Tensor | None = None,
            seg_indptr: torch.Tensor | None = None, weight_indices: torch.Tensor | None = None) -> torch.Tensor:
        return segment_gemm(x, weights, batch_size, weight_column_major, out, seg_lens, seg_indptr, weight_indices,
                            self.backend)

    forward = run


# -- the serving engine's LoRA deltas (engine/lora.py) ----------------------------------------------------------------
# Rows grouped by adapter slot and cut into tiles of one slot on the host (lora_tiles), then two launches a
# projection: a split-K shrink into float32 partials and an expand that sums them and adds its product into the
# projection's output in place (no zeroing, no copy, no separate add: segment_gemm's form took six launches a
# projection, which at one token a step cost more than the adapters' bytes). Rows of slot 0 (no adapter) get no tile.

def lora_max_tiles(rows: int, block_m: int, max_loras: int) -> int:
    """The most tiles lora_tiles makes for `rows` rows of up to max_loras adapters (each adapter's last tile may be
    partial): the fixed grid a CUDA graph captures."""
    return -(-rows // block_m) + max_loras


def lora_tiles(token_slots: np.ndarray, block_m: int, n_tiles: int) -> tuple[np.ndarray, np.ndarray]:
    """(order [rows] int32: the rows sorted by slot, stably; tiles [3 * n_tiles] int32: per tile its slot, first and
    end position in order, at most block_m rows of one slot, slot-0 rows in none, unused tiles slot -1)."""
    slots = np.asarray(token_slots, dtype=np.int32)
    order = np.argsort(slots, kind="stable").astype(np.int32)
    counts = np.bincount(slots, minlength=1) if slots.size else np.zeros(1, np.int64)
    ends = np.cumsum(counts)
    tiles = np.full((3, n_tiles), -1, dtype=np.int32)
    i = 0
    for s in np.nonzero(counts)[0]:
        if s == 0:
            continue
        lo, hi = int(ends[s] - counts[s]), int(ends[s])
        for first in range(lo, hi, block_m):
            if i == n_tiles:
                raise ValueError(f"n_tiles={n_tiles} is too few for {slots.size} rows of {np.count_nonzero(counts[1:])} "
                                 f"adapters in tiles of {block_m}")
            tiles[:, i] = (s, first, min(first + block_m, hi))
            i += 1
    return order, tiles.reshape(-1)


def lora_delta(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, order: torch.Tensor,
               tiles: torch.Tensor, n_tiles: int, block_m: int, backend: str = "auto",
               enable_pdl: bool = False) -> torch.Tensor:
    """out[r] += (x[r] @ a[slot]^T) @ b[slot]^T for the rows r of every tile (lora_tiles), in place; a [slots, RP,
    d_in] and b [slots, d_out, RP] (RP a power of two >= 16), the shrink rounded to b's dtype, the sum in float32.
    Tables on the device are not read back (a CUDA graph captures the launches). backend as segment_gemm's;
    enable_pdl: both launches programmatic dependent launches (kernels/pdl.py; the tables and a / b must not be
    written by the kernels before them in the stream, x and out may be)."""
    if x.dim() != 2 or out.dim() != 2 or out.shape[0] != x.shape[0] or out.stride(-1) != 1 or x.stride(-1) != 1:
        raise ValueError(f"x [rows, d_in] and out [rows, d_out] must share rows and be contiguous in their last "
                         f"dimension, got {tuple(x.shape)} and {tuple(out.shape)}")
    if a.dim() != 3 or b.dim() != 3 or a.shape[2] != x.shape[1] or b.shape[1] != out.shape[1] or \
            a.shape[:2] != (b.shape[0], b.shape[2]):
        raise ValueError(f"a must be [slots, rank, {x.shape[1]}] and b [slots, {out.shape[1]}, rank], got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    rp = a.shape[1]
    if rp < 16 or rp & (rp - 1):
        raise ValueError(f"the stacked rank must be a power of two >= 16, got {rp}")
    if tiles.numel() != 3 * n_tiles or order.numel() != x.shape[0]:
        raise ValueError(f"tiles must have 3 * n_tiles = {3 * n_tiles} entries and order {x.shape[0]}, got "
                         f"{tiles.numel()} and {order.numel()}")
    if backend == "torch" or (backend == "auto" and not use_triton(x)):
        return _lora_delta_torch(out, x, a, b, order, tiles, n_tiles)
    if x.dtype == torch.float32:
        raise ValueError("x is float32, which only the PyTorch path takes")
    from .kernels.lora import lora_expand_kernel, lora_shrink_kernel

    on_cuda = x.is_cuda
    d_in, d_out = x.shape[1], out.shape[1]
    # (the expand's column tiles each read the tile's split-K partials: 256 columns a program keep those reads a
    # few MB where 64 read ~15 MB per gate / up expand at batch 64, ~10 us a launch: H200, session 39)
    bk, bn = (64, max(16, min(256, triton.next_power_of_2(d_out)))) if on_cuda else (16, 16)
    k_steps = -(-d_in // bk)
    split = 1
    while split < 16 and n_tiles * split < 128 and k_steps >= 2 * split:
        split *= 2
    if n_tiles == 0 or x.shape[0] == 0:
        return out
    p = torch.empty(split, x.shape[0], rp, dtype=torch.float32, device=x.device)
    lora_shrink_kernel[(n_tiles, split)](x, a, p, order, tiles, n_tiles, d_in, x.stride(0), a.stride(0), a.stride(1),
                                        p.stride(0), p.stride(1), RP=rp, BLOCK_M=block_m, BLOCK_K=bk, SPLIT=split,
                                        num_warps=4, num_stages=3 if on_cuda else 1, **pdl_launch(enable_pdl, x))
    lora_expand_kernel[(n_tiles, triton.cdiv(d_out, bn))](p, b, out, order, tiles, n_tiles, d_out, p.stride(0),
                                                          p.stride(1), b.stride(0), b.stride(1), out.stride(0), RP=rp,
                                                          BLOCK_M=block_m, BLOCK_N=bn, SPLIT=split,
                                                          num_warps=8 if block_m * bn >= 64 * 256 else 4,
                                                          **pdl_launch(enable_pdl, x))
    return out


def _lora_delta_torch(out, x, a, b, order, tiles, n_tiles):
    """The PyTorch path (the reference's form): tile by tile, from the tables read back."""
    t = tiles.reshape(3, n_tiles).tolist()
    order = order.long().to(x.device)
    for slot, first, end in zip(*t):
        if slot <= 0:
            continue
        rows = order[first:end]
        shrunk = (x[rows].float() @ a[slot].float().T).to(b.dtype)
        out[rows] = (out[rows].float() + shrunk.float() @ b[slot].float().T).to(out.dtype)
    return out
