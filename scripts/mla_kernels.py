"""Where a batch of MLA decode spends its device time, kernel by kernel (device): each case's CUDA-graph
replay after an L2 flush, under torch.profiler (CUPTI), averaged per kernel name, for pagoda (the Gluon MLA
kernel and its merge launch) and FlashInfer 0.6.0's MLA wrapper, plus the Gluon kernel with one stage left out
(kernels/mla_sm90.py ABLATE: 1 no loads, 2 no Q K^T, 4 no P V; timing only, wrong results).

    python scripts/mla_kernels.py [--cases 1x1024,1x8192,1x32768,16x1024,128x8192] [--no-ablate]
    python scripts/mla_kernels.py --combine-sweep      (the merge launch's time under each mla.MLA_COMBINE setting)
    python scripts/mla_kernels.py --configs 32:4:168:56,64:2:168:88 [--rounds 2]
        (the Gluon kernel under each mla.MLA_SM90_CONFIG block_n:stages:pv_regs:producer_regs, interleaved rounds;
        with the ablations unless --no-ablate, each under every config)
"""
import argparse
import collections
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

import pagoda
from pagoda.attention import mla
from pagoda.bench.attention import capture_graph, flashinfer_or_none, flush_l2
from mla_probe import case  # (scripts/, this file's directory)


def per_kernel_us(fn, calls=20):
    g = capture_graph(fn)
    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                flush_l2()
                g.replay()
            torch.cuda.synchronize()
    tot = collections.defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            tot[e.name[:40]] += (e.time_range.end - e.time_range.start) / calls
    return {k: v for k, v in tot.items() if ("mla" in k.lower() or "flashinfer" in k) and v > 0.05}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="1x1024,1x8192,1x32768,16x1024,128x1024,128x8192")
    ap.add_argument("--no-ablate", action="store_true")
    ap.add_argument("--combine-sweep", action="store_true")
    ap.add_argument("--configs", help="block_n:stages:pv_regs:producer_regs,... of the Gluon kernel")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--combine-settings", default="16:1:2:8:0,16:2:4:8:0,8:8:32:4:1",
                    help="heads:slices:chunks:warps:blocked,... of the merge launch for --combine-sweep")
    args = ap.parse_args()
    fi = flashinfer_or_none()
    ws = torch.empty(512 << 20, dtype=torch.uint8, device="cuda")
    fws = torch.empty(512 << 20, dtype=torch.uint8, device="cuda")
    heads, ps, dt = 128, 64, torch.bfloat16
    print(f"# {torch.cuda.get_device_name()}, MLA {heads} heads, ckv 512 + kpe 64, bf16, page_size {ps}; us per call "
          f"(kernel records, L2 flushed)")
    for c in args.cases.split(","):
        b, kv = map(int, c.split("x"))
        plan_args, (qn, qp, ckv, kpe) = case(b, kv, heads, ps, dt)  # (the probe's inputs)
        qo, indptr, indices, lens, sm = *plan_args[:4], plan_args[9]
        w = pagoda.BatchMLAPagedAttentionWrapper(ws)
        w.plan(*plan_args)
        out = w.run(qn, qp, ckv, kpe)
        cells = [f"pagoda {per_kernel_us(lambda: w.run(qn, qp, ckv, kpe, out=out))}",
                 f"tasks {w._plan.partial_rows} partial rows"]
        if args.combine_sweep:
            keep = list(mla.MLA_COMBINE)
            for setting in args.combine_settings.split(","):
                heads_b, d_split, chunks, warps, blocked = map(int, setting.split(":"))
                mla.MLA_COMBINE[:] = [(heads_b, d_split, chunks, warps, bool(blocked))]
                w.plan(*plan_args)  # (plan() picks the merge launch's setting)
                t = per_kernel_us(lambda: w.run(qn, qp, ckv, kpe, out=out)).get("mla_combine_kernel", 0.0)
                cells.append(f"combine h{heads_b} ds{d_split} c{chunks} w{warps} b{blocked}: {t:.1f}")
            mla.MLA_COMBINE[:] = keep
            w.plan(*plan_args)
            cells.append(f"picked {w._plan.merge_config}")
            print(f"{c}: " + " | ".join(cells), flush=True)
            continue
        if args.configs:
            keep = dict(mla.MLA_SM90_CONFIG)
            for rnd in range(args.rounds):
                for cfg in args.configs.split(","):
                    bn, st, pv, pr = map(int, cfg.split(":"))
                    mla.MLA_SM90_CONFIG.update(block_n=bn, stages=st, pv_regs=pv, producer_regs=pr)
                    w.plan(*plan_args)  # (the planner's chunks follow block_n)
                    for ab in ((0,) if args.no_ablate or rnd else (0, 1, 2, 4)):
                        mla._MLA_SM90_ABLATE = ab
                        try:
                            t = per_kernel_us(lambda: w.run(qn, qp, ckv, kpe, out=out))
                            t = " + ".join(f"{k[:12]} {v:.1f}" for k, v in t.items())
                        except Exception as e:  # noqa: BLE001
                            t = type(e).__name__
                        cells.append(f"r{rnd} {cfg}{f' ablate {ab}' if ab else ''}: {t}")
                    mla._MLA_SM90_ABLATE = 0
            mla.MLA_SM90_CONFIG.update(keep)
            w.plan(*plan_args)
        elif not args.no_ablate:
            for ab in (1, 2, 4, 3):
                mla._MLA_SM90_ABLATE = ab
                try:
                    cells.append(f"ablate {ab}: {per_kernel_us(lambda: w.run(qn, qp, ckv, kpe, out=out))}")
                except Exception as e:  # noqa: BLE001
                    cells.append(f"ablate {ab}: {type(e).__name__}")
            mla._MLA_SM90_ABLATE = 0
        if fi is not None:
            fw = fi.mla.BatchMLAPagedAttentionWrapper(fws)
            fw.plan(qo.cuda(), indptr.cuda(), indices.cuda(), lens.cuda(), heads, 512, 64, ps, False, sm, dt, dt)
            fw.run(qn, qp, ckv, kpe)
            cells.append(f"FlashInfer {per_kernel_us(lambda: fw.run(qn, qp, ckv, kpe))}")
        print(f"{c}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
