"""OpenAI-compatible HTTP API over the engine (FastAPI).

POST /v1/completions, POST /v1/chat/completions (streaming as server-sent events, ending with
``data: [DONE]``; ``stream_options.include_usage``), GET /v1/models, GET /health, GET /metrics
(Prometheus); with LoRA adapters, each is a model of its own name (--lora-modules, and vLLM's POST
/v1/load_lora_adapter / /v1/unload_lora_adapter with --allow-runtime-lora-updating). Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``:
400 for invalid parameters or a prompt longer than the model allows, 404 for an unknown model,
503 with Retry-After when the waiting queue is over its limit.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..engine import LoRARequest, SamplingParams
from ..engine.guided import OPENAI_FIELDS as GUIDED_FIELDS, guided_from_openai
from .async_engine import AsyncEngine, EngineDead, Overloaded
from .metrics import Metrics
from .tools import StreamSplitter, ToolError, check_tools, finished_output, guided_for, template_messages, tool_mode

log = logging.getLogger("pagoda.server")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = (
            status, message, type_, param, code, headers)


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}},
                        status_code=e.status, headers=e.headers)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    # fields this server does not know are kept, so that unsupported() can log them (vLLM's way: a client library
    # may send fields that change nothing; the ones known to change the answer are 400s)
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extension: the prompt tokens' logprobs (completions: in each choice; chat: at the top level)
    prompt_logprobs: int | None = None
    # vLLM's extensions (SamplingParams)
    include_stop_str_in_output: bool = False
    allowed_token_ids: list[int] | None = None
    truncate_prompt_tokens: int | None = None
    bad_words: list[str] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # (vLLM's extension)
    skip_special_tokens: bool = True  # (vLLM's extension: special tokens left out of the text)
    logit_bias: dict[str, float] | None = None  # token id (as a string, JSON's keys) -> bias
    # OpenAI / vLLM parameters that change what is generated and that pagoda does not implement: taken at their
    # neutral values, a 400 naming them otherwise (unsupported(); never silently ignored)
    best_of: int | None = None
    min_tokens: int = 0  # (honoured: SamplingParams.min_tokens)
    use_beam_search: bool = False
    # vLLM's guided decoding and OpenAI's structured outputs (engine/guided.py; _params): response_format is
    # {"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": ...}}
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False  # the prompt before the completion; with logprobs, the prompt tokens' logprobs too
    suffix: str | None = None


class ChatMessage(BaseModel):
    role: str
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # (an assistant's earlier calls)
    tool_call_id: str | None = None  # (a tool message's answer to a call)
    name: str | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool = True  # (False: one call at most; the first where a model makes more)
    functions: list[dict[str, Any]] | None = None
    function_call: Any = None


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages through the chat template."""
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]


class LoadLoRARequest(BaseModel):
    """vLLM's /v1/load_lora_adapter."""
    lora_name: str
    lora_path: str


class UnloadLoRARequest(BaseModel):
    """vLLM's /v1/unload_lora_adapter (lora_int_id accepted and not needed: the name identifies it)."""
    lora_name: str
    lora_int_id: int | None = None


def unsupported(req: _Common) -> None:
    """A 400 naming the first parameter set to a value pagoda would not honour (the request's fields above their
    neutral values): a client asking for beam search or tools must not get an answer generated without them (guided
    decoding and response_format are honoured: _params)."""
    if req.model_extra:
        log.warning("request fields ignored (not known to this server): %s", sorted(req.model_extra))
    neutral = {"use_beam_search": False}
    for name, value in neutral.items():
        if getattr(req, name) != value:
            raise APIError(400, f"{name} is not supported by this server (pagoda); leave it at {value}", param=name)
    for name in ("suffix", "functions", "function_call"):  # (functions / function_call: OpenAI's deprecated form
        # of tools, which vLLM does not take either)
        if getattr(req, name, None):
            raise APIError(400, f"{name} is not supported by this server (pagoda)", param=name)
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, f"best_of (other than n) is not supported by this server (pagoda), got {req.best_of}",
                       param="best_of")


