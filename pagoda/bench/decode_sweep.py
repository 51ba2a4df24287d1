"""Decode (and prefill) beyond the main attention table (the performance issue's extra rows), pagoda vs
FlashInfer in one run:

  graph     CUDA-graph wrappers at batch 1..256 (KV 1024 each, Llama-3.1-8B attention shape): GPU time of
            a replayed run() and the host time of plan() (pagoda and FlashInfer, minimum of 50 plans); FlashInfer
            on the faster of its two decode paths (use_tensor_cores False / True, the "FI path" column: in
            CUDA-graph mode its tensor-core path ran 1.2-3.4x its other one at batch 8-256 on the H200, session 28)
  variants  64 x 2048 and 1 x 32768 at page_size 1 vs 16, head_dim 64 / 256, GQA group 1 / 8, fp16 (and, named in
            --variants, a sliding window, a logits soft cap, Gemma-2's sliding layers: both libraries take them)
  prefill   the same variants in causal paged prefill, 1 x 8192 and 8 x 1024 (bench.attention.prefill_row:
            FlashInfer, and dense SDPA over the same shapes; not in the default parts)
  sinks     attention sinks (gpt-oss: run(sinks=)) in decode (64 x 2048, 1 x 32768) and causal paged prefill
            (1 x 8192, 8 x 1024) at gpt-oss's attention shape (64 / 8 heads of 64) and the table's (32 / 8 of 128):
            pagoda with and without sinks, and FlashInfer's BatchAttentionWithAttentionSinkWrapper (its prefill
            wrapper with the AttentionSink variant, which serves decode as one-query prefill), each output's error
            against the exact result (pagoda's output without sinks, scaled by e^lse / (e^lse + e^sink); not in the
            default parts)

    python -m pagoda.bench.decode_sweep [--parts graph,variants,prefill,sinks] [--variants fp16,...] [--json FILE]
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import torch

import pagoda

from .attention import (PagedSetup, causal_flops, decode_row, flashinfer_or_none, gpu_time, host_times_us,
                        prefill_row, write_json)

BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
VARIANTS = [  # (label, heads, head_dim, page_size, dtype, plan() arguments)
    ("base", (32, 8), 128, 16, torch.bfloat16, {}), ("page 1", (32, 8), 128, 1, torch.bfloat16, {}),
    ("head_dim 64", (32, 8), 64, 16, torch.bfloat16, {}), ("head_dim 256", (32, 8), 256, 16, torch.bfloat16, {}),
    ("group 1", (32, 32), 128, 16, torch.bfloat16, {}), ("group 8", (64, 8), 128, 16, torch.bfloat16, {}),
    ("fp16", (32, 8), 128, 16, torch.float16, {}),
    # a sliding window as Mistral's (4096 tokens: window_left 4095), a logits soft cap as Gemma-2's (50), and
    # Gemma-2-9B's sliding layers (16 / 8 heads of 256, both)
    ("window 4096", (32, 8), 128, 16, torch.bfloat16, {"window_left": 4095}),
    ("soft cap 50", (32, 8), 128, 16, torch.bfloat16, {"logits_soft_cap": 50.0}),
    ("gemma-2 local", (16, 8), 256, 16, torch.bfloat16, {"window_left": 4095, "logits_soft_cap": 50.0}),
]
DEFAULT_VARIANTS = 7  # the first 7: what --variants runs by default (the table: sessions 17-29)


def _host_us(fn, n=50):
    """Host time of fn in microseconds: the minimum of n calls back to back (after 3 warm-up calls). A shared host
    adds noise only upward (the median of 20 plans moved by up to 2x between two runs on the device's host,
    for FlashInfer and pagoda alike), so the minimum is the repeatable number."""
    return float(host_times_us(fn, n, sync=False, warmup=3).min())


def graph_rows(fi, ws, kv_len=1024, save=lambda rows: None):
    hq, hk, d, ps, dt = 32, 8, 128, 16, torch.bfloat16
    rows = []
    for b in BATCHES:
        s = PagedSetup([kv_len] * b, hk, d, ps, dt)
        q = torch.randn(b, hq, d, dtype=dt, device="cuda")
        w = pagoda.BatchDecodeWithPagedKVCacheWrapper(ws, use_cuda_graph=True)
        plan = lambda: w.plan(s.indptr, s.indices, s.last, hq, hk, d, ps, q_data_type=dt)  # noqa: E731
        plan()
        out = torch.empty_like(q)
        w.run(q, s.cache, out=out)
        row = {"batch": b, "kv_len": kv_len, "kv_MB": s.kv_bytes / 1e6, "pagoda_plan_us": _host_us(plan),
               "pagoda_us": gpu_time(lambda: w.run(q, s.cache, out=out), "pagoda") * 1e6}
        if fi is not None:  # FlashInfer at its faster decode path (CUDA cores or tensor cores), as bench.attention
            for tc in (False, True):
                fw = fi.BatchDecodeWithPagedKVCacheWrapper(
                    ws, "NHD", use_cuda_graph=True, use_tensor_cores=tc,
                    paged_kv_indptr_buffer=torch.zeros(b + 1, dtype=torch.int32, device="cuda"),
                    paged_kv_indices_buffer=torch.zeros(s.indices.numel(), dtype=torch.int32, device="cuda"),
                    paged_kv_last_page_len_buffer=torch.zeros(b, dtype=torch.int32, device="cuda"))
                fplan = lambda fw=fw: fw.plan(s.indptr, s.indices, s.last, hq, hk, d, ps, q_data_type=dt)  # noqa: E731
                fplan()
                ref = fw.run(q, s.cache)
                err = ((ref.float() - out.float()).norm() / ref.float().norm()).item()
                assert err < 2e-2, f"pagoda and FlashInfer (tensor cores {tc}) disagree at batch {b}: {err}"
                t = gpu_time(lambda fw=fw: fw.run(q, s.cache), "flashinfer") * 1e6
                if "flashinfer_us" not in row or t < row["flashinfer_us"]:
                    row.update(flashinfer_us=t, flashinfer_plan_us=_host_us(fplan), flashinfer_tensor_cores=tc)
        rows.append(row)
        save(rows)
        print(fmt_graph([row]).splitlines()[-1], flush=True)
    return rows


DECODE_CASES = [("64x2048", [2048] * 64), ("1x32768", [32768])]
PREFILL_CASES = [("1x8192", [8192], [8192]), ("8x1024", [1024] * 8, [1024] * 8)]


def _sweep_variants(cases, row_of, fmt, save, only):
    """row_of(case, heads, head_dim, page_size, dtype) for each case of each VARIANTS entry (those named in only,
    or all), labelled with the variant; save(rows) and a printed line after each."""
    rows = []
    for label, (hq, hk), d, ps, dt, kw in VARIANTS:
        if label not in (only or [v[0] for v in VARIANTS[:DEFAULT_VARIANTS]]):
            continue
        for case in cases:
            row = row_of(case, hq, hk, d, ps, dt, **kw)
            row.update(variant=label, heads=f"{hq}/{hk}", head_dim=d, page_size=ps, dtype=str(dt).split(".")[-1],
                       **kw)
            rows.append(row)
            save(rows)
            print(fmt([row]).splitlines()[-1], flush=True)
    return rows


def variant_rows(fi, ws, save=lambda rows: None, only=None):
    return _sweep_variants(DECODE_CASES,
                           lambda c, hq, hk, d, ps, dt, **kw: decode_row(*c, hq, hk, d, ps, dt, fi, ws, **kw),
                           fmt_variants, save, only)


def prefill_variant_rows(fi, ws, save=lambda rows: None, only=None):
    return _sweep_variants(PREFILL_CASES,
                           lambda c, hq, hk, d, ps, dt, **kw: prefill_row(*c, hq, hk, d, ps, dt, fi, ws, None, **kw),
                           fmt_prefill, save, only)


SINK_SHAPES = [("gpt-oss", (64, 8), 64), ("base", (32, 8), 128)]  # (label, heads, head_dim)
SINK_CASES = [("64x2048", [1] * 64, [2048] * 64), ("1x32768", [1], [32768]), ("1x8192", [8192], [8192]),
              ("8x1024", [1024] * 8, [1024] * 8)]  # (name, qo_lens, kv_lens): one query each is decode


def sink_rows(fi, ws, save=lambda rows: None, shapes=None):
    """pagoda's decode / prefill wrapper with run(sinks=) against the same without sinks and against FlashInfer's
    sink wrapper (bf16, page 16, causal prefill). Errors are relative L2 against the exact sink result computed from
    pagoda's no-sink output and lse (reference.py's identity: out * e^lse / (e^lse + e^sink)). shapes: the
    SINK_SHAPES labels to run (None: all)."""
    rows = []
    for label, (hq, hk), d in SINK_SHAPES:
        if shapes and label not in shapes:
            continue
        for name, qo_lens, kv_lens in SINK_CASES:
            dt, ps = torch.bfloat16, 16
            s = PagedSetup(kv_lens, hk, d, ps, dt)
            qo_indptr = torch.tensor([0] + np.cumsum(qo_lens).tolist(), dtype=torch.int32)
            q = torch.randn(int(qo_indptr[-1]), hq, d, dtype=dt, device="cuda")
            sinks = (torch.linspace(-2.0, 9.0, hq, device="cuda") + 0.3 * torch.randn(hq, device="cuda"))
            decode = max(qo_lens) == 1
            if decode:
                w = pagoda.BatchDecodeWithPagedKVCacheWrapper(ws)
                w.plan(s.indptr, s.indices, s.last, hq, hk, d, ps, q_data_type=dt)
            else:
                w = pagoda.BatchPrefillWithPagedKVCacheWrapper(ws)
                w.plan(qo_indptr, s.indptr, s.indices, s.last, hq, hk, d, ps, causal=True, q_data_type=dt)
            out0, lse0 = w.run(q, s.cache, return_lse=True)
            out1 = w.run(q, s.cache, sinks=sinks)
            lse_nat = lse0.double() * math.log(2.0)
            frac = 1.0 / (1.0 + torch.exp(sinks.double()[None, :] - lse_nat))
            exact = out0.double() * frac[..., None]

            def err(o):
                return ((o.double() - exact).norm() / exact.norm()).item()
            row = {"shape": label, "case": name, "kind": "decode" if decode else "prefill", "heads": f"{hq}/{hk}",
                   "head_dim": d, "kv_MB": s.kv_bytes / 1e6, "tflop": causal_flops(qo_lens, kv_lens, hq, d) / 1e12,
                   "pagoda_err": err(out1), "sink_share": float(1.0 - frac.mean()),
                   "pagoda_nosink_us": gpu_time(lambda: w.run(q, s.cache, out=out0), "pagoda") * 1e6,
                   "pagoda_us": gpu_time(lambda: w.run(q, s.cache, out=out1, sinks=sinks), "pagoda sinks") * 1e6}
            if fi is not None and hasattr(fi, "BatchAttentionWithAttentionSinkWrapper"):
                fw = fi.BatchAttentionWithAttentionSinkWrapper(ws, "NHD", q_data_type=dt, kv_data_type=dt,
                                                               head_dim_qk=d, head_dim_vo=d)
                fw.plan(qo_indptr.cuda(), s.indptr.cuda(), s.indices.cuda(), s.last.cuda(), hq, hk, d, ps,
                        causal=not decode, q_data_type=dt, kv_data_type=dt)
                scale = 1.0 / math.sqrt(d)
                fo = fw.run(q, s.cache, sinks, scale)
                row["flashinfer_err"] = err(fo)
                row["flashinfer_us"] = gpu_time(lambda: fw.run(q, s.cache, sinks, scale), "flashinfer sinks") * 1e6
            rows.append(row)
            save(rows)
            print(fmt_sinks([row]).splitlines()[-1], flush=True)
    return rows


def fmt_sinks(rows):
    lines = [f"{'shape':8s} {'case':8s} {'pagoda us':>10} {'rate':>9} {'no sinks':>9} {'FI us':>8} {'x FI':>6} "
             f"{'err':>8} {'FI err':>8} {'sink share':>10}"]
    for r in rows:
        rate = (f"{r['kv_MB'] / r['pagoda_us'] * 1e3:5.0f} GB/s" if r["kind"] == "decode"
                else f"{r['tflop'] / r['pagoda_us'] * 1e6:4.0f} TF/s")
        lines.append(f"{r['shape']:8s} {r['case']:8s} {r['pagoda_us']:10.1f} {rate:>9} {r['pagoda_nosink_us']:9.1f} "
                     f"{_peer(r, 'flashinfer_us')} {r['pagoda_err']:8.1e} {r.get('flashinfer_err', float('nan')):8.1e} "
                     f"{r['sink_share']:10.2f}")
    return "\n".join(lines)


def _peer(r, key) -> str:
    """A peer's time column and its time / pagoda's time (nan where the row has no such peer)."""
    t = r.get(key)
    return f"{t or float('nan'):8.1f} {(t / r['pagoda_us']) if t else float('nan'):5.2f}x"


def fmt_prefill(rows):
    lines = [f"{'variant':14s} {'case':9s} {'pagoda us':>10} {'TF/s':>6} {'FI us':>8} {'x FI':>6} {'SDPA us':>8} "
             f"{'x SDPA':>6}"]
    for r in rows:
        tfs = r['tflop'] / r['pagoda_us'] * 1e6
        lines.append(f"{r['variant']:14s} {r['case']:9s} {r['pagoda_us']:10.1f} {tfs:6.0f} "
                     f"{_peer(r, 'flashinfer_us')} {_peer(r, 'sdpa_us')}")
    return "\n".join(lines)


def fmt_graph(rows):
    lines = [f"{'batch':>5} {'pagoda us':>10} {'FI us':>8} {'x FI':>6} {'plan us':>8} {'FI plan':>8} {'FI path':>8}"]
    for r in rows:
        path = {None: "-", False: "cuda", True: "tensor"}[r.get("flashinfer_tensor_cores")]
        lines.append(f"{r['batch']:5d} {r['pagoda_us']:10.1f} {_peer(r, 'flashinfer_us')} {r['pagoda_plan_us']:8.0f} "
                     f"{r.get('flashinfer_plan_us', float('nan')):8.0f} {path:>8}")
    return "\n".join(lines)


def fmt_variants(rows):
    lines = [f"{'variant':14s} {'case':9s} {'pagoda us':>10} {'GB/s':>6} {'FI us':>8} {'x FI':>6}"]
    for r in rows:
        lines.append(f"{r['variant']:14s} {r['case']:9s} {r['pagoda_us']:10.1f} {r['kv_MB'] / r['pagoda_us'] * 1e3:6.0f} "
                     f"{_peer(r, 'flashinfer_us')}")
    return "\n".join(lines)


# each part: its rows (fi, ws, save, only) and its table
PARTS = {"graph": (lambda fi, ws, save, only: graph_rows(fi, ws, save=save), fmt_graph),
         "variants": (variant_rows, fmt_variants), "prefill": (prefill_variant_rows, fmt_prefill),
         "sinks": (lambda fi, ws, save, only: sink_rows(fi, ws, save, SINK_SHAPES_ONLY or None), fmt_sinks)}
# --sink-shapes: the SINK_SHAPES labels the sinks part runs (FlashInfer 0.6.0 names its sink wrapper's JIT module
# without the head_dim, so a second head_dim in one process, or one JIT cache, reuses the first's kernel: session 35)
SINK_SHAPES_ONLY: list = []


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="graph,variants")
    ap.add_argument("--json")
    ap.add_argument("--variants", default=None,
                    help="comma-separated labels of the variants (and prefill) parts to run (default: "
                         + ", ".join(v[0] for v in VARIANTS[:DEFAULT_VARIANTS]) + "; also: "
                         + ", ".join(v[0] for v in VARIANTS[DEFAULT_VARIANTS:]) + ")")
    ap.add_argument("--sink-shapes", default=None, help="labels of SINK_SHAPES for the sinks part (default: all)")
    args = ap.parse_args(argv)
    SINK_SHAPES_ONLY[:] = args.sink_shapes.split(",") if args.sink_shapes else []
    if set(SINK_SHAPES_ONLY) - {v[0] for v in SINK_SHAPES}:
        ap.error(f"--sink-shapes: unknown labels {sorted(set(SINK_SHAPES_ONLY) - {v[0] for v in SINK_SHAPES})}")
    only = None if args.variants is None else args.variants.split(",")
    parts = args.parts.split(",")
    if set(parts) - set(PARTS):
        ap.error(f"--parts: unknown parts {sorted(set(parts) - set(PARTS))} (known: {', '.join(PARTS)})")
    if only is not None and set(only) - {v[0] for v in VARIANTS}:
        ap.error(f"--variants: unknown labels {sorted(set(only) - {v[0] for v in VARIANTS})}")
    fi = flashinfer_or_none()
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    print(f"# device: {torch.cuda.get_device_name()}, FlashInfer {getattr(fi, '__version__', 'absent')}")
    res = {}

    def save(part):  # after every row: a time-limited device call keeps what finished
        def f(rows):
            res[part] = rows
            write_json(args.json, sum((res.get(k, []) for k in PARTS), []), args, partial=True)
        return f
    for part, (rows_of, _) in PARTS.items():
        if part in parts:
            res[part] = rows_of(fi, ws, save(part), only)
    print()
    for part, (_, fmt) in PARTS.items():
        if part in res:
            print(fmt(res[part]))
    write_json(args.json, sum((res.get(k, []) for k in PARTS), []), args)


if __name__ == "__main__":
    main()
