"""POD attention benchmark: a serving step's prefill chunks and decodes in one call, pagoda's
BatchPODWithPagedKVCacheWrapper against FlashInfer 0.6.0's (one fused kernel), both libraries' separate prefill +
decode wrappers beside them (what POD should beat), on one GPU in one run.

    python -m pagoda.bench.pod [--json FILE]

bf16, 32 / 8 heads of 128, page 16, one paged cache. Each call is captured in a CUDA graph and replayed with L2
emptied first (bench.attention.gpu_time). Every library's output is checked against pagoda's first.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

import pagoda
from pagoda.bench.attention import PagedSetup, flashinfer_or_none, gpu_time

HQ, HK, D, PS = 32, 8, 128, 16
# (name, prefill chunks' query lengths, their KV lengths (the chunk's own tokens included), decodes' KV lengths)
CASES = [
    ("1 x 1024 chunk over 2k + 64 x 2048 decodes", [1024], [3072], [2048] * 64),
    ("1 x 2048 prompt + 128 x 1024 decodes", [2048], [2048], [1024] * 128),
    ("1 x 512 chunk over 7.5k + 16 x 8192 decodes", [512], [8192], [8192] * 16),
    ("2 x 512 chunks over 1.5k + 256 x 512 decodes", [512, 512], [2048, 2048], [512] * 256),
    ("1 x 256 chunk over 3.8k + 32 x 4096 decodes", [256], [4096], [4096] * 32),
]


def _indptr(lens):
    return torch.tensor([0] + np.cumsum(lens).tolist(), dtype=torch.int32)


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def pod_row(name, qo_p, kv_p, kv_d, fi, ws, dtype=torch.bfloat16):
    dev = ws.device
    s = PagedSetup(kv_p + kv_d, HK, D, PS, dtype, device=dev)
    n = len(kv_p)
    ip, idx, last = s.indptr, s.indices, s.last
    parts = dict(qo_indptr_p=_indptr(qo_p), kv_indptr_p=ip[:n + 1], kv_indices_p=idx[:int(ip[n])],
                 last_page_len_p=last[:n], qo_indptr_d=_indptr([1] * len(kv_d)), kv_indptr_d=ip[n:] - ip[n],
                 kv_indices_d=idx[int(ip[n]):], last_page_len_d=last[n:])
    qp = torch.randn(sum(qo_p), HQ, D, dtype=dtype, device=dev)
    qd = torch.randn(len(kv_d), HQ, D, dtype=dtype, device=dev)
    row = {"case": name, "kv_MB": s.kv_bytes / 1e6}

    w = pagoda.BatchPODWithPagedKVCacheWrapper(ws)
    w.plan(*parts.values(), HQ, HK, D, PS, q_data_type=dtype)
    op, od = w.run(qp, s.cache, qd, s.cache, causal_p=True)
    row["pagoda_us"] = gpu_time(lambda: w.run(qp, s.cache, qd, s.cache, causal_p=True), "pagoda pod") * 1e6
    # the same two parts through pagoda's own prefill and decode wrappers, one after the other
    pw = pagoda.BatchPrefillWithPagedKVCacheWrapper(torch.empty_like(ws))
    pw.plan(parts["qo_indptr_p"], parts["kv_indptr_p"], parts["kv_indices_p"], parts["last_page_len_p"], HQ, HK, D,
            PS, causal=True, q_data_type=dtype)
    dw = pagoda.BatchDecodeWithPagedKVCacheWrapper(torch.empty_like(ws))
    dw.plan(parts["kv_indptr_d"], parts["kv_indices_d"], parts["last_page_len_d"], HQ, HK, D, PS, q_data_type=dtype)
    row["pagoda_err"] = max(_rel(pw.run(qp, s.cache), op), _rel(dw.run(qd, s.cache), od))
    row["pagoda_separate_us"] = gpu_time(lambda: (pw.run(qp, s.cache), dw.run(qd, s.cache)), "pagoda parts") * 1e6

    if fi is not None:
        try:
            fw = fi.BatchPODWithPagedKVCacheWrapper(ws, "NHD")
            fw.plan(*[t.cuda() for t in parts.values()], HQ, HK, D, PS, q_data_type=dtype, kv_data_type=dtype)
            fp, fd = fw.run(qp, s.cache, qd, s.cache, causal_p=True)
            row["flashinfer_err"] = max(_rel(fp, op), _rel(fd, od))
            assert row["flashinfer_err"] < 2e-2, f"pagoda and FlashInfer's POD disagree on {name}: {row}"
            row["flashinfer_us"] = gpu_time(lambda: fw.run(qp, s.cache, qd, s.cache, causal_p=True),
                                            "flashinfer pod") * 1e6
        except Exception as e:  # noqa: BLE001 - a peer failure must not stop the table
            print(f"# FlashInfer POD failed on {name}: {type(e).__name__}: {e}")
        fpw = fi.BatchPrefillWithPagedKVCacheWrapper(torch.empty_like(ws), "NHD")
        fpw.plan(*[parts[k].cuda() for k in ("qo_indptr_p", "kv_indptr_p", "kv_indices_p", "last_page_len_p")],
                 HQ, HK, D, PS, causal=True, q_data_type=dtype)
        fdw = fi.BatchDecodeWithPagedKVCacheWrapper(torch.empty_like(ws), "NHD", use_tensor_cores=True)
        fdw.plan(*[parts[k].cuda() for k in ("kv_indptr_d", "kv_indices_d", "last_page_len_d")], HQ, HK, D, PS,
                 q_data_type=dtype)
        row["flashinfer_separate_us"] = gpu_time(lambda: (fpw.run(qp, s.cache), fdw.run(qd, s.cache)),
                                                 "flashinfer parts") * 1e6
    return row


def fmt_table(rows) -> str:
    lines = ["| case | KV MB | pagoda POD us | pagoda prefill + decode us | FlashInfer POD us | "
             "FlashInfer prefill + decode us | x FlashInfer POD | x FlashInfer's best |", "|" + "---|" * 8]
    for r in rows:
        f, fs = r.get("flashinfer_us"), r.get("flashinfer_separate_us")
        best = min(x for x in (f, fs) if x is not None) if (f or fs) else None
        cells = [r["case"], f"{r['kv_MB']:.0f}", f"{r['pagoda_us']:.1f}", f"{r['pagoda_separate_us']:.1f}",
                 f"{f:.1f}" if f else "", f"{fs:.1f}" if fs else "", f"{f / r['pagoda_us']:.2f}" if f else "",
                 f"{best / r['pagoda_us']:.2f}" if best else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    fi = flashinfer_or_none()
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    print(f"# {torch.cuda.get_device_name()}, bf16, {HQ} / {HK} heads of {D}, page {PS}; CUDA-graph replay, L2 "
          f"emptied first; x: the peer's time over pagoda's POD (> 1: pagoda faster)")
    rows = []
    for name, qo_p, kv_p, kv_d in CASES:
        rows.append(pod_row(name, qo_p, kv_p, kv_d, fi, ws))
        print(rows[-1], flush=True)
    print(fmt_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
