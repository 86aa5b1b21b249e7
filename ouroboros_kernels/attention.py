"""Public tree-attention op with backend dispatch (one function per backend, same signature)."""
from __future__ import annotations

import os

import torch

from . import reference
from .backend import select_backend

__all__ = ["tree_attention"]


def _impl(name: str):
    if name == "reference":
        return reference.tree_attention
    if name == "triton":
        from .triton.tree_attention import tree_attention as fn
        return fn
    if name == "cuda":
        from .cuda_ops import tree_attention as fn
        return fn
    raise ValueError(f"unknown backend {name!r}")


def _cuda_supports(q: torch.Tensor) -> bool:
    from .cuda_ops import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS
    return q.dtype in SUPPORTED_DTYPES and q.shape[-1] in SUPPORTED_HEAD_DIMS


def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int,
                   tree_mask: torch.Tensor | None = None, scale: float | None = None,
                   softcap: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Attention of T tree tokens over a KV cache (SPEC §3); see :func:`ouroboros_kernels.reference.tree_attention`.

    ``backend`` (or ``OUROBOROS_BACKEND``) forces "cuda", "triton" or "reference"; by default the best available one
    for ``q``'s device runs. Every backend computes the same function within dtype tolerance.
    """
    name = select_backend(q.device, backend)
    if name == "cuda" and not (backend or os.environ.get("OUROBOROS_BACKEND")) and not _cuda_supports(q):
        name = select_backend(q.device, supported=("triton", "reference"))   # auto mode: fall back, don't fail
    return _impl(name)(q, k, v, prefix_len, tree_mask, scale, softcap)
