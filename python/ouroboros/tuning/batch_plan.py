"""How far a batch should speculate (SPEC §6, issue 27 item 6): draft length per (device, B) from measured costs.

Verifying B trees costs more as B grows: a batched forward of B rows of T tokens costs about what B * T tokens cost
(on a CPU every extra token costs time already at B = 1; on a GPU the weights' read dominates up to some size). So
the draft length that pays at B = 1 can lose at B = 8. :func:`plan_batch` predicts, for each fixed draft length g
of a search space, the batch's tokens per ms, and compares it with plain batched greedy decoding (one target
forward of B x 1 tokens per token); it picks the best g, or plain decoding when no g beats greedy by ``min_gain``.

**One cycle of a batch on the host loop** (every row drafts g tokens, fixed; rows run in lockstep):

- drafting: ``F`` batched draft forwards of B rows: the first with 2 pending tokens + G guesses of N - 1 per row,
  the rest with 1 + G (N - 1) per row. Rows that finish their draft early wait for the slowest, so the phase takes
  the slowest row's forwards: ``F = g / y_B`` (at most g) with ``y_B = 1 + (y - 1) / B``, y the measured yield of
  one row (tokens per draft forward). This slowest-row rule is an assumption, not a measurement.
- verification: one batched target forward of B rows of ``1 + g + K (N - 1)`` tokens (the padded tree);
- tokens per row: ``sum_{i <= g} P(first i accepted) + 1 + P(all g accepted) suffix(K, N)`` (the acceptance model
  fitted on the real pair's traces, :data:`ouroboros.tuning.recorded.ACCEPTANCE`).

Step costs: :class:`BatchCosts`, ms of one batched forward by (B, T per row), read piecewise-linearly over the
measured T and B; past the largest measured B the cost is extrapolated linearly from the two largest (said in
the plan). The shipped tables: this project's CPU measurement (``data/cpu_batch_costs.json``: the real
Qwen2.5-Coder pair through the engine's own batched forward) and, for CUDA, a prediction from the H200 B = 1
step costs under the assumption that a forward's cost follows its total tokens B * T (marked ``predicted``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Mapping, Sequence

from ouroboros.core.config import DecodeConfig
from ouroboros.tuning.acceptance import AcceptanceModel
from ouroboros.tuning.recorded import ACCEPTANCE, H200_UNFUSED
from ouroboros.tuning.step_costs import StepCosts, interpolate

__all__ = ["BatchCosts", "BatchPlan", "plan_batch", "cpu_batch_costs", "gpu_batch_costs", "default_batch_plan"]

CPU_DATA_FILE = "data/cpu_batch_costs.json"      # inside the package ouroboros.tuning


@dataclass(frozen=True)
class BatchCosts:
    """Milliseconds of one batched forward: ``target[B][T]`` and ``draft[B][T]`` (T tokens per row, B rows).
    ``predicted``: the table is a model's prediction, not a measurement."""

    target: Mapping[int, Mapping[int, float]]
    draft: Mapping[int, Mapping[int, float]]
    label: str = ""
    predicted: bool = False

    def __post_init__(self) -> None:
        for name in ("target", "draft"):
            table = getattr(self, name)
            if not table or any(not points or any(not ms > 0 for ms in points.values()) for points in table.values()):
                raise ValueError(f"{name} batch costs must map B -> T -> ms > 0, got {table!r}")

    @staticmethod
    def _at(table: Mapping[int, Mapping[int, float]], rows: int, tokens: int, what: str) -> float:
        sizes = sorted(table)
        if rows in table:
            return interpolate(table[rows], tokens, what)
        if rows < sizes[0]:
            raise ValueError(f"{what} batch costs start at B={sizes[0]}, asked for B={rows}")
        below, above = [s for s in sizes if s < rows], [s for s in sizes if s > rows]
        lo, hi = (below[-1], above[0]) if above else (sizes[-2], sizes[-1]) if len(sizes) > 1 else (rows, rows)
        if lo == hi:
            raise ValueError(f"{what} batch costs hold B={sizes[0]} only, asked for B={rows}")
        a, b = interpolate(table[lo], tokens, what), interpolate(table[hi], tokens, what)
        return a + (b - a) * (rows - lo) / (hi - lo)

    def target_ms(self, rows: int, tokens: int) -> float:
        """One target forward of ``rows`` rows of ``tokens`` tokens each."""
        return self._at(self.target, rows, tokens, "target")

    def draft_ms(self, rows: int, tokens: int) -> float:
        """One draft forward of ``rows`` rows of ``tokens`` tokens each."""
        return self._at(self.draft, rows, tokens, "draft")

    @classmethod
    def from_dict(cls, data: Mapping) -> BatchCosts:
        """From ``{"target_ms": {"B": {"T": ms}}, "draft_ms": ..., "label": ..., "predicted": ...}``."""
        def table(raw: Mapping) -> dict[int, dict[int, float]]:
            return {int(b): {int(t): float(ms) for t, ms in row.items()} for b, row in raw.items()}
        return cls(table(data["target_ms"]), table(data["draft_ms"]), data.get("label", ""),
                   bool(data.get("predicted", False)))


@dataclass(frozen=True)
class BatchPlan:
    """What a batch of ``rows`` rows should do: speculate with ``config`` (a fixed draft length), or decode plainly
    (``config`` None), and why, with the predicted numbers behind it."""

    rows: int
    config: DecodeConfig | None
    predicted_speedup: float               # best speculative tokens/ms over plain batched greedy tokens/ms
    reason: str
    costs_label: str
    predicted_costs: bool
    candidates: list[dict] = field(default_factory=list)

    @property
    def speculate(self) -> bool:
        return self.config is not None

    def as_dict(self) -> dict:
        """A JSON-ready summary."""
        return {"rows": self.rows, "speculate": self.speculate,
                "config": self.config.as_dict() if self.config else None,
                "predicted_speedup": round(self.predicted_speedup, 3), "reason": self.reason,
                "costs": self.costs_label, "costs_predicted": self.predicted_costs, "candidates": self.candidates}


