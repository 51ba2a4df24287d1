"""Continuous batching with chunked prefill, prefix caching and preemption by recompute.

Every step the scheduler fills a token budget (``max_num_batched_tokens``) under
``max_num_seqs`` running requests: first one token for each running request that decodes
(so decodes never stall behind a long prompt), then the next chunk of each running request
that is still prefilling, then new requests from the waiting queue (their prompt looked up in
the prefix cache first). A request's chunk may end anywhere in its prompt; it samples once its
computed tokens reach the end of prompt + output.

When pages run out, the newest running request is preempted: its pages are released and it
goes back to the front of the waiting queue with its output so far; later it prefills prompt +
output again (often from the prefix cache) and continues. Nothing is lost.
"""
from __future__ import annotations

import dataclasses
import enum
import itertools
import time
from collections import deque

import numpy as np
import torch

from .config import SamplingParams
from .kv_cache import OutOfPages, PagePool, PrefixCache


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    _ids = itertools.count()

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 index: int = 0, arrival: float | None = None):
        self.request_id = request_id
        self.seq_no = next(self._ids)
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.index = index  # which of the n samples
        self.lora_request = None  # engine/lora.py's LoRARequest of the request's adapter (set by add_request)
        self.guided = None  # guided decoding's GrammarProcessor (engine/guided.py; set by add_request)
        self.output_token_ids: list[int] = []
        self.output_logprobs: list[dict[int, float]] = []
        # SamplingParams.prompt_logprobs (the first sample of n only: the others share its prompt): entry p is
        # prompt token p's log-probability dict (None for p = 0), filled as the prompt's chunks run;
        # prompt_lp_next is the first position whose logits are still to take (the prompt's last position is
        # not one: its logits give the first output token)
        wants = params.prompt_logprobs is not None and index == 0
        self.prompt_logprobs: list[dict[int, float] | None] | None = [None] * len(prompt_token_ids) if wants else None
        self.prompt_lp_next = 0
        # KV pages of this request, in order. Invariant: the list only grows in place by appending; any
        # other change assigns a new list (page_array() relies on it)
        self.pages: list[int] = []
        self._pages_np = (None, None)  # (the list page_array() converted, its int32 copy)
        # leading pages given back because they lie wholly behind a sliding window: their entries in
        # self.pages are the reserved page 0 (kept so the list stays positional; attention never reads them)
        self.released = 0
        self.num_computed = 0
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache at first admission
        self.tree_node = None
        self.tree_pages = 0  # leading pages indexed in the prefix tree
        self.status = Status.WAITING
        self.penalty_state = None  # (sampler._PenaltyState of a request with penalties: its token statistics)
        # set by LLMEngine.add_request from SamplingParams and the tokenizer: the ids min_tokens bans, bad_words
        # as token sequences
        self.min_tokens_ban: list[int] | None = None
        self.bad_words_ids: list[list[int]] | None = None
        self.finish_reason: str | None = None
        self.stop_reason = None
        self.text = ""
        self.live_text = ""  # incremental detokenization (LLMEngine._live_text)
        self.detok_prefix = self.detok_read = 0
        self.arrival = time.monotonic() if arrival is None else arrival
        self.first_token_time: float | None = None
        self.num_preemptions = 0
        self.held_until = None  # a later sample of n waits until this request's prompt is cached
        self.generator = None
        if params.seed is not None and not params.greedy:
            self.generator = torch.Generator().manual_seed(params.seed + index)

    @property
    def lora_id(self) -> int:
        """The request's LoRA adapter id, 0 without one."""
        return 0 if self.lora_request is None else self.lora_request.lora_int_id

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def page_array(self) -> np.ndarray:
        """self.pages as int32 NumPy, converted incrementally (a decode step converts no page ids; with
        full conversion, 256 requests of 1k tokens cost ~0.7 ms per step on the CI machine)."""
        src, arr = self._pages_np
        if src is not self.pages or len(arr) > len(self.pages):
            arr = np.asarray(self.pages, dtype=np.int32)
        elif len(arr) < len(self.pages):
            arr = np.concatenate([arr, np.asarray(self.pages[len(arr):], dtype=np.int32)])
        self._pages_np = (self.pages, arr)
        return arr

    def token_ids(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without building the whole list (a decode step needs one token)."""
        p = self.prompt_token_ids
        n = len(p)
        if end <= n:
            return p[start:end]
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return p[start:] + self.output_token_ids[:end - n]

    @property
    def prompt_lp_pending(self) -> bool:
        """Whether prompt positions' logprobs are still to take (SamplingParams.prompt_logprobs)."""
        return self.prompt_logprobs is not None and self.prompt_lp_next < len(self.prompt_token_ids) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED


@dataclasses.dataclass
class ScheduledBatch:
    requests: list[Request]
    num_new_tokens: list[int]
    preempted: list[Request]

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_decode(self) -> bool:
        return all(n == 1 and r.num_computed == r.num_tokens - 1 for r, n in zip(self.requests, self.num_new_tokens))


class Scheduler:
    def __init__(self, pool: PagePool, prefix_cache: PrefixCache | None, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, window_left: int = -1, max_loras: int = 0):
        """window_left >= 0: a sliding-window model (a query at position i attends to i - window_left .. i);
        the pages wholly behind every future query's window go back to the pool after each step.
        max_loras (a LoRA engine): the running requests hold at most this many adapters; a waiting request of
        another adapter waits (the requests behind it may go first, as in vLLM)."""
        self.max_loras = max_loras
        self.pool, self.cache = pool, prefix_cache
        self.window_left = window_left
        self.max_num_seqs, self.budget, self.max_model_len = max_num_seqs, max_num_batched_tokens, max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    # -- queue -------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._release(req)

    def finish(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        self._cache_pages(req, req.num_computed)
        self._release(req)

    # -- pages -------------------------------------------------------------------------
    def _release(self, req: Request) -> None:
        self.pool.unref(req.pages[req.released:])
        req.pages, req.released = [], 0
        req.tree_node, req.tree_pages = None, 0

    def _release_behind_window(self, req: Request) -> None:
        """Give back the pages no query of req can see again: the next query is at position num_computed and
        sees positions >= num_computed - window_left, so pages ending before that are done with (pages in the
        prefix tree stay cached there; _cache_pages indexed them first)."""
        keep_from = max(0, req.num_computed - self.window_left) // self.pool.page_size
        if keep_from > req.released:
            self.pool.unref(req.pages[req.released:keep_from])
            # a new list (Request.pages' invariant): page 0 is the pool's reserved page
            req.pages = [0] * keep_from + req.pages[keep_from:]
            req.released = keep_from

    def _pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.pool.page_size)

    def _grow(self, req: Request, num_tokens: int) -> bool:
        """Give req pages for num_tokens tokens; evicts cached pages if needed. False: not enough."""
        need = self._pages_for(num_tokens) - len(req.pages)
        if need <= 0:
            return True
        if need > self.pool.num_free and self.cache is not None:
            # evict in bulk: one pass over the tree frees pages for many later steps
            self.cache.evict(max(need - self.pool.num_free, self.pool.usable // 32))
        try:
            req.pages += self.pool.alloc(need)
        except OutOfPages:
            return False
        return True

    def grow(self, req: Request, num_tokens: int) -> bool:
        """Make sure a running request has pages for num_tokens tokens (the engine reserves the next decode
        step's page while the current step runs); False when the pool cannot give them."""
        return req.status == Status.RUNNING and self._grow(req, num_tokens)

    def _cache_pages(self, req: Request, computed: int) -> None:
        """Index the request's full, computed pages in the prefix tree."""
        if self.cache is None:
            return
        full = min(computed, req.num_tokens) // self.pool.page_size
        if full > req.tree_pages:
            start = req.tree_node if req.tree_node is not None else self.cache.root
            req.tree_node = self.cache.insert(start, req.all_token_ids, req.pages, req.tree_pages, full,
                                              req.lora_id)
            req.tree_pages = full

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req)
        req.num_computed = 0
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # -- one step ----------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        budget = self.budget
        chosen: dict[int, int] = {}
        preempted: list[Request] = []
        decodes = [r for r in self.running if r.num_tokens - r.num_computed == 1]
        prefills = [r for r in self.running if r.num_tokens - r.num_computed > 1]
        for req in decodes + prefills:
            if budget == 0:
                break
            if req.status != Status.RUNNING:  # preempted while making room for an earlier one
                continue
            n = min(req.num_tokens - req.num_computed, budget)
            while not self._grow(req, req.num_computed + n):
                victim = max(self.running, key=lambda r: r.seq_no)
                if victim is req and len(self.running) == 1:
                    raise RuntimeError("the KV cache cannot hold a single request of this length: raise "
                                       "gpu_memory_utilization / num_kv_pages or lower max_model_len")
                self._preempt(victim)
                preempted.append(victim)
                chosen.pop(id(victim), None)
                if victim is req:
                    break
            if req.status != Status.RUNNING:
                continue
            chosen[id(req)] = n
            budget -= n
        budget = self.budget - sum(chosen.values())
        # admit waiting requests
        skipped = []
        loras = {r.lora_id for r in self.running} - {0} if self.max_loras else set()
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting.popleft()
            if req.held_until is not None and not req.held_until():
                skipped.append(req)
                continue
            if self.max_loras and req.lora_id and req.lora_id not in loras and len(loras) >= self.max_loras:
                skipped.append(req)  # its adapter would be one more than the device's slots
                continue
            if not req.pages and self.cache is not None:
                # leave at least one token to compute: its logits give the next token; and the prompt positions
                # whose logprobs are still to report (SamplingParams.prompt_logprobs)
                limit = min(req.num_tokens - 1, req.prompt_lp_next) if req.prompt_lp_pending else req.num_tokens - 1
                pages, node = self.cache.match(req.all_token_ids, limit // self.pool.page_size, req.lora_id)
                self.pool.ref(pages)
                req.pages, req.tree_node, req.tree_pages = list(pages), node, len(pages)
                req.num_computed = len(pages) * self.pool.page_size
                if req.num_preemptions == 0:
                    req.num_cached_tokens = req.num_computed
                    self.cache.record_lookup(len(req.prompt_token_ids), req.num_computed)
            n = min(req.num_tokens - req.num_computed, budget)
            if not self._grow(req, req.num_computed + n):
                self._release(req)
                req.num_computed = 0
                self.waiting.appendleft(req)
                break
            req.status = Status.RUNNING
            self.running.append(req)
            if req.lora_id:
                loras.add(req.lora_id)
            chosen[id(req)] = n
            budget -= n
        for req in reversed(skipped):
            self.waiting.appendleft(req)
        reqs = [r for r in self.running if id(r) in chosen]
        return ScheduledBatch(reqs, [chosen[id(r)] for r in reqs], preempted)

    def after_step(self, batch: ScheduledBatch) -> None:
        """Advance computed counts and index newly full pages in the prefix tree. A request that finished
        (or was aborted) after the step was launched is skipped: a step run ahead (LLMEngine.step) computed it
        for nothing, and its pages are already given back."""
        for req, n in zip(batch.requests, batch.num_new_tokens):
            if req.finished:
                continue
            req.num_computed += n
            self._cache_pages(req, req.num_computed)
            if self.window_left >= 0:
                self._release_behind_window(req)
