"""Multi-LoRA serving (vLLM's ``enable_lora``): requests name a PEFT adapter with ``LoRARequest``, and one step runs
requests of several adapters (and of none) together.

    llm = pagoda.LLM(model, enable_lora=True, max_loras=4, max_lora_rank=16)
    llm.generate(prompts, params, lora_request=pagoda.LoRARequest("sql", 1, "/path/to/peft-folder"))

An adapter is a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``) of LoRA weights on
the projections ``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj``: y = W x + scaling * B (A x), scaling =
lora_alpha / r (lora_alpha / sqrt(r) with use_rslora). ``LoRAManager`` keeps ``max_loras`` adapters on the device in
slots of stacked weights (slot 0 is all zeros: the rows of requests without an adapter), loads an adapter into the
least recently used slot that the step does not use, and keeps up to ``max_cpu_loras`` parsed adapters on the host
(more while requests hold them: a step never reads an adapter's folder again).

A step's LoRA deltas (``LoRABatch.add``, ops.lora.lora_delta) are two launches per projection: a split-K shrink (x @
A^T, to the rank) and an expand (@ B^T, scaling folded into B when the slot is written) that adds into the projection's
output in place, over the step's rows grouped by slot in tiles of one adapter (ops.lora.lora_tiles, built on the host
with the step's inputs; rows without an adapter get no tile). The engine's fused q/k/v and gate/up projections take
one shrink over the stacked A's of their parts and one expand through a block-diagonal B, the stacked rank padded to
a power of two. The tables are device tensors, so the decode CUDA graphs capture the deltas and replay them for any
mix of adapters.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re

import numpy as np
import torch

from ..ops.lora import lora_delta, lora_max_tiles, lora_tiles
from .config import ModelConfig
from .parallel import shard_lora

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# the engine's fused projections and the PEFT modules they hold, in the fused weight's row order
FUSED = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
         "down": ("down_proj",)}
_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\."
                  r"lora_([AB])(?:\.default)?\.weight$")


@dataclasses.dataclass(frozen=True)
class LoRARequest:
    """vLLM's LoRARequest: a name (the server's model name for it), an id >= 1 that identifies the adapter in the
    engine (its device slot, its prefix-cache namespace), and the PEFT folder it loads from."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self):
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"lora_name must be a non-empty string, got {self.lora_name!r}")
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be an integer >= 1, got {self.lora_int_id!r}")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError(f"lora_path must be a non-empty string (a PEFT adapter folder), got {self.lora_path!r}")


def module_shapes(c: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each LoRA target module of the model."""
    h, q, kv, i = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, i),
            "up_proj": (h, i), "down_proj": (i, h)}


def peft_key(layer: int, module: str, ab: str) -> str:
    """PEFT's name of layer `layer`'s LoRA `ab` ("A" / "B") weight on `module` (what load_adapter reads)."""
    part = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return f"base_model.model.model.layers.{layer}.{part}.{module}.lora_{ab}.weight"


def save_adapter(folder, weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]], lora_alpha: float) -> str:
    """Write a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) that load_adapter reads back:
    weights maps (layer, module) to (A [r, in], B [out, r]), one rank r for all. Returns the folder's path."""
    from safetensors.torch import save_file

    ranks = {a.shape[0] for a, _ in weights.values()}
    if len(ranks) != 1:
        raise ValueError(f"the adapter's A matrices must share one rank, got {sorted(ranks)}")
    os.makedirs(folder, exist_ok=True)
    save_file({peft_key(layer, m, ab): t.contiguous() for (layer, m), pair in weights.items()
               for ab, t in zip("AB", pair)}, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": ranks.pop(), "lora_alpha": lora_alpha,
                   "target_modules": sorted({m for _, m in weights})}, f)
    return str(folder)


def random_lora_weights(config: ModelConfig, rank: int, b_std: float, generator: torch.Generator, modules=None,
                        dtype: torch.dtype = torch.float32) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """Random LoRA weights for benchmarks and tests (save_adapter's input): on every layer's `modules` (default all
    seven), A ~ N(0, 1 / in_features) and B ~ N(0, b_std^2), drawn from generator layer by layer, A before B."""
    out = {}
    for layer in range(config.num_layers):
        for m, (d_in, d_out) in module_shapes(config).items():
            if modules is None or m in modules:
                a = torch.randn(rank, d_in, generator=generator) / d_in ** 0.5
                out[layer, m] = (a.to(dtype), (torch.randn(d_out, rank, generator=generator) * b_std).to(dtype))
    return out


