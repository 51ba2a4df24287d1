"""Where the Gluon MLA kernel's time goes (device): plan shape and time per case, with and without
split-KV, at several planner item costs, against the Triton kernel.

    python scripts/mla_probe.py [--cases 1x32768,128x8192] [--costs-only]

The ablations without both MMAs (ABLATE 6 "loads only", 7 "none") crash ptxas (error -11, Triton 3.6's ptxas)
at the 32-token x 4-stage config (the default of sessions 9-37): reproduced on the CPU by compiling for sm_90
(session 10); session 9 ran them at 64 x 2. They are reported as failed and the probe goes on.
"""
import argparse
import math
import os

import torch

import pagoda
from pagoda.attention import mla
from pagoda.bench.attention import gpu_time


def case(batch, kv_len, heads=128, page_size=64, dtype=torch.bfloat16):
    pages_per = math.ceil(kv_len / page_size)
    total = batch * pages_per
    indices = torch.randperm(total).to(torch.int32)
    indptr = torch.arange(0, total + 1, pages_per, dtype=torch.int32)
    kv_lens = torch.full((batch,), kv_len, dtype=torch.int32)
    qo = torch.arange(batch + 1, dtype=torch.int32)
    ckv = torch.randn(total, page_size, 512, dtype=dtype, device="cuda")
    kpe = torch.randn(total, page_size, 64, dtype=dtype, device="cuda")
    qn = torch.randn(batch, heads, 512, dtype=dtype, device="cuda") * 0.1
    qp = torch.randn(batch, heads, 64, dtype=dtype, device="cuda")
    return (qo, indptr, indices, kv_lens, heads, 512, 64, page_size, False, 1 / math.sqrt(192), dtype, dtype), \
        (qn, qp, ckv, kpe)


def timed(plan_args, run_args, ws, no_split=False):
    w = pagoda.BatchMLAPagedAttentionWrapper(ws)
    if no_split:
        w._partial_capacity = lambda *a: 0
    w.plan(*plan_args)
    p = w._plan
    out = w.run(*run_args)
    t = gpu_time(lambda: w.run(*run_args, out=out)) * 1e6  # CUDA-graph replays, as the MLA bench
    return t, p, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="1x8192,1x32768,16x8192,64x8192,128x8192")
    ap.add_argument("--costs-only", action="store_true", help="only the planner item costs (no configs, ablations)")
    args = ap.parse_args()
    ws = torch.empty(512 << 20, dtype=torch.uint8, device="cuda")
    defaults = dict(mla.MLA_SM90_CONFIG)
    for c in args.cases.split(","):
        b, kv = map(int, c.split("x"))
        pa, ra = case(b, kv)
        flops = 2 * b * 128 * kv * (512 + 64 + 512)
        cells = []
        for label, env, cost, no_split in (("gluon", "gluon", 512, False), ("gluon cost128", "gluon", 128, False),
                                           ("gluon cost1024", "gluon", 1024, False),
                                           ("gluon cost2048", "gluon", 2048, False),
                                           ("gluon no-split", "gluon", 512, True), ("triton", "triton", 512, False)):
            os.environ["PAGODA_MLA_KERNEL"] = env
            mla.MLA_SM90_CONFIG.update(item_cost=cost, small_item_cost=cost)  # one cost for every batch
            t, p, _ = timed(pa, ra, ws, no_split)
            cells.append(f"{label}: {t:7.1f}us {flops / t / 1e6:4.0f}TF/s "
                         f" parts={p.partial_rows}")
        mla.MLA_SM90_CONFIG.update(defaults)
        os.environ["PAGODA_MLA_KERNEL"] = "gluon"
        print(f"{c:>9} | " + " | ".join(cells), flush=True)
        if args.costs_only:
            continue
        for bn, stages in ((32, 4), (32, 3), (16, 8)):  # (the default: 64 x 2, mla.MLA_SM90_CONFIG)
            mla.MLA_SM90_CONFIG.update(block_n=bn, stages=stages)
            t, p, _ = timed(pa, ra, ws)
            cells.append(f"bn{bn}/st{stages}: {t:7.1f}us {flops / t / 1e6:4.0f}TF/s parts={p.partial_rows}")
        mla.MLA_SM90_CONFIG.update(defaults)
        print(f"{c:>9} | " + " | ".join(cells[-3:]), flush=True)
        # leave one stage out (kernels/mla_sm90.py ABLATE): what each costs
        cells = []
        for label, ablate in (("no loads", 1), ("no QK", 2), ("no PV", 4), ("loads only", 6), ("no loads/QK", 3),
                              ("none", 7)):
            mla._MLA_SM90_ABLATE = ablate
            try:
                t, _, _ = timed(pa, ra, ws)
            except Exception as e:  # noqa: BLE001 - ABLATE 6 / 7 at 32 x 4 crash ptxas (Triton 3.6's, -11)
                cells.append(f"{label}: {type(e).__name__}")
                continue
            cells.append(f"{label}: {t:7.1f}us")
        mla._MLA_SM90_ABLATE = 0
        print(f"{c:>9} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
