"""Host time of plan() (timeit minimum), decode and prefill wrappers, eager and CUDA-graph mode, for 1 and
256 decode requests of random length 128..8192 (page_size 16, 32/8 heads, head_dim 128). Runs anywhere:

    TRITON_INTERPRET=1 python scripts/plan_time.py      # CPU (the planner is host code)
    python scripts/plan_time.py                          # on a GPU host
"""
import timeit

import numpy as np
import torch

import pagoda
from pagoda.bench.attention import PagedSetup


def main():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rng = np.random.default_rng(0)
    for n in (1, 256):
        s = PagedSetup(rng.integers(128, 8193, size=n).tolist(), 8, 128, 16, torch.bfloat16, device=dev)
        ws = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
        qo = torch.arange(n + 1, dtype=torch.int32)
        for graph in (False, True):
            pw = pagoda.BatchPrefillWithPagedKVCacheWrapper(ws, backend="triton", use_cuda_graph=graph)
            dw = pagoda.BatchDecodeWithPagedKVCacheWrapper(ws, backend="triton", use_cuda_graph=graph)
            times = []
            for fn in (lambda: pw.plan(qo, s.indptr, s.indices, s.last, 32, 8, 128, 16, causal=True,
                                       q_data_type=torch.bfloat16),
                       lambda: dw.plan(s.indptr, s.indices, s.last, 32, 8, 128, 16, q_data_type=torch.bfloat16)):
                fn()
                times.append(min(timeit.repeat(fn, number=300, repeat=5)) / 300 * 1e6)
            print(f"{n:4d} requests, cuda_graph={graph!s:5}: prefill-wrapper plan {times[0]:6.0f} us, "
                  f"decode-wrapper plan {times[1]:6.0f} us")


if __name__ == "__main__":
    main()
