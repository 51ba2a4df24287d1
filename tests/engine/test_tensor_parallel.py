"""Tensor parallelism (engine/parallel.py) on the CPU: gloo between rank 0 (this process) and worker processes.
A sharded engine must give the one-process engine's tokens and log-probabilities, every worker must sample the
same tokens as rank 0 (the probe), and bad input must fail on rank 0 with a ValueError and leave it serving."""
import json
import pickle
import re

import pytest
import torch

import pagoda
from pagoda.engine import ModelConfig
from pagoda.engine.loader import DEMO_MODEL
from pagoda.engine.parallel import (WorkerGone, check_tp_size, local_config, rank_device, shard_tensor,
                                    vocab_shard, vocab_shard_rows)

from .test_lora import PROMPTS as LORA_PROMPTS, adapters  # noqa: F401 (a fixture)
from .test_lora import greedy as lora_greedy
from .test_models import check_like_hf, make_llm

PROMPTS = ["def fib(n):", "import os\nimport sys\n", "class Foo:\n    def __init__(self", "for i in range("]


@pytest.fixture(autouse=True)
def _torch_ops(monkeypatch):
    """The ops' PyTorch forms in these tests, here and in the workers (which inherit the environment): what they
    test is the sharding and the ranks' lockstep, the same for either form, and Triton's interpreter would make
    each engine here minutes slower (the kernels run in it in the other tests). The workers record what finished
    (PAGODA_TP_RECORD) for the probe."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("PAGODA_TP_RECORD", "1")  # (the workers keep what finished for _workers_agree's probe)


def _config(**over):
    c = json.load(open(f"{DEMO_MODEL}/config.json"))
    c.update(over)
    return ModelConfig.from_dict(c)


def _same_tokens_and_logprobs(ref, got, tol=1e-4):
    for a, b in zip(ref, got, strict=True):
        assert (a.prompt_logprobs is None) == (b.prompt_logprobs is None)
        for pa, pb in zip(a.prompt_logprobs or (), b.prompt_logprobs or (), strict=True):
            assert (pa is None) == (pb is None) and (pa is None or (
                pa.keys() == pb.keys() and max(abs(pa[t] - pb[t]) for t in pa) < tol))
        for x, y in zip(a.outputs, b.outputs, strict=True):
            assert x.token_ids == y.token_ids
            if x.logprobs is not None:
                for lx, ly in zip(x.logprobs, y.logprobs, strict=True):
                    assert lx.keys() == ly.keys()
                    assert max(abs(lx[t] - ly[t]) for t in lx) < tol


def _workers_agree(llm, outs):
    """Every worker finished the same requests with the same tokens as rank 0 (probe: what each worker's engine
    returned since the last probe)."""
    probes = llm.engine._workers.request("probe")
    want = {o.request_id: [c.token_ids for c in o.outputs] for o in outs}
    for p in probes:
        assert p == want


def test_shards_reassemble_the_checkpoint():
    """Each rank's shard of every projection: q / o by query heads, k / v by KV heads (replicated where tp exceeds
    them), gate / up / down by MLP columns, lm_head by vocabulary rows padded with zeros; concatenated over the
    ranks they are the whole tensor."""
    c = _config(vocab_size=4099)
    d, hq, hk, inter, hid = c.head_dim, c.num_heads, c.num_kv_heads, c.intermediate_size, c.hidden_size
    g = torch.Generator().manual_seed(0)
    full = {"q": torch.randn(hq * d, hid, generator=g), "k": torch.randn(hk * d, hid, generator=g),
            "o": torch.randn(hid, hq * d, generator=g), "up": torch.randn(inter, hid, generator=g),
            "down": torch.randn(hid, inter, generator=g), "lm": torch.randn(c.vocab_size, hid, generator=g)}
    names = {"q": "model.layers.3.self_attn.q_proj.weight", "k": "model.layers.3.self_attn.k_proj.weight",
             "o": "model.layers.3.self_attn.o_proj.weight", "up": "model.layers.3.mlp.up_proj.weight",
             "down": "model.layers.3.mlp.down_proj.weight", "lm": "lm_head.weight"}
    for tp in (2, 4):
        parts = {k: [shard_tensor(names[k], w, c, r, tp) for r in range(tp)] for k, w in full.items()}
        assert torch.equal(torch.cat(parts["q"]), full["q"])
        assert torch.equal(torch.cat(parts["o"], dim=1), full["o"])
        assert torch.equal(torch.cat(parts["up"]), full["up"])
        assert torch.equal(torch.cat(parts["down"], dim=1), full["down"])
        rows = vocab_shard_rows(c.vocab_size, tp)
        assert all(p.shape[0] == rows for p in parts["lm"])
        lm = torch.cat(parts["lm"])
        assert torch.equal(lm[:c.vocab_size], full["lm"]) and not lm[c.vocab_size:].any()
        if tp == 2:  # 2 KV heads over 2 ranks: one each
            assert torch.equal(torch.cat(parts["k"]), full["k"])
        else:  # over 4 ranks: ranks 0, 1 hold KV head 0 and ranks 2, 3 head 1
            for r in range(4):
                assert torch.equal(parts["k"][r], full["k"][(r // 2) * d:(r // 2 + 1) * d])
        lc = local_config(c, tp)
        assert (lc.num_heads, lc.num_kv_heads, lc.intermediate_size) == (hq // tp, max(1, hk // tp), inter // tp)
        assert (lc.hidden_size, lc.vocab_size) == (hid, c.vocab_size)
    norm = full["q"][0]
    assert shard_tensor("model.norm.weight", norm, c, 1, 2) is norm  # (norms: whole on every rank)
    assert torch.equal(vocab_shard(full["lm"], c.vocab_size, 1, 2), shard_tensor(names["lm"], full["lm"], c, 1, 2))


def test_tensor_parallel_size_checks(monkeypatch):
    c = _config()  # 4 heads, 2 KV heads, intermediate 768
    for bad in (0, -1, 1.5, "2", True, 3, 8):
        with pytest.raises(ValueError, match="tensor_parallel_size"):
            check_tp_size(bad, c)
    with pytest.raises(ValueError, match="KV heads"):
        check_tp_size(2, _config(num_key_value_heads=3, num_attention_heads=6))
    with pytest.raises(ValueError, match="intermediate_size"):
        check_tp_size(4, _config(intermediate_size=770))
    assert check_tp_size(4, c) == 4
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        pagoda.LLM(tensor_parallel_size=3)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # (a host with one GPU)
    monkeypatch.delenv("PAGODA_TP_BACKEND", raising=False)
    with pytest.raises(ValueError, match="needs 2 GPUs"):
        rank_device(torch.device("cuda"), 0, 2)
    assert rank_device(torch.device("cpu"), 1, 2) == torch.device("cpu")


@pytest.mark.parametrize("tp", [2, 4])
def test_bundled_model_matches_one_process(tp):
    """The bundled model (4 heads, 2 KV heads, tied embeddings) over 2 ranks (a KV head each) and 4 (each KV head
    on two ranks): greedy tokens as one process's, log-probabilities within 1e-4, in a batch and alone (the
    one-token path); seeded sampled completions (n=2) in the same batch: every worker sampled what rank 0 did
    (they are not compared with one process's: a seeded draw lands on another token where ~1e-7 changes of the
    probabilities move a boundary of the cumulative distribution past it, and summing the heads in another order
    makes such changes)."""
    greedy = pagoda.SamplingParams(max_tokens=20, temperature=0, logprobs=3, ignore_eos=True)
    sampled = pagoda.SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, n=2, seed=7, logprobs=1,
                                    ignore_eos=True)
    params = [greedy, greedy, sampled, greedy]
    one = pagoda.LLM(None, num_kv_pages=256)
    ref = one.generate(PROMPTS, params, use_tqdm=False)
    alone = one.generate(PROMPTS[:1], greedy, use_tqdm=False)  # (batch 1: the one-token path)
    llm = pagoda.LLM(None, num_kv_pages=256, tensor_parallel_size=tp)
    try:
        assert llm.engine.model.config.num_heads == 4 // tp and llm.engine.model.config.num_kv_heads == max(1, 2 // tp)
        assert llm.engine.model.lm_head.weight.shape[0] == 4096 // tp  # (the vocabulary's rows, as the embeddings')
        assert llm.engine.model.embed_tokens.weight.shape[0] == 4096 // tp
        got = llm.generate(PROMPTS, params, use_tqdm=False)
        _same_tokens_and_logprobs([ref[i] for i in (0, 1, 3)], [got[i] for i in (0, 1, 3)])
        _workers_agree(llm, got)
        assert len({tuple(c.token_ids) for c in got[2].outputs}) == 2  # (the two samples differ)
        got1 = llm.generate(PROMPTS[:1], greedy, use_tqdm=False)
        _same_tokens_and_logprobs(alone, got1)
        _workers_agree(llm, got1)
    finally:
        llm.shutdown()


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama", "gemma2", "gemma3"])
def test_families_match_one_process(tiny_models, family):
    """q / k / v biases (Qwen2), per-head q / k norms (Qwen3), an untied lm_head with Llama 3.1 RoPE (llama), layers
    of two windows with soft caps and a scaled embedding (Gemma 2), (1 + w) q / k norms and a RoPE base a window
    (Gemma 3) over 2 ranks: the one-process engine's tokens, log-probabilities and prompt log-probabilities (the prompt rows' logits
    gathered too), with penalties and a logit bias (host-side, alike on every rank)."""
    path, _ = tiny_models[family]
    sp = pagoda.SamplingParams(max_tokens=12, temperature=0, logprobs=2, ignore_eos=True, prompt_logprobs=2,
                               repetition_penalty=1.3, presence_penalty=0.5, logit_bias={7: 3.0})
    prompts = [[5, 9, 33, 2, 17, 100], [44, 3, 8], [7] * 20]
    kw = dict(skip_tokenizer_init=True, num_kv_pages=128)
    ref = pagoda.LLM(str(path), **kw).generate(prompts, sp, use_tqdm=False)
    llm = pagoda.LLM(str(path), tensor_parallel_size=2, **kw)
    try:
        got = llm.generate(prompts, sp, use_tqdm=False)
        assert all(len(o.prompt_logprobs) == len(p) and o.prompt_logprobs[1] for o, p in zip(got, prompts))
        _same_tokens_and_logprobs(ref, got)
        _workers_agree(llm, got)
    finally:
        llm.shutdown()


def test_padded_vocabulary(tmp_path):
    """A vocabulary that does not divide by tp (323 over 2 ranks: 162 rows each, one of them padding): the gathered
    logits are the vocabulary's, the padding's cut off."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=323, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False, torch_dtype="float32")
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(3)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path, safe_serialization=True)
    sp = pagoda.SamplingParams(max_tokens=8, temperature=0, logprobs=5, ignore_eos=True)
    prompts = [[5, 9, 322, 2], [300, 301]]
    kw = dict(skip_tokenizer_init=True, num_kv_pages=64)
    ref = pagoda.LLM(str(tmp_path), **kw).generate(prompts, sp, use_tqdm=False)
    llm = pagoda.LLM(str(tmp_path), tensor_parallel_size=2, **kw)
    try:
        assert llm.engine.model.lm_head.weight.shape[0] == 162 == llm.engine.model.embed_tokens.weight.shape[0]
        got = llm.generate(prompts, sp, use_tqdm=False)
        _same_tokens_and_logprobs(ref, got)
    finally:
        llm.shutdown()


