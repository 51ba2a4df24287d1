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
from in_graph_probe import empty_kernel  # noqa: E402
from read_floor_probe import read_kernel  # noqa: E402

import pagoda  # noqa: E402
from pagoda.bench.attention import PagedSetup, bench, copy_bandwidth, gpu_time, kernel_time  # noqa: E402


@triton.jit
def sum_kernel(X, OUT, n, BLOCK: tl.constexpr):
    """torch.sum's shape of work in Triton: one block a program, many programs, an atomic add each."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.atomic_add(OUT, tl.sum(tl.load(X + offs, mask=offs < n, other=0.0), 0), sem="relaxed")


def read_call(x, outs):
    """read_floor_probe's read of all of x (fp32) on 528 programs of 8 warps."""
    n = x.numel()
    return lambda: read_kernel[(528,)](x, outs, n, BLOCK=4096, ITERS=triton.cdiv(n, 528 * 4096), num_warps=8)


def decode_call(kv_lens, seed=0):
    """pagoda's decode of len(kv_lens) requests (32 / 8 heads of 128, bf16, page 16), planned, as a callable."""
    s = PagedSetup(kv_lens, 8, 128, 16, torch.bfloat16, seed=seed)
    q = torch.randn(len(kv_lens), 32, 128, dtype=torch.bfloat16, device="cuda")
    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"))
    w.plan(s.indptr, s.indices, s.last, 32, 8, 128, 16, q_data_type=torch.bfloat16)
    out = w.run(q, s.cache)
    return lambda: w.run(q, s.cache, out=out)


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
    n = mb134.numel()
    ops.append(("triton read 134 MB (528 x 8 warps)", read_call(mb134, torch.empty(4096, device="cuda"))))
    ops.append(("triton atomic sum 134 MB (8192 programs)", lambda: sum_kernel[(triton.cdiv(n, 4096),)](
        mb134, out1, n, BLOCK=4096, num_warps=8)))
    ops.append(("decode 1x32768", decode_call([32768])))
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
    mb134 = torch.randn(134217728 // 4, device="cuda")
    x1 = torch.zeros(4096, device="cuda")
    ops = [("torch.sum 134 MB", lambda: mb134.sum()),
           ("triton read 134 MB", read_call(mb134, outs)),
           ("decode 1x32768", decode_call([32768])),
           ("triton empty, 396 programs", lambda: empty_kernel[(396,)](x1))]
    fl = [("torch.sum 512 MB", A.flush_l2), ("triton read 512 MB", read_call(buf, outs)),
          ("decode 4x32768 (537 MB)", decode_call([32768] * 4, seed=1))]
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
