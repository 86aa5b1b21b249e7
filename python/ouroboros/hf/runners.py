"""Which runner a model decodes on: the dynamic-cache :class:`ModelRunner` or the static-cache fast path."""
from __future__ import annotations

from ouroboros.core.buckets import BUCKETS
from ouroboros.hf.runner import ModelRunner
from ouroboros.hf.static_runner import StaticRunner

__all__ = ["make_runner"]


def make_runner(model, fast: bool, max_len: int, reuse: bool = True, compile: bool | None = None):
    """The dynamic-cache runner, or the static-cache one (fast path) holding at least ``max_len`` tokens.

    A static runner is kept on the model and reused by later calls (its CUDA graphs too) while it is large enough
    and the model's device, dtype and ``compile`` setting are unchanged; it starts each call empty.
    """
    if not fast:
        return ModelRunner(model)
    runner = getattr(model, "_ouroboros_static_runner", None) if reuse else None
    if runner is None or not runner.fits(max_len + BUCKETS[-1], compile):
        runner = StaticRunner(model, max(max_len + BUCKETS[-1], 4096), compile=compile)
        if reuse:
            model._ouroboros_static_runner = runner
    runner.reset()
    return runner
