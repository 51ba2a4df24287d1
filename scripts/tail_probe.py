"""Does a throughput decode lose time to its last round (device)? A plan of T equal tasks on a persistent grid of P
programs runs floor(T / P) full rounds at the DRAM's rate and a last round of T mod P programs, each at most at one
program's streaming rate (~26 GB/s on the H200, session 27): group 1 64 x 2048 is 2048 tasks of 1 MB on 396
programs, 5 full rounds and 68 tasks (~40 us at 68 x 26 GB/s, where the bytes alone take ~15 us). This times the
planner's chunk length against forced shorter ones (more, smaller tasks: the last round's bytes spread over more
programs) as CUDA-graph replays with L2 flushed, interleaved over rounds; every variant's output is checked against
the planner's.

    python scripts/tail_probe.py [--rounds 2]
"""
import sys

import numpy as np
import torch

import pagoda
from pagoda.bench.attention import PagedSetup, copy_bandwidth, gpu_time

from decode_latency_probe import variant  # (forces the planner's chunk length for the next plans; scripts/)

CASES = [  # (name, query heads, KV heads, KV lengths, forced chunk lengths; None: the planner's)
    ("group 1 64x2048", 32, 32, [2048] * 64, [None, 1024, 704, 512]),
    ("256x512", 32, 8, [512] * 256, [None, 256, 192]),
    ("128x1024", 32, 8, [1024] * 128, [None, 512, 384]),
    ("group 1 128x1024", 32, 32, [1024] * 128, [None, 512, 384]),
]


def planned(s, hq, hk, chunk):
    variant("persistent", chunk)
    try:
        w = pagoda.BatchDecodeWithPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"))
        w.plan(s.indptr, s.indices, s.last, hq, hk, 128, 16, q_data_type=torch.bfloat16)
    finally:
        variant("persistent", None)
    return w


def main():
    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 2
    copy = copy_bandwidth()
    print(f"# copy bandwidth {copy / 1e9:.0f} GB/s")
    for name, hq, hk, lens, chunks in CASES:
        s = PagedSetup(lens, hk, 128, 16, torch.bfloat16)
        q = torch.randn(len(lens), hq, 128, dtype=torch.bfloat16, device="cuda")
        runs = []
        for c in chunks:
            w = planned(s, hq, hk, c)
            out = torch.full_like(q, float("nan"))
            w.run(q, s.cache, out=out)
            runs.append((c, w, out))
        ref = runs[0][2].float()
        for c, w, out in runs:
            err = ((out.float() - ref).norm() / ref.norm()).item()
            assert torch.isfinite(out).all() and err < 1e-2, f"{name} chunk {c}: error {err}"
        t = np.zeros((rounds, len(runs)))
        for r in range(rounds):
            for j, (c, w, out) in enumerate(runs):
                t[r, j] = gpu_time(lambda w=w, out=out: w.run(q, s.cache, out=out)) * 1e6
        med = np.median(t, axis=0)
        print(f"== {name}: {s.kv_bytes / 1e6:.0f} MB")
        for j, (c, w, out) in enumerate(runs):
            tasks = int(w._counters[2])
            print(f"   chunk {w._plan.work.chunk_len:6d}{' (planner)' if c is None else '          '} tasks {tasks:5d} "
                  f"programs {w._plan.grid:4d} rounds {tasks / w._plan.grid:5.2f}  {med[j]:7.1f} us  "
                  f"{s.kv_bytes / med[j] / 1e3:5.0f} GB/s  " + " ".join(f"{x:.1f}" for x in t[:, j]), flush=True)


if __name__ == "__main__":
    main()
