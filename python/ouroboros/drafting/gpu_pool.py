"""``GpuPhrasePool``: the phrase pool of :mod:`ouroboros.drafting.pool` kept in device tensors, so a drafting step can look up
and insert phrases without the host (no sync, CUDA-graph capturable).

Semantics are exactly those of the CPU :class:`~ouroboros.drafting.pool.PhrasePool` (per-key LRU of at most ``guess_set``
phrases, duplicate re-insert moves to newest, global LRU over at most ``max_keys`` keys refreshed only by inserts and
replaces, ``lookup`` newest first and order-neutral); the tests replay random operation sequences on both. The caps
come from the same byte budget by the same rule (:func:`ouroboros.drafting.pool.budget_caps`, ``max_bytes`` default 64 MiB),
so both pools keep the same keys and phrases; the device copy of those contents is much smaller than the Python one
(int32 rows instead of tuples of int objects), plus the fixed ``4 V`` bytes of its key index.

Layout choice (details and the kernel contract: :mod:`ouroboros_kernels.ngram`)
--------------------------------------------------------------------------------
A dense ``key -> slot`` index of ``V`` int32 plus a bounded table of ``S = min(max_keys, V)`` slots, each holding
``G`` phrases of ``P = N - 1`` int32 tokens, a count, and links of a doubly linked key-LRU list. Bytes:
``4 * V`` (index) + ``S * (4 * G * P + 16)`` (slots). At G=20, N=7 a slot is 496 B:

=========  =====================  =====================  ========================  =============================
vocab V    dense (V, G, P) table  ours, max_keys >= V    ours, max_keys = 16384    hash (2x buckets), 16384 keys
=========  =====================  =====================  ========================  =============================
32 000     15.4 MB                16.0 MB                8.3 MB                    8.4 MB
152 064    73.0 MB                76.0 MB                8.7 MB                    8.4 MB
256 000    122.9 MB               128.0 MB               9.2 MB                    8.4 MB
=========  =====================  =====================  ========================  =============================

Why not a hash table: the key index costs only ``4 V`` bytes (1 MB at 256k), is one load per lookup (no probing, no
tombstones under eviction, trivially graph-capturable), and the phrase memory is bounded by ``max_keys`` exactly as
the CPU pool's is. Why not a dense ``(V, G, P)`` table: it cannot honour ``max_keys`` (the CPU pool's key eviction)
and costs 123 MB at 256k whatever the pool holds; with slots, the device footprint follows the key cap and the
eviction order is the CPU pool's. The default 64 MiB budget gives 8,011 keys at N=7, G=20 (4.0 MB of slots + 4 V);
``max_keys >= V`` (a budget of >= ~1.3 GB at V=152k) would give one slot per token and never evict.

API: the tensor path (``insert_many``, ``replace_many``, ``lookup``, ``seed_from``) never syncs; :attr:`host` is a
:class:`PhrasePool`-compatible adapter (``insert(key, phrase)``, ``lookup(key, k) -> list[tuple]``, ...) whose calls
copy to and from the host — the slow compatibility path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ouroboros.drafting.pool import (
    DEFAULT_MAX_BYTES,
    POOL_FORMAT,
    POOL_FORMATS,
    PhrasePool,
    PoolStats,
    budget_caps,
    fit_state,
)
from ouroboros.drafting.pool_adapter import HostPoolAdapter
from ouroboros_kernels.ngram import (
    NgramPool,
    ngram_insert,
    ngram_lookup,
    ngram_pool_empty,
)

__all__ = ["GpuPhrasePool"]


def _default_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class GpuPhrasePool:
    """Bounded two-level LRU phrase pool in device tensors (same guarantees as :class:`PhrasePool`).

    Parameters
    ----------
    ngram, guess_set, max_keys : int
        As for :class:`PhrasePool` (phrases have ``ngram - 1`` tokens; ``max_keys=None``: as many as ``max_bytes``
        allows). The caps are :func:`~ouroboros.drafting.pool.budget_caps` of these, exactly as the CPU pool's.
    vocab_size : int
        Keys are token ids in ``[0, vocab_size)``; the tensor ops skip keys outside (``-1`` is padding).
    max_bytes : int
        The byte budget the caps derive from (default 64 MiB, the CPU pool's).
    device : torch.device or str, optional
        Where the tensors live (default: "cuda" when available, else "cpu", where the reference ops and the Triton
        interpreter run).
    backend : str, optional
        Force "reference", "triton" or "cuda" for the ops (default: the best available).
    """

    def __init__(self, ngram: int = 7, guess_set: int = 20, max_keys: int | None = None, *, vocab_size: int,
                 max_bytes: int = DEFAULT_MAX_BYTES, device: torch.device | str | None = None,
                 backend: str | None = None) -> None:
        max_keys, guess_set = budget_caps(ngram, guess_set, max_bytes, max_keys)
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.ngram, self.guess_set, self.max_keys, self.vocab_size = ngram, guess_set, max_keys, vocab_size
        self.max_bytes = max_bytes
        self.device = _default_device(device)
        self.backend = backend
        self.tensors: NgramPool = ngram_pool_empty(vocab_size, min(max_keys, vocab_size), guess_set, ngram - 1,
                                                   self.device)
        self._stats = torch.zeros(2, dtype=torch.int64, device=self.device)  # lookups, hits

    # ---- sizes ---------------------------------------------------------------------------------------------------
    @property
    def phrase_len(self) -> int:
        return self.ngram - 1

    @property
    def num_slots(self) -> int:
        return self.tensors.num_slots

    def nbytes(self) -> int:
        """Device bytes held by the pool tensors: ``4 V`` (key index) + ``S * (4 G P + 16)`` (slots) + small."""
        return sum(t.numel() * t.element_size() for t in self.tensors) + self._stats.numel() * 8

    def __len__(self) -> int:
        """Number of phrases stored (syncs)."""
        n = int(self.tensors.num_keys.item())
        return int(self.tensors.counts[:n].sum().item())

    def num_keys(self) -> int:
        """Number of keys stored (syncs)."""
        return int(self.tensors.num_keys.item())

    # ---- tensor path: no host sync --------------------------------------------------------------------------------
    def _tokens(self, t: torch.Tensor | Sequence) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            t = torch.as_tensor(t, dtype=torch.int64)
        return t.to(self.device, non_blocking=True)

    def insert_many(self, keys: torch.Tensor, phrases: torch.Tensor) -> None:
        """Insert ``phrases[b]`` under ``keys[b]`` for ``b = 0..B-1`` in order (= :meth:`PhrasePool.insert` on each).

        ``keys``: ``(B,)``; ``phrases``: ``(B, ngram-1)``. Keys outside ``[0, vocab_size)`` (e.g. ``-1``) are skipped,
        so a fixed-shape batch can carry padding.
        """
        keys, phrases = self._tokens(keys), self._tokens(phrases)
        self._check_phrases(phrases, keys)
        ngram_insert(self.tensors, keys, phrases, backend=self.backend)

    def replace_many(self, keys: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> None:
        """:meth:`PhrasePool.replace` ``(keys[b], old[b], new[b])`` for ``b = 0..B-1`` in order."""
        keys, old, new = self._tokens(keys), self._tokens(old), self._tokens(new)
        self._check_phrases(old, keys)
        self._check_phrases(new, keys)
        ngram_insert(self.tensors, keys, new, old=old, backend=self.backend)

    def lookup(self, keys: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to ``k`` (default ``guess_set``) phrases per key, newest first.

        Returns ``(phrases (B, k, ngram-1) int64, valid (B, k) bool)``; invalid rows are 0. Counts every key ``>= 0``
        as one lookup and every key with at least one phrase as a hit (like :attr:`PhrasePool.stats`), on the device.
        """
        keys = self._tokens(keys)
        k = self.guess_set if k is None else k
        return ngram_lookup(self.tensors, keys, k, stats=self._stats, backend=self.backend)

    def seed_from(self, tokens: torch.Tensor | Sequence[int]) -> None:
        """Insert every n-gram of ``tokens`` (key = token ``i``, phrase = the next ``ngram-1``), left to right."""
        tokens = self._tokens(tokens).reshape(-1)
        n = tokens.shape[0] - self.phrase_len
        if n <= 0:
            return
        keys = tokens[:n]
        phrases = tokens[1:].unfold(0, self.phrase_len, 1)[:n]
        self.insert_many(keys, phrases)

    def _check_phrases(self, phrases: torch.Tensor, keys: torch.Tensor) -> None:
        if keys.dim() != 1 or phrases.dim() != 2 or phrases.shape[0] != keys.shape[0]:
            raise ValueError(f"expected keys (B,) and phrases (B, {self.phrase_len}), got {tuple(keys.shape)} and "
                             f"{tuple(phrases.shape)}")
        if phrases.shape[1] != self.phrase_len:
            raise ValueError(f"phrase must have ngram-1 = {self.phrase_len} tokens, got {phrases.shape[1]}")

    # ---- stats (sync) -------------------------------------------------------------------------------------------
    @property
    def stats(self) -> PoolStats:
        lookups, hits = self._stats.tolist()
        return PoolStats(lookups=lookups, hits=hits)

    @stats.setter
    def stats(self, value: PoolStats) -> None:
        self._stats.copy_(torch.tensor([value.lookups, value.hits], dtype=torch.int64))

    def clear(self) -> None:
        """Drop every phrase and key and reset the counters (in place: the tensors keep their storage)."""
        empty = ngram_pool_empty(self.vocab_size, self.num_slots, self.guess_set, self.phrase_len, self.device)
        for dst, src in zip(self.tensors, empty):
            dst.copy_(src)
        self._stats.zero_()

    def empty_like(self) -> "GpuPhrasePool":
        """A new empty pool with this one's settings (so the same tensor shapes)."""
        return GpuPhrasePool(self.ngram, self.guess_set, self.max_keys, vocab_size=self.vocab_size,
                             max_bytes=self.max_bytes, device=self.device, backend=self.backend)

    def same_layout(self, other: "GpuPhrasePool") -> bool:
        """True if ``other``'s tensors have this pool's shapes, device and backend (:meth:`copy_` accepts it)."""
        return (isinstance(other, GpuPhrasePool) and other.device == self.device and other.backend == self.backend
                and all(a.shape == b.shape for a, b in zip(self.tensors, other.tensors)))

    def copy_(self, other: "GpuPhrasePool") -> "GpuPhrasePool":
        """Make this pool's contents and counters ``other``'s, in place (device copies; the tensors keep their
        storage, so CUDA graphs captured on them stay valid)."""
        if not self.same_layout(other):
            raise ValueError("copy_ needs a pool with the same ngram, guess_set, key cap, vocabulary, device and backend")
        for dst, src in zip(self.tensors, other.tensors):
            dst.copy_(src)
        self._stats.copy_(other._stats)
        return self

    # ---- conversion and persistence (sync) -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The :meth:`PhrasePool.state_dict` format (keys oldest first, phrases oldest first) plus ``vocab_size``."""
        t = [x.cpu() for x in self.tensors]
        pool = NgramPool(*t)
        nxt = pool.lru_next.tolist()
        sentinel = self.num_slots
        order = []
        s = nxt[sentinel]
        while s != sentinel:
            order.append(s)
            s = nxt[s]
        idx = torch.tensor(order, dtype=torch.int64)
        counts = pool.counts[idx].long()
        rows = pool.phrases[idx]
        keep = torch.arange(self.guess_set)[None, :] < counts[:, None]
        return {
            "format": POOL_FORMAT,
            "ngram": self.ngram,
            "guess_set": self.guess_set,
            "max_keys": self.max_keys,
            "max_bytes": self.max_bytes,
            "keys": pool.slot_key[idx].long(),
            "counts": counts,
            "phrases": rows[keep].long().reshape(-1, self.phrase_len),
            "vocab_size": self.vocab_size,
        }

    @classmethod
    def from_state_dict(cls, state: dict, device: torch.device | str | None = None, vocab_size: int | None = None,
                        backend: str | None = None) -> "GpuPhrasePool":
        """A pool from a :meth:`PhrasePool.state_dict` / :meth:`state_dict` dict (cut to the caps as the CPU pool's
        :meth:`~PhrasePool.from_state_dict` does: newest keys and phrases kept).

        ``vocab_size`` defaults to the dict's ``vocab_size`` or else one past the largest token it holds (later keys
        at or beyond it would be skipped: pass the model's vocabulary size).

        A scored state (``PhrasePool(scored=True)``, format v2) loads without its counts (``"weights"`` is ignored):
        the device pool is an LRU, and each key's phrases keep their stored rank order as their recency order, so its
        lookups return them in the scored pool's ranking until the next insert; its :meth:`to_cpu` is an LRU pool.
        """
        if state.get("format") not in POOL_FORMATS:
            raise ValueError(f"not an ouroboros phrase pool (format {state.get('format')!r}, expected one of "
                             f"{POOL_FORMATS})")
        ngram, max_keys = int(state["ngram"]), int(state["max_keys"])
        max_bytes = int(state.get("max_bytes", DEFAULT_MAX_BYTES))
        max_keys, guess_set = budget_caps(ngram, int(state["guess_set"]), max_bytes, max_keys)
        keys, counts, rows = fit_state(state, max_keys, guess_set)
        if vocab_size is None:
            vocab_size = state.get("vocab_size")
        if vocab_size is None:
            top = max([0] + [int(keys.max()) if keys.numel() else 0] + [int(rows.max()) if rows.numel() else 0])
            vocab_size = top + 1
        pool = cls(ngram, int(state["guess_set"]), max_keys, vocab_size=int(vocab_size), max_bytes=max_bytes,
                   device=device, backend=backend)
        n = keys.numel()
        if n > pool.num_slots:
            raise ValueError(f"pool state holds {n} keys, more than vocab_size = {vocab_size} allows")
        if n and (int(keys.min()) < 0 or int(keys.max()) >= vocab_size):
            raise ValueError(f"pool state has keys outside [0, {vocab_size})")
        if n and len(set(keys.tolist())) != n:
            raise ValueError("pool state has duplicate keys")
        s = pool.num_slots
        i32 = dict(dtype=torch.int32)
        key_to_slot = torch.full((vocab_size,), -1, **i32)
        key_to_slot[keys] = torch.arange(n, **i32)
        slot_key = torch.full((s,), -1, **i32)
        slot_key[:n] = keys.to(torch.int32)
        cnt = torch.zeros((s,), **i32)
        cnt[:n] = counts.to(torch.int32)
        phrases = torch.zeros((s, guess_set, ngram - 1), **i32)
        slot_of_row = torch.repeat_interleave(torch.arange(n), counts)
        starts = torch.cumsum(counts, 0) - counts
        row_in_slot = torch.arange(rows.shape[0]) - starts[slot_of_row]
        phrases[slot_of_row, row_in_slot] = rows.to(torch.int32)
        prev = torch.full((s + 1,), s, **i32)
        nxt = torch.full((s + 1,), s, **i32)
        if n:
            order = torch.arange(n, **i32)
            prev[1:n] = order[:-1]
            nxt[:n - 1] = order[1:]
            prev[0], nxt[n - 1] = s, s
            nxt[s], prev[s] = 0, n - 1
        host = NgramPool(key_to_slot, slot_key, cnt, phrases, prev, nxt, torch.tensor([n], **i32))
        pool.tensors = NgramPool(*(x.to(pool.device) for x in host))
        return pool

    def to_cpu(self) -> PhrasePool:
        """An equal CPU :class:`PhrasePool` (same order everywhere, same counters)."""
        pool = PhrasePool.from_state_dict(self.state_dict())
        pool.stats = self.stats
        return pool

    @classmethod
    def from_cpu(cls, pool: PhrasePool, device: torch.device | str | None = None, vocab_size: int | None = None,
                 backend: str | None = None) -> "GpuPhrasePool":
        """A device pool equal to ``pool`` (see :meth:`from_state_dict` for ``vocab_size``); counters copied too."""
        out = cls.from_state_dict(pool.state_dict(), device=device, vocab_size=vocab_size, backend=backend)
        out.stats = pool.stats
        return out

    def save(self, path: str | Path) -> None:
        """Write the pool in the :meth:`PhrasePool.save` format (readable by both pools)."""
        torch.save(self.state_dict(), str(path))

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str | None = None, vocab_size: int | None = None,
             backend: str | None = None) -> "GpuPhrasePool":
        """Read a pool written by :meth:`save` or :meth:`PhrasePool.save`."""
        return cls.from_state_dict(torch.load(str(path), weights_only=True), device=device, vocab_size=vocab_size,
                                   backend=backend)

    # ---- PhrasePool-compatible slow path -------------------------------------------------------------------------
    @property
    def host(self) -> "HostPoolAdapter":
        """This pool behind :class:`PhrasePool`'s per-call API (each call may sync)."""
        return HostPoolAdapter(self)

    def __repr__(self) -> str:
        return (f"GpuPhrasePool(ngram={self.ngram}, guess_set={self.guess_set}, max_keys={self.max_keys}, "
                f"max_bytes={self.max_bytes}, vocab_size={self.vocab_size}, device={self.device}, "
                f"backend={self.backend})")
