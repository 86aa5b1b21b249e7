"""The phrase pool: key token -> bounded list of phrases (tuples of N-1 tokens that followed the key).

One pool serves every producer (draft-model window, verification, prompt seeding, emitted text) and survives across
calls ("history reuse"). Both levels are bounded: each key keeps at most ``guess_set`` phrases and the pool keeps at
most ``max_keys`` keys (an LRU by insertion), so a long-lived server does not grow without bound.

Two modes for a key's list. The default is an LRU (SPEC §2): lookups newest first, a full list drops its oldest.
``scored=True`` keeps a *scored phrase history*: each phrase carries a count (how often it was inserted under its key,
with weights), lookups rank by count (ties: newest first), a full list drops its lowest count (ties: oldest), so a
frequent continuation survives churn, and :meth:`PhrasePool.lookup_scored` / :meth:`PhrasePool.best` give each
phrase's estimated probability ``count / sum of the key's counts``. A scored list is *stored* in rank order (lowest
count, oldest first: the OrderedDict's order, its values the counts), which is the whole state: ``lookup`` is the same
sort-free walk in both modes, and an insert moves only the phrases that outrank the one it placed.

Memory bound: ``nbytes() <= max_bytes`` (default 64 MiB) by the rule of :mod:`ouroboros.drafting.pool_budget`
(re-exported here): 1352 B per full key at the CPU defaults (N = 4, G = 3), 8376 B at N = 7, G = 20; a scored
pool's counts add 32 B per phrase (1448 B, 9016 B).
"""
from __future__ import annotations

import operator
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path

import torch

from ouroboros.drafting.pool_budget import (
    DEFAULT_MAX_BYTES,
    MAX_COUNT,
    budget_caps,
    fit_rows,
    fit_state,
    key_bytes,
    lru_dict_peak_bytes,
    phrase_bytes,
    table_nbytes,
)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "MAX_COUNT",
    "POOL_FORMAT",
    "POOL_FORMATS",
    "POOL_FORMAT_SCORED",
    "PhrasePool",
    "check_weight",
    "ranked_shares",
    "PoolStats",
    "budget_caps",
    "fit_rows",
    "fit_state",
    "key_bytes",
    "lru_dict_peak_bytes",
    "phrase_bytes",
]

POOL_FORMAT = "ouroboros-pool-v1"              # an LRU pool's file (and the device pool's)
POOL_FORMAT_SCORED = "ouroboros-pool-v2"       # a scored pool's file: v1 plus "scored" and "weights"
POOL_FORMATS = (POOL_FORMAT, POOL_FORMAT_SCORED)

Phrase = tuple[int, ...]


def check_weight(weight: int) -> int:
    """``weight`` as an int >= 1 (``ValueError`` otherwise: floats, bools, < 1)."""
    try:
        if isinstance(weight, bool):
            raise TypeError
        weight = operator.index(weight)
    except TypeError:
        raise ValueError(f"weight must be an integer >= 1, got {weight!r}") from None
    if weight < 1:
        raise ValueError(f"weight must be an integer >= 1, got {weight}")
    return weight


def ranked_shares(phrases: list[Phrase], counts: list[int] | None, k: int | None,
                  prior: float) -> list[tuple[Phrase, float]]:
    """A key's phrases best first (``phrases`` in stored order reversed, at most ``k``), each with its count over the
    sum of all ``counts`` plus ``prior`` (``counts=None``: an LRU list, every phrase counted once). ``ValueError`` for
    ``prior < 0``. :meth:`PhrasePool.lookup_scored` and its device adapter's twin."""
    if prior < 0:
        raise ValueError(f"prior must be >= 0, got {prior!r}")
    counts = [1] * len(phrases) if counts is None else counts
    total = sum(counts) + prior
    return [(p, c / total) for p, c in zip(reversed(phrases), reversed(counts))][:k]


def _rank_last(phrases: OrderedDict[Phrase, int], count: int) -> None:
    """Restore rank order (count ascending, ties oldest first) after the phrase at the end got ``count``: move the
    phrases before it that outrank it (a tail run of counts > ``count``) behind it, keeping their order."""
    higher = []
    tail = reversed(phrases.items())
    next(tail)
    for p, c in tail:
        if c <= count:
            break
        higher.append(p)
    for p in reversed(higher):
        phrases.move_to_end(p)


