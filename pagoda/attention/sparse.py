"""Block-sparse attention (FlashInfer's BlockSparseAttentionWrapper and
VariableBlockSparseAttentionWrapper), lowered onto the one paged kernel.

A BSR matrix of (M / R) x (N / C) blocks says which query rows see which keys. Block row i
is a "request" of R queries whose KV is its non-zero column blocks: with the keys viewed as
pages of C tokens (k[N, H, D] -> [N / C, C, H, D], no copy), a block row's column indices
*are* its page table, so block-sparse attention is batch paged prefill over that table, read
with the same load-balanced plan, persistent kernel and split-KV merge. Masks inside
blocks (``mask`` / ``packed_mask``, and ``causal`` over global positions) become the
kernel's custom mask; column blocks that causal masking leaves empty are dropped from the
plan, so time follows the number of non-empty blocks.

The variable form (per-KV-head block rows and columns of any size) lowers the same way per
KV head, with token-granular pages (page_size 1): each block row lists the tokens of its
selected column blocks.
"""
from __future__ import annotations

import numpy as np
import torch

from .formats import check_indptr, not_planned, to_host_array
from .prefill import BatchPrefillWithPagedKVCacheWrapper


def _bool_host(name: str, x, shape=None) -> np.ndarray:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor, got {getattr(x, 'dtype', type(x))}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    return x.detach().cpu().numpy()


