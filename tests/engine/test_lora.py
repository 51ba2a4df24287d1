"""Multi-LoRA serving (engine/lora.py) against PEFT: adapters saved by PEFT itself, each request's greedy tokens
and log-probabilities against transformers running PEFT's merged model (W + scaling * B A), with requests of
several adapters and of none in the same steps; the prefix cache kept per adapter, more adapters than device
slots, chunked prefill and preemption, and bad input."""
import copy
import json

import pytest
import torch

import pagoda
from pagoda.engine import ModelConfig
from pagoda.engine.lora import LoRAManager, load_adapter

from .test_models import check_like_hf, hf_greedy, make_llm

PROMPTS = [[5, 17, 99, 3, 250, 41, 7], list(range(40, 77)), [300, 1, 200, 13, 13, 13, 9, 8, 77, 66, 55], [11] * 9]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_adapter(hf, path, r, alpha, targets, seed, rslora=False):
    """A PEFT LoRA adapter of hf with random A and B (PEFT's init_lora_weights=False, then scaled so that the
    adapter moves the logits well past the test's tolerance), saved in path; returns transformers' merged model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(hf), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                         init_lora_weights=False, use_rslora=rslora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.mul_(3.0)
    model.save_pretrained(path)
    return model.merge_and_unload().eval()


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory):
    """Per family: two adapters (all seven projections at rank 8; q / v only at rank 4 with rsLoRA) and their
    merged models."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for fam in ("llama", "qwen2", "qwen3", "gemma2", "gemma3"):
        _, hf = tiny_models[fam]
        a = peft_adapter(hf, root / f"{fam}-a", 8, 16, ALL, 1)
        b = peft_adapter(hf, root / f"{fam}-b", 4, 8, ["q_proj", "v_proj"], 2, rslora=True)
        out[fam] = {1: (pagoda.LoRARequest("a", 1, str(root / f"{fam}-a")), a),
                    2: (pagoda.LoRARequest("b", 2, str(root / f"{fam}-b")), b)}
    return out


def greedy(n=8):
    return pagoda.SamplingParams(max_tokens=n, temperature=0, logprobs=3, ignore_eos=True)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma2", "gemma3"])
def test_mixed_adapters_in_one_batch_match_peft(tiny_models, adapters, family):
    path, hf = tiny_models[family]
    (ra, hfa), (rb, hfb) = adapters[family][1], adapters[family][2]
    llm = make_llm(path, enable_lora=True, max_loras=2, max_lora_rank=8)
    loras = [ra, rb, None, ra]
    refs = [hfa, hfb, hf, hfa]
    outs = llm.generate(PROMPTS, greedy(), use_tqdm=False, lora_request=loras)
    for p, o, ref in zip(PROMPTS, outs, refs):
        check_like_hf(ref, p, o.outputs[0], 8)
    # the adapters matter: each one's tokens differ from the base model's on some prompt
    for model in (hfa, hfb):
        assert any(hf_greedy(model, p, 8) != hf_greedy(hf, p, 8) for p in PROMPTS)
    # one adapter for every prompt, and the chat-free single-request form
    outs = llm.generate(PROMPTS[:2], greedy(), use_tqdm=False, lora_request=rb)
    for p, o in zip(PROMPTS[:2], outs):
        check_like_hf(hfb, p, o.outputs[0], 8)


def test_prefix_cache_is_kept_per_adapter(tiny_models, adapters):
    """The same prompt under adapter a, the base model and adapter b: each first run computes the whole prompt
    (no other adapter's pages), a second run under a hits a's pages; every output is its own model's."""
    path, hf = tiny_models["llama"]
    (ra, hfa), (rb, hfb) = adapters["llama"][1], adapters["llama"][2]
    llm = make_llm(path, enable_lora=True, max_loras=2, max_lora_rank=8)
    prompt = PROMPTS[1]  # 37 tokens, 9 full pages of 4
    for lora, ref, cached in ((ra, hfa, 0), (None, hf, 0), (rb, hfb, 0), (ra, hfa, 36), (None, hf, 36)):
        out = llm.generate([prompt], greedy(), use_tqdm=False, lora_request=lora)[0]
        assert out.num_cached_tokens == cached, lora
        check_like_hf(ref, prompt, out.outputs[0], 8)


