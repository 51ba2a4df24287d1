"""Tool calling for the chat endpoint, as vLLM's OpenAI server does it.

- ``tools`` (OpenAI's [{"type": "function", "function": {"name", "description", "parameters"}}]) go to the chat
  template (transformers' ``apply_chat_template(tools=...)``), and assistant messages' ``tool_calls`` / tool
  messages' ``tool_call_id`` back to it on the next turn.
- ``tool_choice``: "none" (text only), "auto" (the model decides; its output is parsed for calls by the server's
  ``--tool-call-parser``, which ``--enable-auto-tool-choice`` turns on), "required" (guided decoding to a JSON
  array of {"name", "parameters"} of the given tools, at least one) or {"type": "function", "function": {"name"}}
  (guided decoding to that function's parameters schema).
- Parsers: ``hermes`` (Hermes 2 Pro / Qwen 2.5 / Qwen 3: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
  text before the first call as content), ``llama3_json`` (Llama 3.1+ / 3.2: an output that is JSON objects
  ``{"name": ..., "parameters": {...}}``, separated by ";", after an optional ``<|python_tag|>``) and ``pythonic``
  (Llama 3.2 / 4's and others' prompted format: an output that is a Python list of calls with literal keyword
  arguments, ``[get_weather(city="Paris"), get_time()]``) and ``mistral`` (Mistral's ``[TOOL_CALLS]`` special token,
  which the server then keeps in the text (skip_special_tokens false, as vLLM's), before a JSON array of {"name",
  "arguments"} (Mistral 7B v0.3, Nemo) or before each ``name[ARGS]{...}`` call (tokenizers v11+: Mistral Small 3.2,
  Devstral, Magistral); text before it is content; call ids of 9 letters and digits, which Mistral's chat templates
  require of the calls sent back to them).

Streams hold back what may be the start of a call (a prefix of ``<tool_call>``, or a ``llama3_json`` output that
opens with "{") and stream the calls as vLLM does: a call's first delta (its index, id, type and name, arguments
"") once its name is whole, then its arguments' JSON text as the model writes it (``hermes``, ``llama3_json``,
"required" and a named function; ``pythonic`` calls, whose arguments are Python literals, go whole in the last
chunk). Concatenated, a call's argument deltas are the JSON that the finished output parses to (the model's own
spacing); the last chunk completes what the output's final parse holds. An output that does not parse is content,
as vLLM's; one whose calls streamed and that then stops parsing (text after a hermes call, say) has sent both.
"""
from __future__ import annotations

import json
import logging
import random
import re
import string
import uuid
from typing import Any

from ..engine.guided import GuidedDecodingParams

PARSERS = ("hermes", "llama3_json", "mistral", "pythonic")
MISTRAL_BOT = "[TOOL_CALLS]"
_MISTRAL_NAME = re.compile(r"\s*([A-Za-z0-9_\-.]+)(?:\[CALL_ID\][A-Za-z0-9]+)?(?:\[ARGS\])?")
log = logging.getLogger("pagoda.server")


class ToolError(ValueError):
    """A bad tools / tool_choice / messages field: the server answers 400 naming ``param``."""

    def __init__(self, msg: str, param: str):
        super().__init__(msg)
        self.param = param


