"""The phrase pool: key token -> LRU list of phrases (tuples of N-1 tokens that followed the key).

One pool serves every producer (draft-model window, verification, prompt seeding, emitted text) and survives across
calls ("history reuse"). Both levels are bounded LRUs: each key keeps at most ``guess_set`` phrases and the pool keeps
at most ``max_keys`` keys, so a long-lived server does not grow without bound.

Memory bound
------------
A pool has a byte budget, ``max_bytes`` (default 64 MiB). The key cap (unless a smaller ``max_keys`` is given) and, for
a budget too small for one full key, the phrases-per-key cap derive from it (:func:`budget_caps`), so that
:meth:`PhrasePool.nbytes` can never exceed it. What a key and a phrase cost, measured with ``sys.getsizeof`` on
CPython 3.11 (64-bit) and rounded up to the 16-byte blocks of CPython's allocator (the rule runs on the interpreter
at hand; these are its values there):

- a phrase of P tokens: its tuple (``getsizeof`` = 40 + 8 P) plus P int objects of 28 -> 32 B each (token ids below
  257 are shared singletons, so this overcounts them): 160 B for P = 3, 288 B for P = 6;
- a key: its int (32 B); its slot in the table of keys, at most 200 B (CPython compacts a churning dict into a table
  sized for 3x its entries rounded up to a power of two, < 6 slots per key of 4 B index + 16 B of entries + 8 B
  of OrderedDict node array, plus a 32 B node: 6 x 28 + 32 = 200; measured peak 179 B per key at 50k-100k keys);
  and its own OrderedDict of phrases at the peak it reaches under LRU churn (simulated once per G; it compacts into a
  table for 3x its entries): 640 B for G = 3, 2384 B for G = 20 (freshly built: 448 B, 1592 B).

So a full key costs 640 + 32 + 200 + 3 x 160 = 1352 B at the CPU defaults (N = 4, G = 3): 64 MiB hold 49,636 keys;
and 2384 + 32 + 200 + 20 x 288 = 8376 B at the GPU defaults (N = 7, G = 20): 8,011 keys. :meth:`PhrasePool.nbytes`
walks the real ``getsizeof`` of the tables (a few % above what ``tracemalloc`` sees: tests/drafting/test_pool.py).
The device pool (:mod:`ouroboros.drafting.gpu_pool`) takes the same caps from the same rule, so both keep the same contents.
"""
from __future__ import annotations

import functools
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

__all__ = ["PhrasePool", "PoolStats", "POOL_FORMAT", "DEFAULT_MAX_BYTES", "budget_caps", "fit_state", "key_bytes",
           "phrase_bytes"]

POOL_FORMAT = "ouroboros-pool-v1"
DEFAULT_MAX_BYTES = 64 << 20

Phrase = tuple[int, ...]


def _block(n: int) -> int:
    """Bytes CPython's small-object allocator hands out for an ``n``-byte object (16-byte blocks)."""
    return -(-n // 16) * 16


_INT_BYTES = _block(sys.getsizeof(1 << 20))            # one token id object (>= 257: not a shared singleton)
_KEY_SLOT_BYTES = 200                                  # a key's share of the table of keys at its worst (docstring)
_TABLE_BASE_BYTES = sys.getsizeof(OrderedDict({0: None}))   # the table of keys with its smallest allocation


def phrase_bytes(phrase_len: int) -> int:
    """Bytes of one stored phrase: its tuple and its ``phrase_len`` int objects."""
    return _block(sys.getsizeof(tuple(range(phrase_len)))) + phrase_len * _INT_BYTES


@functools.lru_cache(maxsize=None)
def lru_dict_peak_bytes(capacity: int) -> int:
    """Peak ``sys.getsizeof`` of an OrderedDict kept at most ``capacity`` entries by LRU churn (a key's phrase list;
    the table of keys).

    A dict that keeps inserting and evicting compacts into a table sized for 3x its entries; that happens within the
    first ``4 capacity + 16`` inserts, and later compactions find the same size.
    """
    table: OrderedDict[int, None] = OrderedDict()
    peak = sys.getsizeof(table)
    for i in range(4 * capacity + 16):
        table[i] = None
        if len(table) > capacity:
            table.popitem(last=False)
        peak = max(peak, sys.getsizeof(table))
    return peak


def key_bytes(ngram: int, guess_set: int) -> int:
    """Most bytes one key with ``guess_set`` phrases of ``ngram - 1`` tokens can cost (module docstring)."""
    return (lru_dict_peak_bytes(guess_set) + _INT_BYTES + _KEY_SLOT_BYTES
            + guess_set * phrase_bytes(ngram - 1))


def budget_caps(ngram: int, guess_set: int, max_bytes: int, max_keys: int | None = None) -> tuple[int, int]:
    """``(max_keys, guess_set)`` a pool keeps within ``max_bytes``: the requested ``guess_set`` (lowered only when one
    key with that many phrases does not fit), and as many keys as fit (at most ``max_keys`` when given).

    Both pools use this rule, so they hold the same keys and phrases. Raises ``ValueError`` when not even one key
    with one phrase fits, or for sizes < 1.
    """
    if ngram < 2:
        raise ValueError(f"ngram must be >= 2 (a key plus at least one token), got {ngram}")
    if guess_set < 1 or (max_keys is not None and max_keys < 1):
        raise ValueError(f"guess_set and max_keys must be >= 1, got {guess_set}, {max_keys}")
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool):
        raise ValueError(f"max_bytes must be an int (bytes), got {max_bytes!r}")
    room = max_bytes - _TABLE_BASE_BYTES
    if room < key_bytes(ngram, 1):
        raise ValueError(f"max_bytes={max_bytes} is too small for one key with one {ngram - 1}-token phrase (needs "
                         f"{_TABLE_BASE_BYTES + key_bytes(ngram, 1)} bytes)")
    if key_bytes(ngram, guess_set) > room:         # not one full key: the most phrases per key that fit
        low, high = 1, guess_set - 1                # key_bytes grows strictly with guess_set
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if key_bytes(ngram, mid) <= room else (low, mid - 1)
        guess_set = low
    keys = room // key_bytes(ngram, guess_set)
    return (keys if max_keys is None else min(keys, max_keys)), guess_set


