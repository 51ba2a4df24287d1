"""Masks and sparsity: what skipping masked blocks buys, one GPU, one run.

    python -m pagoda.bench.sparse [--json FILE]

1. Sliding-window prefill (window 1024 over 16k tokens, causal) against full causal prefill:
   with window_left= (the planner trims each tile's KV range) and with a sink_window variant
   (mask_mod: the kernel evaluates the mask per block and skips empty ones). Ideal: ~1/8.
2. Block-sparse attention at 8k (R = C = 64) at densities 10/25/50/100%: time should follow
   the number of non-empty blocks.
3. First-call time of a new variant (a fresh Triton function: one compilation of the kernel).
Llama-3.1-8B attention shape (32/8 heads, head_dim 128), bf16.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import pagoda

from .attention import bench, write_json


def window_rows(ws, hq, hk, d):
    L, W = 16384, 1024
    q = torch.randn(L, hq, d, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(L, hk, d, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    rows = []
    for name, kw, var in (("full causal", {}, None), ("window_left=1024", {"window_left": W}, None),
                          ("sink_window(0, 1024) variant", {}, pagoda.variants.sink_window(0, W))):
        w = pagoda.BatchPrefillWithRaggedKVCacheWrapper(ws, variant=var)
        w.plan([0, L], [0, L], hq, hk, d, causal=True, q_data_type=torch.bfloat16, **kw)
        out = w.run(q, k, v)
        rows.append({"case": f"1x16384 {name}", "us": bench(lambda: w.run(q, k, v, out=out)) * 1e6})
    for r in rows:
        r["x_full"] = r["us"] / rows[0]["us"]
    return rows


def sparse_rows(ws, hq, hk, d):
    M = N = 8192
    R = C = 64
    q = torch.randn(M, hq, d, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(N, hk, d, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    rng = np.random.default_rng(0)
    rows = []
    for dens in (0.1, 0.25, 0.5, 1.0):
        nb = N // C
        per = max(1, int(round(nb * dens)))
        cols = [np.sort(rng.choice(nb, size=per, replace=False)) for _ in range(M // R)]
        indptr = torch.tensor(np.concatenate([[0], np.cumsum([len(c) for c in cols])]))
        indices = torch.tensor(np.concatenate(cols))
        w = pagoda.BlockSparseAttentionWrapper(ws)
        w.plan(indptr, indices, M, N, R, C, hq, hk, d, q_data_type=torch.bfloat16)
        out = w.run(q, k, v)
        t = bench(lambda: w.run(q, k, v, out=out)) * 1e6
        flops = 4 * hq * d * int(indptr[-1]) * R * C
        rows.append({"case": f"8k block-sparse {int(dens * 100)}%", "us": t, "blocks": int(indptr[-1]),
                     "tflops": flops / (t * 1e-6) / 1e12})
    for r in rows:
        r["x_full"] = r["us"] / rows[-1]["us"]
    return rows


def compile_row(hq, hk, d):
    """A variant the process has never seen: its first call compiles the kernel once."""
    src = ("import triton\nimport triton.language as tl\n@triton.jit\n"
           f"def fresh_bias_{time.time_ns()}(score, b, h, q_pos, kv_pos, params):\n"
           "    return score - 0.001 * (q_pos - kv_pos).to(tl.float32)\n")
    import importlib.util
    import os
    import tempfile

    path = os.path.join(tempfile.mkdtemp(), "fresh_variant.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("fresh_variant", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    fn = next(getattr(mod, n) for n in dir(mod) if n.startswith("fresh_bias_"))
    var = pagoda.AttentionVariant("fresh", score_mod=fn, torch_score_mod=lambda s, b, h, q, k, p: s - 0.001 * (q - k))
    q = torch.randn(512, hq, d, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(512, hk, d, dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    pagoda.single_prefill_with_kv_cache(q, k, k, causal=True, variant=var)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    pagoda.single_prefill_with_kv_cache(q, k, k, causal=True, variant=var)
    torch.cuda.synchronize()
    return {"case": "first call of a new variant", "first_s": first, "second_s": time.perf_counter() - t0}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    hq, hk, d = 32, 8, 128
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    print(f"# device: {torch.cuda.get_device_name()}, torch {torch.__version__}, heads {hq}/{hk}, head_dim {d}, bf16")
    rows = window_rows(ws, hq, hk, d) + sparse_rows(ws, hq, hk, d)
    comp = compile_row(hq, hk, d)
    print(f"\n{'case':<40} {'time':>10} {'x full':>7} {'TF/s':>6}")
    for r in rows:
        tf = f"{r['tflops']:6.0f}" if "tflops" in r else f"{'-':>6}"
        print(f"{r['case']:<40} {r['us']:9.1f}u {r['x_full']:6.3f} {tf}")
    print(f"{comp['case']:<40} first call {comp['first_s']:.2f} s (compile + run), second {comp['second_s'] * 1e3:.1f} ms")
    write_json(args.json, rows, args, compile=comp)


if __name__ == "__main__":
    main()
