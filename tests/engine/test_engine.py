"""The engine's machinery against transformers' greedy output: prefix-cache hits, chunked
prefill mixed with decodes, preemption under KV pressure, aborts, seeds, n > 1, stops."""
import json
import shutil

import pytest
import torch

import pagoda

from .test_models import hf_greedy, make_llm

PROMPTS = [list(range(3, 40)), [7, 8, 9, 10, 11], list(range(100, 121)), [250, 251] * 9]


def greedy(n=10):
    return pagoda.SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def spy_batches(llm):
    seen = []
    sched = llm.engine.scheduler
    orig = sched.schedule

    def schedule():
        b = orig()
        seen.append([(r.num_computed, r.num_tokens, n) for r, n in zip(b.requests, b.num_new_tokens)])
        return b
    sched.schedule = schedule
    return seen


def test_prefix_cache_hit_skips_prefill(tiny_models):
    path, hf = tiny_models["llama"]
    llm = make_llm(path)
    first = llm.generate([PROMPTS[0]], greedy(), use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    seen = spy_batches(llm)
    second = llm.generate([PROMPTS[0] + [5, 6]], greedy(), use_tqdm=False)[0]
    # 37 + 2 prompt tokens, page_size 4: the first 36 are cached pages, only 3 are computed
    assert second.num_cached_tokens == 36
    assert seen[0] == [(36, 39, 3)]
    st = llm.engine.stats
    assert st.prefix_hit_tokens == 36 and 0 < st.prefix_hit_rate < 1
    assert first.outputs[0].token_ids == hf_greedy(hf, PROMPTS[0], 10)
    assert second.outputs[0].token_ids == hf_greedy(hf, PROMPTS[0] + [5, 6], 10)


def test_chunked_prefill_mixes_with_decodes(tiny_models):
    path, hf = tiny_models["qwen2"]
    llm = make_llm(path, max_num_batched_tokens=8, enable_prefix_caching=False)
    seen = spy_batches(llm)
    outs = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    for p, o in zip(PROMPTS, outs):
        assert o.outputs[0].token_ids == hf_greedy(hf, p, 10)
    assert all(sum(n for _, _, n in step) <= 8 for step in seen), "token budget exceeded"
    mixed = [s for s in seen if any(c == t - 1 and n == 1 for c, t, n in s) and any(n > 1 or c < t - 1 for c, t, n in s)]
    assert mixed, "no step mixed a decode with a prefill chunk"
    # a 37-token prompt under an 8-token budget is prefilled in several chunks
    assert any(c > 0 and c + n < t for step in seen for c, t, n in step)


def test_preemption_recomputes_and_loses_nothing(tiny_models):
    path, hf = tiny_models["qwen3"]
    # 14 usable pages of 4 tokens: not enough for the four requests at once
    llm = make_llm(path, num_kv_pages=15, enable_prefix_caching=False)
    outs = llm.generate(PROMPTS, greedy(12), use_tqdm=False)
    assert llm.engine.stats.preemptions > 0
    for p, o in zip(PROMPTS, outs):
        assert o.outputs[0].token_ids == hf_greedy(hf, p, 12)
    assert llm.engine.pool.num_free == llm.engine.pool.usable, "pages leaked"


def test_preemption_with_prefix_cache(tiny_models):
    path, hf = tiny_models["llama"]
    llm = make_llm(path, num_kv_pages=16)
    outs = llm.generate(PROMPTS, greedy(12), use_tqdm=False)
    for p, o in zip(PROMPTS, outs):
        assert o.outputs[0].token_ids == hf_greedy(hf, p, 12)
    e = llm.engine
    e.prefix_cache.reset()
    assert e.pool.num_free == e.pool.usable


def test_abort_frees_pages(tiny_models):
    path, _ = tiny_models["llama"]
    llm = make_llm(path, enable_prefix_caching=False)
    e = llm.engine
    ids = [e.add_request(p, greedy(50)) for p in PROMPTS]
    for _ in range(4):
        e.step()
    assert e.pool.num_free < e.pool.usable
    assert e.abort(ids[0]) and e.abort(ids[2])
    assert not e.abort("no-such-request")
    while e.has_unfinished():
        e.step()
    assert e.pool.num_free == e.pool.usable


def test_seeds_repeat_and_batching_does_not_change_them(tiny_models):
    path, _ = tiny_models["mistral"]
    llm = make_llm(path)
    sp = pagoda.SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = llm.generate([PROMPTS[1]], sp, use_tqdm=False)[0].outputs[0].token_ids
    batched = llm.generate(PROMPTS, [greedy(), sp, greedy(), sp], use_tqdm=False)
    assert batched[1].outputs[0].token_ids == alone
    assert batched[3].outputs[0].token_ids != alone or PROMPTS[3] == PROMPTS[1]
    other = pagoda.SamplingParams(max_tokens=10, temperature=1.0, seed=99, ignore_eos=True)
    outs = [llm.generate([PROMPTS[1]], other, use_tqdm=False)[0].outputs[0].token_ids for _ in range(2)]
    assert outs[0] == outs[1]


def test_parallel_samples_share_the_prompt(tiny_models):
    path, _ = tiny_models["llama"]
    llm = make_llm(path)
    sp = pagoda.SamplingParams(n=4, max_tokens=6, temperature=1.0, seed=7, ignore_eos=True, logprobs=2)
    out = llm.generate([PROMPTS[0]], sp, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 6 and len(c.logprobs) == 6 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1, "the n samples should differ"
    # samples 1..3 reuse the 9 full prompt pages the first one computed
    assert llm.engine.stats.prefix_hit_tokens == 3 * 36


def test_stop_token_ids_and_max_model_len(tiny_models):
    path, hf = tiny_models["llama"]
    ref = hf_greedy(hf, PROMPTS[2], 10)
    llm = make_llm(path, max_model_len=len(PROMPTS[2]) + 4)
    out = llm.generate([PROMPTS[2]], pagoda.SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[ref[2]],
                                                            ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref[:3] and out.finish_reason == "stop" and out.stop_reason == ref[2]
    out = llm.generate([PROMPTS[2]], greedy(10), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref[:4] and out.finish_reason == "length"


def test_bad_requests(tiny_models, tmp_path):
    path, _ = tiny_models["llama"]
    llm = make_llm(path, max_model_len=64)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([list(range(3, 80))], greedy(), use_tqdm=False)
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([[5, 999999]], greedy(), use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], greedy(), use_tqdm=False)
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate(["text needs a tokenizer"], greedy(), use_tqdm=False)
    with pytest.raises(ValueError, match="prompts must be"):
        llm.generate(5, greedy(), use_tqdm=False)
    for field, value in (("max_tokens", 0), ("temperature", -1.0), ("top_p", 0.0), ("top_k", 0), ("n", 0),
                         ("min_p", 1.5), ("logprobs", 50), ("stop", 5), ("stop_token_ids", 7),
                         ("stop_token_ids", [-1]), ("ignore_eos", "yes"), ("prompt_logprobs", 21),
                         ("prompt_logprobs", -1), ("prompt_logprobs", True), ("logprobs", True)):
        with pytest.raises(ValueError, match=field):
            pagoda.SamplingParams(**{field: value})
    assert llm.engine.pool.num_free == llm.engine.pool.usable  # nothing half-admitted
    for bad_len in (0, 1.5, 10**6):
        with pytest.raises(ValueError, match="max_model_len"):
            make_llm(path, max_model_len=bad_len)
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        pagoda.LLM(str(bad), skip_tokenizer_init=True)
    with pytest.raises(FileNotFoundError, match="local folder"):
        pagoda.LLM(str(tmp_path / "nowhere"))
    empty = tmp_path / "noweights"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        pagoda.LLM(str(empty))
    shutil.copy(path / "config.json", empty / "config.json")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        pagoda.LLM(str(empty), skip_tokenizer_init=True)
    out = pagoda.LLM(str(empty), skip_tokenizer_init=True, load_format="dummy", num_kv_pages=64).generate(
        [[1, 2, 3]], greedy(3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_sharded_checkpoint(tiny_models, tmp_path):
    path, hf = tiny_models["qwen2"]
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    llm = make_llm(tmp_path)
    assert llm.generate([PROMPTS[1]], greedy(), use_tqdm=False)[0].outputs[0].token_ids == hf_greedy(hf, PROMPTS[1], 10)


def test_invalid_logits_end_only_that_request(tiny_models):
    path, hf = tiny_models["llama"]
    llm = make_llm(path, enable_prefix_caching=False)
    e = llm.engine
    model = e.runner.model
    orig = model.compute_logits
    calls = {"n": 0}

    def poisoned(hidden):
        logits = orig(hidden)
        calls["n"] += 1
        if calls["n"] == 3:  # the third step: NaN for the first sampled row only
            logits[0] = float("nan")
        return logits
    model.compute_logits = poisoned
    outs = llm.generate(PROMPTS[:2], [greedy(8), pagoda.SamplingParams(max_tokens=8, temperature=0.7, seed=1,
                                                                        ignore_eos=True)], use_tqdm=False)
    assert outs[0].outputs[0].finish_reason == "error" and len(outs[0].outputs[0].token_ids) == 2
    assert outs[1].outputs[0].finish_reason == "length" and len(outs[1].outputs[0].token_ids) == 8
    model.compute_logits = orig
    assert e.pool.num_free == e.pool.usable
    assert llm.generate([PROMPTS[2]], greedy(4), use_tqdm=False)[0].outputs[0].token_ids == hf_greedy(hf, PROMPTS[2], 4)


def test_cascade_decode_for_shared_prompts(tiny_models):
    """Parallel samples of a prompt share its full pages: their decode steps run the cascade wrapper (one
    attention over the shared pages per group), with the same greedy tokens as flat attention and
    transformers."""
    path, hf = tiny_models["llama"]
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[1]]
    params = [pagoda.SamplingParams(n=3, max_tokens=8, temperature=0, ignore_eos=True),
              pagoda.SamplingParams(n=2, max_tokens=8, temperature=0, ignore_eos=True), greedy(8)]
    runs = {}
    for cascade in (True, False):
        llm = make_llm(path, enable_cascade=cascade)
        outs = llm.generate(prompts, params, use_tqdm=False)
        runs[cascade] = [[c.token_ids for c in o.outputs] for o in outs]
        assert (llm.engine.stats.cascade_steps > 0) == cascade
    assert runs[True] == runs[False]
    for p, samples in zip(prompts, runs[True]):
        assert all(s == hf_greedy(hf, p, 8) for s in samples)
    # below the byte threshold (a GPU's, here raised) the step stays flat
    llm = make_llm(path)
    llm.engine.runner.cascade_min_saved_bytes = 1 << 60
    assert [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params, use_tqdm=False)] == runs[True]
    assert llm.engine.stats.cascade_steps == 0


def test_cascade_groups_requests_by_first_page():
    from pagoda.engine.runner import _first_page_order

    class R:
        def __init__(self, pages):
            self.pages = pages
    order = _first_page_order([R([4, 5]), R([9]), R([4, 6]), R([3]), R([9, 1]), R([7])])
    assert order == [3, 0, 2, 5, 1, 4]
    assert _first_page_order([R([1, 2]), R([2, 1])]) is None


def test_page_array_follows_the_page_list():
    """Request.page_array converts pages incrementally; appends, replacement and clearing all show."""
    r = pagoda.engine.scheduler.Request("r", None, [1, 2, 3], pagoda.SamplingParams())
    r.pages += [5, 6]
    assert r.page_array().tolist() == [5, 6]
    r.pages += [7]
    assert r.page_array().tolist() == [5, 6, 7]
    r.pages = [9]  # preemption / a prefix-cache match assigns a new list
    assert r.page_array().tolist() == [9]
    r.pages = []
    r.pages += [3, 4]
    assert r.page_array().tolist() == [3, 4]
    assert str(r.page_array().dtype) == "int32"


def test_no_cascade_with_a_sliding_window(tiny_models, tmp_path):
    """A sliding-window model keeps flat attention (the cascade's shared level would attend past the window)."""
    path, _ = tiny_models["mistral"]
    shutil.copytree(path, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["sliding_window"] = 64
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    llm = make_llm(tmp_path / "m")
    assert llm.engine.runner.window_left == 63 and not llm.engine.runner.enable_cascade
    llm.generate([PROMPTS[0]], pagoda.SamplingParams(n=3, max_tokens=4, temperature=0, ignore_eos=True),
                 use_tqdm=False)
    assert llm.engine.stats.cascade_steps == 0


def test_async_scheduling_prepares_decode_steps_and_changes_nothing(tiny_models):
    """While a decode step runs, the engine prepares the next one as if every request goes on; a step runs
    prepared only when the scheduler picks exactly that batch, and in steady decoding it is launched before
    the running step's tokens are read back (a request that ends meanwhile has its extra token dropped).
    Against the same engine without it: the same tokens (greedy, seeded sampling, stop tokens, max_tokens
    reached mid-batch, a request arriving while others decode, an abort), no page left behind, and most
    decode steps prepared."""
    path, hf = tiny_models["llama"]
    ref2 = hf_greedy(hf, PROMPTS[2], 12)
    params = [greedy(12), pagoda.SamplingParams(max_tokens=9, temperature=0.8, seed=5, ignore_eos=True, logprobs=2),
              pagoda.SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[ref2[4]], ignore_eos=True),
              greedy(3)]
    runs = {}
    for on in (True, False):
        llm = make_llm(path, async_scheduling=on, enable_prefix_caching=False)
        e = llm.engine
        ids = [e.add_request(p, sp) for p, sp in zip(PROMPTS, params)]
        outs, late, aborted = {}, None, None
        for step in range(200):
            if not e.has_unfinished():
                break
            if step == 6:  # arrives while the others decode: the prepared step does not match, nothing breaks
                late = e.add_request([9, 8, 7, 6, 5], greedy(5))
                aborted = e.add_request([1, 2, 3], greedy(40))
            if step == 9:
                assert e.abort(aborted)
            for out in e.step():
                if out.finished:
                    outs[out.request_id] = out
        assert e.pool.num_free == e.pool.usable, "pages left allocated"
        runs[on] = ([outs[i].outputs[0].token_ids for i in ids + [late]],
                    [outs[i].outputs[0].finish_reason for i in ids + [late]], outs[ids[1]].outputs[0].logprobs,
                    e.stats)
    (tok_on, why_on, lp_on, st_on), (tok_off, why_off, lp_off, st_off) = runs[True], runs[False]
    assert tok_on == tok_off and why_on == why_off
    assert [sorted(d) for d in lp_on] == [sorted(d) for d in lp_off]
    assert tok_on[0] == hf_greedy(hf, PROMPTS[0], 12)
    assert tok_on[2] == ref2[:5] and why_on[2] == "stop"
    assert tok_on[4] == hf_greedy(hf, [9, 8, 7, 6, 5], 5)
    assert st_off.prepared_steps == 0 and st_on.prepared_steps > 0 and st_on.ahead_steps > 0
    assert st_off.ahead_steps == 0
    # steady decoding (nothing arrives or ends until the last step): every decode step after the first one
    # runs prepared (one prefill step, 7 decode steps)
    llm = make_llm(path)
    outs = llm.generate(PROMPTS, greedy(8), use_tqdm=False)
    st = llm.engine.stats
    assert st.steps == 8 and st.prepared_steps == 6, (st.steps, st.prepared_steps)
    # ... and launched before the previous step's tokens were read back (nothing waits, nobody ends early)
    assert st.ahead_steps == 6, st.ahead_steps
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf, p, 8) for p in PROMPTS]


def test_kv_pool_counts_memory_cached_by_pytorch(monkeypatch):
    """The KV pool sized from free memory also takes what PyTorch's allocator caches but no tensor uses (freed
    buffers of earlier work): torch.cuda's memory queries faked, Llama-3.1-8B's shape."""
    import json
    import os

    import torch

    from pagoda.engine.config import ModelConfig
    from pagoda.engine.llm import _kv_pages_from_memory
    from pagoda.engine.loader import DUMMY_CONFIGS

    with open(os.path.join(DUMMY_CONFIGS["Llama-3.1-8B"], "config.json")) as f:
        cfg = ModelConfig.from_dict(json.load(f))
    gib = 1 << 30
    page_bytes = cfg.num_layers * 2 * 16 * cfg.num_kv_heads * cfg.head_dim * 2

    def pages(free, reserved, allocated, util=0.9):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * gib))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated)
        return _kv_pages_from_memory(cfg, torch.bfloat16, 16, util, 8192, 256, "cuda")

    base = pages(60 * gib, 17 * gib, 17 * gib)  # weights allocated, nothing cached
    cached = pages(58 * gib, 19 * gib, 17 * gib)  # 2 GiB more reserved, by freed tensors only
    used = pages(58 * gib, 19 * gib, 19 * gib)  # 2 GiB more reserved and in use
    assert base > 0
    assert cached == base
    assert base - used == -(-2 * gib // page_bytes) or base - used == 2 * gib // page_bytes
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        pages(60 * gib, 17 * gib, 17 * gib, util=0.25)


def _penalized_reference(logits, prompt, output, p):
    """The logit processors of SamplingParams written plainly, in float64, on one row."""
    x = logits.double().clone()
    if p.repetition_penalty != 1.0:
        for t in set(prompt + output):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(output):
        x[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    for t, b in (p.logit_bias or {}).items():
        x[t] += b
    return x


def test_penalties_and_logit_bias_in_the_sampler():
    """sampler._penalized over a batch mixing plain and penalized rows, against the plain float64 reference;
    the plain rows are untouched and the caller's logits too (logprobs report the model's distribution)."""
    import torch

    from pagoda.engine.sampler import _penalized

    g = torch.Generator().manual_seed(0)
    vocab = 50
    logits = torch.randn(4, vocab, generator=g) * 3
    before = logits.clone()
    P = pagoda.SamplingParams
    rows = [([1, 2, 3], [4, 4, 9], P(presence_penalty=0.5, frequency_penalty=0.25)),
            ([7, 7, 8], [], P()),
            ([5, 6], [6, 10, 10, 10], P(repetition_penalty=1.5, frequency_penalty=-0.5, logit_bias={11: 3.0, 6: -2})),
            ([2], [3, 2], P(repetition_penalty=0.7, presence_penalty=-1.0, logit_bias={0: 100}))]
    from pagoda.engine.scheduler import Request

    reqs = [Request(str(i), None, a, p) for i, (a, _, p) in enumerate(rows)]
    for r, (_, b, _) in zip(reqs, rows):
        r.output_token_ids = list(b)
    got = _penalized(logits, reqs)
    assert torch.equal(logits, before)
    for i, (a, b, p) in enumerate(rows):
        want = _penalized_reference(before[i], a, b, p)
        assert torch.allclose(got[i].double(), want, rtol=1e-6, atol=1e-5), i
    assert _penalized(logits, [reqs[1]] * 4) is logits  # nothing penalized: no copy


def test_penalties_match_a_step_by_step_reference(tiny_models):
    """Greedy generation with penalties and a logit bias through the whole engine (batched with a plain request,
    paged cache, CUDA-graph-free CPU path) against transformers' forward with the same logit processors applied by
    hand each step; repetition_penalty alone against transformers' own generate(repetition_penalty=...)."""
    import torch

    path, hf = tiny_models["llama"]
    llm = make_llm(path)
    prompt = [5, 17, 99, 3, 250, 41, 7]
    sp = pagoda.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, presence_penalty=1.5,
                               frequency_penalty=0.5, repetition_penalty=1.2, logit_bias={13: 2.0, 99: -5.0})
    outs = llm.generate([prompt, [11] * 3], [sp, greedy(12)], use_tqdm=False)
    # no step of a penalized batch was launched ahead of its previous step's tokens (which the penalties read)
    assert llm.engine.stats.ahead_steps == 0 and llm.engine.stats.steps >= 12
    llm.generate([prompt, [11] * 3], greedy(12), use_tqdm=False)
    assert llm.engine.stats.ahead_steps > 0  # (while plain batches are)
    want = []
    with torch.no_grad():
        for _ in range(12):
            row = hf(torch.tensor([prompt + want])).logits[0, -1]
            want.append(int(_penalized_reference(row, prompt, want, sp).argmax()))
    assert outs[0].outputs[0].token_ids == want
    assert outs[1].outputs[0].token_ids == hf_greedy(hf, [11] * 3, 12)
    rp = pagoda.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, repetition_penalty=1.3)
    got = llm.generate([prompt], rp, use_tqdm=False)[0].outputs[0].token_ids
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, repetition_penalty=1.3,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert got == ref
    assert got != hf_greedy(hf, prompt, 12)  # (the penalty changed something: the test can fail)
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate([prompt], pagoda.SamplingParams(logit_bias={10**6: 1.0}), use_tqdm=False)
    for field, value in (("presence_penalty", 3.0), ("frequency_penalty", -2.5), ("repetition_penalty", 0.0),
                         ("logit_bias", {-1: 1.0}), ("logit_bias", {3: 500})):
        with pytest.raises(ValueError, match=field):
            pagoda.SamplingParams(**{field: value})


