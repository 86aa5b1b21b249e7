"""A faster ``F.linear`` for a few rows on a CPU, used inside our forwards only.

On the CPUs measured here (MKL, AVX2, fp32) ``F.linear(x, W)`` with 2-64 rows costs 1.2-4x more than the same
product computed as ``(W @ x.T).T`` (``bench/results/cpu_small_m_linear.json``): a tree of 2-9 tokens then costs
about what one token does, instead of several times more. Each output element is the same dot product; only the
summation order inside the BLAS kernel may differ, as it already does between a 1-row and a T-row ``F.linear``.
Set ``OUROBOROS_SMALL_M_LINEAR=0`` to turn it off.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
import torch.nn.functional as F

__all__ = ["small_m_linear", "SMALL_M_MAX"]

SMALL_M_MAX = 64
_linear = F.linear


def _small_m_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    rows = input.numel() // input.shape[-1] if input.dim() and input.shape[-1] else 0
    if (2 <= rows <= SMALL_M_MAX and input.device.type == "cpu" and input.dtype == torch.float32
            and weight.dtype == torch.float32 and weight.dim() == 2 and not torch.is_grad_enabled()):
        out = torch.mm(weight, input.reshape(rows, input.shape[-1]).t()).t().contiguous()
        if bias is not None:
            out += bias
        return out.view(*input.shape[:-1], weight.shape[0])
    return _linear(input, weight, bias)


@contextlib.contextmanager
def small_m_linear(enabled: bool = True) -> Iterator[None]:
    """Within the block, ``torch.nn.functional.linear`` (what ``nn.Linear`` calls) takes the faster path for 2-64
    float32 CPU rows without grad; every other call is unchanged. Not for use from several threads at once."""
    if not enabled or os.environ.get("OUROBOROS_SMALL_M_LINEAR", "1") == "0" or F.linear is not _linear:
        yield
        return
    F.linear = _small_m_linear
    try:
        yield
    finally:
        F.linear = _linear
