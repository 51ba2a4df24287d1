"""Attention benchmark: pagoda vs FlashInfer, FlexAttention and SDPA on one GPU, one run.

    python -m pagoda.bench.attention [--quick] [--json FILE]

Llama-3.1-8B attention shape by default (32 query heads, 8 KV heads, head_dim 128, bf16,
page_size 16, pages in random order). Decode reports effective KV bandwidth (bytes of K
and V read once / time); prefill reports TFLOP/s over the visible (causal) pairs.
Peers run only when importable; ratios are pagoda's speed over the peer's (> 1: faster).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings

import numpy as np
import torch
import triton
import triton.language as tl

import pagoda
from pagoda.ops.kernels.pdl import pdl_enter

DECODE_CASES = [
    ("1x32768", [32768]), ("16x4096", [4096] * 16), ("64x2048", [2048] * 64), ("128x1024", [1024] * 128),
    ("256x512", [512] * 256), ("32x8192", [8192] * 32), ("skewed 32768+63x512", [32768] + [512] * 63),
    ("64 random 128..8192", None),
]
PREFILL_CASES = [  # (name, qo_lens, kv_lens)
    ("1x8192", [8192], [8192]), ("8x1024", [1024] * 8, [1024] * 8),
    ("8x(512 onto 4096)", [512] * 8, [4608] * 8), ("1x16384", [16384], [16384]),
]


# How bench() empties L2 before each timed call: "read" (default) sums a 512 MB buffer that nothing writes, so
# the L2 ends full of clean lines; "write" is triton.testing.do_bench's own flush (zeroing 256 MB), which leaves
# the L2 full of dirty lines, and the timed kernel's first misses write them back: ~50-60 MB more DRAM traffic,
# ~8 us at 1 x 32768 decode on the H200, as much as a copy of the same bytes pays (scripts/flush_probe.py,
# notes.md session 15). PAGODA_BENCH_FLUSH=write reproduces the numbers of sessions 1-14.
FLUSH = os.environ.get("PAGODA_BENCH_FLUSH", "read")
_flush_buf: list = []


def flush_l2() -> None:
    """Empty L2 by a read of a 512 MB buffer that nothing writes (FLUSH "read")."""
    if not _flush_buf:
        _flush_buf.append(torch.randn(128 << 20, device="cuda"))  # 512 MB, ~10x the L2 of an H100 / H200
    _flush_buf[0].sum()


def bench(fn, rep_ms=200):
    """Median time of fn (seconds) between CUDA events, L2 emptied before each call (FLUSH); warm-up and
    repetitions as triton.testing.do_bench (50 ms, rep_ms)."""
    if FLUSH == "write":
        from triton.testing import do_bench

        return do_bench(fn, warmup=50, rep=rep_ms, return_mode="median") * 1e-3
    if FLUSH != "read":
        raise ValueError(f"PAGODA_BENCH_FLUSH must be 'read' or 'write', got {FLUSH!r}")
    fn()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(5):
        flush_l2()
        fn()
    e1.record()
    torch.cuda.synchronize()
    per_call_ms = max(e0.elapsed_time(e1) / 5, 1e-3)
    for _ in range(max(1, int(50 / per_call_ms))):
        fn()
    n = max(1, int(rep_ms / per_call_ms))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        flush_l2()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return float(np.median([a.elapsed_time(b) for a, b in zip(starts, ends)])) * 1e-3


def host_times_us(fn, n: int, sync: bool = True, warmup: int = 0) -> np.ndarray:
    """Host times of n calls of fn (us) after ``warmup`` untimed ones. sync: the GPU stream is drained before each
    call (outside the timing), as in a serving step whose previous plan's copy finished long ago; without it the
    calls run back to back (each plan() then may wait for the previous one's host-to-device copy)."""
    for _ in range(warmup):
        fn()
    t = np.empty(n)
    drain = sync and torch.cuda.is_available()
    for i in range(n):
        if drain:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        t[i] = time.perf_counter() - t0
    return t * 1e6


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth (bytes read + written per second) of a 1 GB copy: the ceiling that decode
    bandwidths are quoted against."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    bw = 2 * a.numel() / bench(lambda: b.copy_(a))
    _flush_buf.clear()  # (a caller that sizes a KV pool from free memory next, as bench.engine does, gets it back)
    return bw


def same_bytes_copy_us(kv_bytes: int) -> float:
    """gpu_time (us) of a copy that moves kv_bytes (kv_bytes / 2 read, as many written): what the harness gives
    an op that moves a decode case's bytes at the copy rate, the replay's launch included. The copy is an
    elementwise kernel (a multiply by 1 over float32 views), not torch's copy_: captured in a graph, copy_ is a
    memcpy node, which ran at ~2.7 TB/s at most sizes from 67 to 600 MB each way (at the copy rate only at some:
    512 MB, 1 GB, the bench's smaller power-of-two cases; its 1 GB cases' 537-556 MB at 2.7: sessions 26-33) where
    the kernel and an eager memcpy run at 3.9-4.3 TB/s (H200, scripts/copy_probe.py, notes.md session 34)."""
    n = kv_bytes // 2 // 16 * 4  # float32 elements (the bytes rounded down to 16)
    a = torch.randn(n, device="cuda")
    b = torch.empty_like(a)
    return gpu_time(lambda: torch.mul(a, 1.0, out=b), "copy") * 1e6


EAGER_FALLBACKS: list[str] = []  # what gpu_time could not capture (timed eagerly instead)


def capture_graph(fn) -> torch.cuda.CUDAGraph:
    """fn captured in a CUDA graph, after two warm-up calls on a side stream (as torch's docs do it)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def gpu_time(fn, what: str = "", rep_ms=200):
    """Median GPU time of fn (seconds): fn is captured once in a CUDA graph and the graph replayed,
    with L2 emptied before each replay (bench). The host cost of launching fn is not in it:
    eager timings of a ~60 us kernel moved by up to 1.6x between identical runs on the H200 (the
    Python launch path of a run() is 30-50 us, so a replay sometimes waited on the host). Every
    library is timed the same way; a callable that cannot be captured is timed eagerly and named
    in EAGER_FALLBACKS."""
    try:
        g = capture_graph(fn)
    except Exception as e:  # noqa: BLE001 - a peer whose call is not capturable
        torch.cuda.synchronize()
        EAGER_FALLBACKS.append(f"{what}: {type(e).__name__}")
        print(f"# {what}: not capturable ({type(e).__name__}: {e}); timed eagerly")
        return bench(fn, rep_ms)
    return bench(g.replay, rep_ms)


def in_graph_time(fn, what: str = "", n: int = 16, reps: int = 21, flush=None) -> float | None:
    """What fn costs inside a larger CUDA graph, as a serving step's graph holds it (seconds): a graph of n
    rounds of (L2 flush, fn) against a graph of the n flushes alone, replayed alternately (reps each, after a
    flush), the difference of the medians over n. gpu_time's single-call graph pays the replay's launch (~3.8 us
    between the events for an empty kernel on the H200, session 32) once per call, which a step's graph of
    hundreds of kernels pays once per step; kernel_time leaves out the gap between one kernel and the next, which
    this keeps. flush: what empties L2 in both graphs (flush_l2). None when fn cannot be captured."""
    flush = flush or flush_l2
    try:
        calls = capture_graph(lambda: [(flush(), fn()) for _ in range(n)])
        flushes = capture_graph(lambda: [flush() for _ in range(n)])
    except Exception:  # noqa: BLE001 - gpu_time already named it an eager fallback
        torch.cuda.synchronize()
        return None
    times = ([], [])  # (calls, flushes), ms
    for r in range(reps + 2):
        for g, ts in zip((calls, flushes), times):
            flush_l2()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            g.replay()
            e1.record()
            torch.cuda.synchronize()
            if r >= 2:  # (two warm-up rounds)
                ts.append(e0.elapsed_time(e1))
    return (float(np.median(times[0])) - float(np.median(times[1]))) / n * 1e-3


@triton.jit
def pdl_read_kernel(X, OUT, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    """Each program sums its ITERS blocks of X and lets the kernel behind it launch at its start (pdl_enter; its
    own wait returns at once when it is not launched with PDL): step_front's short kernel, in the place of the
    engine's RoPE + append kernel in front of its decode attention, and scripts/in_graph_probe.py's L2 flush."""
    pdl_enter(True)
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.float32)
    for i in tl.range(ITERS):
        acc += tl.load(X + (pid.to(tl.int64) * ITERS + i) * BLOCK + tl.arange(0, BLOCK))
    tl.store(OUT + pid, tl.sum(acc, 0))


def step_front():
    """What stands in front of a decode in a serving step's graph (step_time): the L2 flush, then a short kernel
    (~3 us, one program an SM reading 4 MB) that lets its dependents launch at its start, as pagoda's engine's
    RoPE + append kernel does for the decode attention behind it."""
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    x = torch.randn(sms * 8 * 4096, device="cuda")
    out = torch.empty(sms, device="cuda")

    def front():
        flush_l2()
        pdl_read_kernel[(sms,)](x, out, ITERS=8, BLOCK=4096, num_warps=4)
    return front


def step_time(fn, what: str = "", n: int = 16, reps: int = 21) -> float | None:
    """What fn costs in a serving step's graph, launched as a serving engine launches a decode (seconds):
    in_graph_time with step_front in front of each call (scripts/in_graph_probe.py --pdl-flush, notes.md session
    33). fn should launch with PDL (enable_pdl=True): its launch and its prologue then overlap the kernel in front,
    which a launch without PDL waits for. That kernel reads little, so what fn moves before its PDL wait has the
    DRAM to itself: a favourable bound on an engine's step, whose kernel in front may stream weights."""
    return in_graph_time(fn, what, n, reps, flush=step_front())


def _call_spans(events, per_flush: int, per_call: int, calls: int) -> list[float]:
    """Each call's device span from the profiler's device records of ``calls`` rounds of (an L2 flush, the
    call): ``events`` the (start, end, name) of every record of the run (any order), ``per_flush`` / ``per_call``
    the records one flush / one call leaves. A call's span runs from its first record's start to its last one's
    end (gaps between its own kernels count; the launch before its first kernel does not). Raises
    RuntimeError when the records do not fall into that pattern (a call that launched a different number of
    kernels), rather than timing the wrong ones."""
    ev = sorted(events)
    step = per_flush + per_call
    if per_call < 1 or len(ev) != calls * step:
        raise RuntimeError(f"profiler records: {len(ev)} for {calls} rounds of {per_flush} flush + {per_call} call "
                           f"records")
    spans = []
    for i in range(calls):
        mine = ev[i * step + per_flush:(i + 1) * step]
        spans.append(max(e[1] for e in mine) - mine[0][0])
    return spans


def kernel_time(fn, what: str = "", calls: int = 40) -> float | None:
    """Median device span of fn (seconds) from CUPTI's records (torch.profiler): fn captured in a CUDA graph
    (as gpu_time), each replay after an L2 flush, timed from its first kernel's start to its last kernel's end.
    gpu_time's events also hold the launch of the replay (an empty graph's replay is ~4.5 us between the events
    on the H200, notes.md session 13), which a 1 GB copy amortizes and a 40 us decode does not: this is the
    kernels' own time, the figure to set against the copy rate (FlashInfer's own benchmarks prefer it:
    flashinfer.testing.bench_gpu_time(enable_cupti=True)). None when fn cannot be captured or the profiler records
    nothing."""
    from torch.profiler import ProfilerActivity, profile

    try:
        g = capture_graph(fn)
    except Exception:  # noqa: BLE001 - gpu_time already named it an eager fallback
        torch.cuda.synchronize()
        return None

    def records(run, n):
        torch.cuda.synchronize()
        with warnings.catch_warnings():  # ("Profiler clears events at the end of each cycle": one cycle here)
            warnings.simplefilter("ignore", UserWarning)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(n):
                    run()
                torch.cuda.synchronize()
            evs = prof.events()
        return [(e.time_range.start, e.time_range.end, e.name) for e in evs
                if e.device_type == torch.autograd.DeviceType.CUDA]

    flush_l2()
    per_flush = len(records(flush_l2, 1))
    per_call = len(records(g.replay, 1))  # (0 where the profiler does not see into graphs: _call_spans refuses)

    def rounds():
        flush_l2()
        g.replay()

    try:
        spans = _call_spans(records(rounds, calls), per_flush, per_call, calls)
    except RuntimeError as e:
        print(f"# {what}: kernel time not taken ({e})")
        return None
    return float(np.median(spans)) * 1e-6  # (the profiler's times are in us)


class PagedSetup:
    def __init__(self, kv_lens, hk, d, page_size, dtype, device="cuda", seed=0, kv_dtype=None):
        g = torch.Generator().manual_seed(seed)
        pages = [math.ceil(n / page_size) for n in kv_lens]
        total = sum(pages)
        self.indptr = torch.tensor([0] + np.cumsum(pages).tolist(), dtype=torch.int32)
        self.indices = torch.randperm(total, generator=g).to(torch.int32)
        self.last = torch.tensor([(n - 1) % page_size + 1 for n in kv_lens], dtype=torch.int32)
        self.cache = torch.randn(total, 2, page_size, hk, d, dtype=dtype, device=device)
        if kv_dtype is not None and kv_dtype != dtype:  # fp8: values of randn fit e4m3 / e5m2 with scale 1
            self.cache = self.cache.to(kv_dtype)
        self.kv_lens = kv_lens
        self.kv_bytes = sum(kv_lens) * hk * d * 2 * self.cache.element_size()


def flashinfer_or_none():
    try:
        import flashinfer  # noqa: F401

        return flashinfer
    except Exception as e:  # noqa: BLE001 - any import failure means "peer absent"
        print(f"# FlashInfer not importable: {type(e).__name__}: {e}")
        return None


def _least(a, b):
    """The smaller of two optional times (None: not taken)."""
    return b if a is None else a if b is None else min(a, b)


def _put_us(row, key, seconds) -> None:
    if seconds is not None:
        row[key] = seconds * 1e6


def decode_row(name, kv_lens, hq, hk, d, ps, dtype, fi, ws, kernel_times=False, **kw):
    """kernel_times: also each library's kernel_time, and the graph time of a copy of the same bytes. kw: plan()
    arguments both libraries take (window_left, logits_soft_cap); kv_MB is then the bytes the window reads, and
    the dense peer (which has neither) is left out."""
    s = PagedSetup(kv_lens, hk, d, ps, dtype)
    b = len(kv_lens)
    q = torch.randn(b, hq, d, dtype=dtype, device="cuda")
    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(ws)
    # host cost of a steady-state plan(): the median of 100 after 3 warm-up plans, each after the stream drained, as
    # in a serving step (scripts/plan_time.py times it so too). Timed back to back, 20 plans, as up to session 27, the
    # median ran up to 2.8x plan_time.py's for the same case (the bench's process, 64 random: 398 us vs 143; s28)
    plan_us = float(np.median(host_times_us(
        lambda: w.plan(s.indptr, s.indices, s.last, hq, hk, d, ps, q_data_type=dtype, **kw), 100, warmup=3)))
    out = w.run(q, s.cache)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):  # host cost of an eager run() (the launch path; CUDA graphs remove it)
        w.run(q, s.cache, out=out)
    run_host_us = (time.perf_counter() - t0) / 20 * 1e6
    torch.cuda.synchronize()
    w_left = kw.get("window_left", -1)  # (a window reads each request's last window_left + 1 tokens)
    read_bytes = s.kv_bytes * sum(n if w_left < 0 else min(n, w_left + 1) for n in kv_lens) / sum(kv_lens)
    run = lambda: w.run(q, s.cache, out=out)  # noqa: E731
    row = {"case": name, "kind": "decode", "kv_MB": read_bytes / 1e6, "plan_us": plan_us, "run_host_us": run_host_us,
           "pagoda_us": gpu_time(run, "pagoda") * 1e6}
    if kernel_times:
        _put_us(row, "pagoda_kernel_us", kernel_time(run, "pagoda"))
        _put_us(row, "pagoda_in_graph_us", in_graph_time(run, "pagoda"))
        # as the engine launches it: with PDL, its first KV blocks before the PDL wait (the kernel in front writes
        # no KV here; the engine's writes only the new token's, which pdl_early_kv leaves to after the wait)
        _put_us(row, "pagoda_step_us", step_time(
            lambda: w.run(q, s.cache, out=out, enable_pdl=True, pdl_early_kv=True), "pagoda"))
        row["copy_same_bytes_us"] = same_bytes_copy_us(s.kv_bytes)
    if fi is not None:
        best = best_k = best_g = best_s = None
        for tc in (False, True):
            fw = fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tc)
            fw.plan(s.indptr.cuda(), s.indices.cuda(), s.last.cuda(), hq, hk, d, ps, q_data_type=dtype, **kw)
            ref = fw.run(q, s.cache)
            err = ((ref.float() - out.float()).norm() / ref.float().norm()).item()
            assert err < 2e-2, f"pagoda and FlashInfer disagree on {name}: {err}"
            fi_run = lambda: fw.run(q, s.cache)  # noqa: E731 B023 - (used in this iteration only)
            best = _least(best, gpu_time(fi_run, "flashinfer") * 1e6)
            if kernel_times:
                best_k = _least(best_k, kernel_time(fi_run, "flashinfer"))
                best_g = _least(best_g, in_graph_time(fi_run, "flashinfer"))
                best_s = _least(best_s, step_time(lambda: fw.run(q, s.cache, enable_pdl=True), "flashinfer"))
        row["flashinfer_us"] = best
        _put_us(row, "flashinfer_kernel_us", best_k)
        _put_us(row, "flashinfer_in_graph_us", best_g)
        _put_us(row, "flashinfer_step_us", best_s)
    if len(set(kv_lens)) == 1 and not kw:  # dense peers need equal lengths
        L = kv_lens[0]
        k = torch.randn(b, hk, L, d, dtype=dtype, device="cuda")
        v = torch.randn_like(k)
        q4 = q[:, :, None]
        row["sdpa_us"] = gpu_time(lambda: torch.nn.functional.scaled_dot_product_attention(
            q4, k, v, enable_gqa=True), "sdpa") * 1e6
    return row