def _hf_prompt_logprobs(hf, prompt):
    """log_softmax of transformers' logits at every prompt position but the last, float64: row p gives token
    p + 1's distribution."""
    import torch

    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([prompt])).logits[0, :-1].double(), -1)


def _check_prompt_logprobs(got, prompt, ref, k):
    assert got is not None and len(got) == len(prompt) and got[0] is None
    for p in range(1, len(prompt)):
        d = got[p]
        top = ref[p - 1].topk(k).indices.tolist() if k else []
        assert set(d) == set(top) | {prompt[p]}, (p, d, top)
        for tok, lp in d.items():
            assert abs(lp - ref[p - 1, tok].item()) < 1e-4, (p, tok, lp, ref[p - 1, tok].item())


@pytest.mark.parametrize("chunked", [False, True])
def test_prompt_logprobs_match_transformers(tiny_models, chunked):
    """SamplingParams.prompt_logprobs (vLLM's): each prompt token's log-probability given the ones before it, with
    the top-k tokens there, against transformers' logits; through chunked prefill mixed with other requests'
    decodes (an 8-token budget), a second request with the same prompt (not served from the prefix cache for the
    positions it must report: the first request's pages are cached), n = 2 (reported once) and k = 0."""
    path, hf = tiny_models["llama"]
    llm = make_llm(path, max_num_batched_tokens=8 if chunked else 2048)
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[0], [42]]
    params = [pagoda.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=k)
              for k in (3, 0, 2, 1)]
    params.append(pagoda.SamplingParams(n=2, max_tokens=3, temperature=0.7, seed=1, ignore_eos=True,
                                        prompt_logprobs=1))
    prompts.append(PROMPTS[1])
    plain = greedy(4)
    outs = llm.generate(prompts + [PROMPTS[3]], params + [plain], use_tqdm=False)
    for prompt, sp, out in zip(prompts, params, outs):
        _check_prompt_logprobs(out.prompt_logprobs, prompt, _hf_prompt_logprobs(hf, prompt) if len(prompt) > 1
                               else None, sp.prompt_logprobs)
        assert len(out.outputs) == sp.n
    assert outs[-1].prompt_logprobs is None  # not asked for
    for prompt, out in zip(prompts[:3] + [PROMPTS[3]], outs[:3] + outs[-1:]):  # generation itself unchanged
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 4)
    # the prompt again, now cached: the plain request hits the cache, the one asking for prompt logprobs
    # computes its prompt (and reports it in full)
    again = llm.generate([PROMPTS[0], PROMPTS[0]], [plain, params[0]], use_tqdm=False)
    assert again[0].num_cached_tokens == 36 and again[1].num_cached_tokens == 0
    _check_prompt_logprobs(again[1].prompt_logprobs, PROMPTS[0], _hf_prompt_logprobs(hf, PROMPTS[0]), 3)


