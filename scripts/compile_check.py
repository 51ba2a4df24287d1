"""Compile pagoda's Triton kernels for sm_90 on any machine (no GPU): catches errors that the
interpreter lets through (constexpr rules, types) before device time is spent.

    python scripts/compile_check.py [name ...]      (NO_PARAMS=1: PTX hashes without parameter lines; PTX_DIR=dir:
                                                     the hashed PTX text of each case written there, to diff;
                                                     PYTHONPATH=another tree compiles that tree's kernels)
    python scripts/compile_check.py --ci            (exactly CI_CASES: the Gluon kernels the CPU tests compile)
    python scripts/compile_check.py --exact NAME ...   (exactly these cases; a name that is none fails)

Not under TRITON_INTERPRET=1: the interpreter replaces the @triton.jit helpers that Gluon kernels call.
"""
import hashlib
import os
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_one(fn, types, consts, num_warps=4, num_stages=3, maxnreg=None):
    import inspect

    # constexpr parameters left out take their defaults, as at a launch (not an i32 argument), and so do
    # parameters whose default is None (a launch specializes a None argument as a constexpr)
    consts = dict({p.name: p.default for p in getattr(fn, "params", ())
                   if (p.is_constexpr and p.default is not inspect.Parameter.empty) or
                   (p.default is None and p.name not in types)}, **consts)
    names = fn.arg_names
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in names}
    source = ASTSource
    if getattr(fn, "is_gluon", lambda: False)():
        from triton.experimental.gluon._runtime import GluonASTSource as source
    # pointers and strides divisible by 16, as Triton's launcher specializes them at run time for
    # 16-byte aligned tensors with row lengths that are multiples of 16 (vectorized, async loads)
    # (and the segment GEMM's d_in / d_out, multiples of 16 in every LoRA shape: its masks along K and N then stay
    # uniform over a vector and the loads cp.async-pipelined, as at a launch)
    div = [i for i, n in enumerate(names)
           if sig[n].startswith("*") or n.startswith("stride_") or n in ("d_in", "d_out")]
    src = source(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()},
                    attrs={(i,): [["tt.divisibility", 16]] for i in div})
    options = dict(num_warps=num_warps, num_stages=num_stages)
    if maxnreg:
        options["maxnreg"] = maxnreg
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def cases():
    from pagoda.ops.kernels import rope, sampling
    f32 = dict(P="*fp32", OUT="*i32", TOP_K="*i32", TOP_P="*fp32", MIN_P="*fp32", k_val="i32", p_val="fp32",
               m_val="fp32", X="*fp32", Y="*fp32")
    for filt in range(5):
        for rows in (False, True):
            yield f"sample FILTER={filt} rows={rows}", sampling.sample_kernel, f32, dict(
                FILTER=filt, K_ROWS=rows, P_ROWS=rows, M_ROWS=rows, BLOCK=4096), 16
    for mode in range(3):
        yield f"filter MODE={mode}", sampling.filter_kernel, f32, dict(MODE=mode, K_ROWS=True, P_ROWS=False,
                                                                         BLOCK=4096), 16
    yield "rope_append", rope.rope_append_kernel, dict(Q="*bf16", K="*bf16", V="*bf16", KC="*bf16", VC="*bf16",
                                                       POS="*i32", BATCH="*i32", KV_INDICES="*i32",
                                                       KV_INDPTR="*i32", COS_SIN="*fp32"), \
        dict(BLOCK_H=32, BLOCK_R=64, BLOCK_D=128, INTERLEAVE=False), 4
    yield "rope_append PDL TABLES_EARLY", rope.rope_append_kernel, dict(
        Q="*bf16", K="*bf16", V="*bf16", KC="*bf16", VC="*bf16", POS="*i32", BATCH="*i32", KV_INDICES="*i32",
        KV_INDPTR="*i32", COS_SIN="*fp32"), dict(BLOCK_H=32, BLOCK_R=64, BLOCK_D=128, INTERLEAVE=False, PDL=True,
                                                TABLES_EARLY=True), 4
    yield "rope_append PDL TABLES_EARLY QK_NORM", rope.rope_append_kernel, dict(
        Q="*bf16", K="*bf16", V="*bf16", KC="*bf16", VC="*bf16", POS="*i32", BATCH="*i32", KV_INDICES="*i32",
        KV_INDPTR="*i32", COS_SIN="*fp32", QW="*bf16", KW="*bf16", norm_eps="fp32", norm_offset="fp32"), dict(
        BLOCK_H=32, BLOCK_R=64, BLOCK_D=128, INTERLEAVE=False, PDL=True, TABLES_EARLY=True, QK_NORM=True), 4
    from pagoda.ops.kernels import norm as norm_kernels
    for block in (4096, 1024):  # (hidden 4096 in one pass; 8192 in three)
        yield f"layernorm BLOCK={block}", norm_kernels.layernorm_kernel, dict(X="*bf16", G="*fp32", B="*fp32", Y="*bf16",
                                                                      eps="fp32"), dict(BLOCK=block), 8
    from pagoda.ops.kernels import topk
    for mode, extra in ((0, dict(OUT="*i64", VALS="*fp32")), (1, dict(OUT="*i32", LENS="*i32", TABLE="*i32",
                                                                         ROW_TO_BATCH="*i32")),
                        (2, dict(OUT="*i32", LENS="*i32", OFFSETS="*i32"))):  # (FlashInfer's int32 index tensors)
        for block, wblock, warps in ((4096, 4096, 8), (16384, 4096, 16)):  # (ops.topk._launch's; 8192-wide
            # writing steps spill under 16 warps' 128 registers)
            for radix, compact in ((8, True), (4, True), (8, False)):
                yield (f"topk MODE={mode} BLOCK={block} WBLOCK={wblock} warps={warps} RADIX={radix} COMPACT={compact}",
                       topk.topk_kernel, dict(X="*fp32", SCRATCH="*fp32", **extra),
                       dict(MODE=mode, BLOCK=block, WBLOCK=wblock, RADIX=radix, COMPACT=compact, SBLOCK=1024), warps)
    for radix in (8, 4):  # (ops.topk._launch_split's: slices of up to 4096 values at 8 warps)
        for d in (1, 32 // radix - 1):  # (a digit's launch; the last one's, which keeps the slices' counts)
            yield f"topk split_hist RADIX={radix} D={d}", topk.split_hist_kernel, dict(
                X="*fp32", LENS="*i32", HIST="*i32", PART="*i32"), dict(D=d, HAS_LENS=True, RADIX=radix, BLOCK=4096), 8
        yield f"topk split_write MODE=1 RADIX={radix}", topk.split_write_kernel, dict(
            X="*fp32", OUT="*i32", LENS="*i32", TABLE="*i32", ROW_TO_BATCH="*i32", HIST="*i32", PART="*i32"), dict(
            MODE=1, RADIX=radix, WBLOCK=4096, PBLOCK=256), 8
    yield "greedy", sampling.greedy_kernel, dict(X="*fp32", OUT="*i64", KEYS="*i64", COUNT="*i32"), \
        dict(BLOCK=2048), 4
    yield "greedy NEXT", sampling.greedy_kernel, dict(X="*fp32", OUT="*i64", KEYS="*i64", COUNT="*i32",
                                                      NEXT="*i32"), dict(BLOCK=2048), 4
    from pagoda.ops import lora as lora_host
    from pagoda.ops.kernels import lora
    seg = dict(X="*bf16", W="*bf16", Y="*bf16", SEG_INDPTR="*i64", WEIGHT_INDICES="*i64", TILE_INDPTR="*i32")
    # the multi-LoRA segment GEMM (ops/lora.py): the configurations of pagoda.bench.lora's decode shrink (split K,
    # float32 atomics) and prefill expand, both weight layouts (a launch specializes the stride that is 1)
    for name, rows, batch, d_in, d_out in (("decode shrink", 64, 64, 4096, 16), ("prefill expand", 4096, 8, 64, 4096)):
        bm, bn, bk, split, warps, stages = lora_host.segment_config(rows, batch, d_in, d_out, True)
        for cm in (True, False):
            yield (f"segment_gemm {name} column_major={cm}", lora.segment_gemm_kernel,
                   dict(seg, Y="*fp32" if split > 1 else "*bf16"),
                   dict(HAS_INDICES=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split,
                        SEARCH=lora_host.search_block(batch), **({"stride_wk": 1} if cm else {"stride_wn": 1})),
                   warps, stages)
    yield "segment_gemm binary search", lora.segment_gemm_kernel, seg, dict(
        HAS_INDICES=False, BLOCK_M=16, BLOCK_N=128, BLOCK_K=16, SPLIT_K=1, SEARCH=0, stride_wk=1), 4, 3
    yield "segment_tiles", lora.segment_tiles_kernel, dict(SEG_INDPTR="*i64", TILE_INDPTR="*i32", ZERO="*fp32"), \
        dict(BLOCK_M=16, BLOCK=64, ZERO_BLOCK=4096), 4
    from pagoda.ops.kernels import activation, matmul
    lin = dict(X="*bf16", W="*bf16", BIAS="*bf16", R="*bf16", Y="*bf16", WS="*fp32", CNT="*i32", eps="fp32")
    for norm, res, split in ((0, False, 1), (1, False, 1), (0, True, 1), (1, True, 1), (4, False, 1), (0, True, 4),
                             (1, True, 2)):
        yield (f"linear_small_m NORM_ROWS={norm} HAS_RES={res} SPLIT_K={split} PDL", matmul.linear_small_m_kernel,
               lin, dict(HAS_BIAS=False, BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, EVEN_K=True, NORM_ROWS=norm,
                         NORM_K=4096, HAS_RES=res, SPLIT_K=split, PDL=True), 4, 4)
    for d, norm in ((128, True), (64, False)):
        yield f"qkv_rope_append D={d} NORM={norm} PDL", matmul.qkv_rope_append_kernel, dict(
            X="*bf16", W="*bf16", BIAS="*bf16", Q="*bf16", KC="*bf16", VC="*bf16", POS="*i32", BATCH="*i32",
            KV_INDICES="*i32", KV_INDPTR="*i32", COS_SIN="*fp32", eps="fp32"), dict(
            NUM_Q_HEADS=32, NUM_KV_HEADS=8, HEAD_DIM=d, HAS_BIAS=not norm, NORM=norm, NORM_K=4096, BLOCK_K=256,
            EVEN_K=True, PDL=True), 4, 4
    for act in (0, 2):  # SwiGLU, GeGLU (tanh)
        yield f"gate_up_act NORM PDL ACT={act}", matmul.gate_up_act_kernel, dict(
            X="*bf16", W="*bf16", Y="*bf16", eps="fp32"), dict(NORM=True, NORM_K=4096, BLOCK_K=256, EVEN_K=True,
                                                               PDL=True, ACT=act), 4, 2
    yield "soft_cap", activation.soft_cap_kernel, dict(X="*bf16", Y="*fp32", cap="fp32"), dict(BLOCK=4096), 8
    for into in (False, True):
        for block in (4096, 1024):  # one pass, two passes
            yield f"rmsnorm NORM_INTO_R={into} BLOCK={block}", norm_kernels.rmsnorm_kernel, dict(
                X="*bf16", R="*bf16", W="*bf16", Y="*bf16", eps="fp32", weight_offset="fp32"), dict(
                BLOCK=block, ADD_RESIDUAL=False, PDL=True, NORM_INTO_R=into), 4
    for nb in (0, 4096):
        yield f"act_and_mul NORM_BLOCK={nb}", activation.act_and_mul_kernel, dict(
            X="*bf16", Y="*bf16", N_IN="*bf16", eps="fp32"), dict(ACT=0, BLOCK=1024, NORM_BLOCK=nb, PDL=True), 4
    bf = dict(Q="*bf16", K="*bf16", QO="*bf16", KO="*bf16", POS="*i32", FREQ="*fp32", COS_SIN="*fp32")
    for cache in (False, True):
        yield f"rope FROM_CACHE={cache}", rope.rope_kernel, bf, dict(BLOCK_H=32, BLOCK_R=64, BLOCK_D=128,
                                                                      INTERLEAVE=False, FROM_CACHE=cache,
                                                                      COPY_REST=True), 4


def attention_cases():
    from pagoda.attention.kernels import attention, mla
    att = dict(Q="*bf16", K="*bf16", V="*bf16", O="*bf16", LSE="*fp32", TMP_O="*fp32", TMP_LSE="*fp32",
               WORK="*i32", COUNTERS="*i32", KV_INDICES="*i32", SPLITS="*i32", ARRIVALS="*i32", K_SCALE="*fp32",
               V_SCALE="*fp32", qk_scale="fp32", soft_cap_log2="fp32", k_scale="fp32", v_scale="fp32")
    base = dict(HEAD_DIM=128, PAGE_SIZE=16, PAGED=True, INDEX_ASM=True, SOFTCAP=False, WINDOW=False, WRITE_LSE=False)
    deq = {"bf16": 0, "fp8e4nv": 1, "fp8e5": 1}
    for kv in ("bf16", "fp8e4nv", "fp8e5"):
        for mode, extra, warps, stages in (("decode", dict(BLOCK_M=16, BLOCK_N=64, CAUSAL=False), 4, 3),
                                          ("prefill", dict(BLOCK_M=128, BLOCK_N=64, CAUSAL=True), 8, 3)):
            for scale_ptr in (False, True):
                yield (f"attention {mode} kv={kv} SCALE_PTR={scale_ptr}", attention.attention_kernel,
                       dict(att, K="*" + kv, V="*" + kv, REQS="*i64", MASK="*u8", VPARAMS="*fp32"),
                       dict(base, **extra, SCALE_PTR=scale_ptr, KV_DEQUANT=deq[kv], VARIANT=False,
                            SCORE_MOD=attention._no_mod, MASK_MOD=attention._no_mod, HAS_SCORE_MOD=False,
                            HAS_MASK_MOD=False, CUSTOM_MASK=False), warps, stages)
    for mode, extra, warps, stages in (("decode", dict(BLOCK_M=16, BLOCK_N=64, CAUSAL=False), 4, 3),
                                      ("prefill", dict(BLOCK_M=128, BLOCK_N=64, CAUSAL=True), 8, 3)):
        yield (f"attention {mode} SINKS", attention.attention_kernel,
               dict(att, REQS="*i64", MASK="*u8", VPARAMS="*fp32", SINKS="*fp32"),
               dict(base, **extra, WRITE_LSE=True, SCALE_PTR=False, KV_DEQUANT=0, VARIANT=False,
                    SCORE_MOD=attention._no_mod, MASK_MOD=attention._no_mod, HAS_SCORE_MOD=False,
                    HAS_MASK_MOD=False, CUSTOM_MASK=False), warps, stages)
    for mode, extra, warps, stages in (("decode", dict(BLOCK_M=16, BLOCK_N=32, CAUSAL=False), 4, 3),
                                      ("prefill", dict(BLOCK_M=128, BLOCK_N=64, CAUSAL=True), 8, 3)):
        yield (f"attention {mode} MERGE_OUT (a cascade level merging into out / lse)", attention.attention_kernel,
               dict(att, REQS="*i64", MASK="*u8", VPARAMS="*fp32"),
               dict(base, **extra, WRITE_LSE=True, SCALE_PTR=False, KV_DEQUANT=0, VARIANT=False,
                    SCORE_MOD=attention._no_mod, MASK_MOD=attention._no_mod, HAS_SCORE_MOD=False,
                    HAS_MASK_MOD=False, CUSTOM_MASK=False, MERGE_OUT=True), warps, stages)
    from pagoda.attention import variants
    no = dict(VARIANT=False, SCORE_MOD=attention._no_mod, MASK_MOD=attention._no_mod, HAS_SCORE_MOD=False,
              HAS_MASK_MOD=False, CUSTOM_MASK=False)
    att_v = dict(att, REQS="*i64", MASK="*u8", VPARAMS="*fp32")
    for name, extra in (("alibi", dict(SCORE_MOD=variants._alibi_score, HAS_SCORE_MOD=True)),
                        ("sink_window", dict(MASK_MOD=variants._sink_window_mask, HAS_MASK_MOD=True)),
                        ("custom_mask", dict(CUSTOM_MASK=True))):
        yield (f"attention prefill variant={name}", attention.attention_kernel, att_v,
               dict(base, BLOCK_M=128, BLOCK_N=64, CAUSAL=True, SCALE_PTR=False, KV_DEQUANT=0,
                    **dict(no, **extra, VARIANT=True)), 8, 3)
    m = dict(QN="*bf16", QP="*bf16", CKV="*bf16", KPE="*bf16", O="*bf16", LSE="*fp32", TMP_O="*fp32",
             TMP_LSE="*fp32", WORK="*i32", COUNTERS="*i32", KV_INDICES="*i32", SPLITS="*i32", ARRIVALS="*i32",
             qk_scale="fp32", ckv_scale="fp32")
    for bm, bn, warps, stages in ((64, 32, 8, 2), (32, 32, 4, 2), (64, 64, 8, 2), (16, 64, 4, 2)):
        yield (f"mla BLOCK_M={bm} BLOCK_N={bn} warps={warps}", mla.mla_kernel, m,
               dict(D_CKV=512, D_KPE=64, BLOCK_M=bm, BLOCK_N=bn, PAGE_SIZE=64, INDEX_ASM=True, CAUSAL=False,
                    WRITE_LSE=False, MERGE_UNROLL=1, DEFER_MERGE=bm == 32), warps, stages)
    for lse, blocked in ((True, True), (False, False)):
        yield (f"mla_combine WRITE_LSE={lse} BLOCKED={blocked}", mla.mla_combine_kernel,
               dict(O="*bf16", LSE="*fp32", TMP_O="*fp32", TMP_LSE="*fp32", COUNTERS="*i32", PLAN="*i32"),
               dict(D=512, BLOCK_H=8 if blocked else 16, WRITE_LSE=lse, CHUNKS=32 if blocked else 8,
                    D_SPLIT=8, BLOCKED=blocked), 4, 1)


def gluon_cases():
    """The Gluon prefill kernel for sm_90 (only with the Triton it targets: kernels/prefill_sm90.py)."""
    from pagoda.attention.kernels import prefill_sm90

    if not prefill_sm90.HAVE_GLUON:
        return
    types = dict(Q="*bf16", K="*bf16", V="*bf16", O="*bf16", LSE="*fp32", TMP_O="*fp32", TMP_LSE="*fp32",
                 WORK="*i32", COUNTERS="*i32", KV_INDICES="*i32", SPLITS="*i32", ARRIVALS="*i32", qk_scale="fp32",
                 KD="*bf16", VD="*bf16", soft_cap_log2="fp32")
    lay = ("NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2, transposed=False, "
           "fp4_padded=False, cga_layout=[])")
    # TMA producer (runner's default where the cache allows: prefill_sm90.tma_views): paged 16-row copies,
    # ragged one copy per block
    for d, bn, paged, long in ((128, 128, True, True), (128, 128, False, True), (128, 64, True, False),
                               (64, 64, False, False), (64, 128, True, True)):
        tr = 16 if paged else bn
        desc = f"tensordesc<bf16[{tr},{d}],{lay}>"
        yield (f"prefill_sm90_ws D={d} paged={paged} causal=True BLOCK_N={bn} TMA",
               prefill_sm90.prefill_sm90_ws_kernel, dict(types, KD=desc, VD=desc),
               dict(HEAD_DIM=d, BLOCK_M=128, BLOCK_N=bn, PAGE_SIZE=16, PAGED=paged, CAUSAL=True, WRITE_LSE=True,
                    STAGES=3 if long else 5, PRODUCER_REGS=88, CONSUMER_REGS=208, num_warps=4, Q_SMEM=long,
                    TMA=True), 4, 1)
    # Q_AHEAD (runner config q_ahead: the next task's Q copied into shared memory ahead), both block sizes
    for d, bn, long in ((128, 64, False), (128, 128, True), (64, 64, False)):
        desc = f"tensordesc<bf16[16,{d}],{lay}>"
        yield (f"prefill_sm90_ws D={d} paged=True causal=True BLOCK_N={bn} TMA Q_AHEAD",
               prefill_sm90.prefill_sm90_ws_kernel, dict(types, KD=desc, VD=desc),
               dict(HEAD_DIM=d, BLOCK_M=128, BLOCK_N=bn, PAGE_SIZE=16, PAGED=True, CAUSAL=True, WRITE_LSE=True,
                    STAGES=3 if long else 5, PRODUCER_REGS=88, CONSUMER_REGS=208, num_warps=4, Q_SMEM=long,
                    TMA=True, Q_AHEAD=True), 4, 1)
    # head_dim 256 (runner.SM90_CONFIG_D256): Q read from shared memory (no room for its fragments next to a
    # [64, 256] fp32 O), 32-token blocks on 4 stages (Q 64 KB + ring 128 KB of shared memory); 64 x 2 and Q_AHEAD
    # measured slower (session 29)
    for paged, causal, bn, st, ahead in ((True, True, 32, 4, False), (False, True, 32, 4, False),
                                         (True, False, 32, 4, False), (True, True, 64, 2, True)):
        tr = 16 if paged else bn
        desc = f"tensordesc<bf16[{tr},256],{lay}>"
        yield (f"prefill_sm90_ws D=256 paged={paged} causal={causal} BLOCK_N={bn} STAGES={st} TMA Q_SMEM"
               + (" Q_AHEAD" if ahead else ""),
               prefill_sm90.prefill_sm90_ws_kernel, dict(types, KD=desc, VD=desc),
               dict(HEAD_DIM=256, BLOCK_M=128, BLOCK_N=bn, PAGE_SIZE=16, PAGED=paged, CAUSAL=causal, WRITE_LSE=True,
                    STAGES=st, PRODUCER_REGS=40, CONSUMER_REGS=232, num_warps=4, Q_SMEM=True, TMA=True,
                    Q_AHEAD=ahead), 4, 1)
    # logits soft cap and sliding window (Gemma-2 / 3, Mistral): the runner's configurations, a window's blocks
    # aligned down to the bulk copies' rows (KV_ALIGN), and without bulk copies (no alignment)
    for d, bn, st, paged, tma, cap, win, q_smem, ahead, regs in (
            (128, 64, 5, True, True, True, True, False, True, (88, 208)),
            (128, 128, 3, True, True, False, True, True, True, (88, 208)),
            (128, 64, 5, True, False, True, True, False, True, (88, 208)),
            (64, 64, 5, False, True, False, True, False, True, (88, 208)),
            (256, 32, 4, True, True, True, True, True, False, (40, 232)),
            (256, 32, 4, True, True, True, False, True, False, (40, 232))):
        tr = 16 if paged else bn
        desc = f"tensordesc<bf16[{tr},{d}],{lay}>"
        yield (f"prefill_sm90_ws D={d} paged={paged} causal=True BLOCK_N={bn} TMA={tma} SOFTCAP={cap} WINDOW={win}",
               prefill_sm90.prefill_sm90_ws_kernel, dict(types, KD=desc, VD=desc) if tma else types,
               dict(HEAD_DIM=d, BLOCK_M=128, BLOCK_N=bn, PAGE_SIZE=16, PAGED=paged, CAUSAL=True, WRITE_LSE=True,
                    STAGES=st, PRODUCER_REGS=regs[0], CONSUMER_REGS=regs[1], num_warps=4, Q_SMEM=q_smem, TMA=tma,
                    Q_AHEAD=ahead, SOFTCAP=cap, WINDOW=win), 4, 1)
    for d in (64, 128):
        for paged in (True, False):
            for causal in (True, False):
                yield (f"prefill_sm90_ws D={d} paged={paged} causal={causal}",
                       prefill_sm90.prefill_sm90_ws_kernel, types,
                       dict(HEAD_DIM=d, BLOCK_M=128, BLOCK_N=64, PAGE_SIZE=16, PAGED=paged, CAUSAL=causal,
                            WRITE_LSE=True, STAGES=5, PRODUCER_REGS=88, CONSUMER_REGS=208, num_warps=4), 4, 1)
        # runner.SM90_LONG_CONFIG: 128-token KV blocks, Q read from shared memory
        for paged in (True, False):
            yield (f"prefill_sm90_ws D={d} paged={paged} causal=True long (BLOCK_N=128 Q_SMEM)",
                   prefill_sm90.prefill_sm90_ws_kernel, types,
                   dict(HEAD_DIM=d, BLOCK_M=128, BLOCK_N=128, PAGE_SIZE=16, PAGED=paged, CAUSAL=True, WRITE_LSE=True,
                        STAGES=3, PRODUCER_REGS=88, CONSUMER_REGS=208, num_warps=4, Q_SMEM=True), 4, 1)
    # attention sinks (run(sinks=)): the epilogue and the two-pass merge (head_dim 256: in column slices)
    for d, bn, st, q_smem, regs in ((128, 64, 5, False, (88, 208)), (256, 32, 4, True, (40, 232))):
        desc = f"tensordesc<bf16[16,{d}],{lay}>"
        yield (f"prefill_sm90_ws D={d} paged=True causal=True BLOCK_N={bn} TMA SINKS",
               prefill_sm90.prefill_sm90_ws_kernel, dict(types, KD=desc, VD=desc, SINKS="*fp32"),
               dict(HEAD_DIM=d, BLOCK_M=128, BLOCK_N=bn, PAGE_SIZE=16, PAGED=True, CAUSAL=True, WRITE_LSE=True,
                    STAGES=st, PRODUCER_REGS=regs[0], CONSUMER_REGS=regs[1], num_warps=4, Q_SMEM=q_smem,
                    TMA=True), 4, 1)
    from pagoda.attention.kernels import mla_sm90

    m = dict(QN="*bf16", QP="*bf16", CKV="*bf16", KPE="*bf16", O="*bf16", LSE="*fp32", TMP_O="*fp32",
             TMP_LSE="*fp32", WORK="*i32", COUNTERS="*i32", KV_INDICES="*i32", SPLITS="*i32", ARRIVALS="*i32",
             qk_scale="fp32")
    lay = "NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2, transposed=False, fp4_padded=False, cga_layout=[])"
    from pagoda.attention.mla import MLA_SM90_CONFIG as c  # (the configuration plans launch)

    bn = c["block_n"]
    for page_size, causal, tma in ((64, False, True), (1, True, False)):
        types = dict(m, CKV_DESC=f"tensordesc<bf16[{bn},256],{lay}>", KPE_DESC=f"tensordesc<bf16[{bn},64],{lay}>")
        descs = {} if tma else dict(CKV_DESC=None, KPE_DESC=None)
        yield (f"mla_sm90 PAGE_SIZE={page_size} causal={causal} TMA={tma}", mla_sm90.mla_sm90_kernel, types,
               dict(D_KPE=64, BLOCK_N=bn, PAGE_SIZE=page_size, CAUSAL=causal, WRITE_LSE=True, STAGES=c["stages"],
                    PV_REGS=c["pv_regs"], PRODUCER_REGS=c["producer_regs"], TMA=tma, num_warps=4, **descs), 4, 1)


def decode_sm90_cases():
    """The Gluon decode kernel (kernels/decode_sm90.py; only with the Triton it targets), over fp8 and bf16."""
    from pagoda.attention.kernels import decode_sm90

    if not decode_sm90.HAVE_GLUON:
        return
    types = dict(Q="*bf16", O="*bf16", LSE="*fp32", TMP_O="*fp32", TMP_LSE="*fp32", WORK="*i32", COUNTERS="*i32",
                 KV_INDICES="*i32", SPLITS="*i32", ARRIVALS="*i32", K_SCALE="*fp32", V_SCALE="*fp32", qk_scale="fp32",
                 k_scale="fp32", v_scale="fp32")
    for d, kv, scale_ptr, same, regs, rows, mr in ((128, "fp8e4nv", False, True, 128, 8, 4),
                                                   (64, "fp8e5", True, False, 128, 16, 16),
                                                   (128, "bf16", False, True, 168, 8, 4),
                                                   (128, "bf16", False, True, 168, 16, 8)):
        yield (f"decode_sm90 D={d} kv={kv} SCALE_PTR={scale_ptr} rows={rows} MERGE_ROWS={mr}",
               decode_sm90.decode_sm90_kernel,
               dict(types, K="*" + kv, V="*" + kv),
               dict(HEAD_DIM=d, BLOCK_M=rows, BLOCK_N=64, PAGE_SIZE=16, WRITE_LSE=True, SCALE_PTR=scale_ptr,
                    STAGES=2, SAME_STRIDES=same, MERGE_ROWS=mr, num_warps=4), 4, 1, regs)
    yield ("decode_sm90 D=128 kv=bf16 PDL", decode_sm90.decode_sm90_kernel, dict(types, K="*bf16", V="*bf16"),
           dict(HEAD_DIM=128, BLOCK_M=8, BLOCK_N=64, PAGE_SIZE=16, WRITE_LSE=False, SCALE_PTR=False, STAGES=2,
                SAME_STRIDES=True, MERGE_ROWS=4, PDL=True, num_warps=4), 4, 1, 168)
    for d, kv, regs, page in ((128, "bf16", 168, 16), (64, "fp8e4nv", 128, 1)):
        yield (f"decode_sm90 D={d} kv={kv} page={page} PDL EARLY_PAGES", decode_sm90.decode_sm90_kernel,
               dict(types, K="*" + kv, V="*" + kv),
               dict(HEAD_DIM=d, BLOCK_M=8, BLOCK_N=64, PAGE_SIZE=page, WRITE_LSE=False, SCALE_PTR=False, STAGES=2,
                    SAME_STRIDES=True, MERGE_ROWS=4, PDL=True, EARLY_PAGES=True, num_warps=4), 4, 1, regs)
    for d, kv, regs, page, stages, pages in ((128, "bf16", 168, 16, 2, True), (64, "fp8e4nv", 128, 1, 2, False),
                                             (128, "bf16", 168, 16, 3, True)):
        yield (f"decode_sm90 D={d} kv={kv} page={page} STAGES={stages} PDL EARLY_KV EARLY_PAGES={pages}",
               decode_sm90.decode_sm90_kernel, dict(types, K="*" + kv, V="*" + kv),
               dict(HEAD_DIM=d, BLOCK_M=8, BLOCK_N=64, PAGE_SIZE=page, WRITE_LSE=False, SCALE_PTR=False,
                    STAGES=stages, SAME_STRIDES=True, MERGE_ROWS=4, PDL=True, EARLY_PAGES=pages, EARLY_KV=True,
                    num_warps=4), 4, 1, regs)
    # logits soft cap (a window needs no code: the plan's range), 16-bit and fp8 caches
    for d, kv, regs in ((128, "bf16", 168), (64, "fp8e4nv", 128)):
        yield (f"decode_sm90 D={d} kv={kv} SOFTCAP", decode_sm90.decode_sm90_kernel,
               dict(types, K="*" + kv, V="*" + kv, soft_cap_log2="fp32"),
               dict(HEAD_DIM=d, BLOCK_M=8, BLOCK_N=64, PAGE_SIZE=16, WRITE_LSE=True, SCALE_PTR=False, STAGES=2,
                    SAME_STRIDES=True, MERGE_ROWS=4, SOFTCAP=True, num_warps=4), 4, 1, regs)
    # head_dim 256: no register cap under the hardware's (one program per SM over a 16-bit cache: 64 KB a stage;
    # two over fp8)
    for kv, stages, rows, mr in (("bf16", 2, 8, 4), ("bf16", 3, 8, 4), ("bf16", 3, 8, 2), ("fp8e4nv", 2, 8, 4)):
        yield (f"decode_sm90 D=256 kv={kv} STAGES={stages} rows={rows} MERGE_ROWS={mr}",
               decode_sm90.decode_sm90_kernel,
               dict(types, K="*" + kv, V="*" + kv, soft_cap_log2="fp32"),
               dict(HEAD_DIM=256, BLOCK_M=rows, BLOCK_N=64, PAGE_SIZE=16, WRITE_LSE=True, SCALE_PTR=False,
                    STAGES=stages, SAME_STRIDES=True, MERGE_ROWS=mr, SOFTCAP=True, num_warps=4), 4, 1)
    # attention sinks (run(sinks=)): the one-query merge and the unsplit epilogue add each head's sink
    for d, kv, rows, mr, regs in ((128, "bf16", 8, 4, 168), (256, "bf16", 8, 4, None), (64, "fp8e4nv", 16, 16, 128)):
        yield (f"decode_sm90 D={d} kv={kv} SINKS", decode_sm90.decode_sm90_kernel,
               dict(types, K="*" + kv, V="*" + kv, SINKS="*fp32"),
               dict(HEAD_DIM=d, BLOCK_M=rows, BLOCK_N=64, PAGE_SIZE=16, WRITE_LSE=True, SCALE_PTR=False,
                    STAGES=3 if d == 256 else 2, SAME_STRIDES=True, MERGE_ROWS=mr, num_warps=4), 4, 1, regs)
    yield ("decode_sm90 D=128 kv=bf16 TRACE", decode_sm90.decode_sm90_kernel,
           dict(types, K="*bf16", V="*bf16", TRACE="*i64"),
           dict(HEAD_DIM=128, BLOCK_M=8, BLOCK_N=64, PAGE_SIZE=16, WRITE_LSE=True, SCALE_PTR=False, STAGES=2,
                SAME_STRIDES=True, MERGE_ROWS=4, num_warps=4), 4, 1, 168)


def ptxas_report(k) -> str:
    """Registers and stack (spills) of the cubin Triton built, from cuobjdump -res-usage."""
    import os
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool) or "cubin" not in k.asm:
        return ""
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    r = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True)
    res = [ln.strip() for ln in r.stdout.splitlines() if "REG:" in ln]
    return f"; {res[0] if res else r.stderr.strip()[:200]}"


