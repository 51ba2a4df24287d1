"""End-to-end engine benchmark: the same engine on pagoda's attention and on FlashInfer's.

    python -m pagoda.bench.engine [--model Llama-3.1-8B] [--num-requests 1000] [--json FILE]
                                  [--cases throughput,latency,long,parallel] [--backends pagoda,flashinfer]

Dummy (random) weights of the bundled 8B-shaped configs, bf16, ignore_eos. Cases:
- throughput: num_requests prompts with lengths uniform in 256..1024, 256 output tokens each;
  output tokens/s (and total tokens/s);
- latency: time per output token at batch 1 (1k-token context) and batch 64, against the floor
  of reading the weights once per step at the copy bandwidth measured in the same run;
- long: one 32k-token prompt, 256 output tokens: time to first token and inter-token latency;
- parallel: 64 prompts of 512 tokens x n=8 samples (the samples share the prompt's pages).
A backend may carry an option: "pagoda:nocascade" (cascade decode off), "pagoda:noasync" (async scheduling off),
"pagoda:lora" (multi-LoRA: enable_lora with 4 random rank-16 adapters on all seven projections, the requests
taking them in turn; batch 1 takes one), "pagoda:lora-qv" (the same on q_proj / v_proj only, PEFT's default, with
lora_target_modules q_proj, v_proj), "pagoda:fp8" (an e4m3 KV cache, kv_cache_dtype="fp8"; --kv-cache-dtype sets
every backend's).
transformers' generate on a small batch gives the floor the issue asks for (--hf).
"""
from __future__ import annotations

import argparse
import gc
import json
import time

import numpy as np
import torch

import pagoda
from pagoda.bench.attention import copy_bandwidth


def dummy_adapters(config, root, n=4, rank=16, seed=0, modules=None):
    """n PEFT-format LoRA adapters of config (random A / B, small enough to keep dummy activations finite) on modules
    (default all seven) in folders under root: their LoRARequests."""
    from pagoda.engine.lora import random_lora_weights, save_adapter

    g = torch.Generator().manual_seed(seed)
    return [pagoda.LoRARequest(f"adapter{i}", i + 1, save_adapter(
        f"{root}/adapter{i}", random_lora_weights(config, rank, 0.01, g, modules, torch.bfloat16), rank))
        for i in range(n)]


def run_requests(llm, prompts, params, loras=None):
    """Drive the engine directly; returns (seconds, per-request first-token / finish times). loras: LoRARequests
    the requests take in turn."""
    e = llm.engine
    t0 = time.perf_counter()
    ids = [e.add_request(p, params, lora_request=loras[i % len(loras)] if loras else None)
           for i, p in enumerate(prompts)]
    first, done = {}, {}
    while e.has_unfinished():
        for out in e.step():
            now = time.perf_counter() - t0
            first.setdefault(out.request_id, now)
            if out.finished:
                done[out.request_id] = now
    torch.cuda.synchronize()
    return time.perf_counter() - t0, [first[i] for i in ids], [done[i] for i in ids]


def case_throughput(llm, n, rng, loras=None):
    lens = rng.integers(256, 1025, size=n)
    vocab = llm.engine.config.vocab_size
    prompts = [rng.integers(0, vocab, size=int(k)).tolist() for k in lens]
    sp = pagoda.SamplingParams(max_tokens=256, temperature=0, ignore_eos=True)
    run_requests(llm, prompts[:16], pagoda.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                 loras)  # warm up
    secs, _, _ = run_requests(llm, prompts, sp, loras)
    out_tok = 256 * n
    return {"requests": n, "seconds": secs, "output_tok_s": out_tok / secs,
            "total_tok_s": (out_tok + int(lens.sum())) / secs}


def case_latency(llm, batch, ctx, rng, steps=128, loras=None):
    vocab = llm.engine.config.vocab_size
    prompts = [rng.integers(0, vocab, size=ctx).tolist() for _ in range(batch)]
    sp = pagoda.SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True)
    run_requests(llm, prompts, pagoda.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), loras)
    e = llm.engine
    for i, p in enumerate(prompts):
        e.add_request(p, sp, lora_request=loras[i % len(loras)] if loras else None)
    while any(r.num_computed < r.num_tokens - 1 or not r.output_token_ids for g in e.requests.values() for r in g):
        e.step()  # prefill and the first token
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = 0
    while e.has_unfinished():
        e.step()
        n += 1
    torch.cuda.synchronize()
    return {"batch": batch, "context": ctx, "ms_per_token": (time.perf_counter() - t0) / n * 1e3, "steps": n}


