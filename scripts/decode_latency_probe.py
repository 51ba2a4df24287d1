"""Where the time of a small decode goes (device): the engine's batch-1 step runs 32 decodes of 1 x 1024 at
~15.7 us each (profile, session 10), for 4 MB of KV that the copy bandwidth moves in ~1 us.

Times pagoda's decode (32 / 8 heads, head_dim 128, page 16, bf16) at a few small shapes, each with
  grid     the persistent grid (SMs x programs per SM: idle programs only fetch a task id and count
           themselves out), one program per SM, or exactly one program per task;
  chunk    the planner's KV chunk length, or a forced one;
as CUDA-graph replays with L2 flushed (bench.attention.gpu_time), next to an empty kernel's replay (what a
replay costs by itself).

    python scripts/decode_latency_probe.py            # the table
    python scripts/decode_latency_probe.py --quick    # the planner's chunk vs 128 / 256 / 512, persistent grid
    python scripts/decode_latency_probe.py --same-tasks   # 256 tasks of 128 tokens, 4 to 32 chunks per tile
    python scripts/decode_latency_probe.py --ncu      # eager launches only, for ncu (default variant first:
        ncu --clock-control none -k regex:attention_kernel --metrics gpu__time_duration.sum python ... --ncu)
    python scripts/decode_latency_probe.py --gemma [--quick]   # Gemma-2-9B's attention instead: 16 / 8 heads of
                                                              # 256, logits soft cap 50 (the planner's chunk vs
                                                              # 64..512 with --quick)
    python scripts/decode_latency_probe.py [--gemma] --fp8 --quick   # over an fp8 (e4m3) cache: the planner's
                                                              # "decode-fp8" entries' chunk vs 64..1024
"""
import sys

import torch
import triton
import triton.language as tl

import pagoda
from pagoda.attention import plan as plan_mod
from pagoda.attention import runner
from pagoda.bench.attention import PagedSetup, gpu_time

HQ, HK, D, PS, DT = 32, 8, 128, 16, torch.bfloat16
CASES = [(1, 1024), (1, 2048), (2, 1024), (1, 4096), (4, 1024), (8, 1024), (1, 32768)]
CAP = None  # the logits soft cap (--gemma: 50)
if "--gemma" in sys.argv:
    HQ, HK, D, CAP = 16, 8, 256, 50.0
    CASES = [(1, 1024), (1, 2048), (1, 4096), (2, 1024), (4, 1024), (8, 1024), (16, 1024)]
KV_DT = torch.float8_e4m3fn if "--fp8" in sys.argv else DT  # (scales 1: randn fits e4m3)
SCALES = dict(k_scale=1.0, v_scale=1.0) if KV_DT != DT else {}
_small, _large, _programs = plan_mod._choose_chunk_len_small, plan_mod._choose_chunk_len, runner.num_programs


@triton.jit
def _empty_kernel(X):
    tl.store(X + tl.program_id(0), 1)


def variant(grid: str, chunk: int | None):
    """Patch the planner and the grid size for the next plan() of a fresh wrapper."""
    plan_mod._choose_chunk_len_small = (lambda *a: chunk) if chunk else _small
    plan_mod._choose_chunk_len = (lambda *a: chunk) if chunk else _large
    if grid == "persistent":
        runner.num_programs = _programs
    elif grid == "per-SM":
        runner.num_programs = lambda dev, cfg: _programs(dev, cfg) // cfg.ctas_per_sm
    else:  # "per-task": set after the plan knows its task count (below)
        runner.num_programs = _programs


def build(b, ctx, grid, chunk, ws):
    s = PagedSetup([ctx] * b, HK, D, PS, DT, kv_dtype=KV_DT)
    q = torch.randn(b, HQ, D, generator=torch.Generator().manual_seed(1)).to(DT).cuda()  # same q per variant
    variant(grid, chunk)
    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(ws)
    w.plan(s.indptr, s.indices, s.last, HQ, HK, D, PS, q_data_type=DT, kv_data_type=KV_DT, logits_soft_cap=CAP)
    if grid == "per-task":
        tasks = len(w._plan.work.work) * HK  # (one head split per KV head: the whole group in one program)
        runner.num_programs = lambda dev, cfg: tasks
        w = pagoda.BatchDecodeWithPagedKVCacheWrapper(ws)
        w.plan(s.indptr, s.indices, s.last, HQ, HK, D, PS, q_data_type=DT, kv_data_type=KV_DT, logits_soft_cap=CAP)
    variant("persistent", None)
    return s, q, w