def fp8_decode_row(name, kv_lens, hq, hk, d, ps, dtype, kv_dtype, fi, ws):
    """Decode over an fp8 cache: pagoda fp8 vs pagoda on the same lengths in dtype (KV tokens per
    second: the gain of moving half the bytes) and vs FlashInfer's fp8 decode."""
    s8 = PagedSetup(kv_lens, hk, d, ps, dtype, kv_dtype=kv_dtype)
    s16 = PagedSetup(kv_lens, hk, d, ps, dtype)
    b = len(kv_lens)
    q = torch.randn(b, hq, d, dtype=dtype, device="cuda")
    sc = dict(k_scale=0.5, v_scale=0.25)
    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(ws)
    w.plan(s8.indptr, s8.indices, s8.last, hq, hk, d, ps, q_data_type=dtype, kv_data_type=kv_dtype)
    out = w.run(q, s8.cache, **sc)
    row = {"case": name, "kind": "decode-fp8", "kv_MB": s8.kv_bytes / 1e6,
           "pagoda_us": gpu_time(lambda: w.run(q, s8.cache, out=out, **sc), "pagoda fp8") * 1e6}
    w16 = pagoda.BatchDecodeWithPagedKVCacheWrapper(ws)
    w16.plan(s16.indptr, s16.indices, s16.last, hq, hk, d, ps, q_data_type=dtype)
    out16 = w16.run(q, s16.cache)
    row["pagoda_16bit_us"] = gpu_time(lambda: w16.run(q, s16.cache, out=out16), "pagoda") * 1e6
    if fi is not None:
        best = None
        # FlashInfer 0.6.0's tensor-core (sm90 prefill) path does not compile for bf16 queries over an
        # e4m3 cache ("No eligible GMMA operator", measured on the H100), so only its decode kernel runs.
        for tc in (False,):
            try:
                fw = fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tc)
                fw.plan(s8.indptr.cuda(), s8.indices.cuda(), s8.last.cuda(), hq, hk, d, ps, q_data_type=dtype,
                        kv_data_type=kv_dtype)
                ref = fw.run(q, s8.cache, **sc)
            except Exception as e:  # noqa: BLE001 - a FlashInfer path without fp8 support
                print(f"# FlashInfer fp8 decode (tensor cores {tc}) failed: {type(e).__name__}: {e}")
                continue
            err = ((ref.float() - out.float()).norm() / ref.float().norm()).item()
            assert err < 2e-2, f"pagoda and FlashInfer disagree on fp8 {name}: {err}"
            t = gpu_time(lambda: fw.run(q, s8.cache, **sc), "flashinfer fp8") * 1e6
            best = t if best is None else min(best, t)
        if best is not None:
            row["flashinfer_us"] = best
    return row


