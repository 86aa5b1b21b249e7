"""Batch > 1 on the host loop (SPEC §6): every row runs its own cycle, the model forwards are shared.

Each row runs the one-prompt host loop (:func:`~ouroboros.decoding.loop.decode_on`) unchanged, on :class:`RowRunner`
views of a :class:`~ouroboros.hf.batch_model.BatchModel` per model: its own draft, tree, position ids, acceptance and
KV length. A row's forward does not run at once: the row waits while :class:`BatchScheduler` collects every row's
request and runs ONE forward per model for all of them: draft requests first (one draft forward drafts every row
still drafting), then, once no row drafts any more, one target forward verifies every row's tree. Rows take turns
(one runs at a time, in row order), so everything a row does between two forwards (acceptance, the pool's writes,
sampling draws) happens in a fixed order: a batch run is deterministic, and each row computes exactly what it
computes alone (up to the float rounding of the padded batch forward). A finished row leaves both models' batches.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from ouroboros.core.config import DRAFT_METHODS, DecodeConfig
from ouroboros.core.sampling import TreeSampler
from ouroboros.core.tokentree import TokenTree
from ouroboros.decoding.batch_cycle import BatchDeviceCycle
from ouroboros.decoding.loop import decode_on, draft_sampler_for
from ouroboros.decoding.stats import GenerationStats, record_pool_stats
from ouroboros.drafting.gpu_pool import GpuPhrasePool
from ouroboros.drafting.pool import PhrasePool
from ouroboros.hf.batch_model import BatchModel
from ouroboros.hf.batch_static_runner import BatchStaticRunner
from ouroboros.tuning.batch_plan import BatchPlan

__all__ = ["BatchScheduler", "BatchStats", "RowRunner", "decode_batch", "decode_batch_on_device",
           "runs_on_device"]


class _Aborted(Exception):
    """Raised inside a row's thread when the batch is abandoned (an error in another row, or the caller stopped)."""


@dataclass
class BatchStats:
    """What a batch generation did: per-row :class:`GenerationStats` and the shared forwards."""

    rows: list[GenerationStats] = field(default_factory=list)
    target_forwards: int = 0          # batched target forwards (the prompts' prefill included)
    draft_forwards: int = 0           # batched draft forwards (prefill included)
    target_row_tokens: int = 0        # tree tokens the target ran, summed over rows (pads excluded)
    time_total: float = 0.0
    plan: BatchPlan | None = None     # the draft length chosen for this batch size, or why it decoded plainly

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.rows)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.time_total if self.time_total else 0.0

    def summary(self) -> dict:
        """Totals and per-row summaries as a JSON-ready dict."""
        return {"tokens": self.tokens, "target_forwards": self.target_forwards, "draft_forwards": self.draft_forwards,
                "target_row_tokens": self.target_row_tokens, "time_total": self.time_total,
                "tokens_per_second": self.tokens_per_second,
                "plan": self.plan.as_dict() if self.plan is not None else None,
                "rows": [s.summary() for s in self.rows]}


class RowRunner:
    """The host runner interface of :class:`~ouroboros.hf.runner.ModelRunner` for one row of a batch: its forwards
    are requests to the scheduler, answered by the next batched forward of that model."""

    def __init__(self, scheduler: "BatchScheduler", model: BatchModel, row: int) -> None:
        self.scheduler, self.model, self.row = scheduler, model, row
        self.forwards = 0
        self.forward_time = 0.0          # the batched forwards this row took part in, each counted in full
        self.gathers = 0

    @property
    def n_cached(self) -> int:
        return self.model.length[self.row]

    def _logits(self, tree: TokenTree) -> torch.Tensor:
        self.forwards += 1
        return self.scheduler.request(self, tree)

    def prefill(self, tokens: Sequence[int]) -> None:
        """Put ``tokens`` (may be empty) into this row's cache (one batched forward of a chain)."""
        if not tokens:
            return
        tree = TokenTree()
        nodes = tree.add_path(-1, list(tokens))
        prefix = self.n_cached
        self._logits(tree)
        self.model.keep(self.row, prefix, nodes)

    def forward_tree(self, tree: TokenTree) -> list[int]:
        return self._logits(tree).argmax(-1).tolist()

    def forward_tree_logits(self, tree: TokenTree) -> torch.Tensor:
        return self._logits(tree).float()

    def keep(self, prefix_len: int, nodes: Sequence[int]) -> None:
        if list(nodes) != list(range(len(nodes))):
            self.gathers += 1
        self.model.keep(self.row, prefix_len, nodes)

    def rollback(self, length: int) -> None:
        self.model.rollback(self.row, length)


