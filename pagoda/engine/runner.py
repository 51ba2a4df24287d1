"""Model runner: one forward per step over the scheduled tokens of all requests.

Per step: build the batch's page tables on the host (NumPy), copy them to the device in one
transfer, ``plan()`` the attention wrapper once, run the model (every layer writes its new K/V
into the paged cache, then attends), compute logits only where a request samples, sample.
Pure-decode steps on CUDA replay a CUDA graph captured at a padded batch size (padding rows
attend to the reserved page 0); ``plan()`` still runs each step, outside the graph.

``attention_backend``: "pagoda" (Triton kernels on CUDA, the PyTorch reference on the CPU),
"flashinfer" (FlashInfer 0.6 wrappers, the side-by-side peer; CUDA only), "torch" (pagoda's
wrappers on their PyTorch reference path, anywhere).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os

import numpy as np
import torch

import pagoda

from ..attention.formats import FP8_DTYPES, paged_kv_lens
from ..attention.prefill import split_mixed
from ..ops._dispatch import env_switch, pdl_default
from ..ops.lora import lora_max_tiles
from .config import ModelConfig
from .lora import LoRABatch, LoRAManager, block_m, step_tables
from .sampler import sample_collect, sample_launch

# a decode step uses the cascade when sharing saves at least this fraction of its KV page reads and, on a
# GPU, at least this many bytes of KV reads (all layers): the cascade's host work per step (levels, a second
# plan()) is ~2-3 ms on the H200's host, about what 8 GiB of HBM reads take. Measured (H200, 64 prompts of 512
# tokens x n=8, 14.7 GB saved per step): 19.9 s with cascade vs 18.9 s without, inside the run-to-run spread.
CASCADE_MIN_SAVED = 0.25
CASCADE_MIN_SAVED_BYTES = 8 << 30
# pages of the 16-bit scratch a Hopper prefill over an fp8 cache reads: at least this many (64k tokens at page 16;
# 256 MiB for Llama-3.1-8B's 8 KV heads of 128), more for a longer max_model_len, up to FP8_PREFILL_SCRATCH_BYTES
FP8_PREFILL_SCRATCH_PAGES = 4096
FP8_PREFILL_SCRATCH_BYTES = 1 << 30
# calculate_kv_scales: the first step's largest |K| / |V| of a layer is stored at this value (vLLM's
# K_SCALE_CONSTANT / V_SCALE_CONSTANT defaults; e4m3 reaches 448)
K_SCALE_CONSTANT = 200.0
V_SCALE_CONSTANT = 100.0

logger = logging.getLogger("pagoda.engine")


def split_mixed_mode() -> str:
    """PAGODA_SPLIT_MIXED: how a mixed step (one-token requests beside prompt chunks) runs its attention with pagoda's
    wrappers. "auto" (the default): the one-token requests in the decode kernel and the rest in the prefill kernel,
    two launches a layer, where attention.prefill.split_mixed's cost model says their KV reads outweigh the prompt
    chunks' MMAs (in one launch they would fill prefill tiles and pay a tile's MMAs per KV block; BatchAttention's
    rule, session 36), and always over an fp8 cache on Hopper (the one launch copies every request's pages, the
    decodes' too, into the 16-bit prefill scratch each layer, or reads fp8 in the Triton prefill kernel once they
    outgrow it); "1": every mixed step so; "0": one launch."""
    mode = os.environ.get("PAGODA_SPLIT_MIXED", "auto")
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"PAGODA_SPLIT_MIXED must be 'auto', '0' or '1', got {mode!r}")
    return mode


def fp8_prefill_scratch_default() -> bool:
    """PAGODA_FP8_PREFILL_SCRATCH=1 / 0, default 1: whether a Hopper GPU's prefill steps over an fp8 KV cache read a
    16-bit copy of the step's pages, which the Gluon prefill kernel takes (over fp8 the Triton prefill kernel runs).
    H200, Llama-3.1-8B (`python -m pagoda.bench.engine --cases latency,long --backends pagoda:fp8`): a 32k prompt's
    first token 1.72 -> 1.21 s (the bf16 cache's 1.20; session 40). Session 40 also saw decode at batch 64 x 1k
    6.06 -> 7.0-7.2 ms a token with it and left it off; session 41 found the cause (scripts/fp8_scratch_probe.py):
    one full garbage collection of 53-77 ms that the prefill's allocations moved into the timed decode steps
    (without the scratch it fell just outside them); the steps themselves, kernel by kernel, are the same
    (5.92-5.94 ms both ways). The engine now freezes its start-up heap (llm.freeze_startup_heap)."""
    return env_switch("PAGODA_FP8_PREFILL_SCRATCH", "1")


def uses_fp8_prefill_scratch(kv_dtype: torch.dtype, device: torch.device, attention_backend: str) -> bool:
    """Whether an engine's prefill steps read the 16-bit scratch (ModelRunner allocates it; the engine counts it in
    the memory budget): an fp8 cache on a Hopper GPU under pagoda's attention, with fp8_prefill_scratch_default."""
    return (kv_dtype in FP8_DTYPES and device.type == "cuda" and attention_backend == "pagoda"
            and fp8_prefill_scratch_default() and torch.cuda.get_device_capability(device) == (9, 0))


