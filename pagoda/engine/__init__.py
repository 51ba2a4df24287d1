"""Serving engine on pagoda's kernels: model loading, paged KV pool with a radix prefix cache,
continuous batching with chunked prefill and preemption, CUDA-graph decode, multi-LoRA serving, guided decoding,
offline LLM API."""
from .config import ModelConfig, SamplingParams
from .guided import GuidedDecodingParams
from .llm import LLM, CompletionOutput, EngineStats, LLMEngine, RequestOutput
from .lora import LoRARequest

__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput", "ModelConfig", "EngineStats",
           "LoRARequest", "GuidedDecodingParams"]
