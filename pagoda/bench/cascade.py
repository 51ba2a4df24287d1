"""Cascade benchmark: requests sharing a long prefix, decode, on one GPU, one run.

    python -m pagoda.bench.cascade [--json FILE]

pagoda's MultiLevelCascadeAttentionWrapper (levels from cascade_levels_from_page_table)
against pagoda's flat paged decode over the same page tables and FlashInfer 0.6's
cascade wrapper when importable; then FlashInfer's older shared-prefix API
(BatchDecodeWithSharedPrefixPagedKVCacheWrapper: the prefix as contiguous K / V, each
request's own pages) against FlashInfer's class of that name (in fp16: FlashInfer's takes bf16
queries only through its private plan). Llama-3.1-8B attention shape, bf16, page_size 16.
"""
from __future__ import annotations

import argparse
import json

import torch

import pagoda

from .attention import bench, flashinfer_or_none, gpu_time

CASES = [("64 x (8192 shared + 256)", 64, 8192, 256), ("16 x (32768 shared + 1024)", 16, 32768, 1024)]


def setup(n, prefix, suffix, hk, d, ps, dtype):
    shared = prefix // ps
    uniq = -(-suffix // ps)
    total = shared + n * uniq
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(total, generator=g).to(torch.int32)
    tables = [torch.cat([perm[:shared], perm[shared + r * uniq:shared + (r + 1) * uniq]]) for r in range(n)]
    indptr = torch.arange(0, n + 1, dtype=torch.int32) * (shared + uniq)
    last = torch.full((n,), (suffix - 1) % ps + 1, dtype=torch.int32)
    cache = torch.randn(total, 2, ps, hk, d, dtype=dtype, device="cuda")
    return cache, indptr, torch.cat(tables), last


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--parts", default="cascade,shared",
                    help="comma-separated: cascade (multi-level cascade vs flat), shared (the shared-prefix wrappers)")
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    if not parts or parts - {"cascade", "shared"}:
        raise SystemExit(f"--parts takes cascade and / or shared, got {args.parts!r}")
    hq, hk, d, ps, dtype = 32, 8, 128, 16, torch.bfloat16
    fi = flashinfer_or_none()
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    rows = []
    print(f"# device: {torch.cuda.get_device_name()}, FlashInfer {getattr(fi, '__version__', 'absent')}")
    for name, n, prefix, suffix in CASES if "cascade" in parts else ():
        cache, indptr, indices, last = setup(n, prefix, suffix, hk, d, ps, dtype)
        q = torch.randn(n, hq, d, dtype=dtype, device="cuda")
        flat = pagoda.BatchDecodeWithPagedKVCacheWrapper(ws)
        flat.plan(indptr, indices, last, hq, hk, d, ps, q_data_type=dtype)
        ref = flat.run(q, cache)
        levels = pagoda.cascade_levels_from_page_table(indptr, indices, last, ps)
        casc = pagoda.MultiLevelCascadeAttentionWrapper(2, ws)
        casc.plan(**levels, num_qo_heads=hq, num_kv_heads=hk, head_dim=d, page_size=ps, q_data_type=dtype)
        out = casc.run(q, cache)
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        assert err < 2e-2, f"cascade and flat disagree on {name}: {err}"
        row = {"case": name, "flat_us": bench(lambda: flat.run(q, cache)) * 1e6,
               "cascade_us": bench(lambda: casc.run(q, cache, out=out)) * 1e6}
        # the same, captured in CUDA graphs (use_cuda_graph wrappers, as a serving engine runs them)
        gflat = pagoda.BatchDecodeWithPagedKVCacheWrapper(ws, use_cuda_graph=True)
        gflat.plan(indptr, indices, last, hq, hk, d, ps, q_data_type=dtype)
        gcasc = pagoda.MultiLevelCascadeAttentionWrapper(2, ws, use_cuda_graph=True)
        gcasc.plan(**levels, num_qo_heads=hq, num_kv_heads=hk, head_dim=d, page_size=ps, q_data_type=dtype)
        out_f, out_c = torch.empty_like(q), torch.empty_like(q)
        row["flat_graph_us"] = gpu_time(lambda: gflat.run(q, cache, out=out_f), "pagoda flat graph") * 1e6
        row["cascade_graph_us"] = gpu_time(lambda: gcasc.run(q, cache, out=out_c), "pagoda cascade graph") * 1e6
        err = ((out_c.float() - ref.float()).norm() / ref.float().norm()).item()
        assert err < 2e-2, f"graph-replayed cascade disagrees on {name}: {err}"
        if fi is not None:
            fw = fi.MultiLevelCascadeAttentionWrapper(2, ws, "NHD")
            fw.plan([t.cuda() for t in levels["qo_indptr_arr"]], [t.cuda() for t in levels["paged_kv_indptr_arr"]],
                    [t.cuda() for t in levels["paged_kv_indices_arr"]],
                    [t.cuda() for t in levels["paged_kv_last_page_len"]], hq, hk, d, ps, q_data_type=dtype)
            fo = fw.run(q, cache)
            err = ((fo.float() - ref.float()).norm() / ref.float().norm()).item()
            assert err < 2e-2, f"FlashInfer cascade disagrees on {name}: {err}"
            row["flashinfer_cascade_us"] = bench(lambda: fw.run(q, cache)) * 1e6
            fo_g = torch.empty_like(q)
            try:
                row["flashinfer_cascade_graph_us"] = gpu_time(lambda: fo_g.copy_(fw.run(q, cache)),
                                                              "flashinfer cascade graph") * 1e6
            except Exception as e:  # noqa: BLE001 - a peer that cannot be captured is reported, not fatal
                print(f"# FlashInfer cascade in a CUDA graph failed: {type(e).__name__}: {e}")
        rows.append(row)
        print(row, flush=True)
    for mode, sfx in (("eager", ""), ("CUDA graph", "_graph")):
        print(f"\n{mode:<28} {'flat':>9} {'cascade':>9} {'flat/casc':>9} {'FI cascade':>10} {'FI/pagoda':>9}")
        for r in rows:
            fi_t = r.get(f"flashinfer_cascade{sfx}_us")
            f_t, c_t = r[f"flat{sfx}_us"], r[f"cascade{sfx}_us"]
            print(f"{r['case']:<28} {f_t:8.1f}u {c_t:8.1f}u {f_t / c_t:8.2f}x "
                  + (f"{fi_t:9.1f}u {fi_t / c_t:8.2f}x" if fi_t else f"{'-':>10} {'-':>9}"))
    # (fp16: FlashInfer 0.6.0's shared-prefix begin_forward(data_type=) sets its cache's dtype and leaves the
    # queries' at fp16, so bf16 queries fail its check)
    shared = shared_prefix_rows(fi, hq, hk, d, ps, torch.float16) if "shared" in parts else []
    print(f"\n{'shared-prefix decode (fp16)':<28} {'pagoda':>9} {'FlashInfer':>10} {'FI/pagoda':>9}")
    for r in shared:
        fi_t = r.get("flashinfer_us")
        print(f"{r['case']:<28} {r['pagoda_us']:8.1f}u " + (f"{fi_t:9.1f}u {fi_t / r['pagoda_us']:8.2f}x" if fi_t
                                                            else f"{'-':>10} {'-':>9}"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows, "shared_prefix_rows": shared}, f,
                      indent=1)


