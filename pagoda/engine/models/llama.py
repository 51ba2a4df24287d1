"""The Llama family on pagoda's kernels: Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5 (q/k/v bias),
Qwen3 (per-head q/k RMSNorm). Tied or separate output embeddings.

Tokens of all requests in a step are one flat batch [num_tokens]: the projections and MLP
are plain GEMMs, RoPE / norms / SiLU are pagoda ops, and attention goes through the step's
``AttentionContext`` (writes the new K/V into the paged cache, then paged attention).
q/k/v and gate/up projections are fused into one GEMM each; ``load_weights`` maps Hugging
Face checkpoint names onto them.

Tensor parallelism (engine/parallel.py): built with a TPGroup and the rank's share of the heads and MLP columns
(parallel.local_config), the model loads its shard of the checkpoint, all-reduces the embedding lookup over the
vocabulary-sharded table and the o and down projections' partial sums, and gathers the vocabulary-sharded lm_head's
logits.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn as nn

import pagoda

from ..config import ModelConfig
from ..parallel import TPGroup, shard_tensor, vocab_shard, vocab_shard_rows
from ...ops._dispatch import env_switch, pdl_default
from ...ops.matmul import small_m_projections, small_m_split


def defer_norms_default() -> bool:
    """Whether one-token steps defer the layers' RMSNorms into the projections and the activation
    (DecoderLayer.forward_one_token); PAGODA_DEFER_NORMS=1 / 0, default 1. Measured on H200s (session 18,
    `python -m pagoda.bench.engine --cases latency`, Llama-3.1-8B batch 1, ms per token): without PDL 4.570 ->
    4.470 and 4.693 -> 4.554 (two machines); with PDL (the default) 4.588 / 4.589 -> 4.532 / 4.530 interleaved on
    one machine, 4.41-4.43 -> 4.444 on the other (one run). Under PDL the norm kernels cost little (the small
    kernel after the cuBLAS down projection takes the launch the qkv projection would wait for), so what the
    deferral saves there is smaller and machine-dependent."""
    return env_switch("PAGODA_DEFER_NORMS", "1")


def fused_qkv_rope_default() -> bool:
    """Whether the one-token layers run their qkv projection, RoPE and K/V append as one kernel
    (ops.linear_rope_append; PAGODA_FUSED_QKV_ROPE=1 / 0, default 1: H200, session 19, `python -m
    pagoda.bench.engine --cases latency`, interleaved, batch 1: 4.447 / 4.449 ms per token against 4.488 / 4.495;
    the kernel 19.6 us against 22.2 for the small-M projection and rope_append, `python -m pagoda.bench.linear
    --fused`)."""
    return env_switch("PAGODA_FUSED_QKV_ROPE", "1")


def fused_gate_up_act_default() -> bool:
    """Whether the one-token layers run their gate / up projection and SwiGLU as one kernel
    (ops.linear_silu_and_mul at its own 2-stage configuration ops.matmul.FUSED_ACT_CONFIG), it and the down
    projection after it launched without PDL; PAGODA_FUSED_GATE_UP_ACT=1 / 0, default 1. Measured on H200s
    (`python -m pagoda.bench.engine --cases latency`, Llama-3.1-8B batch 1, interleaved, ms per token, session
    23; engine_h200_s23_latency.txt): at 3 stages, both launched plainly but the down projection as a PDL launch,
    4.352 / 4.348 -> 4.284 / 4.285 on one machine, 4.398 / 4.398 -> 4.340 / 4.342 on another; there the down
    projection launched plainly too 4.277 / 4.274, and at 2 stages 4.220 / 4.221. The fused kernel as a PDL
    launch: 4.472 / 4.423 (3 stages), 4.501 / 4.493 (4 stages, session 19's form, off then: +0.08)."""
    return env_switch("PAGODA_FUSED_GATE_UP_ACT", "1")


def defer_final_norm_default() -> bool:
    """Whether the final RMSNorm's weight is folded into the lm_head (an untied one) so that one-token decode
    graphs can leave the norm out: the lm_head reads the residual stream, greedy batches take the argmax of those
    logits (a positive factor per row changes no argmax) and the factor scales the logits only where they are
    upcast (engine/runner.py, sample_launch's logit_scale); PAGODA_DEFER_FINAL_NORM=1 / 0, default 1 (H200,
    session 21, batch 1 interleaved on one machine: 4.361 / 4.367 -> 4.354 / 4.358 ms per token; with the early
    inputs and the decode kernel's early page ids 4.354 / 4.351)."""
    return env_switch("PAGODA_DEFER_FINAL_NORM", "1")


def _project(layer: nn.Linear, x: torch.Tensor, small_m: bool, pdl: bool = False, split_k: int = 1) -> torch.Tensor:
    """layer(x); one token on the GPU through pagoda.ops.linear's small-M kernel when small_m (decode batch 1:
    the weight read once, no split-K launch pair; ops/matmul.py), as a programmatic dependent launch with pdl,
    K over split_k programs per tile (PAGODA_SMALL_M_SPLIT)."""
    if small_m and x.shape[0] == 1 and x.is_cuda:
        return pagoda.ops.linear(x, layer.weight, layer.bias, small_m=True, pdl=pdl, split_k=split_k)
    return layer(x)


class RMSNorm(nn.Module):
    weight_offset = 0.0  # the scale is weight + weight_offset (GemmaRMSNorm: 1 + w)

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.pdl = pdl_default()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with residual: residual += x and x <- norm(residual), in place (returns both)."""
        if residual is None:
            return pagoda.rmsnorm(x, self.weight, self.eps, enable_pdl=self.pdl)
        pagoda.fused_add_rmsnorm(x, residual, self.weight, self.eps, enable_pdl=self.pdl)
        return x, residual


def rope_cos_sin_cache(c: ModelConfig, max_positions: int, device) -> torch.Tensor:
    """[max_positions, head_dim] float32 = [cos | sin] of each position (vLLM's cache layout)."""
    llama31, scale = None, 1.0
    if c.rope_scaling is not None:
        s = c.rope_scaling
        if s["rope_type"] == "llama3":
            llama31 = dict(factor=float(s["factor"]), low_freq_factor=float(s.get("low_freq_factor", 1.0)),
                           high_freq_factor=float(s.get("high_freq_factor", 4.0)),
                           old_context_len=float(s.get("original_max_position_embeddings", 8192)))
        else:  # linear
            scale = float(s["factor"])
    inv = pagoda.ops.rope.rope_inv_freq(c.head_dim, c.rope_theta, scale, llama31, "cpu").double()
    ang = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cat([ang.cos(), ang.sin()], dim=-1).float().to(device)


class Attention(nn.Module):
    norm_class = RMSNorm  # (the per-head q / k norms' form, where the model has them)

    def __init__(self, c: ModelConfig, layer_id: int, tp: TPGroup | None = None):
        super().__init__()
        self.layer_id = layer_id
        self.tp = tp  # (c: the rank's share of the heads; o_proj's output a partial sum over the ranks)
        self.hq, self.hk, self.d = c.num_heads, c.num_kv_heads, c.head_dim
        self.qkv_proj = nn.Linear(c.hidden_size, (self.hq + 2 * self.hk) * self.d, bias=c.qkv_bias)
        self.o_proj = nn.Linear(self.hq * self.d, c.hidden_size, bias=False)
        if c.qk_norm:
            self.q_norm = self.norm_class(self.d, c.rms_norm_eps)
            self.k_norm = self.norm_class(self.d, c.rms_norm_eps)
        self.qk_norm = c.qk_norm
        small_m, split = small_m_projections(), small_m_split()
        self.small_m_qkv, self.small_m_o = "qkv" in small_m, "o" in small_m
        self.split_qkv, self.split_o = split.get("qkv", 1), split.get("o", 1)
        self.pdl = pdl_default()
        # (the model's RoPE: NeoX pairs over the whole head; no per-head q / k norm between projection and RoPE)
        self.fused_qkv_rope = fused_qkv_rope_default() and not c.qk_norm and self.d in (64, 128, 256)

    def forward(self, x, positions, cos_sin, ctx):
        t = x.shape[0]
        lora = getattr(ctx, "lora", None)  # (engine/lora.py's LoRABatch of a step with adapters)
        qkv = _project(self.qkv_proj, x, self.small_m_qkv, self.pdl, self.split_qkv)
        if lora is not None:
            lora.add(qkv, x, self.layer_id, "qkv")
        o = self.attend(qkv, cos_sin, ctx).view(t, self.hq * self.d)
        out = _project(self.o_proj, o, self.small_m_o, self.pdl, self.split_o)
        if lora is not None:
            out = lora.add(out, o, self.layer_id, "o")
        return out if self.tp is None else self.tp.all_reduce(out)

    def attend(self, qkv, cos_sin, ctx):
        """q / k / v of the projection ([tokens, (hq + 2 hk) d]) -> attention output [tokens, hq, d]."""
        t = qkv.shape[0]
        q, k, v = qkv.split([self.hq * self.d, self.hk * self.d, self.hk * self.d], dim=-1)
        # (RoPE at the step's positions is applied by the context, fused with the K/V append where it can, and so
        # are the per-head q / k norms of Qwen3 / Gemma 3)
        return ctx.attention(self.layer_id, q.view(t, self.hq, self.d), k.view(t, self.hk, self.d),
                             v.view(t, self.hk, self.d), rope=(cos_sin, True),
                             qk_norm=(self.q_norm, self.k_norm) if self.qk_norm else None)


class MLP(nn.Module):
    def __init__(self, c: ModelConfig, layer_id: int = 0, tp: TPGroup | None = None):
        super().__init__()
        self.layer_id = layer_id
        self.tp = tp  # (c: the rank's share of the columns; down_proj's output a partial sum over the ranks)
        self.gate_up_proj = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)
        small_m, split = small_m_projections(), small_m_split()
        self.small_m_gate_up, self.small_m_down = "gate_up" in small_m, "down" in small_m
        self.split_gate_up, self.split_down = split.get("gate_up", 1), split.get("down", 1)
        self.fused_gate_up_act = fused_gate_up_act_default()
        self.pdl = pdl_default()

    def forward(self, x, lora=None):
        """lora: the step's LoRABatch (engine/lora.py), whose deltas join gate / up before the activation and the
        down projection's output."""
        h = _project(self.gate_up_proj, x, self.small_m_gate_up, self.pdl, self.split_gate_up)
        if lora is not None:
            lora.add(h, x, self.layer_id, "gate_up")
        a = self.activation(h)
        y = _project(self.down_proj, a, self.small_m_down, self.pdl, self.split_down)
        if lora is not None:
            y = lora.add(y, a, self.layer_id, "down")
        return y if self.tp is None else self.tp.all_reduce(y)

    act = "silu"  # the gated activation: pagoda.{act}_and_mul, one token's pagoda.ops.linear_{act}_and_mul (SwiGLU)

    def activation(self, h: torch.Tensor) -> torch.Tensor:
        """act(gate) * up of the gate_up projection's [tokens, 2 * intermediate] output."""
        return getattr(pagoda, f"{self.act}_and_mul")(h, enable_pdl=self.pdl)

    def one_token_activation(self, r: torch.Tensor, eps: float) -> torch.Tensor:
        """One token's act(gate) * up of RMSNorm(r) (the norm's weight folded into gate_up_proj, its factor applied
        to the accumulators): gate / up and the activation as one kernel (fused_gate_up_act, after the o
        projection's end: as a PDL launch it was slower, +0.14..0.19 ms a step, session 23), or the projection and
        the activation with the factor."""
        if self.fused_gate_up_act:
            return getattr(pagoda.ops, f"linear_{self.act}_and_mul")(r, self.gate_up_proj.weight, rms_norm_eps=eps)
        gu = _project(self.gate_up_proj, r, self.small_m_gate_up, self.pdl, self.split_gate_up)
        return getattr(pagoda, f"{self.act}_and_mul")(gu, enable_pdl=self.pdl and self.small_m_gate_up, norm_input=r,
                                                      norm_eps=eps)


class DecoderLayer(nn.Module):
    attn_class = Attention
    mlp_class = MLP
    norm_class = RMSNorm

    def __init__(self, c: ModelConfig, layer_id: int, tp: TPGroup | None = None):
        super().__init__()
        self.self_attn = self.attn_class(c, layer_id, tp)
        self.mlp = self.mlp_class(c, layer_id, tp)
        self.input_layernorm = self.norm_class(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = self.norm_class(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, residual, positions, cos_sin, ctx):
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, positions, cos_sin, ctx)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x, getattr(ctx, "lora", None)), residual

    def forward_one_token(self, r, cos_sin, ctx) -> None:
        """The layer for one token with both norms deferred (the model's norm weights folded into qkv_proj and
        gate_up_proj: fold_norm_weights): r [1, hidden], the residual stream, is updated in place. The input
        norm's factor scales the qkv projection's accumulators (small-M kernel), the o projection adds its
        output into r in its epilogue, the post-attention norm's factor scales gate / up in the activation, and
        the down projection adds into r (cuBLAS with beta = 1, or the small-M kernel's epilogue): no norm
        launch and no residual add launch; RMSNorm(r) @ W.T = rsqrt(mean(r^2) + eps) * (r @ (W * w).T).
        Tensor-parallel: rank 0's o / down projections add the residual, the others' write their partial sums
        into r, and one in-place all-reduce of r after each makes the residual stream on every rank."""
        a, mlp = self.self_attn, self.mlp
        cuda = r.is_cuda
        tp = a.tp
        lead = tp is None or tp.rank == 0  # (the rank whose partial sums carry the residual)
        o = self.one_token_attention(r, cos_sin, ctx)
        pagoda.ops.linear(o.view(1, -1), a.o_proj.weight, small_m=cuda and a.small_m_o, pdl=a.pdl,
                          residual=r if lead else None, out=r, split_k=a.split_o)
        if tp is not None:
            tp.all_reduce(r)
        h = mlp.one_token_activation(r, self.post_attention_layernorm.eps)
        if cuda and mlp.small_m_down:
            pagoda.ops.linear(h, mlp.down_proj.weight, small_m=True, pdl=mlp.pdl and not mlp.fused_gate_up_act,
                              residual=r if lead else None, out=r, split_k=mlp.split_down)
        elif lead:
            r.addmm_(h, mlp.down_proj.weight.t())
        else:
            torch.mm(h, mlp.down_proj.weight.t(), out=r)
        if tp is not None:
            tp.all_reduce(r)

    def one_token_attention(self, r, cos_sin, ctx) -> torch.Tensor:
        """forward_one_token's attention block up to the o projection: the qkv projection of RMSNorm(r) (the input
        norm's factor in the projection's epilogue, its weight folded), RoPE and the K/V append, attention ->
        [1, hq, d]."""
        a, mlp = self.self_attn, self.mlp
        # (after a cuBLAS kernel the qkv projection and the activation launch without PDL: as PDL launches
        # they were slower, 4.535 -> 4.444 ms per token without, H200, session 18; after a Triton kernel, PDL)
        o = None
        if a.fused_qkv_rope:  # the projection, RoPE and the K/V append in one kernel (where ctx takes it)
            o = ctx.qkv_rope_attention(a.layer_id, r, a.qkv_proj.weight, a.qkv_proj.bias, self.input_layernorm.eps,
                                       cos_sin, a.hq, a.hk, a.d, pdl=a.pdl and mlp.small_m_down)
        if o is None:
            qkv = pagoda.ops.linear(r, a.qkv_proj.weight, a.qkv_proj.bias, small_m=r.is_cuda and a.small_m_qkv,
                                    pdl=a.pdl and mlp.small_m_down, rms_norm_eps=self.input_layernorm.eps,
                                    split_k=a.split_qkv)
            o = a.attend(qkv, cos_sin, ctx)
        return o


