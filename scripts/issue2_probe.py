"""Probe of the two cases still short of the attention-core issue's first targets (device only):

A. decode 1x32768 (and 2x16384, 16x4096 for contrast): kernel configurations x forced KV chunk lengths;
B. paged causal prefill 8 x (512 onto 4096): is the loss the tail of 1024 equal tasks on 132 CTAs
   (7.76 rounds)? The same per-request shape at 33 requests is exactly 32 rounds; forced chunk lengths.

    python scripts/issue2_probe.py [decode|prefill]
"""
import sys

import torch

import pagoda
from pagoda.attention import plan as plan_mod
from pagoda.attention import runner
from pagoda.bench.attention import PagedSetup, bench, flashinfer_or_none

HQ, HK, D, PS, DT = 32, 8, 128, 16, torch.bfloat16
_orig_choose = plan_mod._choose_chunk_len
_orig_select = runner.select_config
_orig_order = plan_mod._item_order


def force(chunk=None, cfg=None):
    plan_mod._choose_chunk_len = (lambda *a: chunk) if chunk else _orig_choose
    if cfg is None:
        runner.select_config = _orig_select
    else:
        bm, bn, warps, stages, ctas, maxnreg = cfg

        def sel(mode, head_dim, group, on_cuda, kv_bytes=2, mean_kv=0.0):
            c = _orig_select(mode, head_dim, group, on_cuda, kv_bytes, mean_kv)
            return plan_mod.KernelConfig(max(bm, c.block_m), bn, warps, stages, ctas, c.heads_per_prog,
                                         c.item_cost, maxnreg=maxnreg)
        runner.select_config = sel


def decode(ws, fi):
    """Same bytes and task count with and without a split (1x32768 at L=512 vs 64x512): the merge's cost."""
    cfgs = [None, (16, 32, 4, 3, 4, 128), (16, 32, 4, 5, 2, None), (16, 64, 4, 3, 2, None)]
    for name, lens, chunks in (("1x32768", [32768], (None, 512, 1024)), ("64x512", [512] * 64, (None,)),
                               ("32x1024", [1024] * 32, (None,)), ("2x16384", [16384] * 2, (None, 512, 1024))):
        s = PagedSetup(lens, HK, D, PS, DT)
        q = torch.randn(len(lens), HQ, D, dtype=DT, device="cuda")
        ref = None
        if fi is not None:
            fw = fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=False)
            fw.plan(s.indptr.cuda(), s.indices.cuda(), s.last.cuda(), HQ, HK, D, PS, q_data_type=DT)
            ref = fw.run(q, s.cache)
            t = bench(lambda: fw.run(q, s.cache)) * 1e6
            print(f"{name:10s} flashinfer                         {t:8.1f} us {s.kv_bytes / t / 1e3:6.0f} GB/s")
        for cfg in cfgs:
            for chunk in chunks:
                ts = []
                for _ in range(2):
                    force(chunk, cfg)
                    try:
                        w = pagoda.BatchDecodeWithPagedKVCacheWrapper(ws)
                        w.plan(s.indptr, s.indices, s.last, HQ, HK, D, PS, q_data_type=DT)
                    finally:
                        force()
                    out = w.run(q, s.cache)
                    ts.append(bench(lambda: w.run(q, s.cache, out=out)) * 1e6)
                if ref is not None:
                    err = ((ref.float() - out.float()).norm() / ref.float().norm()).item()
                    assert err < 2e-2, (name, cfg, chunk, err)
                t = min(ts)
                print(f"{name:10s} {str(cfg):26s} L={w._plan.work.chunk_len:5d} items={len(w._plan.work.work):4d} "
                      f"{ts[0]:7.1f} {ts[1]:7.1f} us {s.kv_bytes / t / 1e3:6.0f} GB/s", flush=True)


def prefill(ws, fi):
    for b, qo_len, kv_len in ((8, 512, 4608), (33, 512, 4608), (8, 1024, 1024), (1, 8192, 8192), (1, 16384, 16384)):
        s = PagedSetup([kv_len] * b, HK, D, PS, DT)
        qo = torch.arange(b + 1, dtype=torch.int32) * qo_len
        q = torch.randn(b * qo_len, HQ, D, dtype=DT, device="cuda")
        flops = b * 4 * HQ * D * (qo_len * (kv_len - qo_len) + qo_len * (qo_len + 1) / 2)
        name = f"{b}x({qo_len} onto {kv_len - qo_len})"
        if fi is not None:
            fw = fi.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
            fw.plan(qo.cuda(), s.indptr.cuda(), s.indices.cuda(), s.last.cuda(), HQ, HK, D, PS, causal=True,
                    q_data_type=DT)
            t = bench(lambda: fw.run(q, s.cache)) * 1e6
            print(f"{name:22s} flashinfer          {t:8.1f} us {flops / t / 1e6:5.0f} TF/s")
        for chunk, order in ((None, True), (None, False), (kv_len // 2, True)):
            force(chunk)
            if not order:
                plan_mod._item_order = lambda length, req, decode: _orig_order(length, req, True)
            try:
                w = pagoda.BatchPrefillWithPagedKVCacheWrapper(ws)
                w.plan(qo, s.indptr, s.indices, s.last, HQ, HK, D, PS, causal=True, q_data_type=DT)
            except RuntimeError as e:  # a forced split past the workspace
                print(f"{name:22s} L={chunk}: {e}")
                continue
            finally:
                force()
                plan_mod._item_order = _orig_order
            out = w.run(q, s.cache)
            t = bench(lambda: w.run(q, s.cache, out=out)) * 1e6
            p = w._plan
            print(f"{name:22s} grouped={int(order)} L={p.work.chunk_len:5d} sm90={p.sm90} items={len(p.work.work):5d} "
                  f"splits={len(p.work.splits):4d} {t:8.1f} us {flops / t / 1e6:5.0f} TF/s", flush=True)


if __name__ == "__main__":
    ws = torch.empty(512 << 20, dtype=torch.uint8, device="cuda")
    fi = flashinfer_or_none()
    what = sys.argv[1:] or ["decode", "prefill"]
    if "decode" in what:
        decode(ws, fi)
    if "prefill" in what:
        prefill(ws, fi)
