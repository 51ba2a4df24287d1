"""Guided (structured) decoding: vLLM's ``GuidedDecodingParams`` (a JSON schema, any JSON object, a regular
expression, a choice of strings or an EBNF grammar), each request's tokens held to it by xgrammar's grammar
matcher (the library vLLM and SGLang use).

Each step, a guided request's row of logits is masked to the tokens that keep its output a prefix of the language
(xgrammar's token bitmask, unpacked on the row's device); once the grammar is complete only its stop tokens (the
model's EOS ids) remain, and after one of them (ignore_eos) the row stays masked to them. It runs as one of the
sampler's per-request logits processors (sampler._penalized): such a request is not launched a step ahead, since
its mask reads the output so far. xgrammar is an optional dependency (``pip install xgrammar``; in the ``dev``
extra): without it a guided request is a ValueError saying so.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch

_BANNED = -1e30  # (sampler._BANNED: a masked token's logit, finite)
_SHIFTS: dict = {}  # device -> int32 [32]: the bit positions that unpack xgrammar's int32 bitmask words


@dataclasses.dataclass
class GuidedDecodingParams:
    """vLLM's guided decoding parameters: exactly one of json (a JSON schema, as a dict or its JSON text),
    json_object (True: any JSON object), regex, choice (the output is one of these strings) or grammar (EBNF, in
    xgrammar's GBNF dialect)."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # vLLM's: JSON (json / json_object) without whitespace between its tokens (xgrammar's any_whitespace off), as
    # OpenAI's structured outputs come; by default any whitespace is allowed there, which a small model may fill
    disable_any_whitespace: bool = False
    # the API field it came from (guided_from_openai: "guided_regex", "response_format", ...), which its errors name
    source: str | None = dataclasses.field(default=None, repr=False, compare=False)

    _KINDS = ("json", "regex", "choice", "grammar", "json_object")

    def __post_init__(self):
        given = [k for k in self._KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"GuidedDecodingParams takes exactly one of json, json_object, regex, choice, grammar; "
                             f"got {given or 'none'}")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise ValueError(f"GuidedDecodingParams.json must be a JSON schema (a dict or its text), got "
                             f"{type(self.json).__name__}")
        for name in ("json_object", "disable_any_whitespace"):
            if getattr(self, name) not in (None, True, False):
                raise ValueError(f"GuidedDecodingParams.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"GuidedDecodingParams.{name} must be a non-empty string, got {v!r}")
        if self.choice is not None and (not isinstance(self.choice, (list, tuple)) or not self.choice
                                        or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError(f"GuidedDecodingParams.choice must be a non-empty list of non-empty strings, got "
                             f"{self.choice!r}")

    @property
    def kind(self) -> str:
        return next(k for k in self._KINDS if getattr(self, k) not in (None, False))


def _xgrammar():
    try:
        import xgrammar
    except ImportError as e:
        raise ValueError(f"guided decoding needs the xgrammar package (pip install xgrammar): {e}") from None
    return xgrammar


def _regex_escape(s: str) -> str:
    """s as a regular expression that matches it literally (xgrammar's regex dialect: ECMAScript's)."""
    return "".join("\\" + c if c in r"\^$.|?*+()[]{}" else c for c in s)


class GuidedCompiler:
    """One engine's grammar compiler: the tokenizer's vocabulary as xgrammar sees it (vocab_size: the model's,
    which may pad the tokenizer's; stop_token_ids: the engine's EOS ids), compiled grammars cached by xgrammar."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids):
        xgr = _xgrammar()
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(stop_token_ids))
        self.compiler = xgr.GrammarCompiler(info)

    def compile(self, g: GuidedDecodingParams):
        """The compiled grammar of g (ValueError naming g's field for a schema / regex / grammar xgrammar
        refuses)."""
        kind = g.kind
        try:
            if kind in ("json", "json_object"):  # (json_object: OpenAI's, an object)
                schema = {"type": "object"} if kind == "json_object" else g.json
                return self.compiler.compile_json_schema(schema if isinstance(schema, str) else json.dumps(schema),
                                                         any_whitespace=not g.disable_any_whitespace)
            if kind == "regex":
                return self.compiler.compile_regex(g.regex)
            if kind == "choice":
                return self.compiler.compile_regex("(" + "|".join(_regex_escape(c) for c in g.choice) + ")")
            return self.compiler.compile_grammar(g.grammar)
        except Exception as e:  # noqa: BLE001 - xgrammar's errors (RuntimeError, InvalidJSONError, ...) name no field
            where = g.source or f"GuidedDecodingParams.{kind}"
            raise ValueError(f"{where}: could not be compiled: {e}") from None

    def processor(self, g: GuidedDecodingParams) -> GrammarProcessor:
        return GrammarProcessor(self.compile(g), self.vocab_size)


class GrammarProcessor:
    """A request's logits processor (sampler: fn(output ids, row) -> row): accepts the output's new tokens into its
    grammar matcher, then masks the row to the tokens the grammar allows next. A token the grammar refuses (a
    sampler that ignored the mask) is a ValueError, which ends the request with finish_reason "error"."""

    def __init__(self, compiled, vocab_size: int):
        xgr = _xgrammar()
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self.vocab_size = vocab_size
        self.stop_ids = list(self.matcher.stop_token_ids)
        self.seen = 0

    def __call__(self, output_ids: list[int], row: torch.Tensor) -> torch.Tensor:
        for t in output_ids[self.seen:]:
            if self.matcher.is_terminated():
                break  # (tokens after a stop token, under ignore_eos: the row stays masked to the stop tokens)
            if not self.matcher.accept_token(int(t)):
                raise ValueError(f"token {t} does not continue the guided decoding grammar")
        self.seen = len(output_ids)
        if self.matcher.is_terminated():
            keep = torch.zeros(row.shape[-1], dtype=torch.bool, device=row.device)
            keep[[t for t in self.stop_ids if t < row.shape[-1]]] = True
            return row.masked_fill(~keep, _BANNED)
        self.matcher.fill_next_token_bitmask(self.bitmask)
        dev = row.device
        if dev not in _SHIFTS:
            _SHIFTS[dev] = torch.arange(32, dtype=torch.int32, device=dev)
        words = self.bitmask[0].to(dev, non_blocking=True)
        keep = ((words[:, None] >> _SHIFTS[dev]) & 1).reshape(-1)[:row.shape[-1]].bool()
        return row.masked_fill(~keep, _BANNED)


def guided_from_openai(body: dict[str, Any]) -> GuidedDecodingParams | None:
    """The GuidedDecodingParams of an OpenAI / vLLM request's fields (guided_json / guided_regex / guided_choice /
    guided_grammar, response_format {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema":
    ...}}); None when it asks for none. ValueError (naming the field) for a malformed one or for two at once."""
    found = {}
    for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar"):
        if body.get(name) is not None:
            found[name] = body[name]
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type", "text") not in ("text", "json_object", "json_schema"):
            raise ValueError(f"response_format: type must be 'text', 'json_object' or 'json_schema', got "
                             f"{fmt.get('type') if isinstance(fmt, dict) else fmt!r}")
        if fmt.get("type") == "json_object":
            found["response_format"] = GuidedDecodingParams(json_object=True)
        elif fmt.get("type") == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, (dict, str)):
                raise ValueError("response_format: json_schema must hold a 'schema' (a JSON schema object)")
            found["response_format"] = GuidedDecodingParams(json=schema)
    if not found:
        return None
    if len(found) > 1:
        raise ValueError(f"{sorted(found)[1]}: only one of guided_json, guided_regex, guided_choice, guided_grammar "
                         f"and response_format may be given, got {sorted(found)}")
    (name, value), = found.items()
    if name != "response_format":
        try:
            value = GuidedDecodingParams(**{name[len("guided_"):]: value})
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    value.source = name
    return value


# the OpenAI / vLLM request fields guided_from_openai reads (the server names them in its 400s)
OPENAI_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "response_format")
