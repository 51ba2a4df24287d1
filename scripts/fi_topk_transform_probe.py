import torch, flashinfer as fi
g = torch.Generator(device="cuda").manual_seed(0)
for batch, d, k in ((8, 131072, 2048), (64, 32768, 2048), (1, 131072, 2048)):
    x = torch.randn(batch, d, device="cuda", generator=g)
    lens = torch.randint(d // 2, d + 1, (batch,), dtype=torch.int32, device="cuda", generator=g)
    table = torch.randperm(batch * d, device="cuda", generator=g).to(torch.int32).view(batch, d)
    try:
        a = fi.top_k_page_table_transform(x, table, lens, k); torch.cuda.synchronize()
        bad = 0
        for i in range(batch):
            n = int(lens[i]); want = table[i, torch.topk(x[i, :n], k).indices].sort().values
            bad += not torch.equal(a[i].sort().values, want)
        print(batch, d, "FlashInfer rows wrong:", bad, "of", batch, flush=True)
    except Exception as e:
        print(batch, d, "FlashInfer failed:", type(e).__name__, str(e)[:200], flush=True); break
