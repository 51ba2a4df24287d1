"""Does a kernel pay for the SM's shared-memory carveout changing under it? (device only)

Session 28's probes found the graph replay's time over the kernel's own time (CUPTI) at ~3.6-3.8 us for
pagoda's decode, FlashInfer's decode and a plain Triton read kernel, but ~1.8 us for torch.sum of the same bytes.
The kernels that pay the more use large shared memory; the harness's L2 flush (a torch.sum) uses little. If the
SMs must switch their L1 / shared-memory split between two kernels, the switch sits between the events. This
times each kernel's CUDA-graph replay after the flush as bench.attention does, then with a "primer" launched
between the flush and the first event: a 1-program-per-task empty kernel with no shared memory, and one with
the decode's shared memory per program (the SMs then already hold the large split when the events start).

    python scripts/carveout_probe.py
"""
import numpy as np
import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

import pagoda
from pagoda.bench.attention import PagedSetup, capture_graph, flush_l2, kernel_time
from read_floor_probe import read_kernel  # (scripts/: the plain streaming read)

SMS = torch.cuda.get_device_properties(0).multi_processor_count


@triton.jit
def empty_kernel(X):
    tl.store(X + tl.program_id(0), 1)


@gluon.jit
def smem_kernel(X, N: gl.constexpr):
    L: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    s = gl.allocate_shared_memory(gl.float32, [N], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    v = gl.arange(0, 128, layout=L).to(gl.float32)
    s.slice(0, 128).store(v)
    gl.store(X + gl.program_id(0) * 128 + gl.arange(0, 128, layout=L), s.slice(0, 128).load(L))


def timed(replay, primer, n=400):
    for _ in range(20):
        flush_l2()
        primer()
        replay()
    torch.cuda.synchronize()
    s = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    e = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        flush_l2()
        primer()
        s[i].record()
        replay()
        e[i].record()
    torch.cuda.synchronize()
    return float(np.median([a.elapsed_time(b) for a, b in zip(s, e)])) * 1e3


def main():
    scratch = torch.zeros(8 * SMS * 128, dtype=torch.float32, device="cuda")
    primers = {
        "none": lambda: None,
        "empty (no smem)": lambda: empty_kernel[(3 * SMS,)](scratch),
        "64 KB x 3/SM": lambda: smem_kernel[(3 * SMS,)](scratch, N=16384, num_warps=4),
        "128 KB x 1/SM": lambda: smem_kernel[(SMS,)](scratch, N=32768, num_warps=4),
    }
    # the decode of bench.attention's 1 x 32768 (32 / 8 heads, head_dim 128, page 16, bf16)
    s = PagedSetup([32768], 8, 128, 16, torch.bfloat16)
    q = torch.randn(1, 32, 128, dtype=torch.bfloat16, device="cuda")
    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"))
    w.plan(s.indptr, s.indices, s.last, 32, 8, 128, 16, q_data_type=torch.bfloat16)
    x = torch.randn(s.kv_bytes // 2, dtype=torch.bfloat16, device="cuda")
    iters = triton.cdiv(x.numel() // 528, 4096)
    grid = triton.cdiv(x.numel(), iters * 4096)
    out = torch.empty(grid, dtype=torch.float32, device="cuda")
    ops = {
        "decode 1x32768": lambda: w.run(q, s.cache),
        "triton read 134 MB": lambda: read_kernel[(grid,)](x, out, x.numel(), BLOCK=4096, ITERS=iters, num_warps=8),
        "torch.sum 134 MB": lambda: x.sum(),
        "empty graph kernel": lambda: empty_kernel[(3 * SMS,)](scratch),
        "smem kernel 64 KB x 3/SM": lambda: smem_kernel[(3 * SMS,)](scratch, N=16384, num_warps=4),
    }
    for p in primers.values():
        p()
    rk = read_kernel[(grid,)](x, out, x.numel(), BLOCK=4096, ITERS=iters, num_warps=8)
    print(f"# {torch.cuda.get_device_name()}, {SMS} SMs; read kernel shared {rk.metadata.shared} B")
    print("| op | kernel (CUPTI) us | " + " | ".join(f"graph after flush + {k} (us)" for k in primers) + " |")
    print("|---|---|" + "---|" * len(primers))
    for name, fn in ops.items():
        g = capture_graph(fn)
        kt = kernel_time(fn, name)
        cells = [timed(g.replay, p) for p in primers.values()]
        # twice, interleaved, so a drift shows
        cells2 = [timed(g.replay, p) for p in primers.values()]
        print(f"| {name} | {kt * 1e6 if kt else float('nan'):.2f} | "
              + " | ".join(f"{a:.2f} / {b:.2f}" for a, b in zip(cells, cells2)) + " |", flush=True)


if __name__ == "__main__":
    main()