def test_chunked_prefill_preemption_and_prefix_cache():
    """A pool too small for all requests (preemption and recompute), prompts longer than the token budget (chunked
    prefill) and a shared prefix (prefix-cache hits): rank 0 and the workers schedule alike, and the tokens are
    the one-process engine's under the same limits."""
    prefix = "def helper(a, b):\n    return a + b\n\n" * 6
    prompts = [prefix + p for p in PROMPTS] + ["x = 1\n" * 30]
    sp = pagoda.SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    kw = dict(num_kv_pages=20, max_num_batched_tokens=64, max_num_seqs=5)
    one = pagoda.LLM(None, **kw)
    ref = one.generate(prompts, sp, use_tqdm=False)
    llm = pagoda.LLM(None, tensor_parallel_size=2, **kw)
    try:
        got = llm.generate(prompts, sp, use_tqdm=False)
        _same_tokens_and_logprobs(ref, got)
        _workers_agree(llm, got)
        st, st1 = llm.engine.stats, one.engine.stats
        assert st.preemptions == st1.preemptions > 0 and st.prefix_hit_tokens == st1.prefix_hit_tokens > 0
    finally:
        llm.shutdown()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_lora_over_ranks_matches_peft(tiny_models, adapters, family, tmp_path):
    """Multi-LoRA over 2 ranks (q / k / v and gate / up B's split by rows, o and down A's by columns): requests of
    two adapters and of none, through one device slot (the ranks swap adapters alike), each completion's greedy
    tokens and log-probabilities those of transformers on PEFT's merged model; the adapter folders are gone right
    after the requests are added (every rank read them by then), and the workers finished alike."""
    import shutil

    path, hf = tiny_models[family]
    (ra, hfa), (rb, hfb) = adapters[family][1], adapters[family][2]
    a = pagoda.LoRARequest("a", 1, str(shutil.copytree(ra.lora_path, tmp_path / "a")))
    b = pagoda.LoRARequest("b", 2, str(shutil.copytree(rb.lora_path, tmp_path / "b")))
    llm = make_llm(path, enable_lora=True, max_loras=1, max_lora_rank=8, tensor_parallel_size=2)
    eng = llm.engine
    try:
        loras, refs = [a, b, None, a], [hfa, hfb, hf, hfa]
        ids = [eng.add_request(p, lora_greedy(), lora_request=lr) for p, lr in zip(LORA_PROMPTS, loras)]
        shutil.rmtree(tmp_path / "a")
        shutil.rmtree(tmp_path / "b")
        outs = {}
        while eng.has_unfinished():
            outs.update({o.request_id: o for o in eng.step() if o.finished})
        for rid, p, ref in zip(ids, LORA_PROMPTS, refs):
            check_like_hf(ref, p, outs[rid].outputs[0], 8)
        _workers_agree(llm, list(outs.values()))
        assert eng.lora.loads >= 2 and len(eng.lora.slot_ids) == 2  # (a then b through the one slot)
    finally:
        llm.shutdown()


