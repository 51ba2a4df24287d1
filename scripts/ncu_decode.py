"""One decode case launched eagerly a few times, for Nsight Compute (device): where the decode kernel's
warps wait, bf16 against fp8 KV (the fp8 issue's ~1.8x is not reached: notes.md, sessions 7-11).

    ncu --clock-control none -k regex:attention_kernel --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section WarpStateStats --section SourceCounters -o rep \\
        python scripts/ncu_decode.py 64x2048 [float8_e4m3fn] [--page-size 1]
    ncu -i rep.ncu-rep --page source --csv --print-source sass > rep.csv   # stalls per instruction
"""
import argparse

import torch

import pagoda
from pagoda.bench.attention import PagedSetup


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("case", help="BATCHxCONTEXT, e.g. 64x2048")
    ap.add_argument("kv_dtype", nargs="?", default="bfloat16")
    ap.add_argument("--page-size", type=int, default=16)
    args = ap.parse_args()
    b, ctx = (int(v) for v in args.case.split("x"))
    kv_dtype, ps = getattr(torch, args.kv_dtype), args.page_size
    hq, hk, d = 32, 8, 128
    s = PagedSetup([ctx] * b, hk, d, ps, torch.bfloat16, kv_dtype=kv_dtype)
    q = torch.randn(b, hq, d, dtype=torch.bfloat16, device="cuda")
    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"))
    w.plan(s.indptr, s.indices, s.last, hq, hk, d, ps, q_data_type=torch.bfloat16, kv_data_type=kv_dtype)
    sc = dict(k_scale=1.0, v_scale=1.0) if kv_dtype.itemsize == 1 else {}
    out = w.run(q, s.cache, **sc)
    for _ in range(4):
        w.run(q, s.cache, out=out, **sc)
    torch.cuda.synchronize()
    print(f"{b}x{ctx} {kv_dtype}: grid {w._plan.grid}, config {w._plan.config}")


if __name__ == "__main__":
    main()