class BatchScheduler:
    """Runs one generator per row in its own thread, one row at a time, and batches their forwards.

    ``models`` are run in the order given when several have requests waiting (the draft model before the target).
    :meth:`run` yields ``(row, tokens)`` as rows emit them, in row order within each step. A finished row leaves
    every model's batch, unless ``keep_rows`` (its cache outlives the run: a server's next step goes on from it)."""

    def __init__(self, models: Sequence[BatchModel], stop_rows: set[int] | None = None,
                 keep_rows: bool = False) -> None:
        self.models = list(models)
        self.keep_rows = keep_rows
        self.stop_rows = stop_rows if stop_rows is not None else set()   # rows to end at their next forward
        self._cv = threading.Condition()
        self._turn: int | None = None            # the row whose thread may run (None: the scheduler's)
        self._requests: dict[int, tuple[RowRunner, TokenTree]] = {}
        self._results: dict[int, torch.Tensor] = {}
        self._emitted: list[tuple[int, list[int]]] = []
        self._finished: set[int] = set()
        self._errors: dict[int, BaseException] = {}
        self._abort = False

    # ---- called from a row's thread -----------------------------------------------------------------------------
    def request(self, runner: RowRunner, tree: TokenTree) -> torch.Tensor:
        """Hand ``tree`` to the next batched forward of ``runner.model``; its logits (T, V) once it ran."""
        row = runner.row
        self._requests[row] = (runner, tree)
        self._yield_turn(row)
        if self._abort or row not in self._results:      # abandoned, or stopped by the caller (stop_rows)
            raise _Aborted()
        return self._results.pop(row)

    def _yield_turn(self, row: int) -> None:
        with self._cv:
            self._turn = None
            self._cv.notify_all()
            self._cv.wait_for(lambda: self._turn == row)

    def _body(self, row: int, rows_fn: Callable[[int], Iterator[list[int]]]) -> None:
        with self._cv:
            self._cv.wait_for(lambda: self._turn == row)
        try:
            if not self._abort:
                with torch.inference_mode():
                    for new in rows_fn(row):
                        self._emitted.append((row, list(new)))
        except _Aborted:
            pass
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
            self._errors[row] = err
        finally:
            with self._cv:
                self._finished.add(row)
                self._turn = None
                self._cv.notify_all()

    # ---- the scheduler's side -----------------------------------------------------------------------------------
    def _resume(self, row: int) -> None:
        """Let ``row`` run until it asks for a forward or finishes."""
        with self._cv:
            self._turn = row
            self._cv.notify_all()
            self._cv.wait_for(lambda: self._turn is None)

    def _step(self) -> list[int]:
        """One batched forward: the first model (in order) that has requests, for all of them; the rows served."""
        model = next(m for m in self.models if any(r.model is m for r, _ in self._requests.values()))
        rows = sorted(row for row, (r, _) in self._requests.items() if r.model is model)
        model.compact()
        t0 = time.perf_counter()
        logits = model.forward({row: self._requests[row][1] for row in rows})
        elapsed = time.perf_counter() - t0
        for row in rows:
            runner, _ = self._requests.pop(row)
            runner.forward_time += elapsed
            self._results[row] = logits[row]
        return rows

    def run(self, rows: Sequence[int], rows_fn: Callable[[int], Iterator[list[int]]]) -> Iterator[tuple[int, list[int]]]:
        """Run ``rows_fn(row)`` for every row (each in its thread); yield ``(row, tokens)`` as they come."""
        threads = [threading.Thread(target=self._body, args=(row, rows_fn), daemon=True, name=f"ouroboros-row{row}")
                   for row in rows]
        for t in threads:
            t.start()
        try:
            for row in rows:
                self._resume(row)
            yield from self._drain()
            while self._requests and not self._errors:
                for row in sorted(self.stop_rows & self._requests.keys()):
                    self._requests.pop(row)
                    self._resume(row)               # it finds no result and ends
                if self._requests:
                    for row in self._step():
                        self._resume(row)
                yield from self._drain()
        finally:
            self._abort = True
            for row in sorted(self._requests):
                self._resume(row)
            for t in threads:
                t.join()
        if self._errors:
            raise self._errors[min(self._errors)]

    def _drain(self) -> Iterator[tuple[int, list[int]]]:
        """Emitted tokens in row order; finished rows leave every model's batch."""
        emitted, self._emitted = sorted(self._emitted, key=lambda e: e[0]), []
        done = [row for row in self._finished if row not in self._requests]
        for model in self.models if not self.keep_rows else ():
            model.drop([row for row in done if row in model.length])
        yield from emitted