def check_tools(tools) -> list[dict[str, Any]]:
    """The request's tools as OpenAI function tools ({"type": "function", "function": {...}}), each with a name
    and a parameters schema (an empty object schema when left out); ToolError (param "tools") otherwise."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ToolError(f"tools must be a list of function tools, got {type(tools).__name__}", "tools")
    out, names = [], set()
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise ToolError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}, got {t!r:.80}", "tools")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise ToolError(f"tools[{i}].function.name must be a non-empty string, got {name!r}", "tools")
        if name in names:
            raise ToolError(f"tools[{i}]: the function name {name!r} is given twice", "tools")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ToolError(f"tools[{i}].function.parameters must be a JSON schema object, got {params!r:.80}",
                            "tools")
        names.add(name)
        out.append({"type": "function", "function": dict(fn, parameters=params)})
    return out


def tool_mode(tool_choice, tools: list[dict], parser: str | None) -> str | dict:
    """"none", "auto", "required" or the named function's tool dict; ToolError (param "tool_choice") for a choice
    this request or server cannot honour. With tools and no tool_choice, "auto" (OpenAI's default)."""
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    if tool_choice == "none":
        return "none"
    if tool_choice == "auto":
        if not tools:
            return "none"
        if parser is None:
            raise ToolError('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set '
                            'on this server (pagoda)', "tool_choice")
        return "auto"
    if not tools:
        raise ToolError(f"tool_choice {tool_choice!r} needs tools", "tool_choice")
    if tool_choice == "required":
        return "required"
    name = (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type", "function") != "function" or \
            not isinstance(name, str):
        raise ToolError(f"tool_choice must be 'none', 'auto', 'required' or {{'type': 'function', 'function': "
                        f"{{'name': ...}}}}, got {tool_choice!r:.80}", "tool_choice")
    for t in tools:
        if t["function"]["name"] == name:
            return t
    raise ToolError(f"tool_choice names the function {name!r}, which is not among the tools", "tool_choice")


def guided_for(mode, tools: list[dict], parallel: bool = True) -> GuidedDecodingParams | None:
    """The guided decoding that "required" and a named tool_choice generate under (vLLM's schemas), as compact
    JSON (no whitespace between tokens: a model cannot spend its max_tokens on whitespace and leave the call cut);
    parallel False (OpenAI's parallel_tool_calls): one call at most."""
    if mode == "required":
        items = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                                   "parameters": t["function"]["parameters"]},
                  "required": ["name", "parameters"]} for t in tools]
        array = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
        if not parallel:
            array["maxItems"] = 1
        return GuidedDecodingParams(json=array,
                                    disable_any_whitespace=True, source="tool_choice")
    if isinstance(mode, dict):
        return GuidedDecodingParams(json=mode["function"]["parameters"], disable_any_whitespace=True,
                                    source="tool_choice")
    return None


def template_messages(messages) -> list[dict[str, Any]]:
    """Chat messages as chat templates take them: an assistant's tool_calls with their arguments as objects (the
    API carries them as JSON text; templates render them with tojson), a tool message's tool_call_id and name."""
    from ..engine.llm import chat_text

    out = []
    for i, m in enumerate(messages):
        msg: dict[str, Any] = {"role": m.role, "content": chat_text(m.content)}
        if m.tool_calls:
            calls = []
            for j, c in enumerate(m.tool_calls):
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise ToolError(f"messages[{i}].tool_calls[{j}] must hold a function with a name, got {c!r:.80}",
                                    "messages")
                args = fn.get("arguments", "{}")
                if isinstance(args, str):
                    try:
                        args = json.loads(args) if args.strip() else {}
                    except ValueError:
                        raise ToolError(f"messages[{i}].tool_calls[{j}].function.arguments is not JSON: {args!r:.80}",
                                        "messages") from None
                calls.append({"id": c.get("id"), "type": "function",
                              "function": {"name": fn["name"], "arguments": args}})
            msg["tool_calls"] = calls
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            msg["name"] = m.name
        out.append(msg)
    return out


def call_id(parser: str | None = None) -> str:
    """A tool call's id: vLLM's "chatcmpl-tool-<hex>", or for the mistral parser 9 letters and digits (Mistral's
    chat templates refuse others in the calls sent back)."""
    if parser == "mistral":
        return "".join(random.choices(string.ascii_letters + string.digits, k=9))
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def _call(name: str, arguments, parser: str | None = None) -> dict[str, Any]:
    """An OpenAI tool call (arguments as JSON text)."""
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": call_id(parser), "type": "function", "function": {"name": name, "arguments": arguments}}


def _objects(text: str, sep: str = "") -> list | None:
    """The JSON values that text is made of (whitespace and sep between them), or None if it is anything else."""
    dec, pos, out = json.JSONDecoder(), 0, []
    while True:
        while pos < len(text) and (text[pos].isspace() or (sep and text[pos] == sep and out)):
            pos += 1
        if pos == len(text):
            return out
        try:
            value, pos = dec.raw_decode(text, pos)
        except ValueError:
            return None
        out.append(value)


