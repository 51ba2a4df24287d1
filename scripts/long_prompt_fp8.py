"""Time to first token of one long prompt (bench.engine.case_long: a warm-up prompt of the same length first) with
a bf16 cache, an fp8 cache (its prefill through the 16-bit scratch, sized for max_model_len) and an fp8 cache whose
scratch is capped at 4096 pages (session 41's size before: the chunks past 64k tokens then read the fp8 cache
through the Triton prefill kernel). One engine a mode, one process:

    python scripts/long_prompt_fp8.py bf16|fp8|fp8-4096 [prompt tokens, default 98304]
"""
import sys

import numpy as np

import pagoda
from pagoda.bench.engine import case_long
from pagoda.engine import runner

mode = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 98304
if mode == "fp8-4096":
    runner.FP8_PREFILL_SCRATCH_BYTES = 4096 * 2 * 16 * 8 * 128 * 2  # (Llama-3.1-8B's pages: 4096 of them)
llm = pagoda.LLM("Llama-3.1-8B", load_format="dummy", skip_tokenizer_init=True, max_model_len=131072,
                 max_num_batched_tokens=8192, kv_cache_dtype="auto" if mode == "bf16" else "fp8")
s = llm.engine.runner.fp8_prefill_scratch
res = case_long(llm, np.random.default_rng(0), prompt_len=n, out=32)
print(f"{mode}: {n}-token prompt TTFT {res['ttft_s']:.3f} s, ITL {res['itl_ms']:.2f} ms; scratch pages "
      f"{None if s is None else s.shape[0]}")
llm.shutdown()
