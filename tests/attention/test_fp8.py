"""FP8 KV caches: dequantization in the kernels, quantize-on-write, accuracy against bf16.

Two kinds of check:
- exactness of the kernel: the fp8 run must match a float64 oracle over the *dequantized*
  cache (fp8 value * scale) within the usual bf16 tolerance; this is the kernel's contract.
- accuracy of the format: the fp8 result against the unquantized bf16 result, within the
  bounds documented in the README (FP8 KV cache) (quantization error, not a kernel error).
Triton's interpreter converts fp8 <-> fp16/bf16/fp32 (numpy has no fp8 type: the interpreter
emulates the conversions), so the CPU runs the Triton kernels here too; GPU tests at real
sizes are in test_gpu.py.
"""
import pytest
import torch

import pagoda
from pagoda.ops.page import quantize_fp8

from ..conftest import DEVICE
from .helpers import TOL, PagedBatch, check_lse, oracle, poisoned_like, rel_err, workspace

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8_MAX = {E4M3: 448.0, E5M2: 57344.0}
# fp8 vs bf16 relative L2 error of the attention output (README, FP8 KV cache), per-head amax scales; over 5
# seeds measured 0.036-0.038 (e4m3) and 0.069-0.080 (e5m2) on random KV, 0.047-0.093 / 0.11-0.29
# with 10x / 20x outlier channels in K / V (K's error moves the logits: the larger part).
FP8_ACCURACY = {(E4M3, None): 0.05, (E5M2, None): 0.10, (E4M3, "channels"): 0.15, (E5M2, "channels"): 0.35}


def quantized_batch(kv_lens, heads, dim, page_size, fp8, *, per_head=True, layout="NHD", outliers=False,
                    dtype=torch.bfloat16):
    """A PagedBatch whose cache is quantized to ``fp8`` with amax scales: returns (batch, fp8 cache,
    k_scale, v_scale, dequantized per-request k/v lists)."""
    batch = PagedBatch(kv_lens, heads, dim, page_size, dtype, layout)
    if outliers == "channels":  # LLM-like: a few K/V channels 10-20x larger than the rest
        for b in range(len(kv_lens)):
            batch.k[b][..., :2] *= 10.0
            batch.v[b][..., -2:] *= 20.0
        batch = _rebuild(batch, dtype)
    elif outliers == "heads":  # KV heads of very different magnitudes (what per-head scales are for)
        for b in range(len(kv_lens)):
            batch.k[b][:, 0] *= 1e-5
            batch.v[b][:, 0] *= 1e-5
        batch = _rebuild(batch, dtype)
    real_k = torch.cat(batch.k) if batch.k else torch.zeros(0, heads, dim)
    real_v = torch.cat(batch.v) if batch.v else torch.zeros(0, heads, dim)
    if per_head:
        k_scale = (real_k.float().abs().amax(dim=(0, 2)) / FP8_MAX[fp8]).clamp_min(1e-6).to(DEVICE)
        v_scale = (real_v.float().abs().amax(dim=(0, 2)) / FP8_MAX[fp8]).clamp_min(1e-6).to(DEVICE)
        ks, vs = (1.0, k_scale), (1.0, v_scale)
    else:
        k_scale = float(real_k.float().abs().max()) / FP8_MAX[fp8]
        v_scale = float(real_v.float().abs().max()) / FP8_MAX[fp8]
        ks, vs = (k_scale, None), (v_scale, None)
    # NaN (unused slots) stays NaN in fp8 e4m3fn / e5m2, so the poisoning survives quantization.
    cache = torch.empty(batch.cache.shape, dtype=fp8, device=DEVICE)
    for which, sc in ((0, ks), (1, vs)):
        src = batch.cache[:, which]
        if layout == "HND":
            src = src.transpose(1, 2)
        q8 = quantize_fp8(src, sc, fp8)
        cache[:, which] = q8 if layout == "NHD" else q8.transpose(1, 2)
    deq_k = [quantize_fp8(k, ks, fp8).double().cpu() * _bcast(ks) for k in batch.k]  # (on the host)
    deq_v = [quantize_fp8(v, vs, fp8).double().cpu() * _bcast(vs) for v in batch.v]
    return batch, cache, k_scale, v_scale, deq_k, deq_v


