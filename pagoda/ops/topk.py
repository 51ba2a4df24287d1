"""Top-k selection (FlashInfer's ``top_k`` and its sparse-attention transforms, by their names and arguments).

Triton kernels do the selection by radix select (kernels/topk.py): one program a row (topk_kernel, its passes
compacting the values left into a scratch row), or, where rows are few, each row split over several programs (the
split kernels: a launch a digit). Both return a row's top k in position order (FlashInfer's unsorted order is
unspecified; ``sorted=True`` sorts them by value), the first positions among values equal to the k-th largest. The
transforms always run them on a GPU (and under Triton's interpreter); ``top_k`` runs them where they measured at
least torch.topk's speed (_kernel_pays) and ``torch.topk`` otherwise. Off the GPU, PyTorch. The transforms are the
selection step of a sparse decode (DeepSeek's sparse attention: an indexer scores each request's KV tokens, the
top k go to attention): ``top_k_page_table_transform`` maps the chosen positions through a page table of page size
1, ``top_k_ragged_transform`` offsets them into a ragged KV. A row whose length is at most k keeps all its positions
in order; the slots past a row's length hold -1.
"""
from __future__ import annotations

import torch
import triton

from ..attention.formats import check_int
from ._dispatch import sm_count, use_triton
from .kernels.topk import split_hist_kernel, split_write_kernel, topk_kernel


# top_k: the most values of a row that one program of topk_kernel streams where it measured at least torch.topk's
# speed on float32 rows (H200, `python scripts/topk_probe.py`, session 45, RADIX 4 with compaction: 256 x 16384 (two
# rounds over the SMs) 113 us vs torch.topk 144, 64 x 32768 104 vs 111, 64 x 128256 261 vs 163); torch.topk's
# 16-bit path is faster (64 x 32768 bf16 81 us vs 104), so 16-bit rows take it unless they split. Rows that split
# (SPLIT_ROWS) always take the kernels (1 x 131072 28.5 us vs torch.topk 92.7, FlashInfer 45.4). The transforms
# always take them (64 x 32768 97 us against 408 for torch.topk with the masking and gathers around it; 8 x 131072
# split 55 vs 402).
TOPK_KERNEL_MAX_VALUES = 32768

# topk_kernel's radix_select: its digit width (4 or 8 bits) and whether its passes compact the values left into a
# scratch row (kernels/topk.py). Session 45 (H200, `python scripts/topk_probe.py`; session 44's kernel: 8 bits, no
# compaction): compaction 0.72-0.87x the time, 4-bit digits 0.91-1.0x that.
RADIX_BITS = 4
COMPACT = True
# rows split over several programs where one program a row would leave most SMs idle (kernels/topk.py's split
# kernels: one launch a digit of SPLIT_RADIX_BITS and a writing launch): while rows * 16 <= the SMs and a row is
# at least SPLIT_MIN_WIDTH wide, each program taking >= SPLIT_MIN_SLICE values. Session 45 (H200, GPU time between
# events): 1 x 131072 421 -> 28.5 us, 8 x 131072 (transform) 419 -> 55; at 64 rows no gain (64 x 32768 105 -> 107);
# 4-bit digits there 4-8x slower (twice the launches: 208 us at 1 x 131072). Its launches cost the host ~125 us a
# call (`bench.ops` wall/call), which eager callers wait for and CUDA graphs do not: from 16 rows on (16 x 65536,
# 32 x 32768) an eager call of a counting launch more took ~225 us, over one program a row's.
SPLIT_ROWS = True
SPLIT_RADIX_BITS = 8
SPLIT_MIN_WIDTH = 32768
SPLIT_MIN_SLICE = 1024