def shared_prefix_rows(fi, hq, hk, d, ps, dtype):
    """BatchDecodeWithSharedPrefixPagedKVCacheWrapper over CASES: the prefix as contiguous K / V, the suffixes in
    pages; pagoda and FlashInfer on the same tensors (their outputs compared), eager, each its own workspace."""
    rows = []
    for name, n, prefix, suffix in CASES:
        cache, indptr, indices, last = setup(n, 0, suffix, hk, d, ps, dtype)
        ks, vs = (torch.randn(prefix, hk, d, dtype=dtype, device="cuda") for _ in range(2))
        q = torch.randn(n, hq, d, dtype=dtype, device="cuda")
        w = pagoda.BatchDecodeWithSharedPrefixPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8,
                                                                              device="cuda"))
        w.begin_forward(indptr, indices, last, hq, hk, d, ps, data_type=dtype)
        out = w.forward(q, ks, vs, cache)
        row = {"case": name, "pagoda_us": bench(lambda: w.forward(q, ks, vs, cache)) * 1e6}
        if fi is not None:
            try:
                fw = fi.BatchDecodeWithSharedPrefixPagedKVCacheWrapper(
                    torch.empty(256 << 20, dtype=torch.uint8, device="cuda"), "NHD")
                fw.begin_forward(indptr.cuda(), indices.cuda(), last.cuda(), hq, hk, d, ps, data_type=dtype)
                fo = fw.forward(q, ks, vs, cache)
                err = ((fo.float() - out.float()).norm() / fo.float().norm()).item()
                assert err < 2e-2, f"pagoda's and FlashInfer's shared-prefix decode disagree on {name}: {err}"
                row["flashinfer_us"] = bench(lambda: fw.forward(q, ks, vs, cache)) * 1e6
            except Exception as e:  # noqa: BLE001 - a peer failure is reported, not fatal
                print(f"# FlashInfer shared-prefix decode failed: {type(e).__name__}: {e}")
        rows.append(row)
        print(row, flush=True)
    return rows


if __name__ == "__main__":
    main()
