"""The fastest plain read of a decode case's bytes this harness can time: a Triton kernel that streams a contiguous
bf16 tensor and sums it (wide loads, no other work), over a sweep of grid sizes, block sizes and warps, graph time
(bench.attention.gpu_time) and kernel time (kernel_time), against the 1 GB copy rate. What any decode of those
bytes could at best reach in the same harness (a decode reads the same bytes and also merges, masks, pages).
Device only:

    python scripts/read_floor_probe.py [--mb 134,268]
"""
import sys

import numpy as np
import torch
import triton
import triton.language as tl

from pagoda.bench.attention import copy_bandwidth, gpu_time, kernel_time


@triton.jit
def read_kernel(X, OUT, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.float32)
    base = pid.to(tl.int64) * ITERS * BLOCK
    for i in tl.range(ITERS, num_stages=3):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(X + offs, mask=offs < n, other=0.0, cache_modifier=".cg").to(tl.float32)
    tl.store(OUT + pid, tl.sum(acc, 0))


def main():
    args = sys.argv[1:]
    sizes = [int(x) for x in (args[args.index("--mb") + 1] if "--mb" in args else "134,268").split(",")]
    copy = copy_bandwidth()
    print(f"# copy bandwidth {copy / 1e9:.0f} GB/s")
    for mb in sizes:
        nbytes = mb * 1000 * 1000 // 65536 * 65536
        x = torch.randn(nbytes // 2, dtype=torch.bfloat16, device="cuda")
        ref = x.float().sum().item()
        rows = []
        for block in (1024, 4096):
            for programs in (264, 396, 528, 1056, 2112, 4224):
                iters = triton.cdiv(x.numel() // programs, block)
                grid = triton.cdiv(x.numel(), iters * block)
                out = torch.empty(grid, dtype=torch.float32, device="cuda")
                for warps in (4, 8):
                    fn = (lambda b=block, it=iters, g=grid, o=out, w=warps:
                          read_kernel[(g,)](x, o, x.numel(), BLOCK=b, ITERS=it, num_warps=w))
                    fn()
                    torch.cuda.synchronize()
                    assert abs(out.sum().item() - ref) <= 1e-3 * max(1.0, abs(ref)) + 1.0, (out.sum().item(), ref)
                    g = gpu_time(fn, "read") * 1e6
                    kt = kernel_time(fn, "read")
                    rows.append((g, np.nan if kt is None else kt * 1e6, block, grid, iters, warps))
        rows.sort()
        print(f"== {nbytes / 1e6:.0f} MB: the 6 fastest by graph time")
        for g, kt, block, grid, iters, warps in rows[:6]:
            print(f"   graph {g:7.2f} us ({nbytes / g / 1e3 * 1e9 / copy:5.1%} of copy)  kernel {kt:7.2f} us "
                  f"({nbytes / kt / 1e3 * 1e9 / copy:5.1%})  block {block} programs {grid} iters {iters} "
                  f"warps {warps}", flush=True)
        best_k = min(rows, key=lambda r: r[1])
        print(f"   fastest by kernel time: {best_k[1]:.2f} us ({nbytes / best_k[1] / 1e3 * 1e9 / copy:5.1%}), "
              f"block {best_k[2]} programs {best_k[3]} warps {best_k[5]}")


if __name__ == "__main__":
    main()
