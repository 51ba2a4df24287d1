"""Compile pagoda's Triton kernels for sm_90 on any machine (no GPU): catches errors that the
interpreter lets through (constexpr rules, types) before device time is spent.

    python scripts/compile_check.py [name ...]
"""
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_one(fn, types, consts, num_warps=4, num_stages=3):
    names = fn.arg_names
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in names}
    ptrs = [i for i, n in enumerate(names) if sig[n].startswith("*")]
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()},
                    attrs={(i,): [["tt.divisibility", 16]] for i in ptrs})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    return k


def cases():
    from pagoda.ops.kernels import rope, sampling
    f32 = dict(P="*fp32", OUT="*i32", TOP_K="*i32", TOP_P="*fp32", MIN_P="*fp32", k_val="i32", p_val="fp32",
               m_val="fp32", X="*fp32", Y="*fp32")
    for filt in range(5):
        for rows in (False, True):
            yield f"sample FILTER={filt} rows={rows}", sampling.sample_kernel, f32, dict(
                FILTER=filt, K_ROWS=rows, P_ROWS=rows, M_ROWS=rows, BLOCK=4096), 16
    for mode in range(3):
        yield f"filter MODE={mode}", sampling.filter_kernel, f32, dict(MODE=mode, K_ROWS=True, P_ROWS=False,
                                                                         BLOCK=4096), 16
    bf = dict(Q="*bf16", K="*bf16", QO="*bf16", KO="*bf16", POS="*i32", FREQ="*fp32", COS_SIN="*fp32")
    for cache in (False, True):
        yield f"rope FROM_CACHE={cache}", rope.rope_kernel, bf, dict(BLOCK_H=32, BLOCK_R=64, BLOCK_D=128,
                                                                      INTERLEAVE=False, FROM_CACHE=cache,
                                                                      COPY_REST=True), 4


def main():
    want = sys.argv[1:]
    failed = 0
    for name, fn, types, consts, warps in cases():
        if want and not any(w in name for w in want):
            continue
        try:
            k = compile_one(fn, types, consts, warps)
            print(f"ok   {name}: {k.metadata.shared} B shared")
        except Exception as e:  # noqa: BLE001 - report every kernel, then fail
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {str(e)[:2000]}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
