"""Pool mode's confidence cut (SuffixDecoding's rule, calibrated online): every proposed token is scored by the
estimated probability that the target accepts it given that the tokens before it in the chain were accepted, and a
chain stops at the first token where the product of those probabilities (the chance the whole prefix is accepted)
falls below the step's threshold.

The estimate is per *cell*: (the context order the token's phrase was found under, the token's position in that
phrase). Each cell is a Beta posterior: a prior (order 1 low, longer contexts higher) plus the counts of what the
next step's history showed (:meth:`AcceptanceModel.observe`), decayed every step (:meth:`AcceptanceModel.tick`),
so estimates start sensible, follow the workload, stay bounded (about the last :data:`WINDOW` steps weigh), and a
cell cut off drifts back to its prior and is tried again.

The threshold (:func:`step_threshold`) is ``confidence * (rows - 1)``, capped at :data:`MAX_THRESHOLD`: ``rows`` is
how many tokens the step verifies without any proposal (one per running request). A proposed token is worth
verifying when its chance of acceptance beats its cost over what a step buys anyway. A lone request's step is
memory-bound (the target's weights are read once whatever the chain; a verified token costs a percent of the step),
so its chain is not cut; every further request makes the step more compute-bound, every proposed token then costs
target compute, and the step's fixed cost is already shared by the other rows' tokens, so the bar rises with the
rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

__all__ = ["Cell", "Proposal", "AcceptanceModel", "step_threshold", "DEFAULT_CONFIDENCE", "MAX_THRESHOLD",
           "PRIORS", "WINDOW"]

Cell = tuple[int, int]                 # (context order, position in the phrase)

DEFAULT_CONFIDENCE = 0.15              # threshold per further row (OUROBOROS_VLLM_POOL_CONFIDENCE's default)
MAX_THRESHOLD = 0.9                    # never ask more than this of a chain prefix, however many rows
WINDOW = 256                           # steps an observation weighs (counts decay by 1 - 1/WINDOW per step)
# Beta(accepted, rejected) prior per context order (the last one serves every longer order): a one-token context is
# a weak guess, a longer one is usually a copy of text seen before
PRIORS: dict[int, tuple[float, float]] = {1: (1.0, 3.0), 2: (2.0, 2.0), 3: (3.0, 1.5)}


def step_threshold(confidence: float, rows: int) -> float:
    """The least estimated probability a chain prefix must have to be proposed in a step of ``rows`` running
    requests: ``confidence * (rows - 1)``, at most :data:`MAX_THRESHOLD`, never below 0 (so 0, every chain whole,
    for a lone request or a ``confidence`` of 0)."""
    return min(max(confidence * (rows - 1), 0.0), MAX_THRESHOLD)


@dataclass
class Proposal:
    """One request's last pool-mode chain: its tokens, each token's cell, and the history length it followed."""

    tokens: list[int]
    cells: list[Cell]
    at: int

    def accepted(self, history: Sequence[int]) -> int | None:
        """How many of the tokens ``history`` (the request's history a step later) shows accepted: the common
        prefix of the chain and what followed ``at``; None when ``history`` has not grown past ``at`` (not
        verified yet)."""
        if len(history) <= self.at:
            return None
        new = history[self.at:self.at + len(self.tokens)]
        return next((i for i, (a, b) in enumerate(zip(new, self.tokens)) if int(a) != b), len(new))


@dataclass
class AcceptanceModel:
    """The acceptance estimate of every cell, shared by all requests of a proposer.

    Guarantees: :meth:`estimate` is in (0, 1), the prior's mean before any observation; an accepted observation never
    lowers it and a rejected one never raises it; a cell's counts stay below ``window`` times its observations per
    step."""

    window: int = WINDOW
    priors: dict[int, tuple[float, float]] = field(default_factory=lambda: dict(PRIORS))
    counts: dict[Cell, list[float]] = field(default_factory=dict)     # cell -> [decayed accepted, decayed seen]

    def _prior(self, order: int) -> tuple[float, float]:
        return self.priors[min(max(order, min(self.priors)), max(self.priors))]

    def estimate(self, cell: Cell) -> float:
        """Posterior mean acceptance of a token of ``cell`` (given the tokens before it were accepted)."""
        a, b = self._prior(cell[0])
        hits, seen = self.counts.get(cell, (0.0, 0.0))
        return (a + hits) / (a + b + seen)

    def update(self, cell: Cell, accepted: bool) -> None:
        """Count one observation of ``cell``."""
        c = self.counts.setdefault(cell, [0.0, 0.0])
        c[0] += float(accepted)
        c[1] += 1.0

    def tick(self) -> None:
        """One engine step passed: every count decays by ``1 - 1/window``, so old observations fade and a cell no
        longer proposed (its estimate below the thresholds) drifts back to its prior and is tried again."""
        keep = 1.0 - 1.0 / self.window
        for c in self.counts.values():
            c[0] *= keep
            c[1] *= keep

    def observe(self, proposal: Proposal | None, history: Sequence[int]) -> None:
        """Learn from what ``history`` shows of ``proposal``: its accepted tokens count as accepted, the first
        rejected one (a different token in its place) as rejected, the ones after it (never judged) not at all.
        Nothing when there is no proposal or it was not verified yet."""
        if proposal is None or not proposal.tokens:
            return
        n = proposal.accepted(history)
        if n is None:
            return
        for cell in proposal.cells[:n]:
            self.update(cell, True)
        if n < len(proposal.tokens) and len(history) > proposal.at + n:     # a different token stands there
            self.update(proposal.cells[n], False)

    def cut(self, cells: Sequence[Cell], threshold: float) -> int:
        """How many leading tokens of a chain of ``cells`` to propose: up to the first whose running product of
        estimates falls below ``threshold`` (all of them when ``threshold`` is 0)."""
        if threshold <= 0:
            return len(cells)
        p = 1.0
        for i, cell in enumerate(cells):
            p *= self.estimate(cell)
            if p < threshold:
                return i
        return len(cells)
