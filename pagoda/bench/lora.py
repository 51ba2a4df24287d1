"""Multi-LoRA segment GEMM: pagoda's SegmentGEMMWrapper (ops/lora.py) against FlashInfer 0.6.0's and a PyTorch loop
of one matmul per segment, on one GPU.

    python -m pagoda.bench.lora [--json FILE] [--ranks 16,64]

A LoRA layer of a 4096-wide model (Llama-3.1-8B's o projection) is a shrink (x @ A.T, 4096 -> rank) and an expand
(@ B.T, rank -> 4096); A and B in nn.Linear's layout (weight_column_major=True). Cases: 64 and 256 decode rows (one
a segment) over as many / 32 adapters, 8 prefill segments of 512 rows over 4 adapters, and a mixed step (one 2048-row
prefill chunk among 63 decode rows). CUDA-graph replays with L2 flushed (bench.attention.gpu_time); "GB/s" counts
the adapters read once plus x and y, against the device-to-device copy of the same run; outputs are checked against
a float32 loop of matmuls.
"""
from __future__ import annotations

import argparse

import torch

from pagoda.bench.attention import copy_bandwidth, flashinfer_or_none, gpu_time, write_json
from pagoda.ops import lora

HIDDEN = 4096
# (name, segment lengths, adapters): segment b uses adapter b % adapters
CASES = [("decode 64", [1] * 64, 64), ("decode 256", [1] * 256, 32), ("prefill 8x512", [512] * 8, 4),
         ("mixed 2048+63", [2048] + [1] * 63, 16)]


def torch_loop(x, w, lens, wi, out):
    """The PyTorch baseline: one matmul per segment (what a server without a segment kernel does)."""
    start = 0
    for n, i in zip(lens, wi):
        if n:
            torch.matmul(x[start:start + n], w[i].T, out=out[start:start + n])
        start += n
    return out


def case_rows(fi, ranks):
    rows = []
    for rank in ranks:
        for name, lens, n_ad in CASES:
            batch = len(lens)
            wi_list = [b % n_ad for b in range(batch)]
            wi = torch.tensor(wi_list, dtype=torch.int64, device="cuda")
            indptr = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int64, device="cuda")
            total = sum(lens)
            for kind, d_in, d_out in (("shrink", HIDDEN, rank), ("expand", rank, HIDDEN)):
                x = torch.randn(total, d_in, dtype=torch.bfloat16, device="cuda")
                w = (torch.randn(n_ad, d_out, d_in, device="cuda") / d_in ** 0.5).to(torch.bfloat16)
                ref = torch.empty(total, d_out, dtype=torch.float32, device="cuda")
                torch_loop(x.float(), w.float(), lens, wi_list, ref)
                out = torch.empty(total, d_out, dtype=torch.bfloat16, device="cuda")
                g = lora.SegmentGEMMWrapper(torch.empty(1 << 20, dtype=torch.int8, device="cuda"))

                def ours():
                    return g.run(x, w, batch, True, out=out, seg_indptr=indptr, weight_indices=wi)

                ours()

                def err(o):
                    return ((o.float() - ref).norm() / ref.norm()).item()
                mb = (n_ad * d_in * d_out + total * (d_in + d_out)) * 2 / 1e6
                row = {"rank": rank, "case": name, "kind": kind, "rows": total, "segments": batch, "adapters": n_ad,
                       "MB": mb, "gflop": 2 * total * d_in * d_out / 1e9, "pagoda_err": err(out),
                       "pagoda_us": gpu_time(ours, "pagoda") * 1e6}
                out_t = torch.empty_like(out)
                torch_loop(x, w, lens, wi_list, out_t)
                row["torch_err"] = err(out_t)
                row["torch_us"] = gpu_time(lambda: torch_loop(x, w, lens, wi_list, out_t), "torch loop") * 1e6
                if fi is not None:
                    fg = fi.SegmentGEMMWrapper(torch.empty(128 << 20, dtype=torch.int8, device="cuda"))
                    out_f = torch.zeros_like(out)
                    try:
                        fg.run(x, w, batch, True, out=out_f, seg_indptr=indptr, weight_indices=wi)
                        row["flashinfer_err"] = err(out_f)
                        row["flashinfer_us"] = gpu_time(lambda: fg.run(x, w, batch, True, out=out_f, seg_indptr=indptr,
                                                                       weight_indices=wi), "flashinfer") * 1e6
                    except Exception as e:  # noqa: BLE001 - a peer that refuses a case is reported, not fatal
                        row["flashinfer_error"] = f"{type(e).__name__}: {str(e)[:120]}"
                rows.append(row)
                print(fmt([row]).splitlines()[-1], flush=True)
    return rows


def _ratio(r, key):
    return f"{r[key] / r['pagoda_us']:6.2f}x" if key in r else f"{'-':>7}"


def fmt(rows):
    lines = [f"{'rank':>4} {'case':14s} {'kind':6s} {'pagoda us':>9} {'GB/s':>6} {'TF/s':>5} {'FI us':>8} {'x FI':>7} "
             f"{'torch us':>8} {'x torch':>7} {'err':>8} {'FI err':>8}"]
    for r in rows:
        fi = f"{r['flashinfer_us']:8.1f}" if "flashinfer_us" in r else f"{'-':>8}"
        fe = f"{r['flashinfer_err']:8.1e}" if "flashinfer_err" in r else f"{'-':>8}"
        lines.append(f"{r['rank']:4d} {r['case']:14s} {r['kind']:6s} {r['pagoda_us']:9.1f} "
                     f"{r['MB'] / r['pagoda_us'] * 1e3:6.0f} {r['gflop'] / r['pagoda_us'] * 1e3:5.1f} {fi} "
                     f"{_ratio(r, 'flashinfer_us')} {r['torch_us']:8.1f} {_ratio(r, 'torch_us')} "
                     f"{r['pagoda_err']:8.1e} {fe}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--ranks", default="16,64")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    fi = flashinfer_or_none()
    copy_bw = copy_bandwidth()
    print(f"# device: {torch.cuda.get_device_name()}, FlashInfer {getattr(fi, '__version__', 'absent')}, bf16, "
          f"copy {copy_bw / 1e9:.0f} GB/s; x FI / x torch: their time over pagoda's")
    rows = case_rows(fi, [int(v) for v in args.ranks.split(",")])
    print()
    print(fmt(rows))
    write_json(args.json, rows, args, copy_GBps=copy_bw / 1e9, timing="CUDA-graph replay, L2 flushed")


if __name__ == "__main__":
    main()
