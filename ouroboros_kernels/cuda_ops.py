"""CUDA backend: thin wrappers over the compiled extension ``ouroboros_kernels._cuda`` (csrc/).

Each function mirrors one kernel one to one. The kernels are registered as torch custom ops
(``torch.ops.ouroboros.*``, defined in csrc/bindings.cpp) and get their fake (meta) implementation here, so they trace
under ``torch.compile`` and can be captured in CUDA graphs (no host sync, allocations through the caching allocator).

Importing this module raises ``ImportError`` when the extension is not built (CPU-only torch, or no nvcc at install
time); :mod:`ouroboros_kernels.backend` reports that as the reason the "cuda" backend is unavailable.
"""
from __future__ import annotations

import math

import torch

from . import _cuda  # noqa: F401  (ImportError when not built; loading it registers torch.ops.ouroboros.*)
from .reference import check_tree_attention_args

__all__ = ["tree_attention", "tree_attention_num_splits", "SUPPORTED_DTYPES", "SUPPORTED_HEAD_DIMS"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (64, 128, 256)


@torch.library.register_fake("ouroboros::tree_attention")
def _tree_attention_fake(q, k, v, prefix_len, tree_mask, scale, softcap=0.0, num_splits=0):
    return q.new_empty(q.shape)  # contiguous (B, Hq, T, D), like the CUDA op


def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int,
                   tree_mask: torch.Tensor | None, scale: float | None = None, softcap: float | None = None,
                   *, num_splits: int = 0) -> torch.Tensor:
    """Tree attention on the CUDA kernel (SPEC §3); same contract as :func:`ouroboros_kernels.reference.tree_attention`.

    Parameters
    ----------
    q : torch.Tensor
        ``(B, Hq, T, D)`` queries of the T tree tokens, fp16 or bf16, on a CUDA device. Any strides with a contiguous
        last dim and 16-byte aligned rows are used in place (e.g. a transposed ``(B, T, Hq, D)`` buffer); others are
        copied.
    k, v : torch.Tensor
        ``(B, Hkv, S, D)`` cache keys/values, ``Hq % Hkv == 0``; entries at or past ``prefix_len + T`` are ignored.
    prefix_len : int
        Number of cache entries before the tree tokens; every tree token sees all of them.
    tree_mask : torch.Tensor or None
        Packed int32 ``(T, ceil(T/32))`` visibility bits (see :mod:`ouroboros_kernels.tree`); ``None`` = causal chain.
    scale : float, optional
        Score scale, default ``1 / sqrt(D)``.
    softcap : float, optional
        Gemma2-style ``softcap * tanh(scores / softcap)`` before masking; ``None`` (or 0) disables it.
    num_splits : int, optional
        Key-range splits (flash-decoding); 0 lets the kernel choose from the SM count. For tests and benchmarks.

    Returns
    -------
    torch.Tensor
        ``(B, Hq, T, D)`` contiguous, in ``q``'s dtype.
    """
    check_tree_attention_args(q, k, v, prefix_len, tree_mask)
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"the cuda tree_attention kernel supports float16/bfloat16, got {q.dtype}; "
                         "use backend='triton' or 'reference' for float32")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"the cuda tree_attention kernel supports head dims {SUPPORTED_HEAD_DIMS}, got {q.shape[-1]}")
    if q.device.type != "cuda":
        raise ValueError(f"the cuda tree_attention kernel needs CUDA tensors, got {q.device}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    softcap = 0.0 if softcap is None else float(softcap)
    if softcap < 0.0:
        raise ValueError(f"softcap must be positive (or None), got {softcap}")
    return torch.ops.ouroboros.tree_attention(q, k, v, int(prefix_len), tree_mask, scale, softcap, int(num_splits))


def tree_attention_num_splits(q: torch.Tensor, k: torch.Tensor, prefix_len: int, num_splits: int = 0) -> int:
    """Key-range splits the kernel uses for these shapes (``num_splits`` > 0 forces, rounded to whole key tiles)."""
    return int(_cuda.tree_attention_num_splits(q, k, int(prefix_len), int(num_splits)))
