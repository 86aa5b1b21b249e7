"""Public glue ops of a Llama-family decoder layer, with backend dispatch: ``rms_norm`` (optionally fused with the
residual add), ``rope`` (q and k in one launch) and ``swiglu`` / ``swiglu_fused``.

Backends: "triton" (one kernel launch per call; :mod:`ouroboros_kernels.triton.glue`) and "reference" (plain PyTorch,
:mod:`ouroboros_kernels.reference`, several kernels). There is no CUDA-extension glue: "cuda" named by
``OUROBOROS_BACKEND`` (which also steers tree attention) means the automatic choice here, and ``backend="cuda"`` is an
error. Automatic choice: "triton" for CUDA tensors when Triton is installed, else "reference"; CPU tensors run the
reference unless "triton" is asked for by name (``backend=`` or ``OUROBOROS_BACKEND``) under ``TRITON_INTERPRET=1``.

The Triton kernels have no backward: while autograd records (grad enabled, an input requiring grad) the automatic
choice runs the reference instead, and an explicit ``backend="triton"`` raises.

``launches`` counts the Triton launches made through these ops (``launches.total``) and says whether one is running
(``launches.active``), so a ``TorchDispatchMode`` can count a launch as one kernel and skip the tensor ops the Triton
interpreter performs inside it. Under ``torch.compile`` the ops run as opaque custom ops
(``torch.ops.ouroboros_kernels.rms_norm`` etc., with fake implementations), so compiled graphs do not break on them.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch

from . import reference
from .backend import select_backend

__all__ = ["rms_norm", "rope", "swiglu", "swiglu_fused", "resolve_glue_backend", "LaunchCounter", "launches"]

GLUE_BACKENDS = ("triton", "reference")


@dataclass
class LaunchCounter:
    """Triton launches made by the glue ops: ``total`` so far, ``active`` > 0 while one runs."""

    total: int = 0
    active: int = 0


launches = LaunchCounter()


@functools.lru_cache(maxsize=64)
def _resolve(device_type: str, backend: str | None, env_backend: str | None, env_interpret: str | None) -> str:
    if backend == "cuda":
        raise ValueError("backend 'cuda' has no glue kernels; use 'triton' or 'reference'")
    if backend is None and env_backend not in GLUE_BACKENDS:
        env_backend = None                       # "cuda"/"auto" in the environment: the automatic choice
    requested = backend or env_backend
    if requested is None and device_type == "cpu":
        # The Triton interpreter is a correctness tool (orders of magnitude slower than PyTorch): CPU tensors run the
        # reference unless a backend is asked for by name.
        return "reference"
    if requested not in (None, *GLUE_BACKENDS):
        raise ValueError(f"unknown backend {requested!r}; choose one of {GLUE_BACKENDS} or None")
    return select_backend(torch.device(device_type), requested or "auto", supported=GLUE_BACKENDS)


def resolve_glue_backend(x: torch.Tensor, backend: str | None = None) -> str:
    """The backend the glue ops run for tensors like ``x``: ``backend`` ("triton" or "reference") when given, else
    ``OUROBOROS_BACKEND`` when it names one of those, else the automatic choice (module docstring). Raises
    ``ValueError`` for an unknown backend or one that cannot run on ``x``'s device."""
    return _resolve(x.device.type, backend, os.environ.get("OUROBOROS_BACKEND"), os.environ.get("TRITON_INTERPRET"))


def _pick(x: torch.Tensor, backend: str | None, *tensors: torch.Tensor | None) -> str:
    """The backend for one call: :func:`resolve_glue_backend`, except that the Triton kernels (no backward) give way
    to the differentiable reference while autograd records a tensor that requires grad; asked for by ``backend=``,
    they raise instead."""
    name = resolve_glue_backend(x, backend)
    if name == "triton" and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        if backend == "triton":
            raise ValueError("backend 'triton' has no backward pass: run under torch.no_grad() / "
                             "torch.inference_mode(), or use backend='reference' to train")
        return "reference"
    return name


def _triton():
    from .triton import glue  # optional: triton
    return glue


def _launch(fn, *args, **kwargs):
    """Run one Triton glue function (one launch), counted in ``launches``."""
    launches.total += 1
    launches.active += 1
    try:
        return fn(*args, **kwargs)
    finally:
        launches.active -= 1


def _compiling() -> bool:
    return torch.compiler.is_compiling()


