"""DeepSeek MLA (multi-head latent attention), FlashInfer-compatible.

``BatchMLAPagedAttentionWrapper`` runs the absorbed form: queries are split into
``q_nope`` [nnz, num_heads, head_dim_ckv] (already multiplied by W_UK) and ``q_pe``
[nnz, num_heads, head_dim_kpe]; the paged cache holds per token one latent vector
``ckv`` [head_dim_ckv] and its rotary key ``kpe`` [head_dim_kpe], shared by all heads:

    logits[t, h, j] = (q_nope[t, h] . ckv[j] + q_pe[t, h] . kpe[j]) * sm_scale
    out[t, h] = softmax_j(logits[t, h]) @ ckv                [nnz, num_heads, head_dim_ckv]

(the caller applies W_UV to ``out``). Decode (qo_len 1) and append / prefill (qo_len > 1,
``causal`` bottom-right aligned) share one kernel (kernels/mla.py) and the planner of the
other wrappers: split-KV with load balancing, a persistent grid, CUDA-graph replay.
The LSE is base 2, as everywhere in pagoda.
"""
from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import torch

from .formats import MAX_PAGE_SIZE, check_dtype, check_indptr, check_page_indices, last_page_lens, to_host_array
from .kernels import mla_sm90
from .kernels.attention import SPLIT_FIELDS
from .kernels.mla import MERGE_FIELDS, mla_combine_kernel, mla_kernel
from .plan import KernelConfig, WorkPlan, plan_work
from .reference import gather_paged_kv
from .runner import LOG2E, BatchAttention, _capability, num_programs
from ..ops._dispatch import sm_count

SUPPORTED_CKV = (128, 256, 512)
SUPPORTED_KPE = (32, 64)
# (block_m, block_n, num_warps, num_stages, ctas_per_sm, item_cost) on CUDA; heads_per_prog = min(heads, block_m)
# measured best of `python -m pagoda.bench.mla --sweep` on H100 (benchmarks/results/mla_h100.md)
MLA_CUDA_CONFIG = (32, 128, 8, 2, 1, 512)
_MLA_INTERPRETER_CONFIG = (16, 16, 1, 1, 1, 32)
# the merge launch (mla_combine_kernel): (heads, output-column slices, chunks per load, warps, blocked) per
# program, the first of these whose units (split tiles x head blocks x slices) fit in MERGE_ROUNDS rounds of its
# grid (the last always serves). A program merges a unit at a time, each a chain of dependent loads (the merge
# list's fields, then the chunks): a few deep split tiles (batch 1) go fastest over many narrow units that load
# 32 chunks at once (blocked); many shallow ones (batch >= 16) over whole rows or halves, chunk by chunk.
# H200, the merge launch alone (scripts/mla_kernels.py --combine-sweep, notes.md session 38), us, first vs the
# session-37 choice: 1 x 32768 6.2 vs 16.5, 1 x 8192 4.2 vs 9.3, 1 x 1024 3.2 vs 3.8; 16 x 8192 7.5 (second),
# 128 x 8192 28.0 (whole rows); blocked units of 16 x 1024's 16 split tiles (16 rounds) 26.5 vs 5.6
MLA_COMBINE = [(4, 8, 32, 2, True), (16, 2, 4, 8, False), (16, 1, 2, 8, False)]
MERGE_ROUNDS = 2
# one partial row per head: (512 + 1) fp32 written and read vs one latent token of 576 bf16 (~3.6)
MLA_PARTIAL_COST = 3.6
# The Gluon kernel for sm_90 (kernels/mla_sm90.py, head_dim_ckv 512 / kpe 64, 16-bit): 64-row query tile,
# KV block, ring depth, registers of warp group 1 and of the producer, item cost of the planner.
# 64-token blocks in a 2-deep ring (each m64n64k16 score MMA reads its Q tile once per 64 tokens, not 32; TMA
# now keeps two 72 KB slots ahead of the MMAs, which cp.async gathers could not in session 9). H200, session 38
# (scripts/mla_kernels.py --configs, kernel time): 128 x 8192 656 -> 560 us, 16 x 8192 91.0 -> 79.4, 1 x 32768
# 31.9 -> 31.5, 1 x 8192 19.4 -> 19.7 against 32-token blocks x 4. Producer registers 80: warp group 0 keeps 256
# (88 gives it 248, as fast here; 56 spills in the producer's gathers: 128 x 8192 +38 us).
# Item cost 1024, 512 for <= plan.LATENCY_BOUND_TILES requests (`scripts/mla_probe.py
# --costs-only`, H200, session 10, against 512 everywhere: 16x8192 123.6 -> 106.3 us, 16x32768 and 64x8192 -5%,
# 8x4096 51.9 at 512 vs 60.2 at 1024, batch 1 and 64-128 x 1k within 3%; session 38 on 64-token blocks: 16 x 8192
# 106.7 at 512 vs 90.8 at 1024, 1 x 32768 41.9 vs 50.6, 16 x 1024 37.1 vs 34.8 at 128)
MLA_SM90_CONFIG = dict(block_n=64, stages=2, pv_regs=168, producer_regs=80, item_cost=1024, small_item_cost=512)
_MLA_SM90_ABLATE = 0  # (scripts/mla_probe.py: time the kernel without a stage; wrong results)


