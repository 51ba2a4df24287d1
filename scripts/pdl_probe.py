"""Programmatic dependent launch (PDL) for the batch-1 decode step's chain of kernels (device).

A decode step at batch 1 is ~10 short kernels a layer; each starts (launch, first loads) only once the one
before has finished. With PDL (ops/kernels/pdl.py) a small-M linear launches while its predecessor runs and
waits for it before touching memory.

Times CUDA-graph replays of chains of Llama-3.1-8B-shaped projections at one row, each with its own weights
(so nothing stays in L2 between them): 32 o projections (4096 x 4096), and 32 qkv -> o pairs (6144 x 4096,
then 4096 x 4096 on q's columns), with cuBLAS and with the small-M kernel without and with PDL
(its output must equal the one without, bit for bit). Session 11 (H200) also measured where the next kernel
may launch and an L2 prefetch of the weights before the wait (kernels/matmul.py's docstring has the numbers):

    chain      cublas  no PDL  PDL(trigger at start)  PDL(after the wait)  PDL(after the loop)  + L2 prefetch
    o x32      12.76   11.99   16.97                  11.34                11.66                14.6-18.1
    qkv+o x32  14.66   13.75   18.18                  13.11                13.48                17.5-20.5

Session 11 also timed, with this script, the small-M kernel with an RMSNorm / the MLP activation applied to
its input tile in the loop (since removed: kernels/matmul.py's docstring has the numbers).

    python scripts/pdl_probe.py
"""
import torch

import pagoda
from pagoda.bench.attention import gpu_time

LAYERS = 32


def main():
    torch.manual_seed(0)
    dt = torch.bfloat16
    wo = [torch.randn(4096, 4096, dtype=dt, device="cuda") / 64 for _ in range(LAYERS)]
    wqkv = [torch.randn(6144, 4096, dtype=dt, device="cuda") / 64 for _ in range(LAYERS)]
    x0 = torch.randn(1, 4096, dtype=dt, device="cuda")
    floor_o = 4096 * 4096 * 2
    floor_pair = floor_o + 6144 * 4096 * 2

    def chain_o(mode):
        x = x0
        for w in wo:
            x = torch.nn.functional.linear(x, w) if mode == "cublas" else pagoda.ops.linear(x, w, small_m=True,
                                                                                            pdl=mode)
        return x

    def chain_pair(mode):
        x = x0
        for wq, w in zip(wqkv, wo):
            if mode == "cublas":
                x = torch.nn.functional.linear(torch.nn.functional.linear(x, wq)[:, :4096], w)
            else:
                h = pagoda.ops.linear(x, wq, small_m=True, pdl=mode)
                x = pagoda.ops.linear(h[:, :4096], w, small_m=True, pdl=mode)
        return x

    print(f"# {torch.cuda.get_device_name()}: us per projection (CUDA-graph replay of the chain / its length)")
    print(f"{'chain':10s} {'variant':8s} {'us/proj':>8s} {'GB/s':>7s}")
    for name, fn, per, nbytes in (("o x32", chain_o, LAYERS, floor_o), ("qkv+o x32", chain_pair, 2 * LAYERS,
                                                                           floor_pair / 2)):
        ref = None
        for mode in ("cublas", False, True):
            out = fn(mode)
            if mode is False:
                ref = out
            elif ref is not None:
                assert torch.equal(out, ref), f"{name} PDL: output differs from the launch without"
            t = gpu_time(lambda: fn(mode), f"{name} {mode}") / per * 1e6
            label = {"cublas": "cublas", False: "no PDL", True: "PDL"}[mode]
            print(f"{name:10s} {label:8s} {t:8.2f} {nbytes / t / 1e3:7.0f}", flush=True)


if __name__ == "__main__":
    main()