def test_prompt_logprobs_survive_preemption(tiny_models):
    """A request preempted while (or after) its prompt was prefilled reports every prompt position once, with
    the right values, and generates what transformers does."""
    path, hf = tiny_models["qwen3"]
    llm = make_llm(path, num_kv_pages=15, max_num_batched_tokens=8)
    sp = pagoda.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, prompt_logprobs=2)
    outs = llm.generate(PROMPTS, sp, use_tqdm=False)
    assert llm.engine.stats.preemptions > 0
    for p, o in zip(PROMPTS, outs):
        _check_prompt_logprobs(o.prompt_logprobs, p, _hf_prompt_logprobs(hf, p), 2)
        assert o.outputs[0].token_ids == hf_greedy(hf, p, 12)
    llm.engine.prefix_cache.reset()
    assert llm.engine.pool.num_free == llm.engine.pool.usable, "pages leaked"


def test_min_tokens_matches_transformers(tiny_models):
    """min_tokens (vLLM's): the stop token id is not sampled before the output has min_tokens tokens, then ends
    the request as usual: greedy tokens equal transformers' generate(min_new_tokens=..., eos_token_id=stop id)
    (MinNewTokensLengthLogitsProcessor); without min_tokens the request stops at the id's first appearance;
    a request without it in the same batch is unchanged; bad values name the field."""
    import torch

    path, hf = tiny_models["llama"]
    llm = make_llm(path)
    prompt = PROMPTS[2]
    free = hf_greedy(hf, prompt, 12)
    stop_id = free[2]  # the third greedy token
    assert stop_id not in free[:2]
    sp = pagoda.SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_id], ignore_eos=True)
    outs = llm.generate([prompt, prompt, PROMPTS[0]],
                        [sp, pagoda.SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_id],
                                                   ignore_eos=True, min_tokens=6), greedy(6)], use_tqdm=False)
    assert outs[0].outputs[0].token_ids == free[:3] and outs[0].outputs[0].finish_reason == "stop"
    with torch.no_grad():
        ids = torch.tensor([prompt])
        ref = hf.generate(ids, max_new_tokens=12, min_new_tokens=6, do_sample=False, eos_token_id=stop_id,
                          pad_token_id=0)[0, len(prompt):].tolist()
    got = outs[1].outputs[0]
    assert got.token_ids == ref, (got.token_ids, ref)
    assert stop_id not in got.token_ids[:6] and len(got.token_ids) >= 6
    assert got.finish_reason == ("stop" if got.token_ids[-1] == stop_id else "length")
    assert outs[2].outputs[0].token_ids == hf_greedy(hf, PROMPTS[0], 6)
    for bad in (-1, 13, 1.5, True):
        with pytest.raises(ValueError, match="min_tokens"):
            pagoda.SamplingParams(max_tokens=12, min_tokens=bad)


