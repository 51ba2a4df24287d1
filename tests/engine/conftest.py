"""Tiny random Hugging Face models of each family, saved as local folders (CPU, float32)."""
import json

import pytest
import torch

FAMILIES = {
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama",
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=32),
    "llama-tied": dict(architectures=["LlamaForCausalLM"], model_type="llama", tie_word_embeddings=True),
    # (a window of 8 tokens on layers 0 and 2, shorter than most prompts; soft caps and a logits scale that bite)
    "gemma2": dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2", num_hidden_layers=3, head_dim=16,
                   sliding_window=8, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                   final_logit_softcapping=4.0, tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh"),
    # (a window of 8 on layers 0, 1, 3, 4; global layers 2 and 5 with linear RoPE scaling; q / k norms)
    "gemma3": dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", num_hidden_layers=6, head_dim=16,
                   sliding_window=8, sliding_window_pattern=3, query_pre_attn_scalar=24, tie_word_embeddings=True,
                   rope_scaling={"rope_type": "linear", "factor": 4.0}, rope_theta=1_000_000.0,
                   rope_local_base_freq=10_000.0),
}


def tiny_config(family: str) -> dict:
    c = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
             tie_word_embeddings=False, initializer_range=0.2, torch_dtype="float32", bos_token_id=1,
             eos_token_id=2)
    c.update(FAMILIES[family])
    return c


def build_hf_model(family: str, path, seed: int = 0, **config):
    """The tiny model of a family (config: tiny_config(family) to start from, else that), saved in path."""
    import transformers

    c = config or tiny_config(family)
    cfg_cls = transformers.AutoConfig.for_model(c["model_type"]).__class__
    cfg = cfg_cls(**{k: v for k, v in c.items() if k not in ("architectures", "model_type")})
    cfg.architectures = c["architectures"]
    if family in ("gemma2", "gemma3"):  # (the soft cap lives in transformers' eager attention)
        cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, c["architectures"][0])(cfg).eval()
    if family == "qwen2":  # make the q/k/v biases matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.2)
    if family in ("gemma2", "gemma3"):  # (its (1 + w) norms start at w = 0)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.uniform_(-0.5, 0.5)
    if family == "qwen3":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
                layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    model.save_pretrained(path, safe_serialization=True)
    with open(path / "config.json") as f:
        saved = json.load(f)
    assert saved["architectures"] == c["architectures"]
    return model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    out = {}
    for fam in FAMILIES:
        path = root / fam
        out[fam] = (path, build_hf_model(fam, path))
    return out
