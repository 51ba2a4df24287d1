"""Session 17's probe (the engine integration measured slower and was reverted: commit d05461e has it and
scripts/prefetch_ab.py; benchmarks/results/notes.md, session 17).

Does an L2 prefetch of a GEMM's weight, issued on a side stream while a latency-bound kernel runs, make the
GEMM faster? (the engine's batch-1 decode)

One CUDA graph per row: L2 emptied by a 128 MB read, then [a 1-program kernel spinning T us (the norms /
attention of a decode step) -> the GEMM y = x @ W.T at one row], with, on a side stream forked after the
emptying read, prefetch_l2(W, P MB). Time per replay minus the same graph without the GEMM = the GEMM's cost.

    python scripts/l2_prefetch_probe.py [--table GRID,CHUNK,BLOCK,MODE] [--quick]
"""
import argparse

import torch
import triton
import triton.language as tl

import pagoda


# MODE 0 / 1 cut the byte range into CHUNK-byte pieces, one per thread and round, each prefetched by one
# instruction without a destination (0: cp.async.bulk.prefetch.L2, the TMA engine; 1: prefetch.global.L2, one
# 128-byte line); MODE 2 reads the bytes into registers (CHUNK bytes per program and round) and folds them into a
# word stored only if it equals a value the data does not reach (the store keeps the loads alive).
@triton.jit
def prefetch_l2_kernel(X, OUT, nbytes, CHUNK: tl.constexpr, BLOCK: tl.constexpr, MODE: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    if MODE == 2:
        words = X.to(tl.pointer_type(tl.int32))
        nwords = tl.multiple_of(nbytes // 4, 4)  # nbytes is a multiple of 16: 16-byte vector loads
        W: tl.constexpr = CHUNK // 4
        acc = tl.zeros([W], dtype=tl.int32)
        for start in range(pid * W, nwords, nprog * W):
            o = start + tl.arange(0, W)
            acc ^= tl.load(words + o, mask=o < nwords, other=0)
        folded = tl.reduce_or(acc, 0)
        if folded == -1234567:
            tl.store(OUT, folded)
    else:
        base = X.to(tl.pointer_type(tl.int8))
        nchunks = tl.cdiv(nbytes, CHUNK)
        for start in range(pid * BLOCK, nchunks, nprog * BLOCK):
            c = start + tl.arange(0, BLOCK)
            ok = c < nchunks
            # pieces past the end re-issue the range's first bytes (harmless) instead of a zero-byte prefetch
            off = tl.where(ok, c.to(tl.int64) * CHUNK, 0)
            if MODE == 0:
                size = tl.where(ok, tl.minimum(nbytes - off, CHUNK), 16).to(tl.int32)
                tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;", "=r,l,r",
                                          [base + off, size], dtype=tl.int32, is_pure=False, pack=1)
            else:
                tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [base + off],
                                          dtype=tl.int32, is_pure=False, pack=1)

_scratch = {}


def prefetch_l2(t, nbytes, num_programs, config):
    """Prefetch bytes [0, nbytes) of t into L2 with prefetch_l2_kernel; config (CHUNK, BLOCK, MODE)."""
    chunk, block, mode = config
    nbytes -= nbytes % 16
    grid = min(num_programs, triton.cdiv(nbytes, chunk * (block if mode != 2 else 1)))
    out = _scratch.setdefault(t.device, torch.zeros(1, dtype=torch.int32, device=t.device))
    prefetch_l2_kernel[(grid,)](t, out, nbytes, CHUNK=chunk, BLOCK=block, MODE=mode,
                                num_warps=4 if mode == 2 else max(1, block // 32))


@triton.jit
def _spin(OUT, ns):
    t0 = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)
    t = t0
    while t - t0 < ns:
        t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False,
                                      pack=1)
    tl.store(OUT, t - t0)


ap = argparse.ArgumentParser()
ap.add_argument("--quick", action="store_true")
ap.add_argument("--table", default=None, metavar="GRID,CHUNK,BLOCK,MODE",
                help="also the table of each GEMM x spin x prefetched MB with this configuration")