def _cycle(cfg: DecodeConfig, rows: int, costs: BatchCosts, model: AcceptanceModel) -> dict:
    """One batched host-loop cycle of fixed draft length ``cfg.gamma`` (module docstring): ms and tokens per row."""
    g, n1, chains = cfg.gamma, cfg.ngram - 1, cfg.window + cfg.guess_set
    y = model.draft_yield(chains, cfg.ngram) if chains else 1.0
    forwards = max(1.0, min(g, g / (1.0 + (y - 1.0) / rows)))
    draft = costs.draft_ms(rows, 2 + chains * n1) + (forwards - 1) * costs.draft_ms(rows, 1 + chains * n1)
    verify = costs.target_ms(rows, 1 + g + cfg.topk * n1)
    reach = model.trunk_reach(g)
    tokens = sum(reach) + 1.0 + reach[-1] * model.suffix_tokens(cfg.topk, cfg.ngram)
    return {"draft_ms": draft, "verify_ms": verify, "draft_forwards": forwards, "tokens_per_row": tokens}


def plan_batch(rows: int, base: DecodeConfig, costs: BatchCosts, models: Sequence[AcceptanceModel], *,
               gammas: Sequence[int] = (1, 2, 3, 4, 6, 8), min_gain: float = 1.05) -> BatchPlan:
    """The plan for ``rows`` rows: ``base``'s layout with each fixed draft length of ``gammas`` (adaptive off),
    predicted with every acceptance model (their mean); the best, if it beats plain batched greedy by ``min_gain``,
    else plain decoding. Deterministic. ValueError for rows < 1, no models, or costs outside their measured T."""
    if rows < 1 or not models:
        raise ValueError(f"plan_batch needs rows >= 1 and at least one acceptance model, got {rows}, {len(models)}")
    greedy_ms = costs.target_ms(rows, 1)                       # one token per row per forward
    greedy_rate = rows / greedy_ms
    cands = []
    for g in gammas:
        cfg = replace(base, gamma=g, adaptive=False)
        cycles = [_cycle(cfg, rows, costs, m) for m in models]
        rate = sum(rows * c["tokens_per_row"] / (c["draft_ms"] + c["verify_ms"]) for c in cycles) / len(cycles)
        c0 = cycles[0]
        cands.append({"gamma": g, "speedup": round(rate / greedy_rate, 3), "tokens_per_row": round(
            c0["tokens_per_row"], 2), "draft_forwards": round(c0["draft_forwards"], 2),
            "draft_ms": round(c0["draft_ms"], 1), "verify_ms": round(c0["verify_ms"], 1),
            "greedy_ms_per_token": round(greedy_ms, 1), "_cfg": cfg})
    best = max(cands, key=lambda c: c["speedup"])
    cfg = best["_cfg"]
    for c in cands:
        del c["_cfg"]
    label = costs.label + (" (predicted)" if costs.predicted else "")
    if best["speedup"] < min_gain:
        reason = (f"speculation cannot pay at B={rows}: the best draft length (g={best['gamma']}) is predicted at "
                  f"{best['speedup']:.2f}x plain batched greedy (target forward of {rows}x{1 + best['gamma']} "
                  f"tokens {best['verify_ms']} ms, {best['draft_forwards']} draft forwards {best['draft_ms']} ms, "
                  f"greedy {best['greedy_ms_per_token']} ms per token); decoding plainly")
        return BatchPlan(rows, None, best["speedup"], reason, label, costs.predicted, cands)
    reason = f"g={best['gamma']} fixed: predicted {best['speedup']:.2f}x plain batched greedy at B={rows}"
    return BatchPlan(rows, cfg, best["speedup"], reason, label, costs.predicted, cands)


def cpu_batch_costs() -> BatchCosts:
    """The CPU table shipped with the package (measured: see the module docstring)."""
    data = json.loads(resources.files("ouroboros.tuning").joinpath(CPU_DATA_FILE).read_text(encoding="utf-8"))
    return BatchCosts.from_dict(data)


def gpu_batch_costs(unbatched: StepCosts, sizes: Sequence[int] = (1, 2, 4, 8, 16)) -> BatchCosts:
    """A prediction for a GPU from its B = 1 step costs: a forward of B rows of T tokens costs what one of B * T
    tokens does (the weights' read dominates), wherever B * T lies inside the measured T; marked predicted."""
    def table(ms_of, measured: Mapping[int, float]) -> dict[int, dict[int, float]]:
        top = max(measured)
        return {b: {t: ms_of(b * t) for t in (1, 2, 4, 8, 16, 32, 64) if b * t <= top} for b in sizes}
    return BatchCosts(table(unbatched.target_ms, unbatched.target), table(unbatched.draft_ms, unbatched.draft),
                      f"{unbatched.label}, batched as B*T tokens", predicted=True)


def default_batch_plan(device_type: str, rows: int, base: DecodeConfig) -> BatchPlan:
    """The plan the engine follows for a batch of ``rows`` on a ``device_type`` ("cpu", "cuda") device: the shipped
    cost table of that device and the fitted acceptance models of the real pair."""
    costs = gpu_batch_costs(H200_UNFUSED) if device_type == "cuda" else cpu_batch_costs()
    return plan_batch(rows, base, costs, list(ACCEPTANCE.values()))
