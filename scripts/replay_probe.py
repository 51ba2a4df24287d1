"""Where a single-kernel graph replay's extra time comes from (device only). Between a replay's events and its
kernel's own time (CUPTI) sat ~3.6-3.8 us for Triton kernels (pagoda's decode, a plain Triton read, an empty
Triton kernel) but ~1.7 us for torch.sum of the same bytes (session 32). For each op: kernel time, single-call
graph time, and the eager launch's time between the same events (the host is ahead: each call follows a ~120 us
L2 flush), and the empty Triton kernel also launched through the driver's plain cuLaunchKernel (ctypes), so that
Triton's launcher, the graph and the kernel's own start can be told apart:

    python scripts/replay_probe.py
    python scripts/replay_probe.py --flushes     # each op's kernel and graph time after three L2 flushes of 512 MB:
                                                 # torch.sum (the harness's), a Triton read, pagoda's decode
"""
import ctypes
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from read_floor_probe import read_kernel  # noqa: E402

import pagoda  # noqa: E402
from pagoda.bench.attention import PagedSetup, bench, copy_bandwidth, gpu_time, kernel_time  # noqa: E402


@triton.jit
def empty_kernel(X):
    tl.store(X + tl.program_id(0), 1)


@triton.jit
def sum_kernel(X, OUT, n, BLOCK: tl.constexpr):
    """torch.sum's shape of work in Triton: one block a program, many programs, an atomic add each."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.atomic_add(OUT, tl.sum(tl.load(X + offs, mask=offs < n, other=0.0), 0), sem="relaxed")


def raw_launcher(kernel, grid, args):
    """kernel (a CompiledKernel) launched by cuLaunchKernel on the current stream, the pointer args then
    Triton's two scratch pointers (null)."""
    cuda = ctypes.CDLL("libcuda.so.1")
    kernel._init_handles()
    vals = [ctypes.c_uint64(a.data_ptr()) for a in args] + [ctypes.c_uint64(0), ctypes.c_uint64(0)]
    params = (ctypes.c_void_p * len(vals))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in vals])
    block = 32 * kernel.metadata.num_warps

    def launch():
        rc = cuda.cuLaunchKernel(ctypes.c_void_p(kernel.function), grid, 1, 1, block, 1, 1,
                                 kernel.metadata.shared, ctypes.c_void_p(torch.cuda.current_stream().cuda_stream),
                                 params, None)
        if rc != 0:
            raise RuntimeError(f"cuLaunchKernel: {rc}")
    launch.keep = (vals, params)
    return launch