def fit_state(state: dict, max_keys: int, guess_set: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``(keys, counts, phrases)`` of a pool state dict cut to the caps, as inserting it in order would leave it:
    the newest ``max_keys`` keys, each with its newest ``guess_set`` phrases. Raises ``ValueError`` when the state
    is inconsistent (counts not matching the phrase rows, or above the state's own ``guess_set``)."""
    n_tok = int(state["ngram"]) - 1
    keys = state["keys"].long().reshape(-1)
    counts = state["counts"].long().reshape(-1)
    rows = state["phrases"].long().reshape(-1, n_tok)
    if counts.numel() != keys.numel() or int(counts.sum()) != rows.shape[0]:
        raise ValueError("inconsistent pool state: counts do not match keys / phrases")
    if counts.numel() and int(counts.max()) > int(state["guess_set"]):
        raise ValueError(f"pool state has a key with more than guess_set = {int(state['guess_set'])} phrases")
    first = max(0, keys.numel() - max_keys)
    if first == 0 and (counts.numel() == 0 or int(counts.max()) <= guess_set):
        return keys, counts, rows
    starts = (torch.cumsum(counts, 0) - counts).tolist()
    ends = [a + c for a, c in zip(starts, counts.tolist())]
    keep = [r for a, e in zip(starts[first:], ends[first:]) for r in range(max(a, e - guess_set), e)]
    return keys[first:], counts[first:].clamp(max=guess_set), rows[torch.tensor(keep, dtype=torch.long)]


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
    - ``max_keys`` and ``guess_set`` are the caps :func:`budget_caps` derives from ``max_bytes`` (default 64 MiB) and
      the requested values (``max_keys=None``: as many keys as the budget holds), so ``nbytes() <= max_bytes``.
    - ``lookup(key, k)`` returns up to ``k`` phrases of ``key``, newest first, and changes no order.
    - Only phrases of exactly ``ngram - 1`` tokens are stored; others raise ``ValueError``.
    """

    ngram: int = 7
    guess_set: int = 20
    max_keys: int | None = None
    max_bytes: int = DEFAULT_MAX_BYTES
    _table: "OrderedDict[int, OrderedDict[Phrase, None]]" = field(default_factory=OrderedDict, repr=False)
    stats: PoolStats = field(default_factory=PoolStats, repr=False)

    def __post_init__(self) -> None:
        self.max_keys, self.guess_set = budget_caps(self.ngram, self.guess_set, self.max_bytes, self.max_keys)
        self._phrase_bytes = phrase_bytes(self.phrase_len)

    @property
    def phrase_len(self) -> int:
        return self.ngram - 1

    def __len__(self) -> int:
        """Number of phrases stored."""
        return sum(len(v) for v in self._table.values())

    def num_keys(self) -> int:
        return len(self._table)

    def nbytes(self) -> int:
        """Bytes the pool holds, from ``sys.getsizeof`` of its tables plus every key's int and every phrase's tuple
        and ints (costs in the module docstring; shared small ints are overcounted). Walks the keys: O(keys).
        Never exceeds ``max_bytes``."""
        total = sys.getsizeof(self._table) + len(self._table) * _INT_BYTES
        for phrases in self._table.values():
            total += sys.getsizeof(phrases) + len(phrases) * self._phrase_bytes
        return total

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
            "max_bytes": self.max_bytes,
            "keys": torch.tensor(keys, dtype=torch.int64),
            "counts": torch.tensor(counts, dtype=torch.int64),
            "phrases": torch.tensor(rows, dtype=torch.int64).reshape(len(rows), self.phrase_len),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "PhrasePool":
        """A pool equal to the one ``state`` describes; one saved with larger caps (or before byte budgets) keeps
        its newest keys and phrases, as inserting it in order would."""
        if state.get("format") != POOL_FORMAT:
            raise ValueError(f"not an ouroboros phrase pool (format {state.get('format')!r}, expected {POOL_FORMAT!r})")
        pool = cls(ngram=int(state["ngram"]), guess_set=int(state["guess_set"]), max_keys=int(state["max_keys"]),
                   max_bytes=int(state.get("max_bytes", DEFAULT_MAX_BYTES)))
        keys, counts, rows = fit_state(state, pool.max_keys, pool.guess_set)
        rows = rows.tolist()
        start = 0
        for key, count in zip(keys.tolist(), counts.tolist()):
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
