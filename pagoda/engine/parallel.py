"""Tensor parallelism over the GPUs of one host (DESIGN.md "Where it runs"), the way vLLM and SGLang shard a
Llama (Megatron-LM's scheme): each rank holds 1/tp of the attention heads and of the MLP's columns, the o and down
projections' partial sums meet in an all-reduce, and the lm_head holds 1/tp of the vocabulary, its logits gathered.
The attention kernels are unchanged: a rank's KV cache and plan simply have fewer heads.

    llm = pagoda.LLM("path/to/hf-folder", tensor_parallel_size=2)    # or `pagoda serve ... -tp 2`

How the ranks run (SGLang's scheme): the process that builds the engine is rank 0; it starts tp - 1 worker
processes, each of which builds the same engine on its own GPU (cuda:rank) over its shard of the weights. Every
rank runs the whole engine (scheduler, page pool, prefix cache, sampler, detokenizer) in lockstep: rank 0 sends
each add_request / abort / step to the workers in order, the schedulers are deterministic, and the logits are
the same on every rank (the all-reduce and the gather give every rank the same bits), so with the same seeds every
rank samples the same tokens; only rank 0's outputs leave. The collectives are NCCL's on CUDA (captured in the
decode CUDA graphs) and gloo's on the CPU (the CPU tests).

Sharding (``shard_tensor``): q / k / v by heads (when tp exceeds the KV heads, each KV head is replicated over
tp / num_kv_heads ranks, vLLM's rule), o_proj by its input columns; gate / up by rows, down by columns; the lm_head
by vocabulary rows (padded to a multiple of tp; a tied lm_head gets its own shard of the embedding table);
embeddings and norms are whole on every rank.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from multiprocessing.connection import Client, Listener

import torch
import torch.distributed as dist

from .config import ModelConfig

logger = logging.getLogger("pagoda.engine")

# how long a rank waits in a collective for the others (a worker that died leaves rank 0 there)
TP_TIMEOUT_S = float(os.environ.get("PAGODA_TP_TIMEOUT", "600"))


def check_tp_size(tp, config: ModelConfig) -> int:
    """tensor_parallel_size checked against the model: the attention heads and the MLP's columns divide by it, and
    the KV heads divide by it or it by them. ValueError naming tensor_parallel_size otherwise."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {tp!r}")
    c = config
    if c.num_heads % tp:
        raise ValueError(f"tensor_parallel_size={tp} must divide the model's {c.num_heads} attention heads")
    if c.num_kv_heads % tp and tp % c.num_kv_heads:
        raise ValueError(f"tensor_parallel_size={tp} must divide the model's {c.num_kv_heads} KV heads or be a "
                         f"multiple of them")
    if c.intermediate_size % tp:
        raise ValueError(f"tensor_parallel_size={tp} must divide the model's intermediate_size {c.intermediate_size}")
    return tp