def mla_config(num_heads: int, on_cuda: bool, sm90: bool = False) -> KernelConfig:
    if sm90:
        c = MLA_SM90_CONFIG
        return KernelConfig(mla_sm90.TILE_ROWS, c["block_n"], 4, 1, 1, min(num_heads, mla_sm90.TILE_ROWS),
                            c["item_cost"], small_item_cost=c["small_item_cost"], partial_cost=MLA_PARTIAL_COST)
    block_m, block_n, warps, stages, ctas, item_cost = MLA_CUDA_CONFIG if on_cuda else _MLA_INTERPRETER_CONFIG
    return KernelConfig(block_m, block_n, warps, stages, ctas, min(num_heads, block_m), item_cost,
                        partial_cost=MLA_PARTIAL_COST)


def mla_sm90_supported(device: torch.device, head_dim_ckv: int, head_dim_kpe: int, q_dtype: torch.dtype) -> bool:
    """Whether plans take the Gluon kernel: sm_90 (with the Triton it was written for), head_dim_ckv 512,
    head_dim_kpe 64, fp16 / bf16, and PAGODA_MLA_KERNEL is not 'triton' ('auto' and 'gluon' both take it)."""
    choice = os.environ.get("PAGODA_MLA_KERNEL", "auto")
    if choice not in ("auto", "gluon", "triton"):
        raise ValueError(f"PAGODA_MLA_KERNEL must be 'auto', 'gluon' or 'triton', got {choice!r}")
    return (choice != "triton" and mla_sm90.HAVE_GLUON and device.type == "cuda" and _capability(device) == (9, 0)
            and head_dim_ckv == 512 and head_dim_kpe == 64 and q_dtype in (torch.float16, torch.bfloat16))


@dataclasses.dataclass
class MLAPlan:
    num_heads: int
    head_dim_ckv: int
    head_dim_kpe: int
    page_size: int
    causal: bool
    sm_scale: float
    q_dtype: torch.dtype
    kv_dtype: torch.dtype
    config: KernelConfig
    grid: int
    nnz_qo: int
    batch_size: int
    max_page: int
    host_qo_indptr: np.ndarray
    host_kv_lens: np.ndarray
    host_kv_base: np.ndarray
    host_indices: torch.Tensor | None
    partial_rows: int
    sm90: bool = False  # run the Gluon kernel (kernels/mla_sm90.py)
    # split tiles are merged by a second launch (mla_combine_kernel) instead of their last chunk: when the
    # plan has split tiles, and always under CUDA graphs (the captured launches are fixed)
    combine: bool = False
    tasks_per_item: int = 1
    tmp_o: torch.Tensor | None = None
    tmp_lse: torch.Tensor | None = None
    merge_config: tuple = MLA_COMBINE[-1]  # the merge launch's (heads, slices, chunks, warps, blocked)


