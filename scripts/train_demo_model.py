"""Train pagoda's bundled demo model: a ~7M-parameter Llama on the Python standard library.

The corpus is the source of the running interpreter's standard library (every machine has
it), minus site-packages. Steps:

1. a byte-level BPE tokenizer (``tokenizers``) with a small chat vocabulary,
2. documents: every source file, plus "write a function" chat turns made from functions
   that carry a docstring (so ``LLM.chat`` answers with code),
3. a Llama (GQA, RoPE, SwiGLU, RMSNorm, tied embeddings) trained in plain PyTorch,
4. a Hugging Face folder (config.json, model.safetensors, tokenizer.json, tokenizer_config.json
   with a chat template, generation_config.json) plus train_log.json with the loss curve;
   when ``transformers`` is importable the folder is loaded back with LlamaForCausalLM and its
   logits are checked against the trained module.

Run on the device (about two minutes on an H100)::

    python scripts/train_demo_model.py --out $OUT/demo

and on the CPU, as a smoke test of the whole path::

    python scripts/train_demo_model.py --out /tmp/demo --steps 20 --batch 4 --files 60
"""

from __future__ import annotations

import argparse
import ast
import glob
import hashlib
import json
import math
import os
import sysconfig
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

SPECIAL = ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def stdlib_files(limit: int | None) -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
                   if "site-packages" not in f and "dist-packages" not in f)
    return files[:limit] if limit else files


def is_validation(path: str) -> bool:
    # 2% of the files, chosen by a hash of the path relative to the stdlib root: stable across runs.
    rel = os.path.relpath(path, sysconfig.get_paths()["stdlib"])
    return hashlib.sha1(rel.encode()).digest()[0] < 6


def read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (UnicodeDecodeError, OSError):
        return None


