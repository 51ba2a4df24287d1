"""pagoda.BatchAttention against FlashInfer 0.6.0's BatchAttention (its persistent "holistic" kernel) on mixed
prefill / decode batches (device only): Llama-3.1-8B's heads (32 / 8 x 128), bf16, page 16, causal, random page
order; CUDA-graph replays with L2 emptied (bench.attention.gpu_time; a peer call that cannot be captured is timed
eagerly and says so); outputs checked against each other.

    python scripts/batch_attention_probe.py [--json FILE]
"""
import argparse

import torch

import pagoda
from pagoda.bench.attention import EAGER_FALLBACKS, PagedSetup, flashinfer_or_none, gpu_time, write_json

CASES = [  # (name, qo_lens, kv_lens)
    ("chunk 2048 + 63 decodes", [2048] + [1] * 63, [8192] + [1 + (997 * i) % 8191 for i in range(63)]),
    ("4 x 512 new + 128 decodes", [512] * 4 + [1] * 128, [512] * 4 + [1024] * 128),
    ("64 x 2048 decode", [1] * 64, [2048] * 64),
    ("8 x 1024 prefill", [1024] * 8, [1024] * 8),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    args = ap.parse_args()
    fi = flashinfer_or_none()
    hq, hk, d, ps, dt = 32, 8, 128, 16, torch.bfloat16
    rows = []
    print(f"# device: {torch.cuda.get_device_name()}, FlashInfer {getattr(fi, '__version__', 'absent')}")
    print(f"{'case':28s} {'launches':>8} {'pagoda us':>10} {'1 launch':>9} {'FI us':>9} {'x FI':>6} "
          f"{'max |diff|':>10}")
    for name, qo_lens, kv_lens in CASES:
        s = PagedSetup(kv_lens, hk, d, ps, dt)
        qo = torch.tensor([0] + torch.tensor(qo_lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
        q = torch.randn(int(qo[-1]), hq, d, dtype=dt, device="cuda")
        kv_len = torch.tensor(kv_lens, dtype=torch.int32, device="cuda")
        w = pagoda.BatchAttention(device="cuda")
        w.plan(qo, s.indptr.cuda(), s.indices.cuda(), kv_len, hq, hk, d, d, ps, causal=True)
        out, lse = w.run(q, s.cache)
        row = {"case": name, "split": w._split is not None,
               "pagoda_us": gpu_time(lambda: w.run(q, s.cache, out=out, lse=lse), "pagoda") * 1e6}
        if row["split"]:  # the same batch in one launch (split_mixed off), beside it
            from pagoda.attention import prefill

            keep, prefill.split_mixed = prefill.split_mixed, (lambda *a: None)
            try:
                w1 = pagoda.BatchAttention(device="cuda")
                w1.plan(qo, s.indptr.cuda(), s.indices.cuda(), kv_len, hq, hk, d, d, ps, causal=True)
            finally:
                prefill.split_mixed = keep
            o1, l1 = w1.run(q, s.cache)
            row["one_launch_us"] = gpu_time(lambda: w1.run(q, s.cache, out=o1, lse=l1), "pagoda 1 launch") * 1e6
            row["one_launch_max_abs_diff"] = (o1.float() - out.float()).abs().max().item()
        if fi is not None:
            fw = fi.BatchAttention(kv_layout="NHD", device="cuda")
            fw.plan(qo, s.indptr.cuda(), s.indices.cuda(), kv_len, hq, hk, d, d, ps, causal=True,
                    q_data_type=dt, kv_data_type=dt)
            fo, fl = fw.run(q, s.cache)
            row["max_abs_diff"] = (fo.float() - out.float()).abs().max().item()
            row["flashinfer_us"] = gpu_time(lambda: fw.run(q, s.cache, out=fo, lse=fl), "flashinfer") * 1e6
        rows.append(row)
        fi_us = row.get("flashinfer_us", float("nan"))
        print(f"{name:28s} {2 if row['split'] else 1:8d} {row['pagoda_us']:10.1f} "
              f"{row.get('one_launch_us', float('nan')):9.1f} {fi_us:9.1f} {fi_us / row['pagoda_us']:5.2f}x "
              f"{row.get('max_abs_diff', float('nan')):10.2e}", flush=True)
    if EAGER_FALLBACKS:
        print(f"# timed eagerly (not capturable): {sorted(set(EAGER_FALLBACKS))}")
    write_json(args.json, rows, args, eager=sorted(set(EAGER_FALLBACKS)))


if __name__ == "__main__":
    main()
