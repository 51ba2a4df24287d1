"""Interleaved A/B of whole source trees on the sinks cases (device only): each tree (a directory holding a
``pagoda`` package, e.g. a copy with one kernel change) runs decode_sweep's sink cases in its own process
(PYTHONPATH=tree), with and without sinks, round after round, so machine drift falls on every tree alike.
FlashInfer is not loaded. Prints, per shape and case, each tree's median over the rounds (with sinks / without)
and each tree's error against the exact sink result.

    python scripts/tree_ab.py TREE [TREE ...] [--rounds 2] [--shapes base,gpt-oss] [--cases 8x1024,1x8192]
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np


def worker(shapes, cases):
    import pagoda.bench.decode_sweep as ds

    ds.SINK_CASES[:] = [c for c in ds.SINK_CASES if c[0] in cases]
    import torch

    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    rows = ds.sink_rows(None, ws, shapes=shapes)
    print(f"# pagoda from {os.path.dirname(ds.__file__)}", flush=True)
    print("ROWS " + json.dumps([{k: r[k] for k in ("shape", "case", "pagoda_us", "pagoda_nosink_us", "pagoda_err")}
                                for r in rows]), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trees", nargs="*")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--shapes", default="base,gpt-oss")
    ap.add_argument("--cases", default="8x1024,1x8192,1x32768")
    ap.add_argument("--worker", action="store_true")
    a = ap.parse_args()
    shapes, cases = a.shapes.split(","), a.cases.split(",")
    if a.worker:
        return worker(shapes, cases)
    if not a.trees:
        ap.error("name at least one tree")
    for t in a.trees:
        if not os.path.isdir(os.path.join(t, "pagoda")):
            ap.error(f"trees: {t!r} holds no pagoda package")
    res = {}  # (tree, shape, case) -> lists
    for rnd in range(a.rounds):
        for t in a.trees:
            for shape in shapes:  # (one shape a process, as decode_sweep --sink-shapes)
                env = dict(os.environ, PYTHONPATH=os.path.abspath(t))
                p = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", "--shapes", shape,
                                    "--cases", a.cases], env=env, capture_output=True, text=True)
                line = [ln for ln in p.stdout.splitlines() if ln.startswith("ROWS ")]
                print("".join(ln + "\n" for ln in p.stdout.splitlines() if ln.startswith("# pagoda from")), end="")
                if p.returncode or not line:
                    print(f"# {t} {shape}: failed (rc {p.returncode})\n{p.stderr[-3000:]}", flush=True)
                    continue
                for r in json.loads(line[0][5:]):
                    d = res.setdefault((t, r["shape"], r["case"]), {"s": [], "n": [], "e": []})
                    d["s"].append(r["pagoda_us"])
                    d["n"].append(r["pagoda_nosink_us"])
                    d["e"].append(r["pagoda_err"])
                    print(f"round {rnd} {t:20s} {r['shape']:8s} {r['case']:8s} sinks {r['pagoda_us']:9.1f} us  "
                          f"none {r['pagoda_nosink_us']:9.1f} us  err {r['pagoda_err']:.1e}", flush=True)
    print(f"\n{'tree':20s} {'shape':8s} {'case':8s} {'sinks us':>9} {'none us':>9} {'cost':>7} {'max err':>8}")
    for (t, shape, case), d in sorted(res.items(), key=lambda kv: (kv[0][1], kv[0][2], a.trees.index(kv[0][0]))):
        s, n = float(np.median(d["s"])), float(np.median(d["n"]))
        print(f"{t:20s} {shape:8s} {case:8s} {s:9.1f} {n:9.1f} {100 * (s / n - 1):+6.1f}% {max(d['e']):8.1e}")


if __name__ == "__main__":
    main()
