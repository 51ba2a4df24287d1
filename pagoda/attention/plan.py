"""The scheduler: turns a batch's lengths into a load-balanced work list.

``plan_work`` runs on the host with NumPy (no per-request Python loop). It splits every
query tile's visible KV range into chunks of one length ``L`` chosen by a cost model,
so that the persistent grid finishes its tasks at about the same time
(FlashInfer's load-balanced scheduling), and writes the items longest first so the
kernel's dynamic fetch is greedy longest-processing-time scheduling.

Cost model, in units of "KV tokens of one head": an item costs its KV length plus a
fixed overhead ``item_cost`` (loading the query tile, the epilogue, fetch latency);
splitting a tile into chunks adds the partial rows that the merge writes and reads.
The makespan of ``num_ctas`` programs that take tasks greedily is at most
``total / num_ctas + largest task``; the chunk length minimising that bound wins.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools

import numpy as np
import triton

from .kernels.attention import SPLIT_FIELDS, WORK_FIELDS


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of the attention kernel for one problem class.

    block_m rows of a query tile hold ``heads_per_prog`` query heads of one KV head
    (GQA packing) times ``block_m // heads_per_prog`` tokens.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    ctas_per_sm: int
    heads_per_prog: int
    item_cost: int = 128  # fixed cost of a work item, in KV tokens of one head (cost model)
    # item_cost for a batch of at most LATENCY_BOUND_TILES tiles (None: item_cost): a few requests are latency-bound
    small_item_cost: int | None = None
    # cost of one partial-result row per query head, in KV tokens of one head: (D + 1) fp32
    # written and read back vs 2 x D fp16 of K and V -> ~2 (MLA: 513 fp32 x 2 vs 576 bf16 -> ~3.6)
    partial_cost: float = 2.0
    maxnreg: int | None = None  # register cap per thread (CUDA): more resident programs per SM

    @property
    def tokens_per_tile(self) -> int:
        return self.block_m // self.heads_per_prog


# (mode, head_dim) -> (block_m, block_n, num_warps, num_stages, ctas_per_sm, item_cost[, maxnreg]) on a
# CUDA GPU. block_m of "decode" is the minimum; it grows to hold the whole GQA group (<= 64).
CUDA_CONFIGS = {
    # 4 programs per SM under a 128-register cap: short contexts (64x256) 1.63x faster, long ones within
    # 2% except a lone 32k request (-4%), which keeps the 2-program config ("decode-long", mean KV >= 16k).
    ("decode", 64): (16, 32, 4, 3, 4, 2048, 128),
    ("decode", 128): (16, 32, 4, 3, 4, 2048, 128),
    ("decode-long", 64): (16, 64, 4, 3, 2, 2048),
    # 128-token blocks, 2 stages: 1x32768 61.4 vs 62.9 us (H200, session 7 `tune decode`)
    ("decode-long", 128): (16, 128, 4, 2, 2, 2048),
    ("decode", 256): (16, 32, 4, 3, 2, 2048),
    # an fp8 cache moves half the bytes per block: twice the block keeps as many bytes in flight
    # fp8 caches: 4 programs per SM hide the dequantization (64x2048: 168 -> 140 us); a lone long
    # request prefers longer blocks (1x32768: 63 vs 87 us)
    ("decode-fp8", 64): (16, 64, 4, 3, 4, 2048, 128),
    ("decode-fp8", 128): (16, 64, 4, 3, 4, 2048, 128),
    ("decode-fp8", 256): (16, 64, 4, 3, 2, 2048),
    ("decode-fp8-long", 64): (16, 128, 4, 2, 3, 2048),
    # session 8 `tune decode --kv-dtype float8_e4m3fn` (H200): 4 warps, 2 stages beat session 7's 8 warps, 3
    # stages in every case (1x32768 56.9 vs 66.2 us, 64x2048 141 vs 176: session 7 had measured the reverse, 52.3
    # vs 56.8 us at 1x32768, on another machine)
    ("decode-fp8-long", 128): (16, 128, 4, 2, 2, 2048),
    ("prefill", 64): (128, 64, 8, 3, 1, 512),
    ("prefill", 128): (128, 64, 8, 3, 1, 512),
    ("prefill", 256): (64, 32, 4, 2, 1, 512),
    # head_dim 256 on the Gluon prefill kernel (runner.SM90_CONFIG_D256): its tiles are 128 query rows, two
    # consumer warp groups of 64 (the Triton kernel's 64 x 32 tiles above ran 0.39x FlashInfer at 1 x 8192, H200,
    # session 29)
    ("prefill-sm90", 256): (128, 64, 8, 3, 1, 512),
}
# item_cost of batches of at most LATENCY_BOUND_TILES tiles, where the tuned item_cost (throughput cases) splits too
# little: `python scripts/small_batch_probe.py` (H200, session 8), batch 1..8 x 1k / 4k at forced chunk lengths:
# the 8 cases' sum at the planner's choice 309 us with 2048, 253 us with 512 (the best possible 247); 8x1024 42.4 ->
# 30.1 us (FlashInfer 42.1)
# head_dim 256 (the Gluon decode kernel, one program per SM; Gemma-2-9B's 16 / 8 heads with its soft cap, `python
# scripts/decode_latency_probe.py --gemma --quick`, H200, session 42, graph replays): the planner's chunks at the tuned
# item_cost against the best forced chunk: 1 x 1024 256 -> 15.4 us (128: 14.2), 1 x 2048 512 -> 20.7 (256: 17.2,
# 128: 16.6), 1 x 4096 512 -> 22.5 (256: 20.6), 2 x 1024 512 -> 20.5 (256: 16.6), 4 x 1024 512 -> 21.9 (256: 19.7),
# 8 x 1024 1024 -> 30.2 (512: 27.6); 512 picks the chunks in parentheses first (115.9 us over the six against 131.2)
# fp8 caches (the Gluon fp8 decode kernel; `python scripts/decode_latency_probe.py [--gemma] --fp8 --quick`, H200,
# session 43, graph replays at forced chunk lengths): the tuned item_cost's chunk against the best, Llama's 32 / 8
# heads of 128: 1 x 1024 256 -> 12.1 us (128: 10.2), 1 x 2048 256 -> 12.0 (128: 10.9), 2 x 1024 256 -> 11.8 (128:
# 10.7), 1 x 4096 256 -> 12.6 (128: 12.6), 4 x 1024 256 -> 12.4 (128: 11.8), 8 x 1024 512 -> 15.8 (256: 14.1): 512
# picks those, 76.7 -> 70.3 us over the six (the best 70.2); Gemma-2-9B's 16 / 8 heads of 256: 1 x 1024 256 -> 14.2
# (128: 12.0), 1 x 2048 256 -> 14.6 (128: 13.3), 1 x 4096 512 -> 19.4 (256: 15.7), 2 x 1024 256 -> 14.4 (128: 12.9),
# 4 x 1024 512 -> 19.2 (256: 15.1), 8 x 1024 512 -> 20.1 (256: 18.8): 512 picks those, 101.9 -> 87.8 us over the six
# (256: 89.3, 1024: 91.9; the best 87.8); head_dim 64 over fp8 not measured (no entry)
SMALL_BATCH_ITEM_COST = {("decode", 64): 512, ("decode", 128): 512, ("decode", 256): 512, ("decode-fp8", 128): 512,
                         ("decode-fp8", 256): 512}
LATENCY_BOUND_TILES = 8
# Under TRITON_INTERPRET=1 small blocks keep tests fast and exercise block boundaries.
_INTERPRETER_CONFIG = {"decode": (16, 16, 1, 1, 1, 32), "prefill": (32, 16, 1, 1, 1, 32)}
_INTERPRETER_CTAS = 3


# a batch whose mean KV length reaches this takes the "-long" configurations (select_config's only use of the
# lengths: runner.BatchAttention keeps its last choice while the rest of its key repeats)
LONG_DECODE_KV = 16384


def select_config(mode: str, head_dim: int, group_size: int, on_cuda: bool, kv_bytes: int = 2,
                  mean_kv: float = 0.0, page_size: int = 16, sm90: bool = False) -> KernelConfig:
    """Pick the kernel configuration for ``mode`` ("decode" or "prefill"); kv_bytes 1: an fp8 cache;
    mean_kv: the batch's mean KV length (long decode contexts have their own entry); page_size 1 (a
    token-granular cache) has its own entries where one is tuned; sm90: the plan runs the Gluon prefill kernel
    (its own entry where its tiles differ from the Triton kernel's)."""
    name = mode
    if on_cuda and sm90 and (f"{mode}-sm90", head_dim) in CUDA_CONFIGS:
        return _config(mode, f"{mode}-sm90", head_dim, group_size, on_cuda)
    if on_cuda:
        if kv_bytes == 1 and (f"{mode}-fp8", head_dim) in CUDA_CONFIGS:
            name = f"{mode}-fp8"
        if mean_kv >= LONG_DECODE_KV and (f"{name}-long", head_dim) in CUDA_CONFIGS:
            name = f"{name}-long"
        if page_size == 1 and (f"{name}-page1", head_dim) in CUDA_CONFIGS:
            name = f"{name}-page1"
    return _config(mode, name, head_dim, group_size, on_cuda)


@functools.lru_cache(maxsize=256)
def _config(mode: str, name: str, head_dim: int, group_size: int, on_cuda: bool) -> KernelConfig:
    if on_cuda:
        block_m, block_n, warps, stages, ctas, item_cost, *rest = CUDA_CONFIGS[(name, head_dim)]
    else:
        block_m, block_n, warps, stages, ctas, item_cost, *rest = _INTERPRETER_CONFIG[mode]
    if mode == "decode":
        block_m = max(block_m, min(triton.next_power_of_2(group_size), 64))
    return KernelConfig(block_m, block_n, warps, stages, ctas, min(group_size, block_m), item_cost,
                        small_item_cost=SMALL_BATCH_ITEM_COST.get((name, head_dim)) if on_cuda else None,
                        maxnreg=(rest[0] or None) if rest and on_cuda else None)


@dataclasses.dataclass
class WorkPlan:
    """Host side of a plan: what ``run()`` launches over."""

    work: np.ndarray  # [num_items, WORK_FIELDS] int32, longest first
    splits: np.ndarray  # [num_split_tiles, SPLIT_FIELDS] int32: first partial row, chunks
    partial_rows: int  # rows of tmp_o / tmp_lse in use
    chunk_len: int  # KV chunk length chosen (>= the longest range: no split)


def _exclusive_cumsum(x: np.ndarray) -> np.ndarray:
    out = np.zeros_like(x)
    np.cumsum(x[:-1], out=out[1:])
    return out


def _segment_index(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For counts [c0, c1, ...]: (owner of each element, index within its owner)."""
    owner = np.repeat(np.arange(len(counts)), counts)
    within = np.arange(len(owner)) - np.repeat(_exclusive_cumsum(counts), counts)
    return owner, within


def segment_ranges(indptr: np.ndarray, sel: np.ndarray) -> np.ndarray:
    """The positions indptr[b] .. indptr[b + 1] - 1 of every selected b (a bool mask), in order, int64."""
    starts = np.asarray(indptr[:-1], dtype=np.int64)[sel]
    owner, within = _segment_index(np.diff(indptr)[sel])
    return starts[owner] + within


def plan_work(
    qo_indptr: np.ndarray,
    kv_lens: np.ndarray,
    kv_base: np.ndarray,
    *,
    causal: bool,
    window_left: int,
    config: KernelConfig,
    tasks_per_item: int,
    num_ctas: int,
    max_partial_rows: int,
    kv_ranges=None,
    one_query: bool | None = None,
    total_kv: int | None = None,
) -> WorkPlan:
    """Build the work list.

    qo_indptr: [batch + 1] int64, query rows of each request.
    kv_lens:   [batch] int64, KV tokens of each request.
    kv_base:   [batch] int64, where each request's KV starts (page-list offset or token).
    Causal masking is bottom-right aligned: query i of a request with qo_len queries
    and kv_len keys sees keys j <= i + kv_len - qo_len; a window keeps
    j >= i + kv_len - qo_len - window_left.
    kv_ranges: optional ``f(q_first, q_last, kv_len) -> [(lo, hi), ...]`` over arrays (one entry per
    query tile: the KV positions of its first and last query, its request's kv_len) giving the KV
    intervals the tile can see (a variant's mask, e.g. sinks + window); only those are planned,
    as chunks of the tile that merge like split-KV chunks.
    one_query: whether every request has exactly one query (None: found from qo_indptr; the wrappers
    pass what they know or found, so the lengths are not diffed twice). total_kv: kv_lens.sum(), if the
    caller has it (the decode planner's cost model reads it).
    """
    T = config.tokens_per_tile
    qo_lens = None
    if one_query is None:
        qo_lens = np.diff(qo_indptr)
        one_query = bool(qo_lens.size and qo_lens.min() == 1 and qo_lens.max() == 1)
    decode = one_query and len(kv_lens) > 0
    if decode and kv_ranges is None:  # the common decode step, in few NumPy calls
        return _plan_decode(qo_indptr, kv_lens, kv_base, config, tasks_per_item, num_ctas, max_partial_rows,
                            total_kv, window_left)
    if qo_lens is None:
        qo_lens = np.diff(qo_indptr)
    if decode:  # one one-token tile per request
        tile_req = np.arange(len(qo_lens))
        kv_len_t = kv_lens
        tq0 = np.zeros_like(qo_lens)
        tlen = qo_lens
        diag = kv_lens - 1
    else:
        n_tiles = -(-qo_lens // T)
        tile_req, tile_idx = _segment_index(n_tiles)
        kv_len_t = kv_lens[tile_req]
        tq0 = tile_idx * T
        tlen = np.minimum(T, qo_lens[tile_req] - tq0)
        diag = tq0 + kv_len_t - qo_lens[tile_req]
    hi = np.clip(diag + tlen, 0, kv_len_t) if causal else kv_len_t
    lo = np.clip(diag - window_left, 0, kv_len_t) if window_left >= 0 else np.zeros_like(hi)
    lo = np.minimum(lo, hi)
    n_t = len(tlen)
    # KV segments: one per tile, or the visible intervals a variant states (at least one per tile,
    # possibly empty, so every tile has an item that writes its output)
    if kv_ranges is None:
        seg_tile, seg_lo, seg_hi = np.arange(n_t), lo, hi
    else:
        parts = []
        for a, b in kv_ranges(diag, diag + tlen - 1, kv_len_t):
            a2 = np.maximum(np.broadcast_to(np.asarray(a, dtype=np.int64), (n_t,)), lo)
            b2 = np.minimum(np.broadcast_to(np.asarray(b, dtype=np.int64), (n_t,)), hi)
            nz = np.nonzero(b2 > a2)[0]
            parts.append((nz, a2[nz], b2[nz]))
        has = np.zeros(n_t, dtype=bool)
        for nz, _, _ in parts:
            has[nz] = True
        none = np.nonzero(~has)[0]
        parts.append((none, lo[none], lo[none]))
        seg_tile = np.concatenate([p[0] for p in parts])
        order = np.argsort(seg_tile, kind="stable")
        seg_tile = seg_tile[order]
        seg_lo = np.concatenate([p[1] for p in parts])[order]
        seg_hi = np.concatenate([p[2] for p in parts])[order]
    rng = seg_hi - seg_lo

    chunk_len = _choose_chunk_len(rng, tlen[seg_tile], config, tasks_per_item, num_ctas, max_partial_rows)
    if kv_ranges is None and (n_t == 0 or chunk_len >= int(rng.max())):
        # nothing split (most batches): one item per tile, built directly (what follows, without its
        # segment bookkeeping: a fifth of plan()'s time for 256 decode requests)
        work = np.empty((n_t, WORK_FIELDS), dtype=np.int32)
        work[:, 0] = qo_indptr[:-1][tile_req] + tq0
        work[:, 1] = tlen
        work[:, 2] = kv_base[tile_req]
        work[:, 3] = lo
        work[:, 4] = hi
        work[:, 5] = diag
        work[:, 6:8] = -1
        work[:, 8] = tile_req
        work = work[_item_order(hi - lo, tile_req, decode)]
        return WorkPlan(work, np.empty((0, SPLIT_FIELDS), dtype=np.int32), 0, int(chunk_len))
    seg_chunks = np.maximum(1, -(-rng // chunk_len))
    item_seg, chunk = _segment_index(seg_chunks)
    item_tile = seg_tile[item_seg]
    kv_s = seg_lo[item_seg] + chunk * chunk_len
    kv_e = np.minimum(kv_s + chunk_len, seg_hi[item_seg])
    n_chunks = np.bincount(seg_tile, weights=seg_chunks, minlength=n_t).astype(np.int64)
    _, within = _segment_index(n_chunks)  # items are grouped by tile: index of each within its tile
    split = n_chunks > 1
    rows_t = np.where(split, tlen * n_chunks, 0)
    if kv_ranges is not None and int(rows_t.sum()) > max_partial_rows:
        # tiles with several intervals must merge partial results: without the workspace for
        # them, plan each tile's whole range (the kernel's mask keeps the answer the same)
        return plan_work(qo_indptr, kv_lens, kv_base, causal=causal, window_left=window_left, config=config,
                         tasks_per_item=tasks_per_item, num_ctas=num_ctas, max_partial_rows=max_partial_rows)
    base_t = _exclusive_cumsum(rows_t)
    partial = np.where(split[item_tile], base_t[item_tile] + within * tlen[item_tile], -1)
    q_start_t = qo_indptr[:-1][tile_req] + tq0

    work = np.zeros((len(item_tile), WORK_FIELDS), dtype=np.int32)
    work[:, 0] = q_start_t[item_tile]
    work[:, 1] = tlen[item_tile]
    work[:, 2] = kv_base[tile_req][item_tile]
    work[:, 3] = kv_s
    work[:, 4] = kv_e
    work[:, 5] = diag[item_tile]
    work[:, 6] = partial
    split_tiles = np.nonzero(split)[0]
    split_id = np.full(len(split), -1, dtype=np.int64)
    split_id[split_tiles] = np.arange(len(split_tiles))
    work[:, 7] = split_id[item_tile]
    work[:, 8] = tile_req[item_tile]
    work = work[_item_order(kv_e - kv_s, tile_req[item_tile], decode)]

    splits = np.empty((len(split_tiles), SPLIT_FIELDS), dtype=np.int32)
    splits[:, 0] = base_t[split_tiles]
    splits[:, 1] = n_chunks[split_tiles]
    return WorkPlan(work, splits, int(rows_t.sum()), int(chunk_len))


def _plan_decode(qo_indptr, kv_lens, kv_base, config, tasks_per_item, num_ctas, max_partial_rows,
                 total_kv=None, window_left=-1) -> WorkPlan:
    """plan_work for a decode batch without a variant (one query per request): the same work list as the
    general path (tests/attention/test_plan.py compares them), built with a few whole-array NumPy calls (a few
    requests: plain Python, cheaper than NumPy calls on tiny arrays); plan() runs once per decode step. A window
    (window_left >= 0) plans each request's last window_left + 1 tokens (its query's window)."""
    n = len(kv_lens)
    if n <= SMALL_BATCH:
        return _plan_decode_small(qo_indptr, kv_lens, kv_base, config, tasks_per_item, num_ctas, max_partial_rows,
                                  window_left)
    # the tokens each request's query sees (all, or its window's last window_left + 1) and where they start
    span, lo = kv_lens, None
    if window_left >= 0:
        span = np.minimum(kv_lens, window_left + 1)
        lo = kv_lens - span
        total_kv = None  # (the cost model sums the spans)
    neg = -span
    order = np.argsort(neg, kind="stable")  # longest first (the work list's order when nothing is split)
    neg_sorted = neg[order]
    L = _choose_chunk_len(span, None, config, tasks_per_item, num_ctas, max_partial_rows, neg_sorted, total_kv)
    if L >= -int(neg_sorted[0]):  # nothing split (most steps)
        kv_sorted = kv_lens[order] if lo is not None else -neg_sorted
        work = _unsplit_decode_rows(n)  # (the constant fields filled: q_len 1, kv_start 0, no partial / split)
        work[:, 0] = qo_indptr[:-1][order]
        work[:, 2] = kv_base[order]
        if lo is not None:
            work[:, 3] = lo[order]
        work[:, 4] = kv_sorted
        work[:, 5] = kv_sorted - 1
        work[:, 8] = order
        return WorkPlan(work, np.empty((0, SPLIT_FIELDS), dtype=np.int32), 0, int(L))
    n_chunks = np.maximum(1, -(-span // L))
    req, chunk = _segment_index(n_chunks)
    kv_s = chunk * L if lo is None else lo[req] + chunk * L
    kv_e = np.minimum(kv_s + L, kv_lens[req])
    split = n_chunks > 1
    rows = np.where(split, n_chunks, 0)  # one partial row per chunk of a split request
    base = _exclusive_cumsum(rows)
    split_id = np.cumsum(split) - 1
    order = np.argsort(kv_s - kv_e, kind="stable")
    req, chunk, kv_s, kv_e = req[order], chunk[order], kv_s[order], kv_e[order]
    split_r = split[req]
    work = np.empty((len(req), WORK_FIELDS), dtype=np.int32)
    work[:, 0] = qo_indptr[:-1][req]
    work[:, 1] = 1
    work[:, 2] = kv_base[req]
    work[:, 3] = kv_s
    work[:, 4] = kv_e
    work[:, 5] = kv_lens[req] - 1
    work[:, 6] = np.where(split_r, base[req] + chunk, -1)
    work[:, 7] = np.where(split_r, split_id[req], -1)
    work[:, 8] = req
    split_reqs = np.flatnonzero(split)
    splits = np.empty((len(split_reqs), SPLIT_FIELDS), dtype=np.int32)
    splits[:, 0] = base[split_reqs]
    splits[:, 1] = n_chunks[split_reqs]
    return WorkPlan(work, splits, int(rows.sum()), int(L))


_UNSPLIT_TEMPLATE = [np.empty((0, WORK_FIELDS), dtype=np.int32)]


def _unsplit_decode_rows(n: int) -> np.ndarray:
    """A fresh [n, WORK_FIELDS] work list with the fields that every unsplit decode item shares already written
    (q_len 1, kv_start 0, partial row and split id -1): one copy of a kept template instead of three column
    writes per plan."""
    t = _UNSPLIT_TEMPLATE[0]
    if t.shape[0] < n:
        t = np.zeros((max(n, 2 * t.shape[0], 256), WORK_FIELDS), dtype=np.int32)
        t[:, 1] = 1
        t[:, 6:8] = -1
        _UNSPLIT_TEMPLATE[0] = t
    return t[:n].copy()


SMALL_BATCH = 8  # decode batches up to this size are planned in plain Python (_plan_decode_small)


def _plan_decode_small(qo_indptr, kv_lens, kv_base, config, tasks_per_item, num_ctas, max_partial_rows,
                       window_left=-1) -> WorkPlan:
    """_plan_decode for a few requests, in Python lists: the same work list, split table and chunk length
    (tests/attention/test_plan.py compares them)."""
    lens = kv_lens.tolist()
    # the tokens each request's query sees (_plan_decode's span) and where they start
    if window_left >= 0:
        spans = [min(n, window_left + 1) for n in lens]
        los = [n - t for n, t in zip(lens, spans)]
    else:
        los, spans = [0] * len(lens), lens
    q0 = qo_indptr[:-1].tolist()
    base = kv_base.tolist()
    L = _choose_chunk_len_small(spans, config, tasks_per_item, num_ctas, max_partial_rows)
    items, splits, rows = [], [], 0
    for r, (n, a) in enumerate(zip(lens, los)):
        chunks = max(1, -(-(n - a) // L))
        q, b = q0[r], base[r]
        if chunks > 1:  # chunks of L tokens, then the rest (a request of one long prompt: tens of them)
            sid, first = len(splits), rows
            splits.append((rows, chunks))
            rows += chunks
            items += [(q, 1, b, s, s + L, n - 1, first + c, sid, r)
                      for c, s in enumerate(range(a, a + (chunks - 1) * L, L))]
            items.append((q, 1, b, a + (chunks - 1) * L, n, n - 1, first + chunks - 1, sid, r))
        else:
            items.append((q, 1, b, a, n, n - 1, -1, -1, r))
    if len(lens) > 1:  # (one request's items are longest first already: whole chunks, then the rest)
        items.sort(key=lambda it: it[3] - it[4])  # longest first, stable (Python's sort is)
    # (flattened: ~3 us faster than np.array over a list of tuples at 28 items)
    work = np.fromiter(itertools.chain.from_iterable(items), dtype=np.int32,
                       count=len(items) * WORK_FIELDS).reshape(-1, WORK_FIELDS)
    split_arr = np.array(splits, dtype=np.int32).reshape(-1, SPLIT_FIELDS)
    return WorkPlan(work, split_arr, rows, int(L))


def _choose_chunk_len_small(lens, config, tasks_per_item, num_ctas, max_partial_rows):
    """_choose_chunk_len for a list of a few decode lengths (one query each), same arithmetic."""
    bn = config.block_n
    longest = max(lens)
    no_split = max(bn, -(-longest // bn) * bn)
    candidates, items, rows = [], [], []
    c = _shortest_chunk(config, len(lens))
    while c < no_split:
        chunks = [max(1, -(-x // c)) for x in lens]
        candidates.append(c)
        items.append(float(sum(chunks)))
        rows.append(float(sum(k for k in chunks if k > 1)))
        c *= 2
    return _best_chunk_len(candidates + [no_split], items + [len(lens)], rows + [0], float(sum(lens)), longest,
                           config, tasks_per_item, num_ctas, max_partial_rows)


def _latency_bound(config, n_tiles) -> bool:
    """A batch of at most LATENCY_BOUND_TILES tiles under a config with a small_item_cost (CUDA decode)."""
    return config.small_item_cost is not None and n_tiles <= LATENCY_BOUND_TILES


def _shortest_chunk(config, n_tiles) -> int:
    """The shortest chunk length the planner considers: 4 KV blocks, or 2 for a latency-bound batch, where more
    programs pay since session 15's one-pass merge (scripts/decode_latency_probe.py, H200: 1 x 1024 in 128-token
    chunks 11.5 us, in the 256-token chunks that 4 blocks allowed 12.8)."""
    return (2 if _latency_bound(config, n_tiles) else 4) * config.block_n


def _item_cost(config, n_tiles) -> int:
    """The cost model's fixed cost per work item for a batch of n_tiles query tiles."""
    return config.small_item_cost if _latency_bound(config, n_tiles) else config.item_cost


def _best_chunk_len(candidates, items, rows, total_kv, longest, config, tasks_per_item, num_ctas,
                    max_partial_rows):
    """The candidate chunk length with the smallest makespan bound (the first on a tie), given each one's
    work items and partial rows; candidates whose rows exceed the workspace are out (the last, no split,
    has none)."""
    best, best_est = candidates[-1], None
    item_cost = _item_cost(config, items[-1])  # the last candidate (no split) has one item per tile
    # A partial row of one tile token: heads_per_prog rows of (D + 1) fp32 written and
    # read once more by the merge, about 2 * heads KV tokens' worth of bytes.
    row_cost = config.partial_cost * config.heads_per_prog
    for c, it, r in zip(candidates, items, rows):
        est = (tasks_per_item * (total_kv + it * item_cost + r * row_cost) / num_ctas + min(c, longest)
               + item_cost)
        if r <= max_partial_rows and (best_est is None or est < best_est):
            best, best_est = c, est
    return int(best)


# KV bytes that the programs of a long prefill may read at once and still find in L2 (H100 / H200: 50 MB)
PREFILL_L2_BYTES = 32 << 20


def prefill_band(all_heads_kv_bytes: int, num_ctas: int, n_hsplit: int, force: bool = False) -> int:
    """The Gluon prefill kernel's task band (prefill_sm90._ws_task; 0: item by item). Its tasks go item by
    item, every KV head of an item together, so the programs running at once read the longest items' KV of
    all heads (1 x 16384, 8 KV heads, head_dim 128: 64 MB, more than L2). In bands of num_ctas / 2 items, KV
    head by KV head, a round of num_ctas tasks reads about two heads' KV; the snake order stays balanced
    (1 x 16384: the busiest program 1.005x the mean, 1 x 8192 1.03x; scripts: notes.md session 13).
    all_heads_kv_bytes: the longest item's KV over all heads."""
    if not force and all_heads_kv_bytes <= PREFILL_L2_BYTES:
        return 0
    return max(1, num_ctas // (2 * n_hsplit))


def _item_order(length: np.ndarray, req: np.ndarray, decode: bool) -> np.ndarray:
    """The order of the work list: longest first (greedy longest-processing-time scheduling).
    Prefill keeps the items of one request together within bands of similar length (band width
    1/8 of the longest item; bands longest first, requests in order, items longest first): the
    programs running at the same time then read the same request's KV, which stays in L2 across
    its query tiles. Sorted by length alone, a batch of equal requests interleaves them (tile t of
    every request, then tile t - 1, ...) and the KV of all of them is in use at once
    (33 x (512 onto 4096): 620 MB; measured on the H200 2844 us grouped vs 3267 interleaved).
    Grouping without bands breaks the longest-first order the static schedules rely on
    (8 x 1024: 320 us vs 234). ``req`` is non-decreasing (items are built request by request)."""
    if decode or len(req) == 0:
        return np.argsort(-length, kind="stable")
    band = length // max(1, -(-int(length.max()) // 8))
    return np.lexsort((-length, req, -band))


def _choose_chunk_len(rng, tlen, config, tasks_per_item, num_ctas, max_partial_rows, neg_sorted=None, total=None):
    """The chunk length that minimises the makespan bound (see module docstring); tlen: tokens of
    each tile (None: one each, decode); neg_sorted: -rng sorted ascending, if the caller has it (a tighter
    filter of the candidates, one call for all of them, and the longest range); total: rng.sum(), if the
    caller has it."""
    bn = config.block_n
    if neg_sorted is not None:
        longest = -int(neg_sorted[0]) if len(neg_sorted) else 0
    else:
        longest = int(rng.max()) if len(rng) else 0
    no_split = max(bn, -(-longest // bn) * bn)
    shortest = _shortest_chunk(config, len(rng))
    candidates = [shortest << k for k in range(((no_split - 1) // shortest).bit_length())] + [no_split]
    if len(candidates) == 1:
        return no_split
    # Candidates that cannot win are dropped before the search over [candidates, tiles] (a large decode
    # batch usually keeps none): splitting at L adds at least max(sum / L - n, ceil(longest / L) - 1)
    # items and saves at most longest - L of the bound, so when that cannot pay (by more than a token,
    # against rounding) L's bound exceeds no_split's and the full search would not pick it either.
    total_kv = float(rng.sum() if total is None else total)
    n = len(rng)
    per_item = tasks_per_item * _item_cost(config, n) / num_ctas
    candidates = [c for c in candidates[:-1] if per_item * max(total_kv / c - n, -(-longest // c) - 1)
                  < longest - c + 1]
    if candidates and neg_sorted is not None:
        # every range longer than L is at least one more item: with the sorted lengths, those counts for the
        # candidates left, in one call (a wide batch, e.g. 256 requests of 128..8192, keeps none; the two
        # bounds above are Python arithmetic, so most plans skip this call)
        longer = np.searchsorted(neg_sorted, [-c for c in candidates]).tolist()
        candidates = [c for c, k in zip(candidates, longer) if per_item * k < longest - c + 1]
    candidates.append(no_split)
    if len(candidates) == 1:
        return no_split
    # the survivors' chunk counts over [candidates, tiles] at once, in float64 (exact: lengths < 2^53, and a
    # true division of a multiple of L is an integer); a tile with no KV is still one item; no_split is
    # one item per tile and no partial rows
    ch = np.ceil(rng / np.array(candidates[:-1], dtype=np.float64)[:, None])
    nch = ch.sum(axis=1)
    items = (nch + (n - np.count_nonzero(rng))).tolist() + [n]
    if tlen is None:
        rows = (nch - (ch == 1.0).sum(axis=1)).tolist() + [0]
    else:
        rows = (np.where(ch > 1, ch, 0.0) @ tlen.astype(np.float64)).tolist() + [0]
    return _best_chunk_len(candidates, items, rows, total_kv, longest, config, tasks_per_item, num_ctas,
                           max_partial_rows)
