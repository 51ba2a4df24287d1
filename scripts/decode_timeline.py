"""Where a decode's time goes, program by program (device only): the Gluon decode kernel run with a TRACE buffer
(kernels/decode_sm90.py: %globaltimer stamps at each program's start and, per task, its start, first KV block
landed, loop end and epilogue end, and for a split chunk its partial stored, its arrival counted and the merge's
first round summed: prefill_sm90._stamp), after a read flush of L2.

    python scripts/decode_timeline.py [CASE ...]      # cases as in bench.attention: 1x32768 16x4096 64x2048 ...
    python scripts/decode_timeline.py --chunk 704 1x32768    # the planner's chunk length forced
    python scripts/decode_timeline.py --ring 4,1 1x32768     # the 16-bit kernel's ring stages and programs per SM
    python scripts/decode_timeline.py --head-dim 64 64x2048  # another head_dim (default 128; 32 / 8 heads)

Prints, per case: the CUDA-graph time (bench.attention.gpu_time), the span of the stamps (first program start to
last epilogue end), when programs start (median / max after the first), per-task phases (median / max): fetch
(task start -> first block landed: task, Q, page ids, first KV block), loop, epilogue (merging ones apart), and
a split chunk's epilogue (store, arrival; the merging chunk's first merge round and the rest) and the critical
program's breakdown (the one that ends last).
"""
import sys

import numpy as np
import torch

import pagoda
from pagoda.attention.kernels import decode_sm90
from pagoda.bench.attention import DECODE_CASES, PagedSetup, flush_l2, gpu_time

HQ, HK, D, PS, DT = 32, 8, 128, 16, torch.bfloat16


class _Traced:
    """Stands in for decode_sm90.decode_sm90_kernel: every launch gets TRACE=buf."""

    def __init__(self, kernel, buf):
        self.kernel, self.buf = kernel, buf

    def __getitem__(self, grid):
        return lambda *a, **kw: self.kernel[grid](*a, TRACE=self.buf, **kw)


