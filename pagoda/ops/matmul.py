"""y = x @ weight.T + bias (torch.nn.functional.linear), with a Triton kernel for a few rows on the GPU.

At decode batch 1 a linear layer is a read of its weight. `linear` sends inputs of at most
SMALL_M_MAX_ROWS rows to kernels/matmul.py (each weight row read once, no split-K, one launch) and everything
else to torch (cuBLAS). The engine uses it at batch 1 for the projections `small_m_projections()` names; the
configuration comes from `python -m pagoda.bench.linear`, that list from the engine's latency benchmark
(benchmarks/results/engine_h100.md, session 10).
"""
from __future__ import annotations

import os

import torch
import triton

from ._dispatch import check_eps, pdl_launch, use_triton
from .kernels.matmul import linear_small_m_kernel

SMALL_M_MAX_ROWS = 16  # one tensor-core tile of rows


def _config_from_env() -> tuple[int, int, int, int] | None:
    env = os.environ.get("PAGODA_SMALL_M_CONFIG")  # "BLOCK_N,BLOCK_K,num_warps,num_stages" (the bench sets it)
    if not env:
        return None
    try:
        bn, bk, warps, stages = (int(v) for v in env.split(","))
    except ValueError:
        raise ValueError(f"PAGODA_SMALL_M_CONFIG must be 'BLOCK_N,BLOCK_K,num_warps,num_stages', "
                         f"got {env!r}") from None
    return bn, bk, warps, stages


# (BLOCK_N, BLOCK_K, num_warps, num_stages) on CUDA: the best total over Llama-3.1-8B's four projections in
# `python -m pagoda.bench.linear` (H200, session 10); the interpreter runs small blocks (block boundaries)
_ENV_CONFIG = _config_from_env()
SMALL_M_CONFIG = _ENV_CONFIG or (32, 256, 4, 4)
_INTERPRETER_CONFIG = (16, 32, 1, 1)
# linear_silu_and_mul's (BLOCK_N unused, BLOCK_K, num_warps, num_stages) on CUDA: `python -m pagoda.bench.linear
# --fused` (H200, session 23): 2 stages 61.5 us, 3 62.6, 4 (SMALL_M_CONFIG's) 67.5, cuBLAS + the activation 64.7; in
# the engine's batch-1 step 2 stages -0.055 ms against 3 (the qkv + RoPE kernel stays on SMALL_M_CONFIG: 19.7 us at
# 4 stages, 19.9 at 3, 25.3 at 2)
FUSED_ACT_CONFIG = _ENV_CONFIG or (0, 256, 4, 2)


