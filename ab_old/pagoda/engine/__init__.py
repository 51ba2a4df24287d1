"""Serving engine on pagoda's kernels: model loading, paged KV pool with a radix prefix cache,
continuous batching with chunked prefill and preemption, CUDA-graph decode, offline LLM API."""
from .config import ModelConfig, SamplingParams
from .llm import LLM, CompletionOutput, EngineStats, LLMEngine, RequestOutput

__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput", "ModelConfig", "EngineStats"]