def _bcast(scale):
    f, t = scale
    return f * (t.double().cpu()[:, None] if t is not None else torch.ones(1, 1, dtype=torch.float64))


def _rebuild(batch, dtype):
    """Rewrite batch.cache from batch.k / batch.v after they were changed."""
    ps = batch.page_size
    for b, n in enumerate(batch.kv_lens):
        for j in range(-(-n // ps)):
            page = int(batch.indices[int(batch.indptr[b]) + j])
            s, e = j * ps, min(n, (j + 1) * ps)
            for which, src in ((0, batch.k[b]), (1, batch.v[b])):
                if batch.layout == "NHD":
                    batch.cache[page, which, :e - s] = src[s:e]
                else:
                    batch.cache[page, which, :, :e - s] = src[s:e].transpose(0, 1)
    return batch


def _decode(batch, cache, k_scale, v_scale, hq, dim, fp8, backend="triton", q=None):
    hk = batch.k[0].shape[1]
    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(workspace(), batch.layout, backend=backend)
    w.plan(batch.indptr, batch.indices, batch.last_page_len, hq, hk, dim, batch.page_size,
           q_data_type=torch.bfloat16, kv_data_type=fp8)
    if q is None:
        q = torch.randn(len(batch.kv_lens), hq, dim, dtype=torch.bfloat16, device=DEVICE)
    out, lse = poisoned_like(q)
    w.run(q, cache, out=out, lse=lse, return_lse=True, k_scale=k_scale, v_scale=v_scale)
    return q, out, lse


@pytest.mark.parametrize("fp8", [E4M3, E5M2])
@pytest.mark.parametrize("per_head", [True, False])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_fp8_decode_matches_dequantized_reference(fp8, per_head, layout):
    batch, cache, ks, vs, dk, dv = quantized_batch([1, 19, 40, 77], 2, 64, 8, fp8, per_head=per_head,
                                                   layout=layout)
    q, out, lse = _decode(batch, cache, ks, vs, 8, 64, fp8)
    ro, rl = oracle(q, list(range(5)), dk, dv)
    assert rel_err(out, ro) < TOL[torch.bfloat16]
    check_lse(lse, rl)


def test_fp8_bf16_queries_beyond_fp16_range_are_clamped():
    """bf16 queries over an fp8 cache compute in fp16 (kernels/attention.py): elements beyond fp16's range
    (|q| > 65504) are clamped to it, not turned into inf / NaN. The oracle gets the clamped queries."""
    batch, cache, ks, vs, dk, dv = quantized_batch([3, 20], 2, 64, 8, E4M3)
    q = torch.randn(2, 4, 64, dtype=torch.bfloat16, device=DEVICE) * 0.02
    q[0, 1, 5] = 2.0e5
    q[1, 3, 7] = -1.0e6
    _, out, lse = _decode(batch, cache, ks, vs, 4, 64, E4M3, q=q)
    assert torch.isfinite(out.float()).all() and torch.isfinite(lse).all()
    ro, rl = oracle(q.float().clamp(-65504.0, 65504.0), list(range(3)), dk, dv)
    assert rel_err(out, ro) < TOL[torch.bfloat16]
    check_lse(lse, rl)


@pytest.mark.parametrize("fp8", [E4M3, E5M2])
def test_fp8_torch_backend_matches_triton(fp8):
    batch, cache, ks, vs, dk, dv = quantized_batch([5, 33], 2, 64, 16, fp8)
    q, out_t, _ = _decode(batch, cache, ks, vs, 4, 64, fp8, backend="triton")
    _, out_r, _ = _decode(batch, cache.cpu(), ks.cpu(), vs.cpu(), 4, 64, fp8, backend="torch", q=q.cpu())
    ro, _ = oracle(q, list(range(3)), dk, dv)
    assert rel_err(out_r, ro) < TOL[torch.bfloat16]
    assert rel_err(out_t, ro) < TOL[torch.bfloat16]


@pytest.mark.parametrize("causal", [True, False])
def test_fp8_paged_prefill_append(causal):
    """Append (qo_len < kv_len) over an fp8 cache, scalar scales, e4m3."""
    kv_lens, qo_lens = [20, 45, 9], [7, 16, 9]
    batch, cache, ks, vs, dk, dv = quantized_batch(kv_lens, 2, 64, 4, E4M3, per_head=False)
    qo = torch.tensor([0] + qo_lens).cumsum(0).to(torch.int32)
    w = pagoda.BatchPrefillWithPagedKVCacheWrapper(workspace(), "NHD", backend="triton")
    w.plan(qo, batch.indptr, batch.indices, batch.last_page_len, 6, 2, 64, 4, causal=causal,
           q_data_type=torch.bfloat16, kv_data_type=E4M3)
    q = torch.randn(int(qo[-1]), 6, 64, dtype=torch.bfloat16, device=DEVICE)
    out, lse = poisoned_like(q)
    w.run(q, cache, out=out, lse=lse, return_lse=True, k_scale=ks, v_scale=vs)
    ro, rl = oracle(q, qo.tolist(), dk, dv, causal=causal)
    assert rel_err(out, ro) < TOL[torch.bfloat16]
    check_lse(lse, rl)


def test_fp8_ragged_and_single():
    k = torch.randn(50, 2, 64, dtype=torch.bfloat16, device=DEVICE)
    v = torch.randn(50, 2, 64, dtype=torch.bfloat16, device=DEVICE)
    q = torch.randn(10, 4, 64, dtype=torch.bfloat16, device=DEVICE)
    k8, v8 = (k.float() / 0.01).clamp(-448, 448).to(E4M3), (v.float() / 0.02).clamp(-448, 448).to(E4M3)
    out = pagoda.single_prefill_with_kv_cache(q, k8, v8, causal=True, k_scale=0.01, v_scale=0.02,
                                              backend="triton")
    ro, _ = oracle(q, [0, 10], [k8.double() * 0.01], [v8.double() * 0.02], causal=True)
    assert rel_err(out, ro) < TOL[torch.bfloat16]
    od = pagoda.single_decode_with_kv_cache(q[0], k8, v8, k_scale=0.01, v_scale=0.02, backend="triton")
    rd, _ = oracle(q[:1], [0, 1], [k8.double() * 0.01], [v8.double() * 0.02])
    assert rel_err(od, rd[0]) < TOL[torch.bfloat16]


def test_fp8_cascade():
    """Two-level cascade over an fp8 pool equals flat fp8 decode over the concatenated KV."""
    ps, hk, hq, d = 4, 2, 4, 64
    shared = 12  # 3 full pages shared by 3 requests
    uniq = [5, 0, 9]
    lens = [shared + u for u in uniq]
    batch, cache, ks, vs, dk, dv = quantized_batch([shared] + uniq, hk, d, ps, E4M3)
    # page table of request b = shared pages + its own pages
    ip = batch.indptr.tolist()
    shared_pages = batch.indices[ip[0]:ip[1]]
    own = [batch.indices[ip[b + 1]:ip[b + 2]] for b in range(3)]
    l0 = dict(qo=[0, 3], indptr=[0, 3], indices=shared_pages, last=[ps])
    l1_indices = torch.cat(own)
    l1_indptr = torch.tensor([0] + [len(o) for o in own]).cumsum(0)
    l1_last = torch.tensor([(u - 1) % ps + 1 if u else 0 for u in uniq])
    w = pagoda.MultiLevelCascadeAttentionWrapper(2, workspace(), "NHD", backend="triton")
    w.plan([torch.tensor(l0["qo"]), torch.arange(4)], [torch.tensor(l0["indptr"]), l1_indptr],
           [l0["indices"], l1_indices], [torch.tensor(l0["last"]), l1_last], hq, hk, d, ps,
           q_data_type=torch.bfloat16, kv_data_type=E4M3)
    q = torch.randn(3, hq, d, dtype=torch.bfloat16, device=DEVICE)
    out = w.run(q, cache, k_scale=ks, v_scale=vs)
    ro, _ = oracle(q, list(range(4)), [torch.cat([dk[0], dk[b + 1]]) for b in range(3)],
                   [torch.cat([dv[0], dv[b + 1]]) for b in range(3)])
    assert len(lens) == 3 and rel_err(out, ro) < TOL[torch.bfloat16]


@pytest.mark.parametrize("fp8", [E4M3, E5M2])
@pytest.mark.parametrize("outliers", [None, "channels"])
def test_fp8_accuracy_against_bf16(fp8, outliers):
    """The documented bound of fp8 KV against the unquantized bf16 cache (per-head amax scales)."""
    batch, cache, ks, vs, _, _ = quantized_batch([64, 128, 200], 2, 64, 16, fp8, outliers=outliers)
    q, out, _ = _decode(batch, cache, ks, vs, 8, 64, fp8)
    ro, _ = oracle(q, list(range(4)), batch.k, batch.v)
    err = rel_err(out, ro)
    assert err < FP8_ACCURACY[(fp8, outliers)], f"fp8 {fp8} error {err:.4f} over the documented bound"
    assert err > 1e-3  # the cache really is quantized (an fp8 run equal to bf16 would be a wrong test)


def test_fp8_per_head_scales_keep_small_heads():
    """A KV head 1e-5 times smaller than the other underflows a per-tensor e4m3 scale (subnormals);
    per-head scales keep it at the format's usual accuracy."""
    errs = {}
    for per_head in (True, False):
        torch.manual_seed(7)
        batch, cache, ks, vs, _, _ = quantized_batch([64, 128], 2, 64, 16, E4M3, per_head=per_head,
                                                     outliers="heads")
        q, out, _ = _decode(batch, cache, ks, vs, 8, 64, E4M3)
        ro, _ = oracle(q, list(range(3)), batch.k, batch.v)
        errs[per_head] = rel_err(out[:, :4], ro[:, :4])  # the query heads of the small KV head
    assert errs[True] < FP8_ACCURACY[(E4M3, None)]
    assert errs[False] > 4 * errs[True], errs


@pytest.mark.parametrize("fp8", [E4M3, E5M2])
@pytest.mark.parametrize("per_head", [True, False])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_append_quantizes_on_write(fp8, per_head, layout):
    ps, heads, dim = 4, 3, 64
    seq_lens = torch.tensor([6, 9], dtype=torch.int32)
    indptr = torch.tensor([0, 2, 5], dtype=torch.int32)
    indices = torch.tensor([4, 1, 0, 6, 2], dtype=torch.int32)
    last = torch.tensor([2, 1], dtype=torch.int32)
    nnz = 15
    append_indptr = torch.tensor([0, 6, 15], dtype=torch.int32)
    k = torch.randn(nnz, heads, dim, dtype=torch.bfloat16, device=DEVICE) * 3
    v = torch.randn(nnz, heads, dim, dtype=torch.bfloat16, device=DEVICE) * 3
    k[0, 0, 0] = 1e6  # saturates: must clamp to the fp8 maximum, never NaN
    shape = (8, 2, ps, heads, dim) if layout == "NHD" else (8, 2, heads, ps, dim)
    cache = torch.full(shape, float("nan"), device=DEVICE).to(fp8)
    if per_head:
        k_scale = torch.tensor([0.01, 0.02, 0.05], device=DEVICE)
        v_scale = torch.tensor([0.03, 0.01, 0.02], device=DEVICE)
        ks, vs = (1.0, k_scale), (1.0, v_scale)
    else:
        k_scale, v_scale = 0.02, 0.03
        ks, vs = (k_scale, None), (v_scale, None)
    b, pos = pagoda.get_batch_indices_positions(append_indptr.to(DEVICE), seq_lens.to(DEVICE), nnz)
    pagoda.append_paged_kv_cache(k, v, b, pos, cache, indices.to(DEVICE), indptr.to(DEVICE), last.to(DEVICE),
                                 layout, k_scale=k_scale, v_scale=v_scale)
    kc, vc = (cache[:, 0], cache[:, 1]) if layout == "NHD" else (cache[:, 0].transpose(1, 2),
                                                                 cache[:, 1].transpose(1, 2))
    for t in range(nnz):
        bb, p = int(b[t]), int(pos[t])
        page = int(indices[int(indptr[bb]) + p // ps])
        for got, src, sc in ((kc[page, p % ps], k[t], ks), (vc[page, p % ps], v[t], vs)):
            want = quantize_fp8(src[None], sc, fp8)[0].float()
            g = got.float()
            assert torch.isfinite(g).all()
            assert torch.equal(g, want)  # round to nearest even, as torch's conversion
    assert float(kc.float().nan_to_num(0).abs().max()) == FP8_MAX[fp8]  # the saturated element
    # the slots nobody wrote are still NaN (nothing written out of place)
    written = torch.zeros(8, ps, dtype=torch.bool)
    for t in range(nnz):
        bb, p = int(b[t]), int(pos[t])
        written[int(indices[int(indptr[bb]) + p // ps]), p % ps] = True
    assert kc.float()[~written.to(DEVICE)].isnan().all()


def test_fp8_bad_input():
    batch, cache, ks, vs, _, _ = quantized_batch([5, 9], 2, 64, 4, E4M3)
    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(workspace(), "NHD", backend="triton")
    w.plan(batch.indptr, batch.indices, batch.last_page_len, 4, 2, 64, 4, q_data_type=torch.bfloat16,
           kv_data_type=E4M3)
    q = torch.randn(2, 4, 64, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="k_scale"):
        w.run(q, cache, v_scale=vs)
    with pytest.raises(ValueError, match="v_scale"):
        w.run(q, cache, k_scale=ks)
    with pytest.raises(ValueError, match="k_scale"):
        w.run(q, cache, k_scale=torch.ones(3, device=DEVICE), v_scale=vs)
    with pytest.raises(ValueError, match="k_scale"):
        w.run(q, cache, k_scale=torch.ones(2, dtype=torch.float16, device=DEVICE), v_scale=vs)
    with pytest.raises(ValueError, match="v_scale"):
        w.run(q, cache, k_scale=ks, v_scale=-1.0)
    with pytest.raises(ValueError, match="kv_data_type"):  # a bf16 cache under an fp8 plan
        w.run(q, batch.cache, k_scale=ks, v_scale=vs)
    with pytest.raises(ValueError, match="q_data_type"):
        w.plan(batch.indptr, batch.indices, batch.last_page_len, 4, 2, 64, 4, q_data_type=torch.float32,
               kv_data_type=E4M3)
    with pytest.raises(ValueError, match="kv_data_type"):
        w.plan(batch.indptr, batch.indices, batch.last_page_len, 4, 2, 64, 4, q_data_type=torch.bfloat16,
               kv_data_type=torch.float16)
    k = torch.randn(1, 2, 64, dtype=torch.bfloat16, device=DEVICE)
    one = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    ip = batch.indptr.to(DEVICE)
    with pytest.raises(ValueError, match="k_scale"):
        pagoda.append_paged_kv_cache(k, k, one, one, cache, batch.indices.to(DEVICE), ip,
                                     batch.last_page_len.to(DEVICE), v_scale=1.0)


def test_fp8_one_per_head_scale_and_one_float():
    """k_scale per head, v_scale a float (the kernel pairs the float with unit per-head scales)."""
    batch, cache, ks, _, dk, _ = quantized_batch([9, 30], 2, 64, 8, E4M3, per_head=True)
    vs = 0.05
    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(workspace(), backend="triton")
    w.plan(batch.indptr, batch.indices, batch.last_page_len, 4, 2, 64, 8, q_data_type=torch.bfloat16,
           kv_data_type=E4M3)
    q = torch.randn(2, 4, 64, dtype=torch.bfloat16, device=DEVICE)
    for _ in range(2):  # the second run reuses the unit scales
        out = w.run(q, cache, k_scale=ks, v_scale=vs)
    v8 = cache[:, 1].float().cpu()
    ip = batch.indptr.tolist()
    dv = []
    for b, n in enumerate(batch.kv_lens):
        pages = batch.indices[ip[b]:ip[b + 1]].long()
        dv.append(v8[pages].reshape(-1, 2, 64)[:n].double() * vs)
    ro, _ = oracle(q, [0, 1, 2], dk, dv)
    assert rel_err(out, ro) < TOL[torch.bfloat16]


@pytest.mark.parametrize("head_dim", [64, 128])
def test_gluon_fp8_decode_v_view(head_dim):
    """The Gluon fp8 decode kernel's V^T view (kernels/decode_sm90.py; Gluon has no interpreter, so the kernel's
    numbers are checked by test_gpu.py on the device), traced for sm_90 on this machine: with the head-dim rows
    renumbered and the ring's swizzle folded in, it must address every byte of a ring slot exactly once, where
    the swizzled layout stores it, or the kernel would read V from the wrong places."""
    from pagoda.attention.kernels import decode_sm90

    if not decode_sm90.HAVE_GLUON:
        pytest.skip("the Gluon kernel targets another Triton version")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    @gluon.constexpr_function
    def views_agree(view, perm, head_dim):
        # every byte offset of a ring slot: the (renumbered row m, token t) the view maps it to must be the byte
        # where Triton's swizzled layout stores (t, head-dim column of m): 16-byte chunks XOR the row's phase
        per_phase = decode_sm90._ring_swizzle(head_dim)[0]
        max_phase = decode_sm90._ring_swizzle(head_dim)[1]
        seen = set()
        for off in range(64 * head_dim):
            m = 0
            t = 0
            for b in range(len(view.offset_bases)):
                if off >> b & 1:
                    m ^= view.offset_bases[b][0]
                    t ^= view.offset_bases[b][1]
            d = sum(1 << i for i, p in enumerate(perm) if m & p)
            if t * head_dim + ((d // 16) ^ (t // per_phase % max_phase)) * 16 + d % 16 != off:
                return False
            seen.add((m, t))
        return len(seen) == 64 * head_dim

    @gluon.jit
    def probe(X, HEAD_DIM: gl.constexpr):
        ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 16, 16])
        A_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ACC, k_width=2)
        V_LOAD: gl.constexpr = decode_sm90._regs_first(gl.to_linear_layout(A_L, [HEAD_DIM, 64]), 0)
        PERM: gl.constexpr = decode_sm90._row_order(V_LOAD)
        gl.static_assert(views_agree(decode_sm90._v_view(PERM, 64, HEAD_DIM), PERM, HEAD_DIM))

    triton.compile(GluonASTSource(fn=probe, signature={"X": "*fp32", "HEAD_DIM": "constexpr"},
                                  constexprs={(1,): head_dim}), target=GPUTarget("cuda", 90, 32),
                   options=dict(num_warps=4))


def test_gluon_fp8_decode_kernel_compiles_for_sm90():
    """The Gluon decode kernel compiled for sm_90 on this machine (scripts/compile_check.py, outside the
    interpreter, which cannot trace Gluon's reductions), over fp8 at head_dim 128 and 64 and over bf16, under the
    runner's register caps with at most a few words of stack (0-16 bytes when written; a larger spill would be
    a regression to look at)."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    from pagoda.attention.kernels import decode_sm90

    if not decode_sm90.HAVE_GLUON:
        pytest.skip("the Gluon kernel targets another Triton version")
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(root / "scripts" / "compile_check.py"), "decode_sm90"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("ok   decode_sm90")]
    # fp8 D=128 / D=64, bf16 at 8 and 16 rows (merge rows 4 and 8), bf16 as a PDL launch (also with round 0's page
    # ids before the wait: bf16 D=128, fp8 D=64 at page size 1), with its first KV blocks copied before the wait
    # (bf16 at 2 and 3 stages, fp8 D=64 page size 1), with a logits soft cap (bf16 D=128, fp8 D=64), bf16 with
    # TRACE stamps; head_dim 256 (bf16 at 2 / 3 stages and merge rows 4 / 2, fp8), which runs without a register
    # cap (one program per SM for bf16, two for fp8: runner.DECODE_GLUON_CONFIG_BY_HEAD_DIM); with attention sinks
    # (bf16 D=128 / D=256, fp8 D=64)
    assert len(lines) == 20, r.stdout
    for ln in lines:
        regs, stack = (int(re.search(f"{f}:(\\d+)", ln).group(1)) for f in ("REG", "STACK"))
        cap = 255 if "D=256" in ln else 168 if "bf16" in ln else 128
        assert regs <= cap and stack <= 32, ln
    assert sum("D=256" in ln for ln in lines) == 5, r.stdout
