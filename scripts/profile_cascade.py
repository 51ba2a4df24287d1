"""Where the time of a cascade decode goes (device): per-kernel times under torch.profiler and each
level's plan (items, chunk length, split tiles). python scripts/profile_cascade.py"""
import torch
from torch.profiler import ProfilerActivity, profile

import pagoda
from pagoda.bench.cascade import setup

hq, hk, d, ps, dt = 32, 8, 128, 16, torch.bfloat16
ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
for n, prefix, suffix in ((64, 8192, 256),):
    cache, indptr, indices, last = setup(n, prefix, suffix, hk, d, ps, dt)
    q = torch.randn(n, hq, d, dtype=dt, device="cuda")
    levels = pagoda.cascade_levels_from_page_table(indptr, indices, last, ps)
    w = pagoda.MultiLevelCascadeAttentionWrapper(2, ws)
    w.plan(**levels, num_qo_heads=hq, num_kv_heads=hk, head_dim=d, page_size=ps, q_data_type=dt)
    out = w.run(q, cache)
    for i, lv in enumerate(w._levels):
        p = lv._plan
        print(f"level {i}: config {p.config}, grid {p.grid}, items {len(p.work.work)}, chunk_len {p.work.chunk_len}, "
              f"split tiles {len(p.work.splits)}, partial rows {p.work.partial_rows}")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            w.run(q, cache, out=out)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=6, max_name_column_width=50))