def local_config(config: ModelConfig, tp: int) -> ModelConfig:
    """The shape one rank's model and KV cache have: num_heads / tp query heads, max(1, num_kv_heads / tp) KV heads,
    intermediate_size / tp MLP columns; everything else (hidden size, vocabulary, RoPE) as the model's."""
    check_tp_size(tp, config)
    if tp == 1:
        return config
    return dataclasses.replace(config, num_heads=config.num_heads // tp,
                               num_kv_heads=max(1, config.num_kv_heads // tp),
                               intermediate_size=config.intermediate_size // tp)


@dataclasses.dataclass
class TPGroup:
    """One rank's view of the tensor-parallel group (torch.distributed's default group)."""

    rank: int
    size: int
    backend: str  # "nccl" or "gloo"

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of x over the ranks, in place (every rank gets the same bits); returns x."""
        dist.all_reduce(x)
        return x

    def gather_vocab(self, local: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """[rows, vocab_shard] logits of each rank -> [rows, vocab_size] (the ranks' shards side by side, the
        padding cut off)."""
        rows, shard = local.shape
        local = local.contiguous()
        if self.backend == "nccl":
            flat = torch.empty(self.size * rows, shard, dtype=local.dtype, device=local.device)
            dist.all_gather_into_tensor(flat, local)
            full = flat.view(self.size, rows, shard).transpose(0, 1).reshape(rows, self.size * shard)
        else:
            parts = [torch.empty_like(local) for _ in range(self.size)]
            dist.all_gather(parts, local)
            full = torch.cat(parts, dim=1)
        return full[:, :vocab_size]

    def min_int(self, value: int, device) -> int:
        """The smallest of the ranks' values (the KV page count every rank can hold)."""
        t = torch.tensor([int(value)], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())


def vocab_shard_rows(vocab_size: int, tp: int) -> int:
    """The lm_head rows each rank holds: the vocabulary padded up to a multiple of tp, divided by tp."""
    return -(-vocab_size // tp)


def shard_tensor(name: str, w: torch.Tensor, config: ModelConfig, rank: int, tp: int) -> torch.Tensor:
    """A Hugging Face checkpoint tensor (full model) -> the part rank holds (a view where it can be; the model
    copies it into its parameter). config: the whole model's."""
    if tp == 1:
        return w
    c, d = config, config.head_dim
    if ".self_attn.q_proj." in name:
        rows = c.num_heads // tp * d
        return w.narrow(0, rank * rows, rows)
    if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
        if c.num_kv_heads >= tp:
            heads = c.num_kv_heads // tp
            return w.narrow(0, rank * heads * d, heads * d)
        head = rank // (tp // c.num_kv_heads)  # (tp / num_kv_heads ranks share each KV head)
        return w.narrow(0, head * d, d)
    if ".self_attn.o_proj." in name:
        cols = c.num_heads // tp * d
        return w.narrow(1, rank * cols, cols)
    if ".mlp.gate_proj." in name or ".mlp.up_proj." in name:
        rows = c.intermediate_size // tp
        return w.narrow(0, rank * rows, rows)
    if ".mlp.down_proj." in name:
        cols = c.intermediate_size // tp
        return w.narrow(1, rank * cols, cols)
    if name == "lm_head.weight":
        return vocab_shard(w, c.vocab_size, rank, tp)
    return w  # embeddings, norms: whole on every rank


def shard_lora(weights: dict, config: ModelConfig, rank: int, tp: int) -> dict:
    """A LoRA adapter's {(layer, module): (A [r, in], B [out, r])} -> rank's share: where the projection is split by
    its outputs (q / k / v, gate / up) B's rows as the weight's, where by its inputs (o, down) A's columns as the
    weight's. The row-split projections' partial deltas join their partial sums before the all-reduce, so B (and
    the scaling folded into it) is whole on every rank. config: the whole model's."""
    if tp == 1:
        return weights
    out = {}
    for (layer, module), (a, b) in weights.items():
        name = f"model.layers.{layer}.{'mlp' if module in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}." \
               f"{module}.weight"
        if module in ("o_proj", "down_proj"):
            out[layer, module] = (shard_tensor(name, a, config, rank, tp), b)  # (A's columns: the weight's)
        else:
            out[layer, module] = (a, shard_tensor(name, b, config, rank, tp))
    return out


def vocab_shard(w: torch.Tensor, vocab_size: int, rank: int, tp: int) -> torch.Tensor:
    """Rank's rows of an lm_head (or of the embedding table it is tied to): vocab_shard_rows of them, the last
    rank's padded with zero rows (whose logits gather_vocab cuts off)."""
    rows = vocab_shard_rows(vocab_size, tp)
    lo, hi = rank * rows, min(vocab_size, (rank + 1) * rows)
    if hi - lo == rows:
        return w.narrow(0, lo, rows)
    out = torch.zeros(rows, w.shape[1], dtype=w.dtype, device=w.device)
    if hi > lo:
        out[:hi - lo] = w[lo:hi]
    return out


# -- processes ---------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_group(rank: int, size: int, init_method: str, device: torch.device) -> TPGroup:
    """torch.distributed's default group for this rank: NCCL on CUDA, gloo on the CPU (PAGODA_TP_BACKEND=gloo
    forces gloo, with which several ranks can share one GPU: a test of the sharded engine on one device, eager)."""
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is initialized already: pagoda's tensor parallelism makes its own group")
    backend = os.environ.get("PAGODA_TP_BACKEND") or ("nccl" if device.type == "cuda" else "gloo")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"PAGODA_TP_BACKEND must be 'nccl' or 'gloo', got {backend!r}")
    kw = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=TP_TIMEOUT_S), **kw)
    return TPGroup(rank, size, backend)


def rank_device(device: torch.device, rank: int, size: int) -> torch.device:
    """Rank r's device: cuda:r on CUDA (ValueError if the host has fewer GPUs than tensor_parallel_size; with
    PAGODA_TP_BACKEND=gloo the ranks may share the GPUs there are), the CPU on the CPU."""
    if device.type != "cuda":
        return device
    n = torch.cuda.device_count()
    if os.environ.get("PAGODA_TP_BACKEND") == "gloo":
        return torch.device("cuda", rank % n)
    if n < size:
        raise ValueError(f"tensor_parallel_size={size} needs {size} GPUs, this host has {n}")
    return torch.device("cuda", rank)


class WorkerGone(RuntimeError):
    """A tensor-parallel worker failed or exited: the engine cannot step any more (the server's 500 / 503)."""


