"""Token sampling for a step: greedy rows by argmax, the others through pagoda's sorting-free
samplers (temperature, top-k, top-p, min-p), requests with a seed on their own generator so
that the same seed gives the same tokens whatever else is in the batch."""
from __future__ import annotations

import inspect
import logging
from contextlib import nullcontext as _nullcontext

import torch

import pagoda


def _sample_rows(logits: torch.Tensor, params, generator) -> torch.Tensor:
    """logits [n, vocab] float32 (already divided by temperature); params: SamplingParams per row."""
    vocab = logits.shape[1]
    dev = logits.device
    k = [p.top_k if p.top_k > 0 else vocab for p in params]
    top_p = [p.top_p for p in params]
    min_p = [p.min_p for p in params]
    use_k, use_p, use_m = any(x < vocab for x in k), any(x < 1.0 for x in top_p), any(x > 0 for x in min_p)
    kt = _device_tensor(k, torch.int32, dev) if use_k else None
    pt = _device_tensor(top_p, torch.float32, dev) if use_p else None
    if use_m:
        probs = torch.softmax(logits, -1)
        if use_k:
            probs = pagoda.top_k_renorm_probs(probs, kt)
        if use_p:
            probs = pagoda.top_p_renorm_probs(probs, pt)
        mt = _device_tensor(min_p, torch.float32, dev)
        return pagoda.min_p_sampling_from_probs(probs, mt, generator=generator)
    if use_k and use_p:
        return pagoda.top_k_top_p_sampling_from_logits(logits, kt, pt, generator=generator)
    probs = torch.softmax(logits, -1)
    if use_k:
        return pagoda.top_k_sampling_from_probs(probs, kt, generator=generator)
    if use_p:
        return pagoda.top_p_sampling_from_probs(probs, pt, generator=generator)
    return pagoda.sampling_from_probs(probs, generator=generator)


class Sampled:
    """A step's sampling, launched on the device (sample_launch) and not yet read back (sample_collect).

    On a GPU its results are copied to pinned host memory right behind the sampling kernels, and an event
    marks the copies done: sample_collect waits for that event, not for the stream, on which the engine may
    already have queued the next step (LLMEngine.step runs steps ahead)."""

    def __init__(self, out, requests, want, chosen, top_v, top_i, readback_stream=None, next_written=False):
        self.out, self.requests, self.want = out, requests, want  # out stays on the device (prepare_next)
        self.next_written = next_written  # (sample_launch: the tokens are already the next step's input ids)
        self.host = (out, chosen, top_v, top_i)
        self.copied = None
        if out.device.type == "cuda":  # non-blocking device-to-host copies land in pinned memory
            if readback_stream is not None:
                # (the engine's PAGODA_STEP_OVERLAP: the copies on their own stream, behind the sampling, so the
                # compute stream goes on to the next step without them between)
                readback_stream.wait_stream(torch.cuda.current_stream(out.device))
                for t in self.host:
                    if t is not None:
                        t.record_stream(readback_stream)
            with torch.cuda.stream(readback_stream) if readback_stream is not None else _nullcontext():
                self.host = tuple(None if t is None else t.to("cpu", non_blocking=True) for t in self.host)
                self.copied = torch.cuda.Event()
                self.copied.record()

    def read(self):
        """(out, chosen, top_v, top_i) as host tensors, once the device has produced them."""
        if self.copied is not None:
            self.copied.synchronize()
        return self.host


def _device_tensor(values, dtype, device) -> torch.Tensor:
    """A small host list on the device without waiting for the stream: a copy from pageable memory would
    wait for every kernel queued before it (the step's forward), pinned memory does not."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


class _PenaltyState:
    """A penalized request's token statistics on the device, kept up to date step by step (its new output tokens
    only): which tokens its prompt or output holds (repetition_penalty) and how often each was generated
    (presence / frequency penalties). Rebuilding them from the token lists each step would copy the whole prompt
    to the device every step (32k tokens of a long prompt)."""

    def __init__(self, r, vocab: int, dev: torch.device):
        p = r.params
        self.seen = self.counts = self.bias = None
        if p.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=dev)
            self.seen[_device_tensor(r.prompt_token_ids, torch.long, dev)] = True
        if p.presence_penalty or p.frequency_penalty:
            self.counts = torch.zeros(vocab, dtype=torch.float32, device=dev)
        # min_tokens: the ids banned until the output has min_tokens tokens (LLMEngine.add_request sets
        # Request.min_tokens_ban: EOS unless ignore_eos, and stop_token_ids)
        self.ban = _device_tensor(r.min_tokens_ban, torch.long, dev) if p.min_tokens and r.min_tokens_ban else None
        self.allowed = None
        if p.allowed_token_ids:  # everything else banned
            self.allowed = torch.zeros(vocab, dtype=torch.bool, device=dev)
            self.allowed[_device_tensor(list(p.allowed_token_ids), torch.long, dev)] = True
        if p.logit_bias:  # (a row to add: built once, not from the dict each step)
            self.bias = torch.zeros(vocab, dtype=torch.float32, device=dev)
            self.bias[_device_tensor(list(p.logit_bias), torch.long, dev)] = _device_tensor(
                [float(b) for b in p.logit_bias.values()], torch.float32, dev)
        # logits processors with whether each takes the prompt too (three parameters): inspected once here, not
        # every step
        self.processors = [(fn, _takes_prompt(fn)) for fn in p.logits_processors or ()]
        if r.guided is not None:  # (guided decoding's grammar mask, after the user's processors: engine/guided.py)
            self.processors.append((r.guided, False))
        self.done = 0  # output tokens counted so far

    def update(self, out_ids: list[int], dev: torch.device) -> None:
        new = out_ids[self.done:]
        if new:
            t = _device_tensor(new, torch.long, dev)
            if self.seen is not None:
                self.seen[t] = True
            if self.counts is not None:
                self.counts.index_put_((t,), torch.ones(len(new), device=dev), accumulate=True)
            self.done = len(out_ids)


def _takes_prompt(fn) -> bool:
    """Whether a logits processor has vLLM's three-parameter form fn(prompt ids, output ids, logits)."""
    try:
        return len(inspect.signature(fn).parameters) == 3
    except (TypeError, ValueError):
        return False


