"""Each family against transformers' own implementation (CPU, float32): next-token
log-probabilities through the whole engine, and greedy generations token for token."""
import pytest
import torch

import pagoda

from .conftest import FAMILIES


def hf_greedy(model, prompt, n):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def make_llm(path, **kw):
    kw.setdefault("num_kv_pages", 256)
    return pagoda.LLM(str(path), skip_tokenizer_init=True, page_size=kw.pop("page_size", 4), **kw)


PROMPTS = [[5, 17, 99, 3, 250, 41, 7], [11] * 3, list(range(40, 77)), [300, 1, 200, 13, 13, 13, 9, 8, 77, 66, 55]]


def assert_greedy_like_hf(llm, hf, prompt, n):
    """n greedy tokens of prompt through the engine equal transformers', and each step's top-3 log-probabilities
    agree with transformers' to 1e-4 (float32 models)."""
    out = llm.generate([prompt], pagoda.SamplingParams(max_tokens=n, temperature=0, logprobs=3, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    check_like_hf(hf, prompt, out, n)


def check_like_hf(hf, prompt, out, n):
    """A completion's n greedy tokens are transformers' on hf, its log-probabilities within 1e-4 (float32)."""
    assert out.token_ids == hf_greedy(hf, prompt, n)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt + out.token_ids])).logits[0].double(), -1)
    for i, step in enumerate(out.logprobs):
        for t, lp in step.items():
            assert abs(lp - ref[len(prompt) - 1 + i, t].item()) < 1e-4, (i, t)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_next_token_logprobs_match_transformers(tiny_models, family):
    path, hf = tiny_models[family]
    llm = make_llm(path)
    sp = pagoda.SamplingParams(max_tokens=1, temperature=0, logprobs=5, ignore_eos=True)
    outs = llm.generate(PROMPTS, sp, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0, -1].double(), -1)
        got = out.outputs[0].logprobs[0]
        assert len(got) == 5
        for tok, lp in got.items():
            assert abs(lp - ref[tok].item()) < 1e-4, (family, tok, lp, ref[tok].item())
        assert out.outputs[0].token_ids[0] == int(ref.argmax())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generation_matches_transformers(tiny_models, family):
    path, hf = tiny_models[family]
    llm = make_llm(path)
    sp = pagoda.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outs = llm.generate(PROMPTS, sp, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 12), family
        assert out.outputs[0].finish_reason == "length"


def count_calls(monkeypatch, owner, name) -> dict:
    """Replace owner.name by a wrapper that counts its calls in the returned {"n": ...}."""
    calls = {"n": 0}
    orig = getattr(owner, name)

    def counted(*a, **kw):
        calls["n"] += 1
        return orig(*a, **kw)

    monkeypatch.setattr(owner, name, counted)
    return calls


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_qk_norms_in_the_rope_append_launch(tiny_models, family, fused, monkeypatch):
    """Qwen3's and Gemma 3's per-head q / k RMSNorms run inside the RoPE + K/V append launch (its q_norm_weight /
    k_norm_weight, Gemma's with weight offset 1), not as norm launches of their own: prefill and decode steps
    (eager and the one-token path) give transformers' greedy tokens and log-probabilities (fp32 tolerance).
    fused False: an attention without that launch (FlashInfer's: fused_rope off) runs the norms' own launches and
    RoPE in place, with the same results."""
    from pagoda.engine import runner
    from pagoda.engine.models import gemma2, llama

    if not fused:
        monkeypatch.setattr(runner._PagodaAttention, "fused_rope", False)
        monkeypatch.setattr(runner._LayerWindows, "fused_rope", False)

    path, hf = tiny_models[family]
    calls = {"norm": 0, "plain": 0, "offsets": set()}
    orig = pagoda.apply_rope_with_cos_sin_cache_and_append

    def spy(*a, **kw):
        calls["norm" if kw.get("q_norm_weight") is not None else "plain"] += 1
        calls["offsets"].add(kw.get("norm_weight_offset"))
        return orig(*a, **kw)

    monkeypatch.setattr(pagoda, "apply_rope_with_cos_sin_cache_and_append", spy)
    norm_cls = gemma2.GemmaRMSNorm if family == "gemma3" else llama.RMSNorm
    per_head = {"n": 0}
    orig_forward = norm_cls.forward

    def forward(self, x, residual=None):
        per_head["n"] += x.dim() == 3  # (the per-head norms' input: [tokens, heads, head_dim])
        return orig_forward(self, x, residual)

    monkeypatch.setattr(norm_cls, "forward", forward)
    llm = make_llm(path, enforce_eager=True)
    prompt = PROMPTS[3]
    assert_greedy_like_hf(llm, hf, prompt, 6)
    layers = llm.engine.config.num_layers
    if fused:
        assert calls["norm"] >= 6 * layers and calls["plain"] == 0 and per_head["n"] == 0
        assert calls["offsets"] == {1.0 if family == "gemma3" else 0.0}
    else:
        assert calls["norm"] == calls["plain"] == 0 and per_head["n"] >= 2 * 6 * layers


