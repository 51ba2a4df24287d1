"""Where the engine's time to first token of one long prompt goes, per attention backend: the engine on a dummy
8B model, one warm-up request of the same length (compiles / loads every kernel the chunks use), then the
TTFT of a second, and torch.profiler's top CUDA kernels over a third (device).

    python scripts/profile_long_prefill.py [--prompt 32768] [--backends pagoda,flashinfer] [--top 12]
"""
import argparse
import gc
import time

import numpy as np
import torch

import pagoda

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="Llama-3.1-8B")
ap.add_argument("--prompt", type=int, default=32768)
ap.add_argument("--backends", default="pagoda,flashinfer")
ap.add_argument("--top", type=int, default=12)
args = ap.parse_args()


def ttft(e, prompt):
    """Seconds from add_request to the first token of a one-token request."""
    t0 = time.perf_counter()
    e.add_request(prompt, pagoda.SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    while e.has_unfinished():
        e.step()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


for backend in args.backends.split(","):
    llm = pagoda.LLM(args.model, load_format="dummy", attention_backend=backend, skip_tokenizer_init=True,
                     max_model_len=args.prompt + 512, max_num_batched_tokens=8192)
    e = llm.engine
    rng = np.random.default_rng(0)
    vocab = e.config.vocab_size
    cold = ttft(e, rng.integers(0, vocab, size=args.prompt).tolist())
    warm = ttft(e, rng.integers(0, vocab, size=args.prompt).tolist())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ttft(e, rng.integers(0, vocab, size=args.prompt).tolist())
    print(f"== {backend}: TTFT cold {cold * 1e3:.0f} ms, warm {warm * 1e3:.0f} ms")
    evs = [ev for ev in prof.key_averages() if ev.device_time_total > 0]
    total = sum(ev.device_time_total for ev in evs)
    print(f"   CUDA kernel time {total / 1e3:.0f} ms; top kernels (ms, calls):")
    for ev in sorted(evs, key=lambda ev: -ev.device_time_total)[:args.top]:
        print(f"   {ev.device_time_total / 1e3:8.1f} {ev.count:6d}  {ev.key[:90]}")
    del llm, e
    gc.collect()
    torch.cuda.empty_cache()
