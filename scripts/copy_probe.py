"""Why the attention bench's "same-bytes copy" ran at ~2.7 TB/s for copies of 537-550 MB each way where smaller and
larger ones ran at 4.2-4.3 (notes.md sessions 26 and 34): a device-to-device copy of N MB each way timed three
ways, each after the bench's L2 flush: torch's copy_ captured in a CUDA graph (a memcpy node: what
bench.attention.same_bytes_copy_us timed until session 34; the elementwise kernel since), the same copy_ launched eagerly (a cudaMemcpyAsync on the stream: what
copy_bandwidth times for its 1 GB), and an elementwise kernel that moves the same bytes (a multiply by 1 over float32
views) in a graph. Device only:

    python scripts/copy_probe.py [--mb 134,268,400,512,537,600,1024]
"""
import sys

import torch

from pagoda.bench.attention import bench, gpu_time


def main():
    args = sys.argv[1:]
    sizes = [int(x) for x in (args[args.index("--mb") + 1] if "--mb" in args else "67,134,268,400,512,537,600,1024")
             .split(",")]
    print(f"# {torch.cuda.get_device_name()}; GB/s = 2 x MB moved each way / time")
    print(f"{'MB each way':>11} | {'graph memcpy us':>15} {'GB/s':>6} | {'eager memcpy us':>15} {'GB/s':>6} | "
          f"{'graph kernel us':>15} {'GB/s':>6}")
    for mb in sizes:
        n = mb * 1000 * 1000 // 16 * 16
        a = torch.empty(n, dtype=torch.uint8, device="cuda")
        b = torch.empty_like(a)
        af, bf = a.view(torch.float32), b.view(torch.float32)
        af.normal_()
        t = [gpu_time(lambda: b.copy_(a), "memcpy"), bench(lambda: b.copy_(a)),
             gpu_time(lambda: torch.mul(af, 1.0, out=bf), "kernel copy")]
        print(f"{mb:11d} | " + " | ".join(f"{x * 1e6:15.1f} {2 * n / x / 1e9:6.0f}" for x in t), flush=True)
        a = b = af = bf = None  # (freed before the next size)


if __name__ == "__main__":
    main()
