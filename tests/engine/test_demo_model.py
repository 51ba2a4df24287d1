"""The bundled pagoda-demo model through the text path: tokenizer, chat template, stop strings,
detokenization, the CLI; and the folder itself against transformers."""
import subprocess
import sys

import pytest
import torch

import pagoda
from pagoda.engine.loader import DEMO_MODEL


@pytest.fixture(scope="module")
def llm():
    return pagoda.LLM()


def test_bundled_folder_is_small_and_loads_in_transformers():
    import os

    from transformers import AutoModelForCausalLM

    size = sum(os.path.getsize(os.path.join(DEMO_MODEL, f)) for f in os.listdir(DEMO_MODEL))
    assert size < 16 * 2**20
    hf = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32)
    assert sum(p.numel() for p in hf.parameters()) < 8.5e6


def test_text_prompts_and_greedy_matches_transformers(llm):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    tok = llm.get_tokenizer()
    prompts = ["def fibonacci(n):", "for i in range("]
    outs = llm.generate(prompts, pagoda.SamplingParams(max_tokens=20, temperature=0, ignore_eos=True), use_tqdm=False)
    for p, o in zip(prompts, outs):
        ids = tok(p, return_tensors="pt").input_ids
        assert o.prompt == p and o.prompt_token_ids == ids[0].tolist()
        ref = hf.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None)[0, ids.shape[1]:].tolist()
        assert o.outputs[0].token_ids == ref
        assert o.outputs[0].text == tok.decode(ref, skip_special_tokens=True)


def test_stop_string_truncates(llm):
    sp = pagoda.SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    full = llm.generate(["def fibonacci(n):"], sp, use_tqdm=False)[0].outputs[0].text
    stop = full[10:14]
    assert stop and stop in full
    sp = pagoda.SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop])
    out = llm.generate(["def fibonacci(n):"], sp, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full[:full.index(stop)]


def test_chat_uses_the_template(llm):
    out = llm.chat([{"role": "user", "content": "Write a Python function: Return the sum of a list."}],
                   pagoda.SamplingParams(max_tokens=48, temperature=0), use_tqdm=False)[0]
    tok = llm.get_tokenizer()
    assert tok.decode(out.prompt_token_ids).endswith("<|assistant|>\n")
    assert "def " in out.outputs[0].text


def test_chat_with_a_template_and_tools(llm):
    """chat(chat_template=, tools=) as vLLM's LLM.chat: the given template renders the conversation and the tools
    (the server's tool-call test template), and the answer is the one generate() gives for that prompt."""
    import os

    with open(os.path.join(os.path.dirname(__file__), "..", "server", "tool_template.jinja")) as f:
        template = f.read()
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    sp = pagoda.SamplingParams(max_tokens=8, temperature=0)
    msgs = [{"role": "user", "content": "time?"}]
    out = llm.chat(msgs, sp, use_tqdm=False, chat_template=template, tools=tools)[0]
    text = llm.get_tokenizer().decode(out.prompt_token_ids)
    assert 'get_time: {"type": "object"}' in text and text.endswith("<|assistant|>\n"), text
    assert out.outputs[0].token_ids == llm.generate([out.prompt_token_ids], sp, use_tqdm=False)[0].outputs[0].token_ids
    assert "get_time" not in llm.get_tokenizer().decode(llm.chat(msgs, sp, use_tqdm=False)[0].prompt_token_ids)
    with pytest.raises(ValueError, match="tools"):
        llm.chat(msgs, sp, use_tqdm=False, tools="get_time")


def test_chat_messages_are_checked_and_text_parts_taken(llm):
    """chat() names what is wrong with its messages (ValueError), and takes OpenAI-style text parts as the server
    does: the same prompt as the plain string."""
    sp = pagoda.SamplingParams(max_tokens=2, temperature=0)
    for bad, match in (("hi", "messages must be"), ([], "messages must be"), ([{"role": "user", "content": 5}],
                       "message 0 of conversation 0"), ([[{"role": "user", "content": "a"}], "b"], "conversation 1")):
        with pytest.raises(ValueError, match=match):
            llm.chat(bad, sp, use_tqdm=False)
    plain = llm.chat([{"role": "user", "content": "Say hi."}], sp, use_tqdm=False)[0]
    parts = llm.chat([{"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi."}]}],
                     sp, use_tqdm=False)[0]
    assert parts.prompt_token_ids == plain.prompt_token_ids


