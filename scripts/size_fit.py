"""How a one-request decode's time splits into a fixed part and a part per byte (head_dim 128, 32 / 8 heads, page 16,
bf16): the decode of 1 x L for L over a range, each by the attention bench's four measures (bench.attention.decode_row
with kernel_times: the single-kernel graph replay, the kernel's own time, the cost inside a larger graph, the cost
in a step's PDL chain), beside a copy of the same bytes and SDPA over dense K / V, and a least-squares line
t = a + bytes / r through each. Then what the line says the 1 x 32768 case would take on a device of another copy
rate (--copy-gbps, default the H100's measured 3006 GB/s): two bounds, the fixed part a kept as it is (latency) or
all of it but the replay's launch (--launch-us) scaled with the copy rate. Device only:

    python scripts/size_fit.py [--lens 16384,32768,65536,131072,262144] [--copy-gbps 3006] [--launch-us 3.9]
"""
import argparse

import numpy as np
import torch

from pagoda.bench.attention import copy_bandwidth, decode_row

MEASURES = [("graph", "pagoda_us"), ("kernel", "pagoda_kernel_us"), ("in-graph", "pagoda_in_graph_us"),
            ("in a step", "pagoda_step_us"), ("copy (graph)", "copy_same_bytes_us"), ("sdpa (graph)", "sdpa_us")]


def fit(mb, us):
    """(a us, r GB/s) of the least-squares line us = a + mb / r (mb in MB: 1 MB / 1 us = 1000 GB/s)."""
    slope, a = np.polyfit(np.asarray(mb, float), np.asarray(us, float), 1)
    return float(a), 1000.0 / float(slope)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lens", default="16384,32768,65536,131072,262144")
    ap.add_argument("--copy-gbps", type=float, default=3006.0, help="the other device's 1 GB copy rate")
    ap.add_argument("--launch-us", type=float, default=3.9, help="the single-kernel replay's launch (graph only)")
    args = ap.parse_args()
    lens = [int(x) for x in args.lens.split(",")]
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    copy = copy_bandwidth() / 1e9
    print(f"# {torch.cuda.get_device_name()}, copy {copy:.0f} GB/s; 1 x L decode, head_dim 128, 32/8 heads, page 16")
    rows = []
    for L in lens:
        r = decode_row(f"1x{L}", [L], 32, 8, 128, 16, torch.bfloat16, None, ws, kernel_times=True)
        rows.append(r)
        print(f"1x{L:<7} {r['kv_MB']:7.1f} MB " + " ".join(
            f"{name} {r[key]:7.2f}" for name, key in MEASURES if key in r) + " us", flush=True)
    print()
    print(f"{'measure':>13} | {'fixed a (us)':>12} | {'rate r (GB/s)':>13} | r / copy | 1x32768 on this device: "
          f"line / measured | at {args.copy_gbps:.0f} GB/s copy: a kept .. a scaled (% of that copy rate)")
    mb32 = next((r["kv_MB"] for r in rows if r["case"] == "1x32768"), 134.2)
    k = copy / args.copy_gbps  # how much longer every byte takes there
    for name, key in MEASURES:
        pts = [(r["kv_MB"], r[key]) for r in rows if key in r]
        if len(pts) < 2:
            continue
        a, rate = fit(*zip(*pts))
        meas = next((r[key] for r in rows if r["case"] == "1x32768" and key in r), float("nan"))
        stream = mb32 / rate * 1000 * k
        launch = args.launch_us if key in ("pagoda_us", "copy_same_bytes_us", "sdpa_us") else 0.0
        t_lo, t_hi = stream + a, stream + launch + (a - launch) * k  # (the fixed part kept .. scaled)
        pct = lambda t: mb32 / t * 1000 / args.copy_gbps * 100  # noqa: E731
        print(f"{name:>13} | {a:12.2f} | {rate:13.0f} | {rate / copy:8.3f} | {a + mb32 / rate * 1000:6.2f} / "
              f"{meas:6.2f} us | {t_lo:6.2f} .. {t_hi:6.2f} us ({pct(t_lo):5.1f} .. {pct(t_hi):5.1f}%)")
    print("# marginal rate between consecutive sizes (GB/s): " + ", ".join(
        f"{name} " + "/".join(f"{(b['kv_MB'] - a_['kv_MB']) / (b[key] - a_[key]) * 1000:.0f}"
                              for a_, b in zip(rows, rows[1:]) if key in a_ and key in b)
        for name, key in MEASURES[:2]))


if __name__ == "__main__":
    main()