def _named(obj, args_keys=("arguments", "parameters")):
    """(name, arguments) of a {"name": ..., "arguments" / "parameters": {...}} object, or None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    for k in args_keys:
        if k in obj:
            return obj["name"], obj[k]
    return obj["name"], {}


def parse_tool_calls(text: str, parser: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool calls) of a model's output under a --tool-call-parser; no calls (and the whole text as
    content) where the output does not parse."""
    if parser == "hermes":
        start = text.find("<tool_call>")
        if start < 0:
            return text, []
        calls, pos = [], start
        while pos >= 0:
            end = text.find("</tool_call>", pos)
            body = text[pos + len("<tool_call>"):end if end >= 0 else len(text)]
            objs = _objects(body)
            named = [_named(o) for o in objs or ()]
            if not objs or None in named:
                return text, []
            calls += [_call(*n) for n in named]
            if end < 0:  # (an unclosed last call: the output ended in it)
                break
            rest = text[end + len("</tool_call>"):]
            nxt = rest.find("<tool_call>")
            if nxt < 0:
                if rest.strip():  # (text after the calls: not a tool-call output)
                    return text, []
                break
            if rest[:nxt].strip():
                return text, []
            pos = end + len("</tool_call>") + nxt
        content = text[:start]
        return (content if content.strip() else None), calls
    if parser == "llama3_json":
        body = text.strip()
        if body.startswith("<|python_tag|>"):
            body = body[len("<|python_tag|>"):]
        if not body.lstrip().startswith("{"):
            return text, []
        objs = _objects(body, sep=";")
        named = [_named(o, ("parameters", "arguments")) for o in objs or ()]
        if not objs or None in named:
            return text, []
        return None, [_call(*n) for n in named]
    if parser == "pythonic":
        calls = _pythonic(text)
        return (text, []) if calls is None else (None, calls)
    if parser == "mistral":
        calls = _mistral(text)
        if calls is None:
            return text, []
        content = text[:text.find(MISTRAL_BOT)]
        return (content if content.strip() else None), calls
    raise ValueError(f"unknown tool-call parser {parser!r}; one of {PARSERS}")


def _mistral(text: str) -> list[dict[str, Any]] | None:
    """The calls after the first [TOOL_CALLS] (a JSON array / object of {"name", "arguments"}, or name[ARGS]{...}
    after each [TOOL_CALLS]), or None (no such token, or anything else after it)."""
    start = text.find(MISTRAL_BOT)
    if start < 0:
        return None
    body = text[start + len(MISTRAL_BOT):]
    if body.lstrip()[:1] in ("[", "{"):
        objs = _objects(body.replace(MISTRAL_BOT, " "))  # (arrays after several [TOOL_CALLS] are one list of calls)
        objs = objs and [c for o in objs for c in (o if isinstance(o, list) else [o])]
        named = [_named(o) for o in objs or ()]
        return None if not objs or None in named else [_call(*n, "mistral") for n in named]
    calls = []
    for part in body.split(MISTRAL_BOT):
        m = _MISTRAL_NAME.match(part)
        objs = _objects(part[m.end():]) if m else None
        if not objs or len(objs) != 1:
            return None
        calls.append(_call(m.group(1), objs[0], "mistral"))
    return calls


def _pythonic(text: str) -> list[dict[str, Any]] | None:
    """The calls of a Python list of calls with literal keyword arguments, or None (anything else)."""
    import ast

    body = text.strip()
    if body.startswith("<|python_start|>"):  # (Llama 4's)
        body = body[len("<|python_start|>"):].removesuffix("<|python_end|>").strip()
    if not body.startswith("["):
        return None
    try:
        tree = ast.parse(body, mode="eval").body
        if not isinstance(tree, ast.List) or not tree.elts:
            return None
        calls = []
        for node in tree.elts:
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args or \
                    any(k.arg is None for k in node.keywords):
                return None
            calls.append(_call(node.func.id, {k.arg: ast.literal_eval(k.value) for k in node.keywords}))
        return calls
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        return None