def _apply_processor(fn, three: bool, r, row: torch.Tensor) -> torch.Tensor:
    """SamplingParams.logits_processors' fn on a request's logits row: fn(output ids, row) or, with three
    parameters, fn(prompt ids, output ids, row). A processor that raises or returns something other than a
    tensor of the row's shape fails only its request: the row becomes NaN, which the sampler reports as invalid
    logits and the engine ends that request with finish_reason "error" (the others go on); the error is logged."""
    try:
        out_ids = list(r.output_token_ids)
        out = fn(list(r.prompt_token_ids), out_ids, row) if three else fn(out_ids, row)
        if not isinstance(out, torch.Tensor) or out.shape != row.shape:
            raise ValueError(f"a logits processor must return a tensor of shape {tuple(row.shape)}, got "
                             f"{type(out).__name__} {tuple(getattr(out, 'shape', ()))}")
        return out.to(row.dtype)
    except Exception:  # noqa: BLE001 - the user's code: its request ends, the engine goes on
        logging.getLogger("pagoda.engine").exception("logits processor %r failed; its request ends", fn)
        return torch.full_like(row, float("nan"))


_BANNED = -1e30  # a banned token's logit: finite (an infinite logit marks a broken row: sample_collect's -1)


def _penalized(logits: torch.Tensor, requests) -> torch.Tensor:
    """logits with the requests' penalties and logit biases applied (SamplingParams.penalized; a copy where
    any row has one: the logprobs stay those of the model's distribution). Each penalized request keeps its
    token statistics on the device (_PenaltyState, updated with the output tokens the host has; the engine
    launches no step ahead for such requests)."""
    rows = [i for i, r in enumerate(requests) if r.params.penalized]
    if not rows:
        return logits
    dev, vocab = logits.device, logits.shape[1]
    logits = logits.clone()
    idx = _device_tensor(rows, torch.long, dev) if len(rows) < len(requests) else None
    sub = logits[idx] if idx is not None else logits
    reqs = [requests[i] for i in rows]
    states = []
    for r in reqs:
        if r.penalty_state is None:
            r.penalty_state = _PenaltyState(r, vocab, dev)
        r.penalty_state.update(r.output_token_ids, dev)
        states.append(r.penalty_state)
    for j, (r, st) in enumerate(zip(reqs, states)):  # logits processors first (vLLM applies them before penalties)
        for fn, three in st.processors:
            sub[j] = _apply_processor(fn, three, r, sub[j])
    # (one stack per statistic: rows without it take a shared zero row)
    if any(st.seen is not None for st in states):  # transformers' RepetitionPenaltyLogitsProcessor: every token
        none = torch.zeros(vocab, dtype=torch.bool, device=dev)  # of the prompt and the output, once
        seen = torch.stack([none if st.seen is None else st.seen for st in states])
        rp = _device_tensor([float(r.params.repetition_penalty) for r in reqs], torch.float32, dev)[:, None]
        sub = torch.where(seen, torch.where(sub > 0, sub / rp, sub * rp), sub)
    if any(st.counts is not None for st in states):  # OpenAI's presence / frequency penalties over the output
        none = torch.zeros(vocab, dtype=torch.float32, device=dev)
        counts = torch.stack([none if st.counts is None else st.counts for st in states])
        pres = _device_tensor([float(r.params.presence_penalty) for r in reqs], torch.float32, dev)[:, None]
        freq = _device_tensor([float(r.params.frequency_penalty) for r in reqs], torch.float32, dev)[:, None]
        sub = sub - freq * counts - pres * (counts > 0)
    if any(st.bias is not None for st in states):
        none = torch.zeros(vocab, dtype=torch.float32, device=dev)
        sub = sub + torch.stack([none if st.bias is None else st.bias for st in states])
    # bans last (min_tokens, allowed_token_ids): nothing scales the banned logits after
    for j, (r, st) in enumerate(zip(reqs, states)):
        if st.ban is not None and len(r.output_token_ids) < r.params.min_tokens:
            sub[j].index_fill_(0, st.ban, _BANNED)
        if st.allowed is not None:
            sub[j].masked_fill_(~st.allowed, _BANNED)
        words = r.bad_words_ids
        if words:  # the last token of each bad word that the output so far would complete
            out = r.output_token_ids
            ban = sorted({w[-1] for w in words if len(w) == 1 or (len(out) >= len(w) - 1
                                                                  and out[len(out) - len(w) + 1:] == w[:-1])})
            if ban:
                sub[j].index_fill_(0, _device_tensor(ban, torch.long, dev), _BANNED)
    if idx is not None:
        logits[idx] = sub
        return logits
    return sub


