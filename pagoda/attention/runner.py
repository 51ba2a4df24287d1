"""The machinery every batch wrapper shares: buffers, plan() bookkeeping, launches.

A wrapper owns (allocated once, so CUDA graphs can capture ``run()``):
- an int32 buffer: 4 counters | work list | split-tile table (kernels/attention.py), and
  the arrival counters of split tiles (zero between launches);
- a page-index buffer the kernel reads (paged formats);
- tmp_o / tmp_lse for split-KV partial results, carved from the user's float
  workspace buffer (as FlashInfer does).
``plan()`` validates on the host, builds the work list with ``plan.plan_work`` and
copies it in; ``run()`` checks tensor metadata against the plan and launches a fixed
grid of the attention kernel (split tiles merge inside it), reading no host data.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os

import numpy as np
import torch

from . import reference
from .formats import FP8_DTYPES, check_dtype, check_heads, check_kv_dtype, check_kv_scale, not_planned
from .kernels import decode_sm90, prefill_sm90
from .kernels.attention import (ACTIVE_AT, BAND_AT, INDICES_AT, NUM_COUNTERS, SPLIT_FIELDS, SPLITS_AT, WORK_FIELDS,
                                _no_mod, attention_kernel)
from .plan import LONG_DECODE_KV, KernelConfig, WorkPlan, plan_work, prefill_band, select_config
from ..ops._dispatch import capability as _capability, env_switch, pdl_launch, sm_count

LOG2E = 1.4426950408889634
# _upload writes the plan buffer's header as a literal tuple: the kernels read these fields there
_HEADER_LAYOUT = (NUM_COUNTERS, SPLITS_AT, INDICES_AT, BAND_AT, ACTIVE_AT)
assert _HEADER_LAYOUT == (8, 3, 4, 5, 6), _HEADER_LAYOUT
# Capacities of the preallocated buffers in CUDA-graph mode (grown on demand otherwise).
GRAPH_MAX_ITEMS = 1 << 16
GRAPH_MAX_SPLITS = 1 << 14
GRAPH_MAX_ARRIVALS = 1 << 18
GRAPH_MAX_PAGES = 1 << 20
# The Gluon prefill kernel for sm_90 (kernels/prefill_sm90.py): KV block and ring depth, register split;
# scripts/prefill_ab.py compares configurations on the device
# tma 1: full KV blocks go by bulk copies where the cache's layout allows (prefill_sm90.tma_views; H200, session 14:
# 1x8192 1207 -> 1008 us, 8x1024 231 -> 208, 1x16384 4611 -> 3801, paged; ragged likewise); q_ahead 1: each
# consumer group copies the next task's Q into shared memory ahead of time (prefill_sm90._ws_fetch_q; H200, session
# 15, scripts/prefill_ab.py: 8x1024 207.8 -> 201.0 us, 1x8192 on 128-token blocks 1031 -> 1002 / 1023 -> 1008;
# 8x(512 onto 4096) and 1x16384 within the run-to-run spread of 2-5%, either way)
SM90_CONFIG = dict(block_n=64, stages=5, producer_regs=88, consumer_regs=208, q_smem=0, tma=1, q_ahead=1)
# ... for plans whose work items read SM90_LONG_KV KV tokens or more on average: head_dim 128, 128-token KV
# blocks, Q K^T reading Q from shared memory (no room for it in registers next to a 128-column S); H200, session
# 13: 1x8192 1320 -> 1233 us, 8x(512 onto 4096) 760 -> 696, 1x16384 5427 -> 4976 (8x1024: 232 -> 254, so short
# prompts keep 64)
SM90_LONG_CONFIG = dict(block_n=128, stages=3, producer_regs=88, consumer_regs=208, q_smem=1, tma=1, q_ahead=1)
# head_dim 64: half the registers for O and Q's fragments, so Q stays in registers and a fourth stage fits
# (session 15, `PREFILL_AB_HEAD_DIM=64 python scripts/prefill_ab.py`, paged: 1x8192 749 -> 678 us, 8x(512 onto
# 4096) 419 -> 381, 1x16384 2916 -> 2616 against the 64-token configuration; 8x1024 157 vs 144, so it keeps 64)
SM90_LONG_CONFIG_D64 = dict(block_n=128, stages=4, producer_regs=88, consumer_regs=208, q_smem=0, tma=1, q_ahead=0)
# head_dim 256: O ([64, 256] fp32 per consumer group) takes 128 registers, so Q is read from shared memory (64 KB
# for the 128-row tile) beside a ring of 4 stages of 32-token blocks (128 KB), and the producer, whose bulk copies
# need few registers, gives the consumers its share (offline: no spill in the KV loop). H200, session 29
# (`PREFILL_AB_HEAD_DIM=256 python scripts/prefill_ab.py`, paged, us): 1x8192 2250 (64-token blocks on 2 stages 2563,
# with q_ahead 2637; 32 x 4 with q_ahead 2372, 32 x 5 2328), 8x1024 415 (489 / 537; 459, 458), 8x(512 onto 4096)
# 1238 (1401 / 1449), 1x16384 8625-9426 (9589 / 9829); the Triton kernel 6377 / 1013 / 3499 / 25048
SM90_CONFIG_D256 = dict(block_n=32, stages=4, producer_regs=40, consumer_regs=232, q_smem=1, tma=1, q_ahead=0)
SM90_LONG_KV = 2048
# Task order of the Gluon prefill kernel (plan.prefill_band): "auto" bands the tasks when the KV that the running
# programs read would not fit in L2, "on" / "off" always / never (scripts/prefill_ab.py compares them)
PREFILL_BAND = os.environ.get("PAGODA_PREFILL_BAND", "auto")
# The Gluon decode kernel for sm_90 (kernels/decode_sm90.py), per KV element size: KV block (the wgmma M), ring
# depth, programs per SM, register cap, minimum query rows (the wgmma N). `python scripts/fp8_probe.py --sweep` /
# `--bf16` (H200, session 12): fp8, x the bf16 decode's KV tokens/s over 6 cases: 2 stages x 4 programs under
# 128 registers, 8 rows 1.37-1.87x (16 rows 1.25-1.82x; 5 programs under 96 registers 1.35-1.85x; 3 stages
# 1.38-1.80x; earlier at 16 rows: 4 x 3 under 168 1.36-1.55x). bf16 (32 KB per stage), x the Triton kernel over
# 6 cases: 2 x 3 under 168 registers, 8 rows 1.00-1.22x (16 rows 0.99-1.16x; 2 x 4 under 128 0.95-1.21x;
# earlier 3 x 2 0.94-1.12x, 3 x 3 0.91-1.13x).
DECODE_GLUON_CONFIG = {1: dict(block_n=64, stages=2, ctas_per_sm=4, maxnreg=128, rows=8),
                       2: dict(block_n=64, stages=2, ctas_per_sm=3, maxnreg=168, rows=8)}
# (KV element size, head_dim) that take another configuration. head_dim 64 over a 16-bit cache: a block is half
# the bytes and the accumulator half the registers, so 4 programs per SM under 128 registers (no spill) keep more
# of the DRAM busy: H200, session 26 (`scripts/decode_variants_ab.py ";cfg=64:2:4:128" --head-dim 64`), against
# 3 under 168: 64x2048 82.9 -> 67.9 us, 32x8192 159.8 -> 132.8, 16x4096 43.8 -> 39.7, 128x1024 75.5 -> 69.0,
# 256x512 80.7 -> 72.8, 1x32768 and 1x1024 the same; 3 stages x 3 / x 4 and 4 stages x 3 between the two, 5
# programs under 96 registers (64 B of stack) slower than 4 everywhere. head_dim 256: a 64-token block of a 16-bit
# cache is 64 KB, so 3 stages on one program per SM (229 registers, no cap needed); H200, session 31 (`python
# scripts/decode_variants_ab.py "PAGODA_DECODE_KERNEL=triton;" --head-dim 256`), against the Triton kernel: 1x32768
# 98.9 -> 71.0 us, 64x2048 269.4 -> 252.0, 16x4096 145.6 -> 136.1, 1x1024 33.6 -> 15.8; 2 stages within -1..+5 us.
# fp8 at head_dim 256 (250 registers): 2 stages on 2 programs per SM, the fastest of 2 x 2, 3 x 2, 3 x 1, 4 x 1 in
# 1x32768 / 64x2048 / 16x4096 / 1x1024 (`--kv-dtype float8_e4m3fn`: one program per SM +7 / +41 us at 1x32768 /
# 64x2048); the Triton kernel 101.4 / 263.8 us, this one 43.6 / 130.9
DECODE_GLUON_CONFIG_BY_HEAD_DIM = {(2, 64): dict(block_n=64, stages=2, ctas_per_sm=4, maxnreg=128, rows=8),
                                   (2, 256): dict(block_n=64, stages=3, ctas_per_sm=1, maxnreg=None, rows=8),
                                   (1, 256): dict(block_n=64, stages=2, ctas_per_sm=2, maxnreg=None, rows=8)}


def resolve_backend(backend: str, device: torch.device) -> str:
    """"auto" is "triton" on CUDA and "torch" elsewhere; Triton on the CPU needs the interpreter."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' on a CPU tensor needs TRITON_INTERPRET=1 (Triton's interpreter); "
                         "use backend='torch' or a CUDA device")
    return backend