# The Gluon kernels' cases that the CPU tests compile (tests/attention/test_compile_sm90.py, `--ci`): the interpreter
# cannot run Gluon, so without this a shared helper's new signature can leave a kernel that no CPU test builds
# uncompilable (mla_sm90 from session 30 to 34). One case per constexpr branch of each kernel: fp8 / 16-bit caches,
# scales by pointer, PDL with early pages and KV, soft caps, windows, TMA or gathers, head_dim 64 / 128 / 256, the
# long-prompt tile, the timeline probe, attention sinks.
CI_CASES = [
    "mla_sm90 PAGE_SIZE=64 causal=False TMA=True",
    "mla_sm90 PAGE_SIZE=1 causal=True TMA=False",
    "decode_sm90 D=128 kv=fp8e4nv SCALE_PTR=False rows=8 MERGE_ROWS=4",
    "decode_sm90 D=64 kv=fp8e5 SCALE_PTR=True rows=16 MERGE_ROWS=16",
    "decode_sm90 D=128 kv=bf16 page=16 STAGES=3 PDL EARLY_KV EARLY_PAGES=True",
    "decode_sm90 D=128 kv=bf16 SOFTCAP",
    "decode_sm90 D=256 kv=bf16 STAGES=3 rows=8 MERGE_ROWS=2",
    "decode_sm90 D=128 kv=bf16 TRACE",
    "prefill_sm90_ws D=128 paged=True causal=True BLOCK_N=64 TMA Q_AHEAD",
    "prefill_sm90_ws D=256 paged=True causal=False BLOCK_N=32 STAGES=4 TMA Q_SMEM",
    "prefill_sm90_ws D=128 paged=True causal=True BLOCK_N=64 TMA=False SOFTCAP=True WINDOW=True",
    "prefill_sm90_ws D=64 paged=False causal=True BLOCK_N=64 TMA=True SOFTCAP=False WINDOW=True",
    "prefill_sm90_ws D=128 paged=False causal=False",
    "prefill_sm90_ws D=128 paged=True causal=True long (BLOCK_N=128 Q_SMEM)",
    "decode_sm90 D=128 kv=bf16 SINKS",
    "prefill_sm90_ws D=256 paged=True causal=True BLOCK_N=32 TMA SINKS",
]


