"""The engine's decode latency with each weight-prefetch setting (ops/prefetch.py), one model load, settings
interleaved over rounds (machines drift; an A/B on one load is what can be trusted).

    python scripts/prefetch_ab.py [--rounds 2] [--batches 1,64] [--configs "off;qkv=8,o=32,..."]
                                  [--kernel CHUNK,BLOCK,MODE]
"""
import argparse
import gc

import numpy as np
import torch

import pagoda
import pagoda.ops.prefetch as pf
from pagoda.bench.engine import case_latency, copy_bandwidth

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="Llama-3.1-8B")
ap.add_argument("--rounds", type=int, default=2)
ap.add_argument("--batches", default="1")
ap.add_argument("--configs", default="off;default")
ap.add_argument("--kernel", default=None, help="CHUNK,BLOCK,MODE of the prefetch kernel")
args = ap.parse_args()
if args.kernel:
    pf.PREFETCH_CONFIG = tuple(int(v) for v in args.kernel.split(","))


def parse(cfg):
    if cfg == "off":
        return {}
    if cfg == "default":
        return {k: int(v * (1 << 20)) for k, v in pf.DEFAULT_PREFETCH_MB.items()}
    return {k: int(float(v) * (1 << 20)) for k, v in (p.split("=") for p in cfg.split(","))}


bw = copy_bandwidth()
llm = pagoda.LLM(args.model, load_format="dummy", skip_tokenizer_init=True, max_model_len=4096)
e = llm.engine
floor_ms = sum(p.numel() * p.element_size() for p in e.model.parameters()) / bw * 1e3
print(f"# {torch.cuda.get_device_name()}, {args.model}, copy {bw / 1e9:.0f} GB/s, weight-read floor {floor_ms:.2f} ms; "
      f"prefetch kernel {pf.PREFETCH_CONFIG}")
configs = args.configs.split(";")
res = {(c, b): [] for c in configs for b in args.batches.split(",")}
rng = np.random.default_rng(0)
for rnd in range(args.rounds):
    for cfg in configs:
        e.model.weight_prefetch.sizes = parse(cfg)
        e.runner.graphs.clear()  # captured again with this setting when a step needs them, in a new pool
        e.runner.graph_pool = None
        gc.collect()
        torch.cuda.empty_cache()
        for b in args.batches.split(","):
            r = case_latency(llm, int(b), 1024, rng)
            res[cfg, b].append(r["ms_per_token"])
            print(f"round {rnd} {cfg:48} batch {b:>3}: {r['ms_per_token']:.3f} ms/token "
                  f"({r['ms_per_token'] / floor_ms:.3f}x floor)", flush=True)
print("| setting | batch | ms / token (each round) | best | x floor |")
print("|---|---|---|---|---|")
for (cfg, b), v in res.items():
    print(f"| {cfg} | {b} | {' / '.join(f'{x:.3f}' for x in v)} | {min(v):.3f} | {min(v) / floor_ms:.3f} |")
