"""Model-free cycles (issue #29 item 2): when the scored phrase history is sure of the continuation, a cycle skips
the draft model and the target verifies the pooled chain directly; the draft model resumes when confidence drops.

:func:`pooled_chain` follows the pool's best phrase, phrase by phrase, while the estimated probability that the chain
is right so far stays above a floor (SuffixDecoding's rule: the draft length follows the confidence, not a fixed N).
Each step looks the continuation up under the longest context the pool knows (the last ``ORDERS`` tokens down to one:
:mod:`ouroboros.drafting.contexts` keys, written by :func:`remember` from the prompt and the emitted text). A phrase's
probability is its count over its key's total plus 1/o for a context of o tokens (an unseen alternative: after one
token a continuation seen once is a coin flip, after three tokens it is 3 in 4, as a longer match is better
evidence).

:class:`ModelFreeGate` decides per cycle from costs it measures as it goes: a model-free cycle is worth it when the
tokens it is expected to emit per second of target forward beat what the last draft-model cycles emitted per second
of draft and target forwards together. Expectations are calibrated by what model-free cycles actually got accepted.
Proposals stay deterministic given the text (the pool is written only from emitted text and target argmaxes), so
the cycle stays lossless as any other: greedy token for token, sampling accepting each pooled token with r(x).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ouroboros.drafting.contexts import context_key, context_phrases

__all__ = ["ORDERS", "ModelFreeGate", "pooled_chain", "remember"]

ORDERS = 3          # the longest context (in tokens) a phrase is keyed by for model-free chains


def remember(pool, tokens: Sequence[int], start: int) -> None:
    """Key the phrases of ``tokens`` whose key token sits at index >= ``start`` by their 2..``ORDERS``-token
    contexts too (the one-token keys are what every ouroboros pool already gets)."""
    pool.insert_many(context_phrases(tokens, start, pool.phrase_len, ORDERS, low=2))


def _best(pool, context: list[int]) -> tuple[tuple[int, ...], float] | None:
    """The best phrase under the longest context the pool knows, with its probability (count / (total + 1/o))."""
    for o in range(min(ORDERS, len(context)), 0, -1):
        found = pool.lookup_scored(context_key(context[-o:]), 1, prior=1 / o)
        if found:
            return found[0]
    return None


def pooled_chain(pool, tokens: Sequence[int], max_tokens: int, floor: float) -> tuple[list[int], list[float]]:
    """The chain after the text ``tokens``: the best phrase under the longest known context, appended while the
    running product of phrase probabilities stays >= ``floor``; at most ``max_tokens`` tokens. Returns
    ``(tokens, probs)`` where ``probs[i]`` is that running product for token ``i`` (the chance, by the pool's counts,
    that the chain is right up to and including it). ``pool`` needs :meth:`~PhrasePool.lookup_scored`; an
    unscored pool counts every phrase once."""
    chain: list[int] = []
    probs: list[float] = []
    p, context = 1.0, [int(t) for t in tokens[-ORDERS:]]
    while len(chain) < max_tokens:
        found = _best(pool, context)
        if found is None or p * found[1] < floor:
            break
        p *= found[1]
        take = list(found[0][:max_tokens - len(chain)])
        chain += take
        probs += [p] * len(take)
        context = (context + take)[-ORDERS:]
    return chain, probs


@dataclass
class ModelFreeGate:
    """Whether the next cycle verifies the pooled chain without drafting (see the module docstring).

    ``floor`` bounds the chain (:func:`pooled_chain`); ``decay`` is the weight of the past in the running means.
    Until one draft-model cycle has been measured the gate says no (it has no cost to weigh against).
    """

    floor: float = 0.3
    decay: float = 0.8
    explore: float = 0.5            # before any model-free cycle (calibration unknown), try one at this fraction
    draft_tokens: float = 0.0       # running mean: tokens a draft-model cycle emitted
    draft_seconds: float = 0.0      # running mean: seconds of a draft-model cycle (draft + verify forwards)
    verify_seconds: float = 0.0     # running mean: seconds of a target verification forward
    predicted: float = 0.0          # running mean, model-free cycles: tokens the pool's counts predicted
    accepted: float = 0.0           # running mean, model-free cycles: tokens the target accepted of the chain
    draft_cycles: int = 0
    free_cycles: int = 0

    def _mean(self, old: float, new: float, n: int) -> float:
        return new if n == 0 else self.decay * old + (1 - self.decay) * new

    @property
    def calibration(self) -> float:
        """Accepted over predicted chain tokens of the model-free cycles so far (1 before any), within 0.1..1.5."""
        if self.free_cycles == 0 or self.predicted <= 0:
            return 1.0
        return min(max(self.accepted / self.predicted, 0.1), 1.5)

    def worth_it(self, probs: list[float]) -> bool:
        """True when a model-free cycle verifying a chain with these ``probs`` is expected to emit more tokens per
        second than a draft-model cycle: (1 + c * sum(probs)) / t_verify > tokens_draft / t_draft_cycle, with c the
        :attr:`calibration`; until one model-free cycle has been measured (c unknown), when it is expected to reach
        ``explore`` of that rate (one try, then its outcome calibrates the next decisions)."""
        if not probs or self.draft_cycles == 0 or self.draft_seconds <= 0 or self.verify_seconds <= 0:
            return False
        expected = 1.0 + self.calibration * sum(probs)
        ratio = (expected / self.verify_seconds) / (self.draft_tokens / self.draft_seconds)
        return ratio > (self.explore if self.free_cycles == 0 else 1.0)

    def observe_draft(self, tokens: int, draft_seconds: float, verify_seconds: float) -> None:
        """A draft-model cycle emitted ``tokens`` after these seconds of draft and target forwards."""
        n = self.draft_cycles
        self.draft_tokens = self._mean(self.draft_tokens, tokens, n)
        self.draft_seconds = self._mean(self.draft_seconds, draft_seconds + verify_seconds, n)
        self.verify_seconds = self._mean(self.verify_seconds, verify_seconds, n + self.free_cycles)
        self.draft_cycles += 1

    def observe_free(self, accepted: int, probs: list[float], verify_seconds: float) -> None:
        """A model-free cycle accepted ``accepted`` of its chain's tokens (predicted ``sum(probs)``)."""
        n = self.free_cycles
        self.predicted = self._mean(self.predicted, sum(probs), n)
        self.accepted = self._mean(self.accepted, accepted, n)
        self.verify_seconds = self._mean(self.verify_seconds, verify_seconds, n + self.draft_cycles)
        self.free_cycles += 1
