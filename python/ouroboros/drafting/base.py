"""The drafting rule every drafter follows (SPEC §2 steps 1-2): :class:`Draft` and the :class:`Drafter` interface."""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from ouroboros.core.stops import clip_at_stop

__all__ = ["Draft", "Drafter", "YieldBudget"]


@dataclass
class Draft:
    """What one drafting phase proposes for verification (SPEC §2 steps 1-2), and what it cost."""

    tokens: list[int]                                  # the trunk: cut to gamma, and after its first EOS
    seq: list[int]                                     # the text + every drafted token (before the cut)
    suffixes: list = field(default_factory=list)       # phrases to hang off the trunk's tip (phrase concatenation)
    forwards: int = 0                                  # draft forwards run
    drafted: int = 0                                   # tokens drafted (before the cut)
    guessed: int = 0                                   # of those, accepted window/pool guesses (the rest: 1/forward)
    qs: list = field(default_factory=list)             # sampling draft: the q (V,) each trunk token was drawn from


class Drafter(ABC):
    """Drafting (SPEC §2 step 1): the one rule every drafter follows; subclasses differ only in where it runs.

    A phase starts from the tokens the drafting model has not cached yet (``pending``; the last is the root) and the
    cycle's current ``gamma``. Each draft forward runs the pending tokens, then the W window columns and the guesses
    (up to G phrases of ``P[root]``, newest first), each a chain of N-1 tokens off the root. It accepts the longest
    chain prefix equal to the model's argmax chain (the first such chain on ties; a trie walk gives the same tokens)
    and emits it plus the argmax after it (the bonus): 1..N tokens. Every window column then yields an n-gram
    (column[0] -> column[1:] + the prediction after its last level), inserted into P in column order, and becomes
    that phrase. The cache keeps the pending tokens and the accepted chain; the bonus is the next forward's pending
    token. Forwards run while fewer than ``gamma`` tokens are drafted and none is EOS, at most ``budget(gamma)`` of
    them. The draft is the drafted tokens cut to gamma and after the first EOS; unless it holds EOS, the K newest
    phrases of ``P[its last token]`` are the suffixes to verify after it (step 2). W = G = 0 is speculative decoding's
    drafting: one token per forward.

    A host drafter (:class:`HostDrafter`) reads every forward's outcome, so it stops as soon as the rule says
    (``budget`` = gamma never binds). A device drafter (:class:`ouroboros.drafting.device_drafter.DeviceDrafter`) reads once per
    phase: it runs exactly ``budget(gamma)`` forwards, and the ones after the rule says stop change nothing.
    """

    runner: object                   # the drafting model's runner (ModelRunner or StaticRunner)
    eos: frozenset[int]

    def budget(self, gamma: int) -> int:
        """The most draft forwards a phase with this ``gamma`` may run."""
        return gamma

    def draft(self, x: list[int], gamma: int, forwards: int | None = None) -> Draft:
        """One drafting phase after the text ``x`` (whose first ``runner.n_cached`` tokens the drafting model has
        cached) aiming at ``gamma`` tokens, by the class's rule; ``forwards`` overrides ``budget(gamma)`` (trace
        replay). Afterwards the cache holds ``x`` and the drafted tokens but the last, or a prefix of that."""
        if gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {gamma}")
        forwards = self.budget(gamma) if forwards is None else forwards
        if forwards < 1:
            raise ValueError(f"a drafting phase runs at least one forward, got forwards={forwards}")
        phase = self._begin(x, gamma, forwards)
        for _ in range(forwards):
            if not self._forward(phase):       # False: the phase is over (only a host drafter can know early)
                break
        return self._end(phase)

    def _cut(self, drafted: list[int], gamma: int) -> list[int]:
        """The draft: the drafted tokens cut to ``gamma`` and after the first EOS."""
        return clip_at_stop(drafted, gamma, self.eos)[0]

    @abstractmethod
    def _begin(self, x: list[int], gamma: int, forwards: int):
        """The state of a phase after ``x`` with ``gamma`` and at most ``forwards`` forwards."""

    @abstractmethod
    def _forward(self, phase) -> bool:
        """One draft forward by the rule; False once the phase is known to be over."""

    @abstractmethod
    def _end(self, phase) -> Draft:
        """The phase's draft (cut), suffixes and counts; the runner's host state made current."""


class YieldBudget:
    """The forward budget of a drafter that cannot stop a phase early (it reads the host once per phase, or not at
    all): ``gamma`` tokens take ``ceil(gamma / rate)`` forwards at the yield seen so far in this generation (tokens
    per forward that counted; 2 before any), between 1 and gamma."""

    drafted_seen: int = 0
    lived_seen: int = 0

    def budget(self, gamma: int) -> int:
        """The forwards a phase aiming at ``gamma`` tokens runs."""
        rate = (self.drafted_seen + 2) / (self.lived_seen + 1)
        return max(1, min(gamma, math.ceil(gamma / rate)))

    def observe(self, drafted: int, lived: int) -> None:
        """Add a phase's read counts (tokens drafted, forwards that counted) to the yield :meth:`budget` follows."""
        self.drafted_seen += drafted
        self.lived_seen += lived

    def forget_yield(self) -> None:
        """A new generation: the yield seen so far is forgotten."""
        self.drafted_seen = self.lived_seen = 0
