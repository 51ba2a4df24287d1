"""Plain PyTorch attention: the oracle of the tests and the CPU fallback (backend="torch").

Conventions shared with the kernels (and FlashInfer):
- logits are ``(q . k) * sm_scale``, soft-capped as ``cap * tanh(logits / cap)``;
- causal masking is bottom-right aligned: query i of qo_len sees key j of kv_len when
  ``j <= i + kv_len - qo_len``; ``window_left >= 0`` also requires
  ``j >= i + kv_len - qo_len - window_left``;
- the log-sum-exp (LSE) is in base 2: ``lse = log2(sum_j exp(logit_j))``;
- a query that sees no key gets output 0 and lse = -inf;
- attention sinks (gpt-oss; FlashInfer's ``sinks``): one learned logit per query head, ``sinks[h]``, in the
  softmax's denominator and nothing in its numerator (a key no value belongs to), on the logits' own scale (not
  multiplied by sm_scale); the lse then counts it: ``lse = log2(exp(sinks[h]) + sum_j exp(logit_j))``, and a
  query that sees no key gets output 0 and ``lse = sinks[h] * log2(e)``.
"""
from __future__ import annotations

import math

import torch


def attention(q, k, v, *, causal=False, sm_scale=None, window_left=-1, logits_soft_cap=None,
              compute_dtype=torch.float32, out_dtype=None, variant=None, batch_idx=0, mask=None, sinks=None):
    """Attention of one request.

    q: [qo_len, num_qo_heads, head_dim]; k, v: [kv_len, num_kv_heads, head_dim].
    Returns (out [qo_len, num_qo_heads, head_dim] in ``out_dtype`` (default q.dtype), lse
    [qo_len, num_qo_heads] float32), computed in ``compute_dtype`` (float64 for test oracles).
    variant: an AttentionVariant (its PyTorch form; request index ``batch_idx``); mask: a
    [qo_len, kv_len] bool custom mask (True: keep); sinks: [num_qo_heads] attention-sink logits (module
    docstring).
    """
    qo_len, hq, d = q.shape
    kv_len, hk = k.shape[0], k.shape[1]
    group = hq // hk
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(d)
    qf = q.to(compute_dtype)
    kf = k.to(compute_dtype).repeat_interleave(group, dim=1)
    vf = v.to(compute_dtype).repeat_interleave(group, dim=1)
    logits = torch.einsum("qhd,khd->hqk", qf, kf) * sm_scale
    if logits_soft_cap is not None and logits_soft_cap > 0:
        logits = logits_soft_cap * torch.tanh(logits / logits_soft_cap)
    qi = torch.arange(qo_len, device=q.device)[:, None] + (kv_len - qo_len)
    kj = torch.arange(kv_len, device=q.device)[None, :]
    keep = torch.ones(qo_len, kv_len, dtype=torch.bool, device=q.device)
    if causal:
        keep &= kj <= qi
    if window_left >= 0:
        keep &= kj >= qi - window_left
    if variant is not None:
        logits, vkeep = variant.apply_torch(logits, batch_idx, qi[:, 0], kj[0])
        if vkeep is not None:
            keep = keep & vkeep
    if mask is not None:
        keep = keep & mask.to(keep.device)
    logits = logits.masked_fill(~keep, float("-inf"))
    if sinks is not None:  # (the sink's column joins the sum, then leaves: it has no value)
        sink = sinks.to(device=logits.device, dtype=logits.dtype)[:, None, None].expand(hq, qo_len, 1)
        lse = torch.logsumexp(torch.cat([logits, sink], dim=-1), dim=-1)
    else:
        lse = torch.logsumexp(logits, dim=-1)  # [h, q], -inf where nothing is visible
    probs = torch.exp(logits - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.einsum("hqk,khd->qhd", probs, vf)
    lse2 = (lse / math.log(2.0)).transpose(0, 1)
    return out.to(out_dtype or q.dtype), lse2.to(torch.float32)


def gather_paged_kv(k_cache, v_cache, pages, kv_len, kv_layout="NHD"):
    """Request KV [kv_len, num_kv_heads, head_dim] from unpacked paged caches.

    pages: 1-D integer tensor of this request's page ids.
    """
    if kv_layout == "HND":
        k_cache, v_cache = k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    pages = pages.to(device=k_cache.device, dtype=torch.long)
    k = k_cache[pages].reshape(-1, k_cache.shape[2], k_cache.shape[3])[:kv_len]
    v = v_cache[pages].reshape(-1, v_cache.shape[2], v_cache.shape[3])[:kv_len]
    return k, v


def merge_state(v_a, s_a, v_b, s_b):
    """Reference of cascade.merge_state: v [n, h, d], s [n, h] (base-2 LSE)."""
    return merge_states(torch.stack([v_a, v_b], dim=1), torch.stack([s_a, s_b], dim=1))


def merge_states(v, s):
    """Reference of cascade.merge_states: v [n, k, h, d], s [n, k, h] -> ([n, h, d], [n, h])."""
    s64 = s.to(torch.float64)
    m = s64.max(dim=1, keepdim=True).values
    m = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    w = torch.exp2(s64 - m)  # [n, k, h]
    d = w.sum(dim=1)
    out = (w[..., None] * v.to(torch.float64)).sum(dim=1) / torch.where(d == 0, 1.0, d)[..., None]
    lse = torch.where(d == 0, float("-inf"), m.squeeze(1) + torch.log2(torch.where(d == 0, 1.0, d)))
    return out.to(v.dtype), lse.to(torch.float32)
