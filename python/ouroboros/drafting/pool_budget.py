"""The phrase pool's memory rule: what a key and a phrase of :class:`~ouroboros.drafting.pool.PhrasePool` cost, the
caps a byte budget allows, the bytes a pool holds, and the cut of a saved state to smaller caps.

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
- scored pools (``PhrasePool(scored=True)``) also keep each phrase's count, as the value of its OrderedDict entry
  (``None`` in an LRU pool: the entry's size is the same). A count below 257 is a shared small int; a larger one is
  an int object of its own, 28 -> 32 B (counts saturate at ``MAX_COUNT`` = 2**60 - 1, the largest int of 32 B), so
  the rule adds 32 B per phrase. A scored pool's phrase list never holds more than G entries (it evicts before it
  inserts), so its peak is at most the LRU churn peak above.

So a full key costs 640 + 32 + 200 + 3 x 160 = 1352 B at the CPU defaults (N = 4, G = 3): 64 MiB hold 49,636 keys;
and 2384 + 32 + 200 + 20 x 288 = 8376 B at the GPU defaults (N = 7, G = 20): 8,011 keys. Scored: 1352 + 3 x 32 =
1448 B (46,345 keys) and 8376 + 20 x 32 = 9016 B (7,443 keys). :func:`table_nbytes` walks the real ``getsizeof`` of
the tables (a few % above what ``tracemalloc`` sees: tests/drafting/test_pool.py). The device pool
(:mod:`ouroboros.drafting.gpu_pool`) takes the same caps from the same rule, so both keep the same contents.
"""
from __future__ import annotations

import functools
import sys
from collections import OrderedDict

import torch

__all__ = ["DEFAULT_MAX_BYTES", "MAX_COUNT", "budget_caps", "fit_rows", "fit_state", "key_bytes",
           "lru_dict_peak_bytes", "phrase_bytes", "table_nbytes"]

DEFAULT_MAX_BYTES = 64 << 20
MAX_COUNT = (1 << 60) - 1          # a scored phrase's count saturates here: the largest int whose object is 32 B
_SMALL_INT_MAX = 256               # ints in [-5, 256] are shared singletons (no object of their own)


def _block(n: int) -> int:
    """Bytes CPython's small-object allocator hands out for an ``n``-byte object (16-byte blocks)."""
    return -(-n // 16) * 16


_INT_BYTES = _block(sys.getsizeof(1 << 20))            # one token id object (>= 257: not a shared singleton)
_COUNT_BYTES = _block(sys.getsizeof(MAX_COUNT))        # one count object (a scored phrase's count >= 257)
_KEY_SLOT_BYTES = 200                                  # a key's share of the table of keys at its worst (docstring)
_TABLE_BASE_BYTES = sys.getsizeof(OrderedDict({0: None}))   # the table of keys with its smallest allocation


def phrase_bytes(phrase_len: int) -> int:
    """Bytes of one stored phrase: its tuple and its ``phrase_len`` int objects (a scored pool's count aside)."""
    return _block(sys.getsizeof(tuple(range(phrase_len)))) + phrase_len * _INT_BYTES


@functools.cache
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


def key_bytes(ngram: int, guess_set: int, scored: bool = False) -> int:
    """Most bytes one key with ``guess_set`` phrases of ``ngram - 1`` tokens can cost (module docstring); ``scored``
    adds each phrase's count object."""
    each = phrase_bytes(ngram - 1) + (_COUNT_BYTES if scored else 0)
    return lru_dict_peak_bytes(guess_set) + _INT_BYTES + _KEY_SLOT_BYTES + guess_set * each


def budget_caps(ngram: int, guess_set: int, max_bytes: int, max_keys: int | None = None,
                scored: bool = False) -> tuple[int, int]:
    """``(max_keys, guess_set)`` a pool keeps within ``max_bytes``: the requested ``guess_set`` (lowered only when one
    key with that many phrases does not fit), and as many keys as fit (at most ``max_keys`` when given); ``scored``:
    the caps of a scored pool (:func:`key_bytes`).

    Both pools use this rule, so they hold the same keys and phrases. Raises ``ValueError`` when not even one key
    with one phrase fits, or for sizes < 1.
    """
    if ngram < 2:
        raise ValueError(f"ngram must be >= 2 (a key plus at least one token), got {ngram}")
    if guess_set < 1 or (max_keys is not None and max_keys < 1):
        raise ValueError(f"guess_set and max_keys must be >= 1, got {guess_set}, {max_keys}")
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool):       # a ValueError, as ever: callers catch it
        raise ValueError(f"max_bytes must be an int (bytes), got {max_bytes!r}")  # noqa: TRY004
    room = max_bytes - _TABLE_BASE_BYTES
    if room < key_bytes(ngram, 1, scored):
        raise ValueError(f"max_bytes={max_bytes} is too small for one key with one {ngram - 1}-token phrase (needs "
                         f"{_TABLE_BASE_BYTES + key_bytes(ngram, 1, scored)} bytes)")
    if key_bytes(ngram, guess_set, scored) > room:  # not one full key: the most phrases per key that fit
        low, high = 1, guess_set - 1                # key_bytes grows strictly with guess_set
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if key_bytes(ngram, mid, scored) <= room else (low, mid - 1)
        guess_set = low
    keys = room // key_bytes(ngram, guess_set, scored)
    return (keys if max_keys is None else min(keys, max_keys)), guess_set


