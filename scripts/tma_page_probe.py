"""Does a TMA copy of one 16-token page land right in a row slice of a prefill ring slot? (device, seconds)

The next lever for the paged Gluon prefill (notes.md, session 13: paged runs 3-8% behind ragged on 128-token
blocks; the producer gathers rows with cp.async and loads one page id per row): one bulk copy per page and K / V
instead, the paged cache viewed as rows of its slot stride (NHD [pages, 2, page_size, kv_heads, head_dim]: row
(2 * page + kv) * page_size + slot, column head * head_dim) with a [page_size, head_dim] box. Such a box lands in
rows 16 i .. 16 i + 15 of a [128, head_dim] NVMMA (128-byte swizzle) ring slot, a row slice that at head_dim 128 is
two pieces of the swizzled tile. This probe copies the pages of one 128-token block that way into a slot, reads
the slot back through the layout the consumers' wgmma reads, and compares it with the gathered rows in PyTorch.

    python scripts/tma_page_probe.py          # prints the max abs error per head_dim / layout (0.0: it works)
"""
import sys

import torch

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError as e:  # other Triton versions
    sys.exit(f"needs Triton 3.6's Gluon: {e}")


@gluon.jit
def _page_probe_kernel(DESC, PAGE_IDS, OUT, head, KV: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                       PAGE_SIZE: gl.constexpr, num_warps: gl.constexpr):
    """Copies the BLOCK_N // PAGE_SIZE pages PAGE_IDS[i] (K: KV = 0, V: 1) of KV head ``head`` of an NHD cache
    (DESC: its 2-D view, the heads side by side in a row) into one [BLOCK_N, HEAD_DIM] slot, page i into rows
    PAGE_SIZE i .., then stores the slot to OUT [BLOCK_N, HEAD_DIM]."""
    SMEM: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    slot = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_N, HEAD_DIM], SMEM)
    bar = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    mbarrier.init(bar.index(0), count=1)
    mbarrier.expect(bar.index(0), BLOCK_N * HEAD_DIM * 2)
    for i in gl.static_range(BLOCK_N // PAGE_SIZE):
        page = gl.load(PAGE_IDS + i)
        tma.async_copy_global_to_shared(DESC, [(2 * page + KV) * PAGE_SIZE, head * HEAD_DIM], bar.index(0),
                                        slot.slice(i * PAGE_SIZE, PAGE_SIZE))
    mbarrier.wait(bar.index(0), 0)
    L: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (HEAD_DIM // 8), HEAD_DIM // 8], [num_warps, 1], [1, 0])
    x = slot.load(L)
    r = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, L))
    c = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, L))
    gl.store(OUT + gl.expand_dims(r, 1) * HEAD_DIM + gl.expand_dims(c, 0), x)


def main():
    torch.manual_seed(0)
    pages, ps, hk, block_n = 64, 16, 8, 128
    layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    for d in (64, 128):
        cache = torch.randn(pages, 2, ps, hk, d, dtype=torch.bfloat16, device="cuda")  # NHD
        ids = torch.randperm(pages, device="cuda")[: block_n // ps].to(torch.int32)
        desc = TensorDescriptor.from_tensor(cache.view(pages * 2 * ps, hk * d), [ps, d], layout)
        for kv in (0, 1):
            for head in (0, hk - 1):
                out = torch.full((block_n, d), float("nan"), dtype=torch.bfloat16, device="cuda")
                _page_probe_kernel[(1,)](desc, ids, out, head, KV=kv, BLOCK_N=block_n, HEAD_DIM=d, PAGE_SIZE=ps,
                                         num_warps=4)
                want = cache[ids.long(), kv, :, head, :].reshape(block_n, d)
                err = (out.float() - want.float()).abs().max().item()
                print(f"head_dim {d} {'KV'[kv]} head {head}: max abs error {err}", flush=True)


if __name__ == "__main__":
    main()
