"""The Gluon decode kernel's waiting merger (PAGODA_DECODE_MERGER=1, plan.add_waiting_mergers) against the
default last-arrival merge, one wrapper each in one process, on the attention bench's decode cases and the
engine's batch-1 shape: the same bits, the kernel time (CUDA-graph replays, L2 emptied before each: the bench's
gpu_time) and whether the plan carried mergers. Prints each case before timing it (a hang shows which). (device)

    python scripts/merger_probe.py
"""
import os

import torch

import pagoda
from pagoda.attention.kernels.attention import MERGE_ITEM
from pagoda.bench.attention import PagedSetup, gpu_time

HQ, HK, D, PS, DT = 32, 8, 128, 16, torch.bfloat16
CASES = [("1x1024", [1024]), ("1x32768", [32768]), ("1x8192", [8192]), ("4x4096", [4096] * 4),
         ("16x4096", [4096] * 16), ("64x2048", [2048] * 64), ("skewed", [32768] + [512] * 63)]


def main():
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    print(f"{'case':10s} {'mergers':>8s} {'default':>9s} {'merger':>9s}  same bits", flush=True)
    for name, lens in CASES:
        s = PagedSetup(lens, HK, D, PS, DT)
        q = torch.randn(len(lens), HQ, D, dtype=DT, device="cuda")
        res = {}
        for m in ("0", "1"):
            os.environ["PAGODA_DECODE_MERGER"] = m
            w = pagoda.BatchDecodeWithPagedKVCacheWrapper(ws)
            w.plan(s.indptr, s.indices, s.last, HQ, HK, D, PS, q_data_type=DT)
            n_merge = int((w._plan.work.work[:, 6] == MERGE_ITEM).sum())
            print(f"{name:10s} merger={m} planned ({n_merge} merge items of {len(w._plan.work.work)})", flush=True)
            out = w.run(q, s.cache)
            torch.cuda.synchronize()
            res[m] = (out.clone(), gpu_time(lambda: w.run(q, s.cache, out=out), f"merger={m}") * 1e6, n_merge)
        same = torch.equal(res["0"][0], res["1"][0])
        print(f"{name:10s} {res['1'][2]:8d} {res['0'][1]:8.1f}u {res['1'][1]:8.1f}u  {same}", flush=True)
    os.environ.pop("PAGODA_DECODE_MERGER")


if __name__ == "__main__":
    main()