def test_fp8_kv_cache_over_ranks():
    """An fp8 KV cache (bf16 model) over 2 ranks: each rank's cache holds its KV head in e4m3; the greedy tokens are
    the one-process fp8 engine's and the log-probabilities as close as a 16-bit cache's are over ranks (bf16: the
    ranks' partial sums are rounded before the all-reduce adds them; 0.06-0.09 on the CPU)."""
    sp = pagoda.SamplingParams(max_tokens=12, temperature=0, logprobs=2, ignore_eos=True)
    dev = {}
    for kv in ("auto", "fp8"):
        kw = dict(num_kv_pages=128, dtype="bfloat16", kv_cache_dtype=kv)
        ref = pagoda.LLM(None, **kw).generate(PROMPTS[:3], sp, use_tqdm=False)
        llm = pagoda.LLM(None, tensor_parallel_size=2, **kw)
        try:
            cache = llm.engine.runner.kv_caches[0]
            assert cache.shape[3] == 1 and cache.dtype == (torch.float8_e4m3fn if kv == "fp8" else torch.bfloat16)
            got = llm.generate(PROMPTS[:3], sp, use_tqdm=False)
            _workers_agree(llm, got)
        finally:
            llm.shutdown()
        for a, b in zip(ref, got):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
        dev[kv] = max(abs(x[t] - y[t]) for a, b in zip(ref, got)
                      for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs) for t in x if t in y)
    assert dev["fp8"] < 2 * dev["auto"] + 0.02, dev


