"""q/k/v (or gate/up) linear layers whose weights are adjacent views of one buffer, so one GEMM computes them all
while each layer keeps its own ``Parameter`` (``state_dict`` and the parameter count unchanged)."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["PackedLinears", "adjacent"]


def adjacent(ts: list[torch.Tensor]) -> bool:
    """True when ``ts`` are contiguous, of one dtype and device, and lie back to back inside the first one's storage
    (so one strided view of the first covers them all)."""
    first = ts[0]
    es = first.element_size()
    ptr = first.data_ptr()
    for t in ts:
        if t.data_ptr() != ptr or t.dtype != first.dtype or not t.is_contiguous():
            return False
        ptr += t.numel() * es
    storage = first.untyped_storage()
    return ptr <= storage.data_ptr() + storage.nbytes()


def _pack(parts: tuple[nn.Linear, ...], name: str) -> None:
    """Make the ``name`` parameters ("weight" or "bias") of ``parts`` adjacent views of one new buffer (values and
    Parameter objects unchanged)."""
    params = [getattr(p, name) for p in parts]
    if params[0].is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("fused glue: the packed q/k/v or gate/up weights were moved or converted since the last "
                           "forward; run one forward outside CUDA-graph capture to pack them again")
    with torch.inference_mode(False), torch.no_grad():   # a normal tensor, so later in-place loads still work
        buf = torch.cat([p.detach() for p in params], 0)
        start = 0
        for p in params:
            p.data = buf[start:start + p.shape[0]]
            start += p.shape[0]


def _unpack(parts: tuple[nn.Linear, ...], name: str) -> None:
    """Give each ``name`` parameter of ``parts`` its own contiguous storage again (values unchanged)."""
    with torch.inference_mode(False), torch.no_grad():
        for p in parts:
            t = getattr(p, name)
            if t is not None:
                t.data = t.detach().clone()


class PackedLinears:
    """A group of linear layers (q/k/v, or gate/up) whose weights, and biases, are adjacent views of one buffer each,
    with the concatenated views one GEMM uses.

    :meth:`weight_and_bias` costs a pointer comparison per part when nothing moved; a conversion that split the
    parameters (new data pointers) makes it pack them again. The cached views keep the buffer they view alive until
    then, so the pointers they were checked against cannot be reused by another allocation.
    """

    __slots__ = ("parts", "_ptrs", "_views")

    def __init__(self, parts: tuple[nn.Linear, ...]) -> None:
        self.parts = parts
        self._ptrs: tuple[int, ...] | None = None
        self._views: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def _params(self, name: str) -> list[torch.Tensor | None]:
        return [p._parameters[name] for p in self.parts]

    def _data_ptrs(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for name in ("weight", "bias") for t in self._params(name) if t is not None)

    def pack(self) -> None:
        """Make the parts' weights (and biases) adjacent views of one buffer each, unless they already are."""
        for name in ("weight", "bias"):
            if self.parts[0]._parameters[name] is not None and not adjacent(self._params(name)):
                _pack(self.parts, name)
        views = []
        with torch.inference_mode(False), torch.no_grad():   # plain views, usable in and out of inference mode
            for name in ("weight", "bias"):
                ts = self._params(name)
                first = ts[0]
                views.append(None if first is None else first.detach().as_strided(
                    (sum(t.shape[0] for t in ts), *first.shape[1:]), first.stride()))
        self._views = (views[0], views[1])
        self._ptrs = self._data_ptrs()

    def unpack(self) -> None:
        """Give every part's parameters their own contiguous storage again (values unchanged)."""
        self._ptrs = self._views = None
        for name in ("weight", "bias"):
            _unpack(self.parts, name)

    def weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The concatenated (along dim 0) weight and bias (None without biases): views of the shared buffers, or, while
        autograd records a part that requires grad, ``torch.cat`` copies through which gradients reach every part."""
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for name in ("weight", "bias") for t in self._params(name)):
            w, b = self._params("weight"), self._params("bias")
            return torch.cat(w, 0), (None if b[0] is None else torch.cat(b, 0))
        if self._views is not None and torch.compiler.is_compiling():
            return self._views          # traced: a data-pointer check would break the graph (packed when compiled)
        if self._data_ptrs() != self._ptrs:
            self.pack()
        return self._views
