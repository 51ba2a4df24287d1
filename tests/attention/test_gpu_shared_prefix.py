"""FlashInfer's shared-prefix wrappers on the GPU at serving sizes (a 4096-token system prompt shared by a batch)."""
import pytest
import torch

import pagoda
from pagoda.attention import reference

from .helpers import TOL, PagedBatch, rel_err, workspace

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_shared_prefix_real_size(mode):
    """16 requests over one 4096-token shared prefix (contiguous K / V) and their own 1..700 tokens of a page-16
    cache, 32 / 8 heads of 128, bf16: decode (one query each) and causal append (1..64 queries each, the last of their
    own tokens), against the float64 oracle over the concatenation."""
    torch.manual_seed(0)
    hq, hk, d, ps, dtype = 32, 8, 128, 16, torch.bfloat16
    lens = torch.randint(1, 701, (16,)).tolist()
    batch = PagedBatch(lens, hk, d, ps, dtype, device="cuda")
    ks = torch.randn(4096, hk, d, dtype=dtype, device="cuda")
    vs = torch.randn(4096, hk, d, dtype=dtype, device="cuda")
    if mode == "decode":
        qo = list(range(17))
        w = pagoda.BatchDecodeWithSharedPrefixPagedKVCacheWrapper(workspace(256))
        w.begin_forward(batch.indptr, batch.indices, batch.last_page_len, hq, hk, d, ps, data_type=dtype)
    else:
        qo_lens = [min(n, int(x)) for n, x in zip(lens, torch.randint(1, 65, (16,)))]
        qo = [0] + torch.tensor(qo_lens).cumsum(0).tolist()
        w = pagoda.BatchPrefillWithSharedPrefixPagedKVCacheWrapper(workspace(256))
        w.begin_forward(torch.tensor(qo, dtype=torch.int32), batch.indptr, batch.indices, batch.last_page_len, hq, hk,
                        d, ps)
    q = torch.randn(qo[-1], hq, d, dtype=dtype, device="cuda")
    out = w.forward(q, ks, vs, batch.cache) if mode == "decode" else w.forward(q, ks, vs, batch.cache, causal=True)
    for b in range(16):
        k, v = torch.cat([ks, batch.k[b]]).cpu(), torch.cat([vs, batch.v[b]]).cpu()
        ro, _ = reference.attention(q[qo[b]:qo[b + 1]].cpu(), k, v, causal=mode == "prefill",
                                    compute_dtype=torch.float64, out_dtype=torch.float64)
        assert rel_err(out[qo[b]:qo[b + 1]], ro) < TOL[dtype], b
