import sys, timeit
import numpy as np, torch, pagoda
from pagoda.bench.attention import PagedSetup
rng = np.random.default_rng(0)
res = []
for name, lens in (("256 random", rng.integers(128, 8193, size=256).tolist()), ("256x1024", [1024] * 256), ("1 request", [3000])):
    s = PagedSetup(lens, 8, 128, 16, torch.bfloat16, device="cuda")
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    dw = pagoda.BatchDecodeWithPagedKVCacheWrapper(ws, use_cuda_graph=True)
    f = lambda: dw.plan(s.indptr, s.indices, s.last, 32, 8, 128, 16, q_data_type=torch.bfloat16)
    f()
    t = []
    for _ in range(2000):
        torch.cuda.synchronize()
        t0 = timeit.default_timer(); f(); t.append(timeit.default_timer() - t0)
    t = np.array(t) * 1e6
    res.append(f"{name}: min {t.min():.0f} p50 {np.median(t):.0f}")
print(sys.argv[1], " | ".join(res), flush=True)