def test_more_adapters_than_slots(tiny_models, adapters, tmp_path):
    """Three adapters, one device slot: the scheduler never runs two adapters at once, the slot is rewritten as
    they take turns, and every request gets its own adapter's tokens; n=2 samples of an adapter's prompt too."""
    path, hf = tiny_models["llama"]
    (ra, hfa), (rb, hfb) = adapters["llama"][1], adapters["llama"][2]
    rc = pagoda.LoRARequest("c", 3, str(tmp_path / "c"))
    hfc = peft_adapter(hf, tmp_path / "c", 2, 4, ["o_proj", "down_proj", "up_proj"], 3)
    llm = make_llm(path, enable_lora=True, max_loras=1, max_lora_rank=8)
    sched = llm.engine.scheduler
    orig, seen = sched.schedule, []

    def schedule():
        b = orig()
        seen.append({r.lora_id for r in sched.running} - {0})
        return b
    sched.schedule = schedule
    loras = [ra, rb, rc, None, rc, ra]
    refs = [hfa, hfb, hfc, hf, hfc, hfa]
    prompts = PROMPTS + PROMPTS[:2]
    sp = pagoda.SamplingParams(max_tokens=8, temperature=0, logprobs=3, ignore_eos=True, n=2)
    outs = llm.generate(prompts, sp, use_tqdm=False, lora_request=loras)
    for p, o, ref in zip(prompts, outs, refs):
        for c in o.outputs:
            check_like_hf(ref, p, c, 8)
    assert max(len(s) for s in seen) == 1
    assert llm.engine.lora.loads >= 3


def test_chunked_prefill_and_preemption_with_adapters(tiny_models, adapters):
    path, hf = tiny_models["qwen2"]
    (ra, hfa), (rb, hfb) = adapters["qwen2"][1], adapters["qwen2"][2]
    llm = make_llm(path, enable_lora=True, max_loras=2, max_lora_rank=8, num_kv_pages=15,
                   max_num_batched_tokens=8)
    loras, refs = [rb, None, ra, rb], [hfb, hf, hfa, hfb]
    outs = llm.generate(PROMPTS, greedy(12), use_tqdm=False, lora_request=loras)
    assert llm.engine.stats.preemptions > 0
    for p, o, ref in zip(PROMPTS, outs, refs):
        check_like_hf(ref, p, o.outputs[0], 12)
    e = llm.engine
    assert e.pool.num_free + e.prefix_cache.evictable() == e.pool.usable, "pages leaked"


def test_adapter_bin_file_and_partial_layers(tiny_models, adapters, tmp_path):
    """adapter_model.bin (PEFT's older format) loads as the safetensors file does; an adapter of one layer only
    leaves the other layer as it is."""
    from safetensors.torch import load_file

    path, hf = tiny_models["llama"]
    ra, hfa = adapters["llama"][1]
    folder = tmp_path / "bin"
    folder.mkdir()
    w = load_file(f"{ra.lora_path}/adapter_model.safetensors")
    torch.save(w, folder / "adapter_model.bin")
    (folder / "adapter_config.json").write_text(open(f"{ra.lora_path}/adapter_config.json").read())
    llm = make_llm(path, enable_lora=True, max_lora_rank=8)
    out = llm.generate([PROMPTS[0]], greedy(), use_tqdm=False,
                       lora_request=pagoda.LoRARequest("bin", 5, str(folder)))[0]
    check_like_hf(hfa, PROMPTS[0], out.outputs[0], 8)
    # layer 1's weights only: the merged model is the base with layer 1 replaced by the adapter's merged layer
    one = tmp_path / "one"
    one.mkdir()
    from safetensors.torch import save_file

    save_file({k: v for k, v in w.items() if ".layers.1." in k}, one / "adapter_model.safetensors")
    (one / "adapter_config.json").write_text(open(f"{ra.lora_path}/adapter_config.json").read())
    ref = copy.deepcopy(hf)
    ref.model.layers[1] = copy.deepcopy(hfa.model.layers[1])
    out = llm.generate([PROMPTS[2]], greedy(), use_tqdm=False,
                       lora_request=pagoda.LoRARequest("one", 6, str(one)))[0]
    check_like_hf(ref.eval(), PROMPTS[2], out.outputs[0], 8)


