"""pagoda: an attention engine for LLM inference serving, in Python and Triton.

The public API follows FlashInfer's names, arguments and shapes, so a serving
framework can switch by changing an import.
"""
from . import triton_compat  # noqa: F401  (interpreter fixes, before any kernel runs)
from .attention import (BatchDecodeWithPagedKVCacheWrapper, BatchPrefillWithPagedKVCacheWrapper,
                        BatchPrefillWithRaggedKVCacheWrapper, MultiLevelCascadeAttentionWrapper,
                        cascade_levels_from_page_table, merge_state, merge_state_in_place, merge_states,
                        single_decode_with_kv_cache, single_prefill_with_kv_cache)
from .ops import (append_paged_kv_cache, fused_add_rmsnorm, gelu_and_mul, gelu_tanh_and_mul,
                  gemma_fused_add_rmsnorm, gemma_rmsnorm, get_batch_indices_positions, rmsnorm, silu_and_mul)

__version__ = "0.1.0"
__all__ = [
    "BatchDecodeWithPagedKVCacheWrapper", "BatchPrefillWithPagedKVCacheWrapper",
    "BatchPrefillWithRaggedKVCacheWrapper", "MultiLevelCascadeAttentionWrapper", "cascade_levels_from_page_table",
    "merge_state", "merge_state_in_place", "merge_states",
    "single_decode_with_kv_cache", "single_prefill_with_kv_cache",
    "append_paged_kv_cache", "fused_add_rmsnorm", "gelu_and_mul", "gelu_tanh_and_mul", "gemma_fused_add_rmsnorm",
    "gemma_rmsnorm", "get_batch_indices_positions", "rmsnorm", "silu_and_mul",
]
