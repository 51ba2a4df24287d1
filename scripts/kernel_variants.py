"""Time source-level variants of the attention kernel on the device (an experiment log).

    python scripts/kernel_variants.py

Written against the kernel text of notes.md v2-v3: the edits no longer match the current
kernel; the script stays as the record of those measurements. Each variant rewrites
kernels/attention.py's text, loads it as a module and swaps it into the runner, so the
wrappers, plans and checks stay the same. Results go to benchmarks/results/notes.md by hand.
"""
import importlib.util
import pathlib
import sys
import tempfile

import torch

import pagoda
from pagoda.attention import runner
from pagoda.bench.attention import PagedSetup, bench

SRC = (pathlib.Path(pagoda.__file__).parent / "attention/kernels/attention.py").read_text()

VARIANTS = {
    "base": [],
    "fma-scale": [
        ("""    if SOFTCAP:
        s = soft_cap_log2 * _tanh(s * qk_scale)
    else:
        s = s * qk_scale
""", """    if SOFTCAP:
        s = soft_cap_log2 * _tanh(s * qk_scale)
"""),
        ("""    m_new = tl.maximum(m_i, tl.max(s, 1))""", """    if SOFTCAP:
        m_new = tl.maximum(m_i, tl.max(s, 1))
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)"""),
        ("""    p = tl.exp2(s - m_new[:, None])""", """    if SOFTCAP:
        p = tl.exp2(s - m_new[:, None])
    else:
        p = tl.exp2(s * qk_scale - m_new[:, None])"""),
    ],
    "k-rows+trans": [
        ("k_ptrs = K + k_head_off + k_off[None, :] + offs_d[:, None]", "k_ptrs = K + k_head_off + k_off[:, None] + offs_d[None, :]"),
        ("k = tl.load(k_ptrs, mask=n_valid[None, :], other=0.0)", "k = tl.load(k_ptrs, mask=n_valid[:, None], other=0.0)"),
        ("s = tl.dot(q, k)", "s = tl.dot(q, tl.trans(k))"),
    ],
    "page16-const-div": [
        ("page = tl.load(KV_INDICES + kv_base + offs_n // page_size)", "page = tl.load(KV_INDICES + kv_base + offs_n // 16)"),
        ("page = tl.load(KV_INDICES + kv_base + offs_n // page_size, mask=n_valid, other=0)",
         "page = tl.load(KV_INDICES + kv_base + offs_n // 16, mask=n_valid, other=0)"),
        ("slot = offs_n % page_size", "slot = offs_n % 16"),
    ],
    "one-program-per-task": [
        ("""    task = tl.atomic_add(COUNTERS, 1)
    while task < num_tasks:""", """    task = tl.program_id(0)
    if task < num_tasks:"""),
        ("""        task = tl.atomic_add(COUNTERS, 1)

""", "\n"),
    ],
}


def load_variant(name, edits):
    src = SRC
    for old, new in edits:
        assert src.count(old) == 1, (name, old)
        src = src.replace(old, new)
    path = pathlib.Path(tempfile.mkdtemp()) / f"attention_{name.replace('-', '_').replace('+', '_')}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = mod
    spec.loader.exec_module(mod)
    return mod.attention_kernel


