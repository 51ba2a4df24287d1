"""The attention benchmark's kernel timing (pagoda.bench.attention.kernel_time): the grouping of the profiler's
records on the CPU, the timing itself on the GPU; the decode sweep's CUDA-graph and prefill tables."""
import random

import pytest
import torch

import pagoda
from pagoda.bench import attention as bench


def test_call_spans_groups_records_by_round():
    rng = random.Random(0)
    events, want, t = [], [], 0.0
    for _ in range(7):  # rounds of one flush record and a two-kernel call with a gap between its kernels
        f0 = t + rng.uniform(0.5, 2.0)
        events.append((f0, f0 + 100.0, "reduce_kernel"))
        a = f0 + 100.0 + rng.uniform(1.0, 5.0)
        b = a + rng.uniform(10.0, 40.0)
        gap = rng.uniform(0.5, 2.0)
        e = b + gap + rng.uniform(1.0, 3.0)
        events += [(a, b, "decode"), (b + gap, e, "merge")]
        want.append(e - a)
        t = e
    rng.shuffle(events)
    got = bench._call_spans(events, 1, 2, 7)
    assert got == pytest.approx(want, rel=1e-12)


def test_call_spans_refuses_a_record_count_off_the_pattern():
    events = [(0.0, 1.0, "f"), (2.0, 3.0, "k"), (4.0, 5.0, "f")]
    with pytest.raises(RuntimeError, match="3 for 2 rounds"):
        bench._call_spans(events, 1, 1, 2)
    with pytest.raises(RuntimeError):
        bench._call_spans([], 1, 0, 0)


@pytest.mark.gpu
@pytest.mark.timing
def test_kernel_time_against_event_time():
    """An elementwise kernel over 1 GB: its kernel span and the events' time agree within the replay's launch; a
    tiny one: the kernel span is well under the events' time (which holds the launch)."""
    x = torch.randn(128 << 20, device="cuda")
    y = torch.empty_like(x)
    t = bench.gpu_time(lambda: torch.mul(x, 2.0, out=y))
    k = bench.kernel_time(lambda: torch.mul(x, 2.0, out=y), "mul", calls=10)
    assert k is not None and 0.95 * t < k <= 1.01 * t  # (two medians of separate runs: 1% for their noise)
    x = torch.randn(1024, device="cuda")
    y = torch.empty_like(x)
    t = bench.gpu_time(lambda: torch.mul(x, 2.0, out=y))
    k = bench.kernel_time(lambda: torch.mul(x, 2.0, out=y), "mul")
    assert k is not None and 0 < k < t - 1e-6


@pytest.mark.gpu
@pytest.mark.timing
@pytest.mark.parametrize("kv_bytes", [1 << 30, 1_111_261_184, 400_000_000])
def test_same_bytes_copy_near_the_copy_rate(kv_bytes):
    """same_bytes_copy_us moves a case's bytes at about the 1 GB copy's rate whatever their size: the bench's cases
    of 1.07 and 1.11 GB (537 / 556 MB each way) and one that is no power of two. (A memcpy captured in a graph ran at
    ~2.7 TB/s at such sizes, 0.63x the copy rate: scripts/copy_probe.py, session 34; the kernel 0.98-0.99x.)"""
    bw = bench.copy_bandwidth()
    t = bench.same_bytes_copy_us(kv_bytes) * 1e-6
    assert 0.9 * bw < kv_bytes / t < 1.1 * bw, (kv_bytes / t / 1e9, bw / 1e9)


@pytest.mark.gpu
@pytest.mark.timing
def test_in_graph_time_between_kernel_and_replay_time():
    """in_graph_time: an elementwise kernel over 1 GB costs its kernel time inside a larger graph (within the gap to
    the kernel before it and the medians' noise); a tiny one costs more than nothing and less than its own
    single-kernel replay, whose launch the larger graph pays once."""
    x = torch.randn(128 << 20, device="cuda")
    y = torch.empty_like(x)
    k = bench.kernel_time(lambda: torch.mul(x, 2.0, out=y), "mul", calls=10)
    i = bench.in_graph_time(lambda: torch.mul(x, 2.0, out=y), "mul", n=8, reps=7)
    assert k is not None and i is not None and 0.98 * k < i < 1.03 * k + 2e-6, (k, i)
    x = torch.randn(1024, device="cuda")
    y = torch.empty_like(x)
    t = bench.gpu_time(lambda: torch.mul(x, 2.0, out=y))
    i = bench.in_graph_time(lambda: torch.mul(x, 2.0, out=y), "mul")
    assert 0 < i < t - 1e-6, (i, t)