def causal_flops(qo_lens, kv_lens, hq, d, window_left=-1) -> float:
    """FLOPs of causal attention (bottom-right aligned; query i of a request sees keys up to kv - qo + i, and
    under window_left only the last window_left + 1 of those): 4 * hq * d per visible (query, key) pair."""
    pairs = 0
    for qo, kv in zip(qo_lens, kv_lens):
        seen = np.arange(kv - qo, kv) + 1  # keys each query sees without a window
        pairs += int(np.minimum(seen, window_left + 1).sum() if window_left >= 0 else seen.sum())
    return 4.0 * hq * d * pairs


def prefill_row(name, qo_lens, kv_lens, hq, hk, d, ps, dtype, fi, ws, flex, **kw):
    """kw: plan() arguments both paged libraries take (window_left, logits_soft_cap); the FLOPs count the window,
    and the dense peers (plain causal attention) are left out."""
    s = PagedSetup(kv_lens, hk, d, ps, dtype)
    qo_indptr = torch.tensor([0] + np.cumsum(qo_lens).tolist(), dtype=torch.int32)
    q = torch.randn(int(qo_indptr[-1]), hq, d, dtype=dtype, device="cuda")
    w = pagoda.BatchPrefillWithPagedKVCacheWrapper(ws)
    w.plan(qo_indptr, s.indptr, s.indices, s.last, hq, hk, d, ps, causal=True, q_data_type=dtype, **kw)
    out = w.run(q, s.cache)
    flops = causal_flops(qo_lens, kv_lens, hq, d, kw.get("window_left", -1))
    row = {"case": name, "kind": "prefill", "tflop": flops / 1e12,
           "pagoda_us": gpu_time(lambda: w.run(q, s.cache, out=out), "pagoda") * 1e6}
    if fi is not None:
        fw = fi.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
        fw.plan(qo_indptr.cuda(), s.indptr.cuda(), s.indices.cuda(), s.last.cuda(), hq, hk, d, ps, causal=True,
                q_data_type=dtype, **kw)
        ref = fw.run(q, s.cache)
        err = ((ref.float() - out.float()).norm() / ref.float().norm()).item()
        assert err < 2e-2, f"pagoda and FlashInfer disagree on {name}: {err}"
        row["flashinfer_us"] = gpu_time(lambda: fw.run(q, s.cache), "flashinfer") * 1e6
    if len(set(qo_lens)) == 1 and qo_lens == kv_lens and not kw:  # dense peers: plain causal self-attention
        b, L = len(qo_lens), qo_lens[0]
        qd = torch.randn(b, hq, L, d, dtype=dtype, device="cuda")
        kd = torch.randn(b, hk, L, d, dtype=dtype, device="cuda")
        vd = torch.randn_like(kd)
        row["sdpa_us"] = gpu_time(lambda: torch.nn.functional.scaled_dot_product_attention(
            qd, kd, vd, is_causal=True, enable_gqa=True), "sdpa") * 1e6
        if flex is not None:
            fa, cbm = flex
            bm = cbm(lambda b_, h, qi, ki: qi >= ki, None, None, L, L, device="cuda")
            row["flex_us"] = gpu_time(lambda: fa(qd, kd, vd, block_mask=bm, enable_gqa=True), "flex") * 1e6
    return row


