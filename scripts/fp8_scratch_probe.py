"""Why decode at batch 64 x 1k ran slower with PAGODA_FP8_PREFILL_SCRATCH=1 (session 40: 6.06 -> 7.0-7.2 ms a token,
the decode steps the same CUDA graphs). One mode per process (the switch is read when the engine is built):

    python scripts/fp8_scratch_probe.py off      # the fp8 cache, prefill over fp8 (the Triton prefill kernel)
    python scripts/fp8_scratch_probe.py on       # PAGODA_FP8_PREFILL_SCRATCH=1: prefill over the 16-bit scratch
    python scripts/fp8_scratch_probe.py alloc    # the scratch allocated, never used
    python scripts/fp8_scratch_probe.py bf16     # a bf16 cache (the yardstick)
    ... --b1-first                               # batch 1's case first, as bench.engine's latency case runs
    ... --copy-first                             # bench.engine's copy-bandwidth measure before the engine
    ... --gc-freeze                              # gc.collect(); gc.freeze() once the engine is built
    ... --gc-freeze-before                       # the same before the engine is built

Prints bench.engine's batch-64 latency case (ms a token), the caching allocator's counters over the decode phase
(retries and device frees: a full pool makes the allocator free cached blocks, which synchronizes), the decode
steps' kernels by the profiler (GPU time per step by kernel name, the top ones) and the span of GPU activity per
step, so the slowdown is placed in a kernel, in the gaps between kernels or on the host.
"""
import os
import sys
import time

mode = sys.argv[1] if len(sys.argv) > 1 else "on"
B1_FIRST = "--b1-first" in sys.argv  # bench.engine's latency case: batch 1 first, then batch 64, one rng
COPY_FIRST = "--copy-first" in sys.argv  # bench.engine measures the copy bandwidth before it builds the engine
GC_FREEZE = "--gc-freeze" in sys.argv  # gc.collect(); gc.freeze() once the engine is built (as vLLM does)
GC_FREEZE_BEFORE = "--gc-freeze-before" in sys.argv  # ... before the engine is built (the libraries' heap only)
GC_LOG = []  # (generation, ms, collected) of each garbage collection while a latency round runs


def _gc_hook(phase, info, _t=[0.0]):
    if phase == "start":
        _t[0] = time.perf_counter()
    else:
        GC_LOG.append((info["generation"], (time.perf_counter() - _t[0]) * 1e3, info["collected"]))


os.environ["PAGODA_FP8_PREFILL_SCRATCH"] = "1" if mode in ("on", "alloc") else "0"

import numpy as np  # noqa: E402
import torch  # noqa: E402

import pagoda  # noqa: E402
from pagoda.bench.engine import case_latency  # noqa: E402


def counters():
    s = torch.cuda.memory_stats()
    keys = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")
    return {k: s.get(k, 0) for k in keys}


def latency_steps(llm, batch, ctx, rng, steps=128):
    """bench.engine.case_latency with each decode step's wall time: (ms a token, step times in ms)."""
    e = llm.engine
    prompts = [rng.integers(0, e.config.vocab_size, size=ctx).tolist() for _ in range(batch)]
    from pagoda.bench.engine import run_requests

    run_requests(llm, prompts, pagoda.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    for p in prompts:
        e.add_request(p, pagoda.SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True))
    while any(q.num_computed < q.num_tokens - 1 or not q.output_token_ids for g in e.requests.values() for q in g):
        e.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    times = []
    while e.has_unfinished():
        t = time.perf_counter()
        e.step()
        times.append((time.perf_counter() - t) * 1e3)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / len(times) * 1e3, np.array(times)


def full_collection_ms() -> str:
    import gc

    t = time.perf_counter()
    gc.collect()
    return (f"a full collection now {(time.perf_counter() - t) * 1e3:.1f} ms over {len(gc.get_objects())} tracked "
            f"objects ({gc.get_freeze_count()} frozen)")


