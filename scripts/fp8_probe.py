"""Decode over an fp8 (e4m3) cache vs the same values in a bf16 cache, pagoda only (device): the ratio the
fp8 issue asks for (~1.8x KV tokens per second), without waiting for a peer's JIT.

Times pagoda's decode (CUDA-graph replays) over an e4m3 cache (randn cast to fp8, scale 1.0) and over that
cache widened to bf16, and checks the fp8 result against the bf16 one.

    python scripts/fp8_probe.py [--sweep] [--chunks 512,1024,...]
    python scripts/fp8_probe.py --bf16 [--chunks ...]   (the Gluon decode kernel over a bf16 cache vs the Triton one)
    python scripts/fp8_probe.py --bf16 --configs 64,3,2,168,8/64,2,3,168,8   (other configurations than SWEEP16:
        block_n, stages, programs per SM, register cap, query rows; also with --sweep for fp8)

Times the Triton fp8 kernel (PAGODA_FP8_DECODE_KERNEL=triton) and the Gluon one (kernels/decode_sm90.py, the
default on sm_90); --sweep times the Gluon kernel in each configuration of SWEEP; --chunks times it with the
planner's KV chunk length forced to each of the given lengths (the cost model's choice first).

Session 7 ran an earlier version of this script with three more fp8 paths, chosen by environment variables
that no longer exist (the per-element PTX dequantization to bf16, 32-bit word loads): notes.md, Session 7.
"""
import os
import sys

import torch

import pagoda
from decode_latency_probe import variant
from pagoda.attention import runner
from pagoda.bench.attention import PagedSetup, gpu_time

CASES = {"64x2048": [2048] * 64, "1x32768": [32768], "16x4096": [4096] * 16, "128x1024": [1024] * 128,
         "32x8192": [8192] * 32, "skewed": [32768] + [512] * 63}
# Gluon decode kernel configurations (runner.DECODE_GLUON_CONFIG[1]): block_n (64: the wgmma M), stages, programs
# per SM, register cap, query rows (the wgmma N, at least the group)
SWEEP = [(64, 2, 4, 128, 8), (64, 2, 4, 128, 16), (64, 2, 5, 96, 8), (64, 3, 4, 128, 8)]
# the same kernel over a bf16 cache (--bf16; 32 KB per ring stage)
SWEEP16 = [(64, 2, 3, 168, 8), (64, 2, 3, 168, 16), (64, 2, 4, 128, 8), (64, 2, 4, 104, 8)]


def _configs_arg():
    """--configs a,b,c,d,e/...: the configurations to sweep instead of SWEEP / SWEEP16."""
    if "--configs" not in sys.argv:
        return None
    return [tuple(int(x) for x in c.split(",")) for c in sys.argv[sys.argv.index("--configs") + 1].split("/")]