class BatchMLAPagedAttentionWrapper(BatchAttention):
    """MLA over a paged latent cache (see the module docstring).

    Example (DeepSeek-V3 decode)::

        w = pagoda.BatchMLAPagedAttentionWrapper(workspace)
        w.plan(qo_indptr, kv_indptr, kv_indices, kv_lens, 128, 512, 64, 64, False, sm_scale,
               torch.bfloat16, torch.bfloat16)
        out = w.run(q_nope, q_pe, ckv_cache, kpe_cache)   # [batch, 128, 512]
    """

    _mode = "mla"
    _paged = True

    def __init__(self, float_workspace_buffer: torch.Tensor, use_cuda_graph: bool = False,
                 qo_indptr: torch.Tensor | None = None, kv_indptr: torch.Tensor | None = None,
                 kv_indices: torch.Tensor | None = None, kv_len_arr: torch.Tensor | None = None,
                 backend: str = "auto") -> None:
        # The FlashInfer buffer arguments are accepted; pagoda's plan owns its device buffers
        # (kv_indices, when given, sizes the page-index buffer as in the other wrappers).
        super().__init__(float_workspace_buffer, "NHD", use_cuda_graph, backend, kv_indices)
        self._graph_sm90: bool | None = None  # CUDA-graph mode: the kernel of the first plan (see plan())
        self._tma_cache = (None, (None, None))  # (caches' key, the Gluon kernel's tensor descriptors)

    def plan(self, qo_indptr, kv_indptr, kv_indices, kv_len_arr, num_heads: int, head_dim_ckv: int,
             head_dim_kpe: int, page_size: int, causal: bool, sm_scale: float, q_data_type, kv_data_type,
             use_profiler: bool = False) -> None:
        """qo_indptr: [batch + 1] query rows per request; kv_indptr: [batch + 1] page offsets into
        kv_indices; kv_indices: page ids; kv_len_arr: [batch] KV tokens per request (its pages must
        hold them: kv_len <= pages * page_size); sm_scale: the logits' scale (DeepSeek:
        1 / sqrt(qk_nope_head_dim + qk_rope_head_dim), times the YaRN mscale^2 where used)."""
        ref = self._backend == "torch"
        if not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be an int >= 1, got {num_heads!r}")
        if head_dim_ckv not in SUPPORTED_CKV:
            raise ValueError(f"head_dim_ckv must be one of {SUPPORTED_CKV}, got {head_dim_ckv}")
        if head_dim_kpe not in SUPPORTED_KPE:
            raise ValueError(f"head_dim_kpe must be one of {SUPPORTED_KPE}, got {head_dim_kpe}")
        if not isinstance(page_size, int) or not 1 <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be an int in 1..{MAX_PAGE_SIZE}, got {page_size!r}")
        if not (isinstance(sm_scale, (int, float)) and math.isfinite(sm_scale) and sm_scale > 0):
            raise ValueError(f"sm_scale must be a positive finite float, got {sm_scale!r}")
        q_dtype = check_dtype("q_data_type", q_data_type, allow_fp32=ref)
        kv_dtype = check_dtype("kv_data_type", kv_data_type, allow_fp32=ref)
        if kv_dtype != q_dtype:
            raise ValueError(f"kv_data_type ({kv_dtype}) must equal q_data_type ({q_dtype}) for MLA")
        qo = check_indptr("qo_indptr", qo_indptr)
        batch = len(qo) - 1
        kv_ip = check_indptr("kv_indptr", kv_indptr, batch + 1)
        kv_lens = to_host_array("kv_len_arr", kv_len_arr, batch)
        last_page_lens(kv_ip, kv_lens, page_size)  # (ValueError unless every kv_len fits its pages)
        idx, max_page = check_page_indices(kv_indices, kv_ip)
        self._check_captured_pages(max_page, "kv_indices")

        # the Gluon kernel wherever it runs: faster than the Triton kernel in every row of the MLA bench, batch
        # 1..128 x 1k..32k (1.3-2.4x, session 10, mla_h100.md)
        sm90 = self._backend == "triton" and mla_sm90_supported(self.device, head_dim_ckv, head_dim_kpe, q_dtype)
        if self._use_cuda_graph:  # a captured graph replays one kernel: the first plan's choice stays
            if self._graph_sm90 is None:
                self._graph_sm90 = sm90
            elif self._graph_sm90 and not sm90:
                raise ValueError("this CUDA-graph wrapper was planned for the Gluon MLA kernel; head dims and "
                                 "dtypes must stay those of its first plan")
            sm90 = self._graph_sm90
        config = mla_config(num_heads, self.device.type == "cuda", sm90)
        grid = num_programs(self.device, config)
        tasks_per_item = -(-num_heads // config.heads_per_prog)
        work = plan_work(qo, kv_lens, kv_ip[:-1], causal=bool(causal), window_left=-1, config=config,
                         tasks_per_item=tasks_per_item, num_ctas=grid,
                         max_partial_rows=self._partial_capacity(num_heads, head_dim_ckv))
        n_items, n_splits = len(work.work), len(work.splits)
        merges = merge_list(work)  # (after the split table: capacity counted in its rows)
        self._ensure_capacity(n_items, n_splits + -(-merges.size // SPLIT_FIELDS), n_splits * tasks_per_item,
                              int(idx.numel()))
        if self._backend == "triton":
            self._upload(work, n_items * tasks_per_item, idx, merges=merges)
        self._plan = MLAPlan(num_heads, head_dim_ckv, head_dim_kpe, page_size, bool(causal), float(sm_scale),
                             q_dtype, kv_dtype, config, grid, int(qo[-1]), batch, max_page, qo, kv_lens,
                             kv_ip[:-1], idx.cpu() if ref else None, work.partial_rows, sm90,
                             self._use_cuda_graph or n_splits > 0, tasks_per_item)
        self._plan.tmp_o, self._plan.tmp_lse = self._partial_buffers(work.partial_rows, num_heads, head_dim_ckv)
        self._plan.merge_config = merge_config(n_splits, num_heads, head_dim_ckv, self._combine_grid())

    begin_forward = plan

    def run(self, q_nope: torch.Tensor, q_pe: torch.Tensor, ckv_cache: torch.Tensor, kpe_cache: torch.Tensor,
            out: torch.Tensor | None = None, lse: torch.Tensor | None = None, return_lse: bool = False,
            profiler_buffer=None, kv_len=None, page_table=None):
        """q_nope [nnz, num_heads, head_dim_ckv], q_pe [nnz, num_heads, head_dim_kpe];
        ckv_cache [num_pages, page_size, head_dim_ckv], kpe_cache [num_pages, page_size, head_dim_kpe].
        Returns out [nnz, num_heads, head_dim_ckv] in q's dtype (and lse [nnz, num_heads] float32,
        base 2, when return_lse)."""
        p = self._require_plan()
        if kv_len is not None or page_table is not None:
            raise ValueError("kv_len / page_table run() arguments are not supported: pass them to plan()")
        h = p.num_heads
        for name, t, d in (("q_nope", q_nope, p.head_dim_ckv), ("q_pe", q_pe, p.head_dim_kpe)):
            self._check_input(name, t, (p.nnz_qo, h, d), "from plan()", p.q_dtype, "q_data_type")
        num_pages = None
        for name, t, d in (("ckv_cache", ckv_cache, p.head_dim_ckv), ("kpe_cache", kpe_cache, p.head_dim_kpe)):
            pages = t.shape[0] if isinstance(t, torch.Tensor) and t.dim() == 3 else -1
            self._check_input(name, t, (pages, p.page_size, d), "(num_pages, page_size and head dim from plan())",
                              p.kv_dtype, "kv_data_type")
            if num_pages is not None and pages != num_pages:
                raise ValueError(f"ckv_cache and kpe_cache must have one number of pages, got {num_pages} "
                                 f"and {pages}")
            num_pages = pages
        if p.max_page >= num_pages:
            raise ValueError(f"kv_indices refers to page {p.max_page} but the caches have {num_pages} pages")
        self._note_capture(num_pages)
        shape = (p.nnz_qo, h, p.head_dim_ckv)
        if out is None:
            out = torch.empty(shape, dtype=p.q_dtype, device=self.device)
        elif tuple(out.shape) != shape or out.dtype != p.q_dtype or out.device != self.device or out.stride(-1) != 1:
            raise ValueError(f"out must be {shape} {p.q_dtype} on {self.device}, got {tuple(out.shape)} {out.dtype}")
        if lse is None:
            if return_lse:
                lse = torch.empty(p.nnz_qo, h, dtype=torch.float32, device=self.device)
        elif tuple(lse.shape) != (p.nnz_qo, h) or lse.dtype != torch.float32:
            raise ValueError(f"lse must be float32 of shape {(p.nnz_qo, h)}, got {lse.dtype} {tuple(lse.shape)}")
        lse_arg = lse if lse is not None else p.tmp_lse  # (kernels without WRITE_LSE never write it)
        if self._backend == "torch":
            self._run_mla_reference(q_nope, q_pe, ckv_cache, kpe_cache, out, lse, p)
        elif p.sm90:
            c = MLA_SM90_CONFIG
            descs = self._tma_descriptors(ckv_cache, kpe_cache, p.page_size, c["block_n"])
            mla_sm90.mla_sm90_kernel[(p.grid,)](
                q_nope, q_pe, ckv_cache, kpe_cache, *descs, out, lse_arg, p.tmp_o, p.tmp_lse, self._work_buf,
                self._counters, self._int_buf,
                q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1),
                ckv_cache.stride(0), ckv_cache.stride(1), kpe_cache.stride(0), kpe_cache.stride(1),
                out.stride(0), out.stride(1), lse_arg.stride(0),
                p.tmp_o.stride(0), p.tmp_o.stride(1), p.tmp_lse.stride(0),
                h, p.config.heads_per_prog, p.sm_scale * LOG2E,
                D_KPE=p.head_dim_kpe, BLOCK_N=c["block_n"], PAGE_SIZE=p.page_size, CAUSAL=p.causal,
                WRITE_LSE=lse is not None, STAGES=c["stages"], PV_REGS=c["pv_regs"],
                PRODUCER_REGS=c["producer_regs"], TMA=descs[0] is not None, num_warps=4, ABLATE=_MLA_SM90_ABLATE)
        else:
            cfg = p.config
            mla_kernel[(p.grid,)](
                q_nope, q_pe, ckv_cache, kpe_cache, out, lse_arg, p.tmp_o, p.tmp_lse, self._work_buf, self._counters,
                self._int_buf, self._int_buf, self._arrivals,
                q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1),
                ckv_cache.stride(0), ckv_cache.stride(1), kpe_cache.stride(0), kpe_cache.stride(1),
                out.stride(0), out.stride(1), lse_arg.stride(0),
                p.tmp_o.stride(0), p.tmp_o.stride(1), p.tmp_lse.stride(0),
                h, cfg.heads_per_prog, p.sm_scale * LOG2E, 1.0,
                D_CKV=p.head_dim_ckv, D_KPE=p.head_dim_kpe, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                PAGE_SIZE=p.page_size, INDEX_ASM=self.device.type == "cuda", CAUSAL=p.causal,
                WRITE_LSE=lse is not None, MERGE_UNROLL=2 if p.head_dim_ckv > 256 else 4,
                DEFER_MERGE=p.combine, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if self._backend != "torch" and p.combine:
            heads_b, d_split, chunks, warps, blocked = p.merge_config
            mla_combine_kernel[(self._combine_grid(),)](
                out, lse_arg, p.tmp_o, p.tmp_lse, self._counters, self._int_buf,
                out.stride(0), out.stride(1), lse_arg.stride(0), p.tmp_o.stride(0), p.tmp_o.stride(1),
                p.tmp_lse.stride(0), h,
                D=p.head_dim_ckv, BLOCK_H=heads_b, WRITE_LSE=lse is not None, CHUNKS=chunks,
                D_SPLIT=min(d_split, p.head_dim_ckv // 64), BLOCKED=blocked,
                num_warps=warps if self.device.type == "cuda" else 1)
        return (out, lse) if return_lse else out

    forward = run

    def _combine_grid(self) -> int:
        """Programs of the merge launch: a fixed number (CUDA graphs), two per SM."""
        return 2 * sm_count(self.device) if self.device.type == "cuda" else num_programs(self.device, None)

    def _tma_descriptors(self, ckv, kpe, page_size: int, block_n: int):
        """The Gluon kernel's tensor descriptors of the caches (kernels/mla_sm90.tma_descriptors), kept
        while the caches stay the same tensors (a server's every step)."""
        key = tuple((t.data_ptr(), tuple(t.shape), t.stride()) for t in (ckv, kpe)) + (page_size, block_n)
        if self._tma_cache[0] != key:
            self._tma_cache = (key, mla_sm90.tma_descriptors(ckv, kpe, page_size, block_n))
        return self._tma_cache[1]

    def _check_input(self, name, t, shape, what, dtype, dtype_arg) -> None:
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)} {what}, got {tuple(getattr(t, 'shape', ()))}")
        if t.dtype != dtype:
            raise ValueError(f"{name} dtype {t.dtype} differs from {dtype_arg} {dtype} given to plan()")
        if t.device != self.device:
            raise ValueError(f"{name} is on {t.device} but the workspace is on {self.device}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")

    def _run_mla_reference(self, q_nope, q_pe, ckv, kpe, out, lse, p: MLAPlan) -> None:
        for b in range(p.batch_size):
            s, e = int(p.host_qo_indptr[b]), int(p.host_qo_indptr[b + 1])
            if e == s:
                continue
            n = int(p.host_kv_lens[b])
            pages = p.host_indices[int(p.host_kv_base[b]):int(p.host_kv_base[b]) + -(-n // p.page_size)]
            c, r = gather_paged_kv(ckv[:, :, None], kpe[:, :, None], pages, n)  # one "head" each
            o, l2 = mla_reference(q_nope[s:e], q_pe[s:e], c[:, 0], r[:, 0], sm_scale=p.sm_scale, causal=p.causal)
            out[s:e] = o
            if lse is not None:
                lse[s:e] = l2


def merge_config(n_splits: int, num_heads: int, head_dim_ckv: int, grid: int) -> tuple:
    """The merge launch's (heads, column slices, chunks per load, warps, blocked): the first of MLA_COMBINE whose
    units (split tiles x head blocks x slices, slices of at least 64 columns) fit in MERGE_ROUNDS rounds of the
    grid; the last one otherwise."""
    for c in MLA_COMBINE[:-1]:
        if n_splits * -(-num_heads // c[0]) * min(c[1], head_dim_ckv // 64) <= MERGE_ROUNDS * grid:
            return c
    return MLA_COMBINE[-1]


def merge_list(work: WorkPlan) -> np.ndarray:
    """The plan's split tiles as the merge launch reads them (kernels/mla.py's mla_combine_kernel): int32, the
    number of tiles, then per tile (first partial row, chunks, first query row, query rows), the query rows
    taken from the work item of the tile's first chunk (work fields 0 / 1; 6 the partial row, 7 the split)."""
    w, sp = work.work, work.splits
    out = np.zeros(1 + MERGE_FIELDS * len(sp), dtype=np.int32)
    out[0] = len(sp)
    if len(sp):
        split = w[:, 7]
        has = np.nonzero(split >= 0)[0]
        first = has[w[has, 6] == sp[split[has], 0]]  # the items that start their split tile
        tile = split[first]
        m = out[1:].reshape(-1, MERGE_FIELDS)
        m[tile, 0:2] = sp[tile]
        m[tile, 2] = w[first, 0]
        m[tile, 3] = w[first, 1]
    return out


def mla_reference(q_nope, q_pe, ckv, kpe, *, sm_scale, causal=False, compute_dtype=torch.float32, out_dtype=None):
    """MLA of one request in plain PyTorch: q_nope [qo, H, Dc], q_pe [qo, H, Dp], ckv [kv, Dc],
    kpe [kv, Dp]. Returns (out [qo, H, Dc], lse [qo, H] float32, base 2)."""
    qo, kv = q_nope.shape[0], ckv.shape[0]
    c = ckv.to(compute_dtype)
    logits = (torch.einsum("qhd,kd->hqk", q_nope.to(compute_dtype), c)
              + torch.einsum("qhd,kd->hqk", q_pe.to(compute_dtype), kpe.to(compute_dtype))) * sm_scale
    if causal:
        qi = torch.arange(qo, device=ckv.device)[:, None] + (kv - qo)
        kj = torch.arange(kv, device=ckv.device)[None, :]
        logits = logits.masked_fill(~(kj <= qi), float("-inf"))
    l = torch.logsumexp(logits, dim=-1)  # noqa: E741
    probs = torch.exp(logits - torch.where(torch.isinf(l), 0.0, l)[..., None])
    out = torch.einsum("hqk,kd->qhd", probs, c)
    return out.to(out_dtype or q_nope.dtype), (l / math.log(2.0)).transpose(0, 1).to(torch.float32)


__all__ = ["BatchMLAPagedAttentionWrapper", "merge_config", "merge_list", "mla_reference"]
