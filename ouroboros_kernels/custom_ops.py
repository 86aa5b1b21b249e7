"""Tree attention as one opaque torch custom op, ``torch.ops.ouroboros_kernels.tree_attention``, for ``torch.compile``.

Dynamo cannot trace into the backend choice (it imports modules and reads caches) nor into the Triton/CUDA launchers,
and tracing the reference would inline its mask construction. Wrapped as a custom op with a fake (meta) implementation,
the whole tree attention is one node of the captured graph: ``fullgraph=True`` holds, inductor fuses the model's glue
(norms, RoPE, MLP, residuals) around it, and at run time the op calls :func:`ouroboros_kernels.tree_attention` with the
backend resolved then (so "auto" still picks cuda > triton > reference per call, outside the trace).

The op mutates nothing and returns a fresh contiguous ``(B, Hq, T, D)`` tensor in ``q``'s dtype (every backend does).
Its ``tree_mask`` is any mask of the contract (v3): ``(T, W)`` shared, or ``(B or 1, T, W)`` per batch row; the fake
implementation checks it exactly as the kernels do.
Its namespace is ``ouroboros_kernels`` because ``ouroboros::tree_attention`` is the CUDA extension's own op (csrc/
bindings.cpp), which this one calls when the "cuda" backend is chosen.

Usage: :func:`tree_attention` here has the signature of :func:`ouroboros_kernels.tree_attention` and routes through the
op; importing this module registers it (no transformers import, like the rest of the package).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from .attention import tree_attention as _dispatch
from .reference import check_tree_attention_args

__all__ = ["tree_attention", "OP_NAME"]

OP_NAME = "ouroboros_kernels::tree_attention"


@torch.library.custom_op(OP_NAME, mutates_args=())
def _tree_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: Optional[torch.Tensor],
                       prefix_value: int, tree_mask: Optional[torch.Tensor], scale: float, window: Optional[int],
                       softcap: Optional[float], backend: Optional[str]) -> torch.Tensor:
    """The op's real implementation: :func:`ouroboros_kernels.tree_attention` with ``prefix_len`` (a device length)
    or, when it is None, the host int ``prefix_value``; the result is contiguous and never aliases an input."""
    prefix = prefix_len if prefix_len is not None else prefix_value
    out = _dispatch(q, k, v, prefix, tree_mask, scale, window=window, softcap=softcap, backend=backend)
    return out if out.is_contiguous() else out.contiguous()


@_tree_attention_op.register_fake
def _tree_attention_fake(q, k, v, prefix_len, prefix_value, tree_mask, scale, window, softcap, backend):
    """Shape/dtype of the output, with the same argument checks as the kernels (shapes, dtypes and devices only: a
    device ``prefix_len``'s value is never read)."""
    check_tree_attention_args(q, k, v, prefix_len if prefix_len is not None else prefix_value, tree_mask, window,
                              softcap)
    return q.new_empty(q.shape)


def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int | torch.Tensor,
                   tree_mask: torch.Tensor | None, scale: float | None = None, *, window: int | None = None,
                   softcap: float | None = None, backend: str | None = None) -> torch.Tensor:
    """:func:`ouroboros_kernels.tree_attention` (same arguments, result and errors) through the custom op, so that
    ``torch.compile`` keeps it as one opaque graph node (``fullgraph=True`` traces through it).

    ``backend`` None means the automatic choice, made when the op runs. A Python-int ``prefix_len`` is baked into the
    compiled graph as a constant (it specializes); a tensor one stays a graph input, read by the kernel.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if isinstance(prefix_len, torch.Tensor):
        tensor, value = prefix_len, 0
    elif isinstance(prefix_len, bool) or not isinstance(prefix_len, numbers.Integral):
        raise ValueError(f"prefix_len must be a Python int or an int32/int64 tensor, got {type(prefix_len).__name__}")
    else:
        tensor, value = None, int(prefix_len)
    return _tree_attention_op(q, k, v, tensor, value, tree_mask, scale, window, softcap, backend)
