"""Why is decode over a token-granular cache (page_size 1) slower than over 16-token pages? (device)
Times pagoda and FlashInfer decode (CUDA-graph replays) at page_size 1 and 16, with the page table a random
permutation (the benchmark's) or in order (each request's pages consecutive in memory). If in-order page 1
is as fast as page 16, the cost is the memory system (scattered 256-byte rows: DRAM pages, TLB reach), not
the kernel's per-token work.   python scripts/page1_probe.py"""
import torch

import pagoda
from pagoda.bench.attention import PagedSetup, flashinfer_or_none, gpu_time

hq, hk, d, dt = 32, 8, 128, torch.bfloat16
fi = flashinfer_or_none()
ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
print(f"{'case':9s} {'page':>4} {'order':>6} {'pagoda us':>10} {'GB/s':>6} {'FI us':>8}")
for name, lens in (("64x2048", [2048] * 64), ("1x32768", [32768])):
    for ps in (16, 1):
        for order in ("random", "inorder"):
            s = PagedSetup(lens, hk, d, ps, dt)
            if order == "inorder":
                s.indices = torch.arange(s.indices.numel(), dtype=torch.int32)
            q = torch.randn(len(lens), hq, d, dtype=dt, device="cuda")
            w = pagoda.BatchDecodeWithPagedKVCacheWrapper(ws)
            w.plan(s.indptr, s.indices, s.last, hq, hk, d, ps, q_data_type=dt)
            out = torch.empty_like(q)
            t = gpu_time(lambda: w.run(q, s.cache, out=out)) * 1e6
            tf = float("nan")
            for tc in ((True, False) if fi is not None else ()):  # FlashInfer's faster decode path
                fw = fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tc)
                fw.plan(s.indptr.cuda(), s.indices.cuda(), s.last.cuda(), hq, hk, d, ps, q_data_type=dt)
                tf = min(tf, gpu_time(lambda: fw.run(q, s.cache)) * 1e6) if tf == tf else gpu_time(
                    lambda: fw.run(q, s.cache)) * 1e6
            print(f"{name:9s} {ps:4d} {order:>6} {t:10.1f} {s.kv_bytes / t / 1e3:6.0f} {tf:8.1f}", flush=True)
