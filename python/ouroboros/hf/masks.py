"""4-D attention masks for a token tree appended to a cache, for models our attention patch cannot reach.

Tree tokens get position ``prefix + depth`` and see the whole cache, their ancestors and themselves; sliding-window
layers follow transformers' rule (key position > query position - window).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ouroboros_kernels import ancestor_mask

__all__ = ["ATTENTION_LAYER_TYPES", "dense_tree_masks", "layer_masks"]

# the layer types whose cache can be cut back to the accepted tokens, and so verify token trees
ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})


def layer_masks(config, visible: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, dtype: torch.dtype):
    """4D additive mask(s) ``(1, 1, T, S)`` for HF ``forward`` from a boolean visibility ``(T, S)``, or ``(B, 1, T, S)``
    from a per-row visibility ``(B, T, S)`` with per-row positions ``q_pos`` (B, T) and ``k_pos`` (B, S).

    ``q_pos``/``k_pos`` are the logical positions of queries and keys. Returns one tensor, or a dict
    ``layer_type -> mask`` for models that mix sliding and full attention layers. Sliding windows follow HF's rule
    (key position > query position - window). Pure tensor ops: no host sync, graph-capturable.
    """
    def additive(mask: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        out = torch.where(mask, zero, torch.finfo(dtype).min)
        return out[None, None] if out.dim() == 2 else out[:, None]

    def windowed(window: int) -> torch.Tensor:
        return visible & (k_pos[..., None, :] > q_pos[..., :, None] - window)

    window = getattr(config, "sliding_window", None)
    layer_types = set(getattr(config, "layer_types", None) or [])
    if layer_types - ATTENTION_LAYER_TYPES:
        raise ValueError(f"layer types {sorted(layer_types - ATTENTION_LAYER_TYPES)} are not supported by ouroboros "
                         "tree verification")
    if "sliding_attention" in layer_types:
        return {kind: additive(windowed(window) if kind == "sliding_attention" else visible) for kind in layer_types}
    if window is not None and not layer_types and getattr(config, "use_sliding_window", True):
        return additive(windowed(window))
    return additive(visible)


def dense_tree_masks(config, prefix_len: int, parents: Sequence[int], depths: Sequence[int],
                     dtype: torch.dtype, device: torch.device):
    """The 4D mask(s) ``(1, 1, T, prefix_len + T)`` for a tree appended to ``prefix_len`` cached tokens."""
    t = len(parents)
    visible = torch.cat([torch.ones(t, prefix_len, dtype=torch.bool), ancestor_mask(parents)], dim=1).to(device)
    q_pos = prefix_len + torch.as_tensor(list(depths), dtype=torch.long, device=device)
    k_pos = torch.cat([torch.arange(prefix_len, device=device), q_pos])
    return layer_masks(config, visible, q_pos, k_pos, dtype)
