"""pagoda.ops.segment_gemm / SegmentGEMMWrapper (multi-LoRA; kernels/lora.py) against a float64 reference: the
Triton kernel in the interpreter on the CPU and the PyTorch path; at real LoRA sizes on the GPU (gpu marker)."""
import pytest
import torch

import pagoda
from pagoda.ops import lora

from ..conftest import DEVICE

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2, torch.float32: 1e-5}


def oracle(x, weights, seg_lens, column_major, weight_indices=None):
    """float64, one segment at a time."""
    out = torch.zeros(x.shape[0], weights.shape[1] if column_major else weights.shape[2], dtype=torch.float64)
    start = 0
    for b, n in enumerate(seg_lens):
        w = weights[b if weight_indices is None else int(weight_indices[b])].double().cpu()
        out[start:start + n] = x[start:start + n].double().cpu() @ (w.T if column_major else w)
        start += n
    return out


def check_segments(y, ref, seg_lens, dtype):
    """Every segment on its own (a wrong segment is not hidden in the whole's norm), no poisoned entry left."""
    y = y.double().cpu()
    assert torch.isfinite(y).all(), "unwritten (NaN-poisoned) output"
    start = 0
    for n in seg_lens:
        if n:
            seg, r = y[start:start + n], ref[start:start + n]
            assert ((seg - r).norm() / r.norm()).item() < TOL[dtype], (start, n)
        start += n


def make(seg_lens, d_in, d_out, num_weights, column_major, dtype, device=DEVICE):
    x = torch.randn(sum(seg_lens), d_in, dtype=dtype, device=device)
    shape = (num_weights, d_out, d_in) if column_major else (num_weights, d_in, d_out)
    w = (torch.randn(shape, dtype=torch.float32, device=device) / d_in ** 0.5).to(dtype)
    return x, w


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("column_major", [True, False])
@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("seg_lens,d_in,d_out,indices", [
    ([3, 0, 17, 1], 40, 24, [2, 0, 2, 1]),   # empty segment, a segment past a 16-row tile, reused weights
    ([1, 1, 1, 1, 1], 64, 16, None),          # decode rows, a rank-16 shrink (split K in the interpreter)
    ([33, 2], 16, 70, [1, 0]),                 # an expand: d_out past a column tile, not a multiple of it
    ([5], 100, 8, [0]),                        # K not a multiple of the K step, d_out under a tile
])
def test_segment_gemm(dtype, column_major, backend, seg_lens, d_in, d_out, indices):
    num_weights = 3 if indices else len(seg_lens)
    x, w = make(seg_lens, d_in, d_out, num_weights, column_major, dtype)
    wi = None if indices is None else torch.tensor(indices, dtype=torch.int64)
    out = torch.full((x.shape[0], d_out), float("nan"), dtype=dtype, device=DEVICE)
    y = lora.segment_gemm(x, w, len(seg_lens), column_major, out=out, seg_lens=torch.tensor(seg_lens),
                          weight_indices=wi, backend=backend)
    assert y is out
    check_segments(y, oracle(x, w, seg_lens, column_major, wi), seg_lens, dtype)


def test_float32_on_the_torch_path():
    """The engine's CPU models are float32: the PyTorch path takes them (the kernel does not: test below)."""
    seg_lens, indices = [3, 0, 6], torch.tensor([1, 0, 1])
    x, w = make(seg_lens, 24, 8, 2, True, torch.float32, device="cpu")
    out = torch.full((9, 8), float("nan"))
    lora.segment_gemm(x, w, 3, True, out=out, seg_indptr=torch.tensor([0, 3, 3, 9]), weight_indices=indices,
                      backend="torch")
    check_segments(out, oracle(x, w, seg_lens, True, indices), seg_lens, torch.float32)