@dataclasses.dataclass
class LoRAAdapter:
    """A parsed adapter on the host: rank, scaling and per (layer, module) the float32 pair (A [r, in], B [out, r])."""

    rank: int
    scaling: float
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def load_adapter(path: str, config: ModelConfig, max_lora_rank: int,
                 target_modules: tuple[str, ...] = TARGET_MODULES) -> LoRAAdapter:
    """A PEFT LoRA folder, checked against the model: ValueError naming what does not fit (a missing file, another
    PEFT type, rank over max_lora_rank, a module outside target_modules (the engine's lora_target_modules), a weight
    of the wrong shape)."""
    if not os.path.isdir(path):
        raise ValueError(f"lora_path {path!r} is not a folder")
    cfg_file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(cfg_file):
        raise ValueError(f"lora_path {path!r} has no adapter_config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter {path!r}: peft_type {cfg.get('peft_type')!r}, only LORA adapters are served")
    r = cfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"adapter {path!r}: r must be an integer >= 1, got {r!r}")
    if r > max_lora_rank:
        raise ValueError(f"adapter {path!r} has rank {r}, over max_lora_rank={max_lora_rank}")
    alpha = cfg.get("lora_alpha", r)
    for key, ok in (("bias", cfg.get("bias", "none") == "none"), ("modules_to_save", not cfg.get("modules_to_save")),
                    ("rank_pattern", not cfg.get("rank_pattern")), ("alpha_pattern", not cfg.get("alpha_pattern")),
                    ("use_dora", not cfg.get("use_dora")), ("fan_in_fan_out", not cfg.get("fan_in_fan_out")),
                    ("layers_to_transform", cfg.get("layers_to_transform") is None)):
        if not ok:
            raise ValueError(f"adapter {path!r}: {key}={cfg.get(key)!r} is not supported (plain LoRA on "
                             f"{', '.join(TARGET_MODULES)})")
    scaling = float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else r)
    st = os.path.join(path, "adapter_model.safetensors")
    if os.path.isfile(st):
        from safetensors.torch import load_file

        tensors = load_file(st, device="cpu")
    elif os.path.isfile(os.path.join(path, "adapter_model.bin")):
        tensors = torch.load(os.path.join(path, "adapter_model.bin"), map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"lora_path {path!r} has neither adapter_model.safetensors nor adapter_model.bin")
    shapes = module_shapes(config)
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        m = _KEY.match(name)
        if m is None:
            raise ValueError(f"adapter {path!r}: weight {name!r} is not a LoRA A / B of a decoder layer's projection "
                             f"(embeddings, lm_head and other modules are not served)")
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if module not in shapes:
            raise ValueError(f"adapter {path!r}: weight {name!r} adapts {module!r}; the engine adapts "
                             f"{', '.join(TARGET_MODULES)}")
        if module not in target_modules:
            raise ValueError(f"adapter {path!r} adapts {module!r}, outside the engine's lora_target_modules "
                             f"({', '.join(target_modules)})")
        if not 0 <= layer < config.num_layers:
            raise ValueError(f"adapter {path!r}: weight {name!r} names layer {layer}; the model has "
                             f"{config.num_layers}")
        d_in, d_out = shapes[module]
        want = (r, d_in) if ab == "A" else (d_out, r)
        if tuple(t.shape) != want:
            raise ValueError(f"adapter {path!r}: weight {name!r} has shape {tuple(t.shape)}, the model needs {want}")
        parts.setdefault((layer, module), {})[ab] = t.float()
    weights = {}
    for key, p in parts.items():
        if set(p) != {"A", "B"}:
            raise ValueError(f"adapter {path!r}: layer {key[0]} {key[1]} has lora_{''.join(p)} without its pair")
        weights[key] = (p["A"], p["B"])
    if not weights:
        raise ValueError(f"adapter {path!r} holds no LoRA weights")
    return LoRAAdapter(r, scaling, weights)