def test_allowed_token_ids_and_truncate_prompt_tokens(tiny_models):
    """allowed_token_ids: every token sampled is one of them, and greedy picks the likeliest of them (checked
    against transformers' logits step by step); truncate_prompt_tokens: the request runs on the prompt's last k
    tokens (the output equals the short prompt's); bad values name the field."""
    import torch

    path, hf = tiny_models["llama"]
    llm = make_llm(path)
    allowed = [3, 50, 77, 120, 200, 301]
    prompt = PROMPTS[0]
    outs = llm.generate([prompt, prompt], [
        pagoda.SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, allowed_token_ids=allowed),
        pagoda.SamplingParams(max_tokens=5, temperature=1.0, seed=3, ignore_eos=True, allowed_token_ids=allowed)],
        use_tqdm=False)
    ids = list(prompt)
    for tok in outs[0].outputs[0].token_ids:
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1]
        assert tok == allowed[int(logits[allowed].argmax())]
        ids.append(tok)
    assert set(outs[1].outputs[0].token_ids) <= set(allowed)
    short = llm.generate([prompt], pagoda.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                                                         truncate_prompt_tokens=9), use_tqdm=False)[0]
    assert short.prompt_token_ids == prompt[-9:]
    assert short.outputs[0].token_ids == hf_greedy(hf, prompt[-9:], 6)
    for field, value in (("allowed_token_ids", []), ("allowed_token_ids", [-1]), ("truncate_prompt_tokens", 0),
                         ("include_stop_str_in_output", 1)):
        with pytest.raises(ValueError, match=field):
            pagoda.SamplingParams(**{field: value})
    with pytest.raises(ValueError, match="allowed_token_ids"):
        llm.generate([prompt], pagoda.SamplingParams(allowed_token_ids=[10**6]), use_tqdm=False)


