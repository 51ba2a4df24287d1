"""Command line (also ``python -m pagoda ...``):

- ``pagoda generate [PROMPT ...]``: text from the bundled pagoda-demo model (or ``--model``),
- ``pagoda serve [MODEL]``: the OpenAI-compatible server,
- ``pagoda bench serve --base-url ...``: the load client,
- ``pagoda demo``: the attention kernels checked against the reference.

The demo runs batch decode and batch prefill (paged KV cache, GQA) on the available
device, checks each against the float64 PyTorch reference and prints a table. Without a
GPU the Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1) next to the
PyTorch backend, on small shapes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _demo(args) -> int:
    import torch

    on_cuda = torch.cuda.is_available() and not args.cpu
    if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton reads TRITON_INTERPRET when pagoda's kernels are defined (at import): start
        # again with the interpreter switched on.
        env = dict(os.environ, TRITON_INTERPRET="1")
        os.execve(sys.executable, [sys.executable, "-m", "pagoda", "demo", "--cpu"], env)
    import pagoda
    from pagoda.attention import reference

    device = torch.device("cuda" if on_cuda else "cpu")
    torch.manual_seed(0)
    hq, hk, d, ps = (32, 8, 128, 16) if on_cuda else (8, 2, 64, 16)
    kv_lens = [4096, 333, 1500, 17] * (8 if on_cuda else 1) if on_cuda else [300, 33, 120, 17]
    qo_lens = [512, 1, 64, 17] * (8 if on_cuda else 1) if on_cuda else [40, 1, 16, 17]
    dtype = torch.bfloat16
    pages = [-(-n // ps) for n in kv_lens]
    indptr = torch.tensor([0] + torch.tensor(pages).cumsum(0).tolist(), dtype=torch.int32)
    indices = torch.randperm(sum(pages)).to(torch.int32)
    last = torch.tensor([(n - 1) % ps + 1 for n in kv_lens], dtype=torch.int32)
    cache = torch.randn(sum(pages), 2, ps, hk, d, dtype=dtype, device=device)
    ws = torch.empty(64 << 20, dtype=torch.uint8, device=device)
    backends = ["triton"] if on_cuda else ["triton", "torch"]

    def kv(b):
        k, v = cache[:, 0], cache[:, 1]
        return reference.gather_paged_kv(k, v, indices[indptr[b]:indptr[b + 1]], kv_lens[b])

    rows = []
    for backend in backends:
        for kind in ("decode", "prefill"):
            if kind == "decode":
                w = pagoda.BatchDecodeWithPagedKVCacheWrapper(ws, backend=backend)
                w.plan(indptr, indices, last, hq, hk, d, ps, q_data_type=dtype)
                q_lens = [1] * len(kv_lens)
            else:
                w = pagoda.BatchPrefillWithPagedKVCacheWrapper(ws, backend=backend)
                qo_indptr = torch.tensor([0] + torch.tensor(qo_lens).cumsum(0).tolist(), dtype=torch.int32)
                w.plan(qo_indptr, indptr, indices, last, hq, hk, d, ps, causal=True, q_data_type=dtype)
                q_lens = qo_lens
            q = torch.randn(sum(q_lens), hq, d, dtype=dtype, device=device)
            out = w.run(q, cache)
            if on_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            reps = 20 if on_cuda else 1
            for _ in range(reps):
                w.run(q, cache, out=out)
            if on_cuda:
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) / reps * 1e3
            err_num = err_den = 0.0
            start = 0
            for b, n in enumerate(q_lens):
                k, v = kv(b)
                ref, _ = reference.attention(q[start:start + n], k, v, causal=kind == "prefill",
                                             compute_dtype=torch.float64, out_dtype=torch.float64)
                err_num += (out[start:start + n].double() - ref).norm().item() ** 2
                err_den += ref.norm().item() ** 2
                start += n
            rel = (err_num / err_den) ** 0.5
            label = backend + (" (interpreter)" if backend == "triton" and not on_cuda else "")
            rows.append((kind, label, len(kv_lens), sum(q_lens), sum(kv_lens), ms, rel))
    print(f"pagoda {pagoda.__version__} on {torch.cuda.get_device_name() if on_cuda else 'CPU'}: "
          f"{hq} query heads, {hk} KV heads, head_dim {d}, page_size {ps}, bf16, causal prefill")
    print(f"{'op':<8} {'backend':<20} {'batch':>5} {'q tokens':>8} {'kv tokens':>9} {'ms':>9} {'rel err vs fp64':>16}")
    for kind, label, b, nq, nkv, ms, rel in rows:
        print(f"{kind:<8} {label:<20} {b:>5} {nq:>8} {nkv:>9} {ms:>9.3f} {rel:>16.2e}")
    ok = all(r[-1] < 2e-2 for r in rows)
    print("all results match the reference" if ok else "MISMATCH against the reference")
    return 0 if ok else 1


DEFAULT_PROMPTS = ["def fibonacci(n):", "class Stack:\n    def __init__(self):", "import os\n\n\ndef "]


def _generate(args) -> int:
    import torch

    import pagoda

    t0 = time.perf_counter()
    llm = pagoda.LLM(args.model, max_model_len=args.max_model_len, attention_backend=args.attention_backend,
                     load_format=args.load_format, tensor_parallel_size=args.tensor_parallel_size)
    load_s = time.perf_counter() - t0
    sp = pagoda.SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                               max_tokens=args.max_tokens, seed=args.seed)
    prompts = args.prompt or DEFAULT_PROMPTS
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    gen_s = time.perf_counter() - t0
    n_tok = sum(len(c.token_ids) for o in outs for c in o.outputs)
    for o in outs:
        for c in o.outputs:
            print(f"--- {o.prompt!r} (sample {c.index}, {len(c.token_ids)} tokens, {c.finish_reason})")
            print(o.prompt + c.text)
    dev = torch.cuda.get_device_name() if llm.engine.device.type == "cuda" else "CPU"
    print(f"--- {llm.engine.model_name} on {dev} ({llm.engine.dtype}): loaded in {load_s:.1f}s, "
          f"{n_tok} tokens in {gen_s:.2f}s ({n_tok / gen_s:.0f} tokens/s)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="pagoda", description="pagoda: attention engine for LLM serving")
    sub = ap.add_subparsers(dest="cmd", required=True)
    demo = sub.add_parser("demo", help="batch decode + prefill on this machine, checked against the reference")
    demo.add_argument("--cpu", action="store_true", help="stay on the CPU even if a GPU is present")
    gen = sub.add_parser("generate", help="generate text with a model (default: the bundled pagoda-demo model)")
    gen.add_argument("prompt", nargs="*", help="prompts (default: three Python openings)")
    gen.add_argument("--model", default=None, help="a local Hugging Face folder or a bundled name")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--n", type=int, default=1)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--max-model-len", type=int, default=None)
    gen.add_argument("--attention-backend", default=None, choices=["pagoda", "flashinfer", "torch"])
    gen.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    gen.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="shard the model over this many GPUs")
    from .server.cli import add_parser as add_serve
    add_serve(sub)
    bench = sub.add_parser("bench", help="benchmarks: 'pagoda bench serve ...' drives an OpenAI-compatible server")
    bench.add_argument("what", choices=["serve"])
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    if args.cmd == "bench":
        from .bench.serve import main as bench_serve
        return bench_serve(args.rest)
    if args.cmd == "demo":
        return _demo(args)
    if args.cmd == "serve":
        from .server.cli import serve as run
    else:
        run = _generate
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:  # bad arguments, missing model files
        print(f"pagoda {args.cmd}: error: {e}", file=sys.stderr)
        return 2

if __name__ == "__main__":
    sys.exit(main())