def small_m_projections() -> frozenset[str]:
    """The engine's projections (qkv, o, gate_up, down) that take the small-M kernel at decode batch 1;
    PAGODA_SMALL_M_LINEAR (comma-separated names, or 'none') overrides. Default qkv, o and down (the down
    projection split over K in two, small_m_split()): measured on the H200 (session 10, `python -m
    pagoda.bench.engine --cases latency`, batch 1, two runs each) none 5.00 / 5.01 ms per token, o 4.93 / 4.93,
    qkv + o 4.81 / 4.82 / 4.81, + down 4.81 / 4.81, + gate_up and down 5.00 (cuBLAS reads gate_up faster: 67.8
    vs 71.8 us in pagoda.bench.linear); session 19, with the down projection split in two and its residual added
    in the kernel: 4.428 / 4.427 against 4.455 / 4.456 (qkv + o), interleaved, one machine."""
    env = os.environ.get("PAGODA_SMALL_M_LINEAR")
    names = {"qkv", "o", "gate_up", "down"}
    if env is None:
        return frozenset({"qkv", "o", "down"})
    chosen = frozenset(n for n in env.split(",") if n and n != "none")
    if not chosen <= names:
        raise ValueError(f"PAGODA_SMALL_M_LINEAR must name projections among {sorted(names)} (or 'none'), "
                         f"got {env!r}")
    return chosen


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors' memory spans (first to last element) intersect."""
    if a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False
    def span(t):
        lo = t.data_ptr()
        return lo, lo + (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()
    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


NORM_MAX_ROWS = 4  # rows whose RMSNorm factor the small-M kernel computes (one vector of K each, in registers)


def small_m_split() -> dict[str, int]:
    """K splits of the engine's small-M projections: PAGODA_SMALL_M_SPLIT, e.g. "down=4,o=2" ('none' or empty:
    one program per BLOCK_N rows of W; a split spreads a projection over more programs, in one launch). Default
    down=2: the down projection (4096 x 14336) with its residual, `python -m pagoda.bench.linear --splits
    1,2,4,7 --only-splits` (H200, session 19): cuBLAS addmm_ 35.7 us, split 1 35.3, 2 33.9, 4 41.5, 7 39.9."""
    env = os.environ.get("PAGODA_SMALL_M_SPLIT")
    if env is None:
        return {"down": 2}
    out = {}
    for item in filter(None, env.split(",")):
        if item == "none":
            continue
        name, _, val = item.partition("=")
        if name not in ("qkv", "o", "gate_up", "down") or not val.isdigit() or int(val) < 1:
            raise ValueError(f"PAGODA_SMALL_M_SPLIT must be 'name=splits,...' with names among qkv, o, gate_up, "
                             f"down and splits >= 1, got {env!r}")
        out[name] = int(val)
    return out


_SPLIT_BUFFERS: dict = {}


def _split_buffers(device, n_tiles: int, split_k: int, bn: int):
    """The split-K partials (fp32) and the tiles' arrival counters (int32, zero: the kernel resets them), one pair
    per (device, shape), kept: a CUDA graph replays the launch with the same buffers. Kernels on one stream
    share them in turn; first made outside a graph capture."""
    key = (str(device), n_tiles, split_k, bn)
    if key not in _SPLIT_BUFFERS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the small-M kernel's split-K buffers are made on its first call: make that call "
                               "before capturing a CUDA graph (a warm-up run)")
        _SPLIT_BUFFERS[key] = (torch.empty(split_k * n_tiles * 16 * bn, dtype=torch.float32, device=device),
                               torch.zeros(n_tiles, dtype=torch.int32, device=device))
    return _SPLIT_BUFFERS[key]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out: torch.Tensor | None = None, small_m: bool | None = None, config=None,
           pdl: bool = False, rms_norm_eps: float | None = None,
           residual: torch.Tensor | None = None, split_k: int = 1) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T (+ bias [N]) -> [..., N] in x's dtype, fp32 accumulation.

    rms_norm_eps: x is RMS-normalized first, without a weight: y = (x * rsqrt(mean(x^2) + eps)) @ weight.T
    (+ bias); the norm's weight, folded into ``weight`` (weight * norm_weight[None, :]), makes it the whole
    RMSNorm. The small-M kernel scales its accumulators (at most NORM_MAX_ROWS rows). residual [..., N]: y +=
    residual; ``out`` may be ``residual`` (an in-place residual add). split_k (small-M kernel): K in that many
    pieces over as many programs per BLOCK_N rows, the partials added by the tile's last program in a fixed
    order (deterministic; one launch).

    small_m: run the small-M kernel (True: on CUDA or under TRITON_INTERPRET, else torch; None: on CUDA for
    at most SMALL_M_MAX_ROWS rows; False: torch); fp16 / bf16 only (fp32 goes to torch: the kernel's dot
    would round its inputs to tf32); config: (BLOCK_N, BLOCK_K, num_warps, num_stages) on CUDA
    instead of SMALL_M_CONFIG (the bench sweeps them).

    pdl (small-M kernel on a Hopper GPU): a programmatic dependent launch (kernels/pdl.py)."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise ValueError("x and weight must be torch.Tensors")
    if x.dim() < 1 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"weight must be [N, K] with K = x.shape[-1]; got x {tuple(x.shape)}, weight "
                         f"{tuple(weight.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be a floating tensor, got {x.dtype}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight must be {x.dtype} on {x.device} like x, got {weight.dtype} on {weight.device}")
    n, k = weight.shape
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,)
                             or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"bias must be {x.dtype} [{n}] on {x.device}, got "
                         f"{getattr(bias, 'dtype', type(bias))} {tuple(getattr(bias, 'shape', ()))}")
    shape = (*x.shape[:-1], n)
    if out is not None and (tuple(out.shape) != shape or out.dtype != x.dtype or out.device != x.device
                            or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {x.dtype} {shape} on {x.device}, got {out.dtype} "
                         f"{tuple(out.shape)}")
    if out is not None and _overlap(out, x):
        raise ValueError("out must not overlap x (the kernel's programs read x while others write out)")
    if residual is not None and (not isinstance(residual, torch.Tensor) or tuple(residual.shape) != shape
                                 or residual.dtype != x.dtype or residual.device != x.device):
        raise ValueError(f"residual must be {x.dtype} {shape} on {x.device}, got "
                         f"{getattr(residual, 'dtype', type(residual))} {tuple(getattr(residual, 'shape', ()))}")
    if rms_norm_eps is not None:
        check_eps("rms_norm_eps", rms_norm_eps)
    if isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 1:
        raise ValueError(f"split_k must be an integer >= 1, got {split_k!r}")
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if small_m is None:
        small_m = x.is_cuda and rows <= SMALL_M_MAX_ROWS
    if small_m and rows > SMALL_M_MAX_ROWS:
        raise ValueError(f"the small-M kernel takes at most {SMALL_M_MAX_ROWS} rows, x has {rows}")
    norm_k = triton.next_power_of_2(k) if k else 1
    if (not small_m or not use_triton(x) or rows == 0 or k == 0
            or x.dtype not in (torch.float16, torch.bfloat16)
            or (rms_norm_eps is not None and (rows > NORM_MAX_ROWS or norm_k > 16384))):
        if rms_norm_eps is None and residual is None:
            y = torch.nn.functional.linear(x, weight, bias)
        else:
            y = torch.nn.functional.linear(x, weight).float()
            if rms_norm_eps is not None:
                y = y * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + rms_norm_eps)
            if bias is not None:
                y = y + bias.float()
            if residual is not None:
                y = y + residual.float()
            y = y.to(x.dtype)
        if out is None:
            return y
        out.copy_(y)
        return out
    x2 = x.reshape(rows, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    y2 = out.view(rows, n)
    r2 = None
    if residual is not None:
        r2 = residual.view(rows, n) if residual.is_contiguous() else residual.reshape(rows, n).contiguous()
    bn, bk, warps, stages = (config or SMALL_M_CONFIG) if x.is_cuda else _INTERPRETER_CONFIG
    n_tiles = triton.cdiv(n, bn)
    k_split = triton.cdiv(triton.cdiv(k, split_k), bk) * bk  # whole K blocks per piece
    split_k = triton.cdiv(k, k_split)  # (no empty piece)
    ws, cnt = _split_buffers(x.device, n_tiles, split_k, bn) if split_k > 1 else (w, w)
    linear_small_m_kernel[(n_tiles, split_k)](
        x2, w, bias if bias is not None else w, r2 if r2 is not None else w, y2, ws, cnt, rows, n, k, k_split,
        x2.stride(0), w.stride(0), r2.stride(0) if r2 is not None else 0, y2.stride(0),
        float(rms_norm_eps) if rms_norm_eps is not None else 0.0,
        HAS_BIAS=bias is not None, BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=k % bk == 0,
        NORM_ROWS=rows if rms_norm_eps is not None else 0, NORM_K=norm_k if rms_norm_eps is not None else 16,
        HAS_RES=residual is not None, SPLIT_K=split_k, num_warps=warps, num_stages=stages,
        **pdl_launch(pdl, x))
    return out


def linear_rope_append(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, q_out: torch.Tensor,
                       positions: torch.Tensor, cos_sin_cache: torch.Tensor, paged_kv_cache, batch_indices,
                       kv_indices, kv_indptr, kv_last_page_len, num_qo_heads: int, num_kv_heads: int, head_dim: int,
                       rms_norm_eps: float | None = None, kv_layout: str = "NHD", pdl: bool = False,
                       config=None, *, k_scale: float | None = None, v_scale: float | None = None) -> torch.Tensor:
    """One token's qkv projection, RoPE and K / V append in one launch (pagoda's, for the engine's one-token
    layers): ``qkv = linear(x, weight, bias, rms_norm_eps=...)`` split into q / k / v heads (rows of weight: the q
    heads, then k, then v), RoPE with NeoX pairs at ``positions`` from ``cos_sin_cache`` ([max_pos, head_dim]
    = [cos | sin], float32) on q and k, q written to ``q_out`` [1, num_qo_heads, head_dim] and k / v to the
    token's slot of ``paged_kv_cache`` (the page tables as in append_paged_kv_cache, int32 on x's device). What
    apply_rope_with_cos_sin_cache_and_append does after the projection, without its launch; the rotation
    is applied to the fp32 accumulators (not to the projection rounded to x's dtype). head_dim 64 / 128 / 256,
    the cache in x's dtype; without Triton, or in fp32, the same through linear() and the RoPE / append op.
    config: as linear()'s (its BLOCK_N unused: a program takes 16 rotary pairs, 32 rows of W)."""
    from .rope import apply_rope_with_cos_sin_cache_and_append, fused_store_args
    from ..attention.formats import FP8_DTYPES, paged_cache_geometry, paged_strides, unpack_paged_kv_cache
    from .kernels.matmul import qkv_rope_append_kernel

    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"x must be one token [1, hidden], got {getattr(x, 'shape', x)}")
    n_rows = (num_qo_heads + 2 * num_kv_heads) * head_dim
    if (not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (n_rows, x.shape[1])
            or weight.dtype != x.dtype or weight.device != x.device):
        raise ValueError(f"weight must be {x.dtype} [{n_rows}, {x.shape[1]}] on {x.device}, got "
                         f"{getattr(weight, 'dtype', type(weight))} {tuple(getattr(weight, 'shape', ()))}")
    if bias is not None and (tuple(bias.shape) != (n_rows,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be {x.dtype} [{n_rows}], got {bias.dtype} {tuple(bias.shape)}")
    if (not isinstance(q_out, torch.Tensor) or tuple(q_out.shape) != (1, num_qo_heads, head_dim)
            or q_out.dtype != x.dtype or not q_out.is_contiguous()):
        raise ValueError(f"q_out must be a contiguous {x.dtype} [1, {num_qo_heads}, {head_dim}], got "
                         f"{getattr(q_out, 'dtype', type(q_out))} {tuple(getattr(q_out, 'shape', ()))}")
    if head_dim not in (64, 128, 256):
        raise ValueError(f"head_dim must be 64, 128 or 256, got {head_dim}")
    if rms_norm_eps is not None:
        check_eps("rms_norm_eps", rms_norm_eps)
    if (not isinstance(cos_sin_cache, torch.Tensor) or cos_sin_cache.dim() != 2
            or cos_sin_cache.shape[1] != head_dim or cos_sin_cache.dtype != torch.float32):
        raise ValueError(f"cos_sin_cache must be float32 [max_pos, {head_dim}] (= [cos | sin]), got "
                         f"{getattr(cos_sin_cache, 'dtype', None)} {tuple(getattr(cos_sin_cache, 'shape', ()))}")
    for name, t in (("positions", positions), ("batch_indices", batch_indices), ("kv_indices", kv_indices),
                    ("kv_indptr", kv_indptr)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.device != x.device:
            raise ValueError(f"{name} must be int32 on {x.device}, got {getattr(t, 'dtype', type(t))}")
    k_cache, v_cache = unpack_paged_kv_cache(paged_kv_cache, kv_layout)
    _, page_size, heads, dim = paged_cache_geometry(k_cache, kv_layout)
    if (heads, dim) != (num_kv_heads, head_dim) or (k_cache.dtype != x.dtype and k_cache.dtype not in FP8_DTYPES):
        raise ValueError(f"paged_kv_cache must be {x.dtype} (or fp8) with {num_kv_heads} heads of {head_dim}, got "
                         f"{k_cache.dtype} with {heads} of {dim}")
    store = fused_store_args(k_cache.dtype, k_scale, v_scale)  # (quantized on write as the RoPE op does it)
    k = x.shape[1]
    norm_k = triton.next_power_of_2(k) if k else 1
    if (not use_triton(x) or x.dtype not in (torch.float16, torch.bfloat16) or k == 0
            or (rms_norm_eps is not None and norm_k > 16384)):
        qkv = linear(x, weight, bias, rms_norm_eps=rms_norm_eps)
        q, kk, v = qkv.split([num_qo_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
        q_out.view(1, -1).copy_(q)
        apply_rope_with_cos_sin_cache_and_append(positions, q_out.view(1, -1), kk.contiguous(), v.contiguous(),
                                                 head_dim, cos_sin_cache, True, paged_kv_cache, batch_indices,
                                                 kv_indices, kv_indptr, kv_last_page_len, kv_layout, check=False,
                                                 k_scale=k_scale, v_scale=v_scale)
        return q_out
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    x2 = x if x.stride(-1) == 1 else x.contiguous()
    _, bk, warps, stages = (config or SMALL_M_CONFIG) if x.is_cuda else _INTERPRETER_CONFIG
    grid = ((num_qo_heads + 2 * num_kv_heads) * (head_dim // 32),)
    qkv_rope_append_kernel[grid](
        x2, w, bias if bias is not None else w, q_out, k_cache, v_cache, positions, batch_indices, kv_indices,
        kv_indptr, cos_sin_cache, k, w.stride(0), q_out.stride(1), *paged_strides(k_cache, kv_layout),
        *paged_strides(v_cache, kv_layout), cos_sin_cache.stride(0), cos_sin_cache.shape[0], page_size,
        float(rms_norm_eps) if rms_norm_eps is not None else 0.0,
        NUM_Q_HEADS=num_qo_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HAS_BIAS=bias is not None,
        NORM=rms_norm_eps is not None, NORM_K=norm_k, BLOCK_K=bk, EVEN_K=k % bk == 0,
        num_warps=warps, num_stages=stages, **pdl_launch(pdl, x),
        **store)
    return q_out


def linear_silu_and_mul(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None,
                        rms_norm_eps: float | None = None, pdl: bool = False, config=None) -> torch.Tensor:
    """One token's gate / up projection with SwiGLU in the epilogue (pagoda's, for the engine's one-token layers):
    ``silu_and_mul(linear(x, weight, rms_norm_eps=...))`` with weight = [gate; up] [2 d, hidden], x [1, hidden]
    -> [1, d], without the activation's launch (the activation applied to the fp32 accumulators). Without
    Triton, or in fp32, the same through linear() and silu_and_mul. config: as linear()'s (its BLOCK_N unused:
    a program takes 16 columns, 32 rows of W), default FUSED_ACT_CONFIG."""
    return _linear_act_and_mul(x, weight, out, rms_norm_eps, pdl, config, 0)


def linear_gelu_tanh_and_mul(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None,
                             rms_norm_eps: float | None = None, pdl: bool = False, config=None) -> torch.Tensor:
    """linear_silu_and_mul with GeGLU (the tanh GELU, Gemma's): ``gelu_tanh_and_mul(linear(x, weight,
    rms_norm_eps=...))`` in one launch."""
    return _linear_act_and_mul(x, weight, out, rms_norm_eps, pdl, config, 2)


def _linear_act_and_mul(x, weight, out, rms_norm_eps, pdl, config, act):
    from .activation import _act_and_mul
    from .kernels.matmul import gate_up_act_kernel

    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] != 1 or not x.dtype.is_floating_point:
        raise ValueError(f"x must be one token [1, hidden] of a floating dtype, got {getattr(x, 'shape', x)}")
    if (not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != x.shape[1]
            or weight.shape[0] % 2 or weight.dtype != x.dtype or weight.device != x.device):
        raise ValueError(f"weight must be {x.dtype} [2 * d, {x.shape[1]}] on {x.device}, got "
                         f"{getattr(weight, 'dtype', type(weight))} {tuple(getattr(weight, 'shape', ()))}")
    if rms_norm_eps is not None:
        check_eps("rms_norm_eps", rms_norm_eps)
    d, k = weight.shape[0] // 2, x.shape[1]
    if out is None:
        out = torch.empty(1, d, dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != (1, d) or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} [1, {d}] on {x.device}, got {out.dtype} "
                         f"{tuple(out.shape)}")
    norm_k = triton.next_power_of_2(k) if k else 1
    if (not use_triton(x) or x.dtype not in (torch.float16, torch.bfloat16) or k == 0 or d == 0
            or (rms_norm_eps is not None and norm_k > 16384)):
        return _act_and_mul(linear(x, weight, rms_norm_eps=rms_norm_eps), out, act)
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    x2 = x if x.stride(-1) == 1 else x.contiguous()
    _, bk, warps, stages = (config or FUSED_ACT_CONFIG) if x.is_cuda else _INTERPRETER_CONFIG
    gate_up_act_kernel[(triton.cdiv(d, 16),)](
        x2, w, out, k, d, w.stride(0), float(rms_norm_eps) if rms_norm_eps is not None else 0.0,
        NORM=rms_norm_eps is not None, NORM_K=norm_k, BLOCK_K=bk, EVEN_K=k % bk == 0, num_warps=warps,
        num_stages=stages, ACT=act, **pdl_launch(pdl, x))
    return out
