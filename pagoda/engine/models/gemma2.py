"""Gemma 2 and Gemma 3's text model on pagoda's kernels (transformers' Gemma2ForCausalLM / Gemma3ForCausalLM; vLLM and
SGLang serve them so). Gemma 2:

- the embeddings scaled by sqrt(hidden_size) (rounded to the model's dtype, as transformers does);
- RMSNorms of the form x / rms(x) * (1 + w) (pagoda.gemma_rmsnorm), four a layer: before and after the attention,
  before and after the MLP, each block's output normalized before it joins the residual stream;
- a GeGLU MLP (gelu with the tanh approximation, pagoda.gelu_tanh_and_mul);
- attention with the logits scaled by query_pre_attn_scalar ** -0.5 and soft-capped (cap * tanh(x / cap),
  attn_logit_softcapping: the kernels' logits_soft_cap), every other layer (layer_types) over a sliding window of
  sliding_window tokens (the runner plans a windowed and a global attention each step and each layer takes its
  own: runner._LayerWindows), the others over the whole context;
- the output logits soft-capped too (final_logit_softcapping), tied to the embeddings.

Gemma 3 (Gemma3ForCausalLM): the same layers with per-head q / k norms of the (1 + w) form before RoPE, five
sliding layers to a global one (layer_types), no soft caps, and RoPE of two kinds: the global layers at rope_theta
with their scaling (linear, factor 8 in the 4B-27B models), the sliding ones at rope_local_base_freq unscaled (the
model keeps two cos / sin caches and gives each layer its own: layer_cos_sin).

The rest is the Llama family's (models/llama.py): fused q / k / v and gate / up projections, RoPE and the K / V
append fused in the attention context, tensor parallelism (the four norms replicated), LoRA on the same
projections, and the one-token decode path with the input and pre-feedforward norms folded into the projections
after them (Gemma2DecoderLayer.forward_one_token: seven launches a layer instead of eleven).
"""
from __future__ import annotations

import torch

import pagoda

from ..config import ModelConfig
from ..parallel import TPGroup
import dataclasses

from .llama import MLP, Attention, DecoderLayer, LlamaForCausalLM, RMSNorm, rope_cos_sin_cache


class GemmaRMSNorm(RMSNorm):
    """x / rms(x) * (1 + weight); with residual: residual += x and x <- the norm of residual, in place."""
    weight_offset = 1.0

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return pagoda.gemma_rmsnorm(x, self.weight, self.eps, enable_pdl=self.pdl)
        pagoda.gemma_fused_add_rmsnorm(x, residual, self.weight, self.eps, enable_pdl=self.pdl)
        return x, residual


class GeGLU(MLP):
    act = "gelu_tanh"


class GemmaAttention(Attention):
    norm_class = GemmaRMSNorm  # (Gemma 3's q / k norms)


class Gemma2DecoderLayer(DecoderLayer):
    attn_class = GemmaAttention
    mlp_class = GeGLU
    norm_class = GemmaRMSNorm

    def __init__(self, c: ModelConfig, layer_id: int, tp: TPGroup | None = None):
        super().__init__(c, layer_id, tp)
        self.pre_feedforward_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, residual, positions, cos_sin, ctx):
        """x: the last block's output (normalized by its post-norm), residual: the stream without it (None at the
        first layer, where x is the embedding): the stream is residual + x."""
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.post_attention_layernorm(self.self_attn(x, positions, cos_sin, ctx))
        x, residual = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x, getattr(ctx, "lora", None))), residual

    def forward_one_token(self, r, cos_sin, ctx) -> None:
        """One token, r [1, hidden] (the residual stream) updated in place, with the input and pre-feedforward norms
        deferred into the projections after them (their (1 + w) folded into qkv_proj and gate_up_proj:
        Gemma2ForCausalLM.fold_norm_weights) as in DecoderLayer.forward_one_token; the o and down projections'
        outputs join r through their post-norms, one launch each (pagoda.gemma_rmsnorm_add: r += norm(y)). Seven
        launches a layer (qkv + RoPE + append, attention, o, norm-add, gate / up + GeGLU, down, norm-add) where the
        per-token path takes eleven. Tensor-parallel: the o / down partial sums all-reduced, then the norm-add on
        every rank."""
        a, mlp = self.self_attn, self.mlp
        cuda = r.is_cuda
        o = self.one_token_attention(r, cos_sin, ctx)
        y = pagoda.ops.linear(o.view(1, -1), a.o_proj.weight, small_m=cuda and a.small_m_o, pdl=a.pdl,
                              split_k=a.split_o)
        if a.tp is not None:
            a.tp.all_reduce(y)
        norm = self.post_attention_layernorm
        pagoda.gemma_rmsnorm_add(y, r, norm.weight, norm.eps, enable_pdl=norm.pdl)
        h = mlp.one_token_activation(r, self.pre_feedforward_layernorm.eps)
        y = pagoda.ops.linear(h, mlp.down_proj.weight, small_m=cuda and mlp.small_m_down,
                              pdl=mlp.pdl and not mlp.fused_gate_up_act, split_k=mlp.split_down)
        if a.tp is not None:
            a.tp.all_reduce(y)
        norm = self.post_feedforward_layernorm
        pagoda.gemma_rmsnorm_add(y, r, norm.weight, norm.eps, enable_pdl=norm.pdl)