class Workers:
    """Rank 0's handle on the worker processes: start them, send them the engine's calls, stop them. Each worker is
    a fresh `python -c` that calls worker_main (not multiprocessing's spawn, which re-imports the caller's main
    module: a script without an ``if __name__ == "__main__"`` guard would start engines recursively); it connects
    back over a local socket with an authentication key and gets the engine's arguments there."""

    def __init__(self, size: int, init_method: str, engine_kwargs: dict):
        key = os.urandom(16)
        self.listener = Listener(("127.0.0.1", 0), authkey=key)
        entry = "import sys; from pagoda.engine.parallel import worker_main; worker_main(*sys.argv[1:])"
        self.procs = [subprocess.Popen([sys.executable, "-c", entry, str(rank), str(size), init_method,
                                        str(self.listener.address[1]), key.hex()])
                      for rank in range(1, size)]
        self.conns: list = [None] * (size - 1)
        self.closed = False
        try:
            accepted: list = []
            t = threading.Thread(target=lambda: [accepted.append(self.listener.accept()) for _ in self.procs],
                                 daemon=True)
            t.start()
            while t.is_alive():
                t.join(0.2)
                for rank, p in enumerate(self.procs, start=1):
                    if p.poll() is not None:
                        raise WorkerGone(f"tensor-parallel rank {rank} exited (code {p.returncode}) before it "
                                           f"connected")
            for c in accepted:
                rank = c.recv()
                self.conns[rank - 1] = c
                c.send(engine_kwargs)
        except BaseException:
            self.close()
            raise

    def send(self, *msg) -> None:
        """One engine call for every worker, after checking that none has reported an error (which would leave
        this rank waiting in the next collective)."""
        self.check()
        for c in self.conns:
            c.send(msg)

    def check(self) -> None:
        for rank, (c, p) in enumerate(zip(self.conns, self.procs), start=1):
            kind, info = self._receive(rank, c) if c.poll() else (None, None)
            if kind == "error":
                raise WorkerGone(f"tensor-parallel rank {rank} failed:\n{info}")
            if p.poll() is not None:
                raise WorkerGone(f"tensor-parallel rank {rank} exited (code {p.returncode})")

    def _receive(self, rank: int, c):
        """A worker's next message; its closed connection (a worker gone) is a RuntimeError naming the rank."""
        try:
            return c.recv()
        except (EOFError, OSError):
            code = self.procs[rank - 1].poll()
            raise WorkerGone(f"tensor-parallel rank {rank} is gone (exit code {code})") from None

    def wait_ready(self) -> None:
        for rank, c in enumerate(self.conns, start=1):
            kind, info = self._receive(rank, c)
            if kind != "ready":
                raise WorkerGone(f"tensor-parallel rank {rank} failed to start:\n{info}")

    def request(self, *msg) -> list:
        """A call whose answer each worker sends back (``probe``: what the tests compare with rank 0)."""
        self.send(*msg)
        out = []
        for rank, c in enumerate(self.conns, start=1):
            kind, info = self._receive(rank, c)
            if kind == "error":
                raise WorkerGone(f"tensor-parallel rank {rank} failed:\n{info}")
            out.append(info)
        return out

    def close(self, timeout: float = 30.0) -> None:
        if self.closed:
            return
        self.closed = True
        for c in self.conns:
            if c is not None:
                try:
                    c.send(("exit",))
                except (BrokenPipeError, OSError):
                    pass
        for p in self.procs:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for c in self.conns:
            if c is not None:
                c.close()
        self.listener.close()


def _exit_with(parent: int) -> None:
    """End this worker once rank 0's process is gone (while it waits in a collective, the connection's end is not
    seen)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def worker_main(rank: str, size: str, init_method: str, port: str, key: str) -> None:
    """A worker rank (its command line's arguments): connect to rank 0, build the engine on its shard, then replay
    rank 0's calls until told to stop (or until rank 0 is gone: the connection's end)."""
    from .llm import LLMEngine

    rank, size = int(rank), int(size)
    # (rank 0 ends the workers: not the terminal's Ctrl-C, which would leave it waiting in a collective; and a
    # worker whose rank 0 is killed goes with it)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    threading.Thread(target=_exit_with, args=(parent,), daemon=True, name="pagoda-tp-parent").start()
    conn = Client(("127.0.0.1", int(port)), authkey=bytes.fromhex(key))
    conn.send(rank)
    engine_kwargs = conn.recv()
    try:
        engine = LLMEngine(**engine_kwargs, _tp=(rank, size, init_method))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", None))
    # PAGODA_TP_RECORD=1 (the tests): the token ids of the groups that finish here, which `probe` returns (and
    # clears) so that a test can compare them with rank 0's; off, nothing is kept
    record = os.environ.get("PAGODA_TP_RECORD") == "1"
    finished: dict[str, list[list[int]]] = {}
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                break
            op = msg[0]
            if op == "exit":
                break
            if op == "step":
                outs = engine.step(only_finished=msg[1])
                if record:
                    finished.update({o.request_id: [c.token_ids for c in o.outputs] for o in outs if o.finished})
            elif op == "add":
                engine.add_request(**msg[1])
            elif op == "abort":
                engine.abort(msg[1])
            elif op == "lora":
                engine.lora.register(msg[1])
                conn.send(("lora", None))
            elif op == "probe":  # (None: not recording)
                conn.send(("probe", finished if record else None))
                finished = {}
            else:
                raise RuntimeError(f"unknown tensor-parallel message {op!r}")
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        logger.exception("tensor-parallel rank %d failed", rank)
    finally:
        engine.shutdown()