@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_token_steps_defer_the_norms(tiny_models, family, monkeypatch):
    """A lone request decodes one token a step: the layers run with their RMSNorms deferred into the
    projections and the activation (DecoderLayer.forward_one_token, the norm weights folded into qkv_proj and
    gate_up_proj at load; Gemma's (1 + w) input and pre-feedforward norms so, its post-norms added into the
    residual stream: Gemma2DecoderLayer.forward_one_token). Its greedy tokens and every step's log-probabilities equal transformers' (fp32
    tolerance), and equal the undeferred layers' (model.defer_norms off) to fp32 rounding."""
    from pagoda.engine.models import gemma2, llama

    path, hf = tiny_models[family]
    layer_cls = gemma2.Gemma2DecoderLayer if family.startswith("gemma") else llama.DecoderLayer
    calls = count_calls(monkeypatch, layer_cls, "forward_one_token")
    prompt = PROMPTS[3]
    sp = pagoda.SamplingParams(max_tokens=8, temperature=0, logprobs=3, ignore_eos=True)
    outs = {}
    for defer in (True, False):
        llm = make_llm(path, enforce_eager=True)
        assert llm.engine.model.norms_folded
        llm.engine.model.defer_norms = defer
        before = calls["n"]
        outs[defer] = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0]
        assert (calls["n"] - before > 0) == defer
    got = outs[True]
    assert got.token_ids == hf_greedy(hf, prompt, 8) == outs[False].token_ids
    ids = prompt + got.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)
    for i, (tok, step) in enumerate(zip(got.token_ids, got.logprobs)):
        for t, lp in step.items():
            assert abs(lp - ref[len(prompt) - 1 + i, t].item()) < 1e-4, (family, i, t)
            assert abs(lp - outs[False].logprobs[i][t]) < 1e-5, (family, i, t)