def main():
    want = sys.argv[1:]
    exact = want[:1] in (["--ci"], ["--exact"])  # exactly these cases, each of which must exist
    if exact:
        want = CI_CASES if want == ["--ci"] else want[1:]
    no_params = os.environ.get("NO_PARAMS") == "1"
    failed = 0
    seen = set()
    all_cases = [(*c, 3) if len(c) == 5 else c for c in cases()] + list(attention_cases()) + list(gluon_cases()) + list(decode_sm90_cases())
    for name, fn, types, consts, warps, stages, *maxnreg in all_cases:
        if not (name in want if exact else not want or any(w in name for w in want)):
            continue
        seen.add(name)
        try:
            k = compile_one(fn, types, consts, warps, stages, *maxnreg)
            ptx = k.asm.get("ptx", "")
            # (the PTX's hash without its line and file records: a change meant to leave a kernel as it was, e.g.
            # code behind a constexpr that is off, shows the same hash against the tree before it)
            code = ptx.split(".section\t.debug")[0]  # (the DWARF sections hold line numbers too)
            # ($L__tmp labels mark inlined functions' lines for the debug sections: a helper moved out of a kernel
            # adds some and renumbers the rest)
            # (NO_PARAMS=1: without the lines that declare or load kernel parameters, for a change that adds
            # arguments the kernel does not read with its new constexprs off)
            skip = (".loc", ".file", "//", "$L__tmp")
            body = "\n".join(ln for ln in code.splitlines() if not ln.lstrip().startswith(skip)
                              and not (no_params and "param" in ln))
            digest = hashlib.sha1(body.encode()).hexdigest()[:10]
            if os.environ.get("PTX_DIR"):  # (the hashed text, to diff against another tree's)
                os.makedirs(os.environ["PTX_DIR"], exist_ok=True)
                with open(os.path.join(os.environ["PTX_DIR"], "".join(c if c.isalnum() else "_" for c in name)
                                       + ".ptx"), "w") as f:
                    f.write(body)
            print(f"ok   {name}: {k.metadata.shared} B shared{ptxas_report(k)}; cp.async "
                  f"{ptx.count('cp.async.cg') + ptx.count('cp.async.ca')}; ptx {digest}", flush=True)
        except Exception as e:  # noqa: BLE001 - report every kernel, then fail
            failed += 1
            root = e  # (a Gluon CompilationError's text is the source around the call; its first cause says why)
            while root.__cause__ is not None or root.__context__ is not None:
                root = root.__cause__ or root.__context__
            why = f" <- {type(root).__name__}: {str(root)[-1000:]}" if root is not e else ""
            print(f"FAIL {name}: {type(e).__name__}: {str(e)[:2000]}{why}")
    missing = [w for w in want if w not in seen] if exact else []
    for w in missing:
        print(f"FAIL {w}: no such case")
    sys.exit(1 if failed or missing else 0)


if __name__ == "__main__":
    main()