def parse_forced(text: str, mode) -> list[dict[str, Any]]:
    """The calls of an output generated under "required" or a named tool_choice (guided JSON; an output cut short
    by max_tokens may not parse: no calls then)."""
    try:
        value = json.loads(text)
    except ValueError:
        return []
    if isinstance(mode, dict):
        return [_call(mode["function"]["name"], value)]
    named = [_named(o, ("parameters",)) for o in value] if isinstance(value, list) else [None]
    return [] if None in named else [_call(*n) for n in named]


def finished_output(text: str, mode, parser: str | None, parallel: bool = True):
    """(content, calls, whether the calls set finish_reason to "tool_calls") of a finished choice's text under
    tool_mode's mode: "auto" parsed by parser, "required" / a named function from their guided JSON (content "" when
    they parse); parallel False keeps the first call. A named function's call keeps the engine's finish_reason, as
    OpenAI's forced calls."""
    if mode == "none":
        return text, [], False
    if mode == "auto":
        content, calls = parse_tool_calls(text, parser)
    else:
        calls = parse_forced(text, mode)
        content = "" if calls else text
    calls = calls if parallel else calls[:1]
    return content, calls, bool(calls) and not isinstance(mode, dict)


_WS = " \t\r\n"


def _skip_ws(t: str, i: int, extra: str = "") -> int:
    while i < len(t) and (t[i] in _WS or t[i] in extra):
        i += 1
    return i


def _string_end(t: str, i: int) -> int | None:
    """t[i] opens a JSON string: the index after its closing quote, or None (the text ends inside it)."""
    j = i + 1
    while j < len(t):
        if t[j] == "\\":
            j += 2
        elif t[j] == '"':
            return j + 1
        else:
            j += 1
    return None


def _value_end(t: str, i: int) -> int | None:
    """The index after the JSON value that starts at t[i], or None where the text ends inside it."""
    if t[i] == '"':
        return _string_end(t, i)
    if t[i] in "{[":
        depth, j = 0, i
        while j < len(t):
            c = t[j]
            if c == '"':
                j = _string_end(t, j)
                if j is None:
                    return None
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    j = i
    while j < len(t) and t[j] not in _WS + ",}]":
        j += 1
    return j if j < len(t) else None  # (a number at the text's end may go on)


def _scan_call(t: str, i: int, args_keys) -> tuple[str | None, int | None, int | None, int | None]:
    """A call object being written from t[i] == "{": (its name once whole, where its arguments' value starts, where
    that ends, where the object ends); None for what the text has not reached yet (or malformed: its end stays
    None, so that nothing after it is scanned)."""
    name = a0 = a1 = None
    j = i + 1
    while True:
        j = _skip_ws(t, j, ",")
        if j >= len(t) or t[j] == "}":
            return name, a0, a1, (j + 1 if j < len(t) else None)
        if t[j] != '"':
            return name, a0, a1, None
        k_end = _string_end(t, j)
        if k_end is None:
            return name, a0, a1, None
        try:
            key = json.loads(t[j:k_end])
        except ValueError:
            return name, a0, a1, None
        j = _skip_ws(t, k_end)
        if j >= len(t) or t[j] != ":":
            return name, a0, a1, None
        j = _skip_ws(t, j + 1)
        if j >= len(t):
            return name, a0, a1, None
        v_end = _value_end(t, j)
        if key == "name" and v_end is not None:
            try:
                v = json.loads(t[j:v_end])
            except ValueError:
                return name, a0, a1, None
            name = v if isinstance(v, str) else None
        elif key in args_keys and a0 is None:
            a0, a1 = j, v_end
        if v_end is None:
            return name, a0, a1, None
        j = v_end


