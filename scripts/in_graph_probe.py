"""A decode's cost inside a larger CUDA graph (bench.attention.in_graph_time) beside its single-call graph time
(gpu_time) and its kernels' own time (kernel_time), for bench.attention's decode cases, with a copy of the same
bytes and an empty kernel as references (device only):

    python scripts/in_graph_probe.py [--cases 1x32768,16x4096]
    python scripts/in_graph_probe.py --pdl-flush     # also the decode launched with enable_pdl (a) behind an L2
                                                     # flush that lets its dependents launch at its start, (b)
                                                     # behind the plain flush and a short kernel that does (as
                                                     # the engine's RoPE + append kernel does for the decode)
"""
import sys

import torch
import triton
import triton.language as tl

import pagoda
from pagoda.bench.attention import (DECODE_CASES, PagedSetup, _flush_buf, copy_bandwidth, flush_l2, gpu_time,
                                    in_graph_time, kernel_time, pdl_read_kernel, step_front)


@triton.jit
def empty_kernel(X):
    tl.store(X + tl.program_id(0), 1)


def pdl_flush():
    """flush_l2's emptying read (its 512 MB buffer) by bench.attention's pdl_read_kernel, which lets the kernel
    after it launch at its start."""
    flush_l2()  # (makes the buffer)
    buf = _flush_buf[0]
    grid = torch.cuda.get_device_properties(0).multi_processor_count * 8
    iters = buf.numel() // (grid * 4096)
    out = torch.empty(grid, device="cuda")
    return lambda: pdl_read_kernel[(grid,)](buf, out, ITERS=iters, BLOCK=4096, num_warps=8)


def us(x):
    return float("nan") if x is None else x * 1e6


def main():
    args = sys.argv[1:]
    names = args[args.index("--cases") + 1].split(",") if "--cases" in args else ["1x32768", "16x4096", "64x2048",
                                                                                   "128x1024", "32x8192"]
    copy = copy_bandwidth()
    print(f"# {torch.cuda.get_device_name()}; 1 GB copy {copy / 1e9:.0f} GB/s")
    print("| op | MB | kernel us | graph us | in-graph us | % of copy: kernel / graph / in-graph |")
    print("|---|---|---|---|---|---|")
    scratch = torch.zeros(4096, device="cuda")
    fn = lambda: empty_kernel[(396,)](scratch)  # noqa: E731
    k, g, i = kernel_time(fn, "empty"), gpu_time(fn, "empty"), in_graph_time(fn, "empty")
    print(f"| empty kernel (396 programs) | 0 | {us(k):.2f} | {us(g):.2f} | {us(i):.2f} | |", flush=True)
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for name, lens in DECODE_CASES:
        if name not in names:
            continue
        s = PagedSetup(lens, 8, 128, 16, torch.bfloat16)
        q = torch.randn(len(lens), 32, 128, dtype=torch.bfloat16, device="cuda")
        w = pagoda.BatchDecodeWithPagedKVCacheWrapper(ws)
        w.plan(s.indptr, s.indices, s.last, 32, 8, 128, 16, q_data_type=torch.bfloat16)
        out = w.run(q, s.cache)
        fn = lambda: w.run(q, s.cache, out=out)  # noqa: E731
        a = torch.empty(s.kv_bytes // 2, dtype=torch.uint8, device="cuda")
        b = torch.empty_like(a)
        fn_pdl = lambda: w.run(q, s.cache, out=out, enable_pdl=True)  # noqa: E731
        for what, f in ((f"decode {name}", fn), (f"decode {name}, enable_pdl", fn_pdl),
                        (f"copy of its {s.kv_bytes / 1e6:.0f} MB", lambda: b.copy_(a))):
            k = kernel_time(f, what) if what.startswith("decode") else None
            g, i = gpu_time(f, what), in_graph_time(f, what)
            pct = lambda t: float("nan") if t is None else s.kv_bytes / t / copy * 100  # noqa: E731
            print(f"| {what} | {s.kv_bytes / 1e6:.0f} | {us(k):.2f} | {us(g):.2f} | {us(i):.2f} | "
                  f"{pct(k):.1f} / {pct(g):.1f} / {pct(i):.1f} |", flush=True)
            if "--pdl-flush" in args and what.endswith("enable_pdl"):
                i = in_graph_time(f, what, flush=pdl_flush())
                print(f"| {what}, behind a flush that triggers | {s.kv_bytes / 1e6:.0f} | | | {us(i):.2f} | "
                      f"- / - / {pct(i):.1f} |", flush=True)
                short = step_front()
                early = lambda: w.run(q, s.cache, out=out, enable_pdl=True, pdl_early_kv=True)  # noqa: E731
                for label, ff in (("", fn), (", enable_pdl", f),
                                  (", enable_pdl + pdl_early_kv (the engine's)", early)) * 2:
                    i = in_graph_time(ff, what, flush=short)
                    print(f"| decode {name}{label}, behind a flush + a short kernel that "
                          f"triggers | {s.kv_bytes / 1e6:.0f} | | | {us(i):.2f} | - / - / {pct(i):.1f} |", flush=True)


if __name__ == "__main__":
    main()
