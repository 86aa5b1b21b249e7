"""Backend selection: "cuda" > "triton" > "reference"; ``OUROBOROS_BACKEND`` forces one."""
from __future__ import annotations

import functools
import importlib
import os

import torch

__all__ = ["BACKENDS", "available_backends", "backend_status", "select_backend", "triton_interpret"]

BACKENDS = ("cuda", "triton", "reference")


def triton_interpret() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _cuda_ext():
    try:
        return importlib.import_module("ouroboros_kernels._cuda")
    except ImportError:
        return None


@functools.lru_cache(maxsize=None)
def _status(interpret: bool) -> tuple[tuple[str, str], ...]:
    return tuple(_backend_status(interpret).items())


def backend_status() -> dict[str, str]:
    """For each backend, ``"available"`` or the reason it is not (cached per ``TRITON_INTERPRET`` setting)."""
    return dict(_status(triton_interpret()))


def _backend_status(interpret: bool) -> dict[str, str]:
    """For each backend, ``"available"`` or the reason it is not."""
    status = {"reference": "available"}
    try:
        import triton  # noqa: F401  optional: triton (probed, not required)
        if torch.cuda.is_available() or interpret:
            status["triton"] = "available"
        else:
            status["triton"] = "no CUDA device (set TRITON_INTERPRET=1 to run on CPU tensors)"
    except ImportError:
        status["triton"] = "triton is not installed"
    if _cuda_ext() is None:
        status["cuda"] = "extension ouroboros_kernels._cuda not built"
    elif not torch.cuda.is_available():
        status["cuda"] = "extension built but no CUDA device"
    else:
        status["cuda"] = "available"
    return {name: status[name] for name in BACKENDS}


def available_backends() -> list[str]:
    """Backends usable in this process, best first."""
    return [name for name, why in backend_status().items() if why == "available"]


def select_backend(device: torch.device, requested: str | None = None, supported: tuple[str, ...] = BACKENDS) -> str:
    """The backend to run an op on tensors of ``device``.

    ``requested`` (or ``OUROBOROS_BACKEND``) forces one and raises ``ValueError`` if it cannot run here; otherwise the
    best of ``supported`` that can run on ``device`` is returned ("cuda" needs CUDA tensors; "triton" needs CUDA
    tensors or CPU tensors under ``TRITON_INTERPRET=1``).
    """
    requested = requested or os.environ.get("OUROBOROS_BACKEND") or "auto"
    status = backend_status()

    def usable(name: str) -> bool:
        if name not in supported or status[name] != "available":
            return False
        if name == "reference":
            return True
        if name == "triton" and device.type == "cpu":
            return triton_interpret()
        return device.type == "cuda"

    if requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(f"unknown backend {requested!r}; choose one of {BACKENDS} or 'auto'")
        if not usable(requested):
            why = status[requested] if status[requested] != "available" else f"cannot run on {device} tensors"
            raise ValueError(f"backend {requested!r} is not usable: {why}")
        return requested
    for name in BACKENDS:
        if usable(name):
            return name
    raise ValueError(f"no backend can run on {device}")  # unreachable: reference always can
