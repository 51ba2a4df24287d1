"""Tool calling's parts without a server (pagoda/server/tools.py): tools and tool_choice checks, the guided
schemas of "required" / a named function, the hermes and llama3_json parsers, and a stream's holding back."""
import json

import pytest

from pagoda.server.tools import (StreamSplitter, ToolError, check_tools, guided_for, parse_forced, parse_tool_calls,
                                 template_messages, tool_mode)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}  # (no parameters: an empty object schema)


def _calls(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_tools_and_tool_choice():
    tools = check_tools([WEATHER, TIME])
    assert tools[1]["function"]["parameters"] == {"type": "object", "properties": {}}
    assert tool_mode(None, tools, "hermes") == "auto" and tool_mode(None, [], None) == "none"
    assert tool_mode("auto", [], None) == "none"  # (clients send "auto" without tools)
    assert tool_mode("none", tools, None) == "none" and tool_mode("required", tools, None) == "required"
    assert tool_mode({"type": "function", "function": {"name": "get_time"}}, tools, None) is tools[1]
    for bad_tools in ("x", [{"type": "retrieval"}], [{"function": {"name": ""}}], [WEATHER, WEATHER],
                      [{"function": {"name": "f", "parameters": []}}]):
        with pytest.raises(ToolError) as e:
            check_tools(bad_tools)
        assert e.value.param == "tools"
    for choice, tl, parser in (("auto", tools, None), (None, tools, None), ("required", [], None),
                               ({"type": "function", "function": {"name": "nope"}}, tools, None),
                               ({"type": "function"}, tools, None), ("sometimes", tools, "hermes")):
        with pytest.raises(ToolError) as e:
            tool_mode(choice, tl, parser)
        assert e.value.param == "tool_choice", choice


def test_guided_schemas():
    tools = check_tools([WEATHER, TIME])
    assert guided_for("none", tools) is None and guided_for("auto", tools) is None
    req = guided_for("required", tools)
    assert req.disable_any_whitespace and req.json["minItems"] == 1
    names = [i["properties"]["name"]["enum"] for i in req.json["items"]["anyOf"]]
    assert names == [["get_weather"], ["get_time"]]
    assert "maxItems" not in req.json and guided_for("required", tools, parallel=False).json["maxItems"] == 1
    assert guided_for(tools[0], tools).json == WEATHER["function"]["parameters"]
    assert _calls(parse_forced('[{"name":"get_weather","parameters":{"city":"Oslo"}},{"name":"get_time",'
                               '"parameters":{}}]', "required")) == [("get_weather", {"city": "Oslo"}),
                                                                      ("get_time", {})]
    assert _calls(parse_forced('{"city":"Rome"}', tools[0])) == [("get_weather", {"city": "Rome"})]
    assert parse_forced('[{"name":"get_weather","param', "required") == []  # (cut by max_tokens)


def test_hermes_parser():
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n' \
           '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    content, calls = parse_tool_calls(text, "hermes")
    assert content == "Let me check.\n" and _calls(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert calls[0]["type"] == "function" and calls[0]["id"] != calls[1]["id"]
    content, calls = parse_tool_calls('<tool_call>{"name": "get_time", "arguments": {}}</tool_call>', "hermes")
    assert content is None and len(calls) == 1
    # an unclosed last call (the output ended in it) still parses; text that is no call stays content
    assert len(parse_tool_calls('<tool_call>{"name": "get_time", "arguments": {}}', "hermes")[1]) == 1
    for text in ("no calls here", '<tool_call>{"name": "get_time", "argum', "<tool_call>[1, 2]</tool_call>",
                 '<tool_call>{"name": "get_time"}</tool_call> and then prose'):
        assert parse_tool_calls(text, "hermes") == (text, []), text


def test_llama3_json_parser():
    content, calls = parse_tool_calls('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; '
                                      '{"name": "get_time", "parameters": {}}', "llama3_json")
    assert content is None and _calls(calls) == [("get_weather", {"city": "Oslo"}), ("get_time", {})]
    assert _calls(parse_tool_calls(' {"name": "get_time", "arguments": {}}', "llama3_json")[1]) == [("get_time", {})]
    for text in ("Sure: {}", '{"name": "get_weather", "parameters": {"ci', '{"city": "Oslo"}', "[1]"):
        assert parse_tool_calls(text, "llama3_json") == (text, []), text
    with pytest.raises(ValueError, match="parser"):
        parse_tool_calls("x", "mistral_v9")


def test_mistral_parser():
    """Mistral's [TOOL_CALLS]: the JSON-array form (7B v0.3, Nemo) and the name[ARGS]{...} form (tokenizers v11+),
    text before it as content, ids of 9 letters and digits (Mistral's templates refuse others); anything else after
    the token is content; streamed as the others (the array form and the name form)."""
    import re

    text = 'Sure. [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Lyon"}}, {"name": "get_time", ' \
           '"arguments": {}}]'
    content, calls = parse_tool_calls(text, "mistral")
    assert content == "Sure. " and _calls(calls) == [("get_weather", {"city": "Lyon"}), ("get_time", {})]
    assert all(re.fullmatch("[A-Za-z0-9]{9}", c["id"]) for c in calls) and calls[0]["id"] != calls[1]["id"]
    v11 = '[TOOL_CALLS]get_weather[ARGS]{"city": "Lyon"}[TOOL_CALLS]get_time[ARGS]{}'
    content, calls = parse_tool_calls(v11, "mistral")
    assert content is None and _calls(calls) == [("get_weather", {"city": "Lyon"}), ("get_time", {})]
    assert _calls(parse_tool_calls('[TOOL_CALLS]get_time{"tz": "UTC"}', "mistral")[1]) == [("get_time", {"tz": "UTC"})]
    assert _calls(parse_tool_calls('[TOOL_CALLS][{"name": "get_time", "arguments": {}}][TOOL_CALLS][{"name": "f", '
                                   '"arguments": {"a": 1}}]', "mistral")[1]) == [("get_time", {}), ("f", {"a": 1})]
    for bad in ("no calls", "[TOOL_CALLS]", "[TOOL_CALLS] [1]", '[TOOL_CALLS]get_time[ARGS]{"tz": ', "[TOOL_CALLS]x y",
                '[TOOL_CALLS]get_time[ARGS]{} trailing'):
        assert parse_tool_calls(bad, "mistral") == (bad, []), bad
    for form, n in ((text, 3), (v11, 2)):
        steps = []
        content, sent, calls = _stream("auto", "mistral", _pieces(form, n), steps=steps)
        want = [("get_weather", {"city": "Lyon"}), ("get_time", {})]
        assert _calls(calls) == want and content == ("Sure. " if form == text else ""), form
        assert sum(1 for d in steps for c in d if c["index"] == 0 and c["function"].get("arguments")) > 2, form
        assert all(re.fullmatch("[A-Za-z0-9]{9}", c["id"]) for c in calls)
    content, sent, calls = _stream("auto", "mistral", ["Hi [TOOL", "_CALLS]", "x"])
    assert sent[0] == "Hi " and content == "Hi [TOOL_CALLS]x" and calls == []


def test_pythonic_parser():
    content, calls = parse_tool_calls('[get_weather(city="Oslo", days=[1, 2]), get_time()]', "pythonic")
    assert content is None and _calls(calls) == [("get_weather", {"city": "Oslo", "days": [1, 2]}), ("get_time", {})]
    assert _calls(parse_tool_calls('<|python_start|>[get_time(tz="UTC")]<|python_end|>', "pythonic")[1]) == \
        [("get_time", {"tz": "UTC"})]
    for text in ("[1, 2]", "get_time()", "[get_time(1)]", "[os.system('x')]", "[f(a=g())]", "[]", "[f(**kw)]",
                 "[f(a=1)", "Sure, [f()] works"):
        assert parse_tool_calls(text, "pythonic") == (text, []), text
    content, sent, calls = _stream("auto", "pythonic", [" [get_time(", ")]"])
    assert sent == ["", ""] and _calls(calls) == [("get_time", {})]
    content, sent, calls = _stream("auto", "pythonic", ["Hello", " [x]"])
    assert sent == ["Hello", " [x]"] and calls == []


def _accumulate(calls, deltas):
    """A client's accumulation of tool-call deltas (the first of a call carries its id and name, each an index)."""
    for d in deltas:
        slot = calls.setdefault(d["index"], {"id": "", "type": "", "function": {"name": "", "arguments": ""}})
        assert not (slot["id"] and d.get("id")), "a call's id sent twice"
        slot["id"] += d.get("id", "")
        slot["type"] += d.get("type", "")
        slot["function"]["name"] += d["function"].get("name", "")
        slot["function"]["arguments"] += d["function"].get("arguments", "")


def _stream(mode, parser, pieces, parallel=True, steps=None):
    """(content, content sent by each feed, the calls a client accumulates); steps: each feed's call deltas."""
    s = StreamSplitter(mode, parser, parallel)
    sent, calls = [], {}
    for p in pieces:
        sent.append(s.feed(p))
        deltas = s.calls()
        if steps is not None:
            steps.append(deltas)
        _accumulate(calls, deltas)
    rest, deltas, _ = s.finish()
    _accumulate(calls, deltas)
    assert all(c["id"] and c["type"] == "function" for c in calls.values())
    return "".join(sent) + rest, sent, [calls[i] for i in sorted(calls)]


def _pieces(text, n=3):
    return [text[i:i + n] for i in range(0, len(text), n)]


def test_stream_calls_incrementally():
    """Calls stream as vLLM's: the first delta once a call's name is whole (id, type, name, arguments ""), then the
    arguments' JSON text as it comes, which concatenated parses to the finished output's arguments; every parser
    but pythonic, and "required" / a named function; a call whose arguments are a JSON string goes once written;
    parallel False streams the first call alone."""
    hermes = ('Let me look. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo \\"}{", "days": [1, 2]}}'
              '\n</tool_call>\n<tool_call>{"arguments": {}, "name": "get_time"}</tool_call>')
    for n in (1, 2, 5, 1000):
        steps = []
        content, sent, calls = _stream("auto", "hermes", _pieces(hermes, n), steps=steps)
        assert content == "Let me look. " and _calls(calls) == [
            ("get_weather", {"city": 'Oslo "}{', "days": [1, 2]}), ("get_time", {})], n
        if n == 1:  # (the first call's name goes out before its arguments end, and its arguments in many pieces)
            first = [i for i, d in enumerate(steps) if any("id" in c and c["index"] == 0 for c in d)]
            pieces = [c for d in steps for c in d if c["index"] == 0 and c["function"].get("arguments")]
            assert first and first[0] < hermes.index("Oslo") and len(pieces) > 20
    llama = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", ' \
            '"parameters": {"tz": "UTC"}}'
    content, sent, calls = _stream("auto", "llama3_json", _pieces(llama, 4))
    assert not content and _calls(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "UTC"})]
    content, sent, calls = _stream("auto", "llama3_json", _pieces(llama, 4), parallel=False)
    assert _calls(calls) == [("get_weather", {"city": "Paris"})]
    req = '[{"name":"get_weather","parameters":{"city":"Rome"}},{"name":"get_time","parameters":{}}]'
    steps = []
    content, sent, calls = _stream("required", None, _pieces(req, 2), steps=steps)
    assert content == "" and _calls(calls) == [("get_weather", {"city": "Rome"}), ("get_time", {})]
    assert sum(1 for d in steps for c in d if c["index"] == 0 and c["function"].get("arguments")) > 5
    steps = []
    content, sent, calls = _stream(check_tools([WEATHER])[0], None, _pieces('{"city":"Kyiv"}', 2), steps=steps)
    assert content == "" and _calls(calls) == [("get_weather", {"city": "Kyiv"})] and steps[0][0]["id"]
    # arguments written as a JSON string (the string is the arguments): sent once whole
    content, sent, calls = _stream("auto", "hermes", _pieces('<tool_call>{"name": "get_time", "arguments": '
                                                             '"{\\"tz\\": 1}"}</tool_call>', 3))
    assert calls[0]["function"]["arguments"] == '{"tz": 1}'
    # pythonic: whole at the end
    steps = []
    content, sent, calls = _stream("auto", "pythonic", _pieces('[get_time(tz="UTC")]', 2), steps=steps)
    assert not any(steps) and _calls(calls) == [("get_time", {"tz": "UTC"})]
    # a call that stops parsing after it began (text after the hermes call): its content is sent too
    content, sent, calls = _stream("auto", "hermes", _pieces('<tool_call>{"name": "get_time", "arguments": {}}'
                                                             '</tool_call> and more', 4))
    assert content.endswith(" and more") and [c["function"]["name"] for c in calls] == ["get_time"]


