"""Decode-batch linear layers: pagoda's small-M kernel (ops/matmul.py) against torch (cuBLAS) on one GPU.

    python -m pagoda.bench.linear [--rows 1] [--json FILE] [--splits 1,2,4,7]

Llama-3.1-8B's projections at M = rows (qkv 6144x4096, o 4096x4096, gate_up 28672x4096, down 4096x14336),
CUDA-graph replays with L2 flushed (bench.attention.gpu_time), bandwidth of the weight read against the
device-to-device copy measured in the same run. Every configuration in CONFIGS is timed (and checked
against torch); the last lines name the best configuration over the four shapes and the projections where
it beats torch in isolation, as `PAGODA_SMALL_M_CONFIG=...` and `PAGODA_SMALL_M_LINEAR=...`, environment
settings to try in `python -m pagoda.bench.engine --cases latency` (in the engine a kernel that only ties
can still win: it saves cuBLAS's split-K reduction launch).

--splits: also each projection with the residual added in place (the engine's o / down in its one-token layers)
on the default configuration at each K split (ops.linear split_k; PAGODA_SMALL_M_SPLIT in the engine), against
cuBLAS's ``r.addmm_(x, w.T)``.
"""
from __future__ import annotations

import argparse
import json

import torch

import pagoda
from pagoda.bench.attention import gpu_time
from pagoda.bench.attention import copy_bandwidth

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
# (BLOCK_N, BLOCK_K, num_warps, num_stages)
CONFIGS = [(16, 256, 4, 6), (16, 256, 4, 4), (16, 128, 4, 8), (32, 256, 4, 4), (32, 128, 4, 6), (16, 512, 4, 4),
           (16, 512, 8, 3), (64, 128, 4, 4), (16, 128, 4, 4), (32, 64, 4, 8), (32, 256, 4, 3), (32, 256, 4, 2)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--splits", default=None, help="comma-separated K splits, e.g. 1,2,4,7")
    ap.add_argument("--only-splits", action="store_true", help="skip the configuration sweep")
    ap.add_argument("--fused", action="store_true",
                    help="also the one-token fused kernels (linear_silu_and_mul, linear_rope_append) against the "
                         "launches they replace, then stop")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    copy_bw = copy_bandwidth()
    dev = torch.cuda.get_device_name()
    print(f"# device: {dev}, torch {torch.__version__}, rows {args.rows}, bf16, copy {copy_bw / 1e9:.0f} GB/s")
    rows, times = [], {}
    if args.fused:
        fused_table(copy_bw)
        return
    if args.splits:
        splits = [int(v) for v in args.splits.split(",")]
        print(f"\n{'residual in place, us':<24}{'cuBLAS addmm_':>14}" + "".join(f"{'split ' + str(v):>10}"
                                                                              for v in splits))
        for name, (n, k) in SHAPES.items():
            x = torch.randn(args.rows, k, dtype=torch.bfloat16, device="cuda")
            w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") / k ** 0.5
            r = torch.randn(args.rows, n, dtype=torch.bfloat16, device="cuda")
            ref = r.float() + torch.nn.functional.linear(x, w).float()
            rt = r.clone()  # the timed calls add into rt again and again; r stays the reference's residual
            t_cublas = gpu_time(lambda: rt.addmm_(x, w.t()), f"cuBLAS addmm_ {name}") * 1e6
            line = f"{name:<24}{t_cublas:13.1f}u"
            for sk in splits:
                y = r.clone()
                pagoda.ops.linear(x, w, out=y, residual=y, small_m=True, split_k=sk)
                err = ((y.float() - ref).norm() / ref.norm()).item()
                assert err < 1e-2, f"{name} split {sk}: rel err {err:.3g}"
                t = gpu_time(lambda: pagoda.ops.linear(x, w, out=rt, residual=rt, small_m=True, split_k=sk),
                             f"split {sk} {name}") * 1e6
                line += f"{t:9.1f}u"
                rows.append(dict(shape=name, split_k=sk, residual_us=t, cublas_addmm_us=t_cublas))
            print(line + f"   ({n * k * 2 / copy_bw * 1e6:.1f}u at the copy rate)", flush=True)
        if args.only_splits:
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(dict(device=dev, copy_GBps=copy_bw / 1e9, rows=rows), f, indent=1)
            return
    for name, (n, k) in SHAPES.items():
        x = torch.randn(args.rows, k, dtype=torch.bfloat16, device="cuda")
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") / k ** 0.5
        ref = torch.nn.functional.linear(x, w)
        t_torch = gpu_time(lambda: torch.nn.functional.linear(x, w), f"torch {name}") * 1e6
        out = torch.empty_like(ref)
        for cfg in CONFIGS:
            out.fill_(float("nan"))
            pagoda.ops.linear(x, w, out=out, small_m=True, config=cfg)
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            assert err < 1e-2, f"{name} {cfg}: differs from torch, rel err {err:.3g}"
            times[(name, cfg)] = gpu_time(lambda: pagoda.ops.linear(x, w, out=out, small_m=True, config=cfg),
                                          f"small-M {name}") * 1e6
        best = min(CONFIGS, key=lambda c: times[(name, c)])
        nbytes = n * k * 2
        row = dict(shape=name, n=n, k=k, rows=args.rows, torch_us=t_torch,
                   small_m_us={",".join(map(str, c)): times[(name, c)] for c in CONFIGS},
                   best=",".join(map(str, best)))
        rows.append(row)
        print(f"{name:8s} {n:6d}x{k:<6d} torch {t_torch:7.1f}u {nbytes / t_torch / 1e3:5.0f} GB/s | best "
              f"{best} {times[(name, best)]:7.1f}u {nbytes / times[(name, best)] / 1e3:5.0f} GB/s "
              f"({nbytes / times[(name, best)] * 1e6 / copy_bw:.0%} of copy) {t_torch / times[(name, best)]:5.2f}x",
              flush=True)
    overall = min(CONFIGS, key=lambda c: sum(times[(s, c)] for s in SHAPES))
    print(f"\n{'config (bn,bk,warps,stages)':<28}" + "".join(f"{s:>10}" for s in SHAPES))
    print(f"{'torch (cuBLAS)':<28}" + "".join(f"{r['torch_us']:9.1f}u" for r in rows))
    for c in CONFIGS:
        mark = " <- best" if c == overall else ""
        print(f"{str(c):<28}" + "".join(f"{times[(s, c)]:9.1f}u" for s in SHAPES) + mark)
    wins = [r["shape"] for r in rows if times[(r["shape"], overall)] < r["torch_us"]]
    print(f"PAGODA_SMALL_M_CONFIG={','.join(map(str, overall))}")
    print(f"PAGODA_SMALL_M_LINEAR={','.join(wins) or 'none'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=dev, copy_GBps=copy_bw / 1e9, rows=rows, best=",".join(map(str, overall)),
                           wins=wins), f, indent=1)