def test_logits_processors(tiny_models):
    """vLLM's per-request logits_processors: fn(output ids, logits) and fn(prompt ids, output ids, logits), applied
    each step before sampling (here forcing a token sequence, so greedy output is that sequence, and the ids passed
    in are checked on every call); one that raises ends only its own request (finish_reason "error"), the batch's
    other request goes on unchanged; a non-callable is a ValueError naming the field."""
    path, hf = tiny_models["llama"]
    llm = make_llm(path)
    seen = []

    def two(out, logits):
        seen.append(list(out))
        logits[5 + len(out)] += 1000.0
        return logits

    def three(prompt, out, logits):
        assert prompt == PROMPTS[2]
        logits = logits.clone()
        logits[prompt[len(out)]] = 1e4
        return logits

    def broken(out, logits):
        raise RuntimeError("a user bug")

    outs = llm.generate([PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[3]], [
        pagoda.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logits_processors=[two]),
        pagoda.SamplingParams(max_tokens=4, temperature=0.8, seed=1, ignore_eos=True, logits_processors=[three]),
        pagoda.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logits_processors=[broken]),
        greedy(4)], use_tqdm=False)
    assert outs[0].outputs[0].token_ids == [5, 6, 7, 8]
    assert seen == [[], [5], [5, 6], [5, 6, 7]]
    assert outs[1].outputs[0].token_ids == PROMPTS[2][:4]
    assert outs[2].outputs[0].finish_reason == "error" and outs[2].outputs[0].token_ids == []
    assert outs[3].outputs[0].token_ids == hf_greedy(hf, PROMPTS[3], 4)
    with pytest.raises(ValueError, match="logits_processors"):
        pagoda.SamplingParams(logits_processors=[1])


