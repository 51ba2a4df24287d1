"""Compile FlashInfer's JIT modules for decode_sweep variants ahead of the timed run (each new head_dim / window /
soft cap is a ~1 minute build on the device host), one process per variant so that the builds share the host's
cores; tiny shapes, nothing timed. Meant to run in the background of a device call while the GPU tests run.

    python scripts/fi_jit_warm.py "window 4096,soft cap 50"      (labels of pagoda.bench.decode_sweep.VARIANTS)
    python scripts/fi_jit_warm.py "sinks 64,sinks 128"           (BatchAttentionWithAttentionSinkWrapper at those
                                                                  head_dims, bf16: decode_sweep --parts sinks)
"""
import multiprocessing as mp
import sys
import time


def warm(label: str) -> str:
    import torch

    import flashinfer
    from pagoda.bench.attention import PagedSetup
    from pagoda.bench.decode_sweep import VARIANTS

    t0 = time.time()
    ws = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    if label.startswith("sinks "):
        d = int(label.split()[1])
        s = PagedSetup([100, 40], 8, d, 16, torch.bfloat16)
        fw = flashinfer.BatchAttentionWithAttentionSinkWrapper(ws, "NHD", q_data_type=torch.bfloat16,
                                                               kv_data_type=torch.bfloat16, head_dim_qk=d,
                                                               head_dim_vo=d)
        qo = torch.tensor([0, 100, 140], dtype=torch.int32, device="cuda")
        fw.plan(qo, s.indptr.cuda(), s.indices.cuda(), s.last.cuda(), 64, 8, d, 16, causal=True,
                q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
        fw.run(torch.randn(140, 64, d, dtype=torch.bfloat16, device="cuda"), s.cache,
               torch.zeros(64, device="cuda"), d ** -0.5)
        torch.cuda.synchronize()
        return f"{label}: {time.time() - t0:.0f} s"
    _, (hq, hk), d, ps, dt, kw = next(v for v in VARIANTS if v[0] == label)
    s = PagedSetup([100, 40], hk, d, ps, dt)
    q = torch.randn(2, hq, d, dtype=dt, device="cuda")
    for tc in (False, True):  # the decode sweep times both decode paths
        fw = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tc)
        fw.plan(s.indptr.cuda(), s.indices.cuda(), s.last.cuda(), hq, hk, d, ps, q_data_type=dt, **kw)
        fw.run(q, s.cache)
    qo = torch.tensor([0, 100, 140], dtype=torch.int32, device="cuda")
    fw = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
    fw.plan(qo, s.indptr.cuda(), s.indices.cuda(), s.last.cuda(), hq, hk, d, ps, causal=True, q_data_type=dt, **kw)
    fw.run(torch.randn(140, hq, d, dtype=dt, device="cuda"), s.cache)
    torch.cuda.synchronize()
    return f"{label}: {time.time() - t0:.0f} s"


if __name__ == "__main__":
    labels = sys.argv[1].split(",")
    with mp.get_context("spawn").Pool(len(labels)) as pool:
        for line in pool.imap_unordered(warm, labels):
            print(line, flush=True)
