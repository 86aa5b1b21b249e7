"""A faster linear for a few rows on a CPU, used by the ``nn.Linear`` modules of our models inside our forwards only.

On the CPUs measured here (MKL, AVX2, fp32) ``F.linear(x, W)`` with 2-64 rows costs 1.2-4x more than the same
product computed as ``(W @ x.T).T`` (``bench/results/cpu_small_m_linear.json``): a tree of 2-9 tokens then costs
about what one token does, instead of several times more. Each output element is the same dot product; only the
summation order inside the BLAS kernel may differ, as it already does between a 1-row and a T-row ``F.linear``.
Set ``OUROBOROS_SMALL_M_LINEAR=0`` to turn it off.

Scope: nothing process-wide is swapped. :func:`small_m_linear` gives each plain ``nn.Linear`` of the model it is
given a per-instance forward (once; :func:`uninstall` reverts) that takes the small-M path only while a context
variable is set, and sets it for its block. A context variable is per thread (and per asyncio task), so another
thread's forward - HF ``generate`` on the same model or on any other - runs exactly ``nn.Linear.forward``. Modules
that are not exactly ``nn.Linear`` (int8 dynamic-quantized linears, subclasses with their own forward, modules that
already carry an instance forward, e.g. accelerate hooks) are left alone, and so are direct ``F.linear`` calls in
model code (fused MoE experts).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["small_m_linear", "linear", "install", "uninstall", "SMALL_M_MAX"]

SMALL_M_MAX = 64
_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("ouroboros_small_m_linear", default=False)
_INSTALLED = "_ouroboros_small_m_linear"      # set on a model once its Linear modules carry our forward


def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(input, weight, bias)``, computed as ``(W @ x.T).T`` for 2-64 float32 CPU rows without grad (equal
    up to fp32 summation order, contiguous); every other call IS ``F.linear``."""
    rows = input.numel() // input.shape[-1] if input.dim() and input.shape[-1] else 0
    if (2 <= rows <= SMALL_M_MAX and input.device.type == "cpu" and input.dtype == torch.float32
            and weight.dtype == torch.float32 and weight.dim() == 2 and not torch.is_grad_enabled()):
        out = torch.mm(weight, input.reshape(rows, input.shape[-1]).t()).t().contiguous()
        if bias is not None:
            out += bias
        return out.view(*input.shape[:-1], weight.shape[0])
    return F.linear(input, weight, bias)


def _forward(module: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    """The instance forward we install: :func:`linear` inside :func:`small_m_linear` in this context, else exactly
    ``nn.Linear.forward`` (also while ``torch.compile`` traces it)."""
    if not torch.compiler.is_compiling() and _ACTIVE.get():
        return linear(input, module.weight, module.bias)
    return nn.Linear.forward(module, input)


def install(model: nn.Module) -> None:
    """Give every module of ``model`` whose class is exactly ``nn.Linear`` (and that has no instance forward yet) a
    forward that takes the small-M path only inside :func:`small_m_linear`; outside it the forward is
    ``nn.Linear.forward``. Idempotent (a marker on ``model`` makes later calls free); other modules are untouched."""
    if model.__dict__.get(_INSTALLED):
        return
    for module in model.modules():
        if type(module) is nn.Linear and "forward" not in module.__dict__:
            module.forward = functools.partial(_forward, module)
    model.__dict__[_INSTALLED] = True


def uninstall(model: nn.Module) -> None:
    """Remove the forwards :func:`install` put on ``model``'s modules (and only those)."""
    for module in model.modules():
        fwd = module.__dict__.get("forward")
        if isinstance(fwd, functools.partial) and fwd.func is _forward:
            del module.forward
    model.__dict__.pop(_INSTALLED, None)


@contextlib.contextmanager
def small_m_linear(model: nn.Module, *, enabled: bool = True) -> Iterator[None]:
    """Within the block, in the calling thread only, the ``nn.Linear`` modules of ``model`` (installed on entry, see
    :func:`install`) take the faster path for 2-64 float32 CPU rows without grad; every other call, thread and
    module is unchanged. Nests; a no-op when ``enabled`` is False or ``OUROBOROS_SMALL_M_LINEAR=0``."""
    if not enabled or os.environ.get("OUROBOROS_SMALL_M_LINEAR", "1") == "0":
        yield
        return
    install(model)
    token = _ACTIVE.set(True)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