@functools.lru_cache(maxsize=None)
def _gluon_decode_config(config: KernelConfig, kv_bytes: int, head_dim: int) -> KernelConfig:
    """A decode config as the Gluon decode kernel runs it (DECODE_GLUON_CONFIG_BY_HEAD_DIM, else
    DECODE_GLUON_CONFIG); one object per config, so consecutive plans keep their grid (BatchAttention._grid
    compares by identity)."""
    c = DECODE_GLUON_CONFIG_BY_HEAD_DIM.get((kv_bytes, head_dim)) or DECODE_GLUON_CONFIG[kv_bytes]
    # the tile's query rows are the MMA's N: the group's heads, at least 8 (wgmma's smallest N), not the Triton
    # kernel's 16 (one-query decode tiles hold one token: the rest of the rows would be padding)
    rows = max(c["rows"], 1 << (config.heads_per_prog - 1).bit_length())
    return dataclasses.replace(config, block_m=rows, block_n=c["block_n"], num_stages=c["stages"],
                               ctas_per_sm=c["ctas_per_sm"], maxnreg=c["maxnreg"])


def num_programs(device: torch.device, config: KernelConfig) -> int:
    if device.type == "cuda":
        return sm_count(device) * config.ctas_per_sm
    from .plan import _INTERPRETER_CTAS

    return _INTERPRETER_CTAS