# ------------------------------------------------------------------------------------------------------------ RMSNorm
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, *,
             offset: float = 0.0, cast: str = "llama",
             backend: str | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dimension, as transformers computes it (one launch on the Triton backend).

    Parameters
    ----------
    x : torch.Tensor
        ``(..., N)`` fp32/bf16/fp16, any strides (views whose leading dims merge into two are read in place).
    weight : torch.Tensor
        ``(N,)`` on ``x``'s device.
    eps : float
        Added to the mean square (>= 0).
    residual : torch.Tensor, optional
        ``x``'s shape, dtype and device: the residual add is fused in: ``s = x + residual`` (rounded to the dtype, as
        the decoder layer's add) is normalised, and ``(norm(s), s)`` is returned.
    offset : float
        The weight term is ``weight + offset``; Gemma's ``(1 + weight)`` is ``offset=1.0, cast="gemma"``.
    cast : str
        "llama": ``(weight + offset) * x_norm.to(x.dtype)`` (LlamaRMSNorm; output dtype promoted with the weight's);
        "gemma": ``(x_norm * (offset + weight.float())).to(x.dtype)`` (GemmaRMSNorm).
    backend : str, optional
        "triton" or "reference" (:func:`resolve_glue_backend`).

    Returns
    -------
    torch.Tensor or (torch.Tensor, torch.Tensor)
        The normalised tensor of ``x``'s shape (and, with ``residual``, the sum ``s``).

    Raises
    ------
    ValueError
        Naming the argument, for a bad shape, dtype, device, ``eps``, ``offset`` or ``cast``.
    """
    if _compiling():
        if residual is None:
            return torch.ops.ouroboros_kernels.rms_norm(x, weight, float(eps), float(offset), cast, backend)
        return tuple(torch.ops.ouroboros_kernels.add_rms_norm(x, residual, weight, float(eps), float(offset), cast,
                                                              backend))
    if _pick(x, backend, x, weight, residual) == "triton":
        return _launch(_triton().rms_norm, x, weight, eps, residual, offset=offset, cast=cast)
    return reference.rms_norm_reference(x, weight, eps, residual, offset=offset, cast=cast)


# --------------------------------------------------------------------------------------------------------------- RoPE
def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
         backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb`` (rotate_half convention) for q and k (one launch on Triton).

    Parameters
    ----------
    q : torch.Tensor
        ``(B, Hq, T, D)``, any strides; D even.
    k : torch.Tensor
        ``(B, Hkv, T, D)``, any strides (GQA: any number of heads).
    cos, sin : torch.Tensor
        ``(B or 1, T, D)`` as transformers' rotary embedding returns them, in q's dtype.
    backend : str, optional
        "triton" or "reference" (:func:`resolve_glue_backend`).

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        New ``q * cos + rotate_half(q) * sin`` and the same for ``k``, shapes of q and k (the Triton backend returns
        ``(B, H, T, D)`` views of ``(B, T, H, D)``-contiguous tensors).

    Raises
    ------
    ValueError
        Naming the argument, for a bad shape (odd D, mismatched B/T/D), dtype or device.
    """
    if _compiling():
        return tuple(torch.ops.ouroboros_kernels.rope(q, k, cos, sin, backend))
    if _pick(q, backend, q, k, cos, sin) == "triton":
        return _launch(_triton().rope, q, k, cos, sin)
    return reference.rope_reference(q, k, cos, sin)


# ------------------------------------------------------------------------------------------------------------- SwiGLU
def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """``silu(gate) * up`` as the Llama-family MLP computes it (one launch on Triton); ``gate`` and ``up`` share shape,
    dtype and device (``ValueError`` naming them otherwise). Returns a new tensor of that shape."""
    if _compiling():
        return torch.ops.ouroboros_kernels.swiglu(gate, up, backend)
    if _pick(gate, backend, gate, up) == "triton":
        return _launch(_triton().swiglu, gate, up)
    return reference.swiglu_reference(gate, up)


def swiglu_fused(gate_up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """:func:`swiglu` of the two halves of ``gate_up`` ``(..., 2I)`` (gate first: one GEMM over the concatenated
    gate/up weight); returns ``(..., I)``. ``ValueError`` for an odd last dimension."""
    gate, up = reference.split_gate_up(gate_up)
    return swiglu(gate, up, backend=backend)


# ----------------------------------------------------------------------------------- custom ops for torch.compile
@torch.library.custom_op("ouroboros_kernels::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, cast: str,
                 backend: Optional[str]) -> torch.Tensor:
    y = rms_norm(x, weight, eps, offset=offset, cast=cast, backend=backend)
    return y.contiguous()


@_rms_norm_op.register_fake
def _rms_norm_fake(x, weight, eps, offset, cast, backend):
    reference.check_rms_norm_args(x, weight, eps, None, offset, cast)
    return x.new_empty(x.shape, dtype=reference.rms_norm_dtype(x, weight, cast))


@torch.library.custom_op("ouroboros_kernels::add_rms_norm", mutates_args=())
def _add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, offset: float,
                     cast: str, backend: Optional[str]) -> tuple[torch.Tensor, torch.Tensor]:
    y, s = rms_norm(x, weight, eps, residual, offset=offset, cast=cast, backend=backend)
    return y.contiguous(), s.contiguous()


@_add_rms_norm_op.register_fake
def _add_rms_norm_fake(x, residual, weight, eps, offset, cast, backend):
    reference.check_rms_norm_args(x, weight, eps, residual, offset, cast)
    return x.new_empty(x.shape, dtype=reference.rms_norm_dtype(x, weight, cast)), x.new_empty(x.shape)


@torch.library.custom_op("ouroboros_kernels::rope", mutates_args=())
def _rope_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             backend: Optional[str]) -> tuple[torch.Tensor, torch.Tensor]:
    qo, ko = rope(q, k, cos, sin, backend=backend)
    return qo.contiguous(), ko.contiguous()


@_rope_op.register_fake
def _rope_fake(q, k, cos, sin, backend):
    reference.check_rope_args(q, k, cos, sin)
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("ouroboros_kernels::swiglu", mutates_args=())
def _swiglu_op(gate: torch.Tensor, up: torch.Tensor, backend: Optional[str]) -> torch.Tensor:
    return swiglu(gate, up, backend=backend).contiguous()


@_swiglu_op.register_fake
def _swiglu_fake(gate, up, backend):
    reference.check_swiglu_args(gate, up)
    return gate.new_empty(gate.shape)