class StreamSplitter:
    """One streamed choice's text under tool calling: feed() returns the content that can go out now, holding
    back what may be a call; calls() the tool-call deltas that can go out now (OpenAI's: a call's index, id, type
    and name first, then pieces of its arguments); finish() the held-back content (when it was no call) and the
    deltas that complete the calls of the finished output's parse. parallel False (parallel_tool_calls): the first
    call only."""

    def __init__(self, mode, parser: str | None, parallel: bool = True):
        self.mode, self.parser, self.parallel = mode, parser, parallel
        self.text = ""  # everything generated
        self.sent = 0  # characters of text sent as content
        self.streamed: list[dict[str, Any]] = []  # calls begun: id, name, arguments start, characters sent

    def _held_from(self) -> int:
        """Where the text that must wait begins (len(text): nothing waits)."""
        t = self.text
        if self.mode != "auto":  # ("required" / a named function: the whole output is the calls; "none": feed())
            return 0
        if self.parser in ("hermes", "mistral"):
            tag = "<tool_call>" if self.parser == "hermes" else MISTRAL_BOT
            start = t.find(tag)
            if start >= 0:
                return start
            for k in range(min(len(t), len(tag) - 1), 0, -1):  # (a tail that may begin the tag)
                if tag.startswith(t[-k:]):
                    return len(t) - k
            return len(t)
        head = t.lstrip()
        if self.parser == "pythonic":  # (an output opening with "[" or Llama 4's python tag waits whole)
            tag = "<|python_start|>"
            return 0 if not head or head.startswith("[") or head.startswith(tag) or tag.startswith(head) else len(t)
        # llama3_json: an output whose first non-blank text is "{" or the python tag waits whole
        if not head or "<|python_tag|>".startswith(head[:len("<|python_tag|>")]) or head.startswith("{") or \
                head.startswith("<|python_tag|>"):
            return 0
        return len(t)

    def feed(self, delta: str) -> str:
        self.text += delta
        if self.mode == "none":
            out, self.sent = self.text[self.sent:], len(self.text)
            return out
        cut = max(self._held_from(), self.sent)
        out, self.sent = self.text[self.sent:cut], cut
        return out

    def _scan(self) -> list[tuple[str | None, int | None, int | None]]:
        """The calls written so far, in order, as (name, arguments start, arguments end) (None: not yet written)."""
        t, out = self.text, []
        if self.mode == "none" or (self.mode == "auto" and self.parser == "pythonic"):
            return out
        if isinstance(self.mode, dict):  # (a named function: the output is its arguments)
            a0 = _skip_ws(t, 0)
            return [(self.mode["function"]["name"], a0 if a0 < len(t) else None,
                     _value_end(t, a0) if a0 < len(t) else None)]
        if self.mode == "required":
            j, keys, sep, blocks = _skip_ws(t, 0), ("parameters",), ",", None
            if j >= len(t) or t[j] != "[":
                return out
            j += 1
        elif self.parser == "mistral":
            return self._scan_mistral()
        elif self.parser == "llama3_json":
            j, keys, sep, blocks = _skip_ws(t, 0), ("parameters", "arguments"), ";", None
            if t.startswith("<|python_tag|>", j):
                j += len("<|python_tag|>")
        else:  # hermes
            j, keys, sep, blocks = t.find("<tool_call>"), ("arguments", "parameters"), "", "<tool_call>"
            if j < 0:
                return out
            j += len(blocks)
        while True:
            j = _skip_ws(t, j, sep if out else "")
            if blocks and t.startswith("</tool_call>", j):  # (the next block, with nothing but blanks between)
                j = _skip_ws(t, j + len("</tool_call>"))
                if not t.startswith(blocks, j):
                    return out
                j = _skip_ws(t, j + len(blocks))
            if j >= len(t) or t[j] != "{":
                return out
            name, a0, a1, end = _scan_call(t, j, keys)
            out.append((name, a0, a1))
            if end is None:
                return out
            j = end

    def _scan_mistral(self) -> list[tuple[str | None, int | None, int | None]]:
        """_scan of the mistral parser: after [TOOL_CALLS], a JSON array of calls or name[ARGS]{...} calls."""
        t, out = self.text, []
        j = t.find(MISTRAL_BOT)
        if j < 0:
            return out
        j = _skip_ws(t, j + len(MISTRAL_BOT))
        if j < len(t) and t[j] in "[{":  # (the JSON form: objects in an array, or one object)
            j += t[j] == "["
            while True:
                j = _skip_ws(t, j, "," if out else "")
                if j >= len(t) or t[j] != "{":
                    return out
                name, a0, a1, end = _scan_call(t, j, ("arguments", "parameters"))
                out.append((name, a0, a1))
                if end is None:
                    return out
                j = end
        while True:  # (name[ARGS]{...} after each [TOOL_CALLS])
            m = _MISTRAL_NAME.match(t, j)
            if m is None or m.end() >= len(t) or t[m.end()] != "{":  # (the name is whole once its arguments begin)
                return out
            a0 = m.end()
            a1 = _value_end(t, a0)
            out.append((m.group(1), a0, a1))
            if a1 is None:
                return out
            j = _skip_ws(t, a1)
            if not t.startswith(MISTRAL_BOT, j):
                return out
            j += len(MISTRAL_BOT)

    def _arguments_delta(self, call: dict[str, Any], a1: int | None) -> str:
        """The next piece of a begun call's arguments: the object's text as written (a1 None: up to the text's
        end), or a value of another kind whole once written (as _call turns it into arguments)."""
        t, a0 = self.text, call["start"]
        if t[a0] == "{":
            piece = t[a0 + call["sent"]:len(t) if a1 is None else a1]
        elif a1 is not None and call["sent"] == 0:
            try:
                piece = _call("", json.loads(t[a0:a1]))["function"]["arguments"]
            except ValueError:
                piece = ""
        else:
            piece = ""
        call["sent"] += len(piece) if t[a0] == "{" else (a1 - a0 if piece else 0)
        return piece

    def calls(self) -> list[dict[str, Any]]:
        """The tool-call deltas that can go out now (each with its index)."""
        if self.mode == "auto" and self.sent >= len(self.text):  # (all of it went out as content: no call begun)
            return []
        out = []
        for i, (name, a0, a1) in enumerate(self._scan()[:None if self.parallel else 1]):
            if i == len(self.streamed):
                if name is None:
                    break
                self.streamed.append({"id": call_id(self.parser), "name": name, "start": None, "sent": 0})
                out.append({"index": i, "id": self.streamed[i]["id"], "type": "function",
                            "function": {"name": name, "arguments": ""}})
            call = self.streamed[i]
            if a0 is None or self.text[a0] != "{" and a1 is None:
                continue
            call["start"] = a0 if call["start"] is None else call["start"]
            piece = self._arguments_delta(call, a1)
            if piece:
                out.append({"index": i, "function": {"arguments": piece}})
        return _merged(out)

    def finish(self) -> tuple[str, list[dict[str, Any]], bool]:
        """(content not yet sent, the tool-call deltas that complete the finished output's calls, whether they set
        finish_reason to "tool_calls": finished_output's) once the choice has finished."""
        content, calls, reason = finished_output(self.text, self.mode, self.parser, self.parallel)
        content = content or ""
        rest = content[self.sent:] if len(content) > self.sent else ""
        self.sent = len(self.text)
        out = self.calls() if calls else []
        scan = self._scan()
        for i, call in enumerate(calls):
            if i < len(self.streamed):
                begun = self.streamed[i]
                a0, a1 = scan[i][1:] if i < len(scan) else (None, None)
                ok = begun["name"] == call["function"]["name"] and a0 is not None and a1 is not None
                if ok:  # (the arguments streamed are the JSON that the parse read: a string's value is the text)
                    try:
                        raw, args = json.loads(self.text[a0:a1]), call["function"]["arguments"]
                        ok = raw == args if isinstance(raw, str) else raw == json.loads(args)
                    except ValueError:
                        ok = False
                if not ok:  # (a stream that began a call the final parse reads otherwise: cannot be taken back)
                    log.warning("a streamed tool call differs from the finished output's parse: %.200r", self.text)
                continue
            out.append({"index": i, **call})
        if len(self.streamed) > len(calls):
            log.warning("tool calls streamed that the finished output does not parse to: %.200r", self.text)
        return rest, _merged(out), reason


def _merged(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Deltas of one chunk, one per call index (a call's first delta and its first arguments together)."""
    out: dict[int, dict[str, Any]] = {}
    for d in deltas:
        if d["index"] not in out:
            out[d["index"]] = {**d, "function": dict(d["function"])}
        else:
            f = out[d["index"]]["function"]
            f["arguments"] = f.get("arguments", "") + d["function"]["arguments"]
    return list(out.values())
