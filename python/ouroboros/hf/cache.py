"""KV-cache bookkeeping for HF ``DynamicCache``: keep exactly the accepted path (SPEC §2 step 5).

The cache is created without a model config, so every layer keeps the full history and cache index == position;
sliding windows are applied by the mask, not by dropping entries.
"""
from __future__ import annotations

from typing import Sequence

import torch
from transformers import DynamicCache

__all__ = ["new_cache", "cache_length", "keep_entries", "crop_cache", "filled_layers"]


def new_cache() -> DynamicCache:
    return DynamicCache()


def cache_length(cache: DynamicCache) -> int:
    return cache.get_seq_length()


def filled_layers(cache: DynamicCache) -> list:
    """The cache's layers that hold keys (layers not written yet have none)."""
    return [layer for layer in cache.layers if getattr(layer, "keys", None) is not None and layer.keys.numel()]


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Drop every entry at index >= ``length`` (rollback as a slice; nothing recomputed)."""
    for layer in filled_layers(cache):
        layer.keys = layer.keys[..., :length, :]
        layer.values = layer.values[..., :length, :]


def keep_entries(cache: DynamicCache, prefix_len: int, keep: Sequence[int]) -> int:
    """Keep the first ``prefix_len`` entries plus tree entries ``prefix_len + keep[i]`` (in that order); drop the rest.

    Accepted entries are gathered into contiguous slots in place. Returns the new length. ``keep`` must be increasing.
    Returns without any copy when ``keep`` is already ``0..n-1``.
    """
    n = len(keep)
    if list(keep) != list(range(n)):
        idx = torch.as_tensor(keep, dtype=torch.long)
        for layer in filled_layers(cache):
            src = idx.to(layer.keys.device) + prefix_len
            layer.keys[..., prefix_len:prefix_len + n, :] = layer.keys[..., src, :]
            layer.values[..., prefix_len:prefix_len + n, :] = layer.values[..., src, :]
    crop_cache(cache, prefix_len + n)
    return prefix_len + n
