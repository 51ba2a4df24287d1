"""Token sampling for a step: greedy rows by argmax, the others through pagoda's sorting-free
samplers (temperature, top-k, top-p, min-p), requests with a seed on their own generator so
that the same seed gives the same tokens whatever else is in the batch."""
from __future__ import annotations

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
    kt = torch.tensor(k, dtype=torch.int32).to(dev, non_blocking=True) if use_k else None
    pt = torch.tensor(top_p, dtype=torch.float32).to(dev, non_blocking=True) if use_p else None
    if use_m:
        probs = torch.softmax(logits, -1)
        if use_k:
            probs = pagoda.top_k_renorm_probs(probs, kt)
        if use_p:
            probs = pagoda.top_p_renorm_probs(probs, pt)
        mt = torch.tensor(min_p, dtype=torch.float32).to(dev, non_blocking=True)
        return pagoda.min_p_sampling_from_probs(probs, mt, generator=generator)
    if use_k and use_p:
        return pagoda.top_k_top_p_sampling_from_logits(logits, kt, pt, generator=generator)
    probs = torch.softmax(logits, -1)
    if use_k:
        return pagoda.top_k_sampling_from_probs(probs, kt, generator=generator)
    if use_p:
        return pagoda.top_p_sampling_from_probs(probs, pt, generator=generator)
    return pagoda.sampling_from_probs(probs, generator=generator)


def sample(logits: torch.Tensor, requests, generator: torch.Generator | None = None):
    """logits [n, vocab] float32 for n requests. Returns (tokens: list[int], logprobs: list[dict | None])
    where logprobs[i] maps token id -> log-probability (of the model's distribution) for the
    sampled token and the request's top ``logprobs`` tokens. A row whose logits are not finite
    samples -1 (greedy rows too)."""
    n = logits.shape[0]
    out = torch.empty(n, dtype=torch.long, device=logits.device)
    greedy = [i for i, r in enumerate(requests) if r.params.greedy]
    if greedy:
        gi = torch.tensor(greedy, device=logits.device)
        rows = logits[gi]
        out[gi] = torch.where(torch.isfinite(rows).all(-1), rows.argmax(-1), -1)
    shared = [i for i, r in enumerate(requests) if not r.params.greedy and r.generator is None]
    if shared:
        si = torch.tensor(shared, device=logits.device)
        temp = torch.tensor([requests[i].params.temperature for i in shared], device=logits.device)
        out[si] = _sample_rows(logits[si] / temp[:, None], [requests[i].params for i in shared], generator).long()
    for i, r in enumerate(requests):
        if not r.params.greedy and r.generator is not None:
            row = logits[i:i + 1] / r.params.temperature
            out[i] = _sample_rows(row, [r.params], r.generator).long()[0]
    want = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
    logprobs: list[dict | None] = [None] * n
    if want:
        wi = torch.tensor(want, device=logits.device)
        lp = torch.log_softmax(logits[wi], -1)
        kmax = max(requests[i].params.logprobs for i in want)
        top_v, top_i = lp.topk(max(kmax, 1), dim=-1) if kmax else (None, None)
        chosen = lp.gather(1, out[wi].clamp(min=0)[:, None])[:, 0]
        chosen, top_v, top_i = chosen.tolist(), (top_v.tolist() if kmax else None), (top_i.tolist() if kmax else None)
    tokens = out.tolist()  # -1: NaN / infinite logits (the engine ends that request with "error")
    for j, i in enumerate(want):
        if tokens[i] < 0:
            continue
        k = requests[i].params.logprobs
        d = {top_i[j][m]: top_v[j][m] for m in range(k)} if k else {}
        d[tokens[i]] = chosen[j]
        logprobs[i] = d
    return tokens, logprobs
