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
        from .triton.tree_attention import tree_attention as fn  # optional: triton
        return fn
    if name == "cuda":
        from .cuda_ops import tree_attention as fn  # optional: the CUDA extension (csrc/)
        return fn
    raise ValueError(f"unknown backend {name!r}")


@functools.lru_cache(maxsize=256)
def _resolve(device_type: str, dtype: torch.dtype, head_dim: int, backend: str | None, env_backend: str | None,
             env_interpret: str | None) -> str:
    if device_type == "cpu" and not (backend or env_backend):
        # The Triton interpreter is a correctness tool (orders of magnitude slower than PyTorch): CPU tensors run the
        # reference unless a backend is asked for by name.
        return "reference"
    name = select_backend(torch.device(device_type), backend)
    if name == "cuda" and not (backend or env_backend):
        from .cuda_ops import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS  # optional: the CUDA extension (csrc/)
        if dtype not in SUPPORTED_DTYPES or head_dim not in SUPPORTED_HEAD_DIMS:
            name = select_backend(torch.device(device_type), supported=("triton", "reference"))
    return name


def resolve_backend(q: torch.Tensor, backend: str | None = None) -> str:
    """The backend ``tree_attention`` runs for queries like ``q`` (cached per device type, dtype, head dim, request
    and environment).

    A named backend (or one forced by ``OUROBOROS_BACKEND``) is used as asked; automatic choice takes the best usable
    one but steps down from "cuda" for what the CUDA kernel does not cover (fp32, head dims other than 64/128/256),
    and runs the reference on CPU tensors (never the Triton interpreter).
    """
    return _resolve(q.device.type, q.dtype, q.shape[-1], backend, os.environ.get("OUROBOROS_BACKEND"),
                    os.environ.get("TRITON_INTERPRET"))


def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int | torch.Tensor,
                   tree_mask: torch.Tensor | None, scale: float | None = None, *, window: int | None = None,
                   softcap: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Attention of T tree tokens over a KV cache (SPEC §3, contract v3).

    Parameters
    ----------
    q : torch.Tensor
        ``(B, Hq, T, D)`` queries of the T tree tokens (any strides).
    k, v : torch.Tensor
        ``(B, Hkv, S, D)`` cache keys/values after the update, ``Hq % Hkv == 0`` (GQA without repeats). Entries
        ``prefix_len .. prefix_len + T - 1`` are the tree tokens; entries at or past ``prefix_len + T`` are never read,
        so the cost follows the live length, not the buffer.
    prefix_len : int or torch.Tensor
        Cache entries before the tree: a Python int, or an int32/int64 tensor of shape () or (B,) on ``q``'s device,
        read by the kernel (no host sync), so one captured CUDA graph replays for every prefix length. A tensor value
        is clamped into ``[0, S - T]`` (checking it would need a host sync).
    tree_mask : torch.Tensor or None
        Packed int32 bits: bit j of row i set iff tree token i sees tree token j (its ancestors and itself;
        ``depth_i = popcount(row i) - 1``). ``(T, ceil(T/32))``: one tree shared by every batch row; ``(B, T,
        ceil(T/32))``: batch row b verifies its own tree ``tree_mask[b]`` (its tokens at positions ``prefix_len[b] +
        depth``); a ``(1, T, W)`` mask, or a ``(B, T, W)`` one whose dim 0 has stride 0 (an ``expand``), is one tree
        for every row and is read in place. None: a causal chain (prefill, decode).
    scale : float, optional
        Score scale, default ``1 / sqrt(D)``.
    window : int, optional
        Sliding window w >= 1: token i, at position ``prefix_len + depth_i``, sees key j only if the key's position
        (cache entry j: j; tree token j': ``prefix_len + depth_j'``) is ``> position_i - w`` (transformers' rule).
    softcap : float, optional
        c > 0: scores become ``c * tanh(scores / c)`` before masking (Gemma2).
    backend : str, optional
        "cuda", "triton" or "reference" (or ``OUROBOROS_BACKEND``); by default the best one for ``q``
        (:func:`resolve_backend`). Every backend computes the same function within dtype tolerance.

    Returns
    -------
    torch.Tensor
        ``(B, Hq, T, D)`` in ``q``'s dtype.

    Raises
    ------
    ValueError
        Naming the argument, for a bad shape, dtype or device, a mask of the wrong width or batch (not B or 1),
        ``window < 1``,
        ``softcap <= 0``, or a ``prefix_len`` tensor of the wrong dtype, shape or device.
    """
    return _impl(resolve_backend(q, backend))(q, k, v, prefix_len, tree_mask, scale, window=window, softcap=softcap)
