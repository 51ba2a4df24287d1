"""Engine configuration: the model's shape (from a Hugging Face config.json) and sampling.

``ModelConfig.from_dict`` reads the families the engine serves: Llama (2, 3, 3.1 with
"llama3" RoPE scaling, 3.2), Mistral, Qwen2 / Qwen2.5 (q/k/v bias), Qwen3 (per-head q/k
RMSNorm), Gemma 2 (sliding-window and global layers in turn, logit soft caps, GeGLU,
(1 + w) RMSNorms around both blocks) and Gemma 3's text model (Gemma 2's layout, five sliding
layers to a global one, per-head q/k norms, a RoPE base of its own for the sliding layers).
Both spellings of RoPE settings are read: ``rope_theta`` + ``rope_scaling`` (transformers 4)
and ``rope_parameters`` (transformers 5; Gemma 3's by layer type).
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch

from .guided import GuidedDecodingParams

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Gemma3ForConditionalGeneration": "gemma3",  # (its text model: the vision tower's weights are not read)
}

# transformers' Gemma3TextConfig defaults: the Hub's 4B-27B configs give their text_config only where it differs
GEMMA3_TEXT_DEFAULTS = dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                            hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131_072,
                            rms_norm_eps=1e-6, query_pre_attn_scalar=256, sliding_window=4096,
                            sliding_window_pattern=6, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1)


@dataclasses.dataclass
class ModelConfig:
    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # {"rope_type": "llama3" | "linear", ...} or None
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    sliding_window: int | None
    dtype: torch.dtype
    bos_token_id: int | None
    eos_token_ids: list[int]
    raw: dict
    # which layers take sliding_window (None: all of them, where it is set); Gemma 2: every other one
    sliding_layers: tuple[bool, ...] | None = None
    attn_scale: float | None = None  # the logits' scale (None: head_dim ** -0.5); Gemma: query_pre_attn_scalar ** -0.5
    attn_soft_cap: float | None = None  # cap * tanh(logits / cap) on the attention logits (Gemma 2)
    final_soft_cap: float | None = None  # the same on the output logits (Gemma 2)
    local_rope_theta: float | None = None  # the sliding layers' RoPE base, unscaled (None: rope_theta); Gemma 3

    def layer_window_left(self, layer: int) -> int:
        """The attention window of a layer as window_left (a query at i sees i - window_left .. i; -1: all)."""
        if not self.sliding_window or (self.sliding_layers is not None and not self.sliding_layers[layer]):
            return -1
        return self.sliding_window - 1

    @property
    def uniform_window_left(self) -> int | None:
        """The one window_left of every layer, or None where the layers differ (Gemma 2)."""
        ws = {self.layer_window_left(i) for i in range(self.num_layers)}
        return ws.pop() if len(ws) == 1 else None

    @classmethod
    def from_dict(cls, c: dict, generation_config: dict | None = None) -> "ModelConfig":
        archs = c.get("architectures") or []
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            raise ValueError(f"unsupported model architecture {archs or c.get('model_type')!r}: pagoda serves "
                             f"{', '.join(ARCHITECTURES)}")
        family = ARCHITECTURES[arch]
        if family == "gemma3":  # (a multimodal checkpoint: its text_config, the top level's dtype / tied embeddings)
            top = {k: c[k] for k in ("torch_dtype", "dtype", "tie_word_embeddings", "eos_token_id") if k in c}
            text = c.get("text_config") if arch == "Gemma3ForConditionalGeneration" else c
            if not isinstance(text, dict):
                raise ValueError(f"{arch}: config.json lacks text_config")
            c = {**GEMMA3_TEXT_DEFAULTS, **text, **top}
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in c]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}")
        heads = c["num_attention_heads"]
        rope = dict(c.get("rope_parameters") or {})
        local_theta = None  # (Gemma 3: the sliding layers' RoPE base; rope: the global layers')
        if family == "gemma3":
            if "full_attention" in rope or "sliding_attention" in rope:  # (transformers 5: one entry a layer type)
                local, rope = dict(rope.get("sliding_attention") or {}), dict(rope.get("full_attention") or {})
            else:  # (transformers 4: rope_theta / rope_scaling for the global layers, rope_local_base_freq)
                local = {"rope_theta": c.get("rope_local_base_freq")}
            if local.get("rope_type", "default") != "default":
                raise ValueError(f"unsupported rope scaling {local.get('rope_type')!r} of the sliding layers")
            local_theta = float(local.get("rope_theta") or 10_000.0)
        theta = float(c.get("rope_theta") or rope.get("rope_theta") or (1_000_000.0 if family == "gemma3" else 10000.0))
        scaling = c.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind in (None, "default"):
                scaling = None
            elif kind not in ("llama3", "linear"):
                raise ValueError(f"unsupported rope scaling {kind!r} (pagoda supports 'llama3' and 'linear')")
            else:
                scaling = dict(scaling, rope_type=kind)
        eos = (generation_config or {}).get("eos_token_id", c.get("eos_token_id"))
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        gemma_family = family in ("gemma2", "gemma3")
        sliding = c.get("sliding_window") if c.get("use_sliding_window", family == "mistral" or gemma_family) else None
        gemma = {}
        if family == "gemma3":
            if c.get("use_bidirectional_attention"):
                raise ValueError("use_bidirectional_attention (an embedding model) is not served: pagoda's Gemma 3 is "
                                 "the causal language model")
            gemma["local_rope_theta"] = local_theta
        if gemma_family:
            act = c.get("hidden_activation") or c.get("hidden_act") or "gelu_pytorch_tanh"
            if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
                raise ValueError(f"unsupported Gemma activation {act!r} (pagoda: gelu_pytorch_tanh)")
            n = c["num_hidden_layers"]
            every = 2 if family == "gemma2" else int(c.get("sliding_window_pattern", 6))  # (a global layer each)
            types = c.get("layer_types") or ["full_attention" if (i + 1) % every == 0 else "sliding_attention"
                                             for i in range(n)]
            if len(types) != n or not set(types) <= {"sliding_attention", "full_attention"}:
                raise ValueError(f"layer_types must be {n} of sliding_attention / full_attention, got {types!r}")
            caps = [c.get("attn_logit_softcapping"), c.get("final_logit_softcapping")]
            gemma.update(sliding_layers=tuple(t == "sliding_attention" for t in types),
                         attn_scale=float(c.get("query_pre_attn_scalar", 256)) ** -0.5,
                         attn_soft_cap=float(caps[0]) if caps[0] else None,
                         final_soft_cap=float(caps[1]) if caps[1] else None)
        return cls(
            architecture=arch, family=family, vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"], num_layers=c["num_hidden_layers"], num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            max_position_embeddings=c.get("max_position_embeddings", 4096),
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=bool(c.get("attention_bias", family == "qwen2")), qk_norm=family in ("qwen3", "gemma3"),
            sliding_window=sliding, dtype=_dtype(c.get("torch_dtype") or c.get("dtype") or "bfloat16"),
            bos_token_id=c.get("bos_token_id"), eos_token_ids=eos_ids, raw=c, **gemma,
        )

    @classmethod
    def from_path(cls, path: str) -> "ModelConfig":
        cfg = os.path.join(path, "config.json")
        if not os.path.isfile(cfg):
            raise FileNotFoundError(f"{cfg} not found: a model is a local Hugging Face folder with config.json")
        with open(cfg) as f:
            c = json.load(f)
        gen = None
        gpath = os.path.join(path, "generation_config.json")
        if os.path.isfile(gpath):
            with open(gpath) as f:
                gen = json.load(f)
        return cls.from_dict(c, gen)


def _dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    table = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "half": torch.float16,
             "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "float": torch.float32}
    if name not in table:
        raise ValueError(f"unsupported dtype {name!r}")
    return table[name]


@dataclasses.dataclass
class SamplingParams:
    """vLLM's sampling parameters. temperature=0 is greedy; the same seed gives the same output."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    # vLLM's / OpenAI's logit processors (after the positional fields above, which follow the serving issue's order):
    # presence / frequency penalties subtract p per token already generated / f per time it was generated,
    # repetition_penalty divides (positive logits) or multiplies (negative) the logit of every token in the prompt
    # or the output (as transformers' RepetitionPenaltyLogitsProcessor), logit_bias adds to given token ids
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    # vLLM's prompt_logprobs: the log-probability of each prompt token after the ones before it (None for the
    # first), with the top prompt_logprobs tokens at that position (RequestOutput.prompt_logprobs); a request that
    # asks for them is not served from the prefix cache for the positions still to report
    prompt_logprobs: int | None = None
    # vLLM's min_tokens: until the output has that many tokens, EOS (unless ignore_eos) and stop_token_ids are not
    # sampled and stop strings do not end the request
    min_tokens: int = 0
    # vLLM's: the matched stop string kept at the end of the text; only these token ids sampled (None: all); only
    # the prompt's last truncate_prompt_tokens tokens used (None: all of it)
    include_stop_str_in_output: bool = False
    allowed_token_ids: list[int] | None = None
    truncate_prompt_tokens: int | None = None
    # vLLM's bad_words: the last token of each word's tokens (with and without a leading space) is not sampled
    # where it would complete the word (a word of one token: never); needs the tokenizer
    bad_words: list[str] | None = None
    # vLLM's per-request logits processors: fn(output_token_ids, logits) or fn(prompt_token_ids, output_token_ids,
    # logits) -> logits, on the request's float32 row of the vocabulary before penalties and sampling, each step
    # (host code on a device row: for research, not for speed; such a request is not launched ahead)
    logits_processors: list | None = None
    # vLLM's guided (structured) decoding: a GuidedDecodingParams (engine/guided.py: a JSON schema, any JSON object,
    # a regex, a choice or an EBNF grammar) that each sampled token must continue; needs the tokenizer and xgrammar
    guided_decoding: GuidedDecodingParams | None = None
    # whether anything above changes the logits before sampling (penalties, logit bias, min_tokens, allowed ids,
    # bad words, logits processors: sampler._penalized; such requests are not launched ahead, since their changes
    # read the output so far): found once here, since the sampler and the engine's step ask it of every running
    # request each step
    penalized: bool = dataclasses.field(init=False, repr=False, compare=False, default=False)

    def __post_init__(self):
        for name in ("stop", "stop_token_ids"):  # None, a string (stop) or a list / tuple of them
            v = getattr(self, name)
            if not (v is None or isinstance(v, (list, tuple)) or (name == "stop" and isinstance(v, str))):
                raise ValueError(f"SamplingParams.{name} must be "
                                 f"{'a string or ' if name == 'stop' else ''}a list, got {v!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        checks = [
            ("n", isinstance(self.n, int) and self.n >= 1, "an integer >= 1"),
            ("temperature", _num(self.temperature) and self.temperature >= 0, "a number >= 0"),
            ("top_p", _num(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", isinstance(self.top_k, int) and (self.top_k == -1 or self.top_k >= 1), "-1 or >= 1"),
            ("min_p", _num(self.min_p) and 0 <= self.min_p <= 1, "in [0, 1]"),
            ("max_tokens", self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
             "an integer >= 1"),
            ("seed", self.seed is None or isinstance(self.seed, int), "an integer"),
            ("logprobs", self.logprobs is None or (isinstance(self.logprobs, int)
                                                   and not isinstance(self.logprobs, bool)
                                                   and 0 <= self.logprobs <= 20), "an integer in 0..20"),
            ("prompt_logprobs", self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int)
                                                                 and not isinstance(self.prompt_logprobs, bool)
                                                                 and 0 <= self.prompt_logprobs <= 20),
             "an integer in 0..20"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "non-empty strings"),
            ("stop_token_ids", all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                   for t in self.stop_token_ids), "integers >= 0"),
            ("ignore_eos", isinstance(self.ignore_eos, bool), "a bool"),
            ("presence_penalty", _num(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "in [-2, 2]"),
            ("frequency_penalty", _num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
            ("repetition_penalty", _num(self.repetition_penalty) and 0 < self.repetition_penalty < float("inf"),
             "a number > 0"),
            ("logit_bias", self.logit_bias is None or (isinstance(self.logit_bias, dict) and all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 and _num(b) and -100 <= b <= 100
                for t, b in self.logit_bias.items())), "a dict of token ids >= 0 to numbers in [-100, 100]"),
            ("skip_special_tokens", isinstance(self.skip_special_tokens, bool), "a bool"),
            ("include_stop_str_in_output", isinstance(self.include_stop_str_in_output, bool), "a bool"),
            ("allowed_token_ids", self.allowed_token_ids is None or (
                isinstance(self.allowed_token_ids, (list, tuple)) and len(self.allowed_token_ids) > 0
                and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.allowed_token_ids)),
             "a non-empty list of token ids >= 0"),
            ("bad_words", self.bad_words is None or (isinstance(self.bad_words, (list, tuple)) and all(
                isinstance(w, str) and w.strip() for w in self.bad_words)), "a list of non-blank strings"),
            ("logits_processors", self.logits_processors is None or (
                isinstance(self.logits_processors, (list, tuple)) and all(callable(f) for f in self.logits_processors)),
             "a list of callables"),
            ("guided_decoding", self.guided_decoding is None or isinstance(self.guided_decoding, GuidedDecodingParams),
             "a GuidedDecodingParams"),
            ("truncate_prompt_tokens", self.truncate_prompt_tokens is None or (
                isinstance(self.truncate_prompt_tokens, int) and not isinstance(self.truncate_prompt_tokens, bool)
                and self.truncate_prompt_tokens >= 1), "an integer >= 1"),
            ("min_tokens", isinstance(self.min_tokens, int) and not isinstance(self.min_tokens, bool)
             and self.min_tokens >= 0 and (self.max_tokens is None or not isinstance(self.max_tokens, int)
                                           or self.min_tokens <= self.max_tokens),
             "an integer in 0..max_tokens"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name} must be {what}, got {getattr(self, name)!r}")
        self.penalized = bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                              or self.logit_bias or self.min_tokens or self.allowed_token_ids or self.bad_words
                              or self.logits_processors or self.guided_decoding)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x