def table_nbytes(table: OrderedDict, phrase_len: int, scored: bool = False) -> int:
    """Bytes a pool's table of keys holds: ``sys.getsizeof`` of the tables plus every key's int and every phrase's
    tuple and ints, and (``scored``) every count object (a count >= 257: smaller ones are shared singletons).
    Walks the keys: O(keys); a scored pool's counts too: O(phrases)."""
    each = phrase_bytes(phrase_len)
    total = sys.getsizeof(table) + len(table) * _INT_BYTES
    for phrases in table.values():
        total += sys.getsizeof(phrases) + len(phrases) * each
        if scored:
            total += _COUNT_BYTES * sum(1 for c in phrases.values() if c > _SMALL_INT_MAX)
    return total


def fit_rows(state: dict, max_keys: int, guess_set: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | slice]:
    """``(keys, counts, keep)`` of a pool state dict cut to the caps, as inserting it in order would leave it: the
    newest ``max_keys`` keys, each with its last ``guess_set`` phrase rows (an LRU pool's newest; a scored pool's
    best ranked). ``keep`` indexes the rows of ``state["phrases"]`` (and a scored state's ``"weights"``) kept:
    ``slice(None)`` when nothing is cut. Raises ``ValueError`` when the state is inconsistent (counts not matching
    the phrase rows, or above the state's own ``guess_set``)."""
    keys = state["keys"].long().reshape(-1)
    counts = state["counts"].long().reshape(-1)
    n_rows = state["phrases"].reshape(-1, int(state["ngram"]) - 1).shape[0]
    if counts.numel() != keys.numel() or int(counts.sum()) != n_rows:
        raise ValueError("inconsistent pool state: counts do not match keys / phrases")
    if counts.numel() and int(counts.max()) > int(state["guess_set"]):
        raise ValueError(f"pool state has a key with more than guess_set = {int(state['guess_set'])} phrases")
    first = max(0, keys.numel() - max_keys)
    if first == 0 and (counts.numel() == 0 or int(counts.max()) <= guess_set):
        return keys, counts, slice(None)
    starts = (torch.cumsum(counts, 0) - counts).tolist()
    ends = [a + c for a, c in zip(starts, counts.tolist())]
    keep = [r for a, e in zip(starts[first:], ends[first:]) for r in range(max(a, e - guess_set), e)]
    return keys[first:], counts[first:].clamp(max=guess_set), torch.tensor(keep, dtype=torch.long)


def fit_state(state: dict, max_keys: int, guess_set: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``(keys, counts, phrases)`` of a pool state dict cut to the caps (:func:`fit_rows`; a scored state's
    ``"weights"`` are not read). Raises ``ValueError`` when the state is inconsistent."""
    keys, counts, keep = fit_rows(state, max_keys, guess_set)
    return keys, counts, state["phrases"].long().reshape(-1, int(state["ngram"]) - 1)[keep]