def sample_launch(logits: torch.Tensor, requests, generator: torch.Generator | None = None,
                  readback_stream=None, next_ids: torch.Tensor | None = None,
                  logit_scale: torch.Tensor | None = None) -> Sampled:
    """Queue the sampling of logits [n, vocab] for n requests on the device (upcast to float32 first unless
    every request is greedy without penalties or logprobs: greedy_sample reads any float dtype, and the argmax
    of the upcast is the same); no read-back, and no
    copy that waits for the forward (so the host can prepare the next step meanwhile). Penalties and logit
    biases (SamplingParams) change the distribution sampled from, not the logprobs reported. readback_stream:
    the copies to the host go on that CUDA stream (Sampled). next_ids: where an all-greedy batch's sampler also
    writes the tokens as the next step's input ids (greedy_sample's next_ids; Sampled.next_written says so).
    logit_scale (float32 [n], positive; a final RMSNorm deferred past the lm_head): the model's logits are
    logits * logit_scale[:, None]; applied with the upcast (an all-greedy batch without logprobs skips both:
    a positive factor per row changes no argmax)."""
    n = logits.shape[0]
    dev = logits.device
    greedy = [i for i, r in enumerate(requests) if r.params.greedy]
    want = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
    if (logits.dtype != torch.float32 or logit_scale is not None) and (
            len(greedy) < n or want or any(r.params.penalized for r in requests)):
        # (one kernel: a bf16 * fp32 product is fp32)
        logits = logits.float() if logit_scale is None else logits * logit_scale[:, None]
    model_logits, logits = logits, _penalized(logits, requests)
    next_written = next_ids is not None and len(greedy) == n
    if len(greedy) == n:  # all greedy (the common serving case): one launch, no index tensors
        out = pagoda.greedy_sample(logits, next_ids=next_ids if next_written else None)
    else:
        out = torch.empty(n, dtype=torch.long, device=dev)
        if greedy:
            gi = _device_tensor(greedy, torch.long, dev)
            out[gi] = pagoda.greedy_sample(logits[gi])
        shared = [i for i, r in enumerate(requests) if not r.params.greedy and r.generator is None]
        if shared:
            si = _device_tensor(shared, torch.long, dev)
            temp = _device_tensor([requests[i].params.temperature for i in shared], torch.float32, dev)
            out[si] = _sample_rows(logits[si] / temp[:, None], [requests[i].params for i in shared],
                                   generator).long()
        for i, r in enumerate(requests):
            if not r.params.greedy and r.generator is not None:
                row = logits[i:i + 1] / r.params.temperature
                out[i] = _sample_rows(row, [r.params], r.generator).long()[0]
    chosen = top_v = top_i = None
    if want:
        wi = _device_tensor(want, torch.long, dev)
        lp = torch.log_softmax(model_logits[wi], -1)
        kmax = max(requests[i].params.logprobs for i in want)
        if kmax:
            top_v, top_i = lp.topk(kmax, dim=-1)
        chosen = lp.gather(1, out[wi].clamp(min=0)[:, None])[:, 0]
    return Sampled(out, requests, want, chosen, top_v, top_i, readback_stream, next_written)


def sample_collect(s: Sampled):
    """Read a launched sampling back: (tokens: list[int], logprobs: list[dict | None]) where logprobs[i] maps
    token id -> log-probability (of the model's distribution) for the sampled token and the request's top
    ``logprobs`` tokens. A row whose logits are not finite samples -1 (greedy rows too)."""
    out, chosen, top_v, top_i = s.read()
    tokens = out.tolist()  # -1: NaN / infinite logits (the engine ends that request with "error")
    logprobs: list[dict | None] = [None] * len(tokens)
    if s.want:
        chosen = chosen.tolist()
        top_v = top_v.tolist() if top_v is not None else None
        top_i = top_i.tolist() if top_i is not None else None
        for j, i in enumerate(s.want):
            if tokens[i] < 0:
                continue
            k = s.requests[i].params.logprobs
            d = {top_i[j][m]: top_v[j][m] for m in range(k)} if k else {}
            d[tokens[i]] = chosen[j]
            logprobs[i] = d
    return tokens, logprobs
