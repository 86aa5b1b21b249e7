"""Token trees: packed bit masks, depths and ancestor walks.

A token tree is given by ``parents``: ``parents[i]`` is the index of node ``i``'s parent, or ``-1`` for a node that
hangs directly off the cached prefix. Parents always come before their children (``parents[i] < i``), so index order
is a topological order. Node ``i`` may attend to node ``j`` iff ``j`` is ``i`` or an ancestor of ``i``.

The packed mask layout is the kernel contract of SPEC §3 (v3): an int32 tensor of shape ``(T, ceil(T / 32))`` where
bit ``j % 32`` of word ``j // 32`` in row ``i`` is set iff node ``i`` may see node ``j``: one tree shared by every batch
row; or ``(B, T, ceil(T / 32))``, batch row ``b``'s own tree in ``mask[b]`` (a ``(1, T, W)`` mask, or one whose dim 0
has stride 0, is again one tree for every row).
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = [
    "validate_parents",
    "depths",
    "ancestor_mask",
    "pack_mask",
    "unpack_mask",
    "check_tree_mask",
    "mask_batch_stride",
    "causal_packed_mask",
    "path_to",
]


def validate_parents(parents: Sequence[int]) -> None:
    """Raise ``ValueError`` unless every parent index is ``-1`` or an earlier node."""
    for i, p in enumerate(parents):
        if not (-1 <= p < i):
            raise ValueError(f"tree node {i} has parent {p}; parents must be -1 or an earlier node index")


def depths(parents: Sequence[int]) -> list[int]:
    """Depth of every node: 0 for nodes hanging off the prefix, parent's depth + 1 otherwise."""
    out: list[int] = []
    for p in parents:
        out.append(0 if p < 0 else out[p] + 1)
    return out


def ancestor_mask(parents: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Dense boolean ``(T, T)`` mask: ``[i, j]`` is True iff ``j == i`` or ``j`` is an ancestor of ``i``."""
    validate_parents(parents)
    t = len(parents)
    mask = torch.zeros(t, t, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i] = mask[p]
        mask[i, i] = True
    return mask.to(device) if device is not None else mask


def pack_mask(dense: torch.Tensor) -> torch.Tensor:
    """Pack a boolean ``(T, T)`` mask into int32 words ``(T, ceil(T / 32))`` (bit ``j % 32`` of word ``j // 32``), or
    a batch of per-row masks ``(B, T, T)`` into ``(B, T, ceil(T / 32))`` (each row packed alone)."""
    if dense.dim() not in (2, 3) or dense.shape[-1] != dense.shape[-2]:
        raise ValueError(f"pack_mask expects a square (T, T) or (B, T, T) mask, got shape {tuple(dense.shape)}")
    t = dense.shape[-1]
    lead = dense.shape[:-1]                                                    # (T,) or (B, T)
    words = (t + 31) // 32
    padded = torch.zeros(*lead, words * 32, dtype=torch.int64, device=dense.device)
    padded[..., :t] = dense.to(torch.int64)
    weights = torch.bitwise_left_shift(torch.ones(32, dtype=torch.int64, device=dense.device),
                                       torch.arange(32, device=dense.device))
    packed = (padded.view(*lead, words, 32) * weights).sum(-1)
    # Reinterpret the low 32 bits as a signed int32 (bit 31 set -> negative value).
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack_mask(packed: torch.Tensor, t: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: boolean ``(T, T)`` from int32 words ``(T, ceil(T / 32))``, or ``(B, T, T)`` from
    ``(B, T, ceil(T / 32))`` (any strides, a stride-0 batch dim included)."""
    if packed.dtype != torch.int32 or packed.dim() not in (2, 3):
        raise ValueError(f"packed tree mask must be a 2-D or 3-D int32 tensor, got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    t = packed.shape[-2] if t is None else t
    if packed.shape[-1] != (t + 31) // 32:
        raise ValueError(f"packed tree mask has {packed.shape[-1]} words per row; T={t} needs {(t + 31) // 32}")
    bits = torch.arange(32, device=packed.device, dtype=torch.int32)
    dense = (packed.unsqueeze(-1) >> bits).bitwise_and(1).bool()  # (..., T, W, 32)
    return dense.reshape(*packed.shape[:-1], -1)[..., :t]


def check_tree_mask(tree_mask, batch: int, t: int, device: torch.device) -> None:
    """Raise ``ValueError`` naming ``tree_mask`` unless it is None or a packed int32 mask on ``device`` of shape
    ``(T, ceil(T/32))`` (shared by every row) or ``(B, T, ceil(T/32))`` with ``B`` equal to ``batch`` or 1 (any strides:
    dim 0 may have stride 0). Shapes, dtype and device only: the bits are never read (no host sync)."""
    if tree_mask is None:
        return
    w = (t + 31) // 32
    shape = tuple(getattr(tree_mask, "shape", ()))
    if not isinstance(tree_mask, torch.Tensor) or tree_mask.dtype != torch.int32 \
            or shape not in ((t, w), (batch, t, w), (1, t, w)):
        raise ValueError(f"tree_mask must be int32 of shape (T, ceil(T/32)) = ({t}, {w}) or (B, T, ceil(T/32)) = "
                         f"({batch}, {t}, {w}), got {getattr(tree_mask, 'dtype', type(tree_mask).__name__)} {shape}")
    if tree_mask.device != device:
        raise ValueError(f"tree_mask is on {tree_mask.device} but q is on {device}")


def mask_batch_stride(tree_mask: torch.Tensor) -> int:
    """Elements from batch row ``b``'s packed mask to row ``b + 1``'s: 0 when every row shares one tree (a 2-D mask,
    a ``(1, T, W)`` one, or a stride-0 dim 0), else ``tree_mask.stride(0)``."""
    if tree_mask.dim() == 2 or tree_mask.shape[0] == 1:
        return 0
    return tree_mask.stride(0)


def causal_packed_mask(t: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Packed mask of a plain chain of ``t`` tokens (lower-triangular)."""
    return pack_mask(torch.ones(t, t, dtype=torch.bool, device=device).tril())


def path_to(parents: Sequence[int], node: int) -> list[int]:
    """Node indices from the top of ``node``'s branch down to ``node`` (inclusive), in tree order."""
    path: list[int] = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]
