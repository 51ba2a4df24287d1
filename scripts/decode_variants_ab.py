"""Interleaved A/B of decode-kernel switches read at wrapper construction (device only): each variant is a set
of environment settings (PAGODA_DECODE_*), its wrapper built under them, planned on the same requests, and the
CUDA-graph times (bench.attention.gpu_time, L2 emptied before each replay) taken round after round, so machine
drift falls on every variant alike. Each variant's output is checked against the first variant's.

    python scripts/decode_variants_ab.py "PAGODA_DECODE_TRIM_GRID=0;PAGODA_DECODE_TRIM_GRID=1" [--rounds 3]
        [--cases 1x32768,1x1024,16x4096]      # (a variant: comma-separated NAME=VALUE settings; "" the defaults)
        [--head-dim 64] [--kernel-times]     # (also each variant's kernel time, bench.attention.kernel_time: the
                                             # profiler's span of the replayed kernels, without the replay's launch)
        [--cuda-graph]                       # (wrappers made with use_cuda_graph=True, as the engine's)
        [--kv-dtype float8_e4m3fn]           # (an fp8 cache, bf16 queries)
    python scripts/decode_variants_ab.py ";cfg=64:3:4:128" --head-dim 64
        # cfg=BLOCK_N:STAGES:CTAS_PER_SM:MAXNREG: the Gluon decode kernel's configuration for the cache (16-bit or
        # fp8) at this head_dim (runner.DECODE_GLUON_CONFIG_BY_HEAD_DIM) while that variant's wrapper plans
        # (MAXNREG 0: no cap)

Prints, per case, the median of each variant's times over the rounds (and each round), GB/s and the ratio to
the copy bandwidth measured in the same run.
"""
import os
import sys
from unittest import mock

import numpy as np
import torch

import pagoda
from pagoda.bench.attention import DECODE_CASES, PagedSetup, copy_bandwidth, gpu_time, kernel_time

HQ, HK, D, PS, DT = 32, 8, 128, 16, torch.bfloat16


def planned(env: dict, s, head_dim: int, graph: bool = False, kv_dtype=None):
    """A wrapper made and planned under env (its cfg= entry: the Gluon decode configuration for the cache's element
    size)."""
    from pagoda.attention import runner

    env = dict(env)
    cfg = env.pop("cfg", None)
    table = runner.DECODE_GLUON_CONFIG_BY_HEAD_DIM
    saved = dict(table)
    if cfg is not None:
        bn, st, ctas, regs = (int(x) for x in cfg.split(":"))
        table[(1 if kv_dtype is not None else 2, head_dim)] = dict(block_n=bn, stages=st, ctas_per_sm=ctas,
                                                                    maxnreg=regs or None, rows=8)
    runner._gluon_decode_config.cache_clear()
    try:
        # (most switches are read when the wrapper is made, the kernel choice (PAGODA_DECODE_KERNEL) at its plan)
        with mock.patch.dict(os.environ, env):
            w = pagoda.BatchDecodeWithPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"),
                                                          use_cuda_graph=graph)
            w.plan(s.indptr, s.indices, s.last, HQ, HK, head_dim, PS, q_data_type=DT, kv_data_type=kv_dtype)
    finally:
        table.clear()
        table.update(saved)
        runner._gluon_decode_config.cache_clear()
    return w


def parse_variant(text: str) -> dict:
    env = {}
    for item in filter(None, text.split(",")):
        k, v = item.split("=", 1)
        env[k.strip()] = v.strip()
    return env


def main():
    args = sys.argv[1:]
    rounds, cases = 3, ["1x32768", "1x1024", "16x4096"]
    if "--rounds" in args:
        i = args.index("--rounds")
        rounds = int(args[i + 1])
        del args[i: i + 2]
    if "--cases" in args:
        i = args.index("--cases")
        cases = args[i + 1].split(",")
        del args[i: i + 2]
    head_dim = D
    if "--head-dim" in args:
        i = args.index("--head-dim")
        head_dim = int(args[i + 1])
        del args[i: i + 2]
    graph = "--cuda-graph" in args
    if graph:
        args.remove("--cuda-graph")
    kv_dtype = None
    if "--kv-dtype" in args:
        i = args.index("--kv-dtype")
        kv_dtype = getattr(torch, args[i + 1])
        del args[i: i + 2]
    ktimes = "--kernel-times" in args
    if ktimes:
        args.remove("--kernel-times")
    variants = [parse_variant(v) for v in (args[0] if args else "").split(";")]
    table = dict(DECODE_CASES)
    table["1x1024"], table["1x2048"], table["4x1024"] = [1024], [2048], [1024] * 4
    copy = copy_bandwidth()
    print(f"# copy bandwidth {copy / 1e9:.0f} GB/s; variants: {variants}")
    scales = dict(k_scale=1.0, v_scale=1.0) if kv_dtype is not None else {}  # (randn values fit fp8 at scale 1)
    for name in cases:
        s = PagedSetup(table[name], HK, head_dim, PS, DT, kv_dtype=kv_dtype)
        q = torch.randn(len(table[name]), HQ, head_dim, dtype=DT, device="cuda")
        runs = []
        for env in variants:
            w = planned(env, s, head_dim, graph, kv_dtype)
            out = torch.full_like(q, float("nan"))
            w.run(q, s.cache, out=out, **scales)
            runs.append((w, out))
        ref = runs[0][1].float()
        for (w, out), env in zip(runs, variants):
            err = ((out.float() - ref).norm() / ref.norm()).item()
            assert torch.isfinite(out).all() and err < 1e-2, f"{name} {env}: error {err} against the first variant"
        times = np.zeros((rounds, len(runs)))
        ktime = np.full((rounds, len(runs)), np.nan)
        for r in range(rounds):
            for j, (w, out) in enumerate(runs):
                times[r, j] = gpu_time(lambda w=w, out=out: w.run(q, s.cache, out=out, **scales)) * 1e6
                if ktimes:
                    kt = kernel_time(lambda w=w, out=out: w.run(q, s.cache, out=out, **scales))
                    ktime[r, j] = np.nan if kt is None else kt * 1e6
        med = np.median(times, axis=0)
        kmed = np.median(ktime, axis=0)
        kind = f"head_dim {head_dim}" + (f", {kv_dtype}" if kv_dtype is not None else "")
        print(f"== {name} ({kind}): {s.kv_bytes / 1e6:.0f} MB, programs "
              f"{[w._plan.grid for w, _ in runs]}")
        for j, env in enumerate(variants):
            gbs = s.kv_bytes / med[j] / 1e3
            kern = ""
            if ktimes:
                kern = (f"  kernel {kmed[j]:7.2f} us {s.kv_bytes / kmed[j] / 1e3 * 1e9 / copy:5.1%} of copy ("
                        + " ".join(f"{t:.2f}" for t in ktime[:, j]) + ")")
            print(f"   {med[j]:7.2f} us  {gbs:6.0f} GB/s  {gbs * 1e9 / copy:5.1%} of copy  rounds "
                  + " ".join(f"{t:.2f}" for t in times[:, j]) + kern + f"  {env or 'defaults'}", flush=True)


if __name__ == "__main__":
    main()