def _slices(rows: int, width: int, sms: int) -> int:
    """How many programs a row takes on a GPU of `sms` SMs (1: topk_kernel's one a row)."""
    if not SPLIT_ROWS or width < SPLIT_MIN_WIDTH or rows == 0:
        return 1
    if rows * 16 > sms:
        return 1
    return max(1, min(-(-2 * sms // rows), width // SPLIT_MIN_SLICE))


def _default_slices(input: torch.Tensor) -> int:
    """_slices on input's GPU (1 off it: the interpreter runs one program a row unless a test asks)."""
    return _slices(*input.shape, sm_count(input.device)) if input.device.type == "cuda" else 1


def _kernel_pays(input: torch.Tensor, slices: int) -> bool:
    """Whether top_k runs the kernels (slices: _default_slices(input)): under Triton's interpreter always (the CPU
    tests); on a GPU where its rows split, or for float32 rows while each program's share, rows over the SMs rounded
    up times the width, is at most TOPK_KERNEL_MAX_VALUES."""
    if input.device.type != "cuda" or slices > 1:
        return True
    rounds = -(-input.shape[0] // sm_count(input.device))
    return input.dtype == torch.float32 and rounds * input.shape[1] <= TOPK_KERNEL_MAX_VALUES


def _launch(input, k, out, mode, vals=None, lens=None, table=None, row_to_batch=None, offsets=None, scratch=None,
            split=None):
    """topk_kernel over input's rows into out [rows, k] (MODE 0: the positions, their values into vals); scratch:
    the compacting passes' [rows, width] of input's type (allocated here if None); split: programs a row (None:
    _slices' choice; > 1 the split kernels)."""
    rows, width = input.shape
    if rows == 0:
        return
    x = input if input.stride(1) == 1 else input.contiguous()
    if table is not None and table.stride(1) != 1:
        table = table.contiguous()
    split = _default_slices(x) if split is None else split
    if split > 1:
        _launch_split(x, k, out, mode, vals, lens, table, row_to_batch, offsets, split)
        return
    # radix passes over up to 16384 values a step (64 KB of float32 in flight: one program streams a row alone), the
    # writing pass over 4096 (its prefix sums: 16 warps hold 4096 without spilling, 8192 spill; scripts/compile_check)
    block = min(16384, max(16, triton.next_power_of_2(width)))
    warps = 16 if block >= 8192 else 8 if block >= 2048 else 4
    if COMPACT and scratch is None:
        scratch = torch.empty(rows, width, dtype=x.dtype, device=x.device)
    topk_kernel[(rows,)](x, out, vals, lens, table, row_to_batch, offsets, scratch, x.stride(0), out.stride(0),
                         0 if table is None else table.stride(0), width, k, MODE=mode, BLOCK=block,
                         WBLOCK=min(4096, block), RADIX=RADIX_BITS, COMPACT=COMPACT and scratch is not None,
                         SBLOCK=min(1024, block), num_warps=warps)


def _launch_split(x, k, out, mode, vals, lens, table, row_to_batch, offsets, slices):
    """The split kernels over x's rows, `slices` programs a row (each a slice of S values; the last may be short)."""
    rows, width = x.shape
    radix = SPLIT_RADIX_BITS
    nd, nb = 32 // radix, 1 << radix
    s = -(-width // slices)
    s = -(-s // 64) * 64  # (slices start 256-byte aligned for float32)
    slices = -(-width // s)
    hist = torch.zeros(rows, nd, nb, dtype=torch.int32, device=x.device)
    part = torch.empty(rows, slices, nb + 2, dtype=torch.int32, device=x.device)
    block = min(4096, triton.next_power_of_2(s))
    warps = 8 if block >= 2048 else 4
    grid = (rows, slices)
    for d in range(nd):
        split_hist_kernel[grid](x, lens, hist, part, x.stride(0), width, k, s, D=d, HAS_LENS=lens is not None,
                                RADIX=radix, BLOCK=block, num_warps=warps)
    sk = -(-k // slices)  # (a row with n <= k: each program writes sk of its slots)
    split_write_kernel[grid](x, out, vals, lens, table, row_to_batch, offsets, hist, part, x.stride(0), out.stride(0),
                             0 if table is None else table.stride(0), width, k, s, sk, MODE=mode, RADIX=radix,
                             WBLOCK=min(4096, max(16, triton.next_power_of_2(max(s, sk)))),
                             PBLOCK=max(16, triton.next_power_of_2(slices)), num_warps=warps)


def _check_scores(input: torch.Tensor, k) -> int:
    if not isinstance(input, torch.Tensor) or input.dim() != 2 or not input.dtype.is_floating_point:
        raise ValueError(f"input must be a float [rows, length] tensor, got {getattr(input, 'shape', input)}")
    if check_int("k", k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return int(k)


def _check_index(name: str, t, rows: int, device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64) or tuple(t.shape) != (rows,):
        raise ValueError(f"{name} must be an int32 [{rows}] tensor, got {getattr(t, 'dtype', t)} "
                         f"{tuple(getattr(t, 'shape', ()))}")
    if t.device != device:
        raise ValueError(f"{name} must be on input's device {device}, got {t.device}")
    return t.contiguous()  # (the kernel reads element r at r)


def top_k(input: torch.Tensor, k: int, sorted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest values of each row of input [rows, d] and their int64 indices ([rows, k] each); sorted: in
    descending order (unsorted, FlashInfer's default, may come in any order). k must be at most d."""
    k = _check_scores(input, k)
    if k > input.shape[1]:
        raise ValueError(f"k ({k}) must be at most the rows' length {input.shape[1]}")
    if not isinstance(sorted, bool):
        raise ValueError(f"sorted must be a bool, got {sorted!r}")
    slices = _default_slices(input)
    if not use_triton(input) or not _kernel_pays(input, slices):
        return torch.topk(input, k, dim=-1, largest=True, sorted=True)
    values = torch.empty(input.shape[0], k, dtype=input.dtype, device=input.device)
    indices = torch.empty(input.shape[0], k, dtype=torch.int64, device=input.device)
    _launch(input, k, indices, 0, vals=values, split=slices)
    if sorted:
        values, order = torch.sort(values, dim=-1, descending=True, stable=True)
        indices = torch.gather(indices, 1, order)
    return values, indices


topk = top_k


def _top_positions(input: torch.Tensor, lengths: torch.Tensor, k: int):
    """([rows, k] int64 positions, [rows, k] bool valid): each row's top-k positions among its first lengths[i]
    (a row of at most k keeps its first lengths[i] in order), invalid past the row's length."""
    rows, width = input.shape
    n = lengths.clamp(0, width)
    pos = torch.arange(width, device=input.device)
    scores = input.float().masked_fill(pos[None, :] >= n[:, None], float("-inf"))
    kk = min(k, width)
    chosen = torch.topk(scores, kk, dim=-1).indices if kk else torch.zeros(rows, 0, dtype=torch.long,
                                                                           device=input.device)
    first = pos[None, :kk].expand(rows, kk)
    chosen = torch.where((n <= k)[:, None], first, chosen)
    if kk < k:  # (k past the rows' width: every row keeps all of its positions)
        chosen = torch.cat([chosen, torch.zeros(rows, k - kk, dtype=torch.long, device=input.device)], 1)
    valid = torch.arange(k, device=input.device)[None, :] < n[:, None]
    return chosen, valid


def top_k_page_table_transform(input: torch.Tensor, src_page_table: torch.Tensor, lengths: torch.Tensor, k: int,
                               row_to_batch: torch.Tensor | None = None, *, check: bool = True) -> torch.Tensor:
    """For each row i of scores input [rows, max_len]: the page-table entries src_page_table[b, j] (b =
    row_to_batch[i], or i) of its top-k positions j among its first lengths[i]; int32 [rows, k], -1 past a row's
    length. check (pagoda's extension): row_to_batch's values are checked against the table's rows (a read of
    them back to the host; False, e.g. inside a CUDA graph, trusts them)."""
    k = _check_scores(input, k)
    rows = input.shape[0]
    lengths = _check_index("lengths", lengths, rows, input.device)
    if not isinstance(src_page_table, torch.Tensor) or src_page_table.dim() != 2 or \
            src_page_table.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"src_page_table must be an int32 [batch, max_len] tensor, got "
                         f"{getattr(src_page_table, 'shape', src_page_table)}")
    if src_page_table.device != input.device:
        raise ValueError(f"src_page_table must be on input's device {input.device}, got {src_page_table.device}")
    if src_page_table.shape[1] < input.shape[1]:
        raise ValueError(f"src_page_table has {src_page_table.shape[1]} entries a row, fewer than input's rows' "
                         f"length {input.shape[1]}")
    if row_to_batch is None:
        if src_page_table.shape[0] < rows:
            raise ValueError(f"src_page_table has {src_page_table.shape[0]} rows for {rows} rows of input "
                             f"(row_to_batch: None maps row i to batch i)")
        batch = torch.arange(rows, device=input.device)
    else:
        batch = _check_index("row_to_batch", row_to_batch, rows, input.device)
        if check and rows and not (0 <= int(batch.min()) and int(batch.max()) < src_page_table.shape[0]):
            raise ValueError(f"row_to_batch must be in [0, {src_page_table.shape[0]}) (src_page_table's rows), got "
                             f"{int(batch.min())}..{int(batch.max())}")
    if use_triton(input):
        out = torch.empty(rows, k, dtype=torch.int32, device=input.device)
        _launch(input, k, out, 1, lens=lengths, table=src_page_table,
                row_to_batch=None if row_to_batch is None else batch)
        return out
    chosen, valid = _top_positions(input, lengths.long(), k)
    entries = src_page_table[batch.long()[:, None], chosen.clamp(max=src_page_table.shape[1] - 1)]
    return torch.where(valid, entries, -1).to(torch.int32)


def top_k_ragged_transform(input: torch.Tensor, offsets: torch.Tensor, lengths: torch.Tensor, k: int) -> torch.Tensor:
    """For each row i of scores input [rows, max_len]: offsets[i] plus its top-k positions among its first
    lengths[i]; int32 [rows, k], -1 past a row's length."""
    k = _check_scores(input, k)
    rows = input.shape[0]
    offsets = _check_index("offsets", offsets, rows, input.device)
    lengths = _check_index("lengths", lengths, rows, input.device)
    if use_triton(input):
        out = torch.empty(rows, k, dtype=torch.int32, device=input.device)
        _launch(input, k, out, 2, lens=lengths, offsets=offsets)
        return out
    chosen, valid = _top_positions(input, lengths.long(), k)
    return torch.where(valid, chosen + offsets.long()[:, None], -1).to(torch.int32)