def main():
    import gc

    if GC_FREEZE_BEFORE:
        gc.collect()
        gc.freeze()
    if COPY_FIRST:
        from pagoda.bench.engine import copy_bandwidth

        print(f"copy bandwidth {copy_bandwidth() / 1e9:.0f} GB/s")
    llm = pagoda.LLM("Llama-3.1-8B", load_format="dummy", skip_tokenizer_init=True, max_model_len=33280,
                     max_num_batched_tokens=8192, kv_cache_dtype="auto" if mode == "bf16" else "fp8")
    r = llm.engine.runner
    print(f"gc: {len(gc.get_objects())} tracked objects, counts {gc.get_count()}, thresholds {gc.get_threshold()}")
    if GC_FREEZE:
        gc.collect()
        gc.freeze()
    gc.callbacks.append(_gc_hook)
    if mode == "alloc":
        r._kept_scratch, r.fp8_prefill_scratch = r.fp8_prefill_scratch, None
    print(f"mode {mode}: pages {llm.engine.pool.usable}, scratch "
          f"{None if getattr(r, 'fp8_prefill_scratch', None) is None else tuple(r.fp8_prefill_scratch.shape)}, "
          f"free {torch.cuda.mem_get_info()[0] / 2**30:.1f} GiB, reserved {torch.cuda.memory_reserved() / 2**30:.1f}"
          f" allocated {torch.cuda.memory_allocated() / 2**30:.1f}")
    rng = np.random.default_rng(0)
    if B1_FIRST:
        res = case_latency(llm, 1, 1024, rng)
        print(f"batch 1 x 1k {res['ms_per_token']:.3f} ms a token", flush=True)
    for rnd in range(2):
        c0 = counters()
        GC_LOG.clear()
        ms, t = latency_steps(llm, 64, 1024, rng)
        print(f"  collections in the round: {len(GC_LOG)}, by generation "
              f"{[sum(g == k for g, _, _ in GC_LOG) for k in range(3)]}, longest "
              + ", ".join(f"gen {g} {d:.1f} ms" for g, d, _ in sorted(GC_LOG, key=lambda x: -x[1])[:3]))
        c1 = counters()
        med = float(np.median(t))
        big = np.argsort(-t)[:5]
        print(f"round {rnd}: batch 64 x 1k {ms:.3f} ms a token over {len(t)} steps; step median {med:.3f}, "
              f"over it {float(np.clip(t - med, 0, None).sum()):.1f} ms in all; longest steps "
              + ", ".join(f"#{i} {t[i]:.2f}" for i in big) + f"; first ten {np.round(t[:10], 2).tolist()}; "
              f"allocator over the round: " + ", ".join(f"{k} +{c1[k] - c0[k]}" for k in c0), flush=True)
    # the decode steps under the profiler: the same case's steps, 40 of them after the prefill
    e = llm.engine
    vocab = e.config.vocab_size
    prompts = [rng.integers(0, vocab, size=1024).tolist() for _ in range(64)]
    sp = pagoda.SamplingParams(max_tokens=80, temperature=0, ignore_eos=True)
    print(full_collection_ms())
    for p in prompts:
        e.add_request(p, sp)
    while any(q.num_computed < q.num_tokens - 1 or not q.output_token_ids for g in e.requests.values() for q in g):
        e.step()
    for _ in range(10):
        e.step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    steps = 40
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            e.step()
        torch.cuda.synchronize()
        host = (time.perf_counter() - t0) / steps * 1e3
    while e.has_unfinished():
        e.step()
    kern = [ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA]
    start = min(ev.time_range.start for ev in kern)
    end = max(ev.time_range.end for ev in kern)
    busy = sum(ev.time_range.end - ev.time_range.start for ev in kern)
    print(f"profiled {steps} decode steps: wall {host:.3f} ms a step, GPU span {(end - start) / steps / 1e3:.3f}, "
          f"kernels busy {busy / steps / 1e3:.3f} ms a step ({len(kern) / steps:.0f} kernels a step)")
    by = {}
    for ev in kern:
        by.setdefault(ev.name, [0, 0])
        by[ev.name][0] += ev.time_range.end - ev.time_range.start
        by[ev.name][1] += 1
    for name, (t, n) in sorted(by.items(), key=lambda kv: -kv[1][0])[:14]:
        print(f"  {t / steps:9.1f} us a step  {n / steps:5.1f} calls  {name[:110]}")
    llm.shutdown()


if __name__ == "__main__":
    main()
