"""Where the time of ops.mlp_one_token goes (Llama-3.1-8B's MLP at one token, H100 / H200): %globaltimer stamps
of each program (kernels/mlp.py TRACE) at its start, its last gate / up tile done, the grid barrier left and its
last down piece done, one eager launch after an L2 flush, per configuration; with each configuration's CUDA-graph
time and the separate kernels' (cuBLAS gate / up, the activation, the small-M down projection) for reference.

    python scripts/mlp_timeline.py [--configs 256,4,4,16,32:2 ...]   (BLOCK_K,warps,stages,BH,BLOCK_N:per_sm)
"""
import argparse

import torch

import pagoda
from pagoda.bench.attention import copy_bandwidth, gpu_time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="*", default=["256,4,4,16,32:2", "256,4,4,16,32:1", "256,4,8,16,32:1",
                                                      "512,4,3,16,32:2", "128,4,8,16,32:2", "256,8,4,16,32:2",
                                                      "256,4,4,32,64:1"])
    ap.add_argument("--split", type=int, default=2)
    args = ap.parse_args()
    hidden, d = 4096, 14336
    copy_bw = copy_bandwidth()
    w_gu = torch.randn(2 * d, hidden, dtype=torch.bfloat16, device="cuda") / hidden ** 0.5
    w_d = torch.randn(hidden, d, dtype=torch.bfloat16, device="cuda") / d ** 0.5
    r0 = torch.randn(1, hidden, dtype=torch.bfloat16, device="cuda")
    r = r0.clone()
    flush = torch.empty(512 * 2 ** 20, dtype=torch.uint8, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gu_mb, d_mb = w_gu.numel() * 2 / 1e6, w_d.numel() * 2 / 1e6
    print(f"# {torch.cuda.get_device_name()}, copy {copy_bw / 1e9:.0f} GB/s; gate/up {gu_mb:.0f} MB, down "
          f"{d_mb:.0f} MB (copy rate {gu_mb * 1e6 / copy_bw * 1e6:.1f} + {d_mb * 1e6 / copy_bw * 1e6:.1f} us)")
    t_gu = gpu_time(lambda: torch.nn.functional.linear(r, w_gu)) * 1e6
    gu = torch.nn.functional.linear(r, w_gu)
    t_act = gpu_time(lambda: pagoda.silu_and_mul(gu, norm_input=r, norm_eps=1e-5)) * 1e6
    h = pagoda.silu_and_mul(gu)
    t_down = gpu_time(lambda: pagoda.ops.linear(h, w_d, small_m=True, residual=r, out=r, split_k=2)) * 1e6
    print(f"separate (graph, us): cuBLAS gate/up {t_gu:.1f} ({gu_mb * 1e3 / t_gu:.0f} GB/s), act {t_act:.1f}, "
          f"small-M down split 2 {t_down:.1f} ({d_mb * 1e3 / t_down:.0f} GB/s)")
    print(f"{'config:per_sm':<22}{'graph':>7}{'p1 med':>8}{'p1 max':>8}{'GB/s':>6}{'bar out':>8}{'p2 med':>8}"
          f"{'p2 max':>8}{'GB/s':>6}")
    for item in args.configs:
        cfg_s, per_sm = item.split(":")
        cfg = tuple(int(v) for v in cfg_s.split(","))
        programs = int(per_sm) * sms
        trace = torch.zeros(programs, 4, dtype=torch.int64, device="cuda")
        try:
            pagoda.ops.mlp_one_token(r, w_gu, w_d, rms_norm_eps=1e-5, split=args.split, config=cfg,
                                     programs=programs)
        except (ValueError, RuntimeError) as e:
            print(f"{item:<22} not run: {e}")
            continue
        t = gpu_time(lambda: pagoda.ops.mlp_one_token(r, w_gu, w_d, rms_norm_eps=1e-5, split=args.split,
                                                      config=cfg, programs=programs)) * 1e6
        rows = []
        for _ in range(5):
            flush.fill_(1)
            torch.cuda.synchronize()
            pagoda.ops.mlp_one_token(r, w_gu, w_d, rms_norm_eps=1e-5, split=args.split, config=cfg,
                                     programs=programs, trace=trace)
            torch.cuda.synchronize()
            s = (trace - trace[:, 0].min()).double() / 1e3  # us from the first program's start
            rows.append((s[:, 1].median(), s[:, 1].max(), s[:, 2].min(), s[:, 3].median(), s[:, 3].max(),
                         s[:, 2].max()))
        p1m, p1x, bo, p2m, p2x, box = (sorted(v)[2] for v in zip(*rows))
        print(f"{item:<22}{t:7.1f}{p1m:8.1f}{p1x:8.1f}{gu_mb * 1e3 / p1x:6.0f}{bo:8.1f}{p2m:8.1f}{p2x:8.1f}"
              f"{d_mb * 1e3 / (p2x - bo):6.0f}   (barrier left {bo:.1f}-{box:.1f})", flush=True)


if __name__ == "__main__":
    main()