@pytest.mark.gpu
@pytest.mark.timing
def test_step_time_overlaps_a_pdl_launch():
    """step_time: pagoda's 1 x 32768 decode launched as the engine launches it (enable_pdl, pdl_early_kv) costs less
    behind the step's short kernel than the same decode without PDL inside a larger graph (its launch, prologue and
    first KV blocks overlap the kernel in front: 36.4-36.6 against 37.4-37.9 us on the H200, session 33), and not
    less than 0.9x its kernel's own time."""
    s = bench.PagedSetup([32768], 8, 128, 16, torch.bfloat16)
    q = torch.randn(1, 32, 128, dtype=torch.bfloat16, device="cuda")
    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"))
    w.plan(s.indptr, s.indices, s.last, 32, 8, 128, 16, q_data_type=torch.bfloat16)
    out = w.run(q, s.cache)
    k = bench.kernel_time(lambda: w.run(q, s.cache, out=out), "decode")
    i = bench.in_graph_time(lambda: w.run(q, s.cache, out=out), "decode")
    st = bench.step_time(lambda: w.run(q, s.cache, out=out, enable_pdl=True, pdl_early_kv=True), "decode")
    assert k is not None and i is not None and st is not None and 0.9 * k < st < i, (k, i, st)


def test_kernel_table_shows_in_graph_costs():
    """--kernel-times' table: pagoda's cost inside a larger graph and in a step's PDL chain, each with its rate and
    share of the copy bandwidth, FlashInfer's beside it as a time ratio; a row without them prints dashes."""
    rows = [{"case": "1x32768", "kind": "decode", "kv_MB": 134.2, "pagoda_us": 40.0, "pagoda_kernel_us": 36.3,
             "flashinfer_kernel_us": 55.0, "copy_same_bytes_us": 34.0, "pagoda_in_graph_us": 37.3,
             "flashinfer_in_graph_us": 56.1, "pagoda_step_us": 36.5, "flashinfer_step_us": 55.8},
            {"case": "64x2048", "kind": "decode", "kv_MB": 536.9, "pagoda_us": 127.0, "pagoda_kernel_us": 123.5,
             "copy_same_bytes_us": 127.5, "pagoda_step_us": 123.0}]
    lines = bench.fmt_kernel_table(rows, 4257e9).splitlines()
    assert "in-graph" in lines[0] and "in a step" in lines[0]
    first = lines[1].split()
    # 134.2 MB in 37.3 us = 3598 GB/s = 84.5% of 4257 GB/s; FlashInfer 56.1 / 37.3 = 1.50x; in a step 36.5 us =
    # 3677 GB/s = 86.4%, FlashInfer 55.8 / 36.5 = 1.53x
    assert first[-12:] == ["37.3u", "3598", "GB/s", "84.5%", "56.1u", "1.50x",
                           "36.5u", "3677", "GB/s", "86.4%", "55.8u", "1.53x"], first
    second = lines[2].split()
    assert second[-9:-6] == ["-", "-", "-"] and second[-6:] == ["123.0u", "4365", "GB/s", "102.5%", "-", "-"], second


def test_graph_table_names_flashinfer_path():
    """The decode sweep's CUDA-graph rows say which FlashInfer decode path was the faster one (and a row without
    FlashInfer prints no path), with the time ratio FlashInfer / pagoda."""
    from pagoda.bench.decode_sweep import fmt_graph

    rows = [{"batch": 16, "pagoda_us": 27.1, "pagoda_plan_us": 78.0, "flashinfer_us": 36.0,
             "flashinfer_plan_us": 68.0, "flashinfer_tensor_cores": False},
            {"batch": 2, "pagoda_us": 12.1, "pagoda_plan_us": 102.0, "flashinfer_us": 23.4,
             "flashinfer_plan_us": 156.0, "flashinfer_tensor_cores": True},
            {"batch": 4, "pagoda_us": 14.8, "pagoda_plan_us": 113.0}]
    head, *lines = fmt_graph(rows).splitlines()
    assert head.split()[-2:] == ["FI", "path"]
    assert lines[0].split() == ["16", "27.1", "36.0", "1.33x", "78", "68", "cuda"]
    assert lines[1].split() == ["2", "12.1", "23.4", "1.93x", "102", "156", "tensor"]
    assert lines[2].split()[0] == "4" and lines[2].split()[-1] == "-"


def test_prefill_variant_table_and_parts():
    """The sweep's prefill rows: time, TFLOP/s and the time ratios FlashInfer / pagoda and SDPA / pagoda (a row
    without a peer prints nan); an unknown --parts name is refused before any GPU work."""
    from pagoda.bench import decode_sweep

    rows = [{"variant": "head_dim 256", "case": "1x8192", "tflop": 1.1, "pagoda_us": 2267.0, "flashinfer_us": 2424.4,
             "sdpa_us": 1766.6},
            {"variant": "fp16", "case": "8x1024", "tflop": 0.0687, "pagoda_us": 206.6}]
    head, *lines = decode_sweep.fmt_prefill(rows).splitlines()
    assert head.split()[-4:] == ["SDPA", "us", "x", "SDPA"]
    assert lines[0].split() == ["head_dim", "256", "1x8192", "2267.0", "485", "2424.4", "1.07x", "1766.6", "0.78x"]
    assert lines[1].split()[2:4] == ["206.6", "333"] and lines[1].split()[-1] == "nanx"
    with pytest.raises(SystemExit):
        decode_sweep.main(["--parts", "prefil"])


