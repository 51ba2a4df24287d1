"""SASS of a kernel's innermost loop, offline (no GPU): compiles the scripts/compile_check.py cases whose names
contain the given words for sm_90, finds the shortest backward branch around a tensor-core instruction (the
KV loop of an attention kernel) and counts its instructions by opcode. Session 12 cut the Gluon decode kernel
from 725 to 356 instructions per 64-token block this way before it ever ran.

    python scripts/sass_loop.py decode_sm90 [--maxnreg 128] [--dump]    # --dump prints the loop's SASS
"""
import collections
import os
import re
import subprocess
import sys
import tempfile

import triton

import compile_check as cc

MMA = ("HMMA", "HGMMA", "QGMMA")


def loop_body(sass: str) -> list[str]:
    """The instructions of the shortest loop (a backward BRA) that contains an MMA."""
    lines = [ln for ln in sass.splitlines() if re.search(r"/\*[0-9a-f]{4,5}\*/", ln)]
    addr = [int(re.search(r"/\*([0-9a-f]{4,5})\*/", ln).group(1), 16) for ln in lines]
    ins = [re.sub(r"\s*/\*[0-9a-f]{4,5}\*/\s*", "", ln.split(";")[0]).strip() for ln in lines]
    best = None
    for i, text in enumerate(ins):
        m = re.search(r"BRA 0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr[i] and int(m.group(1), 16) in addr:
            j = addr.index(int(m.group(1), 16))
            body = ins[j:i + 1]
            if any(op in x for x in body for op in MMA) and (best is None or len(body) < len(best)):
                best = body
    return best or []


def main():
    args = sys.argv[1:]
    maxnreg = int(args[args.index("--maxnreg") + 1]) if "--maxnreg" in args else None
    words = [a for i, a in enumerate(args) if not a.startswith("--") and (i == 0 or args[i - 1] != "--maxnreg")]
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    cases = [(*c, 3) for c in cc.cases()] + list(cc.attention_cases()) + list(cc.gluon_cases()) + list(
        cc.decode_sm90_cases())
    for name, fn, types, consts, warps, stages, *regs in cases:
        if words and not any(w in name for w in words):
            continue
        k = cc.compile_one(fn, types, consts, warps, stages, maxnreg or (regs[0] if regs else None))
        with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
            f.write(k.asm["cubin"])
        body = loop_body(subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout)
        ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", x).split()[0].split(".")[0] for x in body)
        print(f"{name}{cc.ptxas_report(k)[:40]}: loop {len(body)} instructions", dict(ops.most_common(16)))
        if "--dump" in args:
            print("\n".join(body))


if __name__ == "__main__":
    main()