def _params(req: _Common, logprobs: int | None, default_max: int, prompt_logprobs: int | None = None,
            tool_guided=None) -> SamplingParams:
    """tool_guided: the guided decoding of a "required" or named tool_choice (tools.guided_for), which no other
    guided field may accompany."""
    max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
    bias = None
    if req.logit_bias:
        try:
            bias = {int(t): b for t, b in req.logit_bias.items()}
        except ValueError:
            raise APIError(400, f"logit_bias keys must be token ids, got {list(req.logit_bias)[:4]}",
                           param="logit_bias") from None
    try:
        guided = guided_from_openai({k: getattr(req, k, None) for k in GUIDED_FIELDS})
    except ValueError as e:
        raise APIError(400, str(e), param=_field_of(str(e), None)) from None
    if tool_guided is not None:
        if guided is not None:
            raise APIError(400, f"tool_choice 'required' or a named function generates guided JSON: {guided.source} "
                                f"cannot be given with it", param="tool_choice")
        guided = tool_guided
    try:
        return SamplingParams(n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                              min_p=req.min_p, seed=req.seed, max_tokens=max_tokens if max_tokens is not None
                              else default_max, stop=req.stop, stop_token_ids=req.stop_token_ids,
                              ignore_eos=req.ignore_eos, logprobs=logprobs, presence_penalty=req.presence_penalty,
                              frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty,
                              logit_bias=bias, prompt_logprobs=prompt_logprobs, min_tokens=req.min_tokens,
                              include_stop_str_in_output=req.include_stop_str_in_output,
                              allowed_token_ids=req.allowed_token_ids,
                              truncate_prompt_tokens=req.truncate_prompt_tokens, bad_words=req.bad_words,
                              guided_decoding=guided, skip_special_tokens=req.skip_special_tokens)
    except ValueError as e:
        raise APIError(400, str(e), param=_field_of(str(e), None)) from None


def _field_of(msg: str, default: str | None) -> str | None:
    """The request field a ValueError of SamplingParams ("SamplingParams.<field> must ...") or of the engine's
    logit_bias check names; default otherwise."""
    if msg.startswith("SamplingParams."):
        return msg.split(".")[1].split(" ")[0]
    if msg.split(":")[0] in GUIDED_FIELDS:  # (guided decoding's errors: engine/guided.py names the request field)
        return msg.split(":")[0]
    return "logit_bias" if msg.startswith("logit_bias") else default


