"""The engine (a step loop over scheduler -> runner -> detokenizer) and the offline ``LLM`` API.

    llm = pagoda.LLM("path/to/hf-folder")          # or None / "pagoda-demo": the bundled model
    outs = llm.generate(["def fib(n):"], pagoda.SamplingParams(max_tokens=64, temperature=0))
    outs[0].outputs[0].text

``LLMEngine`` is what the server drives: ``add_request`` / ``abort`` / ``step`` (returns the
requests that made progress), with statistics (prefix-cache hits, KV usage, preemptions).
"""
from __future__ import annotations

import dataclasses
import gc
import itertools
import logging
import math
import os
import pickle
import time
import weakref

import torch
import torch.distributed as dist

from ..attention.formats import SUPPORTED_HEAD_DIMS
from .config import ModelConfig, SamplingParams
from .guided import GrammarProcessor, GuidedCompiler
from .kv_cache import PagePool, PrefixCache
from .loader import load_model, load_tokenizer, resolve_model_path
from .lora import LoRAManager, LoRARequest
from .parallel import Workers, check_tp_size, free_port, init_group, rank_device
from .runner import ModelRunner, fp8_prefill_scratch_shape, uses_fp8_prefill_scratch
from .scheduler import Request, ScheduledBatch, Scheduler, Status

logger = logging.getLogger("pagoda.engine")


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: dict | None = None
    # SamplingParams.prompt_logprobs: per prompt token, {token id: log-probability} of it and the top tokens at
    # its position given the tokens before it; None for the first token (vLLM's format). None when not asked.
    prompt_logprobs: list[dict[int, float] | None] | None = None


@dataclasses.dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_query_tokens: int = 0
    prefix_hit_tokens: int = 0
    preemptions: int = 0
    kv_pages_total: int = 0
    kv_pages_used: int = 0
    running: int = 0
    waiting: int = 0
    cuda_graph_steps: int = 0
    cascade_steps: int = 0  # decode steps that ran the cascade wrapper (requests sharing prefix pages)
    prepared_steps: int = 0  # decode steps prepared while the previous step ran (async scheduling)
    ahead_steps: int = 0  # of those, launched before the previous step's tokens were read back
    split_steps: int = 0  # mixed steps whose one-token requests ran the decode kernel (PAGODA_SPLIT_MIXED)

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0

    @property
    def kv_usage(self) -> float:
        return self.kv_pages_used / self.kv_pages_total if self.kv_pages_total else 0.0


