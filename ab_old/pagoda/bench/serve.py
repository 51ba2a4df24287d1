"""Load client for any OpenAI-compatible server (``pagoda bench serve``).

    pagoda bench serve --base-url http://127.0.0.1:8000 --num-prompts 200 --request-rate 16 \\
        [--max-concurrency 64] [--input-len 512] [--output-len 256] [--json out.json]

Requests arrive as a Poisson process at --request-rate (inf: all at once), at most
--max-concurrency in flight; prompts are random token ids (lengths uniform in
[input_len/2, input_len*3/2]) sent to /v1/completions with streaming, ignore_eos and a fixed
max_tokens (uniform in [output_len/2, output_len*3/2]). Reports TTFT, TPOT (time per output token
after the first), ITL (gaps between streamed chunks) and end-to-end latency (mean, p50, p90, p99),
request and output-token throughput, and failures.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time

import numpy as np


async def _one(client, url, model, prompt, max_tokens, sem, results):
    async with sem:
        t0 = time.perf_counter()
        times, text_chunks, err, usage = [], 0, None, None
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
                "temperature": 0.0, "stream_options": {"include_usage": True}}
        try:
            async with client.stream("POST", url + "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    err = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                else:
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        data = line[6:]
                        if data == "[DONE]":
                            break
                        chunk = json.loads(data)
                        if chunk.get("usage"):
                            usage = chunk["usage"]
                        ch = chunk.get("choices")
                        if ch and (ch[0].get("text") or ch[0].get("token_ids")):  # token_ids: pagoda's extra field
                            times.append(time.perf_counter() - t0)
                            text_chunks += 1
        except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
            err = f"{type(e).__name__}: {e}"
        end = time.perf_counter() - t0
        n_out = usage["completion_tokens"] if usage else None
        if err is None and n_out != max_tokens:
            err = f"expected {max_tokens} tokens, got {n_out}"
        results.append({"ttft": times[0] if times else None, "e2e": end, "chunks": times, "output_tokens": n_out,
                        "error": err})


async def run(args) -> dict:
    import httpx

    rng = np.random.default_rng(args.seed)
    base = args.base_url.rstrip("/")
    limits = httpx.Limits(max_connections=args.max_concurrency or 10000, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout), limits=limits) as client:
        model = args.model or (await client.get(base + "/v1/models")).json()["data"][0]["id"]
        vocab_hi = args.vocab_size
        prompts, outs = [], []
        for _ in range(args.num_prompts):
            n_in = int(rng.integers(max(1, args.input_len // 2), args.input_len * 3 // 2 + 1))
            prompts.append(rng.integers(10, vocab_hi, size=n_in).tolist())
            outs.append(int(rng.integers(max(1, args.output_len // 2), args.output_len * 3 // 2 + 1)))
        sem = asyncio.Semaphore(args.max_concurrency or args.num_prompts)
        results: list[dict] = []
        tasks = []
        t0 = time.perf_counter()
        for p, m in zip(prompts, outs):
            tasks.append(asyncio.create_task(_one(client, base, model, p, m, sem, results)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.exponential(1.0 / args.request_rate))
        await asyncio.gather(*tasks)
        dur = time.perf_counter() - t0
    ok = [r for r in results if r["error"] is None]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    tpot = [(r["e2e"] - r["ttft"]) / (r["output_tokens"] - 1) for r in ok if r["output_tokens"] and r["output_tokens"] > 1]
    itl = [b - a for r in ok for a, b in zip(r["chunks"], r["chunks"][1:])]
    e2e = [r["e2e"] for r in ok]

    def stats(xs, scale=1e3):
        if not xs:
            return {}
        a = np.asarray(xs) * scale
        return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
                "p99": float(np.percentile(a, 99))}

    return {"base_url": base, "model": model, "num_prompts": args.num_prompts, "request_rate": args.request_rate,
            "max_concurrency": args.max_concurrency, "input_len": args.input_len, "output_len": args.output_len,
            "duration_s": dur, "completed": len(ok), "failed": len(results) - len(ok),
            "errors": sorted({r["error"] for r in results if r["error"]})[:5],
            "request_throughput": len(ok) / dur, "output_throughput": sum(r["output_tokens"] for r in ok) / dur,
            "ttft_ms": stats(ttft), "tpot_ms": stats(tpot), "itl_ms": stats(itl), "e2e_ms": stats(e2e)}


def fmt(res: dict) -> str:
    lines = [f"requests: {res['completed']} ok, {res['failed']} failed in {res['duration_s']:.1f}s "
             f"({res['request_throughput']:.2f} req/s, {res['output_throughput']:.0f} output tok/s)",
             "| metric | mean | p50 | p90 | p99 |", "|---|---|---|---|---|"]
    for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        s = res[k]
        if s:
            lines.append(f"| {k} | {s['mean']:.1f} | {s['p50']:.1f} | {s['p90']:.1f} | {s['p99']:.1f} |")
    if res["errors"]:
        lines.append("errors: " + "; ".join(res["errors"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="pagoda bench serve", description=__doc__.split("\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default=None, help="default: the server's first model")
    ap.add_argument("--num-prompts", type=int, default=200)
    ap.add_argument("--request-rate", type=float, default=float("inf"))
    ap.add_argument("--max-concurrency", type=int, default=None)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--vocab-size", type=int, default=4000, help="prompt token ids are drawn below this")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    res = asyncio.run(run(args))
    print(fmt(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0 if res["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
