"""Decode at small batches (the engine's batch-1 latency case runs 32 of these per token): does the planner's
KV chunk length suit them? (device)

The cost model (plan.py) charges each work item ``item_cost`` KV tokens (2048 for the 4-program decode
config, tuned on throughput cases); at batch 1..8 with short contexts latency is what counts, and a split
into more, shorter chunks may finish sooner. For batch 1, 2, 4, 8 at 1024 and 4096 tokens, times pagoda's
decode (CUDA-graph replays) at the planner's chunk length and at forced ones, and FlashInfer's decode.

    python scripts/small_batch_probe.py [--no-peer]    # --no-peer: skip FlashInfer (and its ~1 min JIT)
"""
import sys

import torch

import pagoda
from pagoda.attention import plan as plan_mod
from pagoda.bench.attention import PagedSetup, flashinfer_or_none, gpu_time

HQ, HK, D, PS, DT = 32, 8, 128, 16, torch.bfloat16
FORCED = [None, 32, 64, 128, 256, 512, 1024]
_small, _large = plan_mod._choose_chunk_len_small, plan_mod._choose_chunk_len


def force(chunk):
    """Make both chunk choosers return ``chunk`` (None: the planner's own choice)."""
    plan_mod._choose_chunk_len_small = (lambda *a: chunk) if chunk else _small
    plan_mod._choose_chunk_len = (lambda *a: chunk) if chunk else _large


def main():
    fi = None if "--no-peer" in sys.argv else flashinfer_or_none()
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    print(f"{'case':9s} " + " ".join(f"{'plan' if c is None else 'L=' + str(c):>8s}" for c in FORCED)
          + f" {'chosen L':>8s} {'FI':>8s}   (us)", flush=True)
    for ctx in (1024, 4096):
        for b in (1, 2, 4, 8):
            s = PagedSetup([ctx] * b, HK, D, PS, DT)
            q = torch.randn(b, HQ, D, dtype=DT, device="cuda")
            row, chosen, ref = [], None, None
            for chunk in FORCED:
                force(chunk)
                w = pagoda.BatchDecodeWithPagedKVCacheWrapper(ws)
                w.plan(s.indptr, s.indices, s.last, HQ, HK, D, PS, q_data_type=DT)
                out = w.run(q, s.cache)
                if ref is None:
                    ref, chosen = out, w._plan.work.chunk_len
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                assert err < 1e-2, f"{b}x{ctx} L={chunk}: output differs ({err:.3g})"
                row.append(gpu_time(lambda: w.run(q, s.cache, out=out)) * 1e6)
            force(None)
            t_fi = float("nan")
            if fi is not None:
                fw = fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)
                fw.plan(s.indptr.cuda(), s.indices.cuda(), s.last.cuda(), HQ, HK, D, PS, q_data_type=DT)
                t_fi = gpu_time(lambda: fw.run(q, s.cache)) * 1e6
            print(f"{b}x{ctx:<7d} " + " ".join(f"{t:8.1f}" for t in row) + f" {chosen:8d} {t_fi:8.1f}", flush=True)


if __name__ == "__main__":
    main()