def test_checkpoint_kv_scales_over_ranks(tmp_path):
    """A checkpoint's per-layer KV-cache scales over 2 ranks (each loads them and quantizes its KV head with them):
    the greedy tokens are the one-process engine's with the same scales, and every rank's pages hold K / k_scale
    (rank 0's first layer against the one-process engine's own first-layer pages of its KV head)."""
    from .test_kv_fp8 import SCALES, _checkpoint, _scale_tensors

    path = _checkpoint(tmp_path, _scale_tensors(SCALES))
    sp = pagoda.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    kw = dict(num_kv_pages=128, dtype="bfloat16", kv_cache_dtype="fp8")
    one = pagoda.LLM(path, **kw)
    ref = one.generate(PROMPTS[:3], sp, use_tqdm=False)
    llm = pagoda.LLM(path, tensor_parallel_size=2, **kw)
    try:
        assert llm.engine.runner.layer_kv_scales == one.engine.runner.layer_kv_scales
        got = llm.generate(PROMPTS[:3], sp, use_tqdm=False)
        _workers_agree(llm, got)
        mine, full = llm.engine.runner.kv_caches[0].float(), one.engine.runner.kv_caches[0].float()
        assert torch.equal(mine[:, :, :, 0], full[:, :, :, 0])  # (rank 0: KV head 0, the same pages)
    finally:
        llm.shutdown()
    for a, b in zip(ref, got):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_guided_decoding_over_ranks():
    """Guided decoding over 2 ranks: every rank compiles the grammar and masks its logits alike, so the sampled
    completions (n=2, seeded) are in the language and every worker sampled what rank 0 did."""
    pytest.importorskip("xgrammar")
    llm = pagoda.LLM(None, num_kv_pages=128, tensor_parallel_size=2)
    try:
        sps = [pagoda.SamplingParams(max_tokens=12, temperature=0.9, n=2, seed=s, guided_decoding=g)
               for s, g in ((1, pagoda.GuidedDecodingParams(choice=["north", "south", "east"])),
                            (2, pagoda.GuidedDecodingParams(regex="[0-9]{2}-[a-c]{3}")))]
        got = llm.generate(["Go", "Code"], sps, use_tqdm=False)
        assert all(c.text in ("north", "south", "east") for c in got[0].outputs), got[0]
        assert all(re.fullmatch("[0-9]{2}-[a-c]{3}", c.text) for c in got[1].outputs), got[1]
        _workers_agree(llm, got)
    finally:
        llm.shutdown()