def balanced_grid(tasks: int, grid: int, ctas_per_sm: int) -> int:
    """The programs that take a Gluon decode plan's ``tasks`` tasks instead of the whole persistent ``grid``
    (ctas_per_sm programs on each SM; an eager wrapper launches only these, a CUDA-graph wrapper's captured grid
    leaves the rest without a task): the fewest programs per SM, down to 2, that take the tasks in as many rounds
    (ceil(tasks / programs)) as the whole grid. Tasks go to programs in a fixed order, so a grid whose last round
    is mostly empty leaves its last round to few programs, each capped at its own streaming rate, while a smaller
    grid with the same rounds keeps them all busy to the end. H200, session 27, 16-bit cache at head_dim 128
    (3 programs per SM -> 2; `python scripts/decode_variants_ab.py ";cfg=64:2:2:168" --cases ...`): 64 x 2048
    (512 tasks: 1.29 -> 1.94 rounds) 133.3 -> 126.0 us, 32 x 8192 (512 tasks) 260.1 -> 246.0; where 2 a SM takes
    more rounds it loses (128 x 1024: 127.5 -> 129.2, 256 x 512: 133.3 -> 134.0), so those keep 3. With the rule
    (PAGODA_DECODE_BALANCE_GRID): eager 64 x 2048 135.4 -> 128.4 us, CUDA-graph wrappers 133.1 -> 126.4 (the plan
    header's ACTIVE_AT: the captured grid stays, the programs past the count take no task), the engine's batch-64
    step 7.04 -> 6.96 ms per token (benchmarks/results/notes.md, session 27)."""
    sms, rest = divmod(grid, ctas_per_sm)
    if rest or not sms:  # (not a grid of whole SMs, e.g. the interpreter's: kept as it is)
        return grid
    rounds = -(-tasks // grid)
    for k in range(2, ctas_per_sm):
        if -(-tasks // (sms * k)) == rounds:
            return sms * k
    return grid


def kv_dequant_mode(q_dtype: torch.dtype, kv_dtype: torch.dtype) -> int:
    """The attention kernel's KV_DEQUANT: 1 for bf16 queries over an fp8 cache (the kernel computes in fp16:
    kernels/attention.py), else 0 (K / V converted to the queries' dtype)."""
    return int(q_dtype == torch.bfloat16 and kv_dtype in FP8_DTYPES)


@dataclasses.dataclass
class PlanState:
    """What run() needs to know about the last plan()."""

    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    q_dtype: torch.dtype
    kv_dtype: torch.dtype
    causal: bool
    window_left: int
    sm_scale: float
    logits_soft_cap: float
    config: KernelConfig
    grid: int
    nnz_qo: int
    batch_size: int
    max_page: int  # largest page index used (-1: none)
    host_qo_indptr: np.ndarray
    host_kv_lens: np.ndarray
    host_kv_base: np.ndarray
    host_indices: torch.Tensor | None
    work: WorkPlan
    tmp_o: torch.Tensor | None = None  # views of the float workspace (split partial results)
    tmp_lse: torch.Tensor | None = None
    scalars: tuple = ()  # the kernel's scalar arguments after the strides
    constexprs: dict | None = None
    mask: np.ndarray | None = None  # packed custom mask (host copy, for the reference path)
    mask_bits: np.ndarray | None = None  # first bit of each request's mask
    sm90_constexprs: dict | None = None  # set: launch the Gluon prefill kernel (kernels/prefill_sm90.py)
    decode_sm90_constexprs: dict | None = None  # set: launch the Gluon decode kernel (kernels/decode_sm90.py)

    @property
    def sm90(self) -> bool:
        """The plan runs the Gluon prefill kernel for Hopper."""
        return self.sm90_constexprs is not None


class BatchAttention:
    """Base of the batch wrappers (not public): see the module docstring."""

    _mode = "prefill"
    _paged = True

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD",
                 use_cuda_graph: bool = False, backend: str = "auto",
                 paged_kv_indices_buffer: torch.Tensor | None = None, variant=None):
        from .formats import check_kv_layout
        from .variants import check_variant

        self._variant = check_variant(variant)
        self._reqs = None  # int64 [batch, 3] request table of variant / custom-mask plans
        self._mask = None  # uint8 packed custom mask

        if not isinstance(float_workspace_buffer, torch.Tensor):
            raise ValueError("float_workspace_buffer must be a torch.Tensor")
        self._float_ws = float_workspace_buffer
        self.device = float_workspace_buffer.device
        self._kv_layout = check_kv_layout(kv_layout)
        self._use_cuda_graph = bool(use_cuda_graph)
        self._backend = resolve_backend(backend, self.device)
        self._plan: PlanState | None = None
        # CUDA-graph mode: (kernel key, mode, config, Gluon decode, Gluon prefill) of the first plan, kept by later ones
        self._graph_kernel = None
        # pages of the smallest paged cache a run() of this wrapper was captured with (CUDA-graph wrappers): a
        # replay skips run()'s checks, so plan() checks the page ids against it (_check_captured_pages)
        self._captured_pages = None
        # ((kernel key, mode, long decode), (config, Gluon decode kernel or not, Gluon prefill kernel or not)) of the
        # last plan (_plan_batch)
        self._config_choice = None
        self._graph_sm90 = None
        # "decode" / "prefill": plan every batch with that mode's kernel configuration (None: decode when
        # every request has one query); the cascade sets "prefill" on its shared levels
        self._fixed_mode: str | None = None
        self._launch_cache = None  # (key, launch arguments) of the last plan (_prepare_launch)
        self._tma_cache = None  # (key, prefill_sm90.tma_views) of the last cache the Gluon prefill read
        self._checked = None  # (scalar arguments, checked values) of the last plan (_check_params)
        # run() merges its result into the (out, lse) it is given instead of overwriting them (a cascade's
        # levels after the first; Triton kernel only: see _can_merge_into_out())
        self._merge_out = False
        self._grid = None  # (config, persistent grid size) of the last plan
        # PAGODA_DECODE_EARLY_PAGES (default 1; 0 turns it off): the Gluon decode kernel as a PDL launch loads
        # round 0's first page ids before its griddepcontrol.wait (decode_sm90's EARLY_PAGES); read once, since a
        # captured run() keeps its kernel. H200, session 21, engine batch 1 interleaved on one machine: 4.361 /
        # 4.367 -> 4.363 / 4.355 ms per token alone (within noise), part of the three boundary changes' -0.011
        self._early_pages = env_switch("PAGODA_DECODE_EARLY_PAGES", "1")
        # PAGODA_DECODE_TRIM_GRID (default 1; 0 turns it off): a wrapper without CUDA graphs launches the Gluon
        # decode kernel on no more programs than its plan has tasks (the persistent grid's other programs only
        # read the plan's header and leave). H200, session 24, interleaved (benchmarks/results/
        # decode_epilogue_h200_s24.txt): 1 x 32768 40.61 -> 39.84 us, 16 x 4096 69.70 -> 68.32, 4 x 1024 14.37 ->
        # 13.82, 1 x 1024 10.72 -> 10.59, 64 x 2048 (396 tasks) the same. A captured run() keeps its launch's grid,
        # so CUDA-graph wrappers keep the whole persistent grid.
        self._trim_grid = env_switch("PAGODA_DECODE_TRIM_GRID", "1")
        # PAGODA_DECODE_BALANCE_GRID (default 1; 0 turns it off): a 16-bit Gluon decode plan's tasks go to the fewest
        # programs per SM (down to 2) that take them in as many rounds as the whole persistent grid does
        # (balanced_grid; the others take none, and an eager wrapper with the trimmed grid does not launch them)
        self._balance_grid = env_switch("PAGODA_DECODE_BALANCE_GRID", "1")
        raw = float_workspace_buffer.reshape(-1).view(torch.uint8)
        self._ws_f32 = raw[:raw.numel() // 4 * 4].view(torch.float32)  # partial results live here
        self._copy_done = None  # event: the last host-to-device copy out of the staging buffer (reused)
        self._copy_pending = False
        self._stream = (None, None)  # (raw id, torch Stream) of the stream the last plan copied on
        items, splits, arrivals, pages = ((GRAPH_MAX_ITEMS, GRAPH_MAX_SPLITS, GRAPH_MAX_ARRIVALS, GRAPH_MAX_PAGES)
                                          if use_cuda_graph else (256, 64, 1024, 256))
        if paged_kv_indices_buffer is not None:
            if paged_kv_indices_buffer.device != self.device:
                raise ValueError("paged_kv_indices_buffer must be on the workspace's device")
            pages = paged_kv_indices_buffer.numel()
        self._alloc_int(items, splits, pages)
        self._arrivals = torch.zeros(arrivals, dtype=torch.int32, device=self.device)

    def run_return_lse(self, *args, **kwargs):
        """FlashInfer's: run(..., return_lse=True), (out, lse)."""
        return self.run(*args, return_lse=True, **kwargs)

    def reset_workspace_buffer(self, float_workspace_buffer: torch.Tensor, int_workspace_buffer=None) -> None:
        """FlashInfer's: the float workspace (split partial results) moves to float_workspace_buffer, on the same
        device; plan() again before run(). int_workspace_buffer is accepted and not used (the plan buffer is the
        wrapper's own). Not for a CUDA-graph wrapper that has planned: its captured runs read the old buffer."""
        if not isinstance(float_workspace_buffer, torch.Tensor) or float_workspace_buffer.device != self.device:
            raise ValueError(f"float_workspace_buffer must be a tensor on {self.device}, got "
                             f"{getattr(float_workspace_buffer, 'device', float_workspace_buffer)}")
        if self._use_cuda_graph and self._graph_kernel is not None:
            raise ValueError("reset_workspace_buffer: a CUDA-graph wrapper's captured runs read its workspace; make "
                             "a new wrapper instead")
        self._float_ws = float_workspace_buffer
        raw = float_workspace_buffer.reshape(-1).view(torch.uint8)
        self._ws_f32 = raw[:raw.numel() // 4 * 4].view(torch.float32)
        self._plan = None
        self._launch_cache = None

    # -- buffers -------------------------------------------------------------------
    def _alloc_int(self, items: int, splits: int, pages: int) -> None:
        """The plan buffer (kernels/attention.py: header, work list, split table, page ids, packed in this
        order by each plan) and its pinned host staging twin: a plan is one host-to-device copy."""
        self._max_items, self._max_splits, self._max_pages = items, splits, pages
        n = NUM_COUNTERS + items * WORK_FIELDS + splits * SPLIT_FIELDS + 4 + pages
        self._int_buf = torch.zeros(n, dtype=torch.int32, device=self.device)
        self._staging = torch.zeros(n, dtype=torch.int32, pin_memory=self.device.type == "cuda")
        self._staging_np = self._staging.numpy()
        self._counters = self._int_buf[:NUM_COUNTERS]
        self._work_buf = self._int_buf[NUM_COUNTERS:]
        self._upload_views = {}  # (device prefix, staging prefix) by copy length (_upload)

    def _ensure_capacity(self, items: int, splits: int, arrivals: int, pages: int) -> None:
        if (items <= self._max_items and splits <= self._max_splits and arrivals <= self._arrivals.numel()
                and pages <= self._max_pages):
            return
        if self._use_cuda_graph:
            raise ValueError(f"batch too large for the CUDA-graph buffers of this wrapper: {items} work items "
                             f"(max {self._max_items}), {splits} split-table rows (max {self._max_splits}; one per "
                             f"split tile, then MLA's merge list), {arrivals} arrival counters (max "
                             f"{self._arrivals.numel()}), {pages} pages (max {self._max_pages}); pass a larger "
                             f"paged_kv_indices_buffer or split the batch")
        self._wait_staging()
        if items > self._max_items or splits > self._max_splits or pages > self._max_pages:
            grow = (lambda need, have: have if need <= have else max(need, 2 * have))
            self._alloc_int(grow(items, self._max_items), grow(splits, self._max_splits),
                            grow(pages, self._max_pages))
        if arrivals > self._arrivals.numel():
            self._arrivals = torch.zeros(max(arrivals, 2 * self._arrivals.numel()), dtype=torch.int32,
                                         device=self.device)

    def _note_capture(self, num_pages: int) -> None:
        """run() of a CUDA-graph wrapper: remember the cache's pages while a graph captures it."""
        if self._use_cuda_graph and self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            self._captured_pages = num_pages if self._captured_pages is None else min(self._captured_pages, num_pages)

    def _check_captured_pages(self, max_page: int, name: str = "paged_kv_indices") -> None:
        """plan() after a capture: a replayed run() reads the captured cache without run()'s page check, so a
        page id past it is refused here (a ValueError, not an out-of-bounds read on the next replay)."""
        if self._captured_pages is not None and max_page >= self._captured_pages:
            raise ValueError(f"{name} refers to page {max_page} but the paged cache captured in this wrapper's "
                             f"CUDA graph has {self._captured_pages} pages (a replay reads that cache)")

    def _wait_staging(self) -> None:
        if self._copy_pending:
            self._copy_done.synchronize()
            self._copy_pending = False

    def _partial_capacity(self, num_qo_heads: int, head_dim: int) -> int:
        return self._ws_f32.numel() // (num_qo_heads * (head_dim + 1))

    # -- plan ----------------------------------------------------------------------
    def _check_params(self, num_qo_heads, num_kv_heads, head_dim, window_left, logits_soft_cap, sm_scale,
                      q_data_type, kv_data_type):
        """plan()'s scalar arguments: returns (q dtype, kv dtype, sm_scale, soft cap) or raises ValueError."""
        ref = self._backend == "torch"  # the reference path also takes float32 and any head_dim
        check_heads(num_qo_heads, num_kv_heads, head_dim, any_head_dim=ref)
        q_dtype = check_dtype("q_data_type", q_data_type, allow_fp32=ref)
        kv_dtype = check_kv_dtype(kv_data_type, q_dtype, allow_fp32=ref)
        if not isinstance(window_left, int) or window_left < -1:
            raise ValueError(f"window_left must be an int >= -1, got {window_left!r}")
        if sm_scale is None:
            sm_scale = 1.0 / math.sqrt(head_dim)
        if not (isinstance(sm_scale, (int, float)) and math.isfinite(sm_scale) and sm_scale > 0):
            raise ValueError(f"sm_scale must be a positive finite float, got {sm_scale!r}")
        cap = 0.0 if logits_soft_cap is None else float(logits_soft_cap)
        if not math.isfinite(cap) or cap < 0:
            raise ValueError(f"logits_soft_cap must be None or >= 0, got {logits_soft_cap!r}")
        if cap > 0 and self._variant is not None and self._variant.score_mod is not None:
            raise ValueError(f"logits_soft_cap and the score_mod of variant {self._variant.name!r} both change "
                             f"the logits: fold the cap into the variant (pagoda.variants.soft_cap)")
        return q_dtype, kv_dtype, float(sm_scale), cap

    def _plan_batch(self, *, qo_indptr: np.ndarray, kv_lens: np.ndarray, kv_base: np.ndarray,
                    indices: torch.Tensor | None, max_page: int, num_qo_heads: int, num_kv_heads: int,
                    head_dim: int, page_size: int, causal: bool, window_left: int,
                    logits_soft_cap, sm_scale, q_data_type, kv_data_type, custom_mask=None,
                    packed_custom_mask=None, mask_indptr=None, one_query: bool = False,
                    qo_lens: np.ndarray | None = None) -> None:
        """one_query: the caller knows every request has one query (qo_indptr is arange(batch + 1)), as the
        decode wrapper does; otherwise it is found here, once, for the planner. qo_lens: the caller's
        np.diff(qo_indptr), with one_query found from it (formats.check_qo_indptr), if it has them."""
        self._check_captured_pages(max_page)
        # the scalar parameters are checked once and reused while they repeat (every decode step of a server)
        pkey = (num_qo_heads, num_kv_heads, head_dim, window_left, logits_soft_cap, sm_scale, q_data_type,
                kv_data_type, type(num_qo_heads), type(num_kv_heads), type(head_dim))  # (4.0 == 4: the types too)
        try:
            same = self._checked is not None and bool(self._checked[0] == pkey)
        except (TypeError, ValueError, RuntimeError):  # e.g. a tensor where a number belongs: check it
            same = False
        if same:
            q_dtype, kv_dtype, sm_scale, cap, num_qo_heads, num_kv_heads, head_dim = self._checked[1]
        else:
            q_dtype, kv_dtype, sm_scale, cap = self._check_params(
                num_qo_heads, num_kv_heads, head_dim, window_left, logits_soft_cap, sm_scale, q_data_type,
                kv_data_type)
            # (NumPy ints pass the checks: plain ints from here on, for the launches)
            num_qo_heads, num_kv_heads, head_dim = int(num_qo_heads), int(num_kv_heads), int(head_dim)
            self._checked = (pkey, (q_dtype, kv_dtype, sm_scale, cap, num_qo_heads, num_kv_heads, head_dim))
        page_size = int(page_size)  # (checked by the caller: check_paged_lens; a NumPy int becomes a plain one)
        if (window_left >= 0 and not self._use_cuda_graph
                and (not len(kv_lens) or int(kv_lens.max()) <= window_left + 1)):
            # the window cuts no request's KV (every query's first visible key would be <= 0): plan and run without
            # one, so the kernels leave out the window's masks (Gluon prefill 8 x 1024 under a 4096-token window:
            # 221.9 -> 203.8 us, H200, session 30). (A CUDA-graph wrapper keeps it: a captured run() replays the
            # kernel of its first plan, which later lengths may need windowed.)
            window_left = -1
        if not one_query and qo_lens is None:
            qo_lens = np.diff(qo_indptr)
            one_query = bool(qo_lens.size and qo_lens.min() == 1 and qo_lens.max() == 1)
        mask_np = mask_bits = None
        if custom_mask is not None or packed_custom_mask is not None or mask_indptr is not None:
            if qo_lens is None:
                qo_lens = np.diff(qo_indptr)
            from .variants import prepare_custom_mask

            mask_np, mask_bits = prepare_custom_mask(custom_mask, packed_custom_mask, mask_indptr, qo_lens, kv_lens)

        group = num_qo_heads // num_kv_heads
        # What a launch compiles in (constexprs, block shapes): in CUDA-graph mode the first plan fixes it,
        # since a captured run() replays that kernel whatever later plans choose.
        total_kv = None  # (kv_lens.sum(), where the configuration choice needs it)
        kernel_key = (num_qo_heads, num_kv_heads, head_dim, page_size, q_dtype, kv_dtype, bool(causal),
                      window_left >= 0, cap > 0, mask_np is not None)
        if self._use_cuda_graph and self._graph_kernel is not None:
            key0, mode, config, gluon_decode, sm90_ok = self._graph_kernel
            if key0 != kernel_key:
                names = ("num_qo_heads", "num_kv_heads", "head_dim", "page_size", "q_data_type", "kv_data_type",
                         "causal", "window_left >= 0", "logits_soft_cap > 0", "custom mask")
                diff = [f"{n}: {a} -> {b}" for n, a, b in zip(names, key0, kernel_key) if a != b]
                raise ValueError(f"a CUDA-graph wrapper keeps the kernel of its first plan() (a captured run() "
                                 f"replays it); this plan changes {', '.join(diff)}: use another wrapper")
            if gluon_decode and not one_query and len(qo_lens) and int(qo_lens.max()) > 1:
                # (the Triton kernel's decode tiles take any query count; the Gluon decode kernel's only one)
                raise ValueError(f"this CUDA-graph wrapper replays the one-query decode kernel of its first plan(); "
                                 f"this plan has a request with {int(qo_lens.max())} queries: use another wrapper")
        else:
            # One query per request is decode whatever the wrapper: small tiles, decode tuning.
            mode = self._fixed_mode or ("decode" if one_query or (len(qo_lens) and int(qo_lens.max()) <= 1)
                                        else self._mode)
            total_kv = int(kv_lens.sum())
            # the choice below depends on the lengths only through LONG_DECODE_KV: the last one is kept while its
            # key repeats (every decode step of a server: -13 us a plan on the CPU machine, session 25)
            ckey = (kernel_key, mode, bool(len(kv_lens)) and total_kv >= LONG_DECODE_KV * len(kv_lens))
            if self._config_choice is not None and self._config_choice[0] == ckey:
                config, gluon_decode, sm90_ok = self._config_choice[1]
            else:
                sm90_ok = mode == "prefill" and self._sm90_eligible(head_dim, q_dtype, kv_dtype, mask_np is None)
                # (the tuned CUDA table is for the kernels: the reference path on a CUDA tensor takes any head_dim)
                # (head_dim 256 prefill: the Gluon kernel's tiles are not the Triton kernel's)
                config = select_config(mode, head_dim, group,
                                       self._backend == "triton" and self.device.type == "cuda", kv_dtype.itemsize,
                                       total_kv / len(kv_lens) if len(kv_lens) else 0.0, page_size,
                                       sm90_ok and head_dim == 256)
                gluon_decode = mode == "decode" and config.heads_per_prog <= 16 and self._decode_gluon_eligible(
                    head_dim, q_dtype, kv_dtype, mask_np is None)
                if gluon_decode:
                    config = _gluon_decode_config(config, kv_dtype.itemsize, head_dim)
                self._config_choice = (ckey, (config, gluon_decode, sm90_ok))
            if self._use_cuda_graph:
                self._graph_kernel = (kernel_key, mode, config, gluon_decode, sm90_ok)
        if self._grid is None or self._grid[0] is not config:
            self._grid = (config, num_programs(self.device, config))
        grid = self._grid[1]
        tasks_per_item = num_kv_heads * -(-group // config.heads_per_prog)
        work = plan_work(qo_indptr, kv_lens, kv_base, causal=causal, window_left=window_left,
                         config=config, tasks_per_item=tasks_per_item, num_ctas=grid,
                         max_partial_rows=self._partial_capacity(num_qo_heads, head_dim),
                         kv_ranges=self._variant.kv_ranges if self._variant is not None else None,
                         one_query=one_query, total_kv=total_kv)
        n_items, n_splits = len(work.work), len(work.splits)
        n_pages = 0 if indices is None else int(indices.numel())
        # arrival counters: one per split tile and task slot, times two (the sm_90 kernel's warp groups); work
        # items: room for grid / tasks_per_item at least (the Gluon decode kernel loads its first item before the
        # task count)
        self._ensure_capacity(max(n_items, -(-grid // tasks_per_item)), n_splits, 2 * n_splits * tasks_per_item,
                              n_pages)
        # the Gluon decode kernel's programs: those that take tasks (the plan header's ACTIVE_AT) and the launch's
        # (a captured run() keeps the whole persistent grid; an eager one launches only the active programs)
        active = grid
        if gluon_decode and n_items:
            if self._balance_grid and kv_dtype.itemsize == 2:
                active = balanced_grid(n_items * tasks_per_item, grid, config.ctas_per_sm)
            if self._trim_grid and not self._use_cuda_graph:
                grid = active = min(active, n_items * tasks_per_item)  # (past the tasks: read the header, leave)
        use_reqs = self._variant is not None or mask_np is not None
        sm90, band = None, 0  # the Gluon prefill kernel's configuration (SM90_CONFIG / SM90_LONG_CONFIG), task band
        if sm90_ok:
            lens = work.work[:, 4] - work.work[:, 3]
            if self._use_cuda_graph and self._graph_sm90 is not None:  # (a captured run() replays its kernel)
                sm90 = self._graph_sm90
            else:
                long = n_items and lens.mean() >= SM90_LONG_KV
                if head_dim == 256:
                    sm90 = SM90_CONFIG_D256
                else:
                    sm90 = (SM90_LONG_CONFIG if head_dim == 128 else SM90_LONG_CONFIG_D64) if long else SM90_CONFIG
                if self._use_cuda_graph:
                    self._graph_sm90 = sm90
            if PREFILL_BAND not in ("auto", "on", "off"):
                raise ValueError(f"PAGODA_PREFILL_BAND must be 'auto', 'on' or 'off', got {PREFILL_BAND!r}")
            if PREFILL_BAND != "off" and n_items:
                band = prefill_band(int(lens.max()) * num_kv_heads * 2 * head_dim * kv_dtype.itemsize, grid,
                                    tasks_per_item // num_kv_heads, force=PREFILL_BAND == "on")
        if self._backend == "triton":
            self._upload(work, n_items * tasks_per_item, indices, band, active if gluon_decode else 0)
            if use_reqs:
                self._upload_requests(qo_indptr, kv_lens, mask_np, mask_bits)
        self._plan = PlanState(
            num_qo_heads, num_kv_heads, head_dim, page_size, q_dtype, kv_dtype, bool(causal), window_left,
            float(sm_scale), cap, config, grid, int(qo_indptr[-1]), len(kv_lens), max_page,
            qo_indptr, kv_lens, kv_base, indices.cpu() if (indices is not None and self._backend == "torch") else None,
            work, mask=mask_np, mask_bits=mask_bits)
        self._prepare_launch(self._plan, sm90=sm90, gluon_decode=gluon_decode)

    def _decode_gluon_eligible(self, head_dim, q_dtype, kv_dtype, no_mask) -> bool:
        """Decode plans the Gluon decode kernel serves (kernels/decode_sm90.py): on sm_90 (with the Triton the
        kernel was written for), fp16 / bf16 queries over an fp8 cache (PAGODA_FP8_DECODE_KERNEL: "auto", the
        default, or "triton" to keep the Triton kernel for comparisons) or over a cache of their own dtype
        (PAGODA_DECODE_KERNEL: "auto", the default, or "triton"), head_dim 64 / 128 / 256, windows and soft caps, no
        variant / custom mask. Asked when a wrapper's plan changes kernel key (_plan_batch keeps its last choice):
        the switches are read then, not at every plan."""
        fp8 = kv_dtype in FP8_DTYPES
        var = "PAGODA_FP8_DECODE_KERNEL" if fp8 else "PAGODA_DECODE_KERNEL"
        choice = os.environ.get(var, "auto")
        if choice not in ("auto", "triton"):
            raise ValueError(f"{var} must be 'auto' or 'triton', got {choice!r}")
        return (choice == "auto" and decode_sm90.HAVE_GLUON and self._backend == "triton"
                and self.device.type == "cuda" and _capability(self.device) == (9, 0)
                and (fp8 or kv_dtype == q_dtype) and q_dtype in (torch.float16, torch.bfloat16)
                and head_dim in (64, 128, 256) and no_mask and self._variant is None and self._paged)

    def _sm90_eligible(self, head_dim, q_dtype, kv_dtype, no_mask) -> bool:
        """Plans the Gluon prefill kernel serves (kernels/prefill_sm90.py): sm_90, 16-bit q and KV,
        head_dim 64 / 128 / 256, windows and soft caps, no variant / custom mask.
        PAGODA_PREFILL_KERNEL=triton keeps the Triton kernel (for comparisons). Asked, as _decode_gluon_eligible,
        when a wrapper's plan changes kernel key (a CUDA-graph wrapper: at its first plan only)."""
        choice = os.environ.get("PAGODA_PREFILL_KERNEL", "auto")
        if choice not in ("auto", "triton"):
            raise ValueError(f"PAGODA_PREFILL_KERNEL must be 'auto' or 'triton', got {choice!r}")
        if (choice == "triton" or self._backend != "triton" or self.device.type != "cuda" or not no_mask
                or self._variant is not None):
            return False
        return (prefill_sm90.HAVE_GLUON and _capability(self.device) == (9, 0) and head_dim in (64, 128, 256)
                and q_dtype in (torch.float16, torch.bfloat16) and kv_dtype == q_dtype)

    def _prepare_launch(self, p: PlanState, sm90: dict | None = None, gluon_decode: bool = False) -> None:
        """Everything run() passes to the kernel that does not depend on its tensors (sm90: the plan
        runs the Gluon prefill kernel in this configuration). A plan with the same parameters as the previous one
        (every decode step of a server) reuses its launch arguments."""
        key = (p.config, p.head_dim, p.page_size, p.causal, p.window_left, p.logits_soft_cap, p.sm_scale,
               p.q_dtype, p.kv_dtype, p.num_qo_heads, p.num_kv_heads, p.mask is not None, gluon_decode,
               None if sm90 is None else tuple(sm90.items()), None if self._use_cuda_graph else p.work.partial_rows)
        last = self._launch_cache
        if last is not None and last[0] == key:
            p.tmp_o, p.tmp_lse, p.scalars, p.constexprs, p.sm90_constexprs, p.decode_sm90_constexprs = last[1]
            return
        p.tmp_o, p.tmp_lse = self._partial_buffers(p.work.partial_rows, p.num_qo_heads, p.head_dim)
        cap = p.logits_soft_cap
        qk_scale = p.sm_scale / cap if cap > 0 else p.sm_scale * LOG2E
        cfg = p.config
        p.scalars = (p.tmp_o.stride(0), p.tmp_o.stride(1), p.tmp_lse.stride(0),
                     p.num_kv_heads, p.num_qo_heads // p.num_kv_heads, cfg.heads_per_prog,
                     qk_scale, cap * LOG2E, p.window_left)
        p.constexprs = dict(
            HEAD_DIM=p.head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PAGE_SIZE=p.page_size,
            PAGED=self._paged, INDEX_ASM=self.device.type == "cuda", CAUSAL=p.causal, SOFTCAP=cap > 0,
            WINDOW=p.window_left >= 0, KV_DEQUANT=kv_dequant_mode(p.q_dtype, p.kv_dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if cfg.maxnreg:
            p.constexprs["maxnreg"] = cfg.maxnreg
        if sm90 is not None:
            p.sm90_constexprs = dict(
                HEAD_DIM=p.head_dim, BLOCK_M=cfg.block_m, BLOCK_N=sm90["block_n"], PAGE_SIZE=p.page_size,
                PAGED=self._paged, CAUSAL=p.causal, STAGES=sm90["stages"], PRODUCER_REGS=sm90["producer_regs"],
                CONSUMER_REGS=sm90["consumer_regs"], Q_SMEM=bool(sm90["q_smem"]),
                TMA=bool(sm90["tma"]),  # (where the run's K / V allow: _launch_kernel)
                Q_AHEAD=bool(sm90["q_ahead"]), SOFTCAP=cap > 0, WINDOW=p.window_left >= 0,
                num_warps=4)
        if gluon_decode:
            p.decode_sm90_constexprs = dict(
                HEAD_DIM=p.head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PAGE_SIZE=p.page_size,
                STAGES=cfg.num_stages, num_warps=4, maxnreg=cfg.maxnreg, SOFTCAP=cap > 0,
                MERGE_ROWS=min(cfg.block_m, 1 << (cfg.heads_per_prog - 1).bit_length()), EARLY_PAGES=self._early_pages)
        var = self._variant
        p.constexprs.update(
            VARIANT=var is not None or p.mask is not None,
            SCORE_MOD=var.score_mod if var is not None and var.score_mod is not None else _no_mod,
            MASK_MOD=var.mask_mod if var is not None and var.mask_mod is not None else _no_mod,
            HAS_SCORE_MOD=var is not None and var.score_mod is not None,
            HAS_MASK_MOD=var is not None and var.mask_mod is not None, CUSTOM_MASK=p.mask is not None)
        self._launch_cache = (key, (p.tmp_o, p.tmp_lse, p.scalars, p.constexprs, p.sm90_constexprs,
                                    p.decode_sm90_constexprs))

    def _upload_requests(self, qo_indptr, kv_lens, mask_np, mask_bits) -> None:
        """The request table (first query row, kv_len, first mask bit) and the packed custom mask."""
        batch = len(kv_lens)
        reqs = np.zeros((batch, 3), dtype=np.int64)
        reqs[:, 0] = qo_indptr[:-1]
        reqs[:, 1] = kv_lens
        if mask_bits is not None:
            reqs[:, 2] = mask_bits
        if self._reqs is None or self._reqs.shape[0] < max(batch, 1):
            if self._reqs is not None and self._use_cuda_graph:
                raise ValueError(f"batch of {batch} requests exceeds this CUDA-graph wrapper's request table "
                                 f"({self._reqs.shape[0]}, sized by the first plan with a variant or mask)")
            cap = max(batch, 4096 if self._use_cuda_graph else 1)
            self._reqs = torch.zeros(cap, 3, dtype=torch.int64, device=self.device)
        self._reqs[:batch].copy_(torch.from_numpy(reqs))
        if mask_np is not None:
            n = max(len(mask_np), 1)
            if self._mask is None or self._mask.numel() < n:
                if self._mask is not None and self._use_cuda_graph:
                    raise ValueError(f"custom mask of {n} bytes exceeds this CUDA-graph wrapper's mask buffer "
                                     f"({self._mask.numel()}); pass a larger custom_mask_buf")
                self._mask = torch.zeros(n, dtype=torch.uint8, device=self.device)
            self._mask[:len(mask_np)].copy_(torch.from_numpy(mask_np))

    def _upload(self, work: WorkPlan, num_tasks: int, indices: torch.Tensor | None, band: int = 0,
                active: int = 0, merges: np.ndarray | None = None) -> None:
        """The plan buffer's contents (header, work list, split table, host page ids, packed) written
        into the pinned staging buffer with NumPy, then one asynchronous copy to the device (page ids
        already on the device: a second, device-to-device); _wait_staging() before the next write.
        merges: the MLA merge list (int32, after the split table; header field MERGES_AT says where).
        On the device's host each torch call costs ~10 us: one copy instead of three and one reused
        event are a third of plan() for a small batch (notes.md, session 8)."""
        self._wait_staging()
        n_w, n_m = work.work.size, work.splits.size
        n_x = 0 if merges is None else merges.size
        s0 = NUM_COUNTERS + n_w
        i0 = -(-(s0 + n_m + n_x) // 4) * 4  # page ids 16-byte aligned
        n = 0 if indices is None else indices.numel()
        host_ids = n > 0 and indices.is_cpu
        st = self._staging_np
        st[:NUM_COUNTERS] = (0, 0, num_tasks, s0, i0, band, active, s0 + n_m if n_x else 0)  # the header
        st[NUM_COUNTERS:s0] = work.work.reshape(-1)
        st[s0:s0 + n_m] = work.splits.reshape(-1)
        if n_x:
            st[s0 + n_m:s0 + n_m + n_x] = merges
        if host_ids:
            st[i0:i0 + n] = indices.numpy()
        end = i0 + n if host_ids else s0 + n_m + n_x
        if self.device.type != "cuda":
            self._int_buf[:end].copy_(self._staging[:end])
            if n and not host_ids:
                self._int_buf[i0:i0 + n].copy_(indices)
            return
        # the copy's length rounded up to 1024 ints (4 KB; what lies past `end` is not read), so that the two
        # views repeat from step to step and are kept: a torch slice is ~1-2 us of host time on the device hosts
        end_r = min(-(-end // 1024) * 1024, self._staging.shape[0])
        views = self._upload_views.get(end_r)
        if views is None:
            if len(self._upload_views) >= 64:
                self._upload_views.clear()
            views = self._upload_views[end_r] = (self._int_buf[:end_r], self._staging[:end_r])
        views[0].copy_(views[1], non_blocking=True)
        if n and not host_ids:
            self._int_buf[i0:i0 + n].copy_(indices, non_blocking=True)
        # the event records on the current stream; finding it through torch.cuda.current_stream() builds a
        # Stream object per call, so the raw handle (what Triton's launcher reads too) keys a cached one
        raw = torch._C._cuda_getCurrentRawStream(self.device.index)
        if raw != self._stream[0]:
            self._stream = (raw, torch.cuda.current_stream(self.device))
        if self._copy_done is None:
            self._copy_done = torch.cuda.Event()
        self._copy_done.record(self._stream[1])
        self._copy_pending = True

    # -- run -----------------------------------------------------------------------
    def _require_plan(self) -> PlanState:
        if self._plan is None:
            raise not_planned(self)
        return self._plan

    def _check_q(self, q: torch.Tensor, p: PlanState) -> None:
        if not isinstance(q, torch.Tensor):
            raise ValueError("q must be a torch.Tensor")
        want = (p.nnz_qo, p.num_qo_heads, p.head_dim)
        if tuple(q.shape) != want:
            raise ValueError(f"q must have shape {want} from plan(), got {tuple(q.shape)}")
        if q.dtype != p.q_dtype:
            raise ValueError(f"q dtype {q.dtype} differs from q_data_type {p.q_dtype} given to plan()")
        if q.device != self.device:
            raise ValueError(f"q is on {q.device} but the workspace is on {self.device}")
        if q.stride(-1) != 1:
            raise ValueError("q must be contiguous in head_dim")

    def _check_kv(self, name: str, k: torch.Tensor, p: PlanState, num_kv_heads: int, head_dim: int) -> None:
        if k.dtype != p.kv_dtype:
            raise ValueError(f"{name} dtype {k.dtype} differs from kv_data_type {p.kv_dtype} given to plan()")
        if k.device != self.device:
            raise ValueError(f"{name} is on {k.device} but the workspace is on {self.device}")
        if num_kv_heads != p.num_kv_heads or head_dim != p.head_dim:
            raise ValueError(f"{name} has {num_kv_heads} KV heads of dim {head_dim}; plan() was given "
                             f"{p.num_kv_heads} and {p.head_dim}")

    def _outputs(self, q, p: PlanState, out, lse, return_lse):
        if out is None:
            out = torch.empty_like(q)
        elif tuple(out.shape) != tuple(q.shape) or out.dtype != q.dtype or out.device != q.device:
            raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device}, got "
                             f"{tuple(out.shape)} {out.dtype} on {out.device}")
        if lse is None:
            if return_lse:
                lse = torch.empty(q.shape[0], q.shape[1], dtype=torch.float32, device=q.device)
        elif tuple(lse.shape) != (q.shape[0], q.shape[1]) or lse.dtype != torch.float32:
            raise ValueError(f"lse must be float32 of shape {(q.shape[0], q.shape[1])}, got "
                             f"{lse.dtype} {tuple(lse.shape)}")
        return out, lse

    def _partial_buffers(self, partial_rows: int, h: int, d: int):
        """tmp_o [rows, h, d] and tmp_lse [rows, h] float32 views of the workspace: the rows the plan
        uses (partial_rows), or in CUDA-graph mode all that fit (fixed addresses whatever the plan)."""
        rows = self._partial_capacity(h, d) if self._use_cuda_graph else partial_rows
        # Nothing split: the kernel never touches tmp, but one real row keeps its strides those of a
        # split plan, so Triton does not compile a second specialization (stride == 1) of the kernel
        # the first time a step without splits follows one with them (a multi-second stall in a server).
        if rows == 0 and self._partial_capacity(h, d) == 0:  # no workspace at all: any float32 pointer
            f = self._counters.view(torch.float32)
            return f[None, None, :1].expand(1, 1, d), f[None, :1]
        rows = max(rows, 1)
        tmp = self._ws_f32
        tmp_o = tmp[:rows * h * d].view(rows, h, d)
        tmp_lse = tmp[rows * h * d:rows * h * (d + 1)].view(rows, h)
        return tmp_o, tmp_lse

    def _unit_scales(self, n: int) -> torch.Tensor:
        """n per-head scales of 1.0 (the partner of a per-head tensor given for only one of K / V),
        allocated once, not in every run()."""
        ones = getattr(self, "_ones", None)
        if ones is None or ones.numel() < n:
            ones = self._ones = torch.ones(max(n, 64), dtype=torch.float32, device=self.device)
        return ones[:n]

    def _kv_scales(self, p: PlanState, k_scale, v_scale):
        """((k factor, k tensor or None), (v factor, v tensor or None)) of run()'s k_scale / v_scale:
        required for an fp8 cache, optional (default 1.0) otherwise."""
        fp8 = p.kv_dtype in FP8_DTYPES
        return (check_kv_scale("k_scale", k_scale, p.num_kv_heads, self.device, fp8),
                check_kv_scale("v_scale", v_scale, p.num_kv_heads, self.device, fp8))

    def _launch(self, q, k, v, strides_k, strides_v, out, lse, p: PlanState, scales=None, enable_pdl=None,
                pdl_early_kv=False, sinks=None) -> None:
        """strides_*: (page-or-token, slot, head) element strides of the KV tensors;
        scales: the result of _kv_scales (None: 1.0); enable_pdl: launch the Triton attention kernel or the Gluon
        decode kernel as a programmatic dependent launch on a Hopper GPU (ops/kernels/pdl.py; the Gluon prefill
        kernel ignores it); pdl_early_kv: the Gluon decode kernel's EARLY_KV under PDL (decode.py's run());
        sinks: float32 [num_qo_heads] attention-sink logits (formats.check_sinks; None: none), which the kernels
        add to each row's softmax sum where they write the final out / lse (never into a split chunk's partial)."""
        if sinks is not None and self._merge_out:
            raise ValueError("sinks cannot be combined with a run() that merges into out / lse (a cascade level): "
                             "the sink belongs to the merged softmax once")
        lse_arg = lse if lse is not None else p.tmp_lse
        (kf, kt), (vf, vt) = scales if scales is not None else ((1.0, None), (1.0, None))
        per_head = kt is not None or vt is not None
        if per_head:  # one tensor given: the other is its scalar factor on every head
            kt = kt if kt is not None else self._unit_scales(p.num_kv_heads)
            vt = vt if vt is not None else self._unit_scales(p.num_kv_heads)
        dummy = p.tmp_lse  # any float32 pointer: not read without SCALE_PTR
        var = self._variant
        vparams = var.params_on(self.device) if var is not None else None
        try:
            self._launch_kernel(q, k, v, strides_k, strides_v, out, lse, lse_arg, p, kf, vf, kt, vt, per_head,
                                dummy, vparams, enable_pdl, pdl_early_kv, sinks)
        except Exception as e:  # noqa: BLE001 - a variant that does not compile is named, with the cause
            if var is None or isinstance(e, ValueError):
                raise
            raise ValueError(f"variant {var.name!r} does not compile into the attention kernel: "
                             f"{type(e).__name__}: {e}") from e

    def _launch_kernel(self, q, k, v, strides_k, strides_v, out, lse, lse_arg, p, kf, vf, kt, vt, per_head, dummy,
                       vparams, enable_pdl=None, pdl_early_kv=False, sinks=None):
        if p.sm90_constexprs is not None and kf == 1.0 and vf == 1.0 and not per_head and not self._merge_out:
            cx = p.sm90_constexprs
            views = self._prefill_tma_views(k, v, strides_k, strides_v, p) if cx["TMA"] else None
            kd, vd, *tma_geom = views if views is not None else (k, v, 0, 0, 0)
            prefill_sm90.prefill_sm90_ws_kernel[(p.grid,)](
                q, k, v, out, lse_arg, p.tmp_o, p.tmp_lse, self._work_buf, self._counters, self._int_buf,
                self._int_buf, self._arrivals, kd, vd,
                q.stride(0), q.stride(1), *strides_k, *strides_v, out.stride(0), out.stride(1), lse_arg.stride(0),
                *p.scalars[:7], *tma_geom, *p.scalars[7:9], WRITE_LSE=lse is not None,
                **dict(cx, TMA=views is not None), SINKS=sinks)
            return
        if p.decode_sm90_constexprs is not None and not self._merge_out:
            pdl = pdl_launch(enable_pdl, q)
            decode_sm90.decode_sm90_kernel[(p.grid,)](
                q, k, v, out, lse_arg, p.tmp_o, p.tmp_lse, self._work_buf, self._counters, self._int_buf,
                self._int_buf, self._arrivals, kt if per_head else dummy, vt if per_head else dummy,
                q.stride(0), q.stride(1), *strides_k, *strides_v, out.stride(0), out.stride(1), lse_arg.stride(0),
                *p.scalars[:7], kf, vf, kt.stride(0) if per_head else 0, vt.stride(0) if per_head else 0,
                p.scalars[7], WRITE_LSE=lse is not None, SCALE_PTR=per_head,
                SAME_STRIDES=strides_k[:2] == strides_v[:2], EARLY_KV=pdl_early_kv and pdl["PDL"],
                **p.decode_sm90_constexprs, **pdl, SINKS=sinks)
            return
        attention_kernel[(p.grid,)](
            q, k, v, out, lse_arg, p.tmp_o, p.tmp_lse, self._work_buf, self._counters, self._int_buf,
            self._int_buf, self._arrivals, kt if per_head else dummy, vt if per_head else dummy,
            self._reqs if self._reqs is not None else self._counters,
            self._mask if (self._mask is not None and p.mask is not None) else self._counters,
            vparams if vparams is not None else dummy,
            q.stride(0), q.stride(1), *strides_k, *strides_v, out.stride(0), out.stride(1), lse_arg.stride(0),
            *p.scalars, kf, vf, kt.stride(0) if per_head else 0, vt.stride(0) if per_head else 0,
            WRITE_LSE=lse is not None, SCALE_PTR=per_head, MERGE_OUT=self._merge_out, **p.constexprs,
            **pdl_launch(enable_pdl, q), SINKS=sinks,
        )

    def _prefill_tma_views(self, k, v, strides_k, strides_v, p: PlanState):
        """prefill_sm90.tma_views of this run's K / V, kept while they stay the same tensors (a paged cache
        does from step to step)."""
        key = (k.data_ptr(), v.data_ptr(), tuple(k.shape), tuple(v.shape), tuple(strides_k), tuple(strides_v),
               k.dtype, self._paged, p.page_size, p.sm90_constexprs["BLOCK_N"], p.head_dim, p.num_kv_heads)
        if self._tma_cache is None or self._tma_cache[0] != key:
            self._tma_cache = (key, prefill_sm90.tma_views(k, v, strides_k, strides_v, self._paged, p.page_size,
                                                           p.sm90_constexprs["BLOCK_N"], p.head_dim,
                                                           p.num_kv_heads))
        return self._tma_cache[1]

    def _can_merge_into_out(self) -> bool:
        """Whether run(out=, lse=) of the current plan can merge its result into the given state in the
        attention kernel's epilogue (the Triton kernel: not the sm_90 prefill kernel, not the PyTorch
        reference path). The cascade wrapper uses it to skip its separate merge."""
        p = self._plan
        return (self._backend == "triton" and p is not None and p.sm90_constexprs is None
                and p.decode_sm90_constexprs is None)

    def _run_reference(self, q, kv_of_request, out, lse, p: PlanState, scales=None, sinks=None) -> None:
        """backend="torch": per-request reference attention in float32 (KV dequantized by its scales; sinks:
        attention-sink logits, formats.check_sinks)."""
        deq = None
        if scales is not None:
            (kf, kt), (vf, vt) = scales
            ks = kf * (kt.float() if kt is not None else torch.ones(p.num_kv_heads, device=self.device))
            vs = vf * (vt.float() if vt is not None else torch.ones(p.num_kv_heads, device=self.device))
            if p.kv_dtype in FP8_DTYPES or kf != 1.0 or vf != 1.0 or kt is not None or vt is not None:
                deq = (ks[None, :, None], vs[None, :, None])
        for b in range(p.batch_size):
            s, e = int(p.host_qo_indptr[b]), int(p.host_qo_indptr[b + 1])
            if e == s:
                continue
            k, v = kv_of_request(b)
            if deq is not None:
                k, v = k.float() * deq[0], v.float() * deq[1]
            mask = None
            if p.mask is not None:
                from .variants import unpack_request_mask
                mask = unpack_request_mask(p.mask, int(p.mask_bits[b]), e - s, k.shape[0])
            o, l2 = reference.attention(q[s:e], k, v, causal=p.causal, sm_scale=p.sm_scale,
                                        window_left=p.window_left,
                                        logits_soft_cap=p.logits_soft_cap or None,
                                        variant=self._variant, batch_idx=b, mask=mask, sinks=sinks)
            out[s:e] = o
            if lse is not None:
                lse[s:e] = l2