def fp8_prefill_scratch_shape(config: ModelConfig, page_size: int, max_model_len: int, num_pages: int | None = None,
                              itemsize: int = 2):
    """The 16-bit prefill scratch of an fp8 cache: one layer's pages, enough for the last chunk of a prompt of
    max_model_len tokens (a longer step reads the fp8 cache through the Triton kernel), at least
    FP8_PREFILL_SCRATCH_PAGES (a step of several prompts), at most FP8_PREFILL_SCRATCH_BYTES (and the pool's
    num_pages)."""
    page = 2 * page_size * config.num_kv_heads * config.head_dim * itemsize
    pages = min(max(FP8_PREFILL_SCRATCH_PAGES, -(-max_model_len // page_size)),
                max(FP8_PREFILL_SCRATCH_PAGES, FP8_PREFILL_SCRATCH_BYTES // page))
    if num_pages is not None:
        pages = min(pages, num_pages)
    return (pages, 2, page_size, config.num_kv_heads, config.head_dim)


GRAPH_BATCH_SIZES = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512]


@dataclasses.dataclass
class StepInputs:
    """Host arrays of one step (int32 unless noted)."""

    input_ids: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    batch_indices: np.ndarray  # [T] request of each token
    qo_indptr: np.ndarray  # [B + 1]
    kv_indptr: np.ndarray  # [B + 1]
    kv_indices: np.ndarray  # [P]
    kv_last_page_len: np.ndarray  # [B]
    logits_indices: np.ndarray  # [S] token rows whose logits are sampled
    sample_rows: list[int]  # [S] which requests sample
    is_decode: bool
    lora_slots: np.ndarray | None = None  # [B] each request's LoRA slot (LoRAManager.slots_for), None: no LoRA
    # a mixed step's first requests that run in the decode kernel (ModelRunner.split_rows), None: one launch
    split: int | None = None


def build_inputs(requests, num_new_tokens, page_size: int) -> StepInputs:
    """The step's host arrays: Python lists filled per request, converted once (a decode step of 256
    requests: ~0.3 ms on the CI machine, from 2.1 ms with per-request arrays and full token lists)."""
    ids, pos, bidx, pages = [], [], [], []
    qo, kv, last, logit_rows, sample_rows = [0], [0], [], [], []
    q = k = 0
    decode = True
    for b, (r, n) in enumerate(zip(requests, num_new_tokens)):
        start = r.num_computed
        kv_len = start + n
        ids += r.token_ids(start, kv_len)
        if n == 1:
            pos.append(start)
            bidx.append(b)
        else:
            decode = False
            pos += range(start, kv_len)
            bidx += [b] * n
        npages = -(-kv_len // page_size)
        arr = r.page_array()
        pages.append(arr if len(arr) == npages else arr[:npages])
        q += n
        k += npages
        qo.append(q)
        kv.append(k)
        last.append((kv_len - 1) % page_size + 1)
        if kv_len == r.num_tokens:
            logit_rows.append(q - 1)
            sample_rows.append(b)
    i32 = np.int32
    return StepInputs(np.array(ids, i32), np.array(pos, i32), np.array(bidx, i32), np.array(qo, i32),
                      np.array(kv, i32), np.concatenate(pages) if pages else np.zeros(0, i32),
                      np.array(last, i32), np.array(logit_rows, i32), sample_rows,
                      decode and len(sample_rows) == len(requests))


def build_next_decode_inputs(requests, page_size: int) -> StepInputs:
    """The inputs of the decode step after the one in flight, for requests that each gain one token from
    it: position = the request's token count now, KV length one more. The token ids are not known yet (they
    are on the device, being sampled): zeros here, the runner copies the sampled ids in on the device."""
    b = len(requests)
    pos = [r.num_tokens for r in requests]
    pages, last = [], []
    for r, p in zip(requests, pos):
        npages = p // page_size + 1  # pages of p + 1 tokens
        arr = r.page_array()
        pages.append(arr if len(arr) == npages else arr[:npages])
        last.append(p % page_size + 1)
    i32 = np.int32
    ar = np.arange(b + 1, dtype=i32)
    kv = np.zeros(b + 1, i32)
    np.cumsum([len(a) for a in pages], out=kv[1:])
    return StepInputs(np.zeros(b, i32), np.array(pos, i32), ar[:-1].copy(), ar, kv,
                      np.concatenate(pages) if pages else np.zeros(0, i32), np.array(last, i32), ar[:-1].copy(),
                      list(range(b)), True)


@dataclasses.dataclass
class _Prepared:
    """A decode step prepared while the previous one ran (ModelRunner.prepare_next): its inputs are on the
    device and its attention planned; it runs if the scheduler then picks the same requests, each at the
    position it was prepared for."""

    requests: list
    positions: list[int]
    graph: object = None  # _DecodeGraph, or None: eager, with dev
    dev: object = None

    def matches(self, requests, num_new) -> bool:
        return (len(requests) == len(self.requests) and all(a is b for a, b in zip(requests, self.requests))
                and all(n == 1 for n in num_new)
                and all(r.num_computed == p and r.num_tokens == p + 1 for r, p in zip(requests, self.positions)))


@dataclasses.dataclass
class _Pending:
    """A launched step: the requests that sample and their sampling, not yet read back."""

    requests: list
    sampled: object  # sampler.Sampled, or None (nothing samples)
    preparable: bool  # a decode step whose requests share no pages: the next one can be prepared during it
    prompt_lp: object = None  # _PromptLogprobs of the step's prompt positions (SamplingParams.prompt_logprobs)


class _PromptLogprobs:
    """The log-probabilities of prompt tokens a step's prefill chunks computed (SamplingParams.prompt_logprobs):
    the logits of prompt position p give token p + 1's. Launched with the step (device tensors), read back by
    collect() into each request's prompt_logprobs list."""

    ROWS = 256  # logits rows at a time: [256, vocab] fp32 (128 MB at a 128k vocabulary)

    def __init__(self, model, hidden: torch.Tensor, want):
        """want: (request, first position, flat rows of the step's hidden states, target token ids) per request."""
        self.want = [(r, p0, len(rows)) for r, p0, rows, _ in want]
        dev = hidden.device
        rows = torch.tensor([i for _, _, rr, _ in want for i in rr], dtype=torch.long, device=dev)
        targets = torch.tensor([t for _, _, _, tt in want for t in tt], dtype=torch.long, device=dev)
        self.k = max(r.params.prompt_logprobs for r, _, _, _ in want)
        chosen, top_v, top_i = [], [], []
        for a in range(0, rows.numel(), self.ROWS):
            lp = torch.log_softmax(model.compute_logits(hidden[rows[a:a + self.ROWS]]), -1)
            chosen.append(lp.gather(1, targets[a:a + self.ROWS, None])[:, 0])
            if self.k:
                v, i = lp.topk(self.k, dim=-1)
                top_v.append(v)
                top_i.append(i)
        self.targets = targets
        self.chosen = torch.cat(chosen)
        self.top = (torch.cat(top_v), torch.cat(top_i)) if self.k else None

    def collect(self) -> None:
        targets, chosen = self.targets.tolist(), self.chosen.tolist()
        top_v, top_i = (self.top[0].tolist(), self.top[1].tolist()) if self.top is not None else (None, None)
        j = 0
        for r, p0, n in self.want:
            k = r.params.prompt_logprobs
            for p in range(p0, p0 + n):
                d = {top_i[j][m]: top_v[j][m] for m in range(k)} if k else {}
                d[targets[j]] = chosen[j]
                r.prompt_logprobs[p + 1] = d
                j += 1
            r.prompt_lp_next = max(r.prompt_lp_next, p0 + n)


def _prompt_lp_rows(requests, num_new, qo_indptr):
    """(request, first position, flat rows, target token ids) of each request in a step whose chunk holds prompt
    positions with logprobs still to take; [] when none does."""
    want = []
    for b, (r, n) in enumerate(zip(requests, num_new)):
        if not r.prompt_lp_pending:
            continue
        start = r.num_computed
        p0, p1 = max(start, r.prompt_lp_next), min(start + n, len(r.prompt_token_ids) - 1)
        if p1 > p0:
            q = int(qo_indptr[b]) - start
            want.append((r, p0, range(q + p0, q + p1), r.prompt_token_ids[p0 + 1:p1 + 1]))
    return want


class _Staging:
    """Host-to-device copies of int32 arrays through one pinned buffer. A copy is asynchronous, so
    before the buffer is rewritten the previous copy must have left it (a step without sampling
    does not synchronize): an event guards it."""

    def __init__(self, size: int, device):
        self.device = device
        self.pinned = torch.empty(size, dtype=torch.int32, pin_memory=True) if device.type == "cuda" else None
        self.done = None

    def upload_into(self, dst: torch.Tensor, parts) -> None:
        """parts: (offset, int32 array) pairs, written at those offsets of ``dst`` (a flat int32 device tensor)
        in one copy of the span from the first one's start to the last one's end (what lies between the parts is
        rewritten with whatever the pinned buffer holds there: regions past an array's length are not read). The
        CUDA graphs' inputs: a GPU host, where the buffer is pinned."""
        start, end = min(off for off, _ in parts), max(off + a.size for off, a in parts)
        if self.pinned.numel() < end:
            raise RuntimeError(f"pinned staging buffer too small ({self.pinned.numel()} < {end})")
        if self.done is not None:
            self.done.synchronize()
        host = self.pinned.numpy()
        for off, a in parts:
            host[off:off + a.size] = a
        dst[start:end].copy_(self.pinned[start:end], non_blocking=True)
        self.done = torch.cuda.Event() if dst.is_cuda else None
        if self.done is not None:
            self.done.record()

    def upload(self, arrays) -> list[torch.Tensor]:
        flat = np.concatenate(arrays).astype(np.int32, copy=False)
        if self.pinned is None:
            dev = torch.from_numpy(flat.copy())
        else:
            if self.pinned.numel() < flat.size:
                raise RuntimeError(f"pinned staging buffer too small ({self.pinned.numel()} < {flat.size})")
            if self.done is not None:
                self.done.synchronize()
            host = self.pinned[:flat.size]
            host.numpy()[:] = flat
            dev = host.to(self.device, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()
        return list(torch.split(dev, [a.shape[0] for a in arrays]))


class _DeviceInputs:
    """The step's arrays on the device, sent in one copy."""

    def __init__(self, inp: StepInputs, staging: _Staging, max_loras: int = 0):
        # (LoRA tables only where a request of the step has an adapter: a step without any runs no LoRA launches)
        lora = None
        if inp.lora_slots is not None and inp.lora_slots.any():
            lora = step_tables(inp.lora_slots, inp.qo_indptr, max_loras)
        arrays = [inp.input_ids, inp.positions, inp.batch_indices, inp.qo_indptr, inp.kv_indptr, inp.kv_indices,
                  inp.kv_last_page_len, inp.logits_indices] + ([lora[0], lora[1]] if lora else [])
        dev = staging.upload(arrays)
        (self.input_ids, self.positions, self.batch_indices, self.qo_indptr, self.kv_indptr, self.kv_indices,
         self.kv_last_page_len, self.logits_indices) = dev[:8]
        self.lora = (dev[8], dev[9], lora[2], lora[3]) if lora else None  # (order, tiles, n_tiles, block_m)


class _Context:
    """What the model's attention layers call: RoPE on q / k (when given), append K/V, then attend."""

    def __init__(self, runner, attn, dev: _DeviceInputs, inputs_read: torch.cuda.Event | None = None):
        """inputs_read (a decode graph's, PAGODA_EARLY_INPUTS): recorded right after the last layer's attention,
        the forward's last reader of the step's inputs and attention plan."""
        self.runner, self.attn, self.dev = runner, attn, dev
        self.pdl = runner.pdl
        # the step's LoRA deltas (the model's projections call lora.add), over its rows grouped by adapter
        tables = getattr(dev, "lora", None)
        self.lora = None if runner.lora is None or tables is None else LoRABatch(runner.lora, *tables, pdl=self.pdl)
        self.inputs_read, self.last_layer = inputs_read, len(runner.kv_caches) - 1

    def _attend(self, layer: int, q, cache):
        out = self.attn.for_layer(layer).run(q, cache, self.runner.layer_kv_scales[layer])
        if self.inputs_read is not None and layer == self.last_layer:
            self.inputs_read.record()
        return out

    def attention(self, layer: int, q, k, v, rope=None, qk_norm=None):
        """q [t, hq, d], k / v [t, hk, d]; rope: (cos_sin_cache, is_neox) at the step's positions; qk_norm: the
        layer's per-head (q_norm, k_norm) RMSNorm modules (Qwen3, Gemma 3), applied before RoPE. pagoda's attention
        normalizes and rotates q and appends the normalized, rotated k with v in one launch
        (apply_rope_with_cos_sin_cache_and_append); the others normalize, rotate q and k in place, then append."""
        cache = self.runner.kv_caches[layer]
        d = self.dev
        t = q.shape[0]
        calibrate = self.runner.kv_scales_pending  # (calculate_kv_scales: this step's K / V set the scales)
        fused = rope is not None and self.attn.fused_rope and not calibrate
        norm = {}
        if qk_norm is not None:
            qn, kn = qk_norm
            if fused and qn.eps == kn.eps and qn.weight_offset == kn.weight_offset:
                norm = dict(q_norm_weight=qn.weight, k_norm_weight=kn.weight, norm_eps=qn.eps,
                            norm_weight_offset=qn.weight_offset)
            else:
                q, k = qn(q.contiguous()), kn(k.contiguous())
        if fused:
            pagoda.apply_rope_with_cos_sin_cache_and_append(
                d.positions, q.view(t, -1), k.view(t, -1), v, q.shape[-1], rope[0], rope[1], cache, d.batch_indices,
                d.kv_indices, d.kv_indptr, d.kv_last_page_len, check=False, enable_pdl=self.pdl,
                pdl_tables_early=True,  # (the step's inputs: host copies before it)
                **self.runner.layer_kv_scales[layer], **norm)
        else:
            if rope is not None:
                pagoda.apply_rope_with_cos_sin_cache_inplace(d.positions, q.view(t, -1), k.view(t, -1), q.shape[-1],
                                                             rope[0], is_neox=rope[1])
            if calibrate:
                self.runner.calibrate_kv_scales(layer, k, v)
            self.attn.append(k, v, d.batch_indices, d.positions, cache, d.kv_indices, d.kv_indptr,
                             d.kv_last_page_len, self.runner.layer_kv_scales[layer])
        return self._attend(layer, q, cache)

    def qkv_rope_attention(self, layer: int, x, weight, bias, rms_norm_eps, cos_sin, num_heads: int,
                           num_kv_heads: int, head_dim: int, pdl: bool):
        """One token: the qkv projection with RoPE and the K/V append in its epilogue (ops.linear_rope_append),
        then attention over the cache; None where this context's attention does not take it (its RoPE is not
        pagoda's fused one)."""
        if not self.attn.fused_rope or self.runner.kv_scales_pending:
            return None
        cache = self.runner.kv_caches[layer]
        d = self.dev
        q = torch.empty(1, num_heads, head_dim, dtype=x.dtype, device=x.device)
        pagoda.ops.linear_rope_append(x, weight, bias, q, d.positions[:1], cos_sin, cache, d.batch_indices[:1],
                                      d.kv_indices, d.kv_indptr[:2], d.kv_last_page_len[:1], num_heads,
                                      num_kv_heads, head_dim, rms_norm_eps=rms_norm_eps, pdl=pdl,
                                      **self.runner.layer_kv_scales[layer])
        return self._attend(layer, q, cache)


class _PagodaAttention:
    fused_rope = True  # _Context.attention: RoPE and the K/V append in one launch (quantized for an fp8 cache)

    def __init__(self, runner, backend: str, use_cuda_graph: bool = False, window_left: int | None = None):
        """window_left: the layers' window (None: the runner's, which every layer shares; _LayerWindows passes
        each kind's)."""
        self.r = runner
        self.window_left = runner.window_left if window_left is None else window_left
        self.dequant = None  # (the planned step's pages to copy into the fp8 prefill scratch: plan())
        self.wrapper = pagoda.BatchPrefillWithPagedKVCacheWrapper(runner.workspace, "NHD", use_cuda_graph=use_cuda_graph,
                                                                  backend=backend)
        self.triton = backend == "triton" or (backend == "auto" and runner.device.type == "cuda")
        self.pdl = runner.pdl  # PAGODA_PDL: run() as a programmatic dependent launch
        # PAGODA_DECODE_EARLY_KV (default 1, 0 turns it off): run()'s pdl_early_kv, the decode kernel's first KV
        # blocks copied before its PDL wait; true of every run() here: the kernel right before it is the step's
        # RoPE + append (or the fused qkv projection with it), which writes only the step's own K / V. H200,
        # session 21, `python -m pagoda.bench.engine --cases latency`, interleaved on one machine: batch 1
        # 4.385 / 4.385 -> 4.354 / 4.357 ms per token, batch 64 7.142 / 7.140 -> 7.128 / 7.133
        early_kv = env_switch("PAGODA_DECODE_EARLY_KV", "1")  # (read, and so checked, without PDL too)
        self.early_kv = runner.pdl and early_kv
        # the planned step's split (StepInputs.split: its first requests in the decode kernel); the decode wrapper is
        # made at the first such step and shares the workspace (its runs and the prefill wrapper's are in turn)
        self.split = None
        self.decode_part = None

    def plan(self, inp: StepInputs, dev: _DeviceInputs, levels=None) -> None:
        """levels: the step's cascade levels (used by _PagodaCascadeAttention only)."""
        c, r = self.r.config, self.r
        self.dequant = None
        self.split = inp.split
        qo, kv, last, kv_indices, pages = (inp.qo_indptr, inp.kv_indptr, inp.kv_last_page_len, inp.kv_indices,
                                           dev.kv_indices)
        if self.split is not None:  # the one-token requests (the first n) in the decode kernel, the rest below
            n = self.split
            p = int(kv[n])
            if self.decode_part is None:
                self.decode_part = pagoda.BatchDecodeWithPagedKVCacheWrapper(self.r.workspace, "NHD",
                                                                             backend=self.wrapper._backend)
            self.decode_part.plan(torch.from_numpy(kv[:n + 1]), torch.from_numpy(kv_indices[:p]),
                                  torch.from_numpy(last[:n]), c.num_heads, c.num_kv_heads, c.head_dim, r.page_size,
                                  window_left=self.window_left, logits_soft_cap=c.attn_soft_cap, sm_scale=c.attn_scale,
                                  q_data_type=r.dtype, kv_data_type=r.kv_dtype)
            qo, kv, last, kv_indices, pages = qo[n:] - qo[n], kv[n:] - p, last[n:], kv_indices[p:], pages[p:]
        kv_dtype = r.kv_dtype
        scratch = r.fp8_prefill_scratch
        if scratch is not None and not inp.is_decode and len(kv_indices) <= scratch.shape[0]:
            # (a prefill over an fp8 cache: each layer's pages of the step dequantized into a 16-bit scratch, in
            # page-table order, which the Gluon prefill kernel reads: fp8_prefill_scratch_default)
            self.dequant = (pages, len(kv_indices))
            kv_indices, kv_dtype = np.arange(len(kv_indices), dtype=np.int32), r.dtype
        self.wrapper.plan(torch.from_numpy(qo), torch.from_numpy(kv), torch.from_numpy(kv_indices),
                          torch.from_numpy(last), c.num_heads, c.num_kv_heads, c.head_dim, r.page_size, causal=True,
                          window_left=self.window_left, q_data_type=r.dtype, kv_data_type=kv_dtype,
                          sm_scale=c.attn_scale, logits_soft_cap=c.attn_soft_cap)

    def for_layer(self, layer: int):
        """The attention a layer runs (_LayerWindows: its window's)."""
        return self

    def append(self, k, v, bidx, pos, cache, kv_indices, kv_indptr, last, scales):
        """scales: the layer's k_scale / v_scale for an fp8 cache (runner.layer_kv_scales), else {}."""
        pagoda.append_paged_kv_cache(k, v, bidx, pos, cache, kv_indices, kv_indptr, last, check=False, **scales)

    def run(self, q, cache, scales):
        out = None
        if self.split is not None:  # the decode rows first (right after the RoPE + append: early KV as a decode)
            n = self.split
            out = torch.empty_like(q)
            self.decode_part.run(q[:n], cache, out=out[:n], enable_pdl=self.pdl, pdl_early_kv=self.early_kv,
                                 **scales)
            q, early_kv = q[n:], False  # (the prompt rows after a kernel that waited for the append)
        else:
            early_kv = self.early_kv
        rest = None if out is None else out[self.split:]
        if self.dequant is not None:  # (the step's pages in 16 bits: a cast, then the layer's scales where not 1)
            idx, num_pages = self.dequant
            scratch = self.r.fp8_prefill_scratch[:num_pages]
            scratch.copy_(cache.view(torch.uint8).index_select(0, idx).view(cache.dtype))
            # (the scales multiplied in here, not passed to run(): the Gluon prefill kernel takes unscaled KV only, and
            # run() with a scale other than 1 would fall back to the Triton kernel the scratch is there to avoid)
            for half, scale in enumerate((scales["k_scale"], scales["v_scale"])):
                if scale != 1.0:
                    scratch[:, half].mul_(scale)
            # (no early KV: the copy right before writes the KV this run reads)
            o = self.wrapper.run(q, scratch, out=rest, enable_pdl=self.pdl, pdl_early_kv=False)
        else:
            o = self.wrapper.run(q, cache, out=rest, enable_pdl=self.pdl, pdl_early_kv=early_kv, **scales)
        return o if out is None else out


class _LayerWindows:
    """Layers of two windows (Gemma 2: a sliding window every other layer, the whole context in the rest): one
    attention a window, each planned every step (the plans differ: a windowed request's KV range starts at its
    window), each layer running its own (_Context._attend -> for_layer). K / V go to every layer's cache alike."""

    fused_rope = True

    def __init__(self, make, windows: list[int]):
        """make(window_left) -> an attention (_PagodaAttention) of that window; windows: each layer's."""
        self.parts = {w: make(w) for w in sorted(set(windows))}
        self.layers = [self.parts[w] for w in windows]

    def plan(self, inp, dev, levels=None) -> None:
        for part in self.parts.values():
            part.plan(inp, dev, levels)

    def for_layer(self, layer: int):
        return self.layers[layer]

    def append(self, *args) -> None:
        self.layers[0].append(*args)


class _PagodaCascadeAttention(_PagodaAttention):
    """Decode steps whose requests share prefix pages (parallel samples of one prompt, prefix-cache
    hits on a common system prompt): a two-level MultiLevelCascadeAttentionWrapper whose shared
    level attends each group's prefix once for all of the group's queries; levels come from the
    step's page tables (cascade_levels_from_page_table). K/V are appended through the flat tables."""

    def __init__(self, runner, backend: str, use_cuda_graph: bool = False):
        self.r = runner
        self.wrapper = pagoda.MultiLevelCascadeAttentionWrapper(2, runner.workspace, "NHD",
                                                                use_cuda_graph=use_cuda_graph, backend=backend)

    def plan(self, inp: StepInputs, dev: _DeviceInputs, levels=None) -> None:
        c = self.r.config
        if levels is None:
            levels = pagoda.cascade_levels_from_page_table(inp.kv_indptr, inp.kv_indices, inp.kv_last_page_len,
                                                           self.r.page_size, inp.qo_indptr)
        self.wrapper.plan(**levels, num_qo_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                          page_size=self.r.page_size, causal=True, q_data_type=self.r.dtype,
                          kv_data_type=self.r.kv_dtype, sm_scale=c.attn_scale, logits_soft_cap=c.attn_soft_cap)

    def run(self, q, cache, scales):
        return self.wrapper.run(q, cache, **scales)


class _FlashInferAttention:
    fused_rope = False

    def __init__(self, runner):
        import flashinfer

        if runner.kv_fp8:
            raise ValueError("kv_cache_dtype fp8 takes attention_backend 'pagoda' or 'torch', not 'flashinfer'")
        self.fi, self.r = flashinfer, runner
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(runner.workspace, "NHD")
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(runner.workspace, "NHD", use_tensor_cores=True)
        self.active = None

    def for_layer(self, layer: int):
        return self

    def plan(self, inp: StepInputs, dev: _DeviceInputs, levels=None) -> None:
        c, r = self.r.config, self.r
        if inp.is_decode:
            self.decode.plan(dev.kv_indptr, dev.kv_indices, dev.kv_last_page_len, c.num_heads, c.num_kv_heads,
                             c.head_dim, r.page_size, window_left=r.window_left, q_data_type=r.dtype,
                             kv_data_type=r.dtype)
            self.active = self.decode
        else:
            self.prefill.plan(dev.qo_indptr, dev.kv_indptr, dev.kv_indices, dev.kv_last_page_len, c.num_heads,
                              c.num_kv_heads, c.head_dim, r.page_size, causal=True, window_left=r.window_left,
                              q_data_type=r.dtype, kv_data_type=r.dtype)
            self.active = self.prefill

    def append(self, k, v, bidx, pos, cache, kv_indices, kv_indptr, last, scales):
        self.fi.append_paged_kv_cache(k, v, bidx, pos, cache, kv_indices, kv_indptr, last)  # (16-bit caches only)

    def run(self, q, cache, scales):
        return self.active.run(q.contiguous(), cache)


class _FlashInferGraphAttention(_FlashInferAttention):
    """FlashInfer's decode wrapper in CUDA-graph mode (its own fixed index buffers)."""

    def __init__(self, runner, size: int):
        import flashinfer

        self.fi, self.r = flashinfer, runner
        dev, pages = runner.device, runner.static["kv_indices"].numel()
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            runner.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=True,
            paged_kv_indptr_buffer=torch.zeros(size + 1, dtype=torch.int32, device=dev),
            paged_kv_indices_buffer=torch.zeros(pages, dtype=torch.int32, device=dev),
            paged_kv_last_page_len_buffer=torch.zeros(size, dtype=torch.int32, device=dev))
        self.active = self.decode

    def plan(self, inp: StepInputs, dev, levels=None) -> None:
        c, r = self.r.config, self.r
        self.decode.plan(torch.from_numpy(inp.kv_indptr), torch.from_numpy(inp.kv_indices),
                         torch.from_numpy(inp.kv_last_page_len), c.num_heads, c.num_kv_heads, c.head_dim,
                         r.page_size, window_left=r.window_left, q_data_type=r.dtype, kv_data_type=r.dtype)


class _DecodeGraph:
    """A CUDA graph of the model over a padded decode batch of ``size`` rows."""

    def __init__(self, runner, size: int, pool, cascade: bool = False):
        self.r, self.size = runner, size
        if runner.attention_backend == "flashinfer":
            self.attn = _FlashInferGraphAttention(runner, size)
        else:
            self.attn = runner.graph_attention(cascade)
        s = runner.static
        self.dev = _StaticView(s, size, runner.lora.max_loras if runner.lora is not None else 0)
        inp = runner.padded_decode_inputs([], size)
        runner.write_static(inp)
        self.attn.plan(inp, self.dev)
        ctx = _Context(runner, self.attn, self.dev)
        # PAGODA_EARLY_INPUTS: an event node inside the graph after the last layer's attention (an external
        # event: a stream outside the graph can wait for it), so the next step's inputs and plan may be written
        # while this graph's last projections and the lm_head still run
        self.inputs_read = torch.cuda.Event(external=True) if runner.early_inputs else None
        with torch.no_grad():
            for _ in range(2):  # compile and warm up outside the graph
                runner.model.compute_logits(runner.model(s["input_ids"][:size], s["positions"][:size], ctx))
            torch.cuda.synchronize()
            self.graph = torch.cuda.CUDAGraph()
            ctx = _Context(runner, self.attn, self.dev, self.inputs_read)
            # PAGODA_DEFER_FINAL_NORM (one-token graphs): no final RMSNorm in front of the lm_head; its factor is
            # computed on a side stream beside the lm_head and applied by sample_launch where it upcasts
            defer = runner.model.defers_final_norm(size)
            self.logit_scale = None
            with torch.cuda.graph(self.graph, pool=pool):
                hidden = runner.model(s["input_ids"][:size], s["positions"][:size], ctx, final_norm=not defer)
                if defer:
                    main = torch.cuda.current_stream(runner.device)
                    runner.side_stream.wait_stream(main)
                    with torch.cuda.stream(runner.side_stream):
                        self.logit_scale = runner.model.final_norm_scale(hidden)
                # (in the model's dtype: an all-greedy batch samples them as they are, sample_launch upcasts
                # for the rest; the upcast's launch and its gap were ~5 us of each batch-1 step, session 20)
                self.logits = runner.model.compute_logits(hidden, upcast=False)
                if defer:
                    main.wait_stream(runner.side_stream)

    def prepare(self, inp: StepInputs, levels=None, skip_ids: bool = False) -> None:
        self.r.write_static(inp, skip_ids)
        self.attn.plan(inp, self.dev, levels)

    def replay(self, n: int):
        """The graph's run: (logits, logit_scale) of its first n rows, logit_scale (sample_launch's) None unless the
        graph leaves the final norm out."""
        self.graph.replay()
        return self.logits[:n], None if self.logit_scale is None else self.logit_scale[:n]

    def run(self, inp: StepInputs, n: int, levels=None):
        self.prepare(inp, levels)
        return self.replay(n)


class _StaticView:
    def __init__(self, s, size, max_loras: int = 0):
        self.input_ids, self.positions = s["input_ids"][:size], s["positions"][:size]
        self.batch_indices = s["batch_indices"][:size]
        self.kv_indptr, self.kv_last_page_len = s["kv_indptr"][:size + 1], s["kv_last_page_len"][:size]
        self.kv_indices = s["kv_indices"]
        self.qo_indptr = s["qo_indptr"][:size + 1]
        self.lora = None
        if "lora_order" in s:  # (runner.write_static fills them for the padded batch: n tiles in the region's front)
            bm = block_m(size)
            n = lora_max_tiles(size, bm, max_loras)
            self.lora = (s["lora_order"][:size], s["lora_tiles"][:3 * n], n, bm)


class ModelRunner:
    def __init__(self, config: ModelConfig, model, *, device, dtype, num_pages: int, page_size: int,
                 attention_backend: str, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 enable_cuda_graph: bool, enable_cascade: bool = True, lora: LoRAManager | None = None,
                 kv_cache_dtype: torch.dtype | None = None, calculate_kv_scales: bool = False):
        """lora: the engine's LoRAManager (enable_lora): each step's requests get their adapters' slots, and the
        decode graphs capture the LoRA deltas over their padded rows (padding takes slot 0, all zeros).
        kv_cache_dtype: the cache's dtype (None: the model's); an fp8 one holds K / k_scale and V / v_scale,
        quantized as they are appended, with each layer's scales from the checkpoint (model.kv_cache_scales:
        calibrated fp8 KV checkpoints) or 1.0 (vLLM's default without them). A 16-bit cache leaves the scales.
        calculate_kv_scales (vLLM's, an fp8 cache): the first step's K / V set each layer's scales instead
        (calibrate_kv_scales), a step run eagerly; the decode graphs are captured after it (capture_graphs waits
        for it)."""
        self.config, self.model, self.device, self.dtype = config, model, torch.device(device), dtype
        self.kv_dtype = kv_cache_dtype or dtype
        self.kv_fp8 = self.kv_dtype in FP8_DTYPES
        ckpt = model.kv_cache_scales
        # each layer's k_scale / v_scale arguments of the attention calls ({} for a 16-bit cache)
        self.layer_kv_scales = [dict(k_scale=ckpt.get(i, {}).get("k", 1.0), v_scale=ckpt.get(i, {}).get("v", 1.0))
                                if self.kv_fp8 else {} for i in range(config.num_layers)]
        self.kv_scales_pending = bool(calculate_kv_scales) and self.kv_fp8
        self.lora = lora
        self._max_loras = 0 if lora is None else lora.max_loras
        self.page_size, self.num_pages = page_size, num_pages
        # the layers' attention window (window_left, -1: none); layer_windows: each layer's where they differ
        # (Gemma 2), whose steps plan one attention a window (_LayerWindows)
        uniform = config.uniform_window_left
        self.window_left = -1 if uniform is None else uniform
        self.layer_windows = None if uniform is not None else [config.layer_window_left(i)
                                                               for i in range(config.num_layers)]
        self.pdl = pdl_default()  # PAGODA_PDL: programmatic dependent launches of the decode-path Triton kernels
        self.kv_caches = [torch.zeros(num_pages, 2, page_size, config.num_kv_heads, config.head_dim,
                                      dtype=self.kv_dtype,
                                      device=self.device) for _ in range(config.num_layers)]
        # PAGODA_FP8_PREFILL_SCRATCH (default 1): a Hopper GPU's prefill over an fp8 cache reads a 16-bit copy of the
        # step's pages (_PagodaAttention.plan), one layer's pages of a max_model_len prompt (steps over more pages
        # read the fp8 cache): fp8_prefill_scratch_default, fp8_prefill_scratch_shape
        self.fp8_prefill_scratch = None
        if uses_fp8_prefill_scratch(self.kv_dtype, self.device, attention_backend):
            shape = fp8_prefill_scratch_shape(config, page_size, max_model_len, num_pages, torch.finfo(dtype).bits // 8)
            self.fp8_prefill_scratch = torch.empty(shape, dtype=dtype, device=self.device)
        ws_bytes = (256 << 20) if self.device.type == "cuda" else (8 << 20)
        self.workspace = torch.empty(ws_bytes, dtype=torch.uint8, device=self.device)
        # mixed steps' one-token requests in the decode kernel (pagoda's wrappers: split_mixed_mode); launch() puts
        # them first in such a step
        self.split_mode = split_mixed_mode() if attention_backend in ("pagoda", "torch") else "0"
        if attention_backend == "flashinfer":
            if self.layer_windows is not None or config.attn_scale is not None or config.attn_soft_cap is not None:
                raise ValueError(f"attention_backend 'flashinfer' serves models of one attention window without a "
                                 f"logits soft cap or scale of their own; {config.architecture} takes 'pagoda' or "
                                 f"'torch'")
            if self.device.type != "cuda":
                raise ValueError("attention_backend='flashinfer' needs a CUDA device")
            self.attn = _FlashInferAttention(self)
        elif attention_backend == "pagoda":
            self.attn = self.make_attention("auto")
        elif attention_backend == "torch":
            self.attn = self.make_attention("torch")
        else:
            raise ValueError(f"attention_backend must be 'pagoda', 'flashinfer' or 'torch', got {attention_backend!r}")
        self.attention_backend = attention_backend
        # cascade decode (pagoda's wrappers only): used when the pages shared within groups of requests save at
        # least this fraction of the step's KV page reads
        # (not with a sliding window: the shared level would attend past it)
        self.enable_cascade = (enable_cascade and attention_backend in ("pagoda", "torch") and self.window_left < 0
                               and self.layer_windows is None)
        self.cascade_min_saved = CASCADE_MIN_SAVED
        self.cascade_min_saved_bytes = CASCADE_MIN_SAVED_BYTES if self.device.type == "cuda" else 0
        self.page_bytes = (config.num_layers * 2 * page_size * config.num_kv_heads * config.head_dim
                           * torch.finfo(self.kv_dtype).bits // 8)
        self.cascade_attn = (_PagodaCascadeAttention(self, "auto" if attention_backend == "pagoda" else "torch")
                             if self.enable_cascade else None)
        self.last_step_cascade = False
        # page-table entries of one step: requests that share prefix pages each list them, so the bound
        # is per request, not the pool size
        max_pages_step = max_num_seqs * (-(-max_model_len // page_size))
        self.use_graphs = (enable_cuda_graph and self.device.type == "cuda"
                           and attention_backend in ("pagoda", "flashinfer"))
        self.graph_sizes = [s for s in GRAPH_BATCH_SIZES if s < max_num_seqs] + [max_num_seqs]
        mx = self.graph_sizes[-1]
        # the graphs' inputs: one int32 buffer, regions at fixed offsets (write_static fills them in one copy)
        # (the LoRA tables before the page ids: one copy spans the regions up to the last one written)
        lora_regions = () if lora is None else (("lora_order", mx),
                                                ("lora_tiles", 3 * lora_max_tiles(mx, 16, lora.max_loras)))
        regions = (("input_ids", mx), ("positions", mx), ("batch_indices", mx), ("kv_indptr", mx + 1),
                   ("qo_indptr", mx + 1), ("kv_last_page_len", mx)) + lora_regions + (
                       ("kv_indices", max_pages_step + mx),)
        offsets = np.cumsum([0] + [k for _, k in regions])
        n_lora = 0 if lora is None else 4 * max_num_batched_tokens + 3 * lora.max_loras  # (order, tiles of 16 rows)
        n_pinned = max(6 * max_num_batched_tokens + 4 * max_num_seqs + 8 + max_pages_step + n_lora, int(offsets[-1]))
        self.staging = _Staging(n_pinned, self.device)
        self.graphs: dict[tuple[int, bool], _DecodeGraph] = {}  # (padded batch size, cascade)
        self._graph_attn: dict[bool, _PagodaAttention] = {}
        self.last_step_graph = False
        self.last_step_prepared = False
        self.last_step_split = False  # (the last step ran a mixed batch's one-token requests in the decode kernel)
        self.graph_pool = None
        # (a side stream inside the decode graphs: the deferred final norm's factor beside the lm_head)
        self.side_stream = torch.cuda.Stream(self.device) if self.use_graphs else None
        if self.use_graphs:
            self.static_flat = torch.zeros(int(offsets[-1]), dtype=torch.int32, device=self.device)
            self.static = {n: self.static_flat[o:o + k] for (n, k), o in zip(regions, offsets)}
        # PAGODA_STEP_OVERLAP=1 / 0 (default 1; pagoda graphs): between two decode steps the compute stream runs
        # only the sampling and the next ids' copy; the next step's other inputs and its attention plan go to the
        # device on a copy stream once the graph before is done with them (during the sampling), and the sampled
        # tokens come back on a read-back stream (the profile of session 19: ~50 us of a batch-1 step between the
        # graphs, copies and the gaps around them among it). H200, session 20, `python -m pagoda.bench.engine
        # --cases latency`, interleaved on one machine: batch 1 4.453 / 4.450 -> 4.420 / 4.416 ms per token,
        # batch 64 7.191 / 7.196 -> 7.175 / 7.180
        overlap = env_switch("PAGODA_STEP_OVERLAP", "1")
        self.step_overlap = overlap and self.use_graphs and attention_backend == "pagoda"
        # PAGODA_EARLY_INPUTS (with the step overlap; default 1, 0 turns it off): the copy stream waits for the
        # graph before only up to its last attention (an event inside the graph) instead of its end, so the next
        # step's inputs and plan are on the device before the graph's last projections and lm_head are done, and
        # between two graphs only the sampling remains (session 20's profile: a 12 us gap after the greedy
        # kernel, the copy stream's copies after the graph's end). H200, session 21, batch 1 interleaved on one
        # machine: 4.361 / 4.367 -> 4.358 / 4.356 ms per token
        early = env_switch("PAGODA_EARLY_INPUTS", "1")  # (read, and so checked, wherever the overlap is off too)
        self.early_inputs = self.step_overlap and early
        if self.step_overlap:
            self.copy_stream, self.readback_stream = torch.cuda.Stream(self.device), torch.cuda.Stream(self.device)
            self._graph_done = torch.cuda.Event()  # recorded after each graph replay, before its sampling
            self._inputs_free = self._graph_done  # what the copy stream waits for: the last graph's inputs read
        self.max_model_len = max_model_len
        self.model.init_rope(max_model_len)

    # -- CUDA graphs --------------------------------------------------------------------
    def padded_decode_inputs(self, inp: StepInputs | list, size: int) -> StepInputs:
        """A decode batch padded to ``size`` rows: padding rows are one token at position 0
        attending to one slot of the reserved page 0."""
        if isinstance(inp, list):
            b = 0
            ids = pos = bidx = kvi = last = np.zeros(0, np.int32)
            kv = qo = np.zeros(1, np.int32)
        else:
            b = len(inp.sample_rows)
            ids, pos, bidx, kvi, last = inp.input_ids, inp.positions, inp.batch_indices, inp.kv_indices, inp.kv_last_page_len
            kv, qo = inp.kv_indptr, inp.qo_indptr
        pad = size - b
        z = np.zeros(pad, np.int32)
        slots = None
        if self.lora is not None:  # (padding rows: slot 0, no adapter)
            have = None if isinstance(inp, list) else inp.lora_slots
            slots = np.concatenate([np.zeros(b, np.int32) if have is None else have, z])
        return StepInputs(
            np.concatenate([ids, z]), np.concatenate([pos, z]), np.concatenate([bidx, np.arange(b, size, dtype=np.int32)]),
            np.concatenate([qo, qo[-1] + np.arange(1, pad + 1, dtype=np.int32)]),
            np.concatenate([kv, kv[-1] + np.arange(1, pad + 1, dtype=np.int32)]),
            np.concatenate([kvi, z]), np.concatenate([last, np.ones(pad, np.int32)]),
            np.arange(size, dtype=np.int32), list(range(size)), True, slots)

    def write_static(self, inp: StepInputs, skip_ids: bool = False) -> None:
        """The step's inputs into the graphs' buffer, in one host-to-device copy (session 18: the copy into a
        temporary and seven device-to-device copies out of it sat between two decode steps, ~50 us of idle GPU
        a step at batch 1 in the profile's timeline). skip_ids: all but the input ids (the first region: the
        copy starts after it), which the step before writes on the device (prepare_next)."""
        parts = []
        arrays = {}
        if self.lora is not None:  # (the padded batch's tables: the graph's grid is the bound for its size)
            size = len(inp.input_ids)
            order, tiles, _, _ = step_tables(inp.lora_slots, inp.qo_indptr, self.lora.max_loras, rows=size)
            arrays = {"lora_order": order, "lora_tiles": tiles}
        names = ("input_ids", "positions", "batch_indices", "kv_indptr", "qo_indptr", "kv_last_page_len") + tuple(
            arrays) + ("kv_indices",)
        for name in names[int(skip_ids):]:
            a, region = arrays[name] if name in arrays else getattr(inp, name), self.static[name]
            if a.size > region.numel():
                raise RuntimeError(f"{name}: {a.size} entries, the graphs' buffer holds {region.numel()}")
            parts.append((region.storage_offset(), a))
        self.staging.upload_into(self.static_flat, parts)

    def calibrate_kv_scales(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """calculate_kv_scales: a layer's k_scale / v_scale from the first step's K (after RoPE) and V, as vLLM's
        (max |K| / K_SCALE_CONSTANT, max |V| / V_SCALE_CONSTANT: the step's largest value stored at 200 / 100 of
        e4m3's 448, room for larger ones later); 1.0 where a tensor's max is 0 or not finite. The last layer's ends
        the calibration."""
        for name, t, const in (("k_scale", k, K_SCALE_CONSTANT), ("v_scale", v, V_SCALE_CONSTANT)):
            top = float(t.detach().abs().amax()) if t.numel() else 0.0
            self.layer_kv_scales[layer][name] = top / const if math.isfinite(top) and top > 0 else 1.0
        if layer == len(self.kv_caches) - 1:
            self.kv_scales_pending = False
            logger.info("calculate_kv_scales: k_scale %.4g..%.4g, v_scale %.4g..%.4g over %d layers",
                        *(f(s[n] for s in self.layer_kv_scales) for n in ("k_scale", "v_scale") for f in (min, max)),
                        len(self.layer_kv_scales))

    def capture_graphs(self) -> None:
        """Capture every decode batch size now (as vLLM does at start-up), so no request waits for a
        capture when the running batch reaches a new size; with cascade decode, its graphs too. Under
        calculate_kv_scales, nothing before the first step has set the scales (launch() captures after it)."""
        if self.kv_scales_pending:
            return
        for cascade in (False, True) if self.enable_cascade else (False,):
            for size in reversed(self.graph_sizes):  # largest first: smaller graphs reuse its memory pool
                self._graph_for(size, cascade)
        torch.cuda.synchronize()

    def split_rows(self, inp: StepInputs) -> int | None:
        """How many of a mixed step's first requests run in the decode kernel (split_mixed_mode; StepInputs.split),
        or None: the one-token requests, when they are the step's first requests (launch() orders them so) and not
        all of them."""
        if self.split_mode == "0":
            return None
        qo_lens = np.diff(inp.qo_indptr)
        one = (qo_lens == 1) & (np.diff(inp.kv_indptr) > 0)
        n = int(one.argmin()) if not one.all() else len(one)
        if n == 0 or n == len(one) or one[n:].any():
            return None
        if self.split_mode == "1" or self.fp8_prefill_scratch is not None:
            return n
        c = self.config
        kv_lens = paged_kv_lens(inp.kv_indptr, inp.kv_last_page_len, self.page_size)
        dec = split_mixed(qo_lens, kv_lens, c.num_heads, c.num_kv_heads, c.head_dim, True)
        return n if dec is not None else None

    def make_attention(self, backend: str, use_cuda_graph: bool = False):
        """pagoda's attention of this model's layers: one _PagodaAttention, or one a window (_LayerWindows)."""
        if self.layer_windows is None:
            return _PagodaAttention(self, backend, use_cuda_graph)
        return _LayerWindows(lambda w: _PagodaAttention(self, backend, use_cuda_graph, window_left=w),
                             self.layer_windows)

    def graph_attention(self, cascade: bool):
        """The attention of the pagoda decode graphs: one CUDA-graph wrapper for every batch size (a step
        plans it, then replays its size's graph), one for the flat graphs and one for the cascade ones."""
        if cascade not in self._graph_attn:
            self._graph_attn[cascade] = (_PagodaCascadeAttention(self, "triton", use_cuda_graph=True) if cascade
                                         else self.make_attention("triton", use_cuda_graph=True))
        return self._graph_attn[cascade]

    def _graph_for(self, batch: int, cascade: bool = False) -> _DecodeGraph | None:
        """The decode graph of the smallest padded size >= batch (captured on first use; cascade graphs
        are captured only when a step first needs them)."""
        size = next((s for s in self.graph_sizes if s >= batch), None)
        if size is None:
            return None
        if (size, cascade) not in self.graphs:
            if self.graph_pool is None:
                self.graph_pool = torch.cuda.graph_pool_handle()
            self.graphs[size, cascade] = _DecodeGraph(self, size, self.graph_pool, cascade)
        return self.graphs[size, cascade]

    # -- one step -----------------------------------------------------------------------
    @torch.no_grad()
    def launch(self, batch, generator=None, prepared: _Prepared | None = None) -> _Pending:
        """Queue the batch's forward and sampling on the device; collect() reads back the tokens of the
        requests that sample, in batch order (ScheduledBatch.requests filtered by StepInputs.sample_rows).
        With a ``prepared`` step (prepare_next) that matches the batch, its inputs and plan are used as they are."""
        requests, num_new = batch.requests, batch.num_new_tokens
        if prepared is not None and prepared.matches(requests, num_new):
            return self.launch_prepared(prepared, generator)
        self.last_step_prepared = self.last_step_split = False
        if self.step_overlap:  # (a step prepared on the copy stream and not run may still be writing the inputs)
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        order = _first_page_order(requests) if self.enable_cascade and len(requests) > 1 else None
        if order is not None:  # requests that share pages next to each other (levels group neighbours)
            requests, num_new = [requests[i] for i in order], [num_new[i] for i in order]
        if self.split_mode != "0" and 1 in num_new and any(n > 1 for n in num_new):
            # a mixed step: its one-token requests first (the decode kernel takes the first rows: _PagodaAttention)
            first = sorted(range(len(requests)), key=lambda i: num_new[i] != 1)
            requests, num_new = [requests[i] for i in first], [num_new[i] for i in first]
        inp = build_inputs(requests, num_new, self.page_size)
        if not inp.is_decode:
            inp.split = self.split_rows(inp)
            self.last_step_split = inp.split is not None
        if self.lora is not None:  # (adapters not on the device are written into slots here, on this stream)
            inp.lora_slots = self.lora.slots_for(requests)
        levels = self._cascade_levels(inp) if order is not None and inp.is_decode else None
        self.last_step_cascade = levels is not None
        graph = self._graph_for(len(requests), levels is not None) if (
            self.use_graphs and inp.is_decode and not self.kv_scales_pending) else None
        self.last_step_graph = graph is not None
        scale = None  # (sample_launch's logit_scale: a graph that leaves the final norm out)
        if graph is not None:
            padded = self.padded_decode_inputs(inp, graph.size)
            if levels is not None:
                levels = _pad_levels(levels, graph.size - len(requests), self.page_size)
            logits, scale = graph.run(padded, len(inp.sample_rows), levels)
            if self.step_overlap:
                self._graph_launched(graph)
        prompt_lp = None
        if graph is None:
            dev = _DeviceInputs(inp, self.staging, self._max_loras)
            attn = self.cascade_attn if levels is not None else self.attn
            attn.plan(inp, dev, levels)
            calibrating = self.kv_scales_pending
            hidden = self._hidden(dev, attn)
            if calibrating and not self.kv_scales_pending and self.use_graphs:  # (the scales are set: the graphs
                torch.cuda.synchronize(self.device)  # hold them as constants, so they are captured now, as at
                self.capture_graphs()  # start-up)
            want = _prompt_lp_rows(requests, num_new, inp.qo_indptr)
            prompt_lp = _PromptLogprobs(self.model, hidden, want) if want else None
            if not inp.sample_rows:  # prefill chunks only: the forward fills the cache, nothing samples
                return _Pending([], None, False, prompt_lp)
            logits = self._logits(hidden, dev)
        reqs = [requests[i] for i in inp.sample_rows]
        # a batch whose requests share pages may run cascade levels next step: prepared only when scheduled
        sampled = sample_launch(logits, reqs, generator, *self._overlap_args(graph is not None, len(reqs)),
                                logit_scale=scale)
        return _Pending(reqs, sampled, inp.is_decode and order is None, prompt_lp)

    def _graph_launched(self, graph) -> None:
        """After a graph's replay under the step overlap: what the copy stream waits for before it writes the next
        step's inputs (the graph's own event after its last attention with PAGODA_EARLY_INPUTS, else its end)."""
        if graph.inputs_read is not None:
            self._inputs_free = graph.inputs_read
        else:
            self._graph_done.record()
            self._inputs_free = self._graph_done

    def _overlap_args(self, graph: bool, n: int):
        """sample_launch's (readback_stream, next_ids) under PAGODA_STEP_OVERLAP: the read-back stream, and after
        a graph step the graphs' input ids (the greedy sampler writes the next step's there), else (None, None)."""
        if not self.step_overlap:
            return None, None
        return self.readback_stream, (self.static["input_ids"][:n] if graph else None)

    @torch.no_grad()
    def launch_prepared(self, prepared: _Prepared, generator=None) -> _Pending:
        """Queue a prepared decode step (prepare_next) and its sampling: the graph replay (or the eager
        forward) over the inputs and plan already on the device."""
        self.last_step_prepared, self.last_step_cascade, self.last_step_split = True, False, False
        self.last_step_graph = prepared.graph is not None
        reqs = list(prepared.requests)
        if prepared.graph is not None:
            if self.step_overlap:  # its inputs and plan, written on the copy stream (prepare_next)
                torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
            logits, scale = prepared.graph.replay(len(reqs))
            if self.step_overlap:
                self._graph_launched(prepared.graph)
        else:
            logits = self._logits(self._hidden(prepared.dev, self.attn), prepared.dev)
            scale = None
        sampled = sample_launch(logits, reqs, generator, *self._overlap_args(prepared.graph is not None, len(reqs)),
                                logit_scale=scale)
        return _Pending(reqs, sampled, True)

    def _hidden(self, dev: _DeviceInputs, attn) -> torch.Tensor:
        """The eager forward: the final hidden states of every token of the step."""
        return self.model(dev.input_ids, dev.positions, _Context(self, attn, dev))

    def _logits(self, hidden: torch.Tensor, dev: _DeviceInputs) -> torch.Tensor:
        """The logits of the rows that sample."""
        return self.model.compute_logits(hidden[dev.logits_indices.long()])

    def collect(self, pending: _Pending):
        """Read a launched step's tokens back (waits for the device): (requests, tokens, logprobs); the prompt
        logprobs its prefill chunks computed go into their requests."""
        if pending.prompt_lp is not None:
            pending.prompt_lp.collect()
            pending.prompt_lp = None
        if pending.sampled is None:
            return [], [], []
        tokens, logprobs = sample_collect(pending.sampled)
        return pending.requests, tokens, logprobs

    @torch.no_grad()
    def prepare_next(self, pending: _Pending, grow) -> _Prepared | None:
        """While a decode step runs on the device, prepare the next one as if every request goes on (the
        common case; LLMEngine.step runs it only if the scheduler then picks the same batch): one more page
        where a request needs it (``grow(request, num_tokens)``, the scheduler's), the inputs written to the
        device behind the running step, the sampled tokens copied in as the next input ids on the device,
        and the attention planned. Returns None when the next step could not be such a decode step (cascade
        sharing, the model's length limit, no free pages)."""
        reqs = pending.requests
        if not pending.preparable or any(r.num_tokens + 1 > self.max_model_len for r in reqs):
            return None
        for r in reqs:
            if not grow(r, r.num_tokens + 1):
                return None
        inp = build_next_decode_inputs(reqs, self.page_size)
        if self.lora is not None:  # (the same requests as the step in flight: their adapters are in their slots)
            inp.lora_slots = self.lora.slots_for(reqs)
        # -1 marks a row whose logits were not finite (the engine ends that request); a step run ahead still
        # computes the row, so it must hold a valid token id
        positions = inp.positions.tolist()
        graph = self._graph_for(len(reqs), False) if self.use_graphs else None
        if graph is not None and self.step_overlap:
            # the ids behind the sampling on the compute stream (written by the greedy sampler itself after a
            # graph step); the rest on the copy stream once the graph before is done with the inputs and the
            # plan (not behind the sampling: launch_prepared waits for it)
            if not pending.sampled.next_written:
                self.static["input_ids"][:len(reqs)].copy_(pending.sampled.out.clamp(min=0), non_blocking=True)
            self.copy_stream.wait_event(self._inputs_free)
            with torch.cuda.stream(self.copy_stream):
                graph.prepare(self.padded_decode_inputs(inp, graph.size), skip_ids=True)
            return _Prepared(list(reqs), positions, graph=graph)
        ids = pending.sampled.out.clamp(min=0)
        if graph is not None:
            graph.prepare(self.padded_decode_inputs(inp, graph.size))
            self.static["input_ids"][:len(reqs)].copy_(ids, non_blocking=True)
            return _Prepared(list(reqs), positions, graph=graph)
        dev = _DeviceInputs(inp, self.staging, self._max_loras)
        dev.input_ids.copy_(ids, non_blocking=True)
        self.attn.plan(inp, dev)
        return _Prepared(list(reqs), positions, dev=dev)

    def _cascade_levels(self, inp: StepInputs):
        """The step's two cascade levels, or None when sharing saves less than cascade_min_saved of the
        KV page reads or than cascade_min_saved_bytes."""
        levels = pagoda.cascade_levels_from_page_table(inp.kv_indptr, inp.kv_indices, inp.kv_last_page_len,
                                                       self.page_size, inp.qo_indptr)
        total = int(inp.kv_indptr[-1])
        read = int(levels["paged_kv_indptr_arr"][0][-1]) + int(levels["paged_kv_indptr_arr"][1][-1])
        saved = total - read
        if (total == 0 or saved < self.cascade_min_saved * total
                or saved * self.page_bytes < self.cascade_min_saved_bytes):
            return None
        return levels


def _pad_levels(levels, pad: int, page_size: int):
    """Cascade levels of a decode batch extended by ``pad`` padding rows (padded_decode_inputs: one token
    attending to slot 0 of page 0), each a group of its own that shares nothing."""
    if pad == 0:
        return levels
    ar = torch.arange(1, pad + 1, dtype=torch.int32)
    (qo0, qo1), (kv0, kv1) = levels["qo_indptr_arr"], levels["paged_kv_indptr_arr"]
    (ix0, ix1), (last0, last1) = levels["paged_kv_indices_arr"], levels["paged_kv_last_page_len"]
    return dict(
        qo_indptr_arr=[torch.cat([qo0, qo0[-1] + ar]), torch.cat([qo1, qo1[-1] + ar])],
        paged_kv_indptr_arr=[torch.cat([kv0, kv0[-1].expand(pad)]), torch.cat([kv1, kv1[-1] + ar])],
        paged_kv_indices_arr=[ix0, torch.cat([ix1, torch.zeros(pad, dtype=torch.int32)])],
        paged_kv_last_page_len=[torch.cat([last0, torch.full((pad,), page_size, dtype=torch.int32)]),
                                torch.cat([last1, torch.ones(pad, dtype=torch.int32)])])


def _first_page_order(requests) -> list[int] | None:
    """The (stable) order of a batch by the first page of each request, or None when no two requests
    start with the same page (nothing to share: the common case is one pass over the batch)."""
    first = [r.pages[0] if r.pages else -1 - i for i, r in enumerate(requests)]
    if len(set(first)) == len(first):
        return None
    return sorted(range(len(first)), key=first.__getitem__)