def test_fused_one_token_defaults(monkeypatch):
    """The one-token layers' fused kernels are on by default (qkv + RoPE + append since session 19, gate / up +
    SwiGLU since session 23) and each switch takes only 0 / 1."""
    from pagoda.engine.models.llama import fused_gate_up_act_default, fused_qkv_rope_default

    monkeypatch.delenv("PAGODA_FUSED_GATE_UP_ACT", raising=False)
    monkeypatch.delenv("PAGODA_FUSED_QKV_ROPE", raising=False)
    assert fused_gate_up_act_default() and fused_qkv_rope_default()
    monkeypatch.setenv("PAGODA_FUSED_GATE_UP_ACT", "0")
    assert not fused_gate_up_act_default()
    monkeypatch.setenv("PAGODA_FUSED_GATE_UP_ACT", "yes")
    with pytest.raises(ValueError, match="PAGODA_FUSED_GATE_UP_ACT"):
        fused_gate_up_act_default()


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_fused_qkv_rope_one_token_steps(tmp_path, monkeypatch, family):
    """PAGODA_FUSED_QKV_ROPE=1 / PAGODA_FUSED_GATE_UP_ACT=1: the one-token layers run the qkv projection, RoPE
    and the K/V append as one op (ops.linear_rope_append) and gate / up with the activation as one
    (ops.linear_silu_and_mul; Gemma 2's GeGLU ops.linear_gelu_tanh_and_mul); on the CPU in float32 their PyTorch
    forms, the kernels themselves are tested in tests/ops/test_matmul.py: greedy tokens and each step's
    log-probabilities equal transformers' (head_dim 64, the smallest the first op takes; norm weights that show
    their folding), and each op ran once per layer and decode step."""
    import transformers

    from .conftest import build_hf_model, tiny_config

    act = {"llama": "silu", "gemma2": "gelu_tanh"}[family]
    c = tiny_config(family)
    c.update(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256, head_dim=64)
    if family == "llama":
        cfg = transformers.LlamaConfig(**{k: v for k, v in c.items() if k not in ("architectures", "model_type")})
        cfg.architectures = c["architectures"]
        torch.manual_seed(3)
        hf = transformers.LlamaForCausalLM(cfg).eval()
        with torch.no_grad():  # norm weights other than 1: their folding into the projections shows
            for layer in hf.model.layers:
                layer.input_layernorm.weight.uniform_(0.5, 1.5)
                layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
        hf.save_pretrained(tmp_path, safe_serialization=True)
    else:  # (norm weights in (-0.5, 0.5))
        hf = build_hf_model(family, tmp_path, seed=3, **c)
    cfg = hf.config
    calls, act_calls = (count_calls(monkeypatch, pagoda.ops, name) for name in ("linear_rope_append",
                                                                             f"linear_{act}_and_mul"))
    monkeypatch.setenv("PAGODA_FUSED_QKV_ROPE", "1")
    monkeypatch.setenv("PAGODA_FUSED_GATE_UP_ACT", "1")
    n = 6
    assert_greedy_like_hf(make_llm(tmp_path, enforce_eager=True), hf, PROMPTS[0], n)
    assert calls["n"] == act_calls["n"] == cfg.num_hidden_layers * (n - 1)  # (the first from the prefill)
    monkeypatch.setenv("PAGODA_FUSED_QKV_ROPE", "maybe")
    with pytest.raises(ValueError, match="PAGODA_FUSED_QKV_ROPE"):
        make_llm(tmp_path)


def test_defer_norms_switch(monkeypatch):
    from pagoda.engine.models import llama

    for env, want in (("0", False), ("1", True)):
        monkeypatch.setenv("PAGODA_DEFER_NORMS", env)
        assert llama.defer_norms_default() is want
    monkeypatch.setenv("PAGODA_DEFER_NORMS", "yes")
    with pytest.raises(ValueError, match="PAGODA_DEFER_NORMS"):
        llama.defer_norms_default()


def test_step_overlap_switch(tiny_models, monkeypatch):
    """PAGODA_STEP_OVERLAP (the GPU's copy / read-back streams between decode steps) is 0 or 1, else a ValueError
    naming it; on the CPU (no graphs) it changes nothing: the same greedy tokens."""
    path = tiny_models["llama"][0]
    for env in ("PAGODA_STEP_OVERLAP", "PAGODA_EARLY_INPUTS", "PAGODA_DECODE_EARLY_KV"):
        monkeypatch.setenv(env, "on")
        with pytest.raises(ValueError, match=env):
            make_llm(path)
        monkeypatch.setenv(env, "1")
    outs = []
    for v in ("0", "1"):
        monkeypatch.setenv("PAGODA_STEP_OVERLAP", v)
        llm = make_llm(path)
        assert not llm.engine.runner.step_overlap and not llm.engine.runner.early_inputs
        outs.append(llm.generate([PROMPTS[0]], pagoda.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                                 use_tqdm=False)[0].outputs[0].token_ids)
    assert outs[0] == outs[1]


