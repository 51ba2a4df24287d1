"""pagoda: an attention engine for LLM inference serving, in Python and Triton.

The public API follows FlashInfer's names, arguments and shapes, so a serving
framework can switch by changing an import.
"""
from . import triton_compat  # noqa: F401  (interpreter fixes, before any kernel runs)
from .attention import (AttentionVariant, BatchAttention, BatchAttentionWithAttentionSinkWrapper,
                        BatchDecodeWithPagedKVCacheWrapper, BatchDecodeWithSharedPrefixPagedKVCacheWrapper,
                        BatchPrefillWithSharedPrefixPagedKVCacheWrapper, CUDAGraphBatchDecodeWithPagedKVCacheWrapper,
                        fast_decode_plan,
                        BatchMLAPagedAttentionWrapper,
                        BlockSparseAttentionWrapper, VariableBlockSparseAttentionWrapper,
                        BatchPrefillWithPagedKVCacheWrapper,
                        BatchPrefillWithRaggedKVCacheWrapper, MultiLevelCascadeAttentionWrapper,
                        cascade_levels_from_page_table, merge_state, merge_state_in_place, merge_states,
                        packbits, segment_packbits, single_decode_with_kv_cache, single_prefill_with_kv_cache,
                        single_prefill_with_kv_cache_return_lse, PODWithPagedKVCacheWrapper,
                        BatchPODWithPagedKVCacheWrapper, variants)
from .ops import *  # noqa: F401,F403  (FlashInfer exposes its ops at the top level too)
from .ops import __all__ as _ops_all
from .engine import (LLM, CompletionOutput, GuidedDecodingParams, LLMEngine, LoRARequest, RequestOutput,
                     SamplingParams)

__version__ = "0.1.0"
__all__ = [
    "BatchDecodeWithPagedKVCacheWrapper", "BatchPrefillWithPagedKVCacheWrapper", "BatchAttentionWithAttentionSinkWrapper",
    "BatchAttention",
    "BatchPrefillWithRaggedKVCacheWrapper", "MultiLevelCascadeAttentionWrapper", "cascade_levels_from_page_table",
    "BatchMLAPagedAttentionWrapper", "AttentionVariant", "variants", "packbits", "segment_packbits",
    "BlockSparseAttentionWrapper", "VariableBlockSparseAttentionWrapper",
    "merge_state", "merge_state_in_place", "merge_states",
    "single_decode_with_kv_cache", "single_prefill_with_kv_cache", "single_prefill_with_kv_cache_return_lse",
    "PODWithPagedKVCacheWrapper", "BatchPODWithPagedKVCacheWrapper",
    "BatchDecodeWithSharedPrefixPagedKVCacheWrapper", "BatchPrefillWithSharedPrefixPagedKVCacheWrapper",
    "CUDAGraphBatchDecodeWithPagedKVCacheWrapper", "fast_decode_plan",
    *_ops_all,
    "LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput", "LoRARequest", "GuidedDecodingParams",
]
