"""The drafting rule on the host (:class:`HostDrafter`): every forward's outcome is read, so a phase stops as soon
as the rule says, and the chains go into one trie (no larger than it must be: what a CPU forward pays for)."""
from __future__ import annotations

from dataclasses import dataclass

from ouroboros.core.sampling import TreeSampler
from ouroboros.drafting.base import Draft, Drafter
from ouroboros.drafting.pool import PhrasePool
from ouroboros.drafting.window import LookaheadWindow
from ouroboros.hf.tree_step import tree_step

__all__ = ["HostDrafter"]


@dataclass
class _HostPhase:
    start: int                                          # len(x)
    gamma: int
    out: Draft


class HostDrafter(Drafter):
    """The rule on a runner driven from the host (:class:`ModelRunner`, or a static runner's host interface) with a
    :class:`PhrasePool`: the chains go into one trie (shared prefixes merged, absent guesses left out), so the tree
    is no larger than it must be, which is what a CPU forward pays for.

    ``sampler`` (a sampling draft): each forward's tokens are drawn from the draft's processed distribution instead
    of following its argmax, pooled guesses included (a guess token is kept when the draft's own draw takes it, by
    the sampler's walk over the forward's trie, so every drafted token is distributed as the draft's q at its
    position); the q of every draft token is kept, for verification with min(1, p/q).
    """

    def __init__(self, runner, eos: frozenset[int], window: LookaheadWindow | None = None,
                 pool: PhrasePool | None = None, guess_set: int = 0, topk: int = 0,
                 sampler: TreeSampler | None = None) -> None:
        if sampler is not None and window is not None:
            raise ValueError("a sampling draft has no Jacobi window (window=0)")
        if pool is None and (window is not None or guess_set or topk):
            raise ValueError("a window, guesses or suffixes need a phrase pool")
        self.runner, self.eos, self.window, self.pool = runner, eos, window, pool
        self.guess_set, self.topk, self.sampler = guess_set, topk, sampler

    def _begin(self, x: list[int], gamma: int, forwards: int) -> _HostPhase:
        return _HostPhase(len(x), gamma, Draft([], list(x)))

    def _forward(self, phase: _HostPhase) -> bool:
        out, seq = phase.out, phase.out.seq
        pending = seq[self.runner.n_cached:]
        guesses = self.pool.lookup(pending[-1], self.guess_set) if self.guess_set else []
        columns = self.window.columns if self.window is not None else []
        result = tree_step(self.runner, pending, branches=[*columns, *guesses], sampler=self.sampler, context=seq,
                           dists=self.sampler is not None)
        if self.window is not None:
            self.window.advance(result, self.pool)
        new = result.emitted
        if result.dists is not None:
            out.qs.extend(result.dists)
        out.forwards += 1
        out.drafted += len(new)
        out.guessed += len(new) - 1
        seq.extend(new)
        return out.drafted < phase.gamma and not self.eos.intersection(new)

    def _end(self, phase: _HostPhase) -> Draft:
        out = phase.out
        out.tokens = self._cut(out.seq[phase.start:], phase.gamma)
        out.qs = out.qs[:len(out.tokens)]
        if self.topk and not self.eos.intersection(out.tokens):
            out.suffixes = self.pool.lookup(out.tokens[-1], self.topk)
        return out