class LlamaForCausalLM(nn.Module):
    layer_class = DecoderLayer
    norm_class = RMSNorm
    dummy_norm = 1.0  # (load_format="dummy": the norm weights' value)

    def __init__(self, c: ModelConfig, tp: TPGroup | None = None, full_config: ModelConfig | None = None):
        """tp: this rank of a tensor-parallel group, c its share of the model (parallel.local_config) and
        full_config the whole model's (for sharding the checkpoint)."""
        super().__init__()
        self.config = c
        self.tp = tp
        self.full_config = full_config or c
        # (tensor-parallel: the rank's vocabulary rows, vLLM's VocabParallelEmbedding: embed() all-reduces the rows
        # each rank looked up)
        self.embed_tokens = nn.Embedding(c.vocab_size if tp is None else vocab_shard_rows(c.vocab_size, tp.size),
                                         c.hidden_size)
        self.layers = nn.ModuleList(self.layer_class(c, i, tp) for i in range(c.num_layers))
        self.norm = self.norm_class(c.hidden_size, c.rms_norm_eps)
        if tp is not None:  # (the rank's vocabulary rows, its own copy where the embeddings are tied)
            self.lm_head = nn.Linear(c.hidden_size, vocab_shard_rows(c.vocab_size, tp.size), bias=False)
        else:
            self.lm_head = None if c.tie_word_embeddings else nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.register_buffer("cos_sin", torch.empty(0), persistent=False)
        self.norms_folded = False  # fold_norm_weights
        self.kv_cache_scales: dict[int, dict[str, float]] = {}  # the checkpoint's per-layer KV-cache scales (load_weights)
        self.defer_norms = defer_norms_default()
        # (the final norm's weight folded into the lm_head: an untied one only, the embedding table is no place for it)
        self.fold_final_norm = defer_final_norm_default() and self.lm_head is not None
        # (on CUDA only where the qkv / o projections take the small-M kernel, whose epilogues do the norm's
        # factor and the residual add; elsewhere the torch forms would add launches)
        a0 = self.layers[0].self_attn if len(self.layers) else None
        self._defer_fits = a0 is not None and (self.embed_tokens.weight.device.type != "cuda"
                                               or (a0.small_m_qkv and a0.small_m_o))

    def init_rope(self, max_positions: int) -> None:
        self.cos_sin = rope_cos_sin_cache(self.config, max_positions, self.embed_tokens.weight.device)

    @property
    def final_norm_folded(self) -> bool:
        """Whether fold_norm_weights put the final norm's weight into the lm_head."""
        return self.norms_folded and self.fold_final_norm

    def defers_final_norm(self, num_tokens: int) -> bool:
        """Whether forward(final_norm=False) may leave the final RMSNorm out for a step of num_tokens tokens
        (one-token steps, with the norm's weight folded into the lm_head: defer_final_norm_default)."""
        return self.fold_final_norm and self._one_token_path(num_tokens)  # (the path needs the norms folded)

    def _one_token_path(self, num_tokens: int) -> bool:
        return num_tokens == 1 and self.norms_folded and self.defer_norms and self._defer_fits

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The tokens' embeddings [num_tokens, hidden]; tensor-parallel: each rank looks up the ids in its rows
        (zeros for the others') and an all-reduce sums them."""
        if self.tp is None:
            return self.embed_tokens(input_ids)
        rows = self.embed_tokens.weight.shape[0]
        local = input_ids - self.tp.rank * rows
        mine = (local >= 0) & (local < rows)
        x = self.embed_tokens(torch.where(mine, local, 0)) * mine[:, None].to(self.embed_tokens.weight.dtype)
        return self.tp.all_reduce(x)

    def final_norm_scale(self, hidden: torch.Tensor) -> torch.Tensor:
        """rsqrt(mean(hidden^2) + eps) per row, float32 [rows]: the factor the final RMSNorm (weight folded away)
        would have applied, for the logits of forward(final_norm=False)."""
        return torch.rsqrt(hidden.float().pow(2).mean(-1) + self.norm.eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx, final_norm: bool = True) -> torch.Tensor:
        """input_ids, positions: [num_tokens]. Returns the final hidden states [num_tokens, hidden];
        final_norm=False (where defers_final_norm(num_tokens)): the residual stream before the final RMSNorm,
        whose logits are the model's divided by final_norm_scale(hidden) per row."""
        if not final_norm and not self.defers_final_norm(input_ids.shape[0]):
            raise ValueError("final_norm=False needs a one-token step with the final norm folded into the lm_head "
                             "(defers_final_norm)")
        x = self.embed(input_ids)
        # (the one-token path has no LoRA deltas; a LoRA engine does not fold the norms, which keeps it off)
        if self._one_token_path(x.shape[0]) and getattr(ctx, "lora", None) is None:
            for i, layer in enumerate(self.layers):  # (x: the embedding's output, the residual stream, in place)
                layer.forward_one_token(x, self.layer_cos_sin(i), ctx)
            return self.norm(x) if final_norm else x
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, positions, self.layer_cos_sin(i), ctx)
        x, _ = self.norm(x, residual)
        return x

    def layer_cos_sin(self, layer: int) -> torch.Tensor:
        """The RoPE cache a layer rotates with (one for all here; Gemma 3's sliding layers have their own)."""
        return self.cos_sin

    @torch.no_grad()
    def fold_norm_weights(self) -> None:
        """Each layer's input / post-attention RMSNorm weight into the projection after it (qkv_proj, gate_up_proj
        columns times the weight, in fp32, rounded once); the norms keep weight 1. Then one-token steps defer the
        norms into the kernels around them (DecoderLayer.forward_one_token) and other steps run unit-weight norms
        before the same projections. With PAGODA_DEFER_FINAL_NORM=1 the final norm's weight goes into an untied
        lm_head too (forward(final_norm=False)). Called by the loader after the weights are in; once."""
        if self.norms_folded:
            raise RuntimeError("the norm weights are folded already")
        pairs = [pair for layer in self.layers for pair in ((layer.input_layernorm, layer.self_attn.qkv_proj),
                                                            (layer.post_attention_layernorm, layer.mlp.gate_up_proj))]
        if self.fold_final_norm:  # (PAGODA_DEFER_FINAL_NORM: the final norm's into the lm_head, the same way)
            pairs.append((self.norm, self.lm_head))
        for norm, proj in pairs:
            proj.weight.copy_((proj.weight.float() * norm.weight.float()[None, :]).to(proj.weight.dtype))
            norm.weight.fill_(1.0)
        self.norms_folded = True

    def compute_logits(self, hidden: torch.Tensor, upcast: bool = True) -> torch.Tensor:
        """The logits of hidden's rows, float32 (upcast=False: in the model's dtype, for a decode graph whose
        greedy sampling reads them as they are; engine/sampler.py's sample_launch upcasts where it needs to)."""
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = torch.nn.functional.linear(hidden, w)
        if self.tp is not None:  # (each rank's vocabulary rows side by side)
            logits = self.tp.gather_vocab(logits, self.config.vocab_size)
        return logits.float() if upcast else logits

    # -- weights ---------------------------------------------------------------------
    def load_weights(self, weights) -> None:
        """weights: iterable of (Hugging Face name, tensor) of the whole model; a tensor-parallel rank takes its
        shard of each (parallel.shard_tensor). Every parameter must be loaded once."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        c = self.config
        tp = self.tp
        qkv_offsets = {"q_proj": (0, c.num_heads * c.head_dim),
                       "k_proj": (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim),
                       "v_proj": ((c.num_heads + c.num_kv_heads) * c.head_dim, c.num_kv_heads * c.head_dim)}
        gate_up = {"gate_proj": (0, c.intermediate_size), "up_proj": (c.intermediate_size, c.intermediate_size)}
        self.kv_cache_scales = {}  # layer -> {"k": float, "v": float}: the checkpoint's KV-cache scales, if any
        for name, w in weights:
            if "rotary_emb" in name:
                continue
            if _load_kv_scale(self.kv_cache_scales, name, w, c.num_layers):
                continue
            if name == "lm_head.weight" and c.tie_word_embeddings:
                continue
            target, rows = _map_name(name, qkv_offsets, gate_up)
            if tp is not None:  # (the embedding table by vocabulary rows, as the lm_head)
                w = (vocab_shard(w, c.vocab_size, tp.rank, tp.size) if target == "embed_tokens.weight"
                     else shard_tensor(name, w, self.full_config, tp.rank, tp.size))
            if target not in params:
                raise ValueError(f"unexpected weight {name!r} in the checkpoint (no parameter {target!r})")
            p = params[target]
            dst = p.data if rows is None else p.data.narrow(0, rows[0], rows[1])
            if tuple(dst.shape) != tuple(w.shape):
                raise ValueError(f"weight {name!r} has shape {tuple(w.shape)}, the model expects {tuple(dst.shape)}")
            dst.copy_(w)
            loaded.add(target if rows is None else f"{target}[{rows[0]}]")
            if tp is not None and target == "embed_tokens.weight" and c.tie_word_embeddings:
                params["lm_head.weight"].data.copy_(dst)  # (a tied lm_head: its own copy of the rank's rows)
                loaded.add("lm_head.weight")
        expected = set()
        for n, p in params.items():
            if n.endswith("qkv_proj.weight") or n.endswith("qkv_proj.bias"):
                expected |= {f"{n}[{o}]" for o, _ in qkv_offsets.values()}
            elif n.endswith("gate_up_proj.weight"):
                expected |= {f"{n}[{o}]" for o, _ in gate_up.values()}
            else:
                expected.add(n)
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} weights, e.g. {missing[:4]}")
        if self.kv_cache_scales:  # (all layers' or none: a layer without would be served at scale 1 unseen)
            lacking = [f"layer {i} {kind}_scale" for i in range(c.num_layers) for kind in "kv"
                       if kind not in self.kv_cache_scales.get(i, {})]
            if lacking:
                raise ValueError(f"the checkpoint has KV-cache scales for some layers but not {lacking[:4]}")


# A checkpoint's per-tensor KV-cache scales (fp8 KV calibrated by llm-compressor / compressed-tensors, ModelOpt,
# Quark, AutoFP8; the names vLLM's maybe_remap_kv_scale_name reads): stored = K / k_scale, K = stored * k_scale.
# self_attn.{k,v}_scale, self_attn.attn.{k,v}_scale, self_attn.{k,v}_proj.{k,v}_scale,
# self_attn.{k,v}_proj.output_scale, and the older self_attn.kv_scale (one scale for both). q_scale / prob_scale (an
# fp8 query and fp8 probabilities, which pagoda's kernels do not take: they compute those in 16 / 32 bits) are read
# and left.
_KV_SCALE = re.compile(r"model\.layers\.(\d+)\.self_attn\.(?:attn\.)?(?:([kv])_proj\.)?"
                       r"(k_scale|v_scale|kv_scale|output_scale|q_scale|prob_scale)")


def _load_kv_scale(scales: dict, name: str, w: torch.Tensor, num_layers: int) -> bool:
    """Whether name is a KV-cache scale (or a q / prob scale, left); a KV one goes into scales[layer][kind]."""
    m = _KV_SCALE.fullmatch(name)
    if m is None:
        return False
    layer, proj, what = int(m.group(1)), m.group(2), m.group(3)
    if what in ("q_scale", "prob_scale"):
        return True
    if proj is not None and what in ("k_scale", "v_scale") and what[0] != proj:
        return False  # (k_proj.v_scale: not a name any format writes; "unexpected weight")
    if what == "output_scale" and proj is None:
        return False
    kinds = "kv" if what == "kv_scale" else proj if what == "output_scale" else what[0]
    if layer >= num_layers:
        raise ValueError(f"{name!r}: the model has {num_layers} layers")
    if w.numel() != 1:
        raise ValueError(f"{name!r} has shape {tuple(w.shape)}: pagoda takes one KV-cache scale a layer (per-tensor), "
                         f"not per head or channel")
    value = float(w.float().reshape(()).item())
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name!r} is {value}: a KV-cache scale must be finite and > 0")
    for kind in kinds:
        if kind in scales.setdefault(layer, {}) and scales[layer][kind] != value:
            raise ValueError(f"{name!r}: layer {layer}'s {kind}_scale given twice, {scales[layer][kind]} and {value}")
        scales[layer][kind] = value
    return True


def _map_name(name: str, qkv_offsets, gate_up):
    """Hugging Face name -> (our parameter name, (row offset, rows) or None)."""
    n = name.removeprefix("model.")
    for proj, rows in qkv_offsets.items():
        if f"self_attn.{proj}." in n:
            return n.replace(f"self_attn.{proj}.", "self_attn.qkv_proj."), rows
    for proj, rows in gate_up.items():
        if f"mlp.{proj}." in n:
            return n.replace(f"mlp.{proj}.", "mlp.gate_up_proj."), rows
    return n, None