def chat_turns(source: str) -> list[str]:
    """'Write a function' exchanges from the documented functions of one file."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    turns = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        code = ast.get_source_segment(source, node)
        if not doc or not code or len(code) > 1500 or node.col_offset:
            continue
        ask = doc.strip().splitlines()[0]
        turns.append(f"<|user|>\nWrite a Python function: {ask}<|end|>\n<|assistant|>\n{code}<|end|>\n")
    return turns


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", 1)])
    return tok


# ---------------------------------------------------------------------------------------------
# The model: Hugging Face Llama semantics (rotate-half RoPE, RMSNorm in fp32, SwiGLU, tied head)
# ---------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        h, d = c["hidden_size"], c["head_dim"]
        self.nh, self.nkv, self.d = c["num_attention_heads"], c["num_key_value_heads"], d
        self.q_proj = nn.Linear(h, self.nh * d, bias=False)
        self.k_proj = nn.Linear(h, self.nkv * d, bias=False)
        self.v_proj = nn.Linear(h, self.nkv * d, bias=False)
        self.o_proj = nn.Linear(self.nh * d, h, bias=False)
        self.gate_proj = nn.Linear(h, c["intermediate_size"], bias=False)
        self.up_proj = nn.Linear(h, c["intermediate_size"], bias=False)
        self.down_proj = nn.Linear(c["intermediate_size"], h, bias=False)
        self.input_layernorm = RMSNorm(h, c["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(h, c["rms_norm_eps"])

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        y = self.input_layernorm(x)
        q = self.q_proj(y).view(b, t, self.nh, self.d).transpose(1, 2)
        k = self.k_proj(y).view(b, t, self.nkv, self.d).transpose(1, 2)
        v = self.v_proj(y).view(b, t, self.nkv, self.d).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, t, -1))
        y = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Llama(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList(Block(c) for _ in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, c["head_dim"], 2).float() / c["head_dim"]))
        self.register_buffer("inv_freq", inv, persistent=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * c["num_hidden_layers"]) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, ids):
        t = ids.shape[1]
        freqs = torch.outer(torch.arange(t, device=ids.device, dtype=torch.float32), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return F.linear(self.norm(x), self.embed_tokens.weight)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        out = {"model.embed_tokens.weight": self.embed_tokens.weight, "model.norm.weight": self.norm.weight}
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                out[p + f"self_attn.{n}.weight"] = getattr(layer, n).weight
            for n in ("gate_proj", "up_proj", "down_proj"):
                out[p + f"mlp.{n}.weight"] = getattr(layer, n).weight
            out[p + "input_layernorm.weight"] = layer.input_layernorm.weight
            out[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
        return {k: v.detach().to(torch.bfloat16).contiguous().cpu() for k, v in out.items()}


def batches(data: np.ndarray, batch: int, seq: int, gen: torch.Generator, device):
    starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen).numpy()
    idx = starts[:, None] + np.arange(seq + 1)[None]
    x = torch.from_numpy(data[idx].astype(np.int64)).to(device, non_blocking=True)
    return x[:, :-1], x[:, 1:]


@torch.no_grad()
def evaluate(model, data, seq, device, max_windows=64):
    n = min(max_windows, (len(data) - 1) // seq)
    idx = np.arange(n)[:, None] * seq + np.arange(seq + 1)[None]
    x = torch.from_numpy(data[idx].astype(np.int64)).to(device)
    losses = []
    for i in range(0, n, 16):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x[i:i + 16, :-1])
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), x[i:i + 16, 1:].flatten(), reduction="sum"))
    return (torch.stack(losses).sum() / (n * seq)).item()


@torch.no_grad()
def sample(model, tok, prompt, n_tokens, device, temperature=0.8, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([tok.encode(prompt).ids], device=device)
    for _ in range(n_tokens):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(ids[:, -model.c["max_position_embeddings"]:])[:, -1].float()
        nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen)
        ids = torch.cat([ids, nxt], dim=1)
        if nxt.item() == 2:
            break
    return tok.decode(ids[0].tolist(), skip_special_tokens=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--files", type=int, default=None, help="use only the first N files (smoke tests)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-seconds", type=float, default=None, help="stop training early after this long")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()

    train_docs, val_docs = [], []
    files = stdlib_files(args.files)
    for f in files:
        src = read(f)
        if src is None:
            continue
        docs = ["<|bos|>" + src + "<|eos|>"] + ["<|bos|>" + t + "<|eos|>" for t in chat_turns(src)]
        (val_docs if is_validation(f) else train_docs).extend(docs)
    print(f"corpus: {len(files)} files, {len(train_docs)} train / {len(val_docs)} val documents, "
          f"{sum(map(len, train_docs)) / 1e6:.1f} MB train text")

    tok = train_tokenizer([d[7:-7] for d in train_docs], args.vocab)
    assert [tok.token_to_id(s) for s in SPECIAL] == list(range(len(SPECIAL)))

    def encode(docs):
        enc = tok.encode_batch(docs, add_special_tokens=False)
        return np.concatenate([np.asarray(e.ids, dtype=np.uint16) for e in enc])

    train, val = encode(train_docs), encode(val_docs or train_docs[:1])
    print(f"tokenizer: vocab {tok.get_vocab_size()}, {train.size / 1e6:.2f}M train / {val.size / 1e6:.2f}M val tokens "
          f"({sum(map(len, train_docs)) / train.size:.2f} chars/token), {time.time() - t0:.0f}s")

    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": tok.get_vocab_size(), "hidden_size": 256, "intermediate_size": 768,
        "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
        "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "bfloat16",
        "initializer_range": 0.02,
    }
    model = Llama(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters on {device}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda")
    warmup = max(1, args.steps // 20)

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    gen = torch.Generator().manual_seed(args.seed)
    log = {"command": "python scripts/train_demo_model.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items() if k != "out" and v is not None),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "params": n_params, "train_tokens": int(train.size), "val_tokens": int(val.size),
        "tokens_per_step": args.batch * args.seq, "curve": []}
    eval_every = max(1, args.steps // 16)
    t_train = time.time()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x, y = batches(train, args.batch, args.seq, gen, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        out_of_time = args.max_seconds is not None and time.time() - t_train > args.max_seconds
        if (step + 1) % eval_every == 0 or step == args.steps - 1 or out_of_time:
            model.eval()
            v = evaluate(model, val, args.seq, device)
            model.train()
            row = {"step": step + 1, "train_loss": round(loss.item(), 4), "val_loss": round(v, 4),
                   "seconds": round(time.time() - t_train, 1)}
            log["curve"].append(row)
            print(row, flush=True)
        if out_of_time:
            print(f"stopped at step {step + 1}: --max-seconds {args.max_seconds}")
            log["stopped_early_at"] = step + 1
            break
    log["train_seconds"] = round(time.time() - t_train, 1)

    # Save as a Hugging Face folder.
    from safetensors.torch import save_file

    model.eval()
    with torch.no_grad():  # the folder holds bf16 weights: make the module hold exactly those
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    save_file(model.hf_state_dict(), os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(args.out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": [2, 6], "pad_token_id": 0}, f, indent=2)
    tok.save(os.path.join(args.out, "tokenizer.json"))
    with open(os.path.join(args.out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>",
                   "eos_token": "<|eos|>", "pad_token": "<|pad|>",
                   "additional_special_tokens": SPECIAL[3:], "model_max_length": 1024,
                   "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE}, f, indent=2)

    prompts = ["def fibonacci(n):", "import os\n\n\ndef ", "class Stack:\n"]
    log["samples"] = {p: sample(model, tok, p, 96, device, seed=i) for i, p in enumerate(prompts)}
    for p, s in log["samples"].items():
        print(f"--- sample ({p!r}) ---\n{s}")

    try:
        from transformers import AutoTokenizer, LlamaForCausalLM
    except ImportError:
        print("transformers not importable: skipped the load-back check")
    else:
        hf = LlamaForCausalLM.from_pretrained(args.out, torch_dtype=torch.float32).to(device).eval()
        hf_tok = AutoTokenizer.from_pretrained(args.out)
        ids = hf_tok("def fibonacci(n):", return_tensors="pt").input_ids.to(device)
        assert ids[0].tolist() == tok.encode("def fibonacci(n):").ids, "tokenizer round trip"
        ref = model.float()(ids)
        got = hf(ids).logits
        err = (got - ref).abs().max().item()
        print(f"transformers load-back: max |logit diff| = {err:.2e}")
        log["hf_max_logit_diff"] = err
        assert err < 1e-2, "the saved folder does not reproduce the trained model"
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump(log, f, indent=1)
    print(f"done in {time.time() - t0:.0f}s -> {args.out}")


if __name__ == "__main__":
    main()
