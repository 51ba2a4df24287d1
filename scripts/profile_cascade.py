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
    from pagoda.bench.attention import bench

    o_i, s_i = torch.empty_like(q), torch.empty(q.shape[:2], dtype=torch.float32, device="cuda")
    for i, lv in enumerate(w._levels):
        t = bench(lambda: lv.run(q, cache, out=o_i, lse=s_i, return_lse=True)) * 1e6
        print(f"level {i} alone: {t:.1f} us")
    # level 0 with other chunk lengths (cost-model check): force the planner's choice
    from pagoda.attention import plan as plan_mod
    orig = plan_mod._choose_chunk_len
    for L in (256, 512, 1024, 2048, 8192):
        plan_mod._choose_chunk_len = lambda *a, L=L: L
        w0 = pagoda.BatchPrefillWithPagedKVCacheWrapper(ws)
        w0.plan(levels["qo_indptr_arr"][0], levels["paged_kv_indptr_arr"][0], levels["paged_kv_indices_arr"][0],
                levels["paged_kv_last_page_len"][0], hq, hk, d, ps, q_data_type=dt)
        t = bench(lambda: w0.run(q, cache, out=o_i, lse=s_i, return_lse=True)) * 1e6
        print(f"level 0 chunk_len {L}: items {len(w0._plan.work.work)}, {t:.1f} us")
    plan_mod._choose_chunk_len = orig
    # level 0 as decode-mode tiles (16 rows = 4 tokens x 4 heads): more, smaller tiles
    w0 = pagoda.BatchPrefillWithPagedKVCacheWrapper(ws)
    w0._mode = "decode"
    w0.plan(levels["qo_indptr_arr"][0], levels["paged_kv_indptr_arr"][0], levels["paged_kv_indices_arr"][0],
            levels["paged_kv_last_page_len"][0], hq, hk, d, ps, q_data_type=dt)
    t = bench(lambda: w0.run(q, cache, out=o_i, lse=s_i, return_lse=True)) * 1e6
    print(f"level 0 with decode tiles: items {len(w0._plan.work.work)}, chunk {w0._plan.work.chunk_len}, {t:.1f} us")
