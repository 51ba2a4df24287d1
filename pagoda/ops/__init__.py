"""Serving ops next to attention: norms, activations, RoPE, paged-KV writes, sampling (FlashInfer names), a
linear layer with a small-M kernel for decode at batch 1, and the segment GEMM of multi-LoRA serving."""
from .activation import gelu_and_mul, gelu_tanh_and_mul, silu_and_mul, soft_cap
from .lora import SegmentGEMMWrapper, segment_gemm
from .matmul import linear, linear_gelu_tanh_and_mul, linear_rope_append, linear_silu_and_mul
from .norm import (fused_add_rmsnorm, fused_add_rmsnorm_quant, gemma_fused_add_rmsnorm, gemma_rmsnorm,
                   gemma_rmsnorm_add, layernorm, rmsnorm, rmsnorm_quant)
from .topk import top_k, top_k_page_table_transform, top_k_ragged_transform, topk
from .page import append_paged_kv_cache, append_paged_mla_kv_cache, get_batch_indices_positions, get_seq_lens
from .sampling import (chain_speculative_sampling, greedy_sample, min_p_sampling_from_probs, sampling_from_logits,
                       sampling_from_probs, softmax, top_k_mask_logits, top_k_renorm_probs,
                       top_k_sampling_from_probs, top_k_top_p_sampling_from_logits, top_k_top_p_sampling_from_probs,
                       top_p_renorm_probs, top_p_sampling_from_probs)
from .rope import (apply_llama31_rope, apply_llama31_rope_inplace, apply_llama31_rope_pos_ids,
                   apply_llama31_rope_pos_ids_inplace, apply_rope, apply_rope_inplace, apply_rope_pos_ids,
                   apply_rope_pos_ids_inplace, apply_rope_with_cos_sin_cache, apply_rope_with_cos_sin_cache_and_append,
                   apply_rope_with_cos_sin_cache_inplace, mla_rope_quantize_fp8, rope_quantize_fp8)

__all__ = ["apply_llama31_rope", "apply_llama31_rope_inplace", "apply_llama31_rope_pos_ids",
           "rope_quantize_fp8", "mla_rope_quantize_fp8",
           "apply_llama31_rope_pos_ids_inplace", "apply_rope", "apply_rope_inplace", "apply_rope_pos_ids",
           "apply_rope_pos_ids_inplace", "apply_rope_with_cos_sin_cache", "apply_rope_with_cos_sin_cache_and_append",
           "apply_rope_with_cos_sin_cache_inplace",
           "SegmentGEMMWrapper", "segment_gemm",
           "append_paged_kv_cache", "append_paged_mla_kv_cache", "get_seq_lens", "fused_add_rmsnorm", "gelu_and_mul", "gelu_tanh_and_mul",
           "gemma_fused_add_rmsnorm", "gemma_rmsnorm", "gemma_rmsnorm_add", "get_batch_indices_positions", "linear",
           "layernorm", "linear_gelu_tanh_and_mul", "linear_rope_append", "linear_silu_and_mul", "rmsnorm",
           "rmsnorm_quant", "fused_add_rmsnorm_quant",
           "silu_and_mul", "soft_cap",
           "chain_speculative_sampling", "greedy_sample", "min_p_sampling_from_probs", "sampling_from_logits",
           "sampling_from_probs", "softmax", "top_k_sampling_from_probs",
           "top_k_top_p_sampling_from_logits", "top_k_top_p_sampling_from_probs", "top_p_sampling_from_probs",
           "top_k_mask_logits", "top_k_renorm_probs", "top_p_renorm_probs",
           "top_k", "topk", "top_k_page_table_transform", "top_k_ragged_transform"]
