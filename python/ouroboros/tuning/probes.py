"""Measurement probes: host reads, kernels per forward (issue 17).

- :class:`HostReads` records every op that reads tensor data back to the host (a sync on a GPU).
- :class:`OpCounter` counts, on any device, the aten ops that would each launch a GPU kernel (a CPU proxy for the
  profiler's kernel count), with Triton launches counted as one kernel each.
- :func:`cuda_kernels` counts the GPU kernels one call really launches, with the CUDA profiler.

Used by the tests (host-read and op-count budgets) and by ``bench/e2e_gpu.py`` (the step-cost table). No pytest here.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.autograd import DeviceType
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from ouroboros_kernels import reference

__all__ = ["HostReads", "reads_back", "OpCounter", "launch", "FREE_OPS", "FUSED_ON_CUDA", "CudaLaunches",
           "classify_cuda_events", "cuda_kernels", "count_kernels", "REFERENCE_STANDINS"]

_aten = torch.ops.aten
_READ_OPS = {_aten._local_scalar_dense.default, _aten.item.default, _aten.nonzero.default}


# ----------------------------------------------------------------------------------------------------- host reads
class HostReads(contextlib.ExitStack):
    """Records, inside its ``with`` block, every op that reads tensor data back to the host: ``.item()`` /
    ``int()`` / ``bool()`` of a tensor (``aten._local_scalar_dense``), ``nonzero`` (a shape that depends on data),
    device-to-host copies, and ``.tolist()`` / ``.numpy()`` (which on CPU tensors reach no aten op, so a
    TorchFunctionMode sees them; a read inside one counts once). ``seen`` lists them in order."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []
        self._inside = 0

    def __enter__(self) -> "HostReads":
        """Start recording (a torch function mode for tolist/numpy, a dispatch mode for aten reads)."""
        super().__enter__()
        owner = self

        class Functions(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if func not in (torch.Tensor.tolist, torch.Tensor.numpy) or owner._inside:
                    return func(*args, **(kwargs or {}))
                owner.seen.append(f"Tensor.{func.__name__}")
                owner._inside += 1
                try:
                    return func(*args, **(kwargs or {}))
                finally:
                    owner._inside -= 1

        class Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if not owner._inside and reads_back(func, args, kwargs):
                    owner.seen.append(str(func))
                return func(*args, **kwargs)

        self.enter_context(Functions())
        self.enter_context(Ops())
        return self


def reads_back(func, args, kwargs) -> bool:
    """Whether the aten op ``func`` called with ``args``/``kwargs`` reads tensor data back to the host (the rule
    :class:`HostReads` applies to each dispatched op): ``.item()``-like scalar reads and ``nonzero`` always, a
    ``_to_copy`` only from a non-CPU tensor to the CPU, a ``copy_`` only into a CPU tensor from a non-CPU one. It runs
    nothing; device types are read off the tensors' metadata (meta tensors work)."""
    if func in _READ_OPS:
        return True
    if func is _aten._to_copy.default:      # .cpu(), .to("cpu") of a device tensor
        target = kwargs.get("device")
        return args[0].device.type != "cpu" and target is not None and torch.device(target).type == "cpu"
    if func is _aten.copy_.default:         # host_tensor.copy_(device_tensor)
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return False


# ----------------------------------------------------------------------------------------------------- op counter
# Aten ops (overload packet names) that launch no kernel on a CUDA device, so a CUDA profiler never shows them:
# views and other metadata-only ops (they return an alias of their input), allocation without initialisation (the
# caching allocator hands out memory on the host), and no-op conversions. Everything else counts as one kernel,
# including copies (a kernel or a memcpy), fills (``zeros``, ``zero_``: a memset or a fill kernel) and
# ``_local_scalar_dense`` (a device-to-host memcpy). Composite ops are counted by what they decompose into.
FREE_OPS = frozenset({
    # views (composite view functions, e.g. reshape, chunk, narrow, movedim, expand_as, reach the dispatcher as these)
    "view", "_unsafe_view", "as_strided", "expand", "t", "transpose", "permute", "unsqueeze", "squeeze", "slice",
    "select", "alias", "detach", "_reshape_alias", "split", "split_with_sizes", "unsafe_split",
    "unsafe_split_with_sizes", "unbind", "diagonal", "unfold", "view_as_real", "view_as_complex", "real", "imag",
    "_conj", "_neg_view", "_indices", "_values", "lift_fresh", "squeeze_", "unsqueeze_", "transpose_", "t_",
    "as_strided_", "detach_",
    # metadata and allocation
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_", "set_", "sym_size",
    "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "_has_compatible_shallow_copy_type",
    "resolve_conj", "resolve_neg",
    # 0-dim host scalars that aten wraps numbers in (``where(mask, 0.0, -inf)`` inside sdpa): no device work
    "scalar_tensor",
})

# Composite functions that decompose into several aten ops on a CPU but are one kernel on a CUDA device
# (``F.rms_norm`` runs ``aten._fused_rms_norm`` there): counted once, under this name, with their insides hidden.
FUSED_ON_CUDA: dict[Callable, str] = {torch.nn.functional.rms_norm: "rms_norm"}
if hasattr(torch, "rms_norm"):
    FUSED_ON_CUDA[torch.rms_norm] = "rms_norm"

_ACTIVE: list["OpCounter"] = []          # counters inside their ``with`` block (the Triton hook reports to them)
_TRITON_SAVED: list[tuple[type, Callable]] = []


def _triton_launchers() -> list[type]:
    """The Triton classes whose ``run`` launches a kernel: compiled (``JITFunction``) and interpreted."""
    classes = []
    with contextlib.suppress(ImportError):
        from triton.runtime.jit import JITFunction  # optional: triton (compiled kernels; absent without triton)
        classes.append(JITFunction)
    with contextlib.suppress(ImportError):
        from triton.runtime.interpreter import InterpretedFunction  # optional: triton (TRITON_INTERPRET=1 kernels)
        classes.append(InterpretedFunction)
    return classes


def _install_triton_hook() -> None:
    """Wrap every Triton launcher's ``run`` (once, however many counters are active) so that each launch counts as
    one kernel in every active counter with ``triton=True``; :func:`_remove_triton_hook` restores them."""
    if _TRITON_SAVED:
        return
    for cls in _triton_launchers():
        original = cls.run

        def run(self, *args, _original=original, **kwargs):
            if kwargs.get("warmup") or not _ACTIVE:
                return _original(self, *args, **kwargs)
            name = "triton:" + getattr(getattr(self, "fn", None), "__name__", type(self).__name__)
            with contextlib.ExitStack() as stack:
                for counter in list(_ACTIVE):
                    if counter.triton:
                        stack.enter_context(counter.opaque(name))
                return _original(self, *args, **kwargs)

        _TRITON_SAVED.append((cls, original))
        cls.run = run


@contextlib.contextmanager
def launch(name: str) -> Iterator[None]:
    """For a kernel wrapper that holds no counter: every active :class:`OpCounter` counts the block as one launch
    named ``name`` and hides the ops inside it (a no-op when none is active). Triton launches need no wrapper."""
    with contextlib.ExitStack() as stack:
        for counter in list(_ACTIVE):
            stack.enter_context(counter.opaque(name))
        yield


def _remove_triton_hook() -> None:
    """Restore every ``run`` :func:`_install_triton_hook` replaced (a no-op when none is)."""
    while _TRITON_SAVED:
        cls, original = _TRITON_SAVED.pop()
        cls.run = original


class OpCounter:
    """Counts, inside its ``with`` block, the aten ops that would each launch one kernel on a CUDA device.

    ``counts`` maps an op's name (the overload packet, e.g. ``"mm"``, ``"add"``) to its count; ``total`` sums them.
    Not counted: :data:`FREE_OPS` (views, metadata, allocation: no kernel on a GPU). Counted once each, with the aten
    ops they run inside hidden: :data:`FUSED_ON_CUDA` functions, Triton kernel launches (``"triton:<kernel>"``, with
    ``triton=True``; compiled or interpreted, so the count is the same on CPU tensors under ``TRITON_INTERPRET=1``),
    and whatever runs inside :meth:`opaque`. :meth:`count_launch` adds launches the counter cannot see.

    It is a CPU proxy of the profiler's count (see :func:`cuda_kernels` on a GPU): an op that a CUDA library splits
    into several kernels (a split-K GEMM, an attention backend's pre-pass) still counts once, and the count of the
    dtype casts follows the dtype the model runs in.
    """

    def __init__(self, triton: bool = True) -> None:
        self.triton = triton
        self.counts: Counter[str] = Counter()
        self._hidden = 0
        self._stack: contextlib.ExitStack | None = None

    @property
    def total(self) -> int:
        """Kernels counted so far."""
        return sum(self.counts.values())

    def count_launch(self, name: str, n: int = 1) -> None:
        """Record ``n`` kernel launches named ``name`` (a launch the dispatcher does not see; counted even inside
        :meth:`opaque`, whose own launch it may be)."""
        self.counts[name] += n

    @contextlib.contextmanager
    def opaque(self, name: str) -> Iterator[None]:
        """Count one launch named ``name`` and nothing that runs inside the block (a fused kernel's wrapper, or a
        reference implementation standing in for one). Nested opaque blocks count only the outermost."""
        if not self._hidden:
            self.count_launch(name)
        self._hidden += 1
        try:
            yield
        finally:
            self._hidden -= 1

    @contextlib.contextmanager
    def opaque_function(self, owner: Any, attr: str, name: str | None = None) -> Iterator[None]:
        """Within the block, ``owner.attr`` (a function looked up at call time, e.g.
        ``ouroboros_kernels.reference.tree_attention``) counts as one kernel per call; restored afterwards."""
        original = getattr(owner, attr)
        label = name or attr

        def wrapped(*args, **kwargs):
            with self.opaque(label):
                return original(*args, **kwargs)

        setattr(owner, attr, wrapped)
        try:
            yield
        finally:
            setattr(owner, attr, original)

    def _record(self, func) -> None:
        """Count ``func`` once under its overload packet's name, unless hidden or free (:data:`FREE_OPS`)."""
        if self._hidden:
            return
        name = func.overloadpacket.__name__
        if name not in FREE_OPS:
            self.counts[name] += 1

    def __enter__(self) -> "OpCounter":
        """Start counting (torch function and dispatch modes; the Triton hook with ``triton=True``)."""
        owner = self

        class Functions(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                label = FUSED_ON_CUDA.get(func) if not owner._hidden else None
                if label is None:
                    return func(*args, **(kwargs or {}))
                with owner.opaque(label):
                    return func(*args, **(kwargs or {}))

        class Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if owner._hidden:
                    return func(*args, **kwargs)
                # A composite op (it reaches this mode undecomposed under inference_mode: linear, reshape, sdpa)
                # launches what its decomposition launches: run that, with this mode on, as the dispatcher would
                with self:
                    out = func.decompose(*args, **kwargs)
                if out is not NotImplemented:
                    return out
                owner._record(func)
                return func(*args, **kwargs)

        self._stack = contextlib.ExitStack()
        self._stack.enter_context(Functions())
        self._stack.enter_context(Ops())
        if self.triton:
            _install_triton_hook()
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        """Stop counting; the Triton hook is removed once no counter is active. ``counts`` stays readable."""
        _ACTIVE.remove(self)
        if not _ACTIVE:
            _remove_triton_hook()
        stack, self._stack = self._stack, None
        stack.__exit__(*exc)

    def top(self, n: int = 12) -> list[tuple[str, int]]:
        """The ``n`` most frequent ops, most frequent first."""
        return self.counts.most_common(n)


# ----------------------------------------------------------------------------------------------------- CUDA profiler
@dataclasses.dataclass
class CudaLaunches:
    """What the CUDA profiler saw of one call: ``kernels`` (compute kernels), ``memcpy`` and ``memset`` (copy
    engine / memset operations), ``graph_launches`` (``cudaGraphLaunch`` calls on the host), ``names`` (device
    activity by name) and ``source`` ("profiler", or "profiler (eager: ...)" when the graph's kernels were invisible
    and the eager twin was counted instead)."""

    kernels: int
    memcpy: int
    memset: int
    graph_launches: int
    names: Counter
    source: str = "profiler"

    @property
    def total(self) -> int:
        """Every device activity: kernels + memcpy + memset (each is one launch on the stream)."""
        return self.kernels + self.memcpy + self.memset


_NOT_LAUNCHES = ("event sync", "context sync", "stream sync", "stream wait", "device sync")


def classify_cuda_events(events: Iterable[tuple[str, bool]]) -> CudaLaunches:
    """``(name, on_device)`` profiler events -> :class:`CudaLaunches` (device events split into memcpy, memset and
    kernels by name; synchronisation records are skipped; host events only count ``cudaGraphLaunch``)."""
    names: Counter[str] = Counter()
    kernels = memcpy = memset = graphs = 0
    for name, on_device in events:
        if not on_device:
            graphs += name.startswith("cudaGraphLaunch")
            continue
        low = name.lower()
        if low.startswith(_NOT_LAUNCHES):             # synchronisation records (CUPTI sync activity), no work
            continue
        if low.startswith("memcpy"):
            memcpy += 1
        elif low.startswith("memset"):
            memset += 1
        else:
            kernels += 1
        names[name] += 1
    return CudaLaunches(kernels, memcpy, memset, graphs, names)


def _profile(fn: Callable, args, kwargs) -> CudaLaunches:
    """One call ``fn(*args, **kwargs)`` under the CUDA profiler, synchronised before and after, classified."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn(*args, **kwargs)
        torch.cuda.synchronize()
    events = prof.profiler.kineto_results.events()
    return classify_cuda_events((e.name(), e.device_type() == DeviceType.CUDA) for e in events)


def cuda_kernels(fn: Callable, *args, eager: Callable | None = None, **kwargs) -> CudaLaunches:
    """What one call ``fn(*args, **kwargs)`` launches on the GPU, counted by the CUDA profiler (run ``fn`` once
    before, so that no warm-up, autotuning or capture is counted).

    Kernels inside a CUDA graph replay are counted when the profiler (CUPTI) reports them; when it reports a graph
    launch but no device activity, the graph's kernels were invisible to it: then ``eager`` (the same work without the
    graph), if given, is counted instead and ``source`` says so; without ``eager`` the result has ``kernels == 0`` and
    ``source`` says the graph was opaque. Raises ``RuntimeError`` without CUDA.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("cuda_kernels needs a CUDA device (use OpCounter on a CPU)")
    seen = _profile(fn, args, kwargs)
    if seen.graph_launches and not seen.total:
        if eager is None:
            seen.source = "profiler (graph replay opaque to the profiler: kernels not counted)"
            return seen
        graphs = seen.graph_launches
        seen = _profile(eager, args, kwargs)
        seen.source = f"profiler (eager: the {graphs} graph launch(es) showed no kernels)"
    return seen


# Our kernels' plain-PyTorch twins: one kernel each on a GPU, so the CPU proxy counts each call once.
REFERENCE_STANDINS = ("tree_attention", "rms_norm_reference", "rope_reference", "swiglu_reference",
                      "swiglu_fused_reference")


def count_kernels(fn, device: torch.device, eager=None) -> dict:
    """Kernels one call of ``fn`` launches (``fn`` already ran once): ``{"total", "source", "top"}``. On CUDA the
    profiler's count (:func:`cuda_kernels`; ``eager`` as there); elsewhere :class:`OpCounter` with our kernels'
    reference twins (:data:`REFERENCE_STANDINS`) counted once per call."""
    if device.type == "cuda":
        seen = cuda_kernels(fn, eager=eager)
        return {"total": seen.total, "source": seen.source, "kernels": seen.kernels, "memcpy": seen.memcpy,
                "memset": seen.memset, "top": seen.names.most_common(6)}
    with OpCounter() as counter, contextlib.ExitStack() as stack:
        for name in REFERENCE_STANDINS:
            if hasattr(reference, name):
                stack.enter_context(counter.opaque_function(reference, name))
        fn()
    return {"total": counter.total, "source": "OpCounter", "top": counter.top(6)}
