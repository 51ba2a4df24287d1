"""MLA decode benchmark at DeepSeek-V3 shapes: pagoda vs FlashInfer's MLA, one run.

    python -m pagoda.bench.mla [--quick] [--eager] [--json FILE]

128 heads, head_dim_ckv 512, head_dim_kpe 64, bf16, page_size 64, pages in random order;
batch 1..128 x kv 1k..32k. Reports GPU time (each call captured in a CUDA graph and replayed, as
the attention benchmark does; --eager times eager calls, host launch included, as sessions 1-9 did)
and the bandwidth of the latent cache (ckv + kpe bytes read once / time); ratios are pagoda's speed
over FlashInfer's (> 1: faster).
"""
from __future__ import annotations

import argparse
import math
import os

import torch

import pagoda
from pagoda.bench.attention import bench as eager_time
from pagoda.bench.attention import flashinfer_or_none, gpu_time, write_json


CASES = [(b, kv) for b in (1, 16, 64, 128) for kv in (1024, 8192, 32768)]


def mla_row(batch, kv_len, heads, page_size, fi, ws, dtype=torch.bfloat16, bench=gpu_time):
    """One case: pagoda (both kernels) and FlashInfer's MLA timed by ``bench`` (GPU time of graph replays, or
    eager_time: do_bench of eager calls, host launch included)."""
    dc, dp = 512, 64
    pages_per = math.ceil(kv_len / page_size)
    total = batch * pages_per
    g = torch.Generator().manual_seed(batch * 7 + kv_len)
    indices = torch.randperm(total, generator=g).to(torch.int32)
    indptr = torch.arange(0, total + 1, pages_per, dtype=torch.int32)
    kv_lens = torch.full((batch,), kv_len, dtype=torch.int32)
    qo = torch.arange(batch + 1, dtype=torch.int32)
    ckv = torch.randn(total, page_size, dc, dtype=dtype, device="cuda")
    kpe = torch.randn(total, page_size, dp, dtype=dtype, device="cuda")
    qn = torch.randn(batch, heads, dc, dtype=dtype, device="cuda") * 0.1
    qp = torch.randn(batch, heads, dp, dtype=dtype, device="cuda")
    sm = 1.0 / math.sqrt(128 + 64)
    w = pagoda.BatchMLAPagedAttentionWrapper(ws)
    w.plan(qo, indptr, indices, kv_lens, heads, dc, dp, page_size, False, sm, dtype, dtype)
    out = w.run(qn, qp, ckv, kpe)
    nbytes = batch * kv_len * (dc + dp) * ckv.element_size()
    flops = 2 * batch * heads * kv_len * (dc + dp + dc)
    row = {"case": f"{batch}x{kv_len}", "batch": batch, "kv_len": kv_len, "MB": nbytes / 1e6, "GFLOP": flops / 1e9,
           "kernel": "gluon" if w._plan.sm90 else "triton",
           "pagoda_us": bench(lambda: w.run(qn, qp, ckv, kpe, out=out)) * 1e6}
    # both of pagoda's kernels on the same inputs (auto picks one of them: mla.mla_sm90_eligible)
    for kernel in ("gluon", "triton"):
        os.environ["PAGODA_MLA_KERNEL"] = kernel
        try:
            wk = pagoda.BatchMLAPagedAttentionWrapper(ws)
            wk.plan(qo, indptr, indices, kv_lens, heads, dc, dp, page_size, False, sm, dtype, dtype)
            if kernel == "gluon" and not wk._plan.sm90:
                continue  # (not an sm_90 GPU with the Triton the kernel targets)
            err = ((wk.run(qn, qp, ckv, kpe).float() - out.float()).norm() / out.float().norm()).item()
            assert err < 2e-2, f"pagoda's two MLA kernels disagree on {row['case']}: {err}"
            row[f"{kernel}_us"] = bench(lambda: wk.run(qn, qp, ckv, kpe)) * 1e6
        finally:
            del os.environ["PAGODA_MLA_KERNEL"]
    if fi is not None:
        try:
            fw = fi.mla.BatchMLAPagedAttentionWrapper(ws)
            fw.plan(qo.cuda(), indptr.cuda(), indices.cuda(), kv_lens.cuda(), heads, dc, dp, page_size, False, sm,
                    dtype, dtype)
            ref = fw.run(qn, qp, ckv, kpe)
            err = ((ref.float() - out.float()).norm() / ref.float().norm()).item()
            assert err < 2e-2, f"pagoda and FlashInfer MLA disagree on {row['case']}: {err}"
            row["flashinfer_us"] = bench(lambda: fw.run(qn, qp, ckv, kpe)) * 1e6
        except AssertionError:
            raise
        except Exception as e:  # noqa: BLE001 - peer failure is reported, not fatal
            print(f"# FlashInfer MLA failed on {row['case']}: {type(e).__name__}: {e}")
    return row