def _state_weights(state: dict) -> torch.Tensor:
    """A scored state's ``"weights"`` (int64, one per phrase row), checked: each >= 1 and <= ``MAX_COUNT``, and
    ascending within each key (the rank order a scored pool stores). Raises ``ValueError`` otherwise."""
    if "weights" not in state:
        raise ValueError(f"a {POOL_FORMAT_SCORED} pool state needs 'weights'")
    weights = state["weights"].long().reshape(-1)
    counts = state["counts"].long().reshape(-1)
    if weights.numel() != int(counts.sum()):
        raise ValueError("inconsistent pool state: weights do not match the phrase rows")
    if weights.numel() and (int(weights.min()) < 1 or int(weights.max()) > MAX_COUNT):
        raise ValueError(f"pool state weights must lie in [1, {MAX_COUNT}]")
    same_key = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    if bool(((weights[1:] < weights[:-1]) & (same_key[1:] == same_key[:-1])).any()):
        raise ValueError("pool state weights are not in rank order (ascending within each key)")
    return weights


@dataclass
class PoolStats:
    """Lookup counters: ``lookups`` calls of :meth:`PhrasePool.lookup`, ``hits`` those that found >= 1 phrase."""

    lookups: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


@dataclass
class PhrasePool:
    """Bounded two-level phrase pool: an LRU of keys, each with an LRU (default) or scored (``scored=True``) list.

    Guarantees:
    - ``insert(key, phrase)`` makes ``key`` the newest key; the pool never exceeds ``max_keys`` keys (least recently
      inserted-into key dropped) and a key's list never exceeds ``guess_set`` phrases.
    - LRU list: ``insert`` makes ``phrase`` the newest (moving it there if present); a full list drops its oldest.
    - Scored list: each phrase has a count, the sum of the weights it was inserted with (saturating at
      ``MAX_COUNT``), and a recency (its last insert); an insert adds its weight and refreshes the recency; a full list
      first drops its lowest count (ties: the oldest), so a new phrase always enters.
    - ``lookup(key, k)`` returns up to ``k`` phrases of ``key`` best first (LRU: newest first; scored: highest count
      first, ties newest first) and changes no order; it alone updates :attr:`stats`.
    - ``max_keys`` and ``guess_set`` are the caps :func:`budget_caps` derives from ``max_bytes`` (default 64 MiB),
      the requested values (``max_keys=None``: as many keys as the budget holds) and the mode, so
      ``nbytes() <= max_bytes``.
    - Only phrases of exactly ``ngram - 1`` tokens are stored; others raise ``ValueError``.
    """

    ngram: int = 7
    guess_set: int = 20
    max_keys: int | None = None
    max_bytes: int = DEFAULT_MAX_BYTES
    scored: bool = False
    _table: OrderedDict[int, OrderedDict[Phrase, int | None]] = field(default_factory=OrderedDict, repr=False)
    stats: PoolStats = field(default_factory=PoolStats, repr=False)

    def __post_init__(self) -> None:
        self.scored = bool(self.scored)
        self.max_keys, self.guess_set = budget_caps(self.ngram, self.guess_set, self.max_bytes, self.max_keys,
                                                    self.scored)

    @property
    def phrase_len(self) -> int:
        return self.ngram - 1

    def __len__(self) -> int:
        """Number of phrases stored."""
        return sum(len(v) for v in self._table.values())

    def num_keys(self) -> int:
        return len(self._table)

    def nbytes(self) -> int:
        """Bytes the pool holds, from ``sys.getsizeof`` of its tables plus every key's int, every phrase's tuple and
        ints and a scored pool's count objects (:func:`~ouroboros.drafting.pool_budget.table_nbytes`; shared small
        ints are overcounted). O(keys), a scored pool O(phrases). Never exceeds ``max_bytes``."""
        return table_nbytes(self._table, self.phrase_len, self.scored)

    def __contains__(self, key: int) -> bool:
        return key in self._table

    def _check(self, phrase: Sequence[int]) -> Phrase:
        phrase = tuple(int(t) for t in phrase)
        if len(phrase) != self.phrase_len:
            raise ValueError(f"phrase must have ngram-1 = {self.phrase_len} tokens, got {len(phrase)}")
        return phrase

    def _touch_key(self, key: int) -> OrderedDict[Phrase, int | None]:
        phrases = self._table.get(key)
        if phrases is None:
            phrases = self._table[key] = OrderedDict()
            if len(self._table) > self.max_keys:
                self._table.popitem(last=False)
        else:
            self._table.move_to_end(key)
        return phrases

    def insert(self, key: int, phrase: Sequence[int], weight: int = 1) -> None:
        """Insert ``phrase`` under ``key`` (see class guarantees). ``weight`` (an integer >= 1, else ``ValueError``):
        what a scored pool adds to the phrase's count; an LRU pool checks and ignores it."""
        phrase = self._check(phrase)
        if type(weight) is not int or weight != 1:                   # the common weight 1 costs one check
            weight = check_weight(weight)
        phrases = self._touch_key(int(key))
        if self.scored:
            self._add(phrases, phrase, weight)
        elif phrase in phrases:
            phrases.move_to_end(phrase)
        else:
            phrases[phrase] = None
            if len(phrases) > self.guess_set:
                phrases.popitem(last=False)

    def _add(self, phrases: OrderedDict[Phrase, int], phrase: Phrase, weight: int) -> None:
        """A scored insert: add ``weight`` to ``phrase``'s count (a new phrase first evicts the lowest ranked when the
        list is full), make it the newest of its count and restore the rank order."""
        count = phrases.get(phrase)
        if count is None:
            if len(phrases) >= self.guess_set:
                phrases.popitem(last=False)
            count = phrases[phrase] = min(weight, MAX_COUNT)
        else:
            count = phrases[phrase] = min(count + weight, MAX_COUNT)
            phrases.move_to_end(phrase)
        _rank_last(phrases, count)

    def insert_many(self, items: Iterable[tuple[int, Sequence[int]]]) -> None:
        """Insert ``(key, phrase)`` pairs in order; equal to calling :meth:`insert` on each (weight 1)."""
        for key, phrase in items:
            self.insert(key, phrase)

    def replace(self, key: int, old: Sequence[int], new: Sequence[int]) -> None:
        """Put ``new`` where ``old`` stands in ``key``'s list: verification's rewrite of a guess ``old`` into the
        target's own continuation ``new``. The key's recency is refreshed as by an insert.

        LRU list: ``new`` takes ``old``'s recency slot. If ``old`` is absent this is :meth:`insert`; if ``new`` is
        already present elsewhere, ``old`` is dropped and ``new`` keeps its own slot; ``old == new`` changes no order.

        Scored list: ``old``'s observations are taken as ``new``'s, plus this one: ``old`` (when present and not
        ``new``) is dropped and ``new`` is inserted with weight ``count(old) + 1`` (so an absent ``new`` gets ``old``'s
        count + 1, a present one adds it to its own; ``old`` absent or equal to ``new``: a plain insert, count + 1).
        """
        old, new = self._check(old), self._check(new)
        key = int(key)
        phrases = self._table.get(key)
        if self.scored:
            gained = phrases.pop(old, 0) if phrases is not None and old != new else 0
            self.insert(key, new, 1 + gained)
            return
        if phrases is None or old not in phrases:
            self.insert(key, new)
            return
        self._touch_key(key)
        if old == new:
            return
        if new in phrases:
            del phrases[old]
            return
        items = [new if p == old else p for p in phrases]
        phrases.clear()
        phrases.update((p, None) for p in items)

    def replace_many(self, items: Iterable[tuple[int, Sequence[int], Sequence[int]]]) -> None:
        """Apply :meth:`replace` to each ``(key, old, new)`` in order."""
        for key, old, new in items:
            self.replace(key, old, new)

    def lookup(self, key: int, k: int | None = None) -> list[Phrase]:
        """Up to ``k`` (default ``guess_set``) phrases of ``key``, best first (LRU: newest first; scored: highest
        count first, ties newest first: the stored rank order reversed, no sort)."""
        self.stats.lookups += 1
        phrases = self._table.get(int(key))
        if not phrases:
            return []
        self.stats.hits += 1
        out = list(reversed(phrases))
        return out if k is None else out[:k]

    def lookup_scored(self, key: int, k: int | None = None, prior: float = 0) -> list[tuple[Phrase, float]]:
        """The phrases :meth:`lookup` would return, each with its estimated probability: its count over the sum of
        ``key``'s counts (all its phrases, not only the ``k`` returned; an LRU pool counts each phrase once) plus
        ``prior``, a pseudo-count >= 0 of continuations not seen yet (``prior=1``: a phrase seen once, alone, is a
        coin flip). With ``prior=0`` the probabilities of a full lookup sum to 1. No counters touched."""
        phrases = self._table.get(int(key)) or {}
        return ranked_shares(list(phrases), list(phrases.values()) if self.scored else None, k, prior)

    def best(self, key: int, prior: float = 0) -> tuple[Phrase, float] | None:
        """``key``'s first phrase by :meth:`lookup` order with its probability (:meth:`lookup_scored`, same
        ``prior``), or ``None`` for a key with no phrase. No counters touched."""
        found = self.lookup_scored(key, 1, prior)
        return found[0] if found else None

    def count(self, key: int, phrase: Sequence[int]) -> int:
        """How often ``phrase`` was inserted under ``key`` (its weights' sum; an LRU pool: 1), 0 when absent."""
        phrases = self._table.get(int(key))
        phrase = tuple(int(t) for t in phrase)
        if phrases is None or phrase not in phrases:
            return 0
        return phrases[phrase] if self.scored else 1

    def phrases(self, key: int) -> list[Phrase]:
        """All phrases of ``key`` in stored order (no counters touched): LRU oldest first; scored in rank order,
        lowest count first (ties oldest first), i.e. the order a full list evicts them."""
        return list(self._table.get(int(key), ()))

    def keys(self) -> list[int]:
        """All keys, least recently inserted-into first."""
        return list(self._table)

    def seed_from(self, tokens: Sequence[int]) -> None:
        """Insert every n-gram of ``tokens`` (key = first token, phrase = the next N-1), left to right."""
        tokens = [int(t) for t in tokens]
        n = self.phrase_len
        for i in range(len(tokens) - n):
            self.insert(tokens[i], tokens[i + 1:i + 1 + n])

    def clear(self) -> None:
        self._table.clear()
        self.stats = PoolStats()

    # ---- persistence -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Tensors + settings describing the pool exactly (key order oldest first, each key's phrases in stored
        order). An LRU pool writes :data:`POOL_FORMAT` (unchanged since v1); a scored one :data:`POOL_FORMAT_SCORED`
        with ``"scored": True`` and ``"weights"``, the int64 counts aligned with the ``"phrases"`` rows."""
        keys = list(self._table)
        counts = [len(self._table[k]) for k in keys]
        rows = [p for k in keys for p in self._table[k]]
        state = {
            "format": POOL_FORMAT,
            "ngram": self.ngram,
            "guess_set": self.guess_set,
            "max_keys": self.max_keys,
            "max_bytes": self.max_bytes,
            "keys": torch.tensor(keys, dtype=torch.int64),
            "counts": torch.tensor(counts, dtype=torch.int64),
            "phrases": torch.tensor(rows, dtype=torch.int64).reshape(len(rows), self.phrase_len),
        }
        if self.scored:
            weights = [c for k in keys for c in self._table[k].values()]
            state.update(format=POOL_FORMAT_SCORED, scored=True, weights=torch.tensor(weights, dtype=torch.int64))
        return state

    @classmethod
    def from_state_dict(cls, state: dict) -> PhrasePool:
        """A pool equal to the one ``state`` describes, in the mode the state says (v1: LRU, v2: scored); one saved
        with larger caps (or before byte budgets) keeps its newest keys and, per key, its last phrases (LRU: newest;
        scored: best ranked), as inserting it in order would. Raises ``ValueError`` for another format or an
        inconsistent state."""
        fmt = state.get("format")
        if fmt not in POOL_FORMATS:
            raise ValueError(f"not an ouroboros phrase pool (format {fmt!r}, expected one of {POOL_FORMATS})")
        scored = fmt == POOL_FORMAT_SCORED
        if bool(state.get("scored", scored)) != scored:
            raise ValueError(f"pool state says scored={state['scored']!r} in format {fmt!r}")
        weights = _state_weights(state) if scored else None
        pool = cls(ngram=int(state["ngram"]), guess_set=int(state["guess_set"]), max_keys=int(state["max_keys"]),
                   max_bytes=int(state.get("max_bytes", DEFAULT_MAX_BYTES)), scored=scored)
        keys, counts, keep = fit_rows(state, pool.max_keys, pool.guess_set)
        rows = state["phrases"].long().reshape(-1, pool.phrase_len)[keep].tolist()
        values = weights[keep].tolist() if scored else None
        start = 0
        for key, count in zip(keys.tolist(), counts.tolist()):
            end = start + count
            chunk = values[start:end] if scored else repeat(None)
            pool._table[key] = OrderedDict(zip(map(tuple, rows[start:end]), chunk))
            start = end
        return pool

    def save(self, path: str | Path) -> None:
        """Write the pool to ``path`` (a torch file of int64 tensors; load with :meth:`load`)."""
        torch.save(self.state_dict(), str(path))

    @classmethod
    def load(cls, path: str | Path) -> PhrasePool:
        """Read a pool written by :meth:`save` (or by the GPU pool's ``save``)."""
        return cls.from_state_dict(torch.load(str(path), weights_only=True))
