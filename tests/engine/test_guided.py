"""Guided decoding (SamplingParams.guided_decoding, vLLM's GuidedDecodingParams over xgrammar) on the bundled model:
every completion, sampled with several seeds, is in the language asked for; bad grammars and engines that cannot
guide are ValueErrors naming the field."""
import json
import re

import pytest
import torch

import pagoda
from pagoda.engine.guided import GuidedDecodingParams, guided_from_openai
from pagoda.engine.loader import DEMO_MODEL

pytest.importorskip("xgrammar")

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 10},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}}}


@pytest.fixture(scope="module", autouse=True)
def _pytorch_ops():
    """The engine's ops on their PyTorch path (not Triton's interpreter, which the op tests cover): these tests
    decode a few hundred steps."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TRITON_INTERPRET", raising=False)
        yield


@pytest.fixture(scope="module")
def llm(_pytorch_ops):
    return pagoda.LLM(DEMO_MODEL, device="cpu", num_kv_pages=512)


def _gen(llm, guided, n=1, seeds=(0, 1, 2), max_tokens=96, temperature=0.9):
    """One batch: a request a seed (n samples each), all decoding in the same steps."""
    sps = [pagoda.SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature, seed=seed,
                                 guided_decoding=guided) for seed in seeds]
    return [o for r in llm.generate(["A record:"] * len(seeds), sps, use_tqdm=False) for o in r.outputs]


def test_choice_regex_and_grammar(llm):
    for out in _gen(llm, GuidedDecodingParams(choice=["red", "green", "blue (dark)"]), n=2):
        assert out.text in ("red", "green", "blue (dark)") and out.finish_reason == "stop", out
    for out in _gen(llm, GuidedDecodingParams(regex=r"[0-9]{3}-[a-z]{2,4}")):
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", out.text) and out.finish_reason == "stop", out
    for out in _gen(llm, GuidedDecodingParams(grammar='root ::= "yes" | "no" | "maybe " [0-9]')):
        assert re.fullmatch(r"yes|no|maybe [0-9]", out.text), out


def test_json_schema_and_json_object(llm):
    """With disable_any_whitespace the bounded schema completes well within max_tokens: each output parses and
    holds the schema (types, bounds, no extra keys); json_object: a JSON object."""
    for out in _gen(llm, GuidedDecodingParams(json=SCHEMA, disable_any_whitespace=True)):
        assert out.finish_reason == "stop", out
        v = json.loads(out.text)
        assert set(v) == {"name", "age", "tags"} and isinstance(v["name"], str) and len(v["name"]) <= 10
        assert isinstance(v["age"], int) and 0 <= v["age"] <= 120 and set(v["tags"]) <= {"a", "b", "c"}
    for out in _gen(llm, GuidedDecodingParams(json_object=True, disable_any_whitespace=True), max_tokens=40):
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), dict), out
        else:  # (an object longer than the budget: a prefix of one)
            assert out.text.startswith("{") and "\n" not in out.text, out


def test_unguided_output_is_not_in_the_language(llm):
    """The same sampling without the grammar leaves it (so the tests above test the mask, not the model)."""
    outs = _gen(llm, None, max_tokens=8)
    assert not all(o.text in ("red", "green", "blue (dark)") for o in outs)


def test_guided_requests_beside_plain_ones(llm):
    """A batch mixing guided and plain requests (the plain ones unchanged against running alone, greedy)."""
    plain = pagoda.SamplingParams(max_tokens=12, temperature=0)
    alone = llm.generate(["Hello there", "Once upon"], plain, use_tqdm=False)
    guided = pagoda.SamplingParams(max_tokens=12, temperature=0, guided_decoding=GuidedDecodingParams(regex="[ab]+"))
    mixed = llm.generate(["Hello there", "Once upon", "x"], [plain, plain, guided], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[:2]] == [o.outputs[0].token_ids for o in alone]
    assert re.fullmatch("[ab]+", mixed[2].outputs[0].text)


def test_bad_input_names_the_field(llm):
    for kw, msg in [(dict(), "exactly one"), (dict(regex="a", choice=["b"]), "exactly one"),
                    (dict(choice=[]), "choice"), (dict(choice=["a", ""]), "choice"), (dict(regex=""), "regex"),
                    (dict(json=3), "json"), (dict(json_object="yes"), "json_object")]:
        with pytest.raises(ValueError, match=msg):
            GuidedDecodingParams(**kw)
    with pytest.raises(ValueError, match="guided_decoding"):
        pagoda.SamplingParams(guided_decoding={"regex": "a"})
    for g, msg in [(GuidedDecodingParams(regex="(unclosed"), "GuidedDecodingParams.regex"),
                   (GuidedDecodingParams(grammar="root ::= undefined_rule"), "GuidedDecodingParams.grammar"),
                   (GuidedDecodingParams(json='{"type": "object", "properties": 5}'), "GuidedDecodingParams.json")]:
        with pytest.raises(ValueError, match=msg):
            llm.generate(["x"], pagoda.SamplingParams(max_tokens=2, guided_decoding=g), use_tqdm=False)
    assert not llm.engine.requests  # (nothing left behind by the refused requests)
    ids_only = pagoda.LLM(DEMO_MODEL, device="cpu", num_kv_pages=64, skip_tokenizer_init=True)
    with pytest.raises(ValueError, match="tokenizer"):
        ids_only.generate([[5, 6]], pagoda.SamplingParams(guided_decoding=GuidedDecodingParams(regex="a")),
                          use_tqdm=False)


def test_openai_fields():
    assert guided_from_openai({}) is None
    assert guided_from_openai({"response_format": {"type": "text"}}) is None
    g = guided_from_openai({"response_format": {"type": "json_object"}})
    assert g.json_object and g.source == "response_format"
    g = guided_from_openai({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}})
    assert g.json == SCHEMA
    assert guided_from_openai({"guided_choice": ["a", "b"]}).choice == ["a", "b"]
    assert guided_from_openai({"guided_regex": "a+"}).source == "guided_regex"
    for body, msg in [({"guided_regex": "a", "guided_choice": ["b"]}, "only one"),
                      ({"response_format": {"type": "xml"}}, "response_format"),
                      ({"response_format": {"type": "json_schema"}}, "response_format"),
                      ({"guided_choice": "ab"}, "guided_choice")]:
        with pytest.raises(ValueError, match=msg):
            guided_from_openai(body)


def test_processor_masks_the_row():
    """The logits processor on its own: after "ye" only "s"-continuations keep a finite logit; after the whole word
    only the stop tokens; a token off the grammar is a ValueError (the engine ends that request with "error")."""
    from transformers import AutoTokenizer

    from pagoda.engine.guided import GuidedCompiler

    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    comp = GuidedCompiler(tok, 4096, {tok.eos_token_id})
    proc = comp.processor(GuidedDecodingParams(choice=["yes", "no"]))
    row = torch.randn(4096)
    first = proc([], row)
    allowed = (first > -1e29).nonzero()[:, 0].tolist()
    assert allowed and all(tok.decode([t]) in ("y", "ye", "yes", "n", "no") for t in allowed)
    full = tok.encode("yes", add_special_tokens=False)
    last = proc(full, row)
    assert (last > -1e29).nonzero()[:, 0].tolist() == [tok.eos_token_id]
    proc2 = comp.processor(GuidedDecodingParams(choice=["yes", "no"]))
    with pytest.raises(ValueError, match="does not continue"):
        proc2(tok.encode("maybe", add_special_tokens=False), row)
