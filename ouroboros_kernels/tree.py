"""Token trees: packed bit masks, depths and ancestor walks.

A token tree is given by ``parents``: ``parents[i]`` is the index of node ``i``'s parent, or ``-1`` for a node that
hangs directly off the cached prefix. Parents always come before their children (``parents[i] < i``), so index order
is a topological order. Node ``i`` may attend to node ``j`` iff ``j`` is ``i`` or an ancestor of ``i``.

The packed mask layout is the kernel contract of SPEC §3: an int32 tensor of shape ``(T, ceil(T / 32))`` where bit
``j % 32`` of word ``j // 32`` in row ``i`` is set iff node ``i`` may see node ``j``.
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
    """Pack a boolean ``(T, T)`` mask into int32 words ``(T, ceil(T / 32))`` (bit ``j % 32`` of word ``j // 32``)."""
    if dense.dim() != 2 or dense.shape[0] != dense.shape[1]:
        raise ValueError(f"pack_mask expects a square (T, T) mask, got shape {tuple(dense.shape)}")
    t = dense.shape[0]
    words = (t + 31) // 32
    padded = torch.zeros(t, words * 32, dtype=torch.int64, device=dense.device)
    padded[:, :t] = dense.to(torch.int64)
    weights = torch.bitwise_left_shift(torch.ones(32, dtype=torch.int64, device=dense.device),
                                       torch.arange(32, device=dense.device))
    packed = (padded.view(t, words, 32) * weights).sum(-1)
    # Reinterpret the low 32 bits as a signed int32 (bit 31 set -> negative value).
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack_mask(packed: torch.Tensor, t: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: boolean ``(T, T)`` from int32 words ``(T, ceil(T / 32))``."""
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(f"packed tree mask must be a 2-D int32 tensor, got {packed.dtype} {tuple(packed.shape)}")
    t = packed.shape[0] if t is None else t
    if packed.shape[1] != (t + 31) // 32:
        raise ValueError(f"packed tree mask has {packed.shape[1]} words per row; T={t} needs {(t + 31) // 32}")
    bits = torch.arange(32, device=packed.device, dtype=torch.int32)
    dense = (packed.unsqueeze(-1) >> bits).bitwise_and(1).bool()  # (T, W, 32)
    return dense.reshape(packed.shape[0], -1)[:, :t]


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
