"""Plain-PyTorch twins of every kernel: the definition of correct.

Every op here matches the contract of SPEC §3 and is what the Triton and CUDA kernels are tested against.
"""
from __future__ import annotations

import math

import torch

from .tree import unpack_mask

__all__ = ["tree_attention", "check_tree_attention_args"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tree_attention_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int,
                              tree_mask: torch.Tensor | None) -> None:
    """Raise ``ValueError`` naming the problem unless the arguments satisfy the ``tree_attention`` contract."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, T/S, D); got {q.dim()}, {k.dim()}, {v.dim()} dims")
    b, hq, t, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    bk, hkv, s, dk = k.shape
    if bk != b or dk != d:
        raise ValueError(f"k/v batch and head dim must match q: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if q.dtype not in _FLOAT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if prefix_len < 0 or prefix_len + t > s:
        raise ValueError(f"prefix_len ({prefix_len}) + T ({t}) must be within the cache length S ({s})")
    if tree_mask is not None:
        if tree_mask.dtype != torch.int32 or tuple(tree_mask.shape) != (t, (t + 31) // 32):
            raise ValueError(f"tree_mask must be int32 of shape (T, ceil(T/32)) = ({t}, {(t + 31) // 32}), "
                             f"got {tree_mask.dtype} {tuple(tree_mask.shape)}")
        if tree_mask.device != q.device:
            raise ValueError(f"tree_mask is on {tree_mask.device} but q is on {q.device}")


def dense_visibility(t: int, prefix_len: int, tree_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Boolean ``(T, prefix_len + T)``: which cache entries each tree token may see (cache prefix + tree bits)."""
    if tree_mask is None:
        tree = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    else:
        tree = unpack_mask(tree_mask, t).to(device)
    return torch.cat([torch.ones(t, prefix_len, dtype=torch.bool, device=device), tree], dim=1)


def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int,
                   tree_mask: torch.Tensor | None, scale: float | None = None,
                   softcap: float | None = None) -> torch.Tensor:
    """Attention of T tree tokens over a KV cache, per SPEC §3.

    Returns ``o`` of shape ``(B, Hq, T, D)`` in ``q``'s dtype. Token ``i`` sees every one of the first ``prefix_len``
    cache entries and the tree entries ``prefix_len + j`` whose bit ``j`` is set in row ``i`` of ``tree_mask``;
    ``tree_mask=None`` means a plain causal chain (prefill / decode). Entries at or past ``prefix_len + T`` are
    ignored. Computed in float32. ``softcap`` (Gemma2) applies ``softcap * tanh(scores / softcap)`` before masking.
    """
    check_tree_attention_args(q, k, v, prefix_len, tree_mask)
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    n = prefix_len + t
    kf = k[:, :, :n].float().repeat_interleave(hq // hkv, dim=1)
    vf = v[:, :, :n].float().repeat_interleave(hq // hkv, dim=1)
    scores = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    visible = dense_visibility(t, prefix_len, tree_mask, q.device)
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), vf).to(q.dtype)