SWEEP = [(64, 32, 8, 2), (64, 64, 8, 2), (64, 16, 8, 2), (32, 64, 8, 2), (32, 64, 8, 3), (32, 128, 8, 2),
         (32, 64, 4, 2), (16, 64, 8, 3)]


def sweep(heads, page_size, ws, bench=gpu_time):
    """Time each configuration of the MLA kernel on three cases (prints a table; the default stays)."""
    from pagoda.attention import mla

    default = mla.MLA_CUDA_CONFIG
    print(f"{'config (bm,bn,warps,stages)':<28} " + " ".join(f"{c:>12}" for c in ("1x32768", "64x8192", "128x1024")))
    for cfg in SWEEP:
        mla.MLA_CUDA_CONFIG = (*cfg, 1, default[5])
        ts = []
        for b, kv in ((1, 32768), (64, 8192), (128, 1024)):
            try:
                r = mla_row(b, kv, heads, page_size, None, ws, bench=bench)
                ts.append(f"{r['pagoda_us']:10.1f}us")
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
                ts.append(f"{type(e).__name__[:12]:>12}")
        print(f"{str(cfg):<28} " + " ".join(ts), flush=True)
    mla.MLA_CUDA_CONFIG = default


def fmt(rows):
    lines = [f"{'case':<12} {'latent MB':>9} {'pagoda':>9} {'GB/s':>6} {'TFLOP/s':>7} {'FlashInfer':>10} {'GB/s':>6} "
             f"{'x FI':>6} {'kernel':>7} {'Gluon':>9} {'Triton':>9}"]
    for r in rows:
        gbs = r["MB"] * 1e6 / (r["pagoda_us"] * 1e-6) / 1e9
        tf = r["GFLOP"] / (r["pagoda_us"] * 1e-6) / 1e3
        old = f"{r['kernel']:>7} " + " ".join(f"{r[k]:8.1f}u" if k in r else f"{'-':>9}" for k in ("gluon_us", "triton_us"))
        if "flashinfer_us" in r:
            fgbs = r["MB"] * 1e6 / (r["flashinfer_us"] * 1e-6) / 1e9
            peer = f"{r['flashinfer_us']:9.1f}u {fgbs:6.0f} {r['flashinfer_us'] / r['pagoda_us']:5.2f}x"
        else:
            peer = f"{'-':>10} {'-':>6} {'-':>6}"
        lines.append(f"{r['case']:<12} {r['MB']:9.1f} {r['pagoda_us']:8.1f}u {gbs:6.0f} {tf:7.0f} {peer} {old}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--heads", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--eager", action="store_true",
                    help="time eager calls (host launch cost included; sessions 1-9) instead of graph replays")
    ap.add_argument("--sweep", action="store_true",
                    help="time pagoda's MLA kernel configurations (block_m,block_n,warps,stages) first")
    args = ap.parse_args(argv)
    timer = eager_time if args.eager else gpu_time
    torch.manual_seed(0)
    fi = flashinfer_or_none()
    if fi is not None:
        import flashinfer.mla  # noqa: F401
    ws = torch.empty(512 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    print(f"# device: {torch.cuda.get_device_name()}, torch {torch.__version__}, MLA {args.heads} heads, "
          f"ckv 512 + kpe 64, bf16, page_size {args.page_size}, FlashInfer {getattr(fi, '__version__', 'absent')}, "
          f"{'eager calls' if args.eager else 'CUDA-graph replays'}")
    if args.sweep:
        sweep(args.heads, args.page_size, ws, timer)
    rows = []
    for b, kv in CASES[::3] if args.quick else CASES:
        rows.append(mla_row(b, kv, args.heads, args.page_size, fi, ws, bench=timer))
        print(fmt(rows[-1:]).splitlines()[1], flush=True)
    print()
    print(fmt(rows))
    write_json(args.json, rows, args)


if __name__ == "__main__":
    main()