class Gemma2ForCausalLM(LlamaForCausalLM):
    layer_class = Gemma2DecoderLayer
    norm_class = GemmaRMSNorm
    dummy_norm = 0.0  # (load_format="dummy": a (1 + w) norm of weight 0 is the identity's scale)

    def __init__(self, c: ModelConfig, tp: TPGroup | None = None, full_config: ModelConfig | None = None):
        super().__init__(c, tp, full_config)
        self.fold_final_norm = False  # (the final norm stays: the lm_head is the embedding table, tied)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = super().embed(input_ids)
        return x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)

    @torch.no_grad()
    def fold_norm_weights(self) -> None:
        """Each layer's input and pre-feedforward norms' (1 + w) into the projection after it (qkv_proj,
        gate_up_proj columns times 1 + w in fp32, rounded once), those norms' w then 0 (a scale of 1): the one-token
        path defers them into the projections (Gemma2DecoderLayer.forward_one_token), other steps run them
        unweighted before the same projections. The post-norms and the final norm stay. Called by the loader after
        the weights are in; once."""
        if self.norms_folded:
            raise RuntimeError("the norm weights are folded already")
        for layer in self.layers:
            for norm, proj in ((layer.input_layernorm, layer.self_attn.qkv_proj),
                               (layer.pre_feedforward_layernorm, layer.mlp.gate_up_proj)):
                proj.weight.copy_((proj.weight.float() * (1.0 + norm.weight.float())[None, :]).to(proj.weight.dtype))
                norm.weight.zero_()
        self.norms_folded = True

    def compute_logits(self, hidden: torch.Tensor, upcast: bool = True) -> torch.Tensor:
        """The logits, soft-capped (final_logit_softcapping) in float32: always float32 (a capped logit near the
        cap in bf16 would be 0.125 apart from its neighbours), the cast and the cap in one launch
        (pagoda.ops.soft_cap)."""
        cap = self.config.final_soft_cap
        logits = super().compute_logits(hidden, upcast=cap is None)
        return logits if cap is None else pagoda.ops.soft_cap(logits, cap)

    def load_weights(self, weights) -> None:
        """LlamaForCausalLM.load_weights over the text model's names: a multimodal Gemma 3 checkpoint
        (Gemma3ForConditionalGeneration) keeps them under language_model.model. (transformers 4's layout) or
        model.language_model. (5's), beside the vision tower and projector, which are not read."""
        def text_weights():
            for name, w in weights:
                for prefix in ("language_model.model.", "model.language_model."):
                    if name.startswith(prefix):
                        name = "model." + name[len(prefix):]
                if name.startswith("language_model.lm_head."):
                    name = name[len("language_model."):]
                if name.split(".")[0] in ("vision_tower", "multi_modal_projector") or name.startswith(
                        ("model.vision_tower.", "model.multi_modal_projector.")):
                    continue
                yield name, w

        super().load_weights(text_weights())

    # -- Gemma 3: RoPE of its own for the sliding layers ----------------------------------------
    def init_rope(self, max_positions: int) -> None:
        super().init_rope(max_positions)
        c = self.config
        self.cos_sin_local = self.cos_sin
        if c.local_rope_theta is not None:  # (the sliding layers: their base, no scaling)
            local = dataclasses.replace(c, rope_theta=c.local_rope_theta, rope_scaling=None)
            self.cos_sin_local = rope_cos_sin_cache(local, max_positions, self.embed_tokens.weight.device)

    def layer_cos_sin(self, layer: int) -> torch.Tensor:
        sliding = self.config.sliding_layers
        return self.cos_sin_local if sliding is not None and sliding[layer] else self.cos_sin
