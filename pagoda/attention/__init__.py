"""The attention engine: formats -> plan -> kernels (DESIGN.md)."""
from .cascade import (BatchDecodeWithSharedPrefixPagedKVCacheWrapper, BatchPrefillWithSharedPrefixPagedKVCacheWrapper,
                      MultiLevelCascadeAttentionWrapper, cascade_levels_from_page_table, merge_state,
                      merge_state_in_place, merge_states)
from .decode import (BatchDecodeWithPagedKVCacheWrapper, CUDAGraphBatchDecodeWithPagedKVCacheWrapper, fast_decode_plan,
                     single_decode_with_kv_cache)
from .mla import BatchMLAPagedAttentionWrapper
from . import variants
from .variants import AttentionVariant, packbits, segment_packbits
from .sparse import BlockSparseAttentionWrapper, VariableBlockSparseAttentionWrapper
from .prefill import (BatchAttention, BatchAttentionWithAttentionSinkWrapper,
                      BatchPrefillWithPagedKVCacheWrapper, BatchPrefillWithRaggedKVCacheWrapper,
                      single_prefill_with_kv_cache, single_prefill_with_kv_cache_return_lse)
from .pod import BatchPODWithPagedKVCacheWrapper, PODWithPagedKVCacheWrapper

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
]
