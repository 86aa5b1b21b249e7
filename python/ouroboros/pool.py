"""The phrase pool: key token -> LRU list of phrases (tuples of N-1 tokens that followed the key).

One pool serves every producer (draft-model window, verification, prompt seeding, emitted text) and survives across
calls ("history reuse"). Both levels are bounded LRUs: each key keeps at most ``guess_set`` phrases and the pool keeps
at most ``max_keys`` keys, so a long-lived server does not grow without bound.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

__all__ = ["PhrasePool", "PoolStats", "POOL_FORMAT"]

POOL_FORMAT = "ouroboros-pool-v1"

Phrase = tuple[int, ...]


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
    """Bounded two-level LRU phrase pool.

    Guarantees:
    - ``insert(key, phrase)`` makes ``phrase`` the newest phrase of ``key`` (moving it there if present) and ``key``
      the newest key; a key's list never exceeds ``guess_set`` (oldest dropped) and the pool never exceeds
      ``max_keys`` keys (least recently inserted-into key dropped).
    - ``lookup(key, k)`` returns up to ``k`` phrases of ``key``, newest first, and changes no order.
    - Only phrases of exactly ``ngram - 1`` tokens are stored; others raise ``ValueError``.
    """

    ngram: int = 7
    guess_set: int = 20
    max_keys: int = 1 << 20
    _table: "OrderedDict[int, OrderedDict[Phrase, None]]" = field(default_factory=OrderedDict, repr=False)
    stats: PoolStats = field(default_factory=PoolStats, repr=False)

    def __post_init__(self) -> None:
        if self.ngram < 2:
            raise ValueError(f"ngram must be >= 2 (a key plus at least one token), got {self.ngram}")
        if self.guess_set < 1 or self.max_keys < 1:
            raise ValueError(f"guess_set and max_keys must be >= 1, got {self.guess_set}, {self.max_keys}")

    @property
    def phrase_len(self) -> int:
        return self.ngram - 1

    def __len__(self) -> int:
        """Number of phrases stored."""
        return sum(len(v) for v in self._table.values())

    def num_keys(self) -> int:
        return len(self._table)

    def __contains__(self, key: int) -> bool:
        return key in self._table

    def _check(self, phrase: Sequence[int]) -> Phrase:
        phrase = tuple(int(t) for t in phrase)
        if len(phrase) != self.phrase_len:
            raise ValueError(f"phrase must have ngram-1 = {self.phrase_len} tokens, got {len(phrase)}")
        return phrase

    def _touch_key(self, key: int) -> "OrderedDict[Phrase, None]":
        phrases = self._table.get(key)
        if phrases is None:
            phrases = self._table[key] = OrderedDict()
            if len(self._table) > self.max_keys:
                self._table.popitem(last=False)
        else:
            self._table.move_to_end(key)
        return phrases

    def insert(self, key: int, phrase: Sequence[int]) -> None:
        """Make ``phrase`` the newest phrase of ``key`` (see class guarantees)."""
        phrase = self._check(phrase)
        phrases = self._touch_key(int(key))
        if phrase in phrases:
            phrases.move_to_end(phrase)
        else:
            phrases[phrase] = None
            if len(phrases) > self.guess_set:
                phrases.popitem(last=False)

    def insert_many(self, items: Iterable[tuple[int, Sequence[int]]]) -> None:
        """Insert ``(key, phrase)`` pairs in order; equal to calling :meth:`insert` on each."""
        for key, phrase in items:
            self.insert(key, phrase)

    def replace(self, key: int, old: Sequence[int], new: Sequence[int]) -> None:
        """Put ``new`` where ``old`` stands in ``key``'s list (keeping its recency slot).

        If ``old`` is absent this is :meth:`insert`; if ``new`` is already present elsewhere, ``old`` is dropped and
        ``new`` keeps its own slot. The key's recency is refreshed as by an insert.
        """
        old, new = self._check(old), self._check(new)
        phrases = self._table.get(int(key))
        if phrases is None or old not in phrases:
            self.insert(key, new)
            return
        self._touch_key(int(key))
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
        """Up to ``k`` (default ``guess_set``) phrases of ``key``, newest first."""
        self.stats.lookups += 1
        phrases = self._table.get(int(key))
        if not phrases:
            return []
        self.stats.hits += 1
        out = list(reversed(phrases))
        return out if k is None else out[:k]

    def phrases(self, key: int) -> list[Phrase]:
        """All phrases of ``key``, oldest first (no counters touched)."""
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
        """Tensors + settings describing the pool exactly (key order and phrase order, oldest first)."""
        keys = list(self._table)
        counts = [len(self._table[k]) for k in keys]
        rows = [p for k in keys for p in self._table[k]]
        return {
            "format": POOL_FORMAT,
            "ngram": self.ngram,
            "guess_set": self.guess_set,
            "max_keys": self.max_keys,
            "keys": torch.tensor(keys, dtype=torch.int64),
            "counts": torch.tensor(counts, dtype=torch.int64),
            "phrases": torch.tensor(rows, dtype=torch.int64).reshape(len(rows), self.phrase_len),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "PhrasePool":
        if state.get("format") != POOL_FORMAT:
            raise ValueError(f"not an ouroboros phrase pool (format {state.get('format')!r}, expected {POOL_FORMAT!r})")
        pool = cls(ngram=int(state["ngram"]), guess_set=int(state["guess_set"]), max_keys=int(state["max_keys"]))
        rows = state["phrases"].tolist()
        start = 0
        for key, count in zip(state["keys"].tolist(), state["counts"].tolist()):
            pool._table[key] = OrderedDict((tuple(r), None) for r in rows[start:start + count])
            start += count
        return pool

    def save(self, path: str | Path) -> None:
        """Write the pool to ``path`` (a torch file of int64 tensors; load with :meth:`load`)."""
        torch.save(self.state_dict(), str(path))

    @classmethod
    def load(cls, path: str | Path) -> "PhrasePool":
        """Read a pool written by :meth:`save` (or by the GPU pool's ``save``)."""
        return cls.from_state_dict(torch.load(str(path), weights_only=True))
