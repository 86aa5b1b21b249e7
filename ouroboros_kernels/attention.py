"""Public tree-attention op with backend dispatch (one function per backend, same signature)."""
from __future__ import annotations

import functools
import os

import torch

from . import reference
from .backend import select_backend

__all__ = ["tree_attention", "resolve_backend"]


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


@functools.lru_cache(maxsize=256)
def _resolve(device_type: str, dtype: torch.dtype, head_dim: int, backend: str | None, env_backend: str | None,
             env_interpret: str | None) -> str:
    name = select_backend(torch.device(device_type), backend)
    if name == "cuda" and not (backend or env_backend):
        from .cuda_ops import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS
        if dtype not in SUPPORTED_DTYPES or head_dim not in SUPPORTED_HEAD_DIMS:
            name = select_backend(torch.device(device_type), supported=("triton", "reference"))
    return name


def resolve_backend(q: torch.Tensor, backend: str | None = None) -> str:
    """The backend ``tree_attention`` runs for queries like ``q`` (cached per device type, dtype, head dim, request
    and environment).

    A named backend (or one forced by ``OUROBOROS_BACKEND``) is used as asked; automatic choice takes the best usable
    one but steps down from "cuda" for what the CUDA kernel does not cover (fp32, head dims other than 64/128/256).
    """
    return _resolve(q.device.type, q.dtype, q.shape[-1], backend, os.environ.get("OUROBOROS_BACKEND"),
                    os.environ.get("TRITON_INTERPRET"))


def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int,
                   tree_mask: torch.Tensor | None = None, scale: float | None = None,
                   softcap: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Attention of T tree tokens over a KV cache (SPEC §3); see :func:`ouroboros_kernels.reference.tree_attention`.

    ``backend`` (or ``OUROBOROS_BACKEND``) forces "cuda", "triton" or "reference"; by default the best available one
    for ``q``'s device runs. Every backend computes the same function within dtype tolerance.
    """
    return _impl(resolve_backend(q, backend))(q, k, v, prefix_len, tree_mask, scale, softcap)
