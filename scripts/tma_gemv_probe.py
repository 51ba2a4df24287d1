"""Probe (session 23): a one-token GEMV whose X / W tiles are TMA copies (Triton tensor descriptors, host-made)
against pagoda's small-M kernel (cp.async) and cuBLAS, Llama-3.1-8B's four projections, CUDA-graph replays with
L2 flushed. Question: does a TMA W stream raise the kernels' read rate (the small-M kernel reads 3.4-3.9 TB/s,
the DRAM ~4.4)?

    python scripts/tma_gemv_probe.py [--configs 32,256,4 ...]   (BLOCK_N,BLOCK_K,num_stages)
"""
import argparse

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

import pagoda
from pagoda.bench.attention import copy_bandwidth, gpu_time


@triton.jit
def gemv_tma_kernel(x_desc, w_desc, Y, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([16, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = x_desc.load([0, k0])
        w = w_desc.load([pid * BLOCK_N, k0])
        acc = tl.dot(x, tl.trans(w), acc)
    offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row = tl.arange(0, 16)
    tl.store(Y + row[:, None] * 0 + offs[None, :], acc.to(Y.dtype.element_ty),
             mask=(row < 1)[:, None] & (offs < N)[None, :])


SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="*", default=["32,256,4", "32,256,3", "32,128,6", "32,128,8", "32,64,12",
                                                      "64,128,4", "64,64,8", "16,256,6", "16,128,10"])
    args = ap.parse_args()
    copy_bw = copy_bandwidth()
    print(f"# {torch.cuda.get_device_name()}, copy {copy_bw / 1e9:.0f} GB/s; us per call (graph, L2 flushed)")
    cfgs = [tuple(int(v) for v in c.split(",")) for c in args.configs]
    print(f"{'':<9}{'copy':>7}{'cuBLAS':>8}{'smallM':>8}" + "".join(f"{'tma ' + c:>14}" for c in args.configs))
    for name, (n, k) in SHAPES.items():
        x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
        xp = torch.zeros(16, k, dtype=torch.bfloat16, device="cuda")
        xp[0] = x[0]
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") / k ** 0.5
        ref = torch.nn.functional.linear(x, w).float()
        y = torch.empty(1, n, dtype=torch.bfloat16, device="cuda")
        line = f"{name:<9}{w.numel() * 2 / copy_bw * 1e6:7.1f}"
        line += f"{gpu_time(lambda: torch.nn.functional.linear(x, w)) * 1e6:8.1f}"
        line += f"{gpu_time(lambda: pagoda.ops.linear(x, w, out=y, small_m=True)) * 1e6:8.1f}"
        for bn, bk, st in cfgs:
            xd = TensorDescriptor.from_tensor(xp, [16, bk])
            wd = TensorDescriptor.from_tensor(w, [bn, bk])
            y.fill_(float("nan"))

            def run():
                gemv_tma_kernel[(triton.cdiv(n, bn),)](xd, wd, y, n, k, BLOCK_N=bn, BLOCK_K=bk, num_warps=4,
                                                       num_stages=st)
            try:
                run()
                err = ((y.float() - ref).norm() / ref.norm()).item()
                assert err < 1e-2, err
                line += f"{gpu_time(run) * 1e6:14.1f}"
            except Exception as e:  # noqa: BLE001 - a probe: name the failure, go on
                line += f"{type(e).__name__[:13]:>14}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
