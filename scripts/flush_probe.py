"""How the L2 flush between timed replays moves a decode's time (device only).

    python scripts/flush_probe.py

do_bench flushes L2 by writing a 256 MB buffer (cache.zero_()) before each replay: the L2 (50-60 MB) is then
full of dirty lines, and the timed kernel's first ~L2-size of misses each write one back, so a read-only kernel
of B bytes moves ~B + L2 bytes through DRAM. This times the same CUDA graphs (pagoda and FlashInfer decode, and a
device-to-device copy of the KV's bytes) under three flushes:
  zero   do_bench's own (write 256 MB)
  read   read a 512 MB buffer that nothing writes (the L2 ends full of clean lines)
  none   no flush, the graph replayed over NSETS copies of the inputs in turn (each read once per NSETS replays)
and prints the effective bandwidth of each against the 1 GB copy's.
"""
import math

import numpy as np
import torch

import pagoda
from pagoda.bench.attention import PagedSetup, capture_graph as capture, copy_bandwidth, flashinfer_or_none, flush_l2


def timed(graphs, flush, reps=200):
    """Median event time of one replay, graphs replayed in turn, flush() before each (outside the events)."""
    start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(10):
        flush()
        graphs[i % len(graphs)].replay()
    torch.cuda.synchronize()
    for i in range(reps):
        flush()
        start[i].record()
        graphs[i % len(graphs)].replay()
        end[i].record()
    torch.cuda.synchronize()
    return float(np.median([s.elapsed_time(e) for s, e in zip(start, end)])) * 1e3  # us


def main():
    hq, hk, d, ps, dt = 32, 8, 128, 16, torch.bfloat16
    fi = flashinfer_or_none()
    bw = copy_bandwidth()
    zbuf = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    flushes = {"zero": zbuf.zero_, "read": flush_l2, "none": lambda: None}
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    print(f"# copy bandwidth (1 GB copy, bench.attention.copy_bandwidth) {bw / 1e9:.0f} GB/s")
    print(f"{'case':10s} {'what':10s} " + " ".join(f"{f + ' us':>9s} {'%copy':>6s}" for f in flushes))
    for name, lens in (("1x32768", [32768]), ("16x4096", [4096] * 16), ("64x2048", [2048] * 64),
                       ("32x8192", [8192] * 32)):
        nsets = max(2, math.ceil(4 * 60e6 / (sum(lens) * hk * d * 4)))
        sets = [PagedSetup(lens, hk, d, ps, dt, seed=i) for i in range(nsets)]
        b = len(lens)
        q = torch.randn(b, hq, d, dtype=dt, device="cuda")
        nbytes = sets[0].kv_bytes
        rows = {}
        w = pagoda.BatchDecodeWithPagedKVCacheWrapper(ws)
        w.plan(sets[0].indptr, sets[0].indices, sets[0].last, hq, hk, d, ps, q_data_type=dt)
        out = torch.empty(b, hq, d, dtype=dt, device="cuda")
        rows["pagoda"] = [capture(lambda c=s.cache: w.run(q, c, out=out)) for s in sets]
        if fi is not None:
            fw = fi.BatchDecodeWithPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"),
                                                      "NHD", use_tensor_cores=False)
            fw.plan(sets[0].indptr.cuda(), sets[0].indices.cuda(), sets[0].last.cuda(), hq, hk, d, ps,
                    q_data_type=dt)
            rows["flashinfer"] = [capture(lambda c=s.cache: fw.run(q, c)) for s in sets]
        srcs = [torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda") for _ in range(nsets)]
        dst = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
        rows[f"copy {nbytes // 2e6:.0f}MB"] = [capture(lambda a=a: dst.copy_(a)) for a in srcs]
        for what, graphs in rows.items():
            cells = []
            for f, fl in flushes.items():
                t = timed(graphs if f == "none" else graphs[:1], fl)
                cells.append(f"{t:9.1f} {nbytes / t * 1e6 / bw:6.0%}")
            print(f"{name:10s} {what:10s} " + " ".join(cells), flush=True)
        del sets, srcs


if __name__ == "__main__":
    main()