def chat_text(content) -> str:
    """A chat message's content as a chat template takes it: a string as it is, OpenAI-style parts as their text
    parts joined, None as ""; ValueError otherwise (LLM.chat and the server's chat endpoint)."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        return "".join(str(part.get("text", "")) for part in content if part.get("type") == "text")
    raise ValueError(f"a message's content must be a string or a list of parts, got {content!r:.80}")


def _kv_pages_from_memory(config: ModelConfig, dtype, page_size, utilization, max_num_batched_tokens, max_num_seqs,
                          device, extra_bytes: int = 0) -> int:
    """KV pages that fit in gpu_memory_utilization of the device beside what is allocated already, the step's
    activations and extra_bytes more (the fp8 cache's 16-bit prefill scratch, PAGODA_FP8_PREFILL_SCRATCH)."""
    free, total = torch.cuda.mem_get_info(device)
    # weights and everything allocated so far; memory PyTorch's allocator holds in its cache but no tensor uses
    # (freed buffers of earlier work, e.g. a benchmark's) is free for the pool, which PyTorch allocates too
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    used_elsewhere = total - free - cached
    c = config
    act = max_num_batched_tokens * (c.hidden_size * 6 + 2 * c.intermediate_size * 3 +
                                    (c.num_heads + 2 * c.num_kv_heads) * c.head_dim * 2) * 4
    act += max_num_seqs * c.vocab_size * 4 * 4 + (512 << 20) + extra_bytes  # logits + sampling, graphs, workspace
    page_bytes = c.num_layers * 2 * page_size * c.num_kv_heads * c.head_dim * torch.finfo(dtype).bits // 8
    budget = int(total * utilization) - used_elsewhere - act
    if budget < page_bytes * 16:
        raise ValueError(f"gpu_memory_utilization={utilization} leaves {budget / 2**30:.2f} GiB for the KV cache: "
                         f"raise it or lower max_num_batched_tokens / max_num_seqs")
    return budget // page_bytes


_heap_frozen = False  # (freeze_startup_heap ran in this process)


def freeze_startup_heap() -> None:
    """Once a process (the first CUDA engine calls it before it builds anything): collect, then freeze the heap
    (gc.freeze). The objects alive then (the modules, classes and functions of torch, Triton, NumPy, transformers:
    ~190k tracked objects) go to the permanent generation, which the collector no longer scans. Why: a full
    collection comes every few hundred decode steps and scanned them all. H200, session 41 (`python
    scripts/fp8_scratch_probe.py on --b1-first --copy-first`, Llama-3.1-8B): one took 53-77 ms over ~210k objects,
    where a whole batch-64 step is 5.9 ms; it is what made session 40's decode with the fp8 prefill scratch look 1 ms
    a token slower (it fell inside the timed steps there, just outside them without the scratch). Frozen first
    (`--gc-freeze-before`): 7.9 ms over ~29k objects. vLLM freezes its heap after start-up too; pagoda freezes
    before the first engine exists (LLMEngine.__new__), so no engine's objects are ever frozen: an engine dropped,
    shut down or not, is freed as before (a frozen engine in a reference cycle would not be), and later engines do
    not freeze an earlier one still alive. What it costs: an object of the caller's that was alive at the first
    engine's start and later becomes cyclic garbage is never collected (gc.unfreeze() undoes the freeze)."""
    global _heap_frozen
    if _heap_frozen:
        return
    _heap_frozen = True
    gc.collect()
    gc.freeze()


def _engine_device(device) -> torch.device:
    """LLMEngine's device argument as a torch.device (None: CUDA where there is one)."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _freezes_heap(device) -> bool:
    """Whether an engine on ``device`` (LLMEngine's argument) freezes the start-up heap: on CUDA (a CPU step is far
    longer than a collection's pause). A bad device: False (__init__ says what is wrong with it)."""
    try:
        return _engine_device(device).type == "cuda"
    except (RuntimeError, TypeError, ValueError):
        return False


class LLMEngine:
    def __new__(cls, *args, **kwargs):
        # (before the instance exists: the freeze must not hold the engine itself; freeze_startup_heap)
        if _freezes_heap(kwargs.get("device")):
            freeze_startup_heap()
        return super().__new__(cls)

    def __init__(self, model: str | None = None, *, dtype: str = "auto", max_model_len: int | None = None,
                 max_num_seqs: int = 256, max_num_batched_tokens: int | None = None,
                 gpu_memory_utilization: float = 0.9, attention_backend: str | None = None,
                 enable_prefix_caching: bool = True, load_format: str = "auto", page_size: int = 16,
                 num_kv_pages: int | None = None, enforce_eager: bool = False, device: str | None = None,
                 seed: int = 0, skip_tokenizer_init: bool = False, enable_cascade: bool = True,
                 async_scheduling: bool = True, enable_lora: bool = False, max_loras: int = 1,
                 max_lora_rank: int = 16, max_cpu_loras: int | None = None, lora_target_modules=None,
                 tensor_parallel_size: int = 1, kv_cache_dtype: str = "auto", calculate_kv_scales: bool = False,
                 _tp: tuple | None = None):
        """enable_lora: serve LoRA adapters (add_request's lora_request; engine/lora.py), at most max_loras of them
        among the running requests, of rank <= max_lora_rank, max_cpu_loras parsed adapters kept on the host;
        lora_target_modules: the modules they may adapt (default all seven; fewer, fewer launches a step).
        tensor_parallel_size: shard the model over that many GPUs (cuda:0.., one process each; engine/parallel.py);
        kv_cache_dtype (vLLM's): "auto" (the model's dtype), "fp8" / "fp8_e4m3" or "fp8_e5m2": the KV cache in 8
        bits, twice the tokens in the same memory and half the bytes each decode step reads (scales 1.0; K / V
        quantized as they are appended, the attention kernels dequantizing).
        calculate_kv_scales (vLLM's; an fp8 cache): each layer's k_scale / v_scale from the first step's K / V
        (max |K| / 200, max |V| / 100, vLLM's constants) instead of the checkpoint's or 1.0; that step runs eagerly
        and the CUDA graphs are captured after it.
        _tp: (rank, size, rendezvous) of a worker rank, which parallel.worker_main builds."""
        engine_kwargs = {k: v for k, v in locals().items() if k not in ("self", "_tp")}
        self._workers = None
        self.tp = None
        if not isinstance(enable_lora, bool):
            raise ValueError(f"enable_lora must be a bool, got {enable_lora!r}")
        path = resolve_model_path(model)
        self.model_path = path
        self.model_name = model or "pagoda-demo"
        self.config = config = ModelConfig.from_path(path)
        tp_size = check_tp_size(tensor_parallel_size, config)
        self.device = _engine_device(device)
        # (_tp of size 1: a group of one rank, whose collectives are copies: a test of the NCCL collectives in the
        # decode graphs on one GPU)
        if _tp is not None:
            tp_size = _tp[1]
        # (rank 0 checks what it can before it starts workers, which would fail alike)
        if tp_size > 1 or _tp is not None:
            rank, _, rendezvous = _tp or (0, tp_size, f"tcp://127.0.0.1:{free_port()}")
            self.device = rank_device(self.device, rank, tp_size)
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            else:  # (the ranks share the host's cores: more threads than cores spin against each other, 4x slower)
                torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // tp_size))
        if dtype == "auto":
            self.dtype = config.dtype if self.device.type == "cuda" else torch.float32
        else:
            from .config import _dtype

            self.dtype = _dtype(dtype)
        kv_dtypes = {"auto": None, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
                     "fp8_e5m2": torch.float8_e5m2}
        if kv_cache_dtype not in kv_dtypes:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(kv_dtypes)}, got {kv_cache_dtype!r}")
        self.kv_cache_dtype = kv_dtypes[kv_cache_dtype] or self.dtype
        if kv_dtypes[kv_cache_dtype] is not None and self.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} needs a float16 / bfloat16 model (the attention "
                             f"kernels take 16-bit queries over an fp8 cache), dtype is {self.dtype}: pass "
                             f"dtype='bfloat16'")
        if not isinstance(calculate_kv_scales, bool):
            raise ValueError(f"calculate_kv_scales must be a bool, got {calculate_kv_scales!r}")
        if calculate_kv_scales and kv_dtypes[kv_cache_dtype] is None:
            raise ValueError(f"calculate_kv_scales sets the scales of an fp8 KV cache: it needs kv_cache_dtype 'fp8' "
                             f"/ 'fp8_e4m3' / 'fp8_e5m2', got {kv_cache_dtype!r}")
        if kv_dtypes[kv_cache_dtype] is not None and attention_backend == "flashinfer":
            raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} takes attention_backend 'pagoda' or 'torch', not "
                             f"'flashinfer'")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if not isinstance(max_num_seqs, int) or max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be an integer >= 1, got {max_num_seqs!r}")
        # a sliding-window model serves its whole position range: the kernels apply the window (window_left)
        limit = config.max_position_embeddings
        self.max_model_len = limit if max_model_len is None else max_model_len
        if isinstance(self.max_model_len, bool) or not isinstance(self.max_model_len, int) or not (
                2 <= self.max_model_len <= limit):
            raise ValueError(f"max_model_len must be in 2..{limit} for this model, got {max_model_len}")
        if attention_backend is None:
            attention_backend = "pagoda"
            if self.device.type == "cuda" and (config.head_dim not in SUPPORTED_HEAD_DIMS
                                               or self.dtype not in (torch.float16, torch.bfloat16)):
                # vLLM's way: the backend follows what the kernels take; said once, in the log
                attention_backend = "torch"
                logger.warning("head_dim %d / %s: pagoda's attention kernels take head_dim %s in fp16 / bf16; "
                               "attention_backend='torch' (the PyTorch reference) serves this model",
                               config.head_dim, self.dtype, SUPPORTED_HEAD_DIMS)
        if load_format == "auto" and not any(f.endswith(".safetensors") for f in os.listdir(path)):
            raise FileNotFoundError(f"{path} has no *.safetensors: pass load_format='dummy' for random weights")
        self.max_num_batched_tokens = max_num_batched_tokens or max(2048, min(self.max_model_len, 8192))
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if tp_size > 1 and _tp is None:
            self._workers = Workers(tp_size, rendezvous, engine_kwargs)
            self._finalizer = weakref.finalize(self, _close_tp, self._workers)
        try:
            if tp_size > 1 or _tp is not None:
                self.tp = init_group(rank, tp_size, rendezvous, self.device)
            # (every rank draws the same random numbers: the same seeds, the same sampled tokens)
            torch.manual_seed(seed)
            # (a LoRA engine keeps the norm weights apart: its adapters' A matrices read the normalized input)
            self.model = load_model(path, config, self.dtype, self.device, load_format, seed,
                                    fold_norms=not enable_lora, tp=self.tp)
            shard = self.model.config  # (the rank's heads and MLP columns: what the KV cache and the plans hold)
            self.lora = (LoRAManager(shard, self.device, self.dtype, max_loras, max_lora_rank, max_cpu_loras,
                                     lora_target_modules, tp=self.tp, full_config=config) if enable_lora else None)
            self.tokenizer = None if skip_tokenizer_init else load_tokenizer(path)
            if num_kv_pages is None:
                if self.device.type == "cuda":
                    scratch = 0
                    if uses_fp8_prefill_scratch(self.kv_cache_dtype, self.device, attention_backend):
                        shape = fp8_prefill_scratch_shape(shard, page_size, self.max_model_len,
                                                          itemsize=self.dtype.itemsize)
                        scratch = math.prod(shape) * self.dtype.itemsize
                    num_kv_pages = _kv_pages_from_memory(shard, self.kv_cache_dtype, page_size,
                                                         gpu_memory_utilization, self.max_num_batched_tokens,
                                                         max_num_seqs, self.device, extra_bytes=scratch)
                else:
                    num_kv_pages = min(max_num_seqs * -(-self.max_model_len // page_size), 4096) + 1
            if self.tp is not None:  # (every rank's scheduler must see the same pool: the smallest)
                num_kv_pages = self.tp.min_int(num_kv_pages, self.device)
            self.pool = PagePool(int(num_kv_pages), page_size)
            self.prefix_cache = PrefixCache(self.pool) if enable_prefix_caching else None
            self.scheduler = Scheduler(self.pool, self.prefix_cache, max_num_seqs, self.max_num_batched_tokens,
                                       self.max_model_len,
                                       # (layers of different windows: every page stays, the global ones read them)
                                       window_left=-1 if config.uniform_window_left is None
                                       else config.uniform_window_left,
                                       max_loras=max_loras if enable_lora else 0)
            self.runner = ModelRunner(shard, self.model, device=self.device, dtype=self.dtype,
                                      num_pages=int(num_kv_pages), page_size=page_size,
                                      attention_backend=attention_backend, max_num_seqs=max_num_seqs,
                                      max_num_batched_tokens=self.max_num_batched_tokens,
                                      max_model_len=self.max_model_len,
                                      # (gloo's collectives cannot be captured: PAGODA_TP_BACKEND=gloo on a GPU is
                                      # eager)
                                      enable_cuda_graph=not enforce_eager and (self.tp is None
                                                                               or self.tp.backend == "nccl"),
                                      enable_cascade=enable_cascade, lora=self.lora,
                                      kv_cache_dtype=self.kv_cache_dtype, calculate_kv_scales=calculate_kv_scales)
            ckpt_scales = self.model.kv_cache_scales
            if calculate_kv_scales:
                if ckpt_scales:
                    logger.info("calculate_kv_scales: the first step's K / V set the KV-cache scales, not the "
                                "checkpoint's")
            elif self.runner.kv_fp8 and not ckpt_scales:  # (vLLM warns so too)
                logger.warning("kv_cache_dtype %s without KV-cache scales in the checkpoint: K / V stored at scale 1.0 "
                               "(values past the fp8 range are clamped)", self.kv_cache_dtype)
            elif ckpt_scales and not self.runner.kv_fp8:
                logger.info("the checkpoint's KV-cache scales are for an fp8 cache: unused with kv_cache_dtype %s",
                            self.runner.kv_dtype)
            if self.runner.use_graphs:
                t0 = time.perf_counter()
                self.runner.capture_graphs()
                self.graph_capture_seconds = time.perf_counter() - t0
            self.generator = torch.Generator().manual_seed(seed)
            self._guided = None  # guided decoding's GuidedCompiler, made at the first guided request
            self.eos_ids = set(config.eos_token_ids)
            if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
                self.eos_ids.add(self.tokenizer.eos_token_id)
            self.requests: dict[str, list[Request]] = {}
            # async scheduling: while a decode step runs on the device, the next one is prepared (inputs, plan)
            # as if every request goes on, and in steady decoding launched before this one's tokens are read
            # back (LLMEngine.step)
            self.async_scheduling = async_scheduling
            self._prepared = None  # a prepared step that runs if the scheduler picks its batch
            self._ahead = None  # (batch, pending): a step launched during the previous step() call
            self.stats = EngineStats(kv_pages_total=self.pool.usable)
            self._ids = itertools.count()
            if self._workers is not None:
                self._workers.wait_ready()
        except BaseException:  # (the workers and the process group go now, not when this object is collected)
            self.shutdown()
            raise

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers and leave the process group (rank 0; a no-op for one GPU). Also done
        when the engine is collected or the interpreter exits."""
        if self._workers is not None:
            self._finalizer()
        elif self.tp is not None and dist.is_initialized():
            dist.destroy_process_group()
        self.tp = None

    # -- requests ---------------------------------------------------------------------
    def tokenize(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer (skip_tokenizer_init): give prompts as token ids")
            return prompt, self.tokenizer(prompt).input_ids
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    lora_request: LoRARequest | None = None) -> str:
        """lora_request: the LoRA adapter the request runs with (an engine built with enable_lora); its folder is
        read and checked here (ValueError for a bad one)."""
        if self._workers is not None:  # (a worker gone: parallel.WorkerGone now, before this rank adds anything)
            self._workers.check()
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        if self._workers is not None and params.logits_processors:
            try:  # (every rank runs them: they go to the workers by pickle)
                pickle.dumps(params.logits_processors)
            except Exception as e:
                raise ValueError(f"SamplingParams.logits_processors must be picklable with tensor_parallel_size > 1 "
                                 f"(every rank runs them): {e}") from None
        guided = None
        if params.guided_decoding is not None:  # (compiled before anything is added: a bad grammar leaves no trace)
            # (tensor-parallel: every rank compiles it and masks its own logits alike, as it runs logits processors)
            if self.tokenizer is None:
                raise ValueError("SamplingParams.guided_decoding needs the model's tokenizer (the engine was built "
                                 "without one)")
            if self._guided is None:
                self._guided = GuidedCompiler(self.tokenizer, self.config.vocab_size, self.eos_ids)
            guided = self._guided.compile(params.guided_decoding)
        if lora_request is not None and self.lora is None:
            raise ValueError("lora_request needs an engine built with enable_lora=True")
        if lora_request is not None and not isinstance(lora_request, LoRARequest):
            raise ValueError(f"lora_request must be a pagoda.LoRARequest, got {type(lora_request).__name__}")
        text, ids = self.tokenize(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if params.truncate_prompt_tokens is not None:
            ids = ids[-params.truncate_prompt_tokens:]
        if params.allowed_token_ids and max(params.allowed_token_ids) >= self.config.vocab_size:
            raise ValueError(f"SamplingParams.allowed_token_ids must be in 0..{self.config.vocab_size - 1}, got "
                             f"{max(params.allowed_token_ids)}")
        if params.logit_bias and max(params.logit_bias) >= self.config.vocab_size:
            raise ValueError(f"logit_bias token ids must be in 0..{self.config.vocab_size - 1}, got "
                             f"{max(params.logit_bias)}")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be in 0..{self.config.vocab_size - 1}, got {bad[:4]}")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; this model's max_model_len is {self.max_model_len} "
                             f"(prompt + at least one generated token)")
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if lora_request is not None:  # (last of the checks: a request refused above leaves no trace in the cache)
            if self._workers is not None and lora_request.lora_int_id not in self.lora.host:
                self.add_lora(lora_request)  # (the workers read the folder now, not when they get to the request)
            else:
                self.lora.register(lora_request)
        group = [Request(request_id, text, ids, params, index=i) for i in range(params.n)]
        for r in group:
            r.lora_request = lora_request
            if guided is not None:  # (a matcher each: the n samples go their own ways through the grammar)
                r.guided = GrammarProcessor(guided, self.config.vocab_size)
        if params.bad_words:
            words = self._bad_words_ids(params.bad_words)
            for r in group:
                r.bad_words_ids = words
        if params.min_tokens:  # the ids the sampler bans until the output has min_tokens tokens
            ban = sorted(set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids))
            for r in group:
                r.min_tokens_ban = [t for t in ban if 0 <= t < self.config.vocab_size]
        first = group[0]
        for r in group[1:]:  # the other samples start once the first one's prompt pages are cached
            r.held_until = (lambda f=first: f.num_computed >= len(f.prompt_token_ids) or f.finished
                            or self.prefix_cache is None)
        self.requests[request_id] = group
        if lora_request is not None:  # (its adapter stays parsed on the host until the group is done)
            self.lora.acquire(lora_request)
        for r in group:
            self.scheduler.add(r)
        self.stats.prompt_tokens += len(ids) * params.n
        if self._workers is not None:
            self._forward_request(text, ids, params, request_id, lora_request)
        return request_id

    def add_lora(self, lora_request: LoRARequest) -> None:
        """Check a LoRA adapter and keep it parsed on the host (vLLM's add_lora; the server's --lora-modules and
        /v1/load_lora_adapter): ValueError for a bad one. Tensor-parallel: every rank reads it before this returns,
        and the ranks' host caches stay alike (every register here is one there, in the same order)."""
        if self.lora is None:
            raise ValueError("add_lora needs an engine built with enable_lora=True")
        self.lora.register(lora_request)
        if self._workers is not None:
            self._workers.request("lora", lora_request)

    def _forward_request(self, text, ids, params, request_id, lora_request) -> None:
        """Rank 0: the request for the workers, as this rank has added it (the token ids; each worker adds it with
        the same checks and the same state, so it succeeds there as here)."""
        self._workers.send("add", dict(prompt={"prompt": text, "prompt_token_ids": ids}, params=params,
                                       request_id=request_id, lora_request=lora_request))

    def _bad_words_ids(self, words: list[str]) -> list[list[int]]:
        """SamplingParams.bad_words as token sequences, vLLM's way: each word as it stands and with one leading
        space, the second kept only where the space makes a different first token of the same length."""
        if self.tokenizer is None:
            raise ValueError("SamplingParams.bad_words needs the model's tokenizer (the engine was built without one)")
        out = []
        for w in words:
            plain = self.tokenizer.encode(w.lstrip(), add_special_tokens=False)
            spaced = self.tokenizer.encode(" " + w.lstrip(), add_special_tokens=False)
            out.append(plain)
            if spaced and len(spaced) == len(plain) and spaced[0] != plain[0]:
                out.append(spaced)
        return [s for s in out if s and all(0 <= t < self.config.vocab_size for t in s)]

    def abort(self, request_id: str) -> bool:
        group = self.requests.pop(request_id, None)
        if group is None:
            return False
        if group[0].lora_request is not None:
            self.lora.release(group[0].lora_request)
        for r in group:
            if not r.finished:
                self.scheduler.abort(r)
                r.status, r.finish_reason = Status.FINISHED, "abort"
        if self._workers is not None:  # (last: a worker gone raises here, with this rank's state already clean)
            self._workers.send("abort", request_id)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- the step -----------------------------------------------------------------------
    def step(self, only_finished: bool = False) -> list[RequestOutput]:
        """One scheduler step; returns the outputs of the request groups that made progress (with
        ``only_finished``: of those that finished, which skips building and detokenizing the
        in-progress outputs that an offline caller would throw away)."""
        if self._workers is not None:  # (the workers run the same step: its collectives meet there)
            self._workers.send("step", only_finished)
        if self._ahead is not None and all(r.finished for r in self._ahead[0].requests):
            self.runner.collect(self._ahead[1])  # every request it ran for ended (or was aborted): dropped
            self._ahead = None
        if self._ahead is not None:  # this step was launched during the previous call (steady decoding)
            (batch, pending, graph), self._ahead = self._ahead, None
            self.stats.prepared_steps += 1
            self.stats.ahead_steps += 1
            self.stats.cuda_graph_steps += graph
        else:
            batch: ScheduledBatch = self.scheduler.schedule()
            prepared, self._prepared = self._prepared, None
            if not batch.requests:
                if self.scheduler.waiting and not self.scheduler.running:
                    raise RuntimeError("no request could be scheduled: the KV cache is too small for the next prompt")
                return []
            pending = self.runner.launch(batch, self.generator, prepared)
            self.stats.prepared_steps += self.runner.last_step_prepared
            self.stats.cuda_graph_steps += self.runner.last_step_graph
            self.stats.cascade_steps += self.runner.last_step_cascade
            self.stats.split_steps += self.runner.last_step_split
        if self.async_scheduling:  # the host prepares the next decode step while the device runs this one
            self._prepare_or_run_ahead(pending)
        reqs, tokens, logprobs = self.runner.collect(pending)
        self.scheduler.after_step(batch)
        now = time.monotonic()
        touched = {}
        for r, tok, lp in zip(reqs, tokens, logprobs):
            if r.finished:  # ended (or aborted) after this step was launched ahead: its token is dropped
                continue
            if tok < 0:  # the sampler found NaN / infinite logits for this request: end it, keep serving
                r.status, r.finish_reason, r.stop_reason = Status.FINISHED, "error", "invalid logits"
                self.scheduler.finish(r)
                touched[r.request_id] = True
                continue
            if r.first_token_time is None:
                r.first_token_time = now
            r.output_token_ids.append(tok)
            if lp is not None:
                r.output_logprobs.append(lp)
            self.stats.generation_tokens += 1
            self._check_stop(r, tok)
            if r.finished:
                self.scheduler.finish(r)
            touched[r.request_id] = True
        self.stats.steps += 1
        self._refresh_stats()
        outs = []
        for rid in touched:
            group = self.requests.get(rid)
            if group is None or (only_finished and not all(r.finished for r in group)):
                continue
            out = self._output(group)
            outs.append(out)
            if out.finished:
                del self.requests[rid]
                if group[0].lora_request is not None:
                    self.lora.release(group[0].lora_request)
        return outs

    def _prepare_or_run_ahead(self, pending) -> None:
        """Prepare the decode step after ``pending`` (still running on the device) as if every request goes
        on. If the scheduler would pick exactly that batch (nothing waiting, every running request decoding
        in it, within the token budget), launch it now, before ``pending``'s tokens are read back, so the
        device does not wait for the host between steps (vLLM's async scheduling); a request that ends
        with ``pending``'s token has its next token dropped (LLMEngine.step), and its pages were grown for
        nothing and given back with the rest. Otherwise keep it for the next call, which runs it if the
        scheduler picks its batch."""
        reqs = pending.requests
        if any(r.finished for r in reqs):  # a step run ahead for requests that ended: nothing to follow it
            return
        prepared = self.runner.prepare_next(pending, self.scheduler.grow)
        if prepared is None:
            return
        sched = self.scheduler
        # (penalties, bans and logits processors read each request's tokens so far, which a step launched ahead
        # would not have: such batches are prepared, and launched once the pending step's tokens are in)
        steady = (not sched.waiting and len(sched.running) == len(reqs) and len(reqs) <= sched.budget
                  and set(map(id, sched.running)) == set(map(id, reqs))
                  and not all(self._reaches_length(r, 1) for r in reqs)
                  and not any(r.params.penalized for r in reqs))
        if not steady:
            self._prepared = prepared
            return
        ahead = self.runner.launch_prepared(prepared, self.generator)
        batch = ScheduledBatch(list(prepared.requests), [1] * len(prepared.requests), [])
        self._ahead = (batch, ahead, self.runner.last_step_graph)

    def _reaches_length(self, r: Request, new_tokens: int = 0) -> bool:
        """Whether r, with new_tokens more tokens (1: the one being sampled), is at max_tokens or the model's
        length."""
        p = r.params
        return ((p.max_tokens is not None and len(r.output_token_ids) + new_tokens >= p.max_tokens)
                or r.num_tokens + new_tokens >= self.max_model_len)

    def _check_stop(self, r: Request, tok: int) -> None:
        p = r.params
        may_stop = len(r.output_token_ids) >= p.min_tokens  # vLLM's min_tokens: before it, only the length ends it
        if may_stop and not p.ignore_eos and tok in self.eos_ids:
            r.status, r.finish_reason, r.stop_reason = Status.FINISHED, "stop", None
        elif may_stop and tok in p.stop_token_ids:
            r.status, r.finish_reason, r.stop_reason = Status.FINISHED, "stop", tok
        if p.stop and self.tokenizer is not None and not r.finished:
            text = self._live_text(r)  # (kept within min_tokens too: a stop string is looked for after it)
            for s in p.stop if may_stop else ():
                at = text.find(s, max(0, len(r.text) - len(s)))
                if at >= 0:
                    r.text = text[:at + len(s)] if p.include_stop_str_in_output else text[:at]
                    r.status, r.finish_reason, r.stop_reason = Status.FINISHED, "stop", s
                    return
            r.text = text
        if not r.finished and self._reaches_length(r):
            r.status, r.finish_reason = Status.FINISHED, "length"

    def _live_text(self, r: Request) -> str:
        """The request's text so far, decoded incrementally (vLLM's scheme): each step decodes only
        the tokens since the last complete character, against the text of the same window without
        the new tokens, so a step costs O(new tokens) rather than O(output length)."""
        ids = r.output_token_ids
        if r.detok_read == len(ids):
            return r.live_text
        skip = r.params.skip_special_tokens
        before = self.tokenizer.decode(ids[r.detok_prefix:r.detok_read], skip_special_tokens=skip)
        now = self.tokenizer.decode(ids[r.detok_prefix:], skip_special_tokens=skip)
        if len(now) > len(before) and not now.endswith("\ufffd"):  # complete characters only
            r.live_text += now[len(before):]
            r.detok_prefix, r.detok_read = r.detok_read, len(ids)
        return r.live_text

    def _decode(self, r: Request) -> str:
        ids = r.output_token_ids
        if r.finish_reason == "stop" and r.stop_reason is None and ids and ids[-1] in self.eos_ids:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=r.params.skip_special_tokens)

    def _output(self, group: list[Request]) -> RequestOutput:
        outs = []
        for r in group:
            if self.tokenizer is not None and not (r.params.stop and r.finish_reason == "stop"
                                                    and isinstance(r.stop_reason, str)):
                text = self._decode(r) if r.finished else self._live_text(r)
                if not r.finished:
                    # what a stream may already show: not the start of a stop string that the next
                    # token could complete, not a byte sequence the next token completes (U+FFFD)
                    if r.params.stop:
                        hold = max(len(x) for x in r.params.stop) - 1
                        text = text[:len(text) - hold] if hold else text
                    text = text.rstrip("\ufffd")
                r.text = text
            lps = r.output_logprobs if r.params.logprobs is not None else None
            cum = (sum(d[t] for d, t in zip(lps, r.output_token_ids)) if lps else None)
            outs.append(CompletionOutput(r.index, r.text, list(r.output_token_ids), cum, lps, r.finish_reason,
                                         r.stop_reason))
        first = group[0]
        return RequestOutput(first.request_id, first.prompt, first.prompt_token_ids, outs,
                             all(r.finished for r in group), first.num_cached_tokens,
                             {"arrival": first.arrival, "first_token": first.first_token_time},
                             first.prompt_logprobs)  # (complete once the prompt ran; not copied per step)

    def _refresh_stats(self) -> None:
        s = self.stats
        s.kv_pages_used = self.pool.usable - self.pool.num_free
        s.running, s.waiting = len(self.scheduler.running), len(self.scheduler.waiting)
        s.preemptions = self.scheduler.num_preemptions
        if self.prefix_cache is not None:
            s.prefix_query_tokens, s.prefix_hit_tokens = self.prefix_cache.query_tokens, self.prefix_cache.hit_tokens


def _close_tp(workers: Workers) -> None:
    workers.close()
    if dist.is_initialized():
        dist.destroy_process_group()


class LLM:
    """vLLM's offline API on pagoda: ``generate`` and ``chat``."""

    def __init__(self, model: str | None = None, dtype: str = "auto", max_model_len: int | None = None,
                 max_num_seqs: int = 256, gpu_memory_utilization: float = 0.9, attention_backend: str | None = None,
                 enable_prefix_caching: bool = True, load_format: str = "auto", **kwargs):
        self.engine = LLMEngine(model, dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                                gpu_memory_utilization=gpu_memory_utilization, attention_backend=attention_backend,
                                enable_prefix_caching=enable_prefix_caching, load_format=load_format, **kwargs)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def shutdown(self) -> None:
        """Stop a tensor-parallel engine's worker processes (also done at exit)."""
        self.engine.shutdown()

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True, lora_request: LoRARequest | list[LoRARequest | None] | None = None
                 ) -> list[RequestOutput]:
        """lora_request (an LLM built with enable_lora=True): one adapter for every prompt, or a list with one per
        prompt (None: the base model)."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise ValueError(f"prompts must be a string, a list of token ids, or a list of those, got "
                             f"{type(prompts).__name__}")
        prompts = list(prompts)
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts")
            params = sampling_params
        else:
            params = [sampling_params or SamplingParams()] * len(prompts)
        if isinstance(lora_request, list):
            if len(lora_request) != len(prompts):
                raise ValueError(f"got {len(lora_request)} lora_request entries for {len(prompts)} prompts")
            loras = lora_request
        else:
            loras = [lora_request] * len(prompts)
        ids = []
        try:  # add all before running any: a bad prompt aborts the ones already added
            for p, sp, lr in zip(prompts, params, loras):
                ids.append(self.engine.add_request(p, sp, lora_request=lr))
        except Exception:
            for rid in ids:
                self.engine.abort(rid)
            raise
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="generate", unit="req", leave=False)
        try:
            while len(done) < len(ids):
                for out in self.engine.step(only_finished=True):
                    if out.finished:
                        done[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for rid in ids:
                if rid not in done:
                    self.engine.abort(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [done[r] for r in ids]

    def chat(self, messages, sampling_params: SamplingParams | None = None, use_tqdm: bool = True,
             add_generation_prompt: bool = True, lora_request: LoRARequest | None = None,
             chat_template: str | None = None, tools: list[dict] | None = None) -> list[RequestOutput]:
        """messages: one conversation (a list of {"role", "content"}) or a list of them; chat_template: a Jinja
        template used instead of the tokenizer's; tools: OpenAI-style function tools, handed to the template (as
        vLLM's LLM.chat: the outputs are text, which the server's tool-call parsers read)."""
        tok = self.engine.tokenizer
        if tok is None or not (chat_template or getattr(tok, "chat_template", None)):
            raise ValueError("this model's tokenizer has no chat template")
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise ValueError(f"tools must be a list of tool dicts, got {tools!r:.80}")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts (or a list of such "
                             f"lists), got {messages!r:.80}")
        convs = [messages] if isinstance(messages[0], dict) else list(messages)
        for i, conv in enumerate(convs):
            if not isinstance(conv, (list, tuple)) or not conv:
                raise ValueError(f"conversation {i} must be a non-empty list of messages, got {conv!r:.80}")
            msgs = []
            for j, m in enumerate(conv):
                try:
                    if not (isinstance(m, dict) and isinstance(m.get("role"), str)):
                        raise ValueError
                    msgs.append(dict(m, content=chat_text(m.get("content"))))
                except ValueError:
                    raise ValueError(f"message {j} of conversation {i} must be a dict with a string 'role' and a "
                                     f"string (or text parts) 'content', got {m!r:.80}") from None
            convs[i] = msgs
        prompts = [tok.apply_chat_template(c, tools=tools or None, chat_template=chat_template, tokenize=True,
                                           add_generation_prompt=add_generation_prompt) for c in convs]
        prompts = [p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else list(p) for p in prompts]
        return self.generate(prompts, sampling_params, use_tqdm, lora_request=lora_request)
