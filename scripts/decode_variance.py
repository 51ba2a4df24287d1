import torch, pagoda, time
from pagoda.bench.attention import PagedSetup, bench
ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
for name, lens in [("1x32768", [32768]), ("16x4096", [4096]*16)]:
    s = PagedSetup(lens, 8, 128, 16, torch.bfloat16)
    q = torch.randn(len(lens), 32, 128, dtype=torch.bfloat16, device="cuda")
    for rep in range(3):
        w = pagoda.BatchDecodeWithPagedKVCacheWrapper(ws)
        w.plan(s.indptr, s.indices, s.last, 32, 8, 128, 16, q_data_type=torch.bfloat16)
        out = w.run(q, s.cache)
        ts = [bench(lambda: w.run(q, s.cache, out=out), rep_ms=50) * 1e6 for _ in range(4)]
        e0, e1 = torch.cuda.Event(True), torch.cuda.Event(True)
        torch.cuda.synchronize(); e0.record()
        for _ in range(200): w.run(q, s.cache, out=out)
        e1.record(); torch.cuda.synchronize()
        print(name, rep, "chunk", w._plan.work.chunk_len, "do_bench", [round(t, 1) for t in ts], "b2b", round(e0.elapsed_time(e1) / 200 * 1e3, 1), flush=True)

# Host cost of run(): launches queued without synchronizing (the GPU runs behind).
s = PagedSetup([32768], 8, 128, 16, torch.bfloat16)
q = torch.randn(1, 32, 128, dtype=torch.bfloat16, device="cuda")
w = pagoda.BatchDecodeWithPagedKVCacheWrapper(ws)
w.plan(s.indptr, s.indices, s.last, 32, 8, 128, 16, q_data_type=torch.bfloat16)
out = w.run(q, s.cache)
torch.cuda.synchronize()
t0 = time.perf_counter()
for _ in range(100):
    w.run(q, s.cache, out=out)
t1 = time.perf_counter()
torch.cuda.synchronize()
print(f"run() host time {(t1 - t0) / 100 * 1e6:.1f} us per call")
import cProfile, pstats
pr = cProfile.Profile(); pr.enable()
for _ in range(100):
    w.run(q, s.cache, out=out)
pr.disable(); torch.cuda.synchronize()
pstats.Stats(pr).sort_stats("cumulative").print_stats(12)