def decode_batch(target, draft, prompts: Sequence[Sequence[int]], *, method: str, cfg: DecodeConfig,
                 max_new_tokens: int, eos: frozenset[int], pool: PhrasePool | None, stats: BatchStats,
                 sampler: TreeSampler | Sequence[TreeSampler | None] | None = None, draft_sampling: bool = False,
                 stop_rows: set[int] | None = None) -> Iterator[tuple[int, list[int]]]:
    """Yield ``(row, tokens)`` as each row's cycles emit them, until every row ends (EOS or ``max_new_tokens``).

    Every row is the one-prompt host loop on its prompt (greedy: token for token the target's greedy output for that
    prompt alone, up to float rounding at near-ties; sampling: distributed as plain sampling of that row, the rows'
    draws from one generator stream in a fixed order, so a seed gives one batch output). One pool serves every row
    (phrases one row learns help the others), written in row order; ``stats.rows[i]`` is row i's
    :class:`GenerationStats` (its forward times count each shared forward in full). ``sampler`` may be one per row
    (rows with their own processors); rows the caller adds to ``stop_rows`` end at their next forward."""
    t0 = time.perf_counter()
    samplers = list(sampler) if isinstance(sampler, (list, tuple)) else [sampler] * len(prompts)
    if len(samplers) != len(prompts):
        raise ValueError(f"{len(samplers)} samplers for {len(prompts)} rows")
    twins: dict[int, TreeSampler | None] = {}          # one draft twin per distinct sampler
    for s in samplers:
        if id(s) not in twins:
            twins[id(s)] = draft_sampler_for(method, s, draft_sampling)
    draft_samplers = [twins[id(s)] for s in samplers]
    tgt = BatchModel(target, len(prompts))
    drf = BatchModel(draft, len(prompts)) if method in DRAFT_METHODS else None
    scheduler = BatchScheduler([m for m in (drf, tgt) if m is not None], stop_rows)
    stats.rows = [GenerationStats(method=method, config=cfg.as_dict()) for _ in prompts]

    def row_cycles(row: int) -> Iterator[list[int]]:
        return decode_on(RowRunner(scheduler, tgt, row), RowRunner(scheduler, drf, row) if drf else None,
                         prompts[row], method=method, cfg=cfg, max_new_tokens=max_new_tokens, eos=eos, pool=pool,
                         stats=stats.rows[row], sampler=samplers[row], draft_sampler=draft_samplers[row], t0=t0)

    try:
        yield from scheduler.run(range(len(prompts)), row_cycles)
    finally:
        stats.target_forwards, stats.target_row_tokens = tgt.forwards, tgt.row_tokens
        stats.draft_forwards = drf.forwards if drf else 0
        stats.time_total = time.perf_counter() - t0


def runs_on_device(method: str, cfg: DecodeConfig, pool, sampler) -> bool:
    """Whether a batch can run as :class:`BatchDeviceCycle` cycles: greedy ouroboros (no processors) with a device
    pool, pooled guesses (G >= 1) and no Jacobi window."""
    return (method == "ouroboros" and isinstance(pool, GpuPhrasePool) and sampler is None and cfg.window == 0
            and cfg.guess_set >= 1)


def _batch_cycle(target, draft, rows: int, width: int, pool: GpuPhrasePool, cfg: DecodeConfig,
                 eos: frozenset[int]) -> BatchDeviceCycle:
    """The batched cycle kept on ``target`` (with its runners and captured graphs) when it serves ``rows`` rows of
    ``width`` tokens with these settings; else a new one replacing it (one kept per target: static caches are
    large)."""
    cycle = getattr(target, "_ouroboros_batch_cycle", None)
    slots = -(-(width + 2 * cfg.max_gamma * cfg.ngram + 64) // 256) * 256
    if (cycle is not None and cycle.rows == rows and cycle.tgt.cache.max_len >= slots
            and cycle.fits(cycle.tgt, cycle.drf, pool, cfg, eos) and cycle.drf.model is draft):
        return cycle
    target._ouroboros_batch_cycle = None               # free the old caches before building new ones
    tgt = BatchStaticRunner(target, rows, slots)
    drf = BatchStaticRunner(draft, rows, slots + 2 * cfg.max_gamma * cfg.ngram + 64)
    target._ouroboros_batch_cycle = cycle = BatchDeviceCycle(tgt, drf, pool, cfg, eos)
    return cycle


def decode_batch_on_device(target, draft, prompts: Sequence[Sequence[int]], *, cfg: DecodeConfig,
                           max_new_tokens: int, eos: frozenset[int], pool: GpuPhrasePool,
                           stats: BatchStats) -> Iterator[tuple[int, list[int]]]:
    """Greedy ouroboros on a batch as :class:`BatchDeviceCycle` cycles (one graph and one read per cycle for the
    whole batch): yields ``(row, tokens)`` per cycle, rows in order, until every row ends. Each row is token for
    token the target's greedy output for that prompt (up to float rounding of the batched forward)."""
    t0 = time.perf_counter()
    cycle = _batch_cycle(target, draft, len(prompts), max(len(p) for p in prompts) + max_new_tokens, pool, cfg, eos)
    for r in (cycle.tgt, cycle.drf):
        r.reset()
    stats.rows = [GenerationStats(method="ouroboros", config=cfg.as_dict(), device_cycle=True) for _ in prompts]
    lookups0, hits0 = pool.stats.lookups, pool.stats.hits
    try:
        for step in cycle.generate(prompts, max_new_tokens, stats.rows, pool=pool):
            yield from step
    finally:
        stats.target_forwards, stats.draft_forwards = cycle.tgt.forwards, cycle.drf.forwards
        stats.target_row_tokens = sum(c["tree_size"] for s in stats.rows for c in s.trace)
        stats.time_total = time.perf_counter() - t0
        for s in stats.rows:                  # one pool serves every row: each row reports the shared pool
            record_pool_stats(s, pool, lookups0, hits0)
