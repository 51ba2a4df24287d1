"""Model loading: a local Hugging Face folder (config.json, *.safetensors with or without the
sharded index, tokenizer files) or random weights from a config alone (``load_format="dummy"``,
vLLM's convention, for benchmarks of models that cannot be downloaded here).

Bundled: ``pagoda-demo`` (a 7M-parameter Llama trained on the Python standard library,
scripts/train_demo_model.py) and the configs of Llama-3.1-8B, Qwen2.5-7B, Qwen3-8B and Gemma-2-9B for
dummy-weight runs (``pagoda/models/configs``).
"""
from __future__ import annotations

import json
import os

import torch

from .config import ModelConfig
from .models.gemma2 import Gemma2ForCausalLM
from .models.llama import LlamaForCausalLM
from .parallel import TPGroup, local_config

PACKAGE_MODELS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "models")
DEMO_MODEL = os.path.join(PACKAGE_MODELS, "pagoda-demo")
DUMMY_CONFIGS = {name: os.path.join(PACKAGE_MODELS, "configs", name)
                 for name in ("Llama-3.1-8B", "Qwen2.5-7B", "Qwen3-8B", "Gemma-2-9B")}


def resolve_model_path(model: str | None) -> str:
    """A folder path, a bundled name (pagoda-demo, Llama-3.1-8B, ...), or None for the demo model."""
    if model is None or model == "pagoda-demo":
        return DEMO_MODEL
    if os.path.isdir(model):
        return model
    if model in DUMMY_CONFIGS:
        return DUMMY_CONFIGS[model]
    raise FileNotFoundError(f"model {model!r} is neither a local folder nor a bundled model "
                            f"(pagoda-demo, {', '.join(DUMMY_CONFIGS)})")


def safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are missing: {missing}")
        return [os.path.join(path, s) for s in shards]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path} (use load_format='dummy' for random weights)")
    return [os.path.join(path, f) for f in files]


def iter_safetensors(files: list[str], device):
    from safetensors import safe_open

    for fname in files:
        with safe_open(fname, framework="pt", device=str(device)) as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_model(path: str, config: ModelConfig, dtype: torch.dtype, device, load_format: str = "auto",
               seed: int = 0, fold_norms: bool = True, tp: TPGroup | None = None) -> LlamaForCausalLM:
    """The model with its weights; fold_norms: the RMSNorm weights folded into the projections after them
    (LlamaForCausalLM.fold_norm_weights; not for LoRA serving, whose A's read the normalized input); tp: this
    rank's shard of it (engine/parallel.py; the checkpoint read on the host, each tensor's shard copied over)."""
    if load_format not in ("auto", "safetensors", "dummy"):
        raise ValueError(f"load_format must be 'auto', 'safetensors' or 'dummy', got {load_format!r}")
    with torch.device(device):
        cls = Gemma2ForCausalLM if config.family in ("gemma2", "gemma3") else LlamaForCausalLM
        if tp is None:
            model = cls(config).to(dtype)
        else:
            model = cls(local_config(config, tp.size), tp, config).to(dtype)
    if load_format == "dummy":
        g = torch.Generator(device=device).manual_seed(seed + (0 if tp is None else tp.rank))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.fill_(model.dummy_norm)
                else:  # small uniform values keep activations finite through many layers
                    p.uniform_(-0.02, 0.02, generator=g)
    else:
        model.load_weights(iter_safetensors(safetensors_files(path), device if tp is None else "cpu"))
    if fold_norms:
        model.fold_norm_weights()
    return model.eval()


def load_tokenizer(path: str):
    """transformers.AutoTokenizer over the folder (chat template included)."""
    has = [f for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json") if os.path.isfile(os.path.join(path, f))]
    if not has:
        raise FileNotFoundError(f"no tokenizer files (tokenizer.json / tokenizer.model) in {path}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