def test_sliding_window_model_beyond_its_window(tiny_models, tmp_path):
    """A Mistral-style model with a sliding window serves contexts longer than the window (the kernels apply
    window_left = sliding_window - 1): greedy tokens equal transformers' (which masks with the same window),
    through chunked prefill, a prefix-cache hit and mixed batches."""
    import json
    import shutil

    import transformers

    path, _ = tiny_models["mistral"]
    shutil.copytree(path, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["sliding_window"] = 12
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="eager").eval()
    prompts = [list(range(40, 77)), [300, 1, 200, 13] * 6, list(range(40, 77)) + [5, 6]]
    refs = [hf_greedy(hf, p, 12) for p in prompts]
    # the window matters for these prompts: without it transformers' own answer differs
    cfg["sliding_window"] = None
    (tmp_path / "full").mkdir()
    for f in (tmp_path / "m").iterdir():
        if f.name != "config.json":
            shutil.copy(f, tmp_path / "full" / f.name)
    (tmp_path / "full" / "config.json").write_text(json.dumps(cfg))
    hf_full = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "full", attn_implementation="eager").eval()
    assert any(hf_greedy(hf_full, p, 12) != r for p, r in zip(prompts, refs)), "window has no effect here"
    for caching in (True, False):
        llm = make_llm(tmp_path / "m", max_num_batched_tokens=16, enable_prefix_caching=caching)  # chunked prefill
        assert llm.engine.max_model_len == 512 and llm.engine.runner.window_left == 11
        sched, live = llm.engine.scheduler, []
        after = sched.after_step

        def spy(batch):  # pages each request still holds after a step: those behind the window go back
            after(batch)
            live.extend((r.num_computed, len(r.pages) - r.released, r.pages[:r.released]) for r in batch.requests)
        sched.after_step = spy
        outs = llm.generate(prompts, pagoda.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
                            use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == refs
        # page_size 4, window_left 11: a request keeps the pages of positions >= num_computed - 11 (<= 4 pages)
        # and the next step's (1 more), whatever its length (up to 50 tokens here)
        assert max(n for _, n, _ in live) <= 5 and max(c for c, _, _ in live) >= 40
        assert all(set(dropped) <= {0} for _, _, dropped in live), "released entries must be the reserved page"
        if caching:
            assert llm.engine.stats.prefix_hit_tokens > 0, "prompt 3 extends prompt 1: its pages should be reused"
        else:
            assert llm.engine.pool.num_free == llm.engine.pool.usable, "pages left allocated"


@pytest.mark.parametrize("tied", [False, True])
def test_defer_final_norm_folds_into_the_lm_head(tmp_path, monkeypatch, tied):
    """PAGODA_DEFER_FINAL_NORM=1: an untied lm_head takes the final RMSNorm's weight (the norm keeps weight 1), so
    one-token steps may leave the norm out (forward(final_norm=False), what the decode graphs do on the GPU):
    the logits of the un-normed hidden state times final_norm_scale equal the model's, greedy tokens and
    log-probabilities through the engine equal transformers' (norm weights other than 1, so the fold shows).
    A tied model keeps its norm (the embedding table is no place for the weight); final_norm=False where it
    cannot be left out is a ValueError."""
    import transformers

    from .conftest import tiny_config

    c = tiny_config("llama")
    c["tie_word_embeddings"] = tied
    cfg = transformers.LlamaConfig(**{k: v for k, v in c.items() if k not in ("architectures", "model_type")})
    cfg.architectures = c["architectures"]
    torch.manual_seed(5)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        hf.model.norm.weight.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    monkeypatch.setenv("PAGODA_DEFER_FINAL_NORM", "1")
    llm = make_llm(tmp_path, enforce_eager=True)
    model = llm.engine.model
    assert model.final_norm_folded == (not tied) and model.defers_final_norm(1) == (not tied)
    assert_greedy_like_hf(llm, hf, PROMPTS[0], 5)
    with pytest.raises(ValueError, match="final_norm=False"):
        model(torch.tensor([1, 2]), torch.tensor([0, 1]), None, final_norm=False)
    if not tied:  # the un-normed hidden state's logits, scaled, are the model's (one token, no attention needed)
        h = torch.randn(1, c["hidden_size"]) * 3
        want = model.compute_logits(model.norm(h))
        got = model.compute_logits(h) * model.final_norm_scale(h)[:, None]
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("PAGODA_DEFER_FINAL_NORM", "maybe")
    with pytest.raises(ValueError, match="PAGODA_DEFER_FINAL_NORM"):
        make_llm(tmp_path)


def test_gemma2_sliding_and_global_layers(tiny_models):
    """Gemma 2 (a window of 8 on layers 0 and 2, soft caps, query_pre_attn_scalar): a lone 37-token prompt
    prefilled in chunks of 8 and decoded one token a step gives transformers' tokens and log-probabilities
    (1e-4); each layer runs its window's attention (runner._LayerWindows), and running every layer over the whole
    context instead is caught by the same check; pages stay (the global layers read them); FlashInfer's backend,
    one window a model, is refused."""
    path, hf = tiny_models["gemma2"]
    llm = make_llm(path, max_num_batched_tokens=8)
    r = llm.engine.runner
    assert sorted(r.attn.parts) == [-1, 7] and [r.attn.for_layer(i).window_left for i in range(3)] == [7, -1, 7]
    assert llm.engine.scheduler.window_left == -1 and not r.enable_cascade
    prompt = PROMPTS[2]
    assert_greedy_like_hf(llm, hf, prompt, 10)
    r.attn.layers = [r.attn.parts[-1]] * 3  # (no window anywhere: the check must fail)
    with pytest.raises(AssertionError):
        assert_greedy_like_hf(llm, hf, prompt, 10)
    with pytest.raises(ValueError, match="one attention window"):
        make_llm(path, attention_backend="flashinfer", device="cpu")


def test_bundled_gemma2_config():
    """The bundled Gemma-2-9B config (`--load-format dummy` benchmarks): sliding layers first, every other one."""
    from pagoda.engine.config import ModelConfig
    from pagoda.engine.loader import resolve_model_path

    c = ModelConfig.from_path(resolve_model_path("Gemma-2-9B"))
    assert c.family == "gemma2" and c.uniform_window_left is None and c.head_dim == 256
    assert [c.layer_window_left(i) for i in range(4)] == [4095, -1, 4095, -1] and len(c.sliding_layers) == 42
    assert c.attn_scale == 256 ** -0.5 and (c.attn_soft_cap, c.final_soft_cap) == (50.0, 30.0)


def test_gemma3_multimodal_checkpoint_serves_its_text_model(tmp_path):
    """A Gemma3ForConditionalGeneration checkpoint (Gemma 3 4B-27B: a vision tower, a projector and the text model
    under language_model.*): the engine reads its text_config and the text weights only, and its completions are
    transformers' on the same checkpoint given token ids alone (1e-4)."""
    import transformers

    tc = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, sliding_window=8, sliding_window_pattern=3,
              query_pre_attn_scalar=24, max_position_embeddings=512, rope_scaling={"rope_type": "linear",
                                                                                   "factor": 2.0})
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
              patch_size=14)
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(
        transformers.Gemma3Config(text_config=tc, vision_config=vc, mm_tokens_per_image=4)).eval()
    hf.config.text_config._attn_implementation = "eager"
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n and "vision" not in n:
                p.uniform_(-0.5, 0.5)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    llm = make_llm(tmp_path)
    c = llm.engine.config
    assert c.family == "gemma3" and c.num_layers == 3 and c.vocab_size == 320
    for prompt in PROMPTS[2:]:
        assert_greedy_like_hf(llm, hf, prompt, 8)


def test_gemma3_hub_text_config_defaults():
    """The Hub's gemma-3-4b-it config.json gives its text_config only where it differs from transformers'
    Gemma3TextConfig: the rest comes from those defaults."""
    from pagoda.engine.config import ModelConfig

    c = ModelConfig.from_dict({
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "eos_token_id": [1, 106],
        "torch_dtype": "bfloat16", "text_config": {
            "hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text", "num_hidden_layers": 34,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024}})
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (8, 4, 256, 262_208)
    assert [c.layer_window_left(i) for i in range(6)] == [1023] * 5 + [-1] and c.layer_window_left(33) == 1023
    assert (c.rope_theta, c.local_rope_theta, c.rope_scaling["factor"]) == (1e6, 1e4, 8.0)
    assert c.attn_scale == 256 ** -0.5 and c.attn_soft_cap is None and c.final_soft_cap is None
    assert c.eos_token_ids == [1, 106] and c.dtype == torch.bfloat16 and c.tie_word_embeddings and c.qk_norm
