"""Shared host checks of the ops: which backend runs, and row views of [..., hidden] tensors."""
from __future__ import annotations

import os

import torch


def use_triton(t: torch.Tensor) -> bool:
    """Triton on CUDA, or on the CPU under Triton's interpreter; the PyTorch form otherwise."""
    return t.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def check_same(name: str, t, like: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.shape != like.shape or t.dtype != like.dtype or t.device != like.device:
        raise ValueError(f"{name} must be {like.dtype} {tuple(like.shape)} on {like.device}, got "
                         f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")


def rows_view(name: str, t: torch.Tensor) -> torch.Tensor:
    """[..., hidden] as a 2-D [rows, hidden] view (no copy); the last dimension must be contiguous."""
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension")
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError as e:
        raise ValueError(f"{name}: leading dimensions must flatten without a copy ({e})") from None