def test_bad_lora_input_is_a_value_error_and_the_engine_keeps_serving(tiny_models, adapters, tmp_path):
    path, hf = tiny_models["llama"]
    ra, hfa = adapters["llama"][1]
    plain = make_llm(path)
    with pytest.raises(ValueError, match="enable_lora=True"):
        plain.generate([PROMPTS[0]], greedy(), use_tqdm=False, lora_request=ra)
    for kw, msg in ((dict(lora_name=""), "lora_name"), (dict(lora_int_id=0), "lora_int_id"),
                    (dict(lora_int_id=True), "lora_int_id"), (dict(lora_path=""), "lora_path")):
        args = dict(lora_name="x", lora_int_id=1, lora_path="p")
        args.update(kw)
        with pytest.raises(ValueError, match=msg):
            pagoda.LoRARequest(**args)
    for kw, msg in ((dict(max_loras=0), "max_loras"), (dict(max_lora_rank=-1), "max_lora_rank"),
                    (dict(max_loras=2, max_cpu_loras=1), "max_cpu_loras"), (dict(enable_lora=1), "enable_lora")):
        with pytest.raises(ValueError, match=msg):
            make_llm(path, **({"enable_lora": True} | kw))
    llm = make_llm(path, enable_lora=True, max_lora_rank=4)

    def bad_folder(name, edit_cfg=None, edit_w=None):
        from safetensors.torch import load_file, save_file

        d = tmp_path / name
        d.mkdir()
        cfg = json.loads(open(f"{ra.lora_path}/adapter_config.json").read())
        cfg.update(r=4, lora_alpha=8)  # (a's first 4 ranks: an adapter this engine takes, before the edit)
        w = {k: (v[:4] if "lora_A" in k else v[:, :4]).contiguous()
             for k, v in load_file(f"{ra.lora_path}/adapter_model.safetensors").items()}
        if edit_cfg:
            edit_cfg(cfg)
        if edit_w:
            w = edit_w(w)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        save_file(w, d / "adapter_model.safetensors")
        return str(d)

    def widen(w):  # an lm_head adapter
        w = dict(w)
        w["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, 64)
        return w

    def reshape(w):
        k = next(k for k in w if "q_proj.lora_B" in k)
        return dict(w, **{k: torch.zeros(10, 4)})

    def unpaired(w):
        return {k: v for k, v in w.items() if "layers.0.self_attn.q_proj.lora_B" not in k}

    cases = [
        (ra, "over max_lora_rank=4"),
        (pagoda.LoRARequest("m", 7, str(tmp_path / "missing")), "is not a folder"),
        (pagoda.LoRARequest("e", 8, bad_folder("empty-cfg", edit_w=lambda w: {})),
         "holds no LoRA weights"),
        (pagoda.LoRARequest("h", 9, bad_folder("head", edit_w=widen)),
         "lm_head"),
        (pagoda.LoRARequest("s", 10, bad_folder("shape", edit_w=reshape)),
         "has shape"),
        (pagoda.LoRARequest("u", 11, bad_folder("unpaired", edit_w=unpaired)),
         "without its pair"),
        (pagoda.LoRARequest("d", 12, bad_folder("dora", edit_cfg=lambda c: c.update(use_dora=True))),
         "use_dora"),
        (pagoda.LoRARequest("b", 13, bad_folder("bias", edit_cfg=lambda c: c.update(bias="all"))), "bias"),
        (pagoda.LoRARequest("p", 14, bad_folder("prefix", edit_cfg=lambda c: c.update(peft_type="PREFIX_TUNING"))),
         "peft_type"),
        ("a", "pagoda.LoRARequest"),
    ]
    for lora, msg in cases:
        with pytest.raises(ValueError, match=msg):
            llm.generate([PROMPTS[0]], greedy(), use_tqdm=False, lora_request=lora)
    with pytest.raises(ValueError, match="2 lora_request entries for 1 prompts"):
        llm.generate([PROMPTS[0]], greedy(), use_tqdm=False, lora_request=[None, None])
    ok = pagoda.LoRARequest("ok", 20, bad_folder("ok"))
    llm.generate([PROMPTS[0]], greedy(2), use_tqdm=False, lora_request=ok)
    with pytest.raises(ValueError, match="lora_int_id 20 is 'ok'"):
        llm.generate([PROMPTS[0]], greedy(), use_tqdm=False, lora_request=pagoda.LoRARequest("other", 20, ok.lora_path))
    assert not llm.engine.has_unfinished()
    out = llm.generate([PROMPTS[0]], greedy(), use_tqdm=False)[0]  # still serving
    check_like_hf(hf, PROMPTS[0], out.outputs[0], 8)


def test_manager_slots_are_least_recently_used(tiny_models, adapters):
    """slots_for: requests of one adapter share its slot, none takes slot 0, a new adapter replaces the least
    recently used one that the step does not hold, and a step of more adapters than slots is refused."""
    path, _ = tiny_models["llama"]
    cfg = ModelConfig.from_path(str(path))
    m = LoRAManager(cfg, "cpu", torch.float32, max_loras=2, max_lora_rank=8)
    ra, rb = adapters["llama"][1][0], adapters["llama"][2][0]
    rc = pagoda.LoRARequest("c", 3, ra.lora_path)

    class R:
        def __init__(self, lr):
            self.lora_request = lr
    for lr in (ra, rb, rc):
        m.register(lr)
    assert m.slots_for([R(ra), R(None), R(ra), R(rb)]).tolist() == [1, 0, 1, 2]
    assert m.slots_for([R(rb)]).tolist() == [2]
    assert m.slots_for([R(rc), R(rb)]).tolist() == [1, 2]  # a (slot 1) was used least recently
    assert m.loads == 3
    with pytest.raises(RuntimeError, match="over max_loras=2"):
        m.slots_for([R(ra), R(rb), R(rc)])
    # the slot holds the adapter's weights, B scaled (alpha / r = 2), zeros past its rank and outside its parts
    a = load_adapter(rc.lora_path, cfg, 8)
    la, lb = a.weights[0, "k_proj"]
    wa, wb = m.weights[0]["qkv"]
    assert torch.equal(wa[1, 8:16], la) and torch.allclose(wb[1, 64:96, 8:16], lb * 2.0)  # (k: rows 64..95)
    assert not wb[1, 64:96, :8].any() and not wa[0].any() and not wb[0].any()


def test_target_modules_limit_the_slots_and_the_launches(tiny_models, adapters):
    """lora_target_modules=[q_proj, v_proj] (SGLang's flag; PEFT's default adapters): only the fused q/k/v projection
    holds slots (the other three run no LoRA launch), a q / v adapter gives PEFT's tokens, an adapter of other
    modules is refused naming the flag, and bad lists are ValueErrors."""
    path, hf = tiny_models["llama"]
    (ra, _), (rb, hfb) = adapters["llama"][1], adapters["llama"][2]
    llm = make_llm(path, enable_lora=True, max_lora_rank=8, lora_target_modules=["v_proj", "q_proj"])
    m = llm.engine.lora
    assert m.target_modules == ("q_proj", "v_proj") and all(set(w) == {"qkv"} for w in m.weights)
    outs = llm.generate(PROMPTS[:2], greedy(), use_tqdm=False, lora_request=rb)
    for p, o in zip(PROMPTS[:2], outs):
        check_like_hf(hfb, p, o.outputs[0], 8)
    with pytest.raises(ValueError, match="adapts '\\w+_proj', outside the engine's lora_target_modules"):
        llm.generate(PROMPTS[:1], greedy(), use_tqdm=False, lora_request=ra)
    for bad in ("q_proj", [], ["q_proj", "lm_head"]):
        with pytest.raises(ValueError, match="lora_target_modules must be"):
            make_llm(path, enable_lora=True, lora_target_modules=bad)


def test_adapters_of_live_requests_stay_on_the_host(tiny_models, adapters, tmp_path):
    """max_cpu_loras=1, one device slot, two adapters whose folders are deleted right after their requests are added:
    every request still gets its adapter's tokens (the parsed adapters of live requests are not evicted from the host,
    so no step reads a folder again), and once they are done the host keeps max_cpu_loras of them."""
    import shutil

    path, hf = tiny_models["llama"]
    (ra, hfa), (rb, hfb) = adapters["llama"][1], adapters["llama"][2]
    copies = []
    for r in (ra, rb):
        shutil.copytree(r.lora_path, tmp_path / r.lora_name)
        copies.append(pagoda.LoRARequest(r.lora_name, r.lora_int_id, str(tmp_path / r.lora_name)))
    llm = make_llm(path, enable_lora=True, max_loras=1, max_lora_rank=8, max_cpu_loras=1)
    e = llm.engine
    ids = [e.add_request(p, greedy(), lora_request=lr) for p, lr in zip(PROMPTS, copies + copies)]
    for c in copies:
        shutil.rmtree(c.lora_path)
    assert len(e.lora.host) == 2
    done = {}
    while e.has_unfinished():
        for out in e.step():
            if out.finished:
                done[out.request_id] = out
    for rid, p, ref in zip(ids, PROMPTS, [hfa, hfb, hfa, hfb]):
        check_like_hf(ref, p, done[rid].outputs[0], 8)
    assert e.lora.loads >= 2 and len(e.lora.host) == 1 and not e.lora.live


def test_save_adapter_round_trip(tiny_models, tmp_path):
    """save_adapter writes what load_adapter reads (PEFT's names and config): the same weights, rank and scaling;
    one rank for all modules."""
    from pagoda.engine.lora import random_lora_weights, save_adapter

    path, _ = tiny_models["qwen3"]
    cfg = ModelConfig.from_path(str(path))
    w = random_lora_weights(cfg, 4, 0.5, torch.Generator().manual_seed(0), ["k_proj", "down_proj"])
    a = load_adapter(save_adapter(tmp_path / "rt", w, 12), cfg, 8)
    assert (a.rank, a.scaling) == (4, 3.0) and set(a.weights) == set(w)
    assert all(torch.equal(a.weights[k][0], w[k][0]) and torch.equal(a.weights[k][1], w[k][1]) for k in w)
    w[0, "k_proj"] = (w[0, "k_proj"][0][:2], w[0, "k_proj"][1][:, :2])
    with pytest.raises(ValueError, match="share one rank"):
        save_adapter(tmp_path / "bad", w, 4)
