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
