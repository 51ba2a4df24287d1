"""Host time of plan() (timeit minimum), decode and prefill wrappers, eager and CUDA-graph mode, for 1 and 256
decode requests of random length 128..8192 (page_size 16, 32/8 heads, head_dim 128); on a GPU also of an eager
decode run(). Runs anywhere:

    TRITON_INTERPRET=1 python scripts/plan_time.py      # CPU (the planner is host code)
    TRITON_INTERPRET=1 python scripts/plan_time.py --emulate-h100   # CPU, with the CUDA kernel configs and
                                                         # a 132-SM grid (the plans a GPU host would build)
    python scripts/plan_time.py                          # on a GPU host
    python scripts/plan_time.py --profile                # also cProfile 300 decode-wrapper plans of
                                                         # each batch (top functions by own time)
    python scripts/plan_time.py --cases                  # only the attention bench's eight decode cases'
                                                         # plans (min / median, drained first and back to back)
    python scripts/plan_time.py --cases --flashinfer     # and FlashInfer 0.6.0's decode plan() of each case
    python scripts/plan_time.py --stats                  # also the decode-wrapper plan's median and p90,
                                                         # with the stream drained first and back to back
    python scripts/plan_time.py --window 4095            # every decode-wrapper plan with that window_left

First the host's speed: a fixed NumPy / Python workload (host_speed_us), a rough gauge of the host at the time.
Also times the engine's way of planning a decode step (the prefill wrapper with one query per request)
and 256 requests of 1024 tokens (the decode sweep's batch); on a GPU also the decode wrapper given its page ids
on the device (the plan then copies them device to device, not through the host's staging buffer).
"""
import sys
import timeit

import numpy as np
import torch

import pagoda
from pagoda.bench.attention import PagedSetup, host_times_us


def _min_us(fn, n=1500):
    """Minimum host time of fn over n calls (bench.attention.host_times_us, the stream drained before each)."""
    return float(host_times_us(fn, n).min())


# --window W: the decode-wrapper plans take window_left=W (a sliding-window model's decode steps)
WINDOW = dict(window_left=int(sys.argv[sys.argv.index("--window") + 1])) if "--window" in sys.argv else {}


def _decode_plan(wrapper, s, indices=None):
    """A call of a decode wrapper's plan() (pagoda's or FlashInfer's: the same arguments) for PagedSetup s, 32 / 8
    heads of 128; indices: the page ids to pass instead of s.indices."""
    ids = s.indices if indices is None else indices
    return lambda: wrapper.plan(s.indptr, ids, s.last, 32, 8, 128, 16, q_data_type=torch.bfloat16, **WINDOW)


def _spread(fn, n, p90=False) -> str:
    """fn's host time, the stream drained before each call and back to back: min / median (/ p90) of n calls."""
    out = []
    for label, sync in (("stream drained first", True), ("back to back", False)):
        t = host_times_us(fn, n, sync)
        out.append(f"{label} min {t.min():4.0f} median {np.median(t):4.0f}"
                   + (f" p90 {np.percentile(t, 90):4.0f}" if p90 else "") + " us")
    return ", ".join(out)


def host_speed_us() -> float:
    """A fixed host workload in plan()'s style (NumPy calls on a 257-entry batch, a short Python loop), minimum of
    many timings: a gauge of the host's speed when this run took place, printed with the plan() times. A rough
    one: on the device hosts it moved 10-24 us, once 24 -> 16 us between two runs seconds apart (notes.md,
    session 25)."""
    a = np.arange(257, dtype=np.int64) * 16 + 7

    def work():
        d = a[1:] - a[:-1]
        o = np.argsort(-d, kind="stable")
        w = np.empty((256, 9), dtype=np.int32)
        w[:, 0] = d[o]
        w[:, 1] = o
        t = 0
        for i in range(64):
            t += i * 3 // 2
        return int(d.max()) + int(w.sum()) + t

    return min(timeit.repeat(work, number=20, repeat=200)) / 20 * 1e6