def test_graph_inputs_written_in_one_copy():
    """write_static (the CUDA graphs' step inputs) puts every array at its region of the one flat buffer, in one
    copy through the pinned staging buffer (here a CPU tensor stands in for both): each region's prefix holds its
    array, whatever an earlier, longer step left in the staging buffer."""
    import numpy as np
    import torch

    from pagoda.engine import runner as runner_mod

    mx, pages = 8, 40
    regions = (("input_ids", mx), ("positions", mx), ("batch_indices", mx), ("kv_indptr", mx + 1),
               ("qo_indptr", mx + 1), ("kv_last_page_len", mx), ("kv_indices", pages + mx))
    offsets = np.cumsum([0] + [k for _, k in regions])

    class Fake:
        pass

    fake = Fake()
    fake.lora = None  # (no LoRA engine: no LoRA tables among the regions)
    fake.staging = runner_mod._Staging(int(offsets[-1]), torch.device("cpu"))
    fake.staging.pinned = torch.full((int(offsets[-1]),), -7, dtype=torch.int32)  # (as on a GPU host)
    fake.static_flat = torch.full((int(offsets[-1]),), -9, dtype=torch.int32)
    fake.static = {n: fake.static_flat[o:o + k] for (n, k), o in zip(regions, offsets)}
    rng = np.random.default_rng(0)
    for b, n_pages in ((4, 30), (2, 5)):
        inp = runner_mod.StepInputs(
            rng.integers(0, 100, b).astype(np.int32), rng.integers(0, 999, b).astype(np.int32),
            np.arange(b, dtype=np.int32), np.arange(b + 1, dtype=np.int32),
            np.linspace(0, n_pages, b + 1).astype(np.int32), rng.integers(1, 999, n_pages).astype(np.int32),
            rng.integers(1, 16, b).astype(np.int32), np.arange(b, dtype=np.int32), list(range(b)), True)
        runner_mod.ModelRunner.write_static(fake, inp)
        for name, a in (("input_ids", inp.input_ids), ("positions", inp.positions),
                        ("batch_indices", inp.batch_indices), ("kv_indptr", inp.kv_indptr),
                        ("qo_indptr", inp.qo_indptr), ("kv_last_page_len", inp.kv_last_page_len),
                        ("kv_indices", inp.kv_indices)):
            assert fake.static[name][:a.size].tolist() == a.tolist(), name
    too_long = runner_mod.StepInputs(*(np.zeros(n, np.int32) for n in (1, 1, 1, 2, 2, pages + mx + 1, 1, 1)),
                                     [0], True)
    with pytest.raises(RuntimeError, match="kv_indices"):
        runner_mod.ModelRunner.write_static(fake, too_long)