class BlockSparseAttentionWrapper:
    """Block-sparse attention over a BSR description (FlashInfer-compatible).

    plan(indptr [M/R + 1], indices [nnz] column-block ids, M, N, R, C, heads, head_dim, mask=None
    [nnz, R, C] bool (or packed_mask: its bits, little-endian), causal=False (q row >= key
    position, global indices)); run(q [M, num_qo_heads, D], k, v [N, num_kv_heads, D]).
    R and C: any block size with M % R == 0, N % C == 0 and C <= 128.
    """

    def __init__(self, float_workspace_buffer: torch.Tensor, backend: str = "auto", variant=None) -> None:
        self._inner = BatchPrefillWithPagedKVCacheWrapper(float_workspace_buffer, "NHD", backend=backend,
                                                          variant=variant)
        self._shape = None

    def plan(self, indptr, indices, M: int, N: int, R: int, C: int, num_qo_heads: int, num_kv_heads: int,
             head_dim: int, mask: torch.Tensor | None = None, packed_mask: torch.Tensor | None = None,
             causal: bool = False, pos_encoding_mode: str = "NONE", use_fp16_qk_reduction: bool = False,
             logits_soft_cap: float | None = None, sm_scale: float | None = None, rope_scale=None, rope_theta=None,
             q_data_type="float16", kv_data_type=None, o_data_type=None, non_blocking: bool = True) -> None:
        for name, val in (("M", M), ("N", N), ("R", R), ("C", C)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if M % R:
            raise ValueError(f"R ({R}) must divide M ({M})")
        if N % C:
            raise ValueError(f"C ({C}) must divide N ({N})")
        if C > 128:
            raise ValueError(f"C must be <= 128 (a column block is a page of the paged kernel), got {C}")
        mb, nb = M // R, N // C
        ip = check_indptr("indptr", indptr, mb + 1)
        if ip[0] != 0:
            raise ValueError(f"indptr must start at 0, got {ip[0]}")
        cols = to_host_array("indices", indices)
        if len(cols) < ip[-1]:
            raise ValueError(f"indices has {len(cols)} entries, indptr needs {ip[-1]}")
        cols = cols[:ip[-1]]
        if len(cols) and (cols.min() < 0 or cols.max() >= nb):
            raise ValueError(f"indices must be column-block ids in 0..{nb - 1} (N / C), found "
                             f"{int(cols.min())}..{int(cols.max())}")
        nnz = len(cols)
        block_mask = None
        if mask is not None and packed_mask is not None:
            raise ValueError("pass mask or packed_mask, not both")
        if mask is not None:
            block_mask = _bool_host("mask", mask, (nnz, R, C))
        elif packed_mask is not None:
            if not isinstance(packed_mask, torch.Tensor) or packed_mask.dtype != torch.uint8:
                raise ValueError("packed_mask must be a uint8 tensor (bits of mask, little-endian)")
            need = -(-nnz * R * C // 8)
            if packed_mask.numel() < need:
                raise ValueError(f"packed_mask has {packed_mask.numel()} bytes; nnz * R * C bits need {need}")
            bits = np.unpackbits(packed_mask.detach().cpu().numpy()[:need], bitorder="little")[:nnz * R * C]
            block_mask = bits.astype(bool).reshape(nnz, R, C)
        row_of = np.repeat(np.arange(mb), np.diff(ip))
        keep_block = np.ones(nnz, dtype=bool)
        partial = np.zeros(nnz, dtype=bool)  # blocks that need a mask inside
        if causal:
            first_key, last_key = cols * C, cols * C + C - 1
            first_q, last_q = row_of * R, row_of * R + R - 1
            keep_block &= first_key <= last_q  # some query of the block row sees some key
            partial |= last_key > first_q
        if block_mask is not None:
            keep_block &= block_mask.reshape(nnz, -1).any(axis=1)
            partial |= ~block_mask.reshape(nnz, -1).all(axis=1)
        sel = np.nonzero(keep_block)[0]
        counts = np.bincount(row_of[sel], minlength=mb)
        new_ip = np.concatenate([[0], np.cumsum(counts)])
        custom = None
        if np.any(partial[sel]):
            # per block: [R, C] bits, then per block row [R, blocks * C] row-major
            m = np.ones((len(sel), R, C), dtype=bool)
            if block_mask is not None:
                m &= block_mask[sel]
            if causal:
                qpos = (row_of[sel] * R)[:, None, None] + np.arange(R)[None, :, None]
                kpos = (cols[sel] * C)[:, None, None] + np.arange(C)[None, None, :]
                m &= kpos <= qpos
            parts = [m[new_ip[i]:new_ip[i + 1]].transpose(1, 0, 2).reshape(-1) for i in range(mb)]
            custom = torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, bool))
        last = np.where(counts > 0, C, 0)
        self._shape = (M, N, C, num_kv_heads, head_dim)
        self._inner.plan(torch.from_numpy(np.arange(mb + 1) * R), torch.from_numpy(new_ip),
                         torch.from_numpy(cols[sel]).to(torch.int32), torch.from_numpy(last), num_qo_heads,
                         num_kv_heads, head_dim, C, custom_mask=custom, causal=False,
                         pos_encoding_mode=pos_encoding_mode, sm_scale=sm_scale, logits_soft_cap=logits_soft_cap,
                         q_data_type=q_data_type, kv_data_type=kv_data_type)
        self.nnz_blocks = int(len(sel))

    begin_forward = plan

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None = None,
            lse: torch.Tensor | None = None, return_lse: bool = False):
        """q [M, num_qo_heads, D], k / v [N, num_kv_heads, D] -> out like q (and lse [M, heads], base 2)."""
        if self._shape is None:
            raise not_planned(self)
        M, N, C, hk, d = self._shape
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (N, hk, d):
                raise ValueError(f"{name} must be [N={N}, {hk}, {d}], got {tuple(getattr(t, 'shape', ()))}")
        cache = (k.unflatten(0, (N // C, C)), v.unflatten(0, (N // C, C)))
        return self._inner.run(q, cache, out=out, lse=lse, return_lse=return_lse)

    forward = run


class VariableBlockSparseAttentionWrapper:
    """Per-KV-head block sparsity with block rows and columns of any sizes (FlashInfer-compatible).

    plan(block_mask_map [num_kv_heads, MB, NB] bool, block_row_sz [num_kv_heads, MB],
    block_col_sz [num_kv_heads, NB], num_qo_heads, num_kv_heads, head_dim, causal=False);
    run(q [num_qo_heads, qo_len, D], k, v [num_kv_heads, kv_len, D]) -> [num_qo_heads, qo_len, D]
    (FlashInfer's HND layout). Each KV head is one paged plan over token-granular pages.
    """

    def __init__(self, float_workspace_buffer: torch.Tensor, backend: str = "auto") -> None:
        self._ws = float_workspace_buffer
        self._backend = backend
        self._heads = []
        self._shape = None

    def plan(self, block_mask_map: torch.Tensor, block_row_sz: torch.Tensor, block_col_sz: torch.Tensor,
             num_qo_heads: int, num_kv_heads: int, head_dim: int, causal: bool = False,
             pos_encoding_mode: str = "NONE", use_fp16_qk_reduction: bool = False, logits_soft_cap=None,
             sm_scale: float | None = None, rope_scale=None, rope_theta=None, q_data_type="float16",
             kv_data_type=None, non_blocking: bool = True) -> None:
        if not isinstance(block_mask_map, torch.Tensor) or block_mask_map.dim() != 3:
            raise ValueError("block_mask_map must be a [num_kv_heads, MB, NB] bool tensor")
        hk, mb, nb = block_mask_map.shape
        if hk != num_kv_heads:
            raise ValueError(f"block_mask_map has {hk} heads, num_kv_heads is {num_kv_heads}")
        if num_qo_heads % num_kv_heads:
            raise ValueError(f"num_qo_heads ({num_qo_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        bm = _bool_host("block_mask_map", block_mask_map)
        rows = self._sizes("block_row_sz", block_row_sz, (hk, mb))
        colsz = self._sizes("block_col_sz", block_col_sz, (hk, nb))
        qo_len, kv_len = int(rows[0].sum()), int(colsz[0].sum())
        if np.any(rows.sum(axis=1) != qo_len):
            raise ValueError("block_row_sz must sum to the same qo_len on every KV head")
        if np.any(colsz.sum(axis=1) != kv_len):
            raise ValueError("block_col_sz must sum to the same kv_len on every KV head")
        group = num_qo_heads // num_kv_heads
        self._heads = []
        for g in range(hk):
            r0 = np.concatenate([[0], np.cumsum(rows[g])])
            c0 = np.concatenate([[0], np.cumsum(colsz[g])])
            toks, ip, masks, need_mask = [], [0], [], False
            for i in range(mb):
                sel = np.nonzero(bm[g, i])[0]
                t = np.concatenate([np.arange(c0[j], c0[j + 1]) for j in sel]) if len(sel) else np.zeros(0, np.int64)
                if causal and len(t):
                    qpos = r0[i] + np.arange(rows[g, i])
                    m = t[None, :] <= qpos[:, None]
                    need_mask |= not m.all()
                    masks.append(m.reshape(-1))
                else:
                    masks.append(np.ones(rows[g, i] * len(t), dtype=bool))
                toks.append(t)
                ip.append(ip[-1] + len(t))
            w = BatchPrefillWithPagedKVCacheWrapper(self._ws, "NHD", backend=self._backend)
            w.plan(torch.from_numpy(r0), torch.tensor(ip), torch.from_numpy(np.concatenate(toks)).to(torch.int32),
                   torch.tensor([1 if ip[i + 1] > ip[i] else 0 for i in range(mb)]), group, 1, head_dim, 1,
                   custom_mask=torch.from_numpy(np.concatenate(masks)) if need_mask else None,
                   sm_scale=sm_scale, logits_soft_cap=logits_soft_cap, q_data_type=q_data_type,
                   kv_data_type=kv_data_type)
            self._heads.append(w)
        self._shape = (num_qo_heads, num_kv_heads, qo_len, kv_len, head_dim, group)

    begin_forward = plan

    @staticmethod
    def _sizes(name, x, shape):
        arr = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.int64)
        if arr.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
        if np.any(arr < 0):
            raise ValueError(f"{name} must be >= 0")
        return arr

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None = None,
            lse: torch.Tensor | None = None, return_lse: bool = False):
        if self._shape is None:
            raise not_planned(self)
        hq, hk, qo_len, kv_len, d, group = self._shape
        if not isinstance(q, torch.Tensor) or tuple(q.shape) != (hq, qo_len, d):
            raise ValueError(f"q must be [{hq}, {qo_len}, {d}] (HND), got {tuple(getattr(q, 'shape', ()))}")
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (hk, kv_len, d):
                raise ValueError(f"{name} must be [{hk}, {kv_len}, {d}] (HND), got {tuple(getattr(t, 'shape', ()))}")
        if out is None:
            out = torch.empty_like(q)
        if return_lse and lse is None:
            lse = torch.empty(hq, qo_len, dtype=torch.float32, device=q.device)
        for g, w in enumerate(self._heads):
            sl = slice(g * group, (g + 1) * group)
            cache = (k[g][:, None, None, :], v[g][:, None, None, :])  # [kv_len pages, 1 slot, 1 head, D]
            # out's head slice, viewed [qo_len, group, D], is written in place (strided rows are fine)
            res = w.run(q[sl].transpose(0, 1), cache, out=out[sl].transpose(0, 1), return_lse=return_lse)
            if return_lse:
                lse[sl] = res[1].transpose(0, 1)
        return (out, lse) if return_lse else out

    forward = run


__all__ = ["BlockSparseAttentionWrapper", "VariableBlockSparseAttentionWrapper"]
