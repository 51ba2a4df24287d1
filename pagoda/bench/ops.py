"""Serving-ops benchmark: sampling, RMSNorm, RoPE, SiLU-and-mul on one GPU, peers in the same run.

    python -m pagoda.bench.ops [--parts sampling,greedy,bandwidth,topk] [--json FILE]

Sampling: batch 1..256 over a 128256-token vocabulary (Llama 3), pagoda's sorting-free
rejection sampler against the torch sort-based top-p that servers fall back to
(sort, cumsum, mask, renormalize, multinomial) and FlashInfer when importable.
"wall/call" times back-to-back calls without synchronizing: the host cost where it exceeds the
GPU time. Norm / RoPE / activation: bytes moved (read once + written once) over time, as GB/s and as a
fraction of the device-to-device copy bandwidth measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import pagoda
from pagoda.bench.attention import bench, copy_bandwidth, flashinfer_or_none

VOCAB = 128256


def torch_top_p(probs, top_p):
    sorted_p, idx = torch.sort(probs, dim=-1, descending=True)
    cum = sorted_p.cumsum(-1)
    sorted_p = sorted_p.masked_fill(cum - sorted_p > top_p[:, None], 0.0)
    choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1)
    return idx.gather(-1, choice).squeeze(-1)


def torch_top_k_top_p_logits(logits, top_k, top_p):
    probs = torch.softmax(logits.float(), -1)
    kth = torch.topk(probs, int(top_k[0]), dim=-1).values[:, -1:]
    probs = probs.masked_fill(probs < kth, 0.0)
    return torch_top_p(probs / probs.sum(-1, keepdim=True), top_p)


def sampling_rows(fi):
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for batch in (1, 16, 64, 256):
        # Peaked, LLM-like distributions: logits ~ 3 * N(0, 1).
        logits = 3 * torch.randn(batch, VOCAB, device="cuda", generator=g)
        probs = torch.softmax(logits, -1)
        top_p = torch.full((batch,), 0.9, device="cuda")
        top_k = torch.full((batch,), 50, dtype=torch.int32, device="cuda")
        cases = [
            ("top_p=0.9 from probs", lambda: pagoda.top_p_sampling_from_probs(probs, top_p),
             lambda: torch_top_p(probs, top_p),
             (lambda: fi.sampling.top_p_sampling_from_probs(probs, top_p)) if fi else None),
            ("top_k=50,top_p=0.9 from logits", lambda: pagoda.top_k_top_p_sampling_from_logits(logits, top_k, top_p),
             lambda: torch_top_k_top_p_logits(logits, top_k, top_p),
             (lambda: fi.sampling.top_k_top_p_sampling_from_logits(logits, top_k, top_p)) if fi else None),
        ]
        for name, ours, ref, peer in cases:
            row = {"op": f"sample {name}", "shape": f"{batch}x{VOCAB}", "pagoda_us": bench(ours) * 1e6,
                   "wall_us": wall_per_call(ours, 50) * 1e6,
                   "torch_us": bench(ref) * 1e6}
            if peer is not None:
                row["flashinfer_us"] = bench(peer) * 1e6
            rows.append(row)
    return rows


def bandwidth_rows(fi, copy_bw):
    rows = []
    dt = torch.bfloat16
    hidden = 4096
    w = torch.randn(hidden, dtype=dt, device="cuda")
    for n in (128, 4096, 16384):
        x = torch.randn(n, hidden, dtype=dt, device="cuda")
        r = torch.randn_like(x)
        nbytes = 2 * x.numel() * x.element_size()
        ref = lambda: (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(dt) * w  # noqa: E731
        rows.append(_bw_row("rmsnorm", f"{n}x{hidden}", nbytes, lambda: pagoda.rmsnorm(x, w), ref,
                            (lambda: fi.norm.rmsnorm(x, w)) if fi else None, copy_bw))
        rows.append(_bw_row("fused_add_rmsnorm", f"{n}x{hidden}", 2 * nbytes,
                            lambda: pagoda.fused_add_rmsnorm(x, r, w), None,
                            (lambda: fi.norm.fused_add_rmsnorm(x, r, w)) if fi else None, copy_bw))
        a = torch.randn(n, 2 * 14336, dtype=dt, device="cuda")
        rows.append(_bw_row("silu_and_mul", f"{n}x{2 * 14336}", a.numel() * 3 // 2 * a.element_size(),
                            lambda: pagoda.silu_and_mul(a),
                            lambda: torch.nn.functional.silu(a[:, :14336]) * a[:, 14336:],
                            (lambda: fi.activation.silu_and_mul(a)) if fi else None, copy_bw))
        q = torch.randn(n, 32, 128, dtype=dt, device="cuda")
        k = torch.randn(n, 8, 128, dtype=dt, device="cuda")
        pos = torch.randint(0, 8192, (n,), dtype=torch.int32, device="cuda")
        qk_bytes = 2 * (q.numel() + k.numel()) * q.element_size()
        rows.append(_bw_row("rope_pos_ids_inplace", f"{n}x(32+8)x128", qk_bytes,
                            lambda: pagoda.apply_rope_pos_ids_inplace(q, k, pos), None,
                            (lambda: fi.rope.apply_rope_pos_ids_inplace(q, k, pos)) if fi else None, copy_bw))
        cs = torch.randn(8192, 128, dtype=torch.float32, device="cuda")
        qf, kf = q.view(n, -1), k.view(n, -1)
        rows.append(_bw_row("rope_cos_sin_cache_inplace", f"{n}x(32+8)x128", qk_bytes,
                            lambda: pagoda.apply_rope_with_cos_sin_cache_inplace(pos.long(), qf, kf, 128, cs), None,
                            (lambda: fi.rope.apply_rope_with_cos_sin_cache_inplace(pos.long(), qf, kf, 128, cs))
                            if fi else None, copy_bw))
    return rows


def greedy_rows():
    """greedy_sample (argmax in one launch; with next_ids as the engine calls it) against torch.argmax, over
    LLM-like logits in float32 and in bf16 (the engine's decode graphs hand greedy batches the lm_head's bf16
    output since session 20)."""
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for batch in (1, 64, 256):
            logits = (3 * torch.randn(batch, VOCAB, device="cuda", generator=g)).to(dtype)
            nxt = torch.empty(batch, dtype=torch.int32, device="cuda")
            assert pagoda.greedy_sample(logits).tolist() == logits.argmax(-1).tolist()
            ours = lambda: pagoda.greedy_sample(logits, next_ids=nxt)  # noqa: E731
            ref = lambda: logits.argmax(-1)  # noqa: E731
            rows.append({"op": f"greedy (argmax) {str(dtype).split('.')[-1]}", "shape": f"{batch}x{VOCAB}",
                         "pagoda_us": bench(ours) * 1e6, "wall_us": wall_per_call(ours, 50) * 1e6,
                         "torch_us": bench(ref) * 1e6})
    return rows


def topk_rows(fi):
    """top_k (float32 scores: a sampler's vocabulary rows, a sparse-attention indexer's rows) and the fused
    top-k + page-table transform of a sparse decode (DeepSeek's 2048 of each request's KV positions), against
    torch.topk and FlashInfer's radix kernels."""
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for batch, d, k in ((64, VOCAB, 50), (1, 131072, 2048), (64, 32768, 2048), (256, 16384, 2048)):
        x = torch.randn(batch, d, device="cuda", generator=g)
        ours = lambda: pagoda.top_k(x, k)  # noqa: E731
        row = {"op": f"top_k k={k}", "shape": f"{batch}x{d}", "pagoda_us": bench(ours) * 1e6,
               "wall_us": wall_per_call(ours, 50) * 1e6, "torch_us": bench(lambda: torch.topk(x, k)) * 1e6}
        if fi is not None:
            try:
                v, _ = fi.top_k(x, k, sorted=True)
                assert torch.equal(v, pagoda.top_k(x, k, sorted=True)[0]), "top_k values differ from FlashInfer's"
                row["flashinfer_us"] = bench(lambda: fi.top_k(x, k)) * 1e6
            except Exception as e:  # noqa: BLE001 - a peer failure must not stop the table
                print(f"# FlashInfer top_k failed: {type(e).__name__}: {e}")
        rows.append(row)
    for batch, d, k in ((64, 32768, 2048), (8, 131072, 2048)):
        x = torch.randn(batch, d, device="cuda", generator=g)
        lens = torch.randint(d // 2, d + 1, (batch,), dtype=torch.int32, device="cuda", generator=g)
        table = torch.randperm(batch * d, device="cuda", generator=g).to(torch.int32).view(batch, d)
        ours = lambda: pagoda.top_k_page_table_transform(x, table, lens, k)  # noqa: E731
        row = {"op": f"top_k_page_table_transform k={k}", "shape": f"{batch}x{d}", "pagoda_us": bench(ours) * 1e6,
               "wall_us": wall_per_call(ours, 50) * 1e6}
        if fi is not None:
            try:
                a, b = fi.top_k_page_table_transform(x, table, lens, k), ours()
                if not torch.equal(a.sort(-1).values, b.sort(-1).values):
                    raise AssertionError(f"the transform differs from FlashInfer's; of the rows that differ, the "
                                         f"reference's (torch.topk) agree with pagoda in "
                                         f"{_transform_agrees(x, table, lens, k, a, b)}")
                row["flashinfer_us"] = bench(lambda: fi.top_k_page_table_transform(x, table, lens, k)) * 1e6
            except Exception as e:  # noqa: BLE001
                print(f"# FlashInfer top_k_page_table_transform failed: {type(e).__name__}: {e}")
        rows.append(row)
    return rows


def _transform_agrees(x, table, lens, k, fi_out, ours):
    """For the rows where FlashInfer's and pagoda's page-table transforms differ (as sets): which of them holds
    the table's entries at torch.topk's top-k positions of the row's first lengths[i] values ("pagoda n, FlashInfer
    m of r rows")."""
    rows = [i for i in range(x.shape[0]) if not torch.equal(fi_out[i].sort().values, ours[i].sort().values)]
    mine = theirs = 0
    for i in rows:
        n = int(lens[i])
        want = table[i, torch.topk(x[i, :n], min(k, n)).indices].sort().values
        pad = torch.full((k - len(want),), -1, dtype=want.dtype, device=want.device)
        want = torch.cat([pad, want])  # (-1 sorts first)
        mine += torch.equal(ours[i].sort().values, want)
        theirs += torch.equal(fi_out[i].sort().values, want)
    return f"pagoda {mine}, FlashInfer {theirs} of {len(rows)} rows"


def wall_per_call(fn, n=200):
    """Back-to-back calls without synchronizing: max(host cost, GPU time) per call."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def _bw_row(op, shape, nbytes, ours, ref, peer, copy_bw):
    t = bench(ours)
    row = {"op": op, "shape": shape, "MB": nbytes / 1e6, "pagoda_us": t * 1e6, "wall_us": wall_per_call(ours) * 1e6,
           "pagoda_GBs": nbytes / t / 1e9, "of_copy": nbytes / t / copy_bw}
    if ref is not None:
        row["torch_us"] = bench(ref) * 1e6
    if peer is not None:
        try:
            row["flashinfer_us"] = bench(peer) * 1e6
        except Exception as e:  # noqa: BLE001 - a peer API difference must not stop the table
            print(f"# FlashInfer {op} failed: {type(e).__name__}: {e}")
    return row


def fmt_table(rows):
    head = ("| op | shape | pagoda µs | wall/call µs | GB/s (of copy) | torch µs | x torch | FlashInfer µs "
            "| x FlashInfer |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        bw = f"{r['pagoda_GBs']:.0f} ({r['of_copy']:.0%})" if "pagoda_GBs" in r else ""
        cells = [r["op"], r["shape"], f"{r['pagoda_us']:.1f}", f"{r['wall_us']:.1f}", bw]
        for key in ("torch_us", "flashinfer_us"):
            t = r.get(key)
            cells += ["", ""] if t is None else [f"{t:.1f}", f"{t / r['pagoda_us']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--parts", default="sampling,greedy,bandwidth,topk", help="comma-separated: sampling, greedy, "
                    "bandwidth (norm / RoPE / activation), topk (top_k and the sparse-attention transform)")
    args = ap.parse_args(argv)
    parts = args.parts.split(",")
    known = {"sampling", "greedy", "bandwidth", "topk"}
    if set(parts) - known:
        ap.error(f"--parts: unknown {sorted(set(parts) - known)}")
    fi = flashinfer_or_none()
    copy_bw = copy_bandwidth()
    print(f"# {torch.cuda.get_device_name()}, copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    rows = ((sampling_rows(fi) if "sampling" in parts else []) + (greedy_rows() if "greedy" in parts else [])
            + (bandwidth_rows(fi, copy_bw) if "bandwidth" in parts else [])
            + (topk_rows(fi) if "topk" in parts else []))
    print(fmt_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_GBs": copy_bw / 1e9, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