def test_graph_lora_tables_written_with_the_inputs():
    """A LoRA engine's graphs: write_static also puts the padded batch's LoRA tables (rows grouped by adapter, tiles
    of one adapter; padding rows on slot 0 get none) into their regions, ahead of the page ids, in the same copy."""
    import numpy as np
    import torch

    from pagoda.engine import runner as runner_mod
    from pagoda.engine.lora import step_tables
    from pagoda.ops.lora import lora_max_tiles

    mx, pages, loras = 8, 40, 2
    regions = (("input_ids", mx), ("positions", mx), ("batch_indices", mx), ("kv_indptr", mx + 1),
               ("qo_indptr", mx + 1), ("kv_last_page_len", mx), ("lora_order", mx),
               ("lora_tiles", 3 * lora_max_tiles(mx, 16, loras)), ("kv_indices", pages + mx))
    offsets = np.cumsum([0] + [k for _, k in regions])

    class Fake:
        pass

    fake = Fake()
    fake.lora = Fake()
    fake.lora.max_loras = loras
    fake.staging = runner_mod._Staging(int(offsets[-1]), torch.device("cpu"))
    fake.staging.pinned = torch.full((int(offsets[-1]),), -7, dtype=torch.int32)
    fake.static_flat = torch.full((int(offsets[-1]),), -9, dtype=torch.int32)
    fake.static = {n: fake.static_flat[o:o + k] for (n, k), o in zip(regions, offsets)}
    slots = np.array([2, 0, 1, 2, 0, 0, 0, 0], np.int32)  # 4 requests and 4 padding rows of a size-8 graph
    inp = runner_mod.StepInputs(np.arange(8, dtype=np.int32), np.arange(8, dtype=np.int32), np.arange(8, dtype=np.int32),
                                np.arange(9, dtype=np.int32), np.arange(9, dtype=np.int32), np.arange(1, 9, dtype=np.int32),
                                np.ones(8, np.int32), np.arange(8, dtype=np.int32), list(range(8)), True, slots)
    runner_mod.ModelRunner.write_static(fake, inp)
    order, tiles, n, bm = step_tables(slots, inp.qo_indptr, loras)
    assert (n, bm) == (3, 16)
    assert fake.static["lora_order"].tolist() == order.tolist() == [1, 4, 5, 6, 7, 2, 0, 3]
    assert fake.static["lora_tiles"][:9].tolist() == tiles.tolist() == [1, 2, -1, 5, 6, -1, 6, 8, -1]
    view = runner_mod._StaticView(fake.static, 8, loras)
    assert view.lora[2:] == (3, 16) and view.lora[1].tolist() == tiles.tolist()


def test_sample_launch_takes_model_dtype_logits():
    """sample_launch on bf16 logits (what the decode graphs hand it, session 20): an all-greedy batch samples
    them as they are (the argmax of their float32 upcast; -1 for a row with a NaN); a batch with logprobs, a
    penalty or a temperature is upcast first, so its logprobs and samples are those of the float32 logits; with
    a logit_scale, of the scaled logits."""
    from pagoda.engine.sampler import sample_collect, sample_launch
    from pagoda.engine.scheduler import Request

    torch.manual_seed(0)
    logits = (torch.randn(4, 500) * 3).to(torch.bfloat16)
    logits[2, 7] = float("nan")
    want = torch.where(torch.isfinite(logits.float()).all(-1), logits.float().argmax(-1), -1).tolist()

    def reqs(*params):
        return [Request(str(i), None, [1, 2], p) for i, p in enumerate(params)]
    tokens, lps = sample_collect(sample_launch(logits, reqs(*[greedy(4)] * 4)))
    assert tokens == want and lps == [None] * 4
    lp_params = pagoda.SamplingParams(max_tokens=4, temperature=0, logprobs=2)
    pen = pagoda.SamplingParams(max_tokens=4, temperature=0, logit_bias={3: 100.0})
    hot = pagoda.SamplingParams(max_tokens=4, temperature=0.8, seed=3)
    batch = reqs(lp_params, greedy(4), pen, hot)
    batch[3].generator = torch.Generator().manual_seed(3)
    tokens, lps = sample_collect(sample_launch(logits, batch))
    assert tokens[:2] == want[:2] and tokens[2] == -1  # (a NaN row stays -1 with its bias)
    ref = torch.log_softmax(logits[0].float(), -1)
    assert abs(lps[0][want[0]] - ref[want[0]].item()) < 1e-6
    assert 0 <= tokens[3] < 500
    # logit_scale (a final norm left out of the graph): greedy-only batches ignore it, the others sample and
    # report the scaled logits
    scale = torch.tensor([0.5, 2.0, 1.0, 3.0])
    tokens, _ = sample_collect(sample_launch(logits, reqs(*[greedy(4)] * 4), logit_scale=scale))
    assert tokens == want
    tokens, lps = sample_collect(sample_launch(logits[:2], reqs(lp_params, greedy(4)), logit_scale=scale[:2]))
    ref = torch.log_softmax(logits[0].float() * 0.5, -1)
    assert tokens == want[:2] and abs(lps[0][want[0]] - ref[want[0]].item()) < 1e-6