def test_a_killed_worker_is_an_error_not_a_hang():
    """A worker killed between steps (or during one: gloo's collective fails on the closed connection) is a
    RuntimeError naming its rank at rank 0's next call, within seconds; shutdown still returns."""
    import signal
    import time

    llm = pagoda.LLM(None, num_kv_pages=64, tensor_parallel_size=2)
    try:
        assert llm.generate(["x"], pagoda.SamplingParams(max_tokens=2), use_tqdm=False)[0].finished
        llm.engine._workers.procs[0].send_signal(signal.SIGKILL)
        llm.engine._workers.procs[0].wait(10)
        t0 = time.monotonic()
        with pytest.raises(WorkerGone, match="rank 1"):
            llm.generate(["def f(x):"], pagoda.SamplingParams(max_tokens=8), use_tqdm=False)
        assert time.monotonic() - t0 < 30
    finally:
        llm.shutdown()


def _favour_token_3(output_ids, logits):  # (a picklable logits processor: module level)
    logits[3] += 1000.0
    return logits


def test_bad_input_abort_and_a_failed_worker():
    """Bad requests fail on rank 0 (ValueError) and reach no worker; an aborted request is aborted everywhere; the
    engine keeps serving; a worker that fails is reported on rank 0 as a RuntimeError, not a hang."""
    llm = pagoda.LLM(None, num_kv_pages=256, tensor_parallel_size=2)
    eng = llm.engine
    try:
        with pytest.raises(ValueError, match="prompt token ids"):
            eng.add_request([1, 2, 99999])
        with pytest.raises(ValueError, match="logits_processors must be picklable"):
            eng.add_request("x", pagoda.SamplingParams(logits_processors=[lambda ids, lg: lg]))
        with pytest.raises(ValueError, match="already in use"):
            eng.add_request("a", request_id="same")
            eng.add_request("b", request_id="same")
        eng.abort("same")
        keep = eng.add_request("def f(x):", pagoda.SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
        gone = eng.add_request("import os", pagoda.SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
        for _ in range(3):
            eng.step()
        assert eng.abort(gone)
        outs = []
        while eng.has_unfinished():
            outs += [o for o in eng.step() if o.finished]
        assert [o.request_id for o in outs] == [keep] and len(outs[0].outputs[0].token_ids) == 30
        _workers_agree(llm, outs)
        biased = llm.generate(["def f(x):"], pagoda.SamplingParams(max_tokens=4, temperature=0,
                                                                    logits_processors=[_favour_token_3]),
                              use_tqdm=False)
        assert biased[0].outputs[0].token_ids == [3, 3, 3, 3]
        _workers_agree(llm, biased)
        eng._workers.send("no such call")  # (the worker fails on it and says so)
        with pytest.raises(WorkerGone, match="rank 1"):
            for _ in range(50):
                eng._workers.check()
                import time
                time.sleep(0.1)
    finally:
        llm.shutdown()
    assert eng._workers.closed and all(p.poll() is not None for p in eng._workers.procs)
    with pytest.raises(ValueError, match="attention_backend"):  # (refused after the workers started: they stop)
        pagoda.LLM(None, num_kv_pages=64, tensor_parallel_size=2, attention_backend="bogus")
    again = pagoda.LLM(None, num_kv_pages=64, tensor_parallel_size=2)  # (the process group can be made anew)
    try:
        assert again.generate(["x"], pagoda.SamplingParams(max_tokens=2), use_tqdm=False)[0].finished
    finally:
        again.shutdown()
    assert pickle.dumps(pagoda.SamplingParams(logits_processors=[_favour_token_3]))