args = ap.parse_args()
dev = torch.device("cuda")
torch.manual_seed(0)
flush = torch.ones(128 << 17, dtype=torch.int64, device=dev)  # 128 MB, read by a sum: L2 keeps none of W
spin_out = torch.empty(1, dtype=torch.int64, device=dev)
H, I = 4096, 14336
shapes = {"qkv": (6144, H), "o": (H, H), "gate_up": (2 * I, H), "down": (H, I)}
W = {k: torch.randn(s, dtype=torch.bfloat16, device=dev) / 64 for k, s in shapes.items()}
X = {k: torch.randn(1, s[1], dtype=torch.bfloat16, device=dev) for k, s in shapes.items()}
side = torch.cuda.Stream()


def graph_time(body, reps=50, trials=3):
    """Least of trials of the mean time per replay over reps replays (us)."""
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        body()  # warm / compile
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        body()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(trials):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            g.replay()
        b.record()
        torch.cuda.synchronize()
        best = min(best, a.elapsed_time(b) / reps * 1e3)
    return best


def make(name, spin_us, mb, gemm=True, grid=132, cfg=(4096, 32, 0), small_m=None):
    w, x = W[name], X[name]
    nbytes = min(int(mb * (1 << 20)), w.numel() * 2)

    def body():
        flush.sum()
        cur = torch.cuda.current_stream()
        if nbytes:
            side.wait_stream(cur)
            with torch.cuda.stream(side):
                prefetch_l2(w, nbytes, num_programs=grid, config=cfg)
        if spin_us:
            _spin[(1,)](spin_out, int(spin_us * 1000), num_warps=1)
        if gemm:
            sm = small_m if small_m is not None else name in ("qkv", "o")
            pagoda.ops.linear(x, w, small_m=sm)
        if nbytes:
            cur.wait_stream(side)
    return body


print(torch.cuda.get_device_name(), "copy-rate reference: 4257 GB/s (session 16)")
CFGS = [  # (grid, (CHUNK, BLOCK, MODE))
    (132, (4096, 32, 0)), (264, (2048, 32, 0)), (132, (128, 128, 1)),
    (132, (16384, 0, 2)), (264, (16384, 0, 2)), (132, (32768, 0, 2)), (264, (8192, 0, 2)), (528, (8192, 0, 2)),
    (66, (16384, 0, 2))]
print("-- prefetch configurations: GEMM us with W prefetched during a spin (no prefetch first)")
for name, spin, mb in (("o", 10, 32), ("o", 4, 16), ("gate_up", 3, 16), ("qkv", 3, 8)):
    base = graph_time(make(name, spin, 0, gemm=False))
    t0 = graph_time(make(name, spin, 0)) - base
    row = []
    for grid, cfg in CFGS:
        row.append(graph_time(make(name, spin, mb, grid=grid, cfg=cfg)) - base)
    print(f"{name:8} spin {spin:2} us, {mb:3} MB: none {t0:6.1f} | " + " ".join(f"{v:6.1f}" for v in row))
print("   configs: " + " | ".join(f"{g}/{c[0]}/{c[1]}/{('bulk', 'line', 'load')[c[2]]}" for g, c in CFGS))
if not args.table:
    raise SystemExit(0)
best_grid, *best_cfg = (int(v) for v in args.table.split(","))
best_cfg = tuple(best_cfg)
print(f"{'gemm':8} {'MB':>6} {'spin us':>8} {'prefetch MB':>12} {'graph us':>9} {'gemm us':>8} {'GB/s':>7}")
for name in (["o", "qkv"] if args.quick else list(shapes)):
    mbw = W[name].numel() * 2 / (1 << 20)
    for spin in (0, 3, 10):
        base = graph_time(make(name, spin, 0, gemm=False))
        for mb in (0, 8, 16, 32, mbw):
            if mb > mbw:
                continue
            t = graph_time(make(name, spin, mb, grid=best_grid, cfg=best_cfg))
            g = t - base
            print(f"{name:8} {mbw:6.1f} {spin:8} {mb:12.1f} {t:9.1f} {g:8.1f} {W[name].numel() * 2 / g / 1e3:7.0f}")
