"""Whole cycles as CUDA graphs, and the cycle's one host read (SPEC §3 "The device cycle").

:class:`CycleGraphs` runs a cycle function (device ops only, returning a flat int64 block) for a key (the draft
forwards it runs, ...): the first time eagerly (kernels compile, tables build), the second time captured as one CUDA
graph in a mempool shared by every key, and from then on by replaying it. The block is read through a pinned buffer:
one device-to-host copy per cycle. Off CUDA (or with graphs off) the function runs eagerly and the block is read with
``tolist``. A capture that fails warns and switches graphs off: the cycle runs eagerly, with the same results.
"""
from __future__ import annotations

import warnings
from typing import Callable, Hashable, Sequence

import torch

__all__ = ["CycleGraphs"]


class CycleGraphs:
    """Graphs of one cycle object's cycle function, keyed by the caller (see the module docstring).

    ``runners``: objects with an ``inside_capture`` flag, set while a cycle is captured (so they run their forwards
    directly instead of replaying graphs of their own)."""

    def __init__(self, device: torch.device, use_graphs: bool, runners: Sequence[object]) -> None:
        self.device, self.use_graphs, self.runners = device, use_graphs, list(runners)
        self._graphs: dict[Hashable, tuple] = {}
        self._warm: set[Hashable] = set()
        self._mempool = None
        self._pinned: torch.Tensor | None = None
        self.replayed = 0

    @property
    def captured(self) -> int:
        """How many cycle graphs are captured now."""
        return len(self._graphs)

    def clear(self, keep: Callable[[Hashable], bool] | None = None) -> None:
        """Forget the captured graphs (those ``keep`` accepts stay): a buffer they read was replaced."""
        self._graphs = {k: v for k, v in self._graphs.items() if keep is not None and keep(k)}

    def run(self, key: Hashable, cycle: Callable[[], torch.Tensor]) -> list[int]:
        """Run ``cycle`` for ``key`` (a replay when captured) and read its block: the cycle's one host read."""
        if not self.use_graphs:
            return cycle().tolist()
        entry = self._graphs.get(key)
        if entry is None and key in self._warm:
            entry = self._capture(key, cycle)
        if entry is None:
            self._warm.add(key)
            block = cycle()
        else:
            graph, block = entry
            graph.replay()
            self.replayed += 1
        if self._pinned is None or self._pinned.shape != block.shape:
            self._pinned = torch.empty(block.shape, dtype=block.dtype, pin_memory=True)
        self._pinned.copy_(block, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return self._pinned.numpy().tolist()

    def _capture(self, key: Hashable, cycle: Callable[[], torch.Tensor]):
        """Capture ``cycle`` as the graph of ``key``; None (and graphs off) if it cannot be captured."""
        if self._mempool is None:
            self._mempool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        for r in self.runners:
            r.inside_capture = True
        try:
            with torch.cuda.graph(graph, pool=self._mempool):
                block = cycle()
        except Exception as err:  # noqa: BLE001 - a model or kernel that syncs cannot be captured: run eagerly
            warnings.warn(f"capturing the device cycle failed ({type(err).__name__}: {err}); running it eagerly")
            self.use_graphs = False
            return None
        finally:
            for r in self.runners:
                r.inside_capture = False
        self._graphs[key] = (graph, block)
        return self._graphs[key]
