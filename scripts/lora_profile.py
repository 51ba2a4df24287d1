"""Where a LoRA engine's decode step spends its time: CUDA kernels by name (CUPTI via torch.profiler) over a few
decode steps of Llama-3.1-8B (dummy weights, bf16) at batch 1 and 64, the LoRA engine (one adapter, rank 16,
bench.engine.dummy_adapters) beside the same engine without LoRA.

    python scripts/lora_profile.py [--steps 8] [--batches 1,64]
"""
import argparse
import collections
import gc
import tempfile

import numpy as np
import torch

import pagoda
from pagoda.bench.engine import dummy_adapters


def profile(llm, batch, steps, lora):
    e = llm.engine
    rng = np.random.default_rng(0)
    vocab = e.config.vocab_size
    sp = pagoda.SamplingParams(max_tokens=steps + 40, temperature=0, ignore_eos=True)
    for _ in range(batch):
        e.add_request(rng.integers(0, vocab, 1024).tolist(), sp, lora_request=lora)
    for _ in range(20):  # prefill and warm decode steps
        e.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            e.step()
        torch.cuda.synchronize()
    while e.has_unfinished():
        e.step()
    by = collections.defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            k = ev.name[:60]
            by[k][0] += 1
            by[k][1] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
    total = sum(v[1] for v in by.values())
    print(f"  kernels per step {sum(v[0] for v in by.values()) / steps:.0f}, kernel time per step "
          f"{total / steps / 1e3:.3f} ms")
    for k, (n, t) in sorted(by.items(), key=lambda kv: -kv[1][1])[:14]:
        print(f"  {t / steps:9.1f} us/step  {n / steps:6.1f}/step  {k}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batches", default="1,64")
    args = ap.parse_args()
    for lora_on in (False, True):
        llm = pagoda.LLM("Llama-3.1-8B", load_format="dummy", skip_tokenizer_init=True, max_model_len=4096,
                         enable_lora=lora_on, max_loras=4, max_lora_rank=16)
        lora = dummy_adapters(llm.engine.config, tempfile.mkdtemp(), n=1)[0] if lora_on else None
        for b in map(int, args.batches.split(",")):
            print(f"# {'lora' if lora_on else 'base'} batch {b}")
            profile(llm, b, args.steps, lora)
        del llm
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
