"""``pagoda serve [MODEL] --host 127.0.0.1 --port 8000 ...``: the engine behind an OpenAI API.

SIGTERM / SIGINT: stop accepting connections, let in-flight requests finish for up to
``--shutdown-timeout`` seconds, abort the rest (their pages are freed), exit 0.
"""
from __future__ import annotations

import logging
import os
import signal

from .tools import PARSERS


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (default model: the bundled pagoda-demo)")
    p.add_argument("model", nargs="?", default=None, help="a local Hugging Face folder or a bundled name")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--max-waiting", type=int, default=1024, help="waiting requests beyond which the server answers 503")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--num-kv-pages", type=int, default=None)
    p.add_argument("--attention-backend", default=None, choices=["pagoda", "flashinfer", "torch"])
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--no-async-scheduling", action="store_true",
                   help="do not prepare (or, in steady decoding, launch) the next decode step while the "
                        "current one runs")
    p.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters (--lora-modules)")
    p.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                   help="PEFT LoRA folders served as models of their own name, NAME=PATH or vLLM's JSON "
                        "'{\"name\": ..., \"path\": ...}' (needs --enable-lora)")
    p.add_argument("--max-loras", type=int, default=1, help="adapters on the device at once")
    p.add_argument("--max-lora-rank", type=int, default=16)
    p.add_argument("--max-cpu-loras", type=int, default=None, help="parsed adapters kept on the host")
    p.add_argument("--allow-runtime-lora-updating", action="store_true",
                   help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's; needs --enable-lora)")
    p.add_argument("--lora-target-modules", nargs="+", default=None,
                   help="the modules adapters may adapt (default: q_proj k_proj v_proj o_proj gate_proj up_proj "
                        "down_proj); fewer run fewer LoRA launches a step")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3", "fp8_e5m2"],
                   help="the KV cache's dtype (fp8: twice the tokens in the same memory)")
    p.add_argument("--calculate-kv-scales", action="store_true",
                   help="an fp8 KV cache's scales from the first step's K / V (vLLM's), not the checkpoint's or 1.0")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="shard the model over this many GPUs of the host (one process each)")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='tool_choice "auto": the model\'s outputs parsed for tool calls (--tool-call-parser)')
    p.add_argument("--tool-call-parser", default=None, choices=PARSERS,
                   help="how tool calls are written in the model's outputs (hermes: <tool_call> tags, Qwen / Hermes; "
                        "llama3_json: JSON objects, Llama 3.1+; mistral: after Mistral's [TOOL_CALLS] token; "
                        "pythonic: a Python list of calls)")
    p.add_argument("--chat-template", default=None,
                   help="a Jinja chat template (a file, or the template itself) instead of the tokenizer's")
    p.add_argument("--shutdown-timeout", type=float, default=10.0)
    p.add_argument("--log-level", default="info")


def serve(args) -> int:
    import uvicorn

    from ..engine import LLMEngine
    from .api import create_app
    from .async_engine import AsyncEngine

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loras = parse_lora_modules(args.lora_modules or [])
    if loras and not args.enable_lora:
        raise SystemExit("--lora-modules needs --enable-lora")
    if args.allow_runtime_lora_updating and not args.enable_lora:
        raise SystemExit("--allow-runtime-lora-updating needs --enable-lora")
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise SystemExit("--enable-auto-tool-choice needs --tool-call-parser")
    chat_template = args.chat_template
    if chat_template is not None and os.path.isfile(chat_template):
        with open(chat_template) as f:
            chat_template = f.read()
    engine = LLMEngine(args.model, dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens,
                       gpu_memory_utilization=args.gpu_memory_utilization, attention_backend=args.attention_backend,
                       enable_prefix_caching=not args.no_prefix_caching, load_format=args.load_format,
                       num_kv_pages=args.num_kv_pages, enforce_eager=args.enforce_eager,
                       async_scheduling=not args.no_async_scheduling, enable_lora=args.enable_lora,
                       max_loras=args.max_loras, max_lora_rank=args.max_lora_rank, max_cpu_loras=args.max_cpu_loras,
                       lora_target_modules=args.lora_target_modules, tensor_parallel_size=args.tensor_parallel_size,
                       kv_cache_dtype=args.kv_cache_dtype, calculate_kv_scales=args.calculate_kv_scales,
                       skip_tokenizer_init=False if args.load_format != "dummy" else _no_tokenizer(args.model))
    name = args.served_model_name or engine.model_name
    for m in loras:  # (a folder that is no adapter of this model stops the server here, not a request later)
        engine.add_lora(m)
    async_engine = AsyncEngine(engine, max_waiting=args.max_waiting)
    app = create_app(async_engine, name, lora_modules=loras, allow_lora_updates=args.allow_runtime_lora_updating,
                     tool_parser=args.tool_call_parser if args.enable_auto_tool_choice else None,
                     chat_template=chat_template)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout, access_log=False)
    server = uvicorn.Server(config)
    logging.getLogger("pagoda").info("serving %s on http://%s:%d (attention: %s, device: %s)", name, args.host,
                                     args.port, engine.runner.attention_backend, engine.device)
    # uvicorn handles SIGTERM/SIGINT with a graceful shutdown, then restores the previous handlers
    # and re-raises the signal: make those handlers no-ops so that a clean shutdown exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        server.run()
    finally:
        async_engine.stop()
        engine.shutdown()
    return 0


def parse_lora_modules(specs: list[str]):
    """--lora-modules' NAME=PATH entries (or vLLM's JSON form, '{"name": ..., "path": ...}') as LoRARequests (ids 1,
    2, ... in order); ValueError for a malformed or repeated name."""
    import json

    from ..engine import LoRARequest

    out, names = [], set()
    for spec in specs:
        if spec.lstrip().startswith("{"):
            try:
                d = json.loads(spec)
                name, path, sep = str(d["name"]), str(d["path"]), "="
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"--lora-modules JSON entries need \"name\" and \"path\", got {spec!r}") from None
        else:
            name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules entries are NAME=PATH, got {spec!r}")
        if name in names:
            raise ValueError(f"--lora-modules names {name!r} twice")
        names.add(name)
        out.append(LoRARequest(name, len(out) + 1, path))
    return out


def _no_tokenizer(model) -> bool:
    import os

    from ..engine.loader import resolve_model_path

    path = resolve_model_path(model)
    return not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model"))