def _rate(kv_mb, t_us, copy_bw=None, pct="5.1%"):
    """kv_mb megabytes in t_us microseconds as "NNNN GB/s", and with copy_bw (bytes / s) its share of it."""
    out = f"{kv_mb * 1e6 / (t_us * 1e-6) / 1e9:6.0f} GB/s"
    return out + f" {kv_mb * 1e12 / t_us / copy_bw:{pct}}" if copy_bw else out


def fmt_table(rows, copy_bw=None):
    """The rows as a table; copy_bw (bytes / s): decode rates also as a fraction of it."""
    lines = []
    rw = 16 if copy_bw else 11  # the rate column's width
    hdr = (f"{'case':<22} {'pagoda':>9} {'rate' + (' (of copy)' if copy_bw else ''):>{rw}} {'FlashInfer':>10} "
           f"{'x FI':>6} {'SDPA':>9} {'x SDPA':>7} {'Flex':>9} {'x Flex':>7} {'plan':>8}")
    lines.append(hdr)
    for r in rows:
        if r["kind"].startswith("decode"):
            rate = _rate(r["kv_MB"], r["pagoda_us"], copy_bw, "4.0%")
        else:
            rate = f"{r['tflop'] / (r['pagoda_us'] * 1e-6):6.0f} TF/s"

        def peer(key):
            if key not in r:
                return f"{'-':>9}", f"{'-':>7}"
            return f"{r[key]:8.1f}u", f"{r[key] / r['pagoda_us']:6.2f}x"
        fi_t, fi_x = peer("flashinfer_us")
        sd_t, sd_x = peer("sdpa_us")
        fl_t, fl_x = peer("flex_us")
        kind = "fp8" if r["kind"] == "decode-fp8" else r["kind"][:3]
        lines.append(f"{kind + ' ' + r['case']:<22} {r['pagoda_us']:8.1f}u {rate:>{rw}} {fi_t:>10} {fi_x[1:]:>6} "
                     f"{sd_t:>9} {sd_x:>7} {fl_t:>9} {fl_x:>7} "
                     + (f"{r['plan_us']:7.0f}u" if "plan_us" in r else f"{'-':>8}")
                     + (f"  {r['pagoda_16bit_us'] / r['pagoda_us']:5.2f}x 16-bit KV tok/s ({r['pagoda_16bit_us']:.1f}u)"
                        if "pagoda_16bit_us" in r else ""))
    return "\n".join(lines)