class LoRAManager:
    """max_loras adapters on the device (module docstring); register() parses an adapter on the host (add_request
    calls it, so a bad adapter is the caller's ValueError), slots_for() puts a step's adapters into slots."""

    def __init__(self, config: ModelConfig, device, dtype: torch.dtype, max_loras: int = 1, max_lora_rank: int = 16,
                 max_cpu_loras: int | None = None, target_modules=None, tp=None,
                 full_config: ModelConfig | None = None):
        """target_modules (SGLang's lora_target_modules): the modules any adapter may adapt (default all seven);
        projections none of them is in hold no slots and run no LoRA launches (PEFT's default adapters adapt
        q_proj and v_proj: one fused projection of four). tp: a tensor-parallel rank's TPGroup (engine/parallel.py),
        config its share of the model and full_config the whole model, which adapters are checked against before
        the rank keeps its share of them (parallel.shard_lora)."""
        for name, v in (("max_loras", max_loras), ("max_lora_rank", max_lora_rank)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if max_cpu_loras is None:
            max_cpu_loras = max_loras
        if isinstance(max_cpu_loras, bool) or not isinstance(max_cpu_loras, int) or max_cpu_loras < max_loras:
            raise ValueError(f"max_cpu_loras must be an integer >= max_loras ({max_loras}), got {max_cpu_loras!r}")
        if target_modules is None:
            target_modules = TARGET_MODULES
        if isinstance(target_modules, str) or not all(m in TARGET_MODULES for m in target_modules) or \
                not target_modules:
            raise ValueError(f"lora_target_modules must be a non-empty list of {', '.join(TARGET_MODULES)}, got "
                             f"{target_modules!r}")
        self.target_modules = tuple(m for m in TARGET_MODULES if m in target_modules)
        self.config, self.device, self.dtype = config, torch.device(device), dtype
        self.tp, self.full_config = tp, full_config or config
        self.max_loras, self.max_lora_rank, self.max_cpu_loras = max_loras, max_lora_rank, max_cpu_loras
        shapes = module_shapes(config)
        slots, rank = max_loras + 1, max_lora_rank
        # per layer and fused projection: A [slots, RP, d_in] and B [slots, d_out, RP], RP = parts * rank padded to a
        # power of two >= 16 (the MMAs' size; the padding stays zero), B block-diagonal over the parts
        self.weights: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
        for _ in range(config.num_layers):
            layer = {}
            for fused, mods in FUSED.items():
                if not set(mods) & set(self.target_modules):
                    continue
                d_in = shapes[mods[0]][0]
                d_out = sum(shapes[m][1] for m in mods)
                rp = max(16, 1 << (len(mods) * rank - 1).bit_length())
                layer[fused] = (torch.zeros(slots, rp, d_in, dtype=dtype, device=self.device),
                                torch.zeros(slots, d_out, rp, dtype=dtype, device=self.device))
            self.weights.append(layer)
        self.slot_ids: list[int | None] = [None] * slots  # the adapter id in each slot (slot 0: none, ever)
        self.slot_of: dict[int, int] = {}
        self._clock = 0
        self.last_used = [0] * slots
        self.requests: dict[int, LoRARequest] = {}  # every adapter id registered, with what it was registered as
        self.live: collections.Counter[int] = collections.Counter()  # request groups holding each adapter
        self.host: collections.OrderedDict[int, LoRAAdapter] = collections.OrderedDict()  # parsed, LRU order
        self.loads = 0  # adapters written into a slot (a statistic)

    def register(self, req: LoRARequest) -> None:
        """Check a request's adapter and parse it unless it is on the host already. The same id must keep its name
        and folder (ValueError otherwise)."""
        if not isinstance(req, LoRARequest):
            raise ValueError(f"lora_request must be a pagoda.LoRARequest, got {type(req).__name__}")
        known = self.requests.get(req.lora_int_id)
        if known is not None and (known.lora_name, known.lora_path) != (req.lora_name, req.lora_path):
            raise ValueError(f"lora_int_id {req.lora_int_id} is {known.lora_name!r} from {known.lora_path!r}; a "
                             f"request named it {req.lora_name!r} from {req.lora_path!r}")
        self._host_adapter(req)
        self.requests[req.lora_int_id] = req

    def acquire(self, req: LoRARequest) -> None:
        """A request group (registered) holds req's adapter: it stays parsed on the host until release(), so a step
        never has to read its folder again (which may be gone by then)."""
        self.live[req.lora_int_id] += 1

    def release(self, req: LoRARequest) -> None:
        self.live[req.lora_int_id] -= 1
        if self.live[req.lora_int_id] <= 0:
            del self.live[req.lora_int_id]
        self._evict()

    def _evict(self, keep: int = 0) -> None:
        """Parsed adapters past max_cpu_loras go, least recently used first, but none that a request group holds
        and not `keep` (the one just parsed for a request about to hold it)."""
        spare = [i for i in self.host if not self.live[i] and i != keep]
        for i in spare[:max(0, len(self.host) - self.max_cpu_loras)]:
            del self.host[i]

    def _host_adapter(self, req: LoRARequest) -> LoRAAdapter:
        a = self.host.get(req.lora_int_id)
        if a is None:
            a = load_adapter(req.lora_path, self.full_config, self.max_lora_rank, self.target_modules)
            if self.tp is not None:
                a = dataclasses.replace(a, weights=shard_lora(a.weights, self.full_config, self.tp.rank, self.tp.size))
            self.host[req.lora_int_id] = a
        self.host.move_to_end(req.lora_int_id)
        self._evict(keep=req.lora_int_id)
        return a

    def slots_for(self, requests) -> np.ndarray:
        """int32 [len(requests)]: each request's slot (0 without an adapter), adapters not on the device written
        into the least recently used slots that none of these requests uses. The writes are copies on the current
        stream, so steps queued before read the slot's old adapter."""
        ids = [0 if r.lora_request is None else r.lora_request.lora_int_id for r in requests]
        wanted = set(ids) - {0}
        if len(wanted) > self.max_loras:
            raise RuntimeError(f"a step holds {len(wanted)} adapters, over max_loras={self.max_loras}")
        self._clock += 1
        for i in wanted:
            if i in self.slot_of:
                self.last_used[self.slot_of[i]] = self._clock
        for r in requests:
            i = 0 if r.lora_request is None else r.lora_request.lora_int_id
            if i and i not in self.slot_of:
                free = min(range(1, len(self.slot_ids)), key=lambda s: (self.last_used[s] == self._clock,
                                                                         self.last_used[s]))
                self._write_slot(free, r.lora_request)
        slot = {i: self.slot_of[i] for i in wanted}
        slot[0] = 0
        return np.array([slot[i] for i in ids], dtype=np.int32)

    @torch.no_grad()
    def _write_slot(self, s: int, req: LoRARequest) -> None:
        a = self._host_adapter(req)  # (first: a folder gone since register() fails here with the slot as it was)
        old = self.slot_ids[s]
        if old is not None:
            del self.slot_of[old]
        rank, shapes = self.max_lora_rank, module_shapes(self.config)
        for layer, fused in enumerate(self.weights):
            for name, mods in FUSED.items():
                if name not in fused:
                    continue
                wa, wb = fused[name]
                wa[s].zero_()
                wb[s].zero_()
                row = 0
                for j, m in enumerate(mods):
                    d_out = shapes[m][1]
                    pair = a.weights.get((layer, m))
                    if pair is not None:
                        la, lb = pair
                        wa[s, j * rank:j * rank + a.rank].copy_(la)
                        wb[s, row:row + d_out, j * rank:j * rank + a.rank].copy_(lb * a.scaling)
                    row += d_out
        self.slot_ids[s] = req.lora_int_id
        self.slot_of[req.lora_int_id] = s
        self.last_used[s] = self._clock
        self.loads += 1


def block_m(rows: int) -> int:
    """The row tile of a step's LoRA deltas: 16 for decode-sized steps (a few rows an adapter), 64 past 256 rows."""
    return 16 if rows <= 256 else 64


def step_tables(request_slots: np.ndarray, qo_indptr: np.ndarray, max_loras: int, rows: int | None = None):
    """A step's LoRA tables on the host: (order, tiles, n_tiles, block_m) of ops.lora.lora_tiles over its tokens, each
    taking its request's slot; n_tiles the fixed bound for `rows` rows (default: the step's tokens)."""
    token_slots = np.repeat(np.asarray(request_slots, np.int32), np.diff(qo_indptr))
    rows = token_slots.size if rows is None else rows
    bm = block_m(rows)
    n = lora_max_tiles(rows, bm, max_loras)
    order, tiles = lora_tiles(token_slots, bm, n)
    return order, tiles, n, bm


class LoRABatch:
    """One step's LoRA tables (step_tables: order, tiles, their count and row tile), device tensors (host ones on the
    CPU); add() puts a projection's LoRA delta into its output."""

    def __init__(self, manager: LoRAManager, order: torch.Tensor, tiles: torch.Tensor, n_tiles: int, block_m: int,
                 pdl: bool = False):
        """pdl: launch the deltas as programmatic dependent launches (the engine's PAGODA_PDL)."""
        self.m, self.order, self.tiles, self.n_tiles, self.block_m = manager, order, tiles, n_tiles, block_m
        self.pdl = pdl
        # (the CPU's models and float32 ones take the PyTorch path: the kernels take 16-bit activations)
        self.backend = "torch" if order.device.type == "cpu" or manager.dtype == torch.float32 else "auto"

    def add(self, out: torch.Tensor, x: torch.Tensor, layer: int, proj: str) -> torch.Tensor:
        """out += the LoRA delta of x through projection proj ("qkv", "o", "gate_up", "down") of layer; returns out
        (as it is where no target module is in proj)."""
        if proj not in self.m.weights[layer]:
            return out
        wa, wb = self.m.weights[layer][proj]
        lora_delta(out.view(-1, out.shape[-1]), x.reshape(-1, x.shape[-1]), wa, wb, self.order, self.tiles,
                   self.n_tiles, self.block_m, self.backend, self.pdl)
        return out
