"""prefetch_l2: start bringing a tensor's first bytes into the GPU's L2 cache and return at once.

A decode step at small batch alternates GEMMs that stream their weights at the DRAM rate with chains of
latency-bound kernels (norms, RoPE + KV append, attention, activation) during which the DRAM idles. A prefetch
of the next GEMM's weight issued on a side stream when the previous GEMM ends fills that idle time: the GEMM
then finds its first bytes in L2. Nothing waits for the prefetch, and a GEMM that arrives while a line is still
on its way merges with it, so a prefetch is never a second read of the bytes, only an earlier one (what the
engine gains: benchmarks/results/engine_h100.md, session 17).

On GPUs without the instruction (before Hopper) and on the CPU it does nothing: it is a hint, with no output.
"""
from __future__ import annotations

import operator
import os

import torch
import triton

from ._dispatch import capability
from .kernels.prefetch import prefetch_l2_kernel

# (CHUNK, BLOCK, MODE) of kernels/prefetch.py: set from scripts/l2_prefetch_probe.py
PREFETCH_CONFIG = (4096, 32, 0)
_SCRATCH: dict = {}  # device -> the kernel's OUT word


def prefetch_supported(t: torch.Tensor) -> bool:
    """Whether prefetch_l2 does anything for t (a CUDA tensor on sm_90 or later)."""
    return t.device.type == "cuda" and capability(t.device)[0] >= 9


def prefetch_l2(t: torch.Tensor, nbytes: int | None = None, num_programs: int = 132, config=None) -> None:
    """Prefetch bytes [0, nbytes) of the contiguous tensor t (all of it when nbytes is None) into L2,
    asynchronously on the current stream; num_programs programs share the instructions. nbytes is rounded down to
    16 bytes (the instruction's granule); a tensor whose address is not 16-byte aligned is skipped. config:
    (CHUNK, BLOCK, MODE) of kernels/prefetch.py instead of PREFETCH_CONFIG (the probe sweeps them)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"t must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_contiguous():
        raise ValueError("t must be contiguous (the prefetch covers a byte range from its start)")
    size = t.numel() * t.element_size()
    if nbytes is None:
        nbytes = size
    try:
        nbytes = operator.index(nbytes)
        num_programs = operator.index(num_programs)
    except TypeError:
        raise ValueError(f"nbytes and num_programs must be ints, got {type(nbytes).__name__} and "
                         f"{type(num_programs).__name__}") from None
    if not 0 <= nbytes <= size:
        raise ValueError(f"nbytes must be in [0, {size}] (t's size in bytes), got {nbytes}")
    if num_programs < 1:
        raise ValueError(f"num_programs must be >= 1, got {num_programs}")
    nbytes -= nbytes % 16
    if nbytes == 0 or not prefetch_supported(t) or t.data_ptr() % 16:
        return
    chunk, block, mode = config or PREFETCH_CONFIG
    grid = min(num_programs, triton.cdiv(nbytes, chunk * (block if mode != 2 else 1)))
    out = _SCRATCH.get(t.device)
    if out is None:
        out = _SCRATCH[t.device] = torch.zeros(1, dtype=torch.int32, device=t.device)
    prefetch_l2_kernel[(grid,)](t, out, nbytes, CHUNK=chunk, BLOCK=block, MODE=mode,
                                num_warps=4 if mode == 2 else max(1, block // 32))


_NAMES = ("qkv", "o", "gate_up", "down", "lm_head")


def weight_prefetch_sizes() -> dict[str, int]:
    """Bytes of each GEMM's weight that a decode step prefetches into L2 before the GEMM (WeightPrefetch):
    PAGODA_WEIGHT_PREFETCH = 'qkv=MB,o=MB,...' (any of qkv, o, gate_up, down, lm_head), '0' for none; unset,
    DEFAULT_PREFETCH_MB."""
    env = os.environ.get("PAGODA_WEIGHT_PREFETCH")
    if env is None:
        mb = DEFAULT_PREFETCH_MB
    elif env.strip() in ("0", "none", ""):
        mb = {}
    else:
        mb = {}
        for part in env.split(","):
            name, _, val = part.partition("=")
            try:
                mb[name.strip()] = float(val)
            except ValueError:
                raise ValueError(f"PAGODA_WEIGHT_PREFETCH must be 'name=MB,...' or '0', got {env!r}") from None
            if name.strip() not in _NAMES or mb[name.strip()] < 0:
                raise ValueError(f"PAGODA_WEIGHT_PREFETCH: {part!r} must name one of {list(_NAMES)} with MB >= 0")
    return {k: int(v * (1 << 20)) for k, v in mb.items() if v > 0}


# MB of each weight prefetched before its GEMM in a decode step (Llama-3.1-8B shapes; see weight_prefetch_sizes)
DEFAULT_PREFETCH_MB = {"qkv": 8, "o": 32, "gate_up": 16, "down": 8, "lm_head": 16}


class WeightPrefetch:
    """The L2 prefetches of one model's decode forward passes: ``begin`` before a pass (None when the pass
    prefetches nothing), then ``pf(name, weight)`` right after the GEMM that precedes the one reading ``weight``
    (the prefetch is queued on a side stream behind everything queued on the current stream so far, so it starts
    when that GEMM ends and overlaps the kernels in between), ``join`` at the end (the current stream waits
    for the side stream: a CUDA graph capture must end joined). Off until ``enabled``: the engine sets it for
    the forward passes of its decode CUDA graphs on Hopper GPUs, where rows <= max_rows (GEMMs that read
    their weights at the DRAM rate)."""

    def __init__(self, sizes: dict[str, int] | None = None, max_rows: int = 64):
        self.sizes = weight_prefetch_sizes() if sizes is None else dict(sizes)
        self.max_rows = max_rows
        self.enabled = False
        self._stream = None
        self._pending = False

    def begin(self, rows: int, device: torch.device) -> "WeightPrefetch | None":
        if not (self.enabled and self.sizes and rows <= self.max_rows and device.type == "cuda"
                and capability(device)[0] >= 9):
            return None
        if self._stream is None or self._stream.device != device:
            self._stream = torch.cuda.Stream(device)
        self._pending = False
        return self

    def __call__(self, name: str, weight: torch.Tensor) -> None:
        n = min(self.sizes.get(name, 0), weight.numel() * weight.element_size())
        if n <= 0:
            return
        self._stream.wait_stream(torch.cuda.current_stream(weight.device))
        with torch.cuda.stream(self._stream):
            prefetch_l2(weight, n)
        self._pending = True

    def join(self) -> None:
        if self._pending:
            torch.cuda.current_stream(self._stream.device).wait_stream(self._stream)
            self._pending = False
