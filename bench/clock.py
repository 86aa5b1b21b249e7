"""Timing for the GPU benchmarks: CUDA events on a GPU, ``time.perf_counter`` (after a sync) elsewhere."""
from __future__ import annotations

import gc
import time

import torch


class Clock:
    """CUDA events on a GPU, perf_counter (after a sync, where there is one) elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.kind = "cuda events" if self.cuda else "time.perf_counter"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def per_call(self, fn, iters: int, warmup: int = 2, after=None) -> float:
        """Seconds per call of ``fn`` (``after`` runs after each call, inside the timed region: keep it tiny)."""
        for _ in range(warmup):
            fn()
            if after:
                after()
        self.sync()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
                if after:
                    after()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
            if after:
                after()
        return (time.perf_counter() - t0) / iters

    def wall(self, fn):
        """(seconds, result) of one call, synchronised before and after."""
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - t0, out


def ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1e3, 4)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