def fmt_kernel_table(rows, copy_bw=None):
    """The decode rows' kernel times (--kernel-times): pagoda's and FlashInfer's kernel_time, the rate of
    pagoda's against copy_bw (the 1 GB copy, whose replay's launch is < 1% of its time), pagoda's graph time
    (gpu_time), a copy moving the same bytes (gpu_time: the harness's launch floor on a copy), and both libraries'
    cost inside a larger CUDA graph (in_graph_time: as a serving step's graph holds the call) and in a step's
    chain (step_time: behind a short kernel, launched with PDL, as a serving engine launches the decode), pagoda's
    also against copy_bw."""
    def inside(r, ours, peer):  # (pagoda's time, rate, share of copy_bw; FlashInfer's time, its time / pagoda's)
        t, ft = r.get(ours), r.get(peer)
        cell = f"{'-':>25}"
        if t is not None:
            cell = f"{t:8.1f}u {_rate(r['kv_MB'], t, copy_bw)}" + ("" if copy_bw else f"{'':>6}")
        return cell + (f" {ft:10.1f}u {ft / t:5.2f}x" if ft is not None and t is not None else f" {'-':>11} {'-':>6}")

    lines = [f"{'case':<22} {'pagoda kern':>11} {'rate (of copy)':>16} {'FI kern':>9} {'x FI':>6} "
             f"{'pagoda graph':>12} {'same-bytes copy':>15} {'pagoda in-graph (of copy)':>25} {'FI in-graph':>11} "
             f"{'x FI':>6} {'pagoda in a step (of copy)':>25} {'FI in a step':>11} {'x FI':>6}"]
    for r in rows:
        if "pagoda_kernel_us" not in r:
            continue
        k = r["pagoda_kernel_us"]
        rate = _rate(r["kv_MB"], k, copy_bw)
        fk = r.get("flashinfer_kernel_us")
        fi = f"{fk:8.1f}u {fk / k:5.2f}x" if fk is not None else f"{'-':>9} {'-':>6}"
        lines.append(f"{'dec ' + r['case']:<22} {k:10.1f}u {rate:>16} {fi} {r['pagoda_us']:11.1f}u "
                     f"{r['copy_same_bytes_us']:14.1f}u {inside(r, 'pagoda_in_graph_us', 'flashinfer_in_graph_us')} "
                     f"{inside(r, 'pagoda_step_us', 'flashinfer_step_us')}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer cases, shorter timing")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--heads", default="32,8")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--only", choices=["decode", "prefill"])
    ap.add_argument("--kernel-times", action="store_true",
                    help="decode: also each library's kernel time from the profiler (kernel_time), its cost "
                         "inside a larger CUDA graph (in_graph_time) and a copy of each case's bytes")
    ap.add_argument("--kv-dtype", default=None,
                    help="float8_e4m3fn / float8_e5m2: decode over an fp8 cache (vs 16-bit KV and FlashInfer fp8)")
    args = ap.parse_args(argv)
    hq, hk = map(int, args.heads.split(","))
    d, ps, dtype = args.head_dim, args.page_size, getattr(torch, args.dtype)
    torch.manual_seed(0)
    fi = flashinfer_or_none()
    flex = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = (torch.compile(flex_attention), create_block_mask)
    ws = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    copy_bw = copy_bandwidth()
    print(f"# device: {torch.cuda.get_device_name()}, torch {torch.__version__}, heads {hq}/{hk}, head_dim {d}, "
          f"page_size {ps}, {args.dtype}, FlashInfer {getattr(fi, '__version__', 'absent')}, copy bandwidth "
          f"{copy_bw / 1e9:.0f} GB/s, L2 flush: {FLUSH}")
    rows = []
    rng = np.random.default_rng(0)
    kv_dtype = getattr(torch, args.kv_dtype) if args.kv_dtype else None
    if args.only != "prefill":
        for name, lens in DECODE_CASES[: 3 if args.quick else None]:
            lens = lens if lens is not None else rng.integers(128, 8193, size=64).tolist()
            if kv_dtype is not None:
                rows.append(fp8_decode_row(name, lens, hq, hk, d, ps, dtype, kv_dtype, fi, ws))
            else:
                rows.append(decode_row(name, lens, hq, hk, d, ps, dtype, fi, ws, args.kernel_times))
            print(fmt_table(rows[-1:], copy_bw).splitlines()[1], flush=True)
            write_json(args.json, rows, args, partial=True)  # a time-limited device call keeps finished rows
    if args.only != "decode" and kv_dtype is None:
        for name, qo, kv in PREFILL_CASES[: 2 if args.quick else None]:
            rows.append(prefill_row(name, qo, kv, hq, hk, d, ps, dtype, fi, ws, flex))
            print(fmt_table(rows[-1:], copy_bw).splitlines()[1], flush=True)
            write_json(args.json, rows, args, partial=True)
    print()
    print(fmt_table(rows, copy_bw))
    if args.kernel_times:
        print()
        print(fmt_kernel_table(rows, copy_bw))
    if EAGER_FALLBACKS:
        print(f"# timed eagerly (not capturable): {sorted(set(EAGER_FALLBACKS))}")
    write_json(args.json, rows, args, timing=f"CUDA-graph replay, L2 flushed ({FLUSH})", copy_GBps=copy_bw / 1e9,
               eager=sorted(set(EAGER_FALLBACKS)))


def write_json(path, rows, args=None, **extra) -> None:
    """The benchmarks' raw results: device, arguments and rows (committed next to the tables)."""
    if path:
        with open(path, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "args": vars(args) if args is not None else None,
                       "rows": rows, **extra}, f, indent=1)


if __name__ == "__main__":
    main()