def fused_table(copy_bw: float) -> None:
    """Llama-3.1-8B at one token, both sides with the deferred norm's factor as the engine runs them: gate / up +
    SwiGLU (cuBLAS + silu_and_mul(norm_input=), vs linear_silu_and_mul) and qkv + RoPE + append (small-M with
    the norm factor + rope_append, vs linear_rope_append), then the fused kernels at each configuration of
    CONFIGS' (BLOCK_K, num_warps, num_stages) (session 19: the first form of this table ran the unfused qkv
    without the norm factor)."""
    hidden, inter, hq, hk, d, ps = 4096, 14336, 32, 8, 128, 16
    x = torch.randn(1, hidden, dtype=torch.bfloat16, device="cuda")
    w_gu = torch.randn(2 * inter, hidden, dtype=torch.bfloat16, device="cuda") / hidden ** 0.5
    h = torch.empty(1, inter, dtype=torch.bfloat16, device="cuda")
    ref_h = pagoda.silu_and_mul(torch.nn.functional.linear(x, w_gu), norm_input=x, norm_eps=1e-5).float()
    t_ref = gpu_time(lambda: pagoda.silu_and_mul(torch.nn.functional.linear(x, w_gu), out=h, norm_input=x,
                                                 norm_eps=1e-5), "gate_up+act") * 1e6
    fused_gu = lambda cfg=None: pagoda.ops.linear_silu_and_mul(x, w_gu, out=h, rms_norm_eps=1e-5,  # noqa: E731
                                                               config=cfg)
    t_fused = gpu_time(fused_gu, "fused") * 1e6
    floor = w_gu.numel() * 2 / copy_bw * 1e6
    print(f"\ngate_up + SwiGLU   cuBLAS + act {t_ref:7.1f}u   fused {t_fused:7.1f}u   (copy rate {floor:.1f}u)")
    n_rows = (hq + 2 * hk) * d
    w_qkv = torch.randn(n_rows, hidden, dtype=torch.bfloat16, device="cuda") / hidden ** 0.5
    cache = torch.zeros(512, 2, ps, hk, d, dtype=torch.bfloat16, device="cuda")
    half = d // 2
    ang = torch.arange(8192, dtype=torch.float64)[:, None] / (500000.0 ** (torch.arange(half) / half))[None, :]
    cos_sin = torch.cat([ang.cos(), ang.sin()], -1).float().cuda()
    pos = torch.tensor([1000], dtype=torch.int32, device="cuda")
    bidx = torch.zeros(1, dtype=torch.int32, device="cuda")
    kv_indices = torch.arange(128, dtype=torch.int32, device="cuda")
    kv_indptr = torch.tensor([0, 128], dtype=torch.int32, device="cuda")
    last = torch.tensor([1000 % ps + 1], dtype=torch.int32, device="cuda")
    q = torch.empty(1, hq, d, dtype=torch.bfloat16, device="cuda")

    def unfused(eps=1e-5):
        qkv = pagoda.ops.linear(x, w_qkv, small_m=True, rms_norm_eps=eps)
        qq, kk, vv = qkv.split([hq * d, hk * d, hk * d], dim=-1)
        pagoda.apply_rope_with_cos_sin_cache_and_append(pos, qq, kk, vv, d, cos_sin, True, cache, bidx, kv_indices,
                                                        kv_indptr, last, check=False)

    t_ref = gpu_time(unfused, "qkv+rope_append") * 1e6
    t_plain = gpu_time(lambda: unfused(None), "qkv+rope_append, no norm") * 1e6
    t_proj = gpu_time(lambda: pagoda.ops.linear(x, w_qkv, small_m=True, rms_norm_eps=1e-5), "qkv") * 1e6
    fused_qkv = lambda cfg=None: pagoda.ops.linear_rope_append(x, w_qkv, None, q, pos, cos_sin,  # noqa: E731
                                                               cache, bidx, kv_indices, kv_indptr, last, hq, hk,
                                                               d, rms_norm_eps=1e-5, config=cfg)
    t_fused = gpu_time(fused_qkv, "fused qkv") * 1e6
    floor = w_qkv.numel() * 2 / copy_bw * 1e6
    print(f"qkv + RoPE/append  small-M + rope {t_ref:7.1f}u   fused {t_fused:7.1f}u   (copy rate {floor:.1f}u; "
          f"the small-M projection alone {t_proj:.1f}u, both without the norm factor {t_plain:.1f}u)")
    print(f"\n{'fused kernels by (BLOCK_K, warps, stages), us':<48}{'gate_up+act':>12}{'qkv+rope':>10}")
    fused_qkv()
    ref_q = q.float()  # (the default configuration's q, itself tested against float64 in tests/ops)
    for cfg in dict.fromkeys((0,) + c[1:] for c in CONFIGS):  # (BLOCK_N unused by these kernels)
        fused_gu(cfg)
        fused_qkv(cfg)
        for name, got, ref in (("linear_silu_and_mul", h, ref_h), ("linear_rope_append", q, ref_q)):
            err = ((got.float() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, f"{name} {cfg[1:]}: rel err {err:.3g}"
        print(f"{str(cfg[1:]):<48}{gpu_time(lambda: fused_gu(cfg), 'fused') * 1e6:11.1f}u"
              f"{gpu_time(lambda: fused_qkv(cfg), 'fused qkv') * 1e6:9.1f}u", flush=True)


if __name__ == "__main__":
    main()