def reference(s, q):
    """float64 decode of every request of setup s (float64, on the GPU)."""
    outs = []
    for r, n in enumerate(s.kv_lens):
        pages = s.indices[s.indptr[r]:s.indptr[r + 1]].long().cuda()
        k = s.cache[pages, 0].reshape(-1, HK, D)[:n].double()
        v = s.cache[pages, 1].reshape(-1, HK, D)[:n].double()
        qq = q[r].double().view(HK, HQ // HK, D)
        sc = torch.einsum("hgd,nhd->hgn", qq, k) / D ** 0.5
        p = (sc if CAP is None else CAP * torch.tanh(sc / CAP)).softmax(-1)
        outs.append(torch.einsum("hgn,nhd->hgd", p, v).reshape(HQ, D))
    return torch.stack(outs)


def same_tasks(ws):
    """1x4096 took 28.0 us and 4x1024 21.4 at the same 256 tasks of 128 tokens (session 11): the number of
    chunks a split tile merges (32 vs 8; one arrival counter per tile and KV head) is the suspect. Every row
    here has 256 tasks of 128 tokens; only the chunks per tile change."""
    print(f"{'case':9s} {'chunks/tile':>11s} {'us':>7s}")
    for b, ctx in ((1, 4096), (2, 2048), (4, 1024), (8, 512)):
        s, q, w = build(b, ctx, "persistent", 128, ws)
        out = w.run(q, s.cache, **SCALES)
        ref = reference(s, q)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        t = gpu_time(lambda: w.run(q, s.cache, out=out, **SCALES)) * 1e6
        bad = "" if err < 1e-2 else f"  WRONG: rel. error {err:.3g}"
        print(f"{b}x{ctx:<7d} {ctx // 128:11d} {t:7.1f}{bad}", flush=True)


def main():
    ncu = "--ncu" in sys.argv
    if "--same-tasks" in sys.argv:
        same_tasks(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"))
        return
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    x = torch.zeros(1024, dtype=torch.int32, device="cuda")
    if not ncu:
        t_empty = gpu_time(lambda: _empty_kernel[(1,)](x)) * 1e6
        t_empty528 = gpu_time(lambda: _empty_kernel[(528,)](x)) * 1e6
        print(f"# empty kernel replay: 1 program {t_empty:.1f} us, 528 programs {t_empty528:.1f} us")
        print(f"{'case':9s} {'grid':>10s} {'chunk':>6s} {'programs':>8s} {'tasks':>6s} {'us':>7s}")
    variants = [("persistent", None), ("per-SM", None), ("per-task", None), ("persistent", 64),
                ("persistent", 128), ("persistent", 256), ("per-task", 64), ("per-SM", 128), ("persistent", 32)]
    if "--quick" in sys.argv:  # the planner's choice against forced 128 / 256 / 512 chunks, persistent grid only
        variants = [("persistent", None), ("persistent", 128), ("persistent", 256), ("persistent", 512)]
        if CAP is not None or KV_DT != DT:
            variants.insert(1, ("persistent", 64))
        if KV_DT != DT:  # (the fp8 entries' tuned item_cost is 2048)
            variants.append(("persistent", 1024))
    for b, ctx in CASES:
        for grid, chunk in variants:
            if ncu and (b, ctx) != (1, 1024):
                continue
            s, q, w = build(b, ctx, grid, chunk, ws)
            out = w.run(q, s.cache, **SCALES)
            ref = reference(s, q)  # (each build draws its own cache)
            err = ((out.double() - ref).norm() / ref.norm()).item()
            if ncu:
                for _ in range(3):
                    w.run(q, s.cache, out=out, **SCALES)
                torch.cuda.synchronize()
                print(f"# ncu launches (1 + 3): {b}x{ctx} grid {grid} chunk {chunk} programs {w._plan.grid}")
                continue
            t = gpu_time(lambda: w.run(q, s.cache, out=out, **SCALES)) * 1e6
            err2 = ((out.double() - ref).norm() / ref.norm()).item()
            bad = "" if max(err, err2) < 1e-2 else f"  WRONG: rel. error {err:.3g} eager, {err2:.3g} replayed"
            print(f"{b}x{ctx:<7d} {grid:>10s} {str(w._plan.work.chunk_len):>6s} {w._plan.grid:8d} "
                  f"{len(w._plan.work.work) * HK:6d} {t:7.1f}{bad}", flush=True)


if __name__ == "__main__":
    main()