def main():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ref = host_speed_us()
    print(f"host speed: reference workload {ref:.1f} us (plan() times below also in these units)")
    if "--emulate-h100" in sys.argv:
        from pagoda.attention import runner

        select = runner.select_config
        runner.select_config = lambda mode, hd, g, on_cuda, *a: select(mode, hd, g, True, *a)
        runner.num_programs = lambda device, cfg: 132 * cfg.ctas_per_sm
    if "--cases" in sys.argv:  # the attention bench's decode cases, each in a wrapper of its own as the bench
        from pagoda.bench.attention import DECODE_CASES

        ws = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
        fi = None
        if "--flashinfer" in sys.argv:  # FlashInfer's decode plan() of the same cases (host tensors, as pagoda's)
            import flashinfer as fi
        case_rng = np.random.default_rng(0)  # (the bench's "64 random" lengths)
        for name, lens in DECODE_CASES:
            lens = lens if lens is not None else case_rng.integers(128, 8193, size=64).tolist()
            s = PagedSetup(lens, 8, 128, 16, torch.bfloat16, device=dev)
            dw = pagoda.BatchDecodeWithPagedKVCacheWrapper(ws)
            fn = _decode_plan(dw, s)
            fn()
            line = f"case {name:22s} plan: {_spread(fn, 500)}"
            w = dw._plan.work
            line += f" ({len(w.work)} work items, {len(w.splits)} split)"
            if fi is not None:
                fws = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
                for tc in (False, True):
                    ffn = _decode_plan(fi.BatchDecodeWithPagedKVCacheWrapper(fws, "NHD", use_tensor_cores=tc), s)
                    ffn()
                    c = host_times_us(ffn, 500)
                    line += f"; FlashInfer{' tc' if tc else ''} min {c.min():4.0f} median {np.median(c):4.0f}"
            print(line)
        return
    rng = np.random.default_rng(0)
    for n, lens in ((1, None), (256, None), (256, [1024] * 256)):
        print(f"{n} requests of {'1024 tokens' if lens else 'random length 128..8192'}:")
        lens = lens or rng.integers(128, 8193, size=n).tolist()
        s = PagedSetup(lens, 8, 128, 16, torch.bfloat16, device=dev)
        ws = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
        qo = torch.arange(n + 1, dtype=torch.int32)
        for graph in (False, True):
            pw = pagoda.BatchPrefillWithPagedKVCacheWrapper(ws, backend="triton", use_cuda_graph=graph)
            dw = pagoda.BatchDecodeWithPagedKVCacheWrapper(ws, backend="triton", use_cuda_graph=graph)
            times = []
            for fn in (lambda: pw.plan(qo, s.indptr, s.indices, s.last, 32, 8, 128, 16, causal=True,
                                       q_data_type=torch.bfloat16),
                       _decode_plan(dw, s)):
                fn()
                times.append(_min_us(fn))
            line = (f"{n:4d} requests, cuda_graph={graph!s:5}: prefill-wrapper plan {times[0]:6.0f} us, "
                    f"decode-wrapper plan {times[1]:6.0f} us ({times[1] / ref:4.1f} x reference)")
            if dev == "cuda":  # page ids already on the device, as FlashInfer users pass them (the engine's: host)
                fn = _decode_plan(dw, s, s.indices.to(dev))
                fn()
                line += f", with the page ids on the device {_min_us(fn):6.0f} us"
            print(line)
            if "--stats" in sys.argv:  # the decode-wrapper plan's spread
                print(f"     decode-wrapper plan: {_spread(_decode_plan(dw, s), 1500, p90=True)}")
        if "--profile" in sys.argv:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            fn = _decode_plan(dw, s)
            for _ in range(300):
                fn()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(18)
        if dev == "cuda":  # host time of an eager run() (the launch: argument checks, Triton's launcher)
            q = torch.randn(n, 32, 128, dtype=torch.bfloat16, device=dev)
            out = torch.empty_like(q)
            dw.run(q, s.cache, out=out)
            t = _min_us(lambda: dw.run(q, s.cache, out=out), n=300)
            torch.cuda.synchronize()
            print(f"{n:4d} requests: decode-wrapper run() host time {t:6.0f} us (minimum; the kernel not waited for)")


if __name__ == "__main__":
    main()