@pytest.mark.parametrize("search", ["vector", "binary"])
def test_both_segment_searches(search, monkeypatch):
    """The kernel finds a row tile's segment by one vector load (<= 1024 segments) or a binary search (more):
    both, over empty segments at the start, in the middle and at the end."""
    if search == "binary":
        monkeypatch.setattr(lora, "search_block", lambda batch_size: 0)
    else:
        assert lora.search_block(7) == 8 and lora.search_block(1025) == 0
    seg_lens = [0, 2, 0, 0, 19, 1, 0, 33, 0]
    x, w = make(seg_lens, 32, 24, len(seg_lens), True, torch.bfloat16)
    out = torch.full((x.shape[0], 24), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    lora.segment_gemm(x, w, len(seg_lens), True, out=out, seg_lens=torch.tensor(seg_lens))
    check_segments(out, oracle(x, w, seg_lens, True), seg_lens, torch.bfloat16)


def test_tiles_kernel_zeroes_the_split_sums():
    """segment_tiles_kernel: the row-tile pointers (rows clamped to x's, empty and negative-length segments no
    tiles) from program 0, and every program's block of the split-K sums zeroed (poisoned first)."""
    from pagoda.ops.kernels.lora import segment_tiles_kernel

    indptr = torch.tensor([0, 3, 3, 40, 38, 50, 99], dtype=torch.int64, device=DEVICE)
    tiles = torch.full((7,), -5, dtype=torch.int32, device=DEVICE)
    zero = torch.full((1000,), float("nan"), dtype=torch.float32, device=DEVICE)
    segment_tiles_kernel[(4,)](indptr, tiles, 6, 60, zero, 1000, BLOCK_M=16, BLOCK=4, ZERO_BLOCK=256)
    # rows 0-3, 3-3, 3-40, 40-38 (none), 38-50, 50-60 (clamped): 1, 0, 3, 0, 1, 1 tiles
    assert tiles.tolist() == [0, 1, 1, 4, 4, 5, 6]
    assert torch.equal(zero, torch.zeros_like(zero))


def test_split_k_is_taken_in_the_interpreter():
    """The split-K form (float32 atomics, then a cast) runs in the CPU tests: a narrow d_out over a long K."""
    assert lora.segment_config(5, 5, 64, 16, on_cuda=False)[3] > 1
    assert lora.segment_config(5, 5, 16, 70, on_cuda=False)[3] == 1


def test_wrapper_as_flashinfer_documents_it():
    """FlashInfer's docstring example: seg_lens with and without weight_indices, and seg_indptr (int32) instead."""
    ws = torch.empty(1 << 20, dtype=torch.int8, device=DEVICE)
    g = pagoda.SegmentGEMMWrapper(ws)
    seg_lens = [1, 2, 3, 4]
    x = torch.randn(10, 32, dtype=torch.float16, device=DEVICE)
    weights = torch.randn(4, 48, 32, dtype=torch.float16, device=DEVICE)
    y = g.run(x, weights, 4, True, seg_lens=torch.tensor(seg_lens, dtype=torch.int64))
    assert y.shape == (10, 48) and y.dtype == torch.float16
    check_segments(y, oracle(x, weights, seg_lens, True), seg_lens, torch.float16)
    wi = torch.tensor([0, 1, 0, 1], dtype=torch.int64)
    y = g.run(x, weights, 4, True, seg_lens=torch.tensor(seg_lens), weight_indices=wi)
    check_segments(y, oracle(x, weights, seg_lens, True, wi), seg_lens, torch.float16)
    y2 = g.forward(x, weights, 4, True, seg_indptr=torch.tensor([0, 1, 3, 6, 10], dtype=torch.int32),
                   weight_indices=wi)
    assert torch.equal(y, y2)


def test_device_table_guards_in_the_kernel():
    """A table the host does not check (on the device): a weight index outside W gives NaN rows for that segment
    only, and a row pointer past x's rows is clamped (the kernel reads no row past x)."""
    x, w = make([4, 3, 2], 32, 24, 2, True, torch.bfloat16)
    out = torch.full((9, 24), 7.0, dtype=torch.bfloat16, device=DEVICE)
    indptr = torch.tensor([0, 4, 7, 9], dtype=torch.int64, device=DEVICE)
    wi = torch.tensor([1, 5, -1], dtype=torch.int64, device=DEVICE)
    lora._segment_gemm_triton(x, w, True, out, indptr, wi, 3)
    ref = oracle(x[:4], w, [4], True, torch.tensor([1]))
    check_segments(out[:4], ref, [4], torch.bfloat16)
    assert torch.isnan(out[4:].float()).all()
    out2 = torch.full((9, 24), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    lora._segment_gemm_triton(x, w, True, out2, torch.tensor([0, 4, 1000], device=DEVICE), None, 2)
    check_segments(out2, oracle(x, w, [4, 5], True), [4, 5], torch.bfloat16)


def test_bad_input_names_the_argument():
    x, w = make([2, 3], 32, 16, 2, True, torch.bfloat16)
    lens = torch.tensor([2, 3])

    def run(**kw):
        args = dict(x=x, weights=w, batch_size=2, weight_column_major=True, seg_lens=lens)
        args.update(kw)
        return lora.segment_gemm(**args)
    cases = [
        (dict(x=x.double(), weights=w.double()), "x must be float16 or bfloat16"),
        (dict(x=x.float(), weights=w.float(), backend="triton"), "only the PyTorch path takes"),
        (dict(x=x.float()), "weights must be torch.float32"),
        (dict(x=x[0]), "x must be a 2-D"),
        (dict(weights=w.half()), "weights must be"),
        (dict(weights=w[0]), "weights must be a 3-D"),
        (dict(weight_column_major=False), "weights .* d_in=16"),
        (dict(weight_column_major=1), "weight_column_major must be a bool"),
        (dict(batch_size=-1), "batch_size must be"),
        (dict(batch_size=3), "seg_lens must have 3 entries"),
        (dict(seg_lens=None), "either seg_lens or seg_indptr"),
        (dict(seg_lens=lens.float()), "seg_lens must be a 1-D int32 / int64"),
        (dict(seg_lens=torch.tensor([3, -1])), "seg_lens must be >= 0"),
        (dict(seg_lens=torch.tensor([2, 2])), "seg_indptr must run from 0 to x's 5 rows"),
        (dict(seg_indptr=torch.tensor([0, 4, 3, 5])), "seg_indptr must have 3 entries"),
        (dict(seg_indptr=torch.tensor([0, 4, 3]), batch_size=2, x=x[:3]), "non-decreasing"),
        (dict(weight_indices=torch.tensor([0, 2])), "weight_indices must be in 0..1"),
        (dict(weight_indices=torch.tensor([0, -1])), "weight_indices must be in 0..1"),
        (dict(weight_indices=torch.tensor([0])), "weight_indices must have 2 entries"),
        (dict(weights=w[:1]), "2 segments need 2 weights"),
        (dict(out=torch.empty(5, 8, dtype=torch.bfloat16)), "out must be"),
        (dict(backend="cuda"), "backend must be"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            run(**kw)
    with pytest.raises(ValueError, match="backend"):
        pagoda.SegmentGEMMWrapper(torch.empty(8), backend="cutlass")


def test_empty_batch_and_rows():
    x, w = make([0, 0], 32, 16, 2, True, torch.bfloat16)
    assert lora.segment_gemm(x, w, 2, True, seg_lens=torch.tensor([0, 0])).shape == (0, 16)
    x, w = make([4], 32, 16, 1, True, torch.bfloat16)
    y = lora.segment_gemm(x[:0], w, 0, True, seg_indptr=torch.tensor([0]))
    assert y.shape == (0, 16)


# -- GPU: real LoRA sizes ------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("column_major", [True, False])
@pytest.mark.parametrize("rank", [16, 64])
@pytest.mark.parametrize("seg_lens", [[1] * 64, [512, 1, 37, 2048, 1, 1, 300, 64]])
def test_segment_gemm_real_sizes(column_major, rank, seg_lens):
    """A LoRA layer's shrink (4096 -> rank) and expand (rank -> 4096) for 64 decode rows with 64 adapters and a
    mixed prefill / decode batch sharing 4 adapters, device tables, against the float64 oracle."""
    if not torch.cuda.is_available():
        pytest.fail("gpu tests need CUDA")
    n = len(seg_lens)
    num_w = 4 if n < 64 else n
    wi = torch.randint(0, num_w, (n,), device="cuda")
    lens = torch.tensor(seg_lens, device="cuda")
    for d_in, d_out in ((4096, rank), (rank, 4096)):
        x, w = make(seg_lens, d_in, d_out, num_w, column_major, torch.bfloat16, "cuda")
        out = torch.full((x.shape[0], d_out), float("nan"), dtype=torch.bfloat16, device="cuda")
        lora.segment_gemm(x, w, n, column_major, out=out, seg_lens=lens, weight_indices=wi)
        check_segments(out, oracle(x, w, seg_lens, column_major, wi.cpu()), seg_lens, torch.bfloat16)


@pytest.mark.gpu
def test_segment_gemm_in_cuda_graph():
    """With device tables a run is captured once and replayed after the tables change in place (new segment
    lengths within the same rows, new adapters)."""
    if not torch.cuda.is_available():
        pytest.fail("gpu tests need CUDA")
    x, w = make([8] * 16, 4096, 16, 8, True, torch.bfloat16, "cuda")
    indptr = torch.arange(0, 129, 8, device="cuda")
    wi = torch.zeros(16, dtype=torch.int64, device="cuda")
    out = torch.empty(128, 16, dtype=torch.bfloat16, device="cuda")
    g = pagoda.SegmentGEMMWrapper(torch.empty(1 << 20, dtype=torch.int8, device="cuda"))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        g.run(x, w, 16, True, out=out, seg_indptr=indptr, weight_indices=wi)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g.run(x, w, 16, True, out=out, seg_indptr=indptr, weight_indices=wi)
    lens = [1, 40, 0, 7, 20, 3, 9, 4, 2, 8, 8, 8, 8, 4, 4, 2]
    indptr.copy_(torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device="cuda"))
    wi.copy_(torch.randint(0, 8, (16,), device="cuda"))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    check_segments(out, oracle(x, w, lens, True, wi.cpu()), lens, torch.bfloat16)


def test_bench_table_with_and_without_flashinfer():
    """pagoda.bench.lora's table: ratios where FlashInfer ran, dashes where it did not."""
    from pagoda.bench.lora import fmt

    row = {"rank": 16, "case": "decode 64", "kind": "shrink", "pagoda_us": 10.0, "MB": 8.4, "gflop": 0.008,
           "torch_us": 40.0, "pagoda_err": 1e-3}
    text = fmt([row, dict(row, flashinfer_us=30.0, flashinfer_err=2e-3)])
    lines = text.splitlines()
    assert len(lines) == 3 and "x FI" in lines[0]
    assert "4.00x" in lines[1] and "-" in lines[1].split()[7]
    assert "3.00x" in lines[2] and " 840 " in lines[2] and "0.8" in lines[2]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("rows,rp,d_in,d_out,block_m,extra_tiles", [
    (37, 16, 40, 24, 16, 0),   # K and d_out not multiples of the interpreter's 16-wide steps, tiles of 16
    (9, 32, 64, 70, 16, 3),    # a 32-wide stacked rank, unused tiles past the last
    (70, 16, 24, 16, 64, 0),   # prefill-sized tiles of 64 rows
])
def test_lora_delta_over_rows_grouped_by_adapter(dtype, backend, rows, rp, d_in, d_out, block_m, extra_tiles):
    """The engine's LoRA deltas (lora_tiles + lora_delta): out[r] += (x[r] @ A[slot]^T) @ B[slot]^T for the rows of
    adapters 1..3 in random order, against float64 (the shrink rounded to the weights' dtype, as the kernel does);
    rows of slot 0 keep their exact bits; the split-K partials come back summed."""
    g = torch.Generator().manual_seed(rows)
    slots = torch.randint(0, 4, (rows,), generator=g).numpy()
    x = torch.randn(rows, d_in, generator=g).to(dtype).to(DEVICE)
    a = (torch.randn(4, rp, d_in, generator=g) / d_in ** 0.5).to(dtype).to(DEVICE)
    b = (torch.randn(4, d_out, rp, generator=g) / rp ** 0.5).to(dtype).to(DEVICE)
    out0 = torch.randn(rows, d_out, generator=g).to(dtype).to(DEVICE)
    n_tiles = lora.lora_max_tiles(rows, block_m, 3) + extra_tiles
    order, tiles = lora.lora_tiles(slots, block_m, n_tiles)
    out = out0.clone()
    lora.lora_delta(out, x, a, b, torch.from_numpy(order).to(DEVICE), torch.from_numpy(tiles).to(DEVICE), n_tiles,
                    block_m, backend)
    ref = out0.double().cpu().clone()
    for r, s in enumerate(slots):
        if s:
            shrunk = (x[r].double().cpu() @ a[s].double().cpu().T).to(dtype).double()
            ref[r] += shrunk @ b[s].double().cpu().T
    keep = torch.from_numpy(slots == 0)
    assert torch.equal(out[keep.to(out.device)], out0[keep.to(out.device)])
    got = out.double().cpu()
    for s in (1, 2, 3):
        m = torch.from_numpy(slots == s)
        if m.any():
            err = ((got[m] - ref[m]).norm() / (ref[m] - out0.double().cpu()[m]).norm()).item()
            assert err < 2 * TOL[dtype], (s, err)


def test_lora_tiles_and_bad_tables():
    order, tiles = lora.lora_tiles([3, 0, 3, 1, 3, 3], 2, 5)
    assert order.tolist() == [1, 3, 0, 2, 4, 5]
    assert tiles.reshape(3, 5).tolist() == [[1, 3, 3, -1, -1], [1, 2, 4, -1, -1], [2, 4, 6, -1, -1]]
    with pytest.raises(ValueError, match="n_tiles=2 is too few"):
        lora.lora_tiles([3, 0, 3, 1, 3, 3], 2, 2)
    x, out = torch.randn(4, 32).bfloat16(), torch.zeros(4, 16).bfloat16()
    a, b = torch.zeros(2, 16, 32).bfloat16(), torch.zeros(2, 16, 16).bfloat16()
    order, tiles = (torch.from_numpy(t) for t in lora.lora_tiles([1, 0, 1, 1], 16, 3))
    for args, msg in (((out, x, a, b[:, :8], order, tiles, 3, 16), "b \\[slots, 16, rank\\]"),
                      ((out, x, a[:, :12], b[:, :, :12], order, tiles, 3, 16), "power of two >= 16"),
                      ((out, x, a, b, order, tiles, 2, 16), "3 \\* n_tiles"),
                      ((out[:3], x, a, b, order, tiles, 3, 16), "share rows")):
        with pytest.raises(ValueError, match=msg):
            lora.lora_delta(*args)


def _lora_ref(out0, x, a, b, slots):
    ref = out0.double().cpu().clone()
    for r, s in enumerate(slots):
        if s:
            shrunk = (x[r].double().cpu() @ a[s].double().cpu().T).to(a.dtype).double()
            ref[r] += shrunk @ b[s].double().cpu().T
    return ref


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 64, 300])
@pytest.mark.parametrize("d_in,d_out,rp", [(4096, 6144, 64), (14336, 4096, 16), (4096, 28672, 32)])
def test_lora_delta_real_sizes(rows, d_in, d_out, rp):
    """The engine's LoRA deltas at Llama-3.1-8B's projections (q/k/v at rank 16 x 3 padded to 64, down at 16,
    gate / up at 2 x 16) for decode batches of 1 and 64 rows and a 300-row step (64-row tiles), 4 adapters and
    rows without one, as programmatic dependent launches, against float64; rows without an adapter keep their bits."""
    if not torch.cuda.is_available():
        pytest.fail("gpu tests need CUDA")
    from pagoda.engine.lora import block_m

    g = torch.Generator().manual_seed(rows)
    slots = torch.randint(0, 5, (rows,), generator=g).numpy()
    x = torch.randn(rows, d_in, generator=g).bfloat16().cuda()
    a = (torch.randn(5, rp, d_in, generator=g) / d_in ** 0.5).bfloat16().cuda()
    b = (torch.randn(5, d_out, rp, generator=g) / rp ** 0.5).bfloat16().cuda()
    out0 = torch.randn(rows, d_out, generator=g).bfloat16().cuda()
    bm = block_m(rows)
    n = lora.lora_max_tiles(rows, bm, 4)
    order, tiles = (torch.from_numpy(t).cuda() for t in lora.lora_tiles(slots, bm, n))
    out = out0.clone()
    lora.lora_delta(out, x, a, b, order, tiles, n, bm, enable_pdl=True)
    keep = torch.from_numpy(slots == 0).cuda()
    assert torch.equal(out[keep], out0[keep])
    ref, got = _lora_ref(out0, x, a, b, slots), out.double().cpu()
    for s in range(1, 5):
        m = torch.from_numpy(slots == s)
        if m.any():
            err = ((got[m] - ref[m]).norm() / (ref[m] - out0.double().cpu()[m]).norm()).item()
            assert err < 2 * TOL[torch.bfloat16], (s, err)


@pytest.mark.gpu
def test_lora_delta_in_cuda_graph():
    """Captured once with device tables (PDL launches), replayed after the tables change in place: other adapters,
    another grouping of the rows."""
    if not torch.cuda.is_available():
        pytest.fail("gpu tests need CUDA")
    rows, d_in, d_out, rp = 24, 4096, 4096, 16
    x = torch.randn(rows, d_in, device="cuda").bfloat16()
    a = (torch.randn(5, rp, d_in, device="cuda") / d_in ** 0.5).bfloat16()
    b = (torch.randn(5, d_out, rp, device="cuda") / rp ** 0.5).bfloat16()
    out0 = torch.randn(rows, d_out, device="cuda").bfloat16()
    n = lora.lora_max_tiles(rows, 16, 4)
    order = torch.zeros(rows, dtype=torch.int32, device="cuda")
    tiles = torch.full((3 * n,), -1, dtype=torch.int32, device="cuda")
    out = out0.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        lora.lora_delta(out, x, a, b, order, tiles, n, 16, enable_pdl=True)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lora.lora_delta(out, x, a, b, order, tiles, n, 16, enable_pdl=True)
    for seed in (1, 2):
        slots = torch.randint(0, 5, (rows,), generator=torch.Generator().manual_seed(seed)).numpy()
        o, t = lora.lora_tiles(slots, 16, n)
        order.copy_(torch.from_numpy(o))
        tiles.copy_(torch.from_numpy(t))
        out.copy_(out0)
        graph.replay()
        torch.cuda.synchronize()
        ref, got = _lora_ref(out0, x, a, b, slots), out.double().cpu()
        m = torch.from_numpy(slots > 0)
        assert ((got[m] - ref[m]).norm() / (ref[m] - out0.double().cpu()[m]).norm()).item() < 2 * TOL[torch.bfloat16]
        assert torch.equal(out[~m.cuda()], out0[~m.cuda()])
