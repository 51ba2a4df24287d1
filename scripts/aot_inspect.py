import sys, os, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
import importlib.util; spec=importlib.util.spec_from_file_location("k", os.environ["KFILE"]); m=importlib.util.module_from_spec(spec); spec.loader.exec_module(m); attention_kernel=m.attention_kernel
mode = sys.argv[1]
ptr = lambda t: "*" + t
sig = {}
names = attention_kernel.arg_names
types = dict(Q="*bf16", K="*bf16", V="*bf16", O="*bf16", LSE="*fp32", TMP_O="*fp32", TMP_LSE="*fp32", WORK="*i32",
             COUNTERS="*i32", KV_INDICES="*i32", SPLITS="*i32", ARRIVALS="*i32", qk_scale="fp32", soft_cap_log2="fp32")
cfg = dict(decode=dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=2, CAUSAL=False),
           prefill=dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, CAUSAL=True))[mode]
const = dict(HEAD_DIM=128, PAGE_SIZE=16, INDEX_ASM=True, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], PAGED=os.environ.get("PAGED","1")=="1", CAUSAL=cfg["CAUSAL"],
             SOFTCAP=False, WINDOW=False, WRITE_LSE=False)
for n in names:
    if n in const: sig[n] = "constexpr"
    else: sig[n] = types.get(n, "i32")
div16 = [i for i, n in enumerate(names) if sig[n].startswith("*") or n.startswith("stride") or n == "page_size"]
src = ASTSource(fn=attention_kernel, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()},
                attrs={(i,): [["tt.divisibility", 16]] for i in div16})
k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
open(f"/tmp/{mode}.ttgir","w").write(k.asm["ttgir"])
open(f"/tmp/{mode}.ptx","w").write(k.asm["ptx"])
print(k.metadata.shared, "shared bytes; regs", getattr(k, "n_regs", None))