def main():
    global SWEEP, SWEEP16
    SWEEP = _configs_arg() or SWEEP
    SWEEP16 = _configs_arg() or SWEEP16
    hq, hk, d, ps = 32, 8, 128, 16
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    default = tuple(runner.DECODE_GLUON_CONFIG[1].values())
    kinds = [("triton", None), ("auto", default)] + ([("auto", c) for c in SWEEP if c != default]
                                                     if "--sweep" in sys.argv else [])
    names = ["triton"] + [f"g{c[1]}c{c[2]}r{c[3]}n{c[4]}" for _, c in kinds[1:]]
    if "--chunks" in sys.argv:
        chunks = [int(x) for x in sys.argv[sys.argv.index("--chunks") + 1].split(",")]
        kinds = [("auto", default)] * (len(chunks) + 1)
        names = ["planner"] + [f"chunk {c}" for c in chunks]
    print(f"{'case':9s} {'bf16 us':>8s} " + " ".join(f"{n:>14s}" for n in names) + "  (us, x bf16 KV tok/s)",
          flush=True)
    if "--bf16" in sys.argv:
        return bf16_main()
    for name, lens in CASES.items():
        variant("persistent", None)  # (the bf16 baseline: the planner's chunk)
        s = PagedSetup(lens, hk, d, ps, torch.bfloat16, kv_dtype=torch.float8_e4m3fn)
        wide = s.cache.to(torch.bfloat16)
        q = torch.randn(len(lens), hq, d, dtype=torch.bfloat16, device="cuda")
        w = pagoda.BatchDecodeWithPagedKVCacheWrapper(ws)
        w.plan(s.indptr, s.indices, s.last, hq, hk, d, ps, q_data_type=torch.bfloat16)
        ref = w.run(q, wide)
        t_bf16 = gpu_time(lambda: w.run(q, wide)) * 1e6
        cells = []
        for i, (kname, (kind, c)) in enumerate(zip(names, kinds)):
            variant("persistent", chunks[i - 1] if names[0] == "planner" and i else None)  # forced chunk
            os.environ["PAGODA_FP8_DECODE_KERNEL"] = kind
            if c is not None:
                runner.DECODE_GLUON_CONFIG[1].update(block_n=c[0], stages=c[1], ctas_per_sm=c[2], maxnreg=c[3], rows=c[4])
                runner._gluon_decode_config.cache_clear()
            w8 = pagoda.BatchDecodeWithPagedKVCacheWrapper(ws)
            w8.plan(s.indptr, s.indices, s.last, hq, hk, d, ps, q_data_type=torch.bfloat16,
                    kv_data_type=torch.float8_e4m3fn)
            assert (w8._plan.decode_sm90_constexprs is not None) == (kind == "auto"), kname
            out = w8.run(q, s.cache, k_scale=1.0, v_scale=1.0)
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            assert err < 1e-2, f"{name} {kname}: fp8 differs from the bf16 result, rel err {err:.3g}"
            t = gpu_time(lambda: w8.run(q, s.cache, k_scale=1.0, v_scale=1.0)) * 1e6
            cells.append(f"{t:7.1f} {t_bf16 / t:5.2f}x" + (f" L={w8._plan.work.chunk_len}" if kname == "planner" else ""))
        print(f"{name:9s} {t_bf16:8.1f} " + " ".join(f"{c:>14s}" for c in cells), flush=True)


def bf16_main():
    hq, hk, d, ps = 32, 8, 128, 16
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    kinds = [("triton", None)] + [("gluon", c) for c in SWEEP16]
    names = ["triton"] + [f"g{c[1]}c{c[2]}r{c[3]}n{c[4]}" for _, c in kinds[1:]]
    chunks = []
    if "--chunks" in sys.argv:  # the default Gluon config at forced chunk lengths
        chunks = [int(x) for x in sys.argv[sys.argv.index("--chunks") + 1].split(",")]
        kinds = [("triton", None)] + [("gluon", SWEEP16[0])] * (len(chunks) + 1)
        names = ["triton", "planner"] + [f"chunk {c}" for c in chunks]
    print(f"{'case':9s} " + " ".join(f"{n:>16s}" for n in names) + "  (us, x triton)", flush=True)
    for name, lens in CASES.items():
        s = PagedSetup(lens, hk, d, ps, torch.bfloat16)
        q = torch.randn(len(lens), hq, d, dtype=torch.bfloat16, device="cuda")
        res = {}
        for i, (kname, (kind, c)) in enumerate(zip(names, kinds)):
            variant("persistent", chunks[i - 2] if chunks and i >= 2 else None)
            os.environ["PAGODA_DECODE_KERNEL"] = "auto" if kind == "gluon" else kind
            if c is not None:
                runner.DECODE_GLUON_CONFIG[2].update(block_n=c[0], stages=c[1], ctas_per_sm=c[2], maxnreg=c[3], rows=c[4])
                runner._gluon_decode_config.cache_clear()
            w = pagoda.BatchDecodeWithPagedKVCacheWrapper(ws)
            w.plan(s.indptr, s.indices, s.last, hq, hk, d, ps, q_data_type=torch.bfloat16)
            assert (w._plan.decode_sm90_constexprs is not None) == (kind == "gluon"), kind
            out = w.run(q, s.cache)
            res[kname] = (out, gpu_time(lambda: w.run(q, s.cache)) * 1e6, w._plan.work.chunk_len)
            err = ((out.float() - res["triton"][0].float()).norm() / res["triton"][0].float().norm()).item()
            assert err < 1e-2, f"{name} {kname}: the Gluon kernel differs from the Triton one, rel err {err:.3g}"
        t0 = res["triton"][1]
        print(f"{name:9s} " + " ".join(f"{res[n][1]:8.1f} {t0 / res[n][1]:5.2f}x" for n in names)
              + f"  (planner L={res[names[1]][2]})", flush=True)
    variant("persistent", None)


if __name__ == "__main__":
    main()
