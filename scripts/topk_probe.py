"""The top-k kernel's radix-select variants side by side on one GPU (kernels/topk.py: RADIX 8 / 4 bits a pass,
COMPACT on / off, SPLIT_ROWS: few rows split over several programs), with torch.topk and FlashInfer's radix top-k
in the same process; "shipped" is pagoda's defaults, its routing between the kernels and torch.topk included.

    python scripts/topk_probe.py [--json FILE] [--configs 8:0:0,8:1:0,4:1:0,8:1:1]   (RADIX:COMPACT:SPLIT)

Every config (RADIX applies to the split kernels too) runs pagoda.top_k on the kernels (the routing rule,
TOPK_KERNEL_MAX_VALUES, set aside) and the
page-table transform; each result is checked against torch.topk's values before it is timed. Times: the
attention bench's (CUDA-graph replays, L2 emptied before each, median), in microseconds.
"""
from __future__ import annotations

import argparse
import importlib
import json

import torch

import pagoda
from pagoda.bench.attention import bench, flashinfer_or_none

SHAPES = [  # (rows, width, k, dtype)
    (64, 128256, 50, torch.float32), (1, 131072, 2048, torch.float32), (64, 32768, 2048, torch.float32),
    (256, 16384, 2048, torch.float32), (64, 32768, 2048, torch.bfloat16), (32, 32768, 2048, torch.float32),
    (16, 65536, 2048, torch.float32)]
TRANSFORMS = [(64, 32768, 2048), (8, 131072, 2048)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--configs", default="8:0:0,8:1:0,4:1:0,8:1:1", help="RADIX:COMPACT:SPLIT triples")
    args = ap.parse_args()
    mod = importlib.import_module("pagoda.ops.topk")
    configs = [(int(a), b == "1", c == "1") for a, b, c in (t.split(":") for t in args.configs.split(","))]
    shipped = (mod.RADIX_BITS, mod.SPLIT_RADIX_BITS, mod.COMPACT, mod.SPLIT_ROWS, mod.TOPK_KERNEL_MAX_VALUES)

    def ship():  # (the defaults, routing included: the "shipped" column)
        mod.RADIX_BITS, mod.SPLIT_RADIX_BITS, mod.COMPACT, mod.SPLIT_ROWS, mod.TOPK_KERNEL_MAX_VALUES = shipped
    fi = flashinfer_or_none()
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for batch, d, k, dtype in SHAPES:
        x = torch.randn(batch, d, device="cuda", generator=g).to(dtype)
        want = torch.topk(x, k).values
        row = {"op": f"top_k k={k}", "shape": f"{batch}x{d} {str(dtype).split('.')[-1]}",
               "torch_us": bench(lambda: torch.topk(x, k)) * 1e6}
        if fi is not None:
            try:
                row["flashinfer_us"] = bench(lambda: fi.top_k(x, k)) * 1e6
            except Exception as e:  # noqa: BLE001 - a peer failure must not stop the table
                print(f"# FlashInfer top_k failed: {type(e).__name__}: {e}")
        ship()
        v, _ = pagoda.top_k(x, k, sorted=True)
        assert torch.equal(v, want), ("shipped", batch, d)
        row["shipped_us"] = bench(lambda: pagoda.top_k(x, k)) * 1e6
        for radix, compact, split in configs:
            mod.RADIX_BITS, mod.SPLIT_RADIX_BITS, mod.COMPACT, mod.SPLIT_ROWS = radix, radix, compact, split
            mod.TOPK_KERNEL_MAX_VALUES = 1 << 40  # (the kernels everywhere)
            v, _ = pagoda.top_k(x, k, sorted=True)
            assert torch.equal(v, want), (radix, compact, split, batch, d)
            row[f"r{radix}c{int(compact)}s{int(split)}_us"] = bench(lambda: pagoda.top_k(x, k)) * 1e6
        rows.append(row)
        print(row, flush=True)
    for batch, d, k in TRANSFORMS:
        x = torch.randn(batch, d, device="cuda", generator=g)
        lens = torch.randint(d // 2, d + 1, (batch,), dtype=torch.int32, device="cuda", generator=g)
        table = torch.randperm(batch * d, device="cuda", generator=g).to(torch.int32).view(batch, d)
        row = {"op": f"top_k_page_table_transform k={k}", "shape": f"{batch}x{d}"}
        ship()
        ref = pagoda.top_k_page_table_transform(x, table, lens, k)
        row["shipped_us"] = bench(lambda: pagoda.top_k_page_table_transform(x, table, lens, k)) * 1e6
        for radix, compact, split in configs:
            mod.RADIX_BITS, mod.SPLIT_RADIX_BITS, mod.COMPACT, mod.SPLIT_ROWS = radix, radix, compact, split
            out = pagoda.top_k_page_table_transform(x, table, lens, k)
            ref = out if ref is None else ref
            assert torch.equal(out, ref), (radix, compact, split, batch, d)
            row[f"r{radix}c{int(compact)}s{int(split)}_us"] = bench(
                lambda: pagoda.top_k_page_table_transform(x, table, lens, k)) * 1e6
        rows.append(row)
        print(row, flush=True)
    cols = ["shipped_us"] + [f"r{r}c{int(c)}s{int(p)}_us" for r, c, p in configs]
    print(f"{'op':<36} {'shape':<20} " + " ".join(f"{c[:-3]:>8}" for c in cols) + f" {'torch':>8} {'FI':>8}")
    for r in rows:
        print(f"{r['op']:<36} {r['shape']:<20} " + " ".join(f"{r[c]:8.1f}" for c in cols)
              + f" {r.get('torch_us', float('nan')):8.1f} {r.get('flashinfer_us', float('nan')):8.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
