"""Where a decode step's time goes: torch.profiler over a few steps of the engine on the device.

    python scripts/profile_engine.py [--batch 64] [--ctx 1024] [--backend pagoda] [--eager] [--no-async]
                                     [--breakdown] [--gaps]
"""
import argparse
import time

import numpy as np
import torch

import pagoda

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="Llama-3.1-8B")
ap.add_argument("--batch", type=int, default=64)
ap.add_argument("--ctx", type=int, default=1024)
ap.add_argument("--backend", default="pagoda")
ap.add_argument("--eager", action="store_true")
ap.add_argument("--no-async", action="store_true", help="async_scheduling=False")
ap.add_argument("--breakdown", action="store_true", help="host time of each part of a step (no profiler tables)")
ap.add_argument("--gaps", action="store_true",
                help="also the GPU timeline: for each kernel, its median time and the median idle time from its "
                     "end to the next kernel's start (kernels inside the CUDA graphs, from the profiler's trace)")
args = ap.parse_args()
llm = pagoda.LLM(args.model, load_format="dummy", attention_backend=args.backend, skip_tokenizer_init=True,
                 max_model_len=4096, enforce_eager=args.eager, async_scheduling=not args.no_async)
e = llm.engine
rng = np.random.default_rng(0)
sp = pagoda.SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
for _ in range(args.batch):
    e.add_request(rng.integers(0, e.config.vocab_size, size=args.ctx).tolist(), sp)
for _ in range(12):
    e.step()
torch.cuda.synchronize()
phases = {"schedule": 0.0, "launch": 0.0, "prepare_next": 0.0, "collect": 0.0, "rest": 0.0}
# prepare_next: the engine's _prepare_or_run_ahead (the next step's inputs and plan, and in steady decoding its
# launch before this step's tokens are read back)
orig_sched = e.scheduler.schedule


def timed(name, fn, into=phases):
    """fn, adding its host time to into[name]."""
    def f(*a, **k):
        t0 = time.perf_counter()
        r = fn(*a, **k)
        into[name] = into.get(name, 0.0) + time.perf_counter() - t0
        return r
    return f


def steps(n=20):
    """Seconds per step over n engine steps (phases and parts reset first)."""
    for k in phases:
        phases[k] = 0.0
    t0 = time.perf_counter()
    for _ in range(n):
        e.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


e.scheduler.schedule = timed("schedule", orig_sched)
for name in ("launch", "collect"):  # collect waits for the device (the sampler's read-back)
    setattr(e.runner, name, timed(name, getattr(e.runner, name)))
e._prepare_or_run_ahead = timed("prepare_next", e._prepare_or_run_ahead)
total = steps() * 20
print(f"batch {args.batch} ctx {args.ctx} {args.backend} graphs={not args.eager} async={not args.no_async}: "
      f"{total / 20 * 1e3:.2f} ms/step, {e.stats.prepared_steps} steps prepared so far; "
      + ", ".join(f"{k} {v / 20 * 1e3:.2f} ms" for k, v in phases.items() if k != "rest"))
if args.breakdown:  # host time of each part of a step (sample_collect waits for the GPU)
    from pagoda.engine import runner as runner_mod
    parts = {}

    def timed_part(name, fn):
        return timed(name, fn, parts)

    runner_mod.build_inputs = timed_part("build_inputs", runner_mod.build_inputs)
    runner_mod.sample_launch = timed_part("sample_launch", runner_mod.sample_launch)
    runner_mod.sample_collect = timed_part("sample_collect (read-back)", runner_mod.sample_collect)
    R = runner_mod.ModelRunner
    R.padded_decode_inputs = timed_part("padded_inputs", R.padded_decode_inputs)
    R.write_static = timed_part("write_static", R.write_static)
    for cls in (runner_mod._PagodaAttention, runner_mod._FlashInferGraphAttention):
        cls.plan = timed_part("attn.plan", cls.plan)
    torch.cuda.CUDAGraph.replay = timed_part("graph.replay", torch.cuda.CUDAGraph.replay)
    total = steps() * 20
    print(f"  breakdown over 20 steps: {total / 20 * 1e3:.2f} ms/step; "
          + ", ".join(f"{k} {v / 20 * 1e3:.2f}" for k, v in phases.items() if k != "rest") + "; "
          + ", ".join(f"{k} {v / 20 * 1e3:.3f} ms" for k, v in parts.items()))
    raise SystemExit(0)
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
    for _ in range(5):
        e.step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=14, max_name_column_width=60))
if args.gaps:
    import json
    import os
    import tempfile
    from collections import defaultdict

    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    ev = sorted((x for x in json.load(open(path))["traceEvents"]
                 if x.get("cat") == "kernel" and x.get("ph") == "X"), key=lambda x: x["ts"])
    dur, gap = defaultdict(list), defaultdict(list)
    for a, b in zip(ev, ev[1:]):
        name = a["name"][:48]
        dur[name].append(a["dur"])
        g = b["ts"] - (a["ts"] + a["dur"])
        if g < 50:  # within a step (not the host's wait between steps)
            gap[name].append(g)
    busy = sum(x["dur"] for x in ev)
    span = ev[-1]["ts"] + ev[-1]["dur"] - ev[0]["ts"]
    print(f"GPU timeline: {len(ev)} kernels over 5 steps, busy {busy / 5e3:.3f} ms per step, span "
          f"{span / 5e3:.3f} ms per step; idle gaps under 50 us: {sum(map(sum, gap.values())) / 5e3:.3f} ms per step")
    if os.environ.get("PAGODA_PDL", "1") != "0":
        # (session 19: under PDL a kernel starts at its predecessor's trigger and waits inside, so durations
        # include the overlap and gaps go negative: busy > span)
        print("note: programmatic dependent launches on (PAGODA_PDL, the engine's default): a kernel's time includes "
              "its wait for the one before it, and negative gaps are overlap; PAGODA_PDL=0 for each kernel's own time")
    print(f"{'kernel':48} {'count':>6} {'median us':>10} {'gap after (median us)':>22}")
    for name in sorted(dur, key=lambda n: -sum(dur[n])):
        g = sorted(gap[name])
        print(f"{name:48} {len(dur[name]):6} {sorted(dur[name])[len(dur[name]) // 2]:10.2f} "
              f"{(g[len(g) // 2] if g else float('nan')):22.2f}")
