"""Serving ops next to attention: norms, activations, paged-KV writes (FlashInfer names)."""
from .activation import gelu_and_mul, gelu_tanh_and_mul, silu_and_mul
from .norm import fused_add_rmsnorm, gemma_fused_add_rmsnorm, gemma_rmsnorm, rmsnorm
from .page import append_paged_kv_cache, get_batch_indices_positions

__all__ = ["append_paged_kv_cache", "fused_add_rmsnorm", "gelu_and_mul", "gelu_tanh_and_mul",
           "gemma_fused_add_rmsnorm", "gemma_rmsnorm", "get_batch_indices_positions", "rmsnorm", "silu_and_mul"]