def test_cli_generate():
    r = subprocess.run([sys.executable, "-m", "pagoda", "generate", "def add(a, b):", "--max-tokens", "16"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "def add(a, b):" in r.stdout and "tokens/s" in r.stdout
    r = subprocess.run([sys.executable, "-m", "pagoda", "generate", "x", "--max-tokens", "0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "max_tokens" in r.stderr


def test_incremental_text_is_a_prefix_of_the_final_text(llm):
    """What a stream shows at every step is a prefix of the final text, which equals a full decode."""
    e = llm.engine
    tok = llm.get_tokenizer()
    prompts = ["# -*- coding: utf-8 -*-\n\"\"\"Émile's café: naïve ", "def f(x):\n    return x"]
    # (64 tokens: each step is ~0.7 s under the interpreter, the longest test of CI at 120)
    sp = [pagoda.SamplingParams(max_tokens=64, temperature=1.2, seed=s, ignore_eos=True) for s in (1, 2)]
    ids = [e.add_request(p, q) for p, q in zip(prompts, sp)]
    seen = {i: [] for i in ids}
    final = {}
    while e.has_unfinished():
        for out in e.step():
            seen[out.request_id].append(out.outputs[0].text)
            if out.finished:
                final[out.request_id] = out.outputs[0]
    for rid in ids:
        f = final[rid]
        assert f.text == tok.decode(f.token_ids, skip_special_tokens=True)
        assert all(f.text.startswith(t) for t in seen[rid])
        assert len(seen[rid]) >= 50


def test_bad_words(llm):
    """bad_words (vLLM's): a word of one token is never sampled, and greedy output equals transformers'
    generate(bad_words_ids=...) over the same token sequences; a word of several tokens never appears whole;
    without a tokenizer it is a ValueError naming the field."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    tok = llm.get_tokenizer()
    prompt = "def fibonacci(n):"
    free = llm.generate([prompt], pagoda.SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    # a single-token word that greedy decoding emits
    single = next(t for t in free.token_ids if tok.decode([t]).strip() and len(tok.encode(
        tok.decode([t]).strip(), add_special_tokens=False)) == 1)
    word = tok.decode([single]).strip()
    sp = pagoda.SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, bad_words=[word])
    got = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
    seqs = llm.engine._bad_words_ids([word])
    assert all(t not in got for s in seqs if len(s) == 1 for t in s)
    ids = tok(prompt, return_tensors="pt").input_ids
    ref = hf.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None, bad_words_ids=seqs)[0, ids.shape[1]:]
    assert got == ref.tolist()
    multi = next(w for w in free.text.split() if len(tok.encode(w, add_special_tokens=False)) >= 2)
    got = llm.generate([prompt], pagoda.SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                       bad_words=[multi]), use_tqdm=False)[0].outputs[0].token_ids
    for s in llm.engine._bad_words_ids([multi]):
        assert not any(got[i:i + len(s)] == s for i in range(len(got))), (multi, s, got)
    with pytest.raises(ValueError, match="bad_words"):
        pagoda.SamplingParams(bad_words=[" "])
    bare = pagoda.LLM(skip_tokenizer_init=True)
    with pytest.raises(ValueError, match="bad_words"):
        bare.generate([[5, 6, 7]], pagoda.SamplingParams(bad_words=["x"]), use_tqdm=False)


def test_chat_with_a_lora_adapter(tmp_path):
    """LLM.chat(lora_request=): the conversation's template ids through the adapter, as generate() gives them with
    the same LoRARequest (the text path of a LoRA engine), and not the base model's tokens."""
    from ..server.test_server import demo_adapter

    lora = pagoda.LoRARequest("chat", 1, demo_adapter(tmp_path / "chat", seed=5))
    llm = pagoda.LLM(enable_lora=True, num_kv_pages=256)
    msgs = [{"role": "user", "content": "Write a Python function: Return the sum of a list."}]
    sp = pagoda.SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    out = llm.chat(msgs, sp, use_tqdm=False, lora_request=lora)[0]
    again = llm.generate([out.prompt_token_ids], sp, use_tqdm=False, lora_request=lora)[0]
    base = llm.generate([out.prompt_token_ids], sp, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == again.outputs[0].token_ids != base.outputs[0].token_ids
