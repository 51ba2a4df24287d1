"""What a mixed step costs (chunked prefill beside decodes), with the one-token requests split into the decode kernel
or not (PAGODA_SPLIT_MIXED, engine/runner.py): B requests of a CTX-token context decode, then one new prompt of
PROMPT tokens arrives and is prefilled in chunks of CHUNK tokens beside them; each mixed step's wall time (synchronized)
and the decode steps' around them, one process per setting.

    python scripts/mixed_step_probe.py [--model Llama-3.1-8B] [--batch 64] [--ctx 4096] [--prompt 2048] [--chunk 512]
                                       [--kv-cache-dtype auto|fp8] [--modes auto,0]

Each mode runs in a subprocess of its own (the switch is read when the engine is built); a table last: the median
mixed step and decode step, ms.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def one(args) -> dict:
    import numpy as np
    import torch

    import pagoda

    llm = pagoda.LLM(args.model, load_format="dummy", skip_tokenizer_init=True, kv_cache_dtype=args.kv_cache_dtype,
                     max_model_len=args.ctx + args.prompt + 64, max_num_batched_tokens=args.chunk,
                     enable_prefix_caching=False, max_num_seqs=max(args.batch + 1, 8))
    e = llm.engine
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    rng = np.random.default_rng(0)
    vocab = e.config.vocab_size
    sp = pagoda.SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True)
    for _ in range(args.batch):
        e.add_request(rng.integers(0, vocab, size=args.ctx).tolist(), sp)
    while any(r.num_computed < r.num_tokens - 1 for r in e.scheduler.running) or e.scheduler.waiting:
        e.step()  # (the contexts prefilled: every request decodes from here)
    for _ in range(8):
        e.step()
    times = {"mixed": [], "decode": []}
    split_before = e.stats.split_steps
    for _ in range(args.rounds):
        rid = e.add_request(rng.integers(0, vocab, size=args.prompt).tolist(),
                            pagoda.SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        while True:
            sync()
            t0 = time.perf_counter()
            outs = e.step()
            sync()
            times["mixed"].append((time.perf_counter() - t0) * 1e3)
            if any(o.request_id == rid and o.finished for o in outs):
                break
        for _ in range(4):
            sync()
            t0 = time.perf_counter()
            e.step()
            sync()
            times["decode"].append((time.perf_counter() - t0) * 1e3)
    return {"mode": os.environ.get("PAGODA_SPLIT_MIXED", "auto"), "split_steps": e.stats.split_steps - split_before,
            "mixed_ms": statistics.median(times["mixed"]), "decode_ms": statistics.median(times["decode"]),
            "mixed_all": times["mixed"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="Llama-3.1-8B")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--modes", default="auto,0")
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(one(args)), flush=True)
        return
    rows = []
    for mode in args.modes.split(","):
        env = dict(os.environ, PAGODA_SPLIT_MIXED=mode)
        out = subprocess.run([sys.executable, __file__, "--child"] + [a for a in sys.argv[1:]], env=env,
                             capture_output=True, text=True)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(out.stdout[-2000:], out.stderr[-4000:])
            raise SystemExit(f"mode {mode} failed")
        rows.append(json.loads(line[len("RESULT "):]))
        print(mode, rows[-1], flush=True)
    print(f"# {args.model}, {args.batch} x {args.ctx} decoding, a {args.prompt}-token prompt in {args.chunk}-token "
          f"chunks, kv_cache_dtype {args.kv_cache_dtype}")
    print(f"{'PAGODA_SPLIT_MIXED':>18} {'split steps':>11} {'mixed step ms':>13} {'decode step ms':>14}")
    for r in rows:
        print(f"{r['mode']:>18} {r['split_steps']:>11} {r['mixed_ms']:13.2f} {r['decode_ms']:14.2f}")


if __name__ == "__main__":
    main()
