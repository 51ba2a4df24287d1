"""Sweep kernel configurations on the device and print a table (feeds plan.CUDA_CONFIGS).

    python -m pagoda.bench.tune decode|prefill [--head-dim 128] [--heads 32,8] [--page-size 16]

Each row is one (block_m, block_n, num_warps, num_stages, ctas_per_sm, item_cost) tried on
the benchmark's cases (every case, the long ones included, runs the swept configuration); the fastest
total is marked. Times are CUDA-graph replays (bench.attention.gpu_time), as in the benchmarks.
"""
from __future__ import annotations

import argparse

import torch

import pagoda
from pagoda.attention import plan as plan_mod

from .attention import PagedSetup, gpu_time

DECODE_FP8 = [(16, 64, 4, 3, 4, 2048, 128), (16, 32, 4, 3, 4, 2048, 128), (16, 128, 4, 3, 2, 2048), (16, 128, 4, 4, 2, 2048), (16, 256, 4, 3, 1, 2048), (16, 128, 8, 3, 2, 2048),
              (16, 64, 4, 4, 2, 2048), (16, 64, 4, 6, 2, 2048), (16, 128, 4, 2, 3, 2048), (16, 64, 4, 3, 2, 2048)]
DECODE = [(16, 64, 4, 4, 4, 128), (16, 64, 4, 2, 4, 128), (16, 64, 4, 3, 2, 128), (16, 32, 4, 3, 4, 128),
          (16, 32, 2, 3, 8, 128), (16, 64, 2, 2, 8, 128), (16, 128, 4, 2, 2, 128), (16, 128, 8, 2, 2, 128),
          (16, 128, 4, 3, 2, 128), (16, 64, 4, 2, 4, 512), (16, 64, 4, 2, 4, 1024), (16, 32, 4, 3, 4, 512)]
PREFILL = [(128, 64, 8, 3, 1, 128), (128, 64, 4, 3, 1, 128), (128, 128, 8, 2, 1, 128), (128, 128, 8, 3, 1, 128),
           (128, 64, 8, 4, 1, 128), (64, 64, 4, 3, 2, 128), (64, 128, 4, 3, 2, 128), (128, 32, 4, 3, 2, 128),
           (128, 128, 4, 2, 1, 128), (64, 64, 4, 4, 2, 128)]
DECODE_CASES = {"64x2048": ([2048] * 64,), "1x32768": ([32768],), "16x4096": ([4096] * 16,),
                "skewed": ([32768] + [512] * 63,), "64x256": ([256] * 64,)}
KV_DTYPE = None  # set by --kv-dtype
PREFILL_CASES = {"1x8192": ([8192], [8192]), "8x1024": ([1024] * 8, [1024] * 8)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["decode", "prefill"])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--heads", default="32,8")
    ap.add_argument("--page-size", type=int, default=16, help="1: tune CUDA_CONFIGS['decode-page1']")
    ap.add_argument("--configs", help="';'-separated 'bm,bn,warps,stages,ctas,item[,maxnreg[,slices]]' tuples to try "
                                      "instead (maxnreg 0: no cap; slices: per-warp KV slices in decode)")
    ap.add_argument("--profile", action="store_true", help="also print per-kernel times of the best config")
    ap.add_argument("--kv-dtype", help="float8_e4m3fn: tune decode over an fp8 cache (CUDA_CONFIGS['decode-fp8'])")
    args = ap.parse_args(argv)
    hq, hk = map(int, args.heads.split(","))
    d, ps, dt = args.head_dim, args.page_size, torch.bfloat16
    global KV_DTYPE
    KV_DTYPE = getattr(torch, args.kv_dtype) if args.kv_dtype else None
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    name = args.mode + ("-fp8" if KV_DTYPE is not None else "")
    keys = [(name, d), (name + "-long", d)]
    if ps == 1:
        keys = [(k + "-page1", d) for k, _ in keys]
    results = []
    cases = DECODE_CASES if args.mode == "decode" else PREFILL_CASES
    setups = {}
    for name, spec in cases.items():
        if args.mode == "decode":
            s = PagedSetup(spec[0], hk, d, ps, dt, kv_dtype=KV_DTYPE)
            q = torch.randn(len(spec[0]), hq, d, dtype=dt, device="cuda")
            setups[name] = (s, q, None)
        else:
            s = PagedSetup(spec[1], hk, d, ps, dt)
            qo = torch.tensor([0] + torch.tensor(spec[0]).cumsum(0).tolist(), dtype=torch.int32)
            q = torch.randn(int(qo[-1]), hq, d, dtype=dt, device="cuda")
            setups[name] = (s, q, qo)
    configs = (DECODE_FP8 if KV_DTYPE is not None else DECODE) if args.mode == "decode" else PREFILL
    if args.configs:
        configs = [tuple(int(x) for x in c.split(",")) for c in args.configs.split(";")]
    for cfg in configs:
        for key in keys:
            plan_mod.CUDA_CONFIGS[key] = cfg
        plan_mod._config.cache_clear()  # select_config caches its answers
        times = []
        try:
            for name, (s, q, qo) in setups.items():
                w = planned_wrapper(args.mode, ws, s, qo, hq, hk, d, ps, dt)
                sc = dict(k_scale=1.0, v_scale=1.0) if KV_DTYPE is not None else {}
                out = w.run(q, s.cache, **sc)
                times.append(gpu_time(lambda: w.run(q, s.cache, out=out, **sc), name, rep_ms=100) * 1e6)
        except Exception as e:  # noqa: BLE001 - a config that does not compile (shared memory) is reported
            print(f"{cfg}: failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        results.append((cfg, times))
        print(f"{cfg}: " + "  ".join(f"{n} {t:8.1f}us" for n, t in zip(setups, times)), flush=True)
    best = min(results, key=lambda r: sum(r[1]))
    print("\n" + f"{'config (bm,bn,warps,stages,ctas,item)':<34}" + "".join(f"{n:>11}" for n in setups))
    for cfg, times in results:
        mark = " <- best" if cfg == best[0] else ""
        print(f"{str(cfg):<34}" + "".join(f"{t:10.1f}u" for t in times) + mark)
    if args.profile:
        for key in keys:
            plan_mod.CUDA_CONFIGS[key] = best[0]
        plan_mod._config.cache_clear()  # select_config caches its answers
        profile(args.mode, setups, ws, hq, hk, d, ps, dt)


def planned_wrapper(mode, ws, s, qo, hq, hk, d, ps, dt):
    if mode == "decode":
        w = pagoda.BatchDecodeWithPagedKVCacheWrapper(ws)
        w.plan(s.indptr, s.indices, s.last, hq, hk, d, ps, q_data_type=dt, kv_data_type=KV_DTYPE)
    else:
        w = pagoda.BatchPrefillWithPagedKVCacheWrapper(ws)
        w.plan(qo, s.indptr, s.indices, s.last, hq, hk, d, ps, causal=True, q_data_type=dt)
    return w


def profile(mode, setups, ws, hq, hk, d, ps, dt):
    from torch.profiler import ProfilerActivity, profile as tprofile

    for name, (s, q, qo) in setups.items():
        w = planned_wrapper(mode, ws, s, qo, hq, hk, d, ps, dt)
        out = w.run(q, s.cache)
        torch.cuda.synchronize()
        with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                w.run(q, s.cache, out=out)
            torch.cuda.synchronize()
        print(f"--- {name}: chunk_len {w._plan.work.chunk_len}, items {len(w._plan.work.work)}, "
              f"split tiles {len(w._plan.work.splits)}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=4, max_name_column_width=40))


if __name__ == "__main__":
    main()