def test_stream_splitter():
    call = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    pieces = ["Hi", " there <", "tool", "_call>", call[len("<tool_call>"):]]
    content, sent, calls = _stream("auto", "hermes", pieces)
    # the text before the tag goes out as it comes, a tail that may begin the tag waits, the call never goes out
    assert sent[:2] == ["Hi", " there "] and content == "Hi there " and _calls(calls) == [("get_time", {})]
    content, sent, calls = _stream("auto", "hermes", ["a <b", "> c <tool", "s>"])
    assert content == "a <b> c <tools>" and calls == [] and sent[0] == "a <b"
    content, sent, calls = _stream("auto", "hermes", ["<tool_call>{\"name\": 1}", "</tool_call>"])
    assert content == '<tool_call>{"name": 1}</tool_call>' and calls == [] and sent == ["", ""]
    # llama3_json: an output opening with "{" (or the python tag) waits whole; prose streams
    content, sent, calls = _stream("auto", "llama3_json", [" {\"name\": \"get_time\",", " \"parameters\": {}}"])
    assert sent == ["", ""] and content == "" and _calls(calls) == [("get_time", {})]
    content, sent, calls = _stream("auto", "llama3_json", ["The", " answer"])
    assert sent == ["The", " answer"] and calls == []
    content, sent, calls = _stream("none", None, ["<tool_call>", "x"])
    assert sent == ["<tool_call>", "x"] and calls == []
    content, sent, calls = _stream("required", None, ['[{"name":"get_time",', '"parameters":{}}]'])
    assert sent == ["", ""] and content == "" and _calls(calls) == [("get_time", {})]
    content, sent, calls = _stream("required", None, ['[{"name":"get_t'])  # (cut short: sent as content at the end)
    assert content == '[{"name":"get_t' and calls == []


def test_template_messages():
    class M:
        def __init__(self, role, content=None, tool_calls=None, tool_call_id=None, name=None):
            self.role, self.content, self.tool_calls = role, content, tool_calls
            self.tool_call_id, self.name = tool_call_id, name

    msgs = template_messages([
        M("user", "weather?"),
        M("assistant", None, [{"id": "c1", "type": "function",
                               "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]),
        M("tool", "sunny", tool_call_id="c1", name="get_weather")])
    assert msgs[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"} and msgs[1]["content"] == ""
    assert msgs[2] == {"role": "tool", "content": "sunny", "tool_call_id": "c1", "name": "get_weather"}
    for bad in ([{"function": {"name": "f", "arguments": "{oops"}}], [{"type": "function"}]):
        with pytest.raises(ToolError) as e:
            template_messages([M("assistant", None, bad)])
        assert e.value.param == "messages"