def test_sink_table_and_shapes():
    """The sinks part's rows: decode as KV GB/s, prefill as TF/s, FlashInfer's time ratio and both errors (a row
    without FlashInfer prints nan); an unknown --sink-shapes label is refused before any GPU work."""
    from pagoda.bench import decode_sweep

    rows = [{"shape": "gpt-oss", "case": "64x2048", "kind": "decode", "kv_MB": 268.4, "tflop": 0.0, "pagoda_us": 67.1,
             "pagoda_nosink_us": 66.5, "flashinfer_us": 938.8, "pagoda_err": 2.0e-3, "flashinfer_err": 3.1e-3,
             "sink_share": 0.11},
            {"shape": "base", "case": "8x1024", "kind": "prefill", "kv_MB": 0.0, "tflop": 0.0687, "pagoda_us": 221.2,
             "pagoda_nosink_us": 204.5, "pagoda_err": 2.3e-3, "sink_share": 0.25}]
    head, *lines = decode_sweep.fmt_sinks(rows).splitlines()
    assert head.split()[:3] == ["shape", "case", "pagoda"]
    assert lines[0].split() == ["gpt-oss", "64x2048", "67.1", "4000", "GB/s", "66.5", "938.8", "13.99x", "2.0e-03",
                                "3.1e-03", "0.11"]
    assert lines[1].split()[2:6] == ["221.2", "311", "TF/s", "204.5"] and lines[1].split()[-2] == "nan"
    with pytest.raises(SystemExit):
        decode_sweep.main(["--parts", "sinks", "--sink-shapes", "gpt-os"])


def test_variant_rows_label_each_case(monkeypatch):
    """The decode and prefill variant rows: each case of each chosen variant, in order, labelled with the variant's
    heads, head_dim, page size, dtype and plan() arguments (window, soft cap: passed to the row), the row saved
    after each; by default the first DEFAULT_VARIANTS (the rows themselves stood in for: no GPU)."""
    from pagoda.bench import decode_sweep

    monkeypatch.setattr(decode_sweep, "decode_row", lambda name, lens, hq, hk, d, ps, dt, fi, ws, **kw: dict(
        case=name, kind="decode", pagoda_us=10.0, kv_MB=1.0, got=kw))
    monkeypatch.setattr(decode_sweep, "prefill_row", lambda name, qo, kv, hq, hk, d, ps, dt, fi, ws, flex, **kw: dict(
        case=name, kind="prefill", pagoda_us=10.0, tflop=1e-6, got=kw))
    saved = []
    chosen = ["head_dim 256", "fp16", "gemma-2 local"]
    for rows_of, cases in ((decode_sweep.variant_rows, decode_sweep.DECODE_CASES),
                           (decode_sweep.prefill_variant_rows, decode_sweep.PREFILL_CASES)):
        rows = rows_of(None, None, lambda r: saved.append(len(r)), chosen)
        assert [(r["variant"], r["case"]) for r in rows] == [(v, c[0]) for v in chosen for c in cases]
        assert [(r["heads"], r["head_dim"], r["page_size"], r["dtype"]) for r in rows[::len(cases)]] == [
            ("32/8", 256, 16, "bfloat16"), ("32/8", 128, 16, "float16"), ("16/8", 256, 16, "bfloat16")]
        gemma = {"window_left": 4095, "logits_soft_cap": 50.0}
        assert [r["got"] for r in rows[::len(cases)]] == [{}, {}, gemma]
        assert all(rows[-1][k] == v for k, v in gemma.items())
        rows = rows_of(None, None, lambda r: None, None)
        assert [r["variant"] for r in rows[::len(cases)]] == [v[0] for v in decode_sweep.VARIANTS[:7]]
        assert decode_sweep.DEFAULT_VARIANTS == 7
    assert saved == [1, 2, 3, 4, 5, 6] * 2


def test_causal_flops_count_the_window():
    """bench.attention.causal_flops: 4 * heads * head_dim per visible (query, key) pair of causal attention
    (bottom-right aligned), a window keeping the last window_left + 1 keys of each query."""
    assert bench.causal_flops([3], [3], 1, 1) == 4 * (1 + 2 + 3)
    assert bench.causal_flops([2], [5], 2, 8) == 4 * 2 * 8 * (4 + 5)
    assert bench.causal_flops([3], [5], 1, 1, window_left=1) == 4 * (2 + 2 + 2)
    assert bench.causal_flops([4], [4], 1, 1, window_left=0) == 4 * 4
    assert bench.causal_flops([1, 2], [1, 2], 1, 1, window_left=100) == bench.causal_flops([1, 2], [1, 2], 1, 1)


def test_host_times_counts_warmup_and_timed_calls():
    """host_times_us: fn runs warmup + n times, n of them timed (us, each at least the call's own sleep)."""
    import time

    calls = []
    t = bench.host_times_us(lambda: (calls.append(1), time.sleep(1e-3)), 4, warmup=2)
    assert len(calls) == 6 and t.shape == (4,) and (t >= 1000.0).all()
