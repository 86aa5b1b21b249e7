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
# + "ngram_lookup", "ngram_insert" when the extension has the n-gram ops (see the end of this file)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (64, 128, 256)


@torch.library.register_fake("ouroboros::tree_attention")
def _tree_attention_fake(q, k, v, prefix_len_tensor, prefix_len, tree_mask, scale, softcap=0.0, window=0,
                         num_splits=0):
    return q.new_empty(q.shape)  # contiguous (B, Hq, T, D), like the CUDA op


def _prefix_args(prefix_len: int | torch.Tensor) -> tuple[torch.Tensor | None, int]:
    """The op's (prefix_len_tensor, prefix_len) pair: a tensor is read by the kernel, an int passed by value."""
    return (prefix_len, 0) if isinstance(prefix_len, torch.Tensor) else (None, int(prefix_len))


def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int | torch.Tensor,
                   tree_mask: torch.Tensor | None, scale: float | None = None, *, window: int | None = None,
                   softcap: float | None = None, num_splits: int = 0) -> torch.Tensor:
    """Tree attention on the CUDA kernel (SPEC §3, contract v3); same contract as
    :func:`ouroboros_kernels.reference.tree_attention`.

    Parameters
    ----------
    q : torch.Tensor
        ``(B, Hq, T, D)`` queries of the T tree tokens, fp16 or bf16, on a CUDA device. Any strides with a contiguous
        last dim and 16-byte aligned rows are used in place (e.g. a transposed ``(B, T, Hq, D)`` buffer); others are
        copied.
    k, v : torch.Tensor
        ``(B, Hkv, S, D)`` cache keys/values, ``Hq % Hkv == 0``; entries at or past ``prefix_len + T`` are never read.
    prefix_len : int or torch.Tensor
        Cache entries before the tree tokens: a Python int, or an int32/int64 tensor of shape () or (B,) on ``q``'s
        device that the kernel reads (no host sync; clamped into ``[0, S - T]``), so a captured CUDA graph replays
        for every prefix length.
    tree_mask : torch.Tensor or None
        Packed int32 ``(T, ceil(T/32))`` visibility bits shared by every batch row, or ``(B, T, ceil(T/32))`` with
        batch row b's tree in ``tree_mask[b]`` (see :mod:`ouroboros_kernels.tree`); a ``(1, T, W)`` mask or a stride-0
        dim 0 is one shared tree, never copied B times; ``None`` = causal chain. Each row's ``(T, W)`` block is read
        in place when it is contiguous, else the mask is copied.
    scale : float, optional
        Score scale, default ``1 / sqrt(D)``.
    window : int, optional
        Sliding window w >= 1 on true positions (``prefix_len + depth``), or None.
    softcap : float, optional
        Gemma2-style ``softcap * tanh(scores / softcap)`` before masking, or None.
    num_splits : int, optional
        Key-range splits (flash-decoding); 0 lets the kernel choose from the SM count. For tests and benchmarks.

    Returns
    -------
    torch.Tensor
        ``(B, Hq, T, D)`` contiguous, in ``q``'s dtype.
    """
    check_tree_attention_args(q, k, v, prefix_len, tree_mask, window, softcap)
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"the cuda tree_attention kernel supports float16/bfloat16, got {q.dtype}; "
                         "use backend='triton' or 'reference' for float32")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"the cuda tree_attention kernel supports head dims {SUPPORTED_HEAD_DIMS}, got {q.shape[-1]}")
    if q.device.type != "cuda":
        raise ValueError(f"the cuda tree_attention kernel needs CUDA tensors, got {q.device}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    prefix_tensor, prefix_value = _prefix_args(prefix_len)
    return torch.ops.ouroboros.tree_attention(q, k, v, prefix_tensor, prefix_value, tree_mask, scale,
                                              0.0 if softcap is None else float(softcap),
                                              0 if window is None else int(window), int(num_splits))


def tree_attention_num_splits(q: torch.Tensor, k: torch.Tensor, prefix_len: int | torch.Tensor, num_splits: int = 0,
                              window: int | None = None) -> int:
    """Key-range splits the kernel uses for these shapes (``num_splits`` > 0 forces, capped at the key tiles the host
    can bound: ``prefix_len + T`` less the window for an int, the buffer (or window + T) for a device length)."""
    prefix_tensor, prefix_value = _prefix_args(prefix_len)
    window = 0 if window is None else int(window)
    return int(_cuda.tree_attention_num_splits(q, k, prefix_value, int(num_splits), window, prefix_tensor is not None))


# ---- n-gram phrase pool (contract and layout: ouroboros_kernels/ngram.py; kernels: csrc/ngram.cu) -------------------
# Defined only when the built extension has the ops (one built before them does not): ouroboros_kernels.ngram offers
# the "cuda" backend for these ops exactly when this module has both functions.
if hasattr(torch.ops.ouroboros, "ngram_lookup") and hasattr(torch.ops.ouroboros, "ngram_insert"):

    @torch.library.register_fake("ouroboros::ngram_lookup")
    def _ngram_lookup_fake(key_to_slot, counts, phrases, keys, k, stats=None):
        b, p = keys.shape[0], phrases.shape[2]
        return keys.new_empty((b, k, p), dtype=torch.int64), keys.new_empty((b, k), dtype=torch.bool)

    @torch.library.register_fake("ouroboros::ngram_insert")
    def _ngram_insert_fake(key_to_slot, slot_key, counts, phrases, lru_prev, lru_next, num_keys, keys, new_phrases,
                           old=None):
        return None

    def ngram_lookup(pool, keys: torch.Tensor, k: int,
                     stats: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to ``k`` phrases of each key, newest first, on the CUDA kernel; same contract as
        :func:`ouroboros_kernels.reference.ngram_lookup`.

        Parameters
        ----------
        pool : NgramPool
            The device pool (int32 contiguous CUDA tensors, layout in :mod:`ouroboros_kernels.ngram`); not modified.
        keys : torch.Tensor
            ``(B,)`` key tokens of any integer dtype on the pool's device; keys outside ``[0, V)`` find nothing.
        k : int
            Phrases per key.
        stats : torch.Tensor, optional
            int64 ``(2,)``: ``+= (#keys >= 0, #of those with >= 1 phrase)``, on the device (no sync).

        Returns
        -------
        phrases : torch.Tensor
            ``(B, k, P)`` int64, zero where not valid.
        valid : torch.Tensor
            ``(B, k)`` bool.
        """
        return torch.ops.ouroboros.ngram_lookup(pool.key_to_slot, pool.counts, pool.phrases, keys, int(k), stats)

    def ngram_insert(pool, keys: torch.Tensor, phrases: torch.Tensor, old: torch.Tensor | None = None) -> None:
        """Insert (or, with ``old``, replace) a batch in order, in place, on the CUDA kernels; same contract as
        :func:`ouroboros_kernels.reference.ngram_insert` (the result equals applying the items one by one).

        Parameters
        ----------
        pool : NgramPool
            The device pool, modified in place.
        keys : torch.Tensor
            ``(B,)`` key tokens of any integer dtype; keys outside ``[0, V)`` (padding) are skipped.
        phrases : torch.Tensor
            ``(B, P)`` phrases to insert (the new phrase of a replace), any integer dtype.
        old : torch.Tensor, optional
            ``(B, P)``: item ``b`` becomes ``replace(keys[b], old[b], phrases[b])``.
        """
        torch.ops.ouroboros.ngram_insert(pool.key_to_slot, pool.slot_key, pool.counts, pool.phrases, pool.lru_prev,
                                         pool.lru_next, pool.num_keys, keys, phrases, old)

    __all__ += ["ngram_lookup", "ngram_insert"]
