"""Linear layers that compute a padded batch forward at its real token slots only.

A batched forward (:class:`~ouroboros.hf.batch_model.BatchModel`) pads every row's tree to the largest one: with trees
of 3-10 tokens in a (4, 10) forward, half the slots can be pads. On a CPU the linear layers (the output head
included) cost in proportion to the rows they multiply, so inside :func:`real_slots` each linear module of the model
gathers the real slots' rows of its input, computes them alone, and scatters them back into a zero-filled output
(the output embeddings: left unset, they are never read). Everything else (norms, attention, activations) still runs
on the padded layout, which keeps the KV cache and the masks as they are.

Guarantees, inside the block and in the calling thread only (a context variable, as in
:mod:`ouroboros.hf.cpu_linear`):
- every real slot's output is the same dot products as without it (float32: equal up to summation order; a
  dynamically quantized int8 layer quantizes its input with one scale per call, which is now taken over the real
  rows only, so its outputs move within int8 rounding);
- a pad slot's hidden state is zero after every linear (finite: a pad only ever attends to itself, and the logits at
  pads are unspecified);
- a call whose input does not have the forward's ``B*T`` rows (no other shape occurs in the tested families) runs the
  module unchanged.
Set ``OUROBOROS_REAL_SLOTS=0`` to turn it off.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from typing import Iterator, Sequence

import torch
from torch import nn
from torch.ao.nn.quantized import dynamic as qdynamic

from ouroboros.hf import cpu_linear

__all__ = ["real_slots", "install", "uninstall", "env_enabled"]

_ACTIVE: contextvars.ContextVar[tuple[torch.Tensor, int] | None] = contextvars.ContextVar(
    "ouroboros_real_slots", default=None)
_INSTALLED = "_ouroboros_real_slots"
_LINEARS = (nn.Linear, qdynamic.Linear)           # float, and int8 dynamic (ouroboros.hf.quantize)


def env_enabled() -> bool:
    """False when ``OUROBOROS_REAL_SLOTS=0`` is set (the padded forward as HF runs it)."""
    return os.environ.get("OUROBOROS_REAL_SLOTS", "1") != "0"


def _forward(inner, head: bool, input: torch.Tensor) -> torch.Tensor:
    """The instance forward :func:`install` puts on a linear module: ``inner(input)`` at the real slots only inside
    :func:`real_slots`, else exactly ``inner(input)``."""
    active = _ACTIVE.get()
    if active is None or torch.compiler.is_compiling() or input.dim() < 2:
        return inner(input)
    index, slots = active
    if input.numel() != slots * input.shape[-1]:
        return inner(input)
    real = inner(input.reshape(slots, input.shape[-1]).index_select(0, index))
    out = real.new_empty((slots, real.shape[-1])) if head else real.new_zeros((slots, real.shape[-1]))
    out.index_copy_(0, index, real)
    return out.view(*input.shape[:-1], real.shape[-1])


def install(model: nn.Module) -> None:
    """Give every linear module of ``model`` (``nn.Linear`` and int8 dynamic ``Linear``) a forward that computes only
    the real slots inside :func:`real_slots`; outside it the module's forward is unchanged. The small-M CPU forwards
    of :mod:`ouroboros.hf.cpu_linear` are installed first and wrapped. Idempotent."""
    if model.__dict__.get(_INSTALLED):
        return
    cpu_linear.install(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for module in model.modules():
        if isinstance(module, _LINEARS):
            inner = module.__dict__.get("forward") or type(module).forward.__get__(module)
            module.forward = functools.partial(_forward, inner, module is head)
    model.__dict__[_INSTALLED] = True


def uninstall(model: nn.Module) -> None:
    """Restore the forwards the linear modules had before :func:`install`."""
    for module in model.modules():
        fwd = module.__dict__.get("forward")
        if isinstance(fwd, functools.partial) and fwd.func is _forward:
            inner = fwd.args[0]
            if isinstance(inner, functools.partial):
                module.forward = inner
            else:
                del module.forward
    model.__dict__.pop(_INSTALLED, None)


@contextlib.contextmanager
def real_slots(model: nn.Module, lengths: Sequence[int], width: int, device: torch.device,
               *, enabled: bool = True) -> Iterator[None]:
    """Within the block, the linear modules of ``model`` (on ``device``) compute only slot ``j < lengths[i]`` of row
    ``i`` of a ``(len(lengths), width)`` forward. A no-op when no slot is a pad, when not ``enabled`` (the caller's
    choice: a GPU's small-M linears are not row-bound) or when turned off (:func:`env_enabled`)."""
    if not enabled or not env_enabled() or min(lengths) >= width:
        yield
        return
    install(model)
    index = torch.tensor([i * width + j for i, n in enumerate(lengths) for j in range(n)], dtype=torch.long,
                         device=device)
    token = _ACTIVE.set((index, len(lengths) * width))
    try:
        yield
    finally:
        _ACTIVE.reset(token)
