"""Bring a tensor's bytes into the GPU's L2 cache ahead of the kernel that reads them (Hopper and later).

MODE 0 and 1 cut the byte range into CHUNK-byte pieces; program p takes pieces p * BLOCK .. p * BLOCK + BLOCK - 1,
then the same again nprog * BLOCK pieces later, one piece per thread and round. A thread prefetches its piece with
one instruction that has no destination (nothing waits for it) and the program exits; the memory system fills L2
after the program has gone. MODE 0: ``cp.async.bulk.prefetch.L2`` (the TMA engine, a piece of any multiple of 16
bytes); MODE 1: ``prefetch.global.L2`` (the load path, one 128-byte line: CHUNK must be 128). MODE 2 reads the
bytes (int32 words, CHUNK bytes per program and round) into registers and folds them into one word, stored to
OUT only if it equals a value no range of nonzero weights reaches in practice (the store keeps the loads alive).
ops/prefetch.py launches it on a side stream so that the DRAM idles less while a chain of latency-bound kernels
runs (a decode step's norms, RoPE, attention) before the GEMM that reads the bytes.
"""
import triton
import triton.language as tl


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