def extra(ws, setups, hq, hk, d, ps, dt):
    """Configurations and formats on the base kernel: ragged KV, no GQA packing, other tiles."""
    from pagoda.attention.plan import KernelConfig

    runner.attention_kernel = load_variant("base2", [])
    s = setups["pre 1x8192"]
    q = torch.randn(8192, hq, d, dtype=dt, device="cuda")
    k = torch.randn(8192, hk, d, dtype=dt, device="cuda")
    v = torch.randn_like(k)
    w = pagoda.BatchPrefillWithRaggedKVCacheWrapper(ws)
    w.plan([0, 8192], [0, 8192], hq, hk, d, causal=True, q_data_type=dt)
    out = w.run(q, k, v)
    print(f"ragged 1x8192 (no page indirection): {bench(lambda: w.run(q, k, v, out=out), rep_ms=100) * 1e6:.1f}us")
    orig = runner.select_config
    for label, cfg in [("no GQA packing 128x64 w8 s3", KernelConfig(128, 64, 8, 3, 1, 1, 512)),
                       ("packed 128x64 w4 s3 ctas2", KernelConfig(128, 64, 4, 3, 2, 4, 512)),
                       ("packed 128x128 w8 s3", KernelConfig(128, 128, 8, 3, 1, 4, 512)),
                       ("packed 64x64 w4 s3 ctas2", KernelConfig(64, 64, 4, 3, 2, 4, 512))]:
        runner.select_config = lambda mode, hd, g, cuda, cfg=cfg: cfg
        qo = torch.tensor([0, 8192], dtype=torch.int32)
        w = pagoda.BatchPrefillWithPagedKVCacheWrapper(ws)
        w.plan(qo, s.indptr, s.indices, s.last, hq, hk, d, ps, causal=True, q_data_type=dt)
        out = w.run(q, s.cache)
        print(f"paged 1x8192 {label}: {bench(lambda: w.run(q, s.cache, out=out), rep_ms=100) * 1e6:.1f}us", flush=True)
    runner.select_config = orig


def main():
    hq, hk, d, ps, dt = 32, 8, 128, 16, torch.bfloat16
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    cases = {
        "pre 1x8192": ("prefill", [8192], [8192]), "pre 8x1024": ("prefill", [1024] * 8, [1024] * 8),
        "dec 64x2048": ("decode", None, [2048] * 64), "dec 256x512": ("decode", None, [512] * 256),
    }
    setups = {n: PagedSetup(kv, hk, d, ps, dt) for n, (_, _, kv) in cases.items()}
    orig_programs = runner.num_programs
    base_outs = {}
    print(f"{'variant':<22}" + "".join(f"{n:>13}" for n in cases))
    for name, edits in VARIANTS.items():
        runner.attention_kernel = load_variant(name, edits)
        row = []
        for cname, (mode, qo_lens, kv_lens) in cases.items():
            s = setups[cname]
            if name == "one-program-per-task":
                runner.num_programs = lambda dev, cfg: 1 << 15
            else:
                runner.num_programs = orig_programs
            if mode == "decode":
                w = pagoda.BatchDecodeWithPagedKVCacheWrapper(ws)
                w.plan(s.indptr, s.indices, s.last, hq, hk, d, ps, q_data_type=dt)
                q = torch.randn(len(kv_lens), hq, d, dtype=dt, device="cuda")
            else:
                qo = torch.tensor([0] + torch.tensor(qo_lens).cumsum(0).tolist(), dtype=torch.int32)
                w = pagoda.BatchPrefillWithPagedKVCacheWrapper(ws)
                w.plan(qo, s.indptr, s.indices, s.last, hq, hk, d, ps, causal=True, q_data_type=dt)
                q = torch.randn(int(qo[-1]), hq, d, dtype=dt, device="cuda")
            torch.manual_seed(0)  # the same q for every variant: outputs are compared with the base kernel's
            q = torch.randn_like(q)
            ref = w.run(q, s.cache).float()
            out = w.run(q, s.cache)
            t = bench(lambda: w.run(q, s.cache, out=out), rep_ms=100) * 1e6
            if name == "base":
                base_outs[cname] = ref
            else:
                err = ((ref - base_outs[cname]).norm() / base_outs[cname].norm()).item()
                assert err < 1e-2, f"variant {name} on {cname}: output differs from the base kernel's ({err:.3g})"
            row.append(t)
        print(f"{name:<22}" + "".join(f"{t:12.1f}u" for t in row), flush=True)
    runner.num_programs = orig_programs
    extra(ws, setups, hq, hk, d, ps, dt)


if __name__ == "__main__":
    main()
