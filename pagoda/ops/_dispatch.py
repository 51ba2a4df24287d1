"""Shared host checks of the ops: which backend runs, and row views of [..., hidden] tensors."""
from __future__ import annotations

import functools
import os

import torch


def use_triton(t: torch.Tensor) -> bool:
    """Triton on CUDA, or on the CPU under Triton's interpreter; the PyTorch form otherwise."""
    return t.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def check_same(name: str, t, like: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.shape != like.shape or t.dtype != like.dtype or t.device != like.device:
        raise ValueError(f"{name} must be {like.dtype} {tuple(like.shape)} on {like.device}, got "
                         f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")


def check_scale(name: str, value) -> float:
    """A quantization scale: a finite real number > 0 (bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{name} must be a float > 0, got {value!r}")
    return float(value)


def check_eps(name: str, value) -> float:
    """A norm's epsilon: a real number >= 0 (bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a float >= 0, got {value!r}")
    return float(value)


def env_switch(name: str, default: str) -> bool:
    """An environment switch of 0 / 1 (anything else is a ValueError naming it)."""
    env = os.environ.get(name, default)
    if env not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {env!r}")
    return env == "1"


def rows_view(name: str, t: torch.Tensor) -> torch.Tensor:
    """[..., hidden] as a 2-D [rows, hidden] view (no copy); the last dimension must be contiguous."""
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension")
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError as e:
        raise ValueError(f"{name}: leading dimensions must flatten without a copy ({e})") from None


@functools.lru_cache(maxsize=None)
def capability(device: torch.device) -> tuple[int, int]:
    """The CUDA device's compute capability, asked once per device."""
    return torch.cuda.get_device_capability(device)


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """The CUDA device's streaming multiprocessors, asked once per device."""
    return torch.cuda.get_device_properties(device).multi_processor_count


_PDL_ON = {"PDL": True, "launch_pdl": True}
_PDL_OFF = {"PDL": False}


def pdl_launch(enable_pdl, t: torch.Tensor) -> dict:
    """Launch arguments of a kernel with a PDL constexpr (kernels/pdl.py): {"PDL": True, "launch_pdl": True}
    for a programmatic dependent launch when enable_pdl is set and t is on a Hopper-or-later GPU (griddepcontrol
    is sm_90 PTX), else {"PDL": False} (shared dicts, for ** unpacking only: no allocation per launch).
    enable_pdl None is off (FlashInfer's ops take None as "where the device supports it"; here the caller opts
    in: the engine's decode steps do)."""
    if enable_pdl and t.device.type == "cuda" and capability(t.device)[0] >= 9:
        return _PDL_ON
    return _PDL_OFF


def pdl_default() -> bool:
    """Whether the engine launches its decode-path Triton kernels as programmatic dependent launches
    (PAGODA_PDL=1 / 0, default 1; models/llama.py and engine/runner.py read it when they are built). On since
    session 17: batch-1 decode 4.69 -> 4.64 ms per token on the H200 (two interleaved runs each; session 11 had
    measured it 1% slower, before the Gluon decode kernel; benchmarks/results/engine_h100.md)."""
    return env_switch("PAGODA_PDL", "1")