def create_app(async_engine: AsyncEngine, served_model_name: str, metrics: Metrics | None = None,
               lora_modules=None, allow_lora_updates: bool = False, tool_parser: str | None = None,
               chat_template: str | None = None) -> FastAPI:
    """lora_modules: LoRARequests (an engine built with enable_lora) served under their lora_name as models of their
    own: a request whose "model" names one runs with that adapter. allow_lora_updates: vLLM's runtime LoRA
    endpoints, POST /v1/load_lora_adapter and /v1/unload_lora_adapter (404s otherwise, as routes that do not exist).
    tool_parser: the parser of tool_choice "auto"'s outputs (tools.PARSERS; None: "auto" with tools is a 400, as
    vLLM without --enable-auto-tool-choice). chat_template: a Jinja chat template used instead of the tokenizer's."""
    engine = async_engine.engine
    loras = {m.lora_name: m for m in lora_modules or ()}
    if allow_lora_updates and engine.lora is None:
        raise ValueError("allow_lora_updates needs an engine built with enable_lora=True")
    next_lora_id = itertools.count(max((m.lora_int_id for m in loras.values()), default=0) + 1)
    if served_model_name in loras:
        raise ValueError(f"a LoRA module is named {served_model_name!r}, the served model's name")
    tok = engine.tokenizer
    metrics = metrics or Metrics(engine)
    app = FastAPI(title="pagoda", version="0.1.0")
    app.state.async_engine = async_engine

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        metrics.requests.labels(status=str(e.status)).inc()
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        # unknown routes (404), wrong methods (405), ...: the same OpenAI-style error body as every other error
        metrics.requests.labels(status=str(e.status_code)).inc()
        detail = e.detail if isinstance(e.detail, str) else str(e.detail)
        return error_response(APIError(e.status_code, f"{detail}: {request.method} {request.url.path}",
                                       type_="not_found_error" if e.status_code == 404 else "invalid_request_error",
                                       headers=getattr(e, "headers", None)))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in err.get("loc", []) if x != "body"]
        metrics.requests.labels(status="400").inc()
        return error_response(APIError(400, f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid request')}",
                                       param=loc[0] if loc else None))

    def check_model(name: str):
        """The LoRARequest a request's model names (None: the base model); 404 for a name this server lacks."""
        if name == served_model_name:
            return None
        if name in loras:
            return loras[name]
        names = ", ".join(f"`{n}`" for n in [served_model_name, *loras])
        raise APIError(404, f"The model `{name}` does not exist; this server serves {names}.", param="model",
                       code="model_not_found")

    def default_max(prompt_len: int) -> int:
        return max(1, engine.max_model_len - prompt_len)

    def truncated(text_ids, req):
        """(text, ids) with truncate_prompt_tokens applied (the text then is the kept tokens', decoded for echo);
        a bad value is the 400 that SamplingParams names."""
        text, ids = text_ids
        k = req.truncate_prompt_tokens
        if k is None:
            return text, ids
        if isinstance(k, bool) or k < 1:
            raise APIError(400, f"truncate_prompt_tokens must be an integer >= 1, got {k!r}",
                           param="truncate_prompt_tokens")
        return (text, ids) if len(ids) <= k else (None, ids[-k:])

    def prompt_len_check(ids: list[int]) -> None:
        if len(ids) >= engine.max_model_len:
            raise APIError(400, f"This model's maximum context length is {engine.max_model_len} tokens; the prompt "
                                f"has {len(ids)} tokens (and at least one must be generated).",
                           param="prompt", code="context_length_exceeded")

    def tokenize_prompt(p) -> tuple[str | None, list[int]]:
        try:
            return engine.tokenize(p)
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None

    async def run_one(prompt, params, rid, lora=None):
        """Start a request (lora: its adapter's LoRARequest); returns the async iterator once the engine accepted it
        (errors raise)."""
        gen = async_engine.generate(prompt, params, rid, lora)
        try:
            first = await gen.__anext__()
        except Overloaded as e:
            raise APIError(503, f"The server is overloaded ({e}); retry later.", type_="server_error",
                           code="overloaded", headers={"Retry-After": "1"}) from None
        except ValueError as e:
            raise APIError(400, str(e), param=_field_of(str(e), "prompt")) from None
        except EngineDead as e:
            raise APIError(500, str(e), type_="server_error") from None
        return first, gen

    def token_text(t: int) -> str:
        return tok.decode([t]) if tok else str(t)

    def logprob_block_completion(lps, token_ids, offset0=0, top_n=None):
        """OpenAI's completion logprobs of token_ids (lps: their {token id: logprob} dicts, None for a token
        without one: a prompt's first); top_n: at most that many entries in top_logprobs (the token itself
        and the likeliest others), all of each dict when None."""
        toks = [token_text(t) for t in token_ids]
        offsets, pos = [], offset0
        for t in toks:
            offsets.append(pos)
            pos += len(t)
        tops = []
        for d, t in zip(lps, token_ids):
            if d is None:
                tops.append(None)
                continue
            items = sorted(d.items(), key=lambda kv: -kv[1])
            if top_n is not None:  # the likeliest top_n, and the token itself
                items = items[:top_n] + [(t, d[t])] * (t not in dict(items[:top_n]))
            tops.append({token_text(k): v for k, v in items})
        return {"tokens": toks, "token_logprobs": [None if d is None else d.get(t) for d, t in zip(lps, token_ids)],
                "top_logprobs": tops, "text_offset": offsets}

    def join_blocks(a, b):
        return {k: a[k] + b[k] for k in a}

    def echo_text(text, ids) -> str:
        """The prompt as echoed: its text, or its tokens decoded (a prompt of token ids)."""
        return text if text is not None else (tok.decode(ids) if tok else "")

    def completion_block(req, final, prompt_ids, lps, token_ids, offset, with_prompt):
        """A completion choice's logprobs block of token_ids (from text offset ``offset``); with_prompt (echo,
        whole answers or a stream's first chunk): the prompt's tokens first, the first one without a logprob, as
        OpenAI's."""
        block = logprob_block_completion(lps, token_ids, offset)
        if with_prompt:
            block = join_blocks(logprob_block_completion(final.prompt_logprobs, prompt_ids, 0, top_n=req.logprobs),
                                block)
        return block

    def prompt_lp_wanted(req) -> int | None:
        """SamplingParams.prompt_logprobs of a completion request: vLLM's prompt_logprobs, or echo's logprobs."""
        want = req.prompt_logprobs
        if req.echo and req.logprobs is not None:
            want = max(want or 0, req.logprobs)
        return want

    def prompt_logprobs_field(final):
        """vLLM's "prompt_logprobs" of a choice: per prompt token None (the first) or {token id: {logprob,
        decoded_token}}."""
        return [None if d is None else {str(k): {"logprob": v, "decoded_token": token_text(k)} for k, v in d.items()}
                for d in final.prompt_logprobs]

    def logprob_block_chat(lps, token_ids, top_n):
        content = []
        for d, t in zip(lps, token_ids):
            s = tok.decode([t]) if tok else str(t)
            tops = sorted(((k, v) for k, v in d.items()), key=lambda kv: -kv[1])[:top_n]
            content.append({"token": s, "logprob": d.get(t), "bytes": list(s.encode()),
                            "top_logprobs": [{"token": tok.decode([k]) if tok else str(k), "logprob": v,
                                              "bytes": list((tok.decode([k]) if tok else str(k)).encode())}
                                             for k, v in tops]})
        return {"content": content}

    def check_failed(final):
        bad = [c for c in final.outputs if c.finish_reason == "error"]
        if bad:
            raise APIError(500, f"generation failed: {bad[0].stop_reason}", type_="server_error")

    def record_finished(final, t0, first_t):
        done = time.monotonic()
        n_out = sum(len(c.token_ids) for c in final.outputs)
        metrics.prompt_tokens.inc(len(final.prompt_token_ids))
        metrics.generation_tokens.inc(n_out)
        if first_t is not None:
            metrics.ttft.observe(first_t - t0)
            per = max(len(c.token_ids) for c in final.outputs)
            if per > 1:
                metrics.itl.observe((done - first_t) / (per - 1))
        metrics.e2e.observe(done - t0)

    # -- endpoints ----------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if async_engine.error is not None or async_engine.stopped:
            return JSONResponse({"status": "error"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        base = {"id": served_model_name, "object": "model", "created": now, "owned_by": "pagoda",
                "max_model_len": engine.max_model_len}
        return {"object": "list", "data": [base] + [
            {"id": m.lora_name, "object": "model", "created": now, "owned_by": "pagoda", "root": m.lora_path,
             "parent": served_model_name, "max_model_len": engine.max_model_len} for m in loras.values()]}

    if allow_lora_updates:
        @app.post("/v1/load_lora_adapter")
        async def load_lora(req: LoadLoRARequest):
            """Serve a PEFT folder as a model named lora_name from now on (checked on the engine thread: 400 naming
            lora_path for a folder that is no adapter of this model)."""
            if req.lora_name in loras or req.lora_name == served_model_name:
                raise APIError(400, f"The model `{req.lora_name}` is already served.", param="lora_name")
            try:
                lora = LoRARequest(req.lora_name, next(next_lora_id), req.lora_path)
                await async_engine.call(lambda: engine.add_lora(lora))
            except ValueError as e:
                raise APIError(400, str(e), param="lora_name" if str(e).startswith("lora_name") else "lora_path") from None
            except EngineDead as e:
                raise APIError(500, str(e), type_="server_error") from None
            loras[lora.lora_name] = lora
            metrics.requests.labels(status="200").inc()
            return Response(f"Success: LoRA adapter '{lora.lora_name}' added successfully.", media_type="text/plain")

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora(req: UnloadLoRARequest):
            """Stop serving an adapter by name (requests running with it finish with it)."""
            if req.lora_name not in loras:
                raise APIError(404, f"The lora adapter '{req.lora_name}' cannot be found.", param="lora_name",
                               type_="not_found_error", code="model_not_found")
            del loras[req.lora_name]
            metrics.requests.labels(status="200").inc()
            return Response(f"Success: LoRA adapter '{req.lora_name}' removed successfully.", media_type="text/plain")

    @app.get("/metrics")
    async def prom():
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        lora = check_model(req.model)
        unsupported(req)
        p = req.prompt
        if isinstance(p, str) or (isinstance(p, list) and p and isinstance(p[0], int)):
            prompts = [p]
        else:
            prompts = list(p)
        if not prompts:
            raise APIError(400, "prompt must not be empty", param="prompt")
        tokenized = [truncated(tokenize_prompt(x), req) for x in prompts]
        for _, ids in tokenized:
            prompt_len_check(ids)
        if req.logprobs is not None and not 0 <= req.logprobs <= 20:
            raise APIError(400, "logprobs must be in 0..20", param="logprobs")
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        t0 = time.monotonic()
        if req.stream:
            got = await asyncio.gather(*(run_one(ids, _params(req, req.logprobs, default_max(len(ids)),
                                                             prompt_lp_wanted(req)), f"{rid}-{i}", lora)
                                         for i, (_, ids) in enumerate(tokenized)), return_exceptions=True)
            starts = [g for g in got if not isinstance(g, BaseException)]
            if len(starts) < len(got):  # one failed: release the others, answer with its error
                for _, gen in starts:
                    await gen.aclose()
                raise next(g for g in got if isinstance(g, BaseException))
            return StreamingResponse(_stream_completion(starts, req, rid, created, t0, tokenized),
                                     media_type="text/event-stream")

        async def one(i, text, ids):
            params = _params(req, req.logprobs, default_max(len(ids)), prompt_lp_wanted(req))
            first, gen = await run_one(ids, params, f"{rid}-{i}", lora)
            final, first_t = first, time.monotonic()
            async for final in gen:
                pass
            check_failed(final)
            record_finished(final, t0, first_t)
            return text, ids, final

        tasks = [asyncio.ensure_future(one(i, text, ids)) for i, (text, ids) in enumerate(tokenized)]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            raise
        choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0}
        for text, ids, final in results:
            echo = echo_text(text, ids) if req.echo else ""  # (once per prompt, not per sample)
            extra = {} if req.prompt_logprobs is None else {"prompt_logprobs": prompt_logprobs_field(final)}
            for c in final.outputs:
                lp = (None if req.logprobs is None else
                      completion_block(req, final, ids, c.logprobs or [], c.token_ids, len(echo), req.echo))
                choices.append({"index": len(choices), "text": echo + c.text, "finish_reason": c.finish_reason,
                                "stop_reason": c.stop_reason, **extra, "logprobs": lp})
            usage["prompt_tokens"] += len(ids)
            usage["completion_tokens"] += sum(len(c.token_ids) for c in final.outputs)
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        metrics.requests.labels(status="200").inc()
        return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                "choices": choices, "usage": usage}

    async def _stream(starts, req, t0, base, choice_of, prelude=()):
        """SSE of one or more requests (``starts``: (first output, iterator) pairs; prompt k's choice i
        is choice k * n + i): ``prelude`` chunks, a chunk per output with new text or tokens
        (``choice_of(request_output, output, index, text_delta, new_token_ids, first)`` builds its choice;
        first: the choice's first chunk), the usage chunk
        when asked, ``[DONE]``. Leaving early (a disconnect) closes the iterators: the requests abort."""
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(k, first, gen):
            try:
                item = first
                while True:
                    await merged.put((k, item))
                    if item.finished:
                        return
                    item = await gen.__anext__()
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                await merged.put((k, e))

        pumps = [asyncio.ensure_future(pump(k, f, g)) for k, (f, g) in enumerate(starts)]
        sent, finals, first_t = {}, {}, None
        try:
            for chunk in prelude:
                yield f"data: {json.dumps(chunk)}\n\n"
            while len(finals) < len(starts):
                k, item = await merged.get()
                if isinstance(item, BaseException):
                    raise item
                if first_t is None and any(c.token_ids for c in item.outputs):
                    first_t = time.monotonic()
                for c in item.outputs:
                    idx = k * req.n + c.index
                    prev, prev_tok = sent.get(idx, (0, 0))
                    delta, new_ids = c.text[prev:], c.token_ids[prev_tok:]
                    if delta or new_ids or c.finish_reason:
                        first = idx not in sent
                        sent[idx] = (len(c.text), len(c.token_ids))
                        choice = choice_of(item, c, idx, delta, new_ids, first)
                        yield f"data: {json.dumps(dict(base, choices=[choice]))}\n\n"
                if item.finished:
                    finals[k] = item
            for final in finals.values():
                record_finished(final, t0, first_t)
            if req.stream_options and req.stream_options.include_usage:
                n_in = sum(len(f.prompt_token_ids) for f in finals.values())
                n_out = sum(len(c.token_ids) for f in finals.values() for c in f.outputs)
                usage = {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}
                yield f"data: {json.dumps(dict(base, choices=[], usage=usage))}\n\n"
            yield "data: [DONE]\n\n"
            metrics.requests.labels(status="200").inc()
        finally:
            for t in pumps:
                t.cancel()
            for _, gen in starts:
                await gen.aclose()

    def _stream_completion(starts, req, rid, created, t0, tokenized):
        base = {"id": rid, "object": "text_completion", "created": created, "model": req.model}

        echoes = [echo_text(text, ids) if req.echo else "" for text, ids in tokenized]  # (once, not per chunk)

        def choice(item, c, idx, delta, ids, first):
            prompt_ids, echo = tokenized[idx // req.n][1], echoes[idx // req.n]
            out = {"index": idx, "text": echo + delta if first else delta, "finish_reason": c.finish_reason,
                   "stop_reason": c.stop_reason, "logprobs": None, "token_ids": ids}
            if req.logprobs is not None:
                done = len(c.token_ids) - len(ids)
                out["logprobs"] = completion_block(req, item, prompt_ids, (c.logprobs or [])[done:done + len(ids)],
                                                   ids, len(echo) + len(c.text) - len(delta), req.echo and first)
            if first and req.prompt_logprobs is not None:
                out["prompt_logprobs"] = prompt_logprobs_field(item)
            return out

        return _stream(starts, req, t0, base, choice)

    def chat_ids(messages, add_generation_prompt: bool, tools=None) -> list[int]:
        """The chat template's token ids of the messages and tools (400s for a model without one and a template
        error)."""
        if tok is None or not (chat_template or getattr(tok, "chat_template", None)):
            raise APIError(400, "this model has no chat template", param="messages")
        try:
            msgs = template_messages(messages)
        except ToolError as e:
            raise APIError(400, str(e), param=e.param) from None
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        try:
            ids = tok.apply_chat_template(msgs, tools=tools or None, chat_template=chat_template, tokenize=True,
                                          add_generation_prompt=add_generation_prompt)
        except Exception as e:  # noqa: BLE001 - a template error is the request's fault
            raise APIError(400, f"the chat template failed on these messages: {e}", param="messages") from None
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def tokenizer_for(model: str | None, param: str):
        """The tokenizer of /tokenize and /detokenize (model optional there; a 400 naming param without one)."""
        if model is not None:
            check_model(model)
        if tok is None:
            raise APIError(400, "this server has no tokenizer", param=param)
        return tok

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        """vLLM's: {"count", "max_model_len", "tokens"} of a prompt or of chat messages."""
        tokenizer_for(req.model, "prompt")
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        if req.messages is not None:
            try:
                tools = check_tools(req.tools)
            except ToolError as e:
                raise APIError(400, str(e), param=e.param) from None
            ids = chat_ids(req.messages, req.add_generation_prompt, tools)
        else:
            ids = list(tok(req.prompt, add_special_tokens=req.add_special_tokens).input_ids)
        return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        """vLLM's: {"prompt"}, the text of token ids."""
        tokenizer_for(req.model, "tokens")
        bad = [t for t in req.tokens if not 0 <= t < engine.config.vocab_size]
        if bad:
            raise APIError(400, f"tokens must be in 0..{engine.config.vocab_size - 1}, got {bad[:4]}", param="tokens")
        return {"prompt": tok.decode(req.tokens)}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        lora = check_model(req.model)
        unsupported(req)
        try:
            tools = check_tools(req.tools)
            mode = tool_mode(req.tool_choice, tools, tool_parser)
        except ToolError as e:
            raise APIError(400, str(e), param=e.param) from None
        _, ids = truncated((None, chat_ids(req.messages, req.add_generation_prompt, tools)), req)
        prompt_len_check(ids)
        if req.top_logprobs is not None and not 0 <= req.top_logprobs <= 20:
            raise APIError(400, "top_logprobs must be in 0..20", param="top_logprobs")
        if req.top_logprobs and not req.logprobs:  # OpenAI's rule (it would be dropped otherwise)
            raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        n_lp = (req.top_logprobs or 0) if req.logprobs else None
        if req.stream and req.prompt_logprobs is not None:
            raise APIError(400, "prompt_logprobs is not supported with stream on chat completions",
                           param="prompt_logprobs")
        if mode == "auto" and tool_parser == "mistral":  # ([TOOL_CALLS] is a special token: kept, as vLLM's)
            req.skip_special_tokens = False
        params = _params(req, n_lp, default_max(len(ids)), req.prompt_logprobs,
                         guided_for(mode, tools, req.parallel_tool_calls))
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        t0 = time.monotonic()
        first, gen = await run_one(ids, params, rid, lora)
        if req.stream:
            return StreamingResponse(_stream_chat([(first, gen)], req, rid, created, t0, mode),
                                     media_type="text/event-stream")
        final, first_t = first, time.monotonic()
        async for final in gen:
            pass
        check_failed(final)
        record_finished(final, t0, first_t)
        n_out = sum(len(c.token_ids) for c in final.outputs)
        metrics.requests.labels(status="200").inc()
        extra = {} if req.prompt_logprobs is None else {"prompt_logprobs": prompt_logprobs_field(final)}
        return {"id": rid, "object": "chat.completion", "created": created, "model": req.model, **extra,
                "choices": [{"index": c.index, **chat_message(c, mode, req.parallel_tool_calls),
                             "stop_reason": c.stop_reason,
                             "logprobs": logprob_block_chat(c.logprobs or [], c.token_ids, req.top_logprobs or 0)
                             if req.logprobs else None} for c in final.outputs],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": n_out, "total_tokens": len(ids) + n_out}}

    def chat_message(c, mode, parallel: bool = True) -> dict[str, Any]:
        """A finished choice's message and finish_reason: its text, or under tool calling the calls parsed from it
        (finish_reason "tool_calls" where "auto" or "required" made calls; a named function's call keeps the
        engine's reason, as OpenAI's forced calls)."""
        if mode == "none":
            return {"message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason}
        content, calls, called = finished_output(c.text, mode, tool_parser, parallel)
        return {"message": {"role": "assistant", "content": content, "tool_calls": calls},
                "finish_reason": "tool_calls" if called else c.finish_reason}

    def _stream_chat(starts, req, rid, created, t0, mode="none"):
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model}
        prelude = [dict(base, choices=[{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None}]) for i in range(req.n)]
        splitters: dict[int, StreamSplitter] = {}

        def choice(item, c, idx, delta, ids, first):
            split = splitters.setdefault(idx, StreamSplitter(mode, tool_parser, req.parallel_tool_calls))
            text = split.feed(delta)
            out = {"index": idx, "delta": {"content": text} if text else {}, "finish_reason": c.finish_reason}
            calls = split.calls() if c.finish_reason is None else []
            if c.finish_reason is not None and mode != "none":
                rest, calls, called = split.finish()
                if rest:
                    out["delta"]["content"] = text + rest
                if called:
                    out["finish_reason"] = "tool_calls"
            if calls:  # (vLLM's: a call's index, id and name first, then pieces of its arguments)
                out["delta"]["tool_calls"] = calls
            if req.logprobs:
                done = len(c.token_ids) - len(ids)
                out["logprobs"] = logprob_block_chat((c.logprobs or [])[done:done + len(ids)], ids,
                                                     req.top_logprobs or 0)
            return out

        return _stream(starts, req, t0, base, choice, prelude)

    return app