def main():
    copy = copy_bandwidth()
    print(f"# {torch.cuda.get_device_name()}; 1 GB copy {copy / 1e9:.0f} GB/s")
    ops = []
    x1 = torch.zeros(4096, device="cuda")
    k = empty_kernel[(396,)](x1)
    ops.append(("triton empty, 1 program", lambda: empty_kernel[(1,)](x1)))
    ops.append(("triton empty, 396 programs", lambda: empty_kernel[(396,)](x1)))
    ops.append(("same, by cuLaunchKernel", raw_launcher(k, 396, [x1])))
    ops.append(("torch add_, 1 element", lambda: x1[:1].add_(1)))
    big = torch.randn(1 << 20, device="cuda")
    ops.append(("torch add_, 4 MB", lambda: big.add_(1)))
    mb134 = torch.randn(134217728 // 4, device="cuda")
    out1 = torch.zeros(1, device="cuda")
    ops.append(("torch.sum 134 MB", lambda: mb134.sum()))
    outs = torch.empty(4096, device="cuda")
    n = mb134.numel()
    ops.append(("triton read 134 MB (528 x 8 warps)", lambda: read_kernel[(528,)](
        mb134, outs, n, BLOCK=4096, ITERS=triton.cdiv(n, 528 * 4096), num_warps=8)))
    ops.append(("triton atomic sum 134 MB (8192 programs)", lambda: sum_kernel[(triton.cdiv(n, 4096),)](
        mb134, out1, n, BLOCK=4096, num_warps=8)))
    s = PagedSetup([32768], 8, 128, 16, torch.bfloat16)
    q = torch.randn(1, 32, 128, dtype=torch.bfloat16, device="cuda")
    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"))
    w.plan(s.indptr, s.indices, s.last, 32, 8, 128, 16, q_data_type=torch.bfloat16)
    o = w.run(q, s.cache)
    ops.append(("decode 1x32768", lambda: w.run(q, s.cache, out=o)))
    print("| op | kernel us | graph us | eager us | graph - kernel | eager - kernel |")
    print("|---|---|---|---|---|---|")
    for what, fn in ops:
        fn()
        torch.cuda.synchronize()
        kt = kernel_time(fn, what)
        kt = float("nan") if kt is None else kt * 1e6
        g = gpu_time(fn, what) * 1e6
        e = bench(fn) * 1e6
        print(f"| {what} | {kt:.2f} | {g:.2f} | {e:.2f} | {g - kt:.2f} | {e - kt:.2f} |", flush=True)


def flushes():
    """Is the extra ~2 us the op's kernel being cold (its code, its descriptors) after a flush by another kernel?
    torch.sum's replay sat 2 us closer to its kernel than anything else's, and the harness's flush is torch.sum."""
    import pagoda.bench.attention as A

    copy_bandwidth()
    A.flush_l2()
    buf = A._flush_buf[0]  # 512 MB fp32
    outs = torch.empty(4096, device="cuda")
    nb = buf.numel()
    read512 = lambda: read_kernel[(528,)](buf, outs, nb, BLOCK=4096, ITERS=triton.cdiv(nb, 528 * 4096),  # noqa
                                          num_warps=8)
    big = PagedSetup([32768] * 4, 8, 128, 16, torch.bfloat16, seed=1)  # 537 MB
    qb = torch.randn(4, 32, 128, dtype=torch.bfloat16, device="cuda")
    wb = pagoda.BatchDecodeWithPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"))
    wb.plan(big.indptr, big.indices, big.last, 32, 8, 128, 16, q_data_type=torch.bfloat16)
    ob = wb.run(qb, big.cache)
    decode537 = lambda: wb.run(qb, big.cache, out=ob)  # noqa: E731
    mb134 = torch.randn(134217728 // 4, device="cuda")
    n = mb134.numel()
    s = PagedSetup([32768], 8, 128, 16, torch.bfloat16)
    q = torch.randn(1, 32, 128, dtype=torch.bfloat16, device="cuda")
    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"))
    w.plan(s.indptr, s.indices, s.last, 32, 8, 128, 16, q_data_type=torch.bfloat16)
    o = w.run(q, s.cache)
    x1 = torch.zeros(4096, device="cuda")
    ops = [("torch.sum 134 MB", lambda: mb134.sum()),
           ("triton read 134 MB", lambda: read_kernel[(528,)](mb134, outs, n, BLOCK=4096,
                                                               ITERS=triton.cdiv(n, 528 * 4096), num_warps=8)),
           ("decode 1x32768", lambda: w.run(q, s.cache, out=o)),
           ("triton empty, 396 programs", lambda: empty_kernel[(396,)](x1))]
    fl = [("torch.sum 512 MB", A.flush_l2), ("triton read 512 MB", read512), ("decode 4x32768 (537 MB)", decode537)]
    print("| op | " + " | ".join(f"after {f}: kernel / graph / gap us" for f, _ in fl) + " |")
    print("|---|" + "---|" * len(fl))
    orig = A.flush_l2
    try:
        for what, fn in ops:
            fn()
            cells = []
            for _, f in fl:
                A.flush_l2 = f
                kt = kernel_time(fn, what)
                kt = float("nan") if kt is None else kt * 1e6
                g = gpu_time(fn, what) * 1e6
                cells.append(f"{kt:.2f} / {g:.2f} / {g - kt:.2f}")
            print(f"| {what} | " + " | ".join(cells) + " |", flush=True)
    finally:
        A.flush_l2 = orig


if __name__ == "__main__":
    flushes() if "--flushes" in sys.argv else main()