def phases(tr):
    """Per task (program, round) from a trace [programs, 1 + SLOTS * rounds] (ns, -1 unused; the slots:
    prefill_sm90._stamp): (program, round, fetch, loop, epilogue, store, arrival, merge 1st round, merge rest) in
    us; the last four NaN where the task is not a split chunk / not the merging one."""
    rows = []
    k = decode_sm90.TRACE_SLOTS.value
    for p in range(tr.shape[0]):
        for r in range((tr.shape[1] - 1) // k):
            t = tr[p, 1 + k * r: 1 + k * (r + 1)].astype(np.float64)
            if (t[:4] < 0).any():
                break
            t[t < 0] = np.nan
            # store: loop end -> partial stored; arrival: -> counted; merge: -> first round summed -> epilogue end
            rows.append((p, r, (t[1] - t[0]) / 1e3, (t[2] - t[1]) / 1e3, (t[3] - t[2]) / 1e3, (t[4] - t[2]) / 1e3,
                         (t[5] - t[4]) / 1e3, (t[6] - t[5]) / 1e3, (t[3] - t[6]) / 1e3))
    return np.array(rows)


def main():
    args = sys.argv[1:]
    if "--chunk" in args:
        from pagoda.attention import plan as plan_mod

        i = args.index("--chunk")
        chunk = int(args[i + 1])
        del args[i: i + 2]
        plan_mod._choose_chunk_len_small = plan_mod._choose_chunk_len = lambda *a, **k: chunk
    if "--ring" in args:  # the Gluon decode kernel's ring and residency forced: --ring STAGES,PROGRAMS_PER_SM
        from pagoda.attention import runner

        i = args.index("--ring")
        stages, ctas = (int(x) for x in args[i + 1].split(","))
        del args[i: i + 2]
        runner.DECODE_GLUON_CONFIG[2] = dict(runner.DECODE_GLUON_CONFIG[2], stages=stages, ctas_per_sm=ctas)
        for key in [k for k in runner.DECODE_GLUON_CONFIG_BY_HEAD_DIM if k[0] == 2]:  # (at every head_dim)
            del runner.DECODE_GLUON_CONFIG_BY_HEAD_DIM[key]
        runner._gluon_decode_config.cache_clear()
    global D
    if "--head-dim" in args:  # (head_dim 64: 58-97% of the copy rate since session 26's 4 programs per SM)
        i = args.index("--head-dim")
        D = int(args[i + 1])
        del args[i: i + 2]
    want = args or ["1x32768", "16x4096", "64x2048", "1x1024"]
    cases = dict(DECODE_CASES)
    cases["1x1024"] = [1024]
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    slots = 1 + decode_sm90.TRACE_SLOTS.value * decode_sm90.TRACE_ROUNDS.value
    buf = torch.full((132 * 8, slots), -1, dtype=torch.int64, device="cuda")
    kernel = decode_sm90.decode_sm90_kernel
    for name in want:
        s = PagedSetup(cases[name], HK, D, PS, DT)
        q = torch.randn(len(cases[name]), HQ, D, dtype=DT, device="cuda")
        w = pagoda.BatchDecodeWithPagedKVCacheWrapper(ws)
        w.plan(s.indptr, s.indices, s.last, HQ, HK, D, PS, q_data_type=DT)
        out = w.run(q, s.cache)
        t_graph = gpu_time(lambda: w.run(q, s.cache, out=out)) * 1e6
        decode_sm90.decode_sm90_kernel = _Traced(kernel, buf)
        try:
            spans = []
            for _ in range(5):  # the last of a few runs (the first loads the traced kernel)
                buf.fill_(-1)
                flush_l2()
                w.run(q, s.cache, out=out)
                torch.cuda.synchronize()
                tr = buf.cpu().numpy()
                tr = tr[tr[:, 0] >= 0]
                spans.append(tr)
        finally:
            decode_sm90.decode_sm90_kernel = kernel
        tr = spans[-1]
        t0 = tr[:, 0].min()
        k = decode_sm90.TRACE_SLOTS.value
        ends = np.where(tr[:, 4::k] >= 0, tr[:, 4::k], 0).max(axis=1)
        span = (ends.max() - t0) / 1e3
        starts = (tr[:, 0] - t0) / 1e3
        ph = phases(tr)
        crit = int(ends.argmax())
        mine = ph[ph[:, 0] == crit]
        print(f"== {name} (head_dim {D}, chunk {w._plan.work.chunk_len}): {s.kv_bytes / 1e6:.0f} MB, "
              f"graph {t_graph:.1f} us, stamps span {span:.1f} us ({s.kv_bytes / span / 1e3:.0f} GB/s), {tr.shape[0]} programs, "
              f"{len(ph)} tasks")
        print(f"   program start after the first: median {np.median(starts):.2f} max {starts.max():.2f} us")
        for i, what in ((2, "fetch"), (3, "loop"), (4, "epilogue")):
            print(f"   {what:9s} median {np.median(ph[:, i]):6.2f}  p90 {np.percentile(ph[:, i], 90):6.2f}  "
                  f"max {ph[:, i].max():6.2f} us")
        # a split chunk's epilogue: its partial stored, its arrival counted; the merging chunk's merge (first
        # round of partial states summed, then the rest and the output)
        for i, what, rows in ((5, "store", ~np.isnan(ph[:, 5])), (6, "arrival", ~np.isnan(ph[:, 6])),
                              (7, "merge 1st", ~np.isnan(ph[:, 7])), (8, "merge rest", ~np.isnan(ph[:, 7]))):
            if rows.any():
                v = ph[rows, i]
                print(f"   {what:10s} median {np.median(v):5.2f}  p90 {np.percentile(v, 90):5.2f}  "
                      f"max {v.max():5.2f} us  ({rows.sum()} tasks)")
        print(f"   program ending last (#{crit}): start {starts[crit]:.2f} us, tasks (fetch, loop, epilogue; store, "
              f"arrival, merge 1st, merge rest): "
              + ", ".join("(" + ", ".join(f"{x:.2f}" for x in row[2:5]) + "; "
                          + ", ".join("-" if np.isnan(x) else f"{x:.2f}" for x in row[5:]) + ")" for row in mine))
        # working programs per SM (the SM id sits in each row's last slot) and the loop time by that count
        sm = tr[:, -1]
        busy = np.isin(np.arange(tr.shape[0]), ph[:, 0].astype(int))
        per_sm = np.bincount(sm[busy].astype(int), minlength=int(sm.max()) + 1)
        print("   SMs by working programs on them: "
              + ", ".join(f"{c}: {(per_sm == c).sum()}" for c in range(per_sm.max() + 1)))
        loop_of = {int(p): lp for p, r, _, lp, *_ in ph if r == 0}
        for c in range(1, per_sm.max() + 1):
            ls = [loop_of[p] for p in np.nonzero(busy)[0] if per_sm[int(sm[p])] == c and p in loop_of]
            if ls:
                print(f"   loop (round 0) of programs on SMs with {c}: median {np.median(ls):.2f} max {max(ls):.2f} us "
                      f"({len(ls)})")
        last_loop = np.where(tr[:, 3::k] >= 0, tr[:, 3::k], 0).max(axis=1)
        last_loop = last_loop[last_loop > 0]
        print(f"   last loop end {(last_loop.max() - t0) / 1e3:.2f} us; median program's last loop end "
              f"{(np.median(last_loop) - t0) / 1e3:.2f} us", flush=True)


if __name__ == "__main__":
    main()