def case_long(llm, rng, prompt_len=32768, out=256):
    vocab = llm.engine.config.vocab_size
    # a warm-up request of the same length first, as the other cases have: the long prompt's chunks run kernel
    # specializations (e.g. the long-item prefill configuration) that a cold run would time compiling or loading
    # (session 14: TTFT 1.42 s cold vs 1.21 s warm, scripts/profile_long_prefill.py)
    run_requests(llm, [rng.integers(0, vocab, size=prompt_len).tolist()],
                 pagoda.SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    prompt = rng.integers(0, vocab, size=prompt_len).tolist()
    sp = pagoda.SamplingParams(max_tokens=out, temperature=0, ignore_eos=True)
    secs, first, done = run_requests(llm, [prompt], sp)
    return {"prompt": prompt_len, "output": out, "ttft_s": first[0], "itl_ms": (done[0] - first[0]) / (out - 1) * 1e3}


def case_parallel(llm, rng, prompts_n=64, n=8, prompt_len=512, out=128):
    vocab = llm.engine.config.vocab_size
    prompts = [rng.integers(0, vocab, size=prompt_len).tolist() for _ in range(prompts_n)]
    sp = pagoda.SamplingParams(n=n, max_tokens=out, temperature=1.0, top_p=0.95, seed=0, ignore_eos=True)
    before = llm.engine.stats.prefix_hit_tokens
    secs, _, _ = run_requests(llm, prompts, sp)
    return {"prompts": prompts_n, "n": n, "seconds": secs, "output_tok_s": prompts_n * n * out / secs,
            "prefix_hit_tokens": llm.engine.stats.prefix_hit_tokens - before}


def hf_floor(model_path, rng, batch=16, prompt_len=512, out=64):
    """transformers' generate (sdpa attention, static batch) with the same dummy-weight model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_path)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16).eval()
    ids = torch.tensor(rng.integers(0, cfg.vocab_size, size=(batch, prompt_len)), device="cuda")
    model.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=out, min_new_tokens=out, do_sample=False)
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    del model
    return {"batch": batch, "prompt": prompt_len, "output": out, "output_tok_s": batch * out / secs}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="Llama-3.1-8B")
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--cases", default="throughput,latency,long,parallel")
    ap.add_argument("--backends", default="pagoda,flashinfer")
    ap.add_argument("--hf", action="store_true", help="also time transformers' generate (the floor)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                    help="the engines sharded over this many GPUs (weights and the latency floor are per GPU)")
    ap.add_argument("--kv-cache-dtype", default="auto", help="the engines' KV cache: auto (bf16), fp8, fp8_e5m2")
    ap.add_argument("--max-model-len", type=int, default=33280,
                    help="the engines' max_model_len (the long case's prompt: 32k, or max_model_len - 512 if less)")
    args = ap.parse_args(argv)
    cases = args.cases.split(",")
    bw = copy_bandwidth()
    results = {"device": torch.cuda.get_device_name(), "model": args.model, "copy_GBs": bw / 1e9, "rows": []}
    print(f"# {results['device']}, {args.model} (dummy weights, bf16), copy bandwidth {bw / 1e9:.0f} GB/s")
    for backend in args.backends.split(","):
        t0 = time.perf_counter()
        # "pagoda:nocascade": the pagoda backend with cascade decode off (the parallel case's comparison);
        # "<backend>:noasync": without async scheduling (the latency case's comparison)
        attn, _, option = backend.partition(":")
        lora = option in ("lora", "lora-qv")
        qv = ["q_proj", "v_proj"] if option == "lora-qv" else None
        kv = "fp8" if option == "fp8" else args.kv_cache_dtype  # ("pagoda:fp8": an e4m3 KV cache)
        try:
            llm = pagoda.LLM(args.model, load_format="dummy", attention_backend=attn, skip_tokenizer_init=True,
                             max_model_len=args.max_model_len, max_num_batched_tokens=8192,
                             enable_cascade=option != "nocascade", async_scheduling=option != "noasync",
                             enable_lora=lora, max_loras=4, max_lora_rank=16, lora_target_modules=qv,
                             tensor_parallel_size=args.tensor_parallel_size, kv_cache_dtype=kv)
        except Exception as e:  # noqa: BLE001 - a missing peer must not stop the table
            print(f"# backend {backend} unavailable: {type(e).__name__}: {e}")
            continue
        weights = sum(p.numel() * p.element_size() for p in llm.engine.model.parameters())
        print(f"# {backend}: loaded in {time.perf_counter() - t0:.0f}s, {weights / 1e9:.1f} GB of weights, "
              f"{llm.engine.pool.usable} KV pages")
        rng = np.random.default_rng(0)
        row = {"backend": backend, "weights_GB": weights / 1e9, "tensor_parallel_size": args.tensor_parallel_size,
               "kv_cache_dtype": kv}
        loras = None
        if lora:
            import tempfile

            loras = dummy_adapters(llm.engine.config, tempfile.mkdtemp(prefix="pagoda-lora-"), modules=qv)
        if "throughput" in cases:
            row["throughput"] = case_throughput(llm, args.num_requests, rng, loras)
            print(backend, "throughput", row["throughput"], flush=True)
        if "latency" in cases:
            floor_ms = weights / bw * 1e3
            row["latency"] = [dict(case_latency(llm, b, 1024, rng, loras=loras), floor_ms=floor_ms) for b in (1, 64)]
            print(backend, "latency", row["latency"], flush=True)
        if "long" in cases and not lora:
            row["long"] = case_long(llm, rng, prompt_len=min(32768, args.max_model_len - 512))
            print(backend, "long", row["long"], flush=True)
        if "parallel" in cases and not lora:
            row["parallel"] = case_parallel(llm, rng)
            print(backend, "parallel", row["parallel"], flush=True)
        row["cuda_graph_steps"] = llm.engine.stats.cuda_graph_steps
        row["cascade_steps"] = llm.engine.stats.cascade_steps
        row["steps"] = llm.engine.stats.steps
        row["prepared_steps"] = llm.engine.stats.prepared_steps
        row["ahead_steps"] = llm.engine.stats.ahead_steps
        results["rows"].append(row)
        llm.shutdown()
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    if args.hf:
        from pagoda.engine.loader import resolve_model_path

        results["hf"] = hf_floor(resolve_model_path(args.model), np.random.default_rng(1))
        print("transformers generate", results["hf"])
    print(fmt_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def fmt_table(res):
    rows = {r["backend"]: r for r in res["rows"]}
    lines = ["| case | metric | " + " | ".join(rows) + " | pagoda / flashinfer |", "|---|---|" + "---|" * (len(rows) + 1)]

    def add(case, metric, get, higher_better=True):
        vals = {}
        for b, r in rows.items():
            try:
                vals[b] = get(r)
            except (KeyError, IndexError, TypeError):
                vals[b] = None
        cells = [f"{v:.2f}" if v is not None else "" for v in vals.values()]
        ratio = ""
        if vals.get("pagoda") and vals.get("flashinfer"):
            ratio = vals["pagoda"] / vals["flashinfer"] if higher_better else vals["flashinfer"] / vals["pagoda"]
            ratio = f"{ratio:.2f}x"
        for opt in ("lora", "lora-qv"):  # (what serving adapters costs the same engine)
            if vals.get("pagoda") and vals.get(f"pagoda:{opt}"):
                v = vals[f"pagoda:{opt}"]
                r = v / vals["pagoda"] if higher_better else vals["pagoda"] / v
                ratio += f"{'; ' if ratio else ''}{opt} / base {r:.2f}x"
        lines.append(f"| {case} | {metric} | " + " | ".join(cells) + f" | {ratio} |")

    add("throughput", "output tok/s", lambda r: r["throughput"]["output_tok_s"])
    add("throughput", "total tok/s", lambda r: r["throughput"]["total_tok_s"])
    for i, b in enumerate((1, 64)):
        add(f"decode batch {b}, ctx 1k", "ms / token", lambda r, i=i: r["latency"][i]["ms_per_token"], False)
        add(f"decode batch {b}, ctx 1k", "x weight-read floor",
            lambda r, i=i: r["latency"][i]["ms_per_token"] / r["latency"][i]["floor_ms"], False)
    long = next((f"{r['long']['prompt'] / 1024:g}k prompt + 256" for r in rows.values() if "long" in r),
                "32k prompt + 256")
    add(long, "TTFT s", lambda r: r["long"]["ttft_s"], False)
    add(long, "ITL ms", lambda r: r["long"]["itl_ms"], False)
    add("64 prompts x n=8", "output tok/s", lambda r: r["parallel"]["output_tok_s"])
    if "hf" in res:
        lines.append(f"| transformers generate (batch {res['hf']['batch']}) | output tok/s | "
                     f"{res['hf']['output_tok_s']:.1f} | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
