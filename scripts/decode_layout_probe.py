"""Decode over NHD and HND paged caches (the same KV, one layout each), graph time and kernel time, beside the
kernel time of a plain read of the same bytes (torch.sum: a reduction that reads the whole tensor once, the
read-only stream a decode is): whether the decode's loop is held back by the NHD layout's 256-byte pieces (each
KV head's rows of a page are 16 pieces 2 KB apart; HND makes them one 4 KB run). Device only:

    python scripts/decode_layout_probe.py [--cases 1x32768,16x4096] [--rounds 3]
"""
import sys

import numpy as np
import torch

import pagoda
from pagoda.bench.attention import DECODE_CASES, PagedSetup, copy_bandwidth, gpu_time, kernel_time

HQ, HK, D, PS, DT = 32, 8, 128, 16, torch.bfloat16


def main():
    args = sys.argv[1:]
    cases, rounds = ["1x32768", "16x4096"], 3
    if "--cases" in args:
        cases = args[args.index("--cases") + 1].split(",")
    if "--rounds" in args:
        rounds = int(args[args.index("--rounds") + 1])
    copy = copy_bandwidth()
    print(f"# copy bandwidth {copy / 1e9:.0f} GB/s")
    table = dict(DECODE_CASES)
    for name in cases:
        s = PagedSetup(table[name], HK, D, PS, DT)
        q = torch.randn(len(table[name]), HQ, D, dtype=DT, device="cuda")
        hnd = s.cache.transpose(2, 3).contiguous()  # [pages, 2, heads, page_size, dim]
        flat = torch.randn(s.kv_bytes // 2, dtype=DT, device="cuda")
        runs = {}
        for layout, cache in (("NHD", s.cache), ("HND", hnd)):
            w = pagoda.BatchDecodeWithPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"),
                                                          layout)
            w.plan(s.indptr, s.indices, s.last, HQ, HK, D, PS, q_data_type=DT)
            out = torch.full_like(q, float("nan"))
            w.run(q, cache, out=out)
            runs[layout] = (lambda w=w, cache=cache, out=out: w.run(q, cache, out=out), out)
        assert torch.equal(runs["NHD"][1], runs["HND"][1]) or \
            ((runs["NHD"][1].float() - runs["HND"][1].float()).norm() / runs["NHD"][1].float().norm()) < 1e-2
        runs["read (sum)"] = (lambda: flat.sum(dtype=torch.float32), None)
        res = {k: ([], []) for k in runs}
        for _ in range(rounds):
            for k, (fn, _) in runs.items():
                res[k][0].append(gpu_time(fn, k) * 1e6)
                kt = kernel_time(fn, k)
                res[k][1].append(np.nan if kt is None else kt * 1e6)
        print(f"== {name}: {s.kv_bytes / 1e6:.0f} MB")
        for k, (g, kt) in res.items():
            gm, km = np.median(g), np.median(kt)
            print(f"   {k:11s} graph {gm:7.2f} us ({s.kv_bytes / gm / 1e3 * 1e9 / copy:5.1%} of copy)  kernel "
                  f"{km:7.2f} us ({s.kv_bytes / km / 1e3 * 1e9 / copy:5.1%}, {s.kv_bytes / km / 1e3:5.0f} GB/s)  "
                  f"rounds {' '.join(f'{x:.2f}' for x in g)} / {' '.join(f'{x:.2f}' for x in kt)}", flush=True)


if __name__ == "__main__":
    main()
