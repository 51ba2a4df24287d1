"""Programmatic dependent launch (PDL) inside pagoda's kernels (Hopper and later).

A kernel launched with PDL (Triton's launch_pdl; ops/_dispatch.py pdl_launch) may start while the kernel
before it in the stream still runs. Every such kernel calls ``pdl_enter`` before its first memory access:
it waits for the previous kernel to finish and its writes to be visible (griddepcontrol.wait), then lets
the next kernel launch (griddepcontrol.launch_dependents). Waiting first keeps the chain transitive: a
kernel cannot finish before its predecessor has, so a later kernel's wait covers every earlier one. What
it buys is the launch and the programs' start-up, overlapped with the previous kernel's tail
(scripts/pdl_probe.py: 32 chained projections, 11.99 -> 11.34 us each on the H200).

Two kernels read some memory before their wait, memory no kernel of the chain writes: the Gluon decode kernel
its plan (written by plan() before the step; kernels/decode_sm90.py) and, asked with pdl_tables_early,
rope_append_kernel its positions, cos / sin rows and page tables (the engine's step inputs, host copies). Being
loaded ahead, their round trips overlap the kernel before instead of following it. Either way the wait comes
before the first read of anything the chain writes, and before every write.
"""
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
