"""A/B of the prefill kernels on the device: the Gluon sm_90 kernel (configurations of
runner.SM90_CONFIG) vs the Triton kernel (PAGODA_PREFILL_KERNEL=triton), paged and ragged, at the
benchmark's prefill cases; outputs are compared with the Triton kernel's.

    python scripts/prefill_ab.py                        # head_dim 128
    PREFILL_AB_HEAD_DIM=64 python scripts/prefill_ab.py   # head_dim 64 (256: SM90_CONFIG_D256's alternatives)
"""
import os

import torch
import pagoda
from pagoda.attention import runner
from pagoda.bench.attention import PagedSetup, gpu_time

# Gluon kernel configurations to compare: (block_n, stages, producer registers, consumer registers[, q_smem[,
# band[, tma[, q_ahead]]]]) (q_smem 1: Q K^T reads Q from shared memory; band: the task order, 0 item by item, 1
# banded, 2 the planner's choice, the default: runner.PREFILL_BAND; tma 1 (default): full KV blocks by bulk copies,
# prefill_sm90.tma_views, 0: cp.async gathers; q_ahead 1: the next task's Q copied ahead, prefill_sm90._ws_fetch_q);
# PREFILL_AB="64,5,88,208;128,3,88,208,1,2,0" overrides ("planner": the runner's own choice, SM90_CONFIG or
# SM90_LONG_CONFIG, and its task band). The default compares the planner's configurations without and with q_ahead.
SM90 = [() if c == "planner" else tuple(int(x) for x in c.split(",")) for c in os.environ.get(
    "PREFILL_AB", "planner;128,3,88,208,1,2,1,0;128,3,88,208,1,2,1,1;64,5,88,208,0,2,1,0;64,5,88,208,0,2,1,1"
).split(";")]
DEFAULTS = (runner.SM90_CONFIG, runner.SM90_LONG_CONFIG, runner.SM90_LONG_CONFIG_D64, runner.SM90_CONFIG_D256,
            runner.PREFILL_BAND)


def main():
    hq, hk, ps, dt = 32, 8, 16, torch.bfloat16
    d = int(os.environ.get("PREFILL_AB_HEAD_DIM", "128"))
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    print(f"{'case':24s} {'kernel':28s} {'paged us':>9s} {'TF/s':>6s} {'ragged us':>9s} {'TF/s':>6s}")
    for name, qo_lens, kv_lens in (("1x8192", [8192], [8192]), ("8x1024", [1024] * 8, [1024] * 8),
                                   ("8x(512 onto 4096)", [512] * 8, [4608] * 8), ("1x16384", [16384], [16384])):
        s = PagedSetup(kv_lens, hk, d, ps, dt)
        qo = torch.tensor([0] + torch.tensor(qo_lens).cumsum(0).tolist(), dtype=torch.int32)
        kvi = torch.tensor([0] + torch.tensor(kv_lens).cumsum(0).tolist(), dtype=torch.int32)
        q = torch.randn(int(qo[-1]), hq, d, dtype=dt, device="cuda")
        k = torch.randn(int(kvi[-1]), hk, d, dtype=dt, device="cuda")
        v = torch.randn_like(k)
        flops = sum(4 * hq * d * (kv - qn / 2) * qn for qn, kv in zip(qo_lens, kv_lens))
        outs = {}
        for kernel, cfg in [("triton", None)] + [("auto", c) for c in SM90]:
            os.environ["PAGODA_PREFILL_KERNEL"] = kernel
            (runner.SM90_CONFIG, runner.SM90_LONG_CONFIG, runner.SM90_LONG_CONFIG_D64, runner.SM90_CONFIG_D256,
             runner.PREFILL_BAND) = DEFAULTS
            if cfg:
                forced = dict(block_n=cfg[0], stages=cfg[1], producer_regs=cfg[2], consumer_regs=cfg[3],
                              q_smem=cfg[4] if len(cfg) > 4 else 0, tma=cfg[6] if len(cfg) > 6 else 1,
                              q_ahead=cfg[7] if len(cfg) > 7 else 0)
                runner.SM90_CONFIG = runner.SM90_LONG_CONFIG = runner.SM90_LONG_CONFIG_D64 = forced
                runner.SM90_CONFIG_D256 = forced
                runner.PREFILL_BAND = ("off", "on", "auto")[cfg[5] if len(cfg) > 5 else 2]
            wp = pagoda.BatchPrefillWithPagedKVCacheWrapper(ws)
            wp.plan(qo, s.indptr, s.indices, s.last, hq, hk, d, ps, causal=True, q_data_type=dt)
            wr = pagoda.BatchPrefillWithRaggedKVCacheWrapper(ws)
            wr.plan(qo, kvi, hq, hk, d, causal=True, q_data_type=dt)
            try:
                tp = gpu_time(lambda: wp.run(q, s.cache)) * 1e6
                tr = gpu_time(lambda: wr.run(q, k, v)) * 1e6
                outs[cfg] = (wp.run(q, s.cache), wr.run(q, k, v))
            except Exception as e:  # noqa: BLE001 - a configuration that does not compile is reported
                print(f"{name:24s} sm90 {cfg}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            tag = (f"sm90 {cfg or 'planner'}" if wp._plan.sm90 else "triton")
            print(f"{name:24s} {tag:28s} {tp:9.1f} {flops / tp / 1e6:6.0f} {tr:9.1f} {flops / tr / 1e6:6.0f}", flush=True)
        for cfg in SM90:
            for a, b in zip(outs[None], outs.get(cfg, ())):
                err = ((a.float() - b.float()).norm() / a.float().norm()).item()
                assert err < 1e-2, f"{name} {cfg}: kernels differ, rel err {err:.3g}"
    os.environ.pop("PAGODA_PREFILL_KERNEL")


if __name__ == "__main__":
    main()