def test_startup_heap_freeze(monkeypatch):
    """llm.freeze_startup_heap, which the first CUDA engine runs before it exists (LLMEngine.__new__; forced here on
    the CPU): garbage alive then is collected first, not frozen; the engine is built after the freeze, so an engine
    dropped while in a reference cycle is still collected; once a process (a second engine freezes nothing, the
    first engine, alive, stays unfrozen)."""
    import gc
    import weakref

    from pagoda.engine import llm as llm_mod

    class Node:
        pass

    monkeypatch.setattr(llm_mod, "_heap_frozen", False)
    monkeypatch.setattr(llm_mod, "_freezes_heap", lambda device: True)
    gc.collect()
    gc.unfreeze()
    try:
        a, b = Node(), Node()
        a.b, b.a = b, a  # (cyclic garbage once dropped: only the collector frees it)
        dead = weakref.ref(a)
        del a, b
        llm = pagoda.LLM(None, num_kv_pages=64)
        frozen = gc.get_freeze_count()
        assert frozen > 1000 and dead() is None
        llm.generate([PROMPTS[0]], greedy(3), use_tqdm=False)
        llm.engine.cycle = [llm.engine]  # (a reference cycle through the engine itself)
        second = pagoda.LLM(None, num_kv_pages=64)
        assert gc.get_freeze_count() <= frozen  # (once a process: the first engine not frozen by the second)
        engines = weakref.ref(llm.engine), weakref.ref(second.engine)
        del llm, second
        gc.collect()
        assert engines[0]() is None and engines[1]() is None
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_mixed_steps_split_into_decode_and_prefill_launches(tiny_models, monkeypatch, family):
    """PAGODA_SPLIT_MIXED=1: a mixed step's one-token requests run in the decode wrapper and its prompt chunks in the
    prefill wrapper (engine/runner.py, _PagodaAttention.split), the one-token requests moved to the front of the
    step (here every step comes in the reverse of the scheduler's order, so they start at the back); =0: one
    prefill launch. Both give transformers' greedy tokens and log-probabilities (1e-4) through chunked prefill
    beside decodes (Gemma 2: each window's attention splits, soft caps on both wrappers)."""
    from .test_models import check_like_hf

    path, hf = tiny_models[family]
    sp = pagoda.SamplingParams(max_tokens=10, temperature=0, logprobs=3, ignore_eos=True)
    for mode in ("1", "0"):
        monkeypatch.setenv("PAGODA_SPLIT_MIXED", mode)
        llm = make_llm(path, max_num_batched_tokens=8, enable_prefix_caching=False)
        sched = llm.engine.scheduler
        orig = sched.schedule

        def reversed_schedule():  # (any order of a step's requests is the runner's to take)
            b = orig()
            b.requests.reverse()
            b.num_new_tokens.reverse()
            return b
        sched.schedule = reversed_schedule
        seen = spy_batches(llm)
        outs = llm.generate(PROMPTS, sp, use_tqdm=False)
        for p, o in zip(PROMPTS, outs):
            check_like_hf(hf, p, o.outputs[0], 10)
        mixed = [s for s in seen if any(n == 1 for *_, n in s) and any(n > 1 for *_, n in s)]
        assert mixed and any(s[-1][2] == 1 for s in mixed)  # (one-token requests last in some mixed step)
        assert llm.engine.stats.split_steps == (len(mixed) if mode == "1" else 0)
    monkeypatch.setenv("PAGODA_SPLIT_MIXED", "yes")
    with pytest.raises(ValueError, match="PAGODA_SPLIT_MIXED"):
        make_llm(path)


def test_split_mixed_rows(tiny_models, monkeypatch):
    """ModelRunner.split_rows: the leading one-token requests of a mixed step (none when one comes after a
    prompt chunk, when every request is one token, or under PAGODA_SPLIT_MIXED=0); under "auto" (no fp8 scratch
    here) as attention.prefill.split_mixed's cost model decides: many long decodes beside a short chunk split,
    one short decode beside a long chunk does not."""
    import numpy as np

    from pagoda.engine.runner import StepInputs

    path, _ = tiny_models["llama"]

    def step(qo_lens, kv_lens, page=4):
        pages = [-(-k // page) for k in kv_lens]
        i32 = np.int32
        return StepInputs(np.zeros(sum(qo_lens), i32), np.zeros(sum(qo_lens), i32), np.zeros(sum(qo_lens), i32),
                          np.concatenate([[0], np.cumsum(qo_lens)]).astype(i32),
                          np.concatenate([[0], np.cumsum(pages)]).astype(i32), np.arange(sum(pages), dtype=i32),
                          np.array([(k - 1) % page + 1 for k in kv_lens], i32), np.zeros(0, i32), [], False)

    for mode, want in (("1", [3, None, None, 64, 1]), ("0", [None] * 5), ("auto", [3, None, None, 64, None])):
        monkeypatch.setenv("PAGODA_SPLIT_MIXED", mode)
        runner = make_llm(path).engine.runner
        got = [runner.split_rows(step(q, k)) for q, k in (
            ([1, 1, 1, 8], [40, 9, 20, 8]), ([8, 1], [8, 30]), ([1, 1], [5, 6]),
            ([1] * 64 + [4], [4000] * 64 + [4]), ([1, 200], [5, 200]))]
        assert got == want, (mode, got)


def test_mixed_steps_split_over_an_fp8_cache(tiny_models, monkeypatch):
    """An fp8 KV cache: a mixed step split (PAGODA_SPLIT_MIXED=1: the decode wrapper reads the one-token requests'
    fp8 pages, the prefill wrapper the rest) gives the one-launch engine's greedy tokens and log-probabilities (the
    same fp8 values, dequantized by each wrapper: 1e-5)."""
    path, _ = tiny_models["llama"]
    sp = pagoda.SamplingParams(max_tokens=10, temperature=0, logprobs=3, ignore_eos=True)
    outs = {}
    for mode in ("1", "0"):
        monkeypatch.setenv("PAGODA_SPLIT_MIXED", mode)
        llm = make_llm(path, max_num_batched_tokens=8, enable_prefix_caching=False, kv_cache_dtype="fp8",
                       dtype="bfloat16")
        outs[mode] = [o.outputs[0] for o in llm.generate(PROMPTS, sp, use_tqdm=False)]
        assert (llm.engine.stats.split_steps > 0) == (mode == "1")
    for a, b in zip(outs["1"], outs["0"]):
        assert a.token_ids == b.token_ids
        for sa, sb in zip(a.logprobs, b.logprobs):
            assert sa.keys() == sb.keys() and all(abs(sa[t] - sb[t]) < 1e-5 for t in sa)
