"""``GpuPhrasePool``: the phrase pool of :mod:`ouroboros.drafting.pool` kept in device tensors, so a drafting step can look up
and insert phrases without the host (no sync, CUDA-graph capturable).

Semantics are exactly those of the CPU :class:`~ouroboros.drafting.pool.PhrasePool` (per-key LRU of at most ``guess_set``
phrases, duplicate re-insert moves to newest, global LRU over at most ``max_keys`` keys refreshed only by inserts and
replaces, ``lookup`` newest first and order-neutral); the tests replay random operation sequences on both. The caps
come from the same byte budget by the same rule (:func:`ouroboros.drafting.pool.budget_caps`, ``max_bytes`` default 64 MiB),
so both pools keep the same keys and phrases; the device copy of those contents is much smaller than the Python one
(int32 rows instead of tuples of int objects), plus the fixed ``4 V`` bytes of its key index.

``scored=True`` makes it the twin of ``PhrasePool(scored=True)`` (a count per phrase, lists stored in rank order, the
full list dropping its lowest count, replace handing ``old``'s count to ``new``): an int32 ``(S, G)`` :attr:`scores`
tensor beside the phrase rows (``4 G`` bytes more per slot: 80 B at G=20), caps from the scored budget rule, files in
the host's scored format. Device counts saturate at ``2**31 - 1`` (the host's at ``2**60 - 1``); scored inserts run
on Triton or the reference (no CUDA kernel), lookups on every backend.

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
    POOL_FORMAT_SCORED,
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
    ngram_pool_contents,
    ngram_pool_empty,
    ngram_pool_from_contents,
)

__all__ = ["GpuPhrasePool"]


def _default_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _state_contents(state: dict, max_keys: int, guess_set: int,
                    scored: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(keys, counts, rows, weights)`` of a pool state cut to the caps (newest keys, best / newest phrases), for a
    device pool that is ``scored`` (``weights``: one count per row) or not (``None``). A scored (v2) state is read
    by :meth:`PhrasePool.from_state_dict` itself, which checks its counts and cuts it by the host's own rule; a v1
    state read as scored gives every phrase count 1. Raises ``ValueError`` for an inconsistent state."""
    if scored and state.get("format") == POOL_FORMAT_SCORED:
        _check_distinct(state["keys"].long().reshape(-1))          # the host pool would merge duplicates silently
        state = PhrasePool.from_state_dict(state).state_dict()
        return state["keys"], state["counts"], state["phrases"], state["weights"]
    keys, counts, rows = fit_state(state, max_keys, guess_set)
    _check_distinct(keys)
    return keys, counts, rows, torch.ones(rows.shape[0], dtype=torch.int64) if scored else None


def _check_distinct(keys: torch.Tensor) -> None:
    """Raise ``ValueError`` when a pool state's ``keys`` repeat one."""
    if len(set(keys.tolist())) != keys.numel():
        raise ValueError("pool state has duplicate keys")


class GpuPhrasePool:
    """Bounded two-level phrase pool in device tensors (same guarantees as :class:`PhrasePool`): an LRU of keys, each
    with an LRU (default) or scored (``scored=True``) list.

    Parameters
    ----------
    ngram, guess_set, max_keys : int
        As for :class:`PhrasePool` (phrases have ``ngram - 1`` tokens; ``max_keys=None``: as many as ``max_bytes``
        allows). The caps are :func:`~ouroboros.drafting.pool.budget_caps` of these and ``scored``, exactly as the
        CPU pool's.
    vocab_size : int
        Keys are token ids in ``[0, vocab_size)``; the tensor ops skip keys outside (``-1`` is padding).
    max_bytes : int
        The byte budget the caps derive from (default 64 MiB, the CPU pool's).
    device : torch.device or str, optional
        Where the tensors live (default: "cuda" when available, else "cpu", where the reference ops and the Triton
        interpreter run).
    backend : str, optional
        Force "reference", "triton" or "cuda" for the ops (default: the best available; a scored pool's inserts run
        on Triton where "cuda" is chosen: :func:`ouroboros_kernels.ngram.ngram_insert_backend`).
    scored : bool
        Keep a count per phrase, as ``PhrasePool(scored=True)``: :attr:`scores`, an int32 ``(S, G)`` tensor aligned
        with the phrase rows (``None`` for an LRU pool). Counts saturate at ``2**31 - 1`` (the host's at
        ``2**60 - 1``).
    """

    def __init__(self, ngram: int = 7, guess_set: int = 20, max_keys: int | None = None, *, vocab_size: int,
                 max_bytes: int = DEFAULT_MAX_BYTES, device: torch.device | str | None = None,
                 backend: str | None = None, scored: bool = False) -> None:
        self.scored = bool(scored)
        max_keys, guess_set = budget_caps(ngram, guess_set, max_bytes, max_keys, self.scored)
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.ngram, self.guess_set, self.max_keys, self.vocab_size = ngram, guess_set, max_keys, vocab_size
        self.max_bytes = max_bytes
        self.device = _default_device(device)
        self.backend = backend
        self.tensors: NgramPool = ngram_pool_empty(vocab_size, min(max_keys, vocab_size), guess_set, ngram - 1,
                                                   self.device)
        self.scores: torch.Tensor | None = None
        if self.scored:
            self.scores = torch.zeros((self.num_slots, guess_set), dtype=torch.int32, device=self.device)
        self._stats = torch.zeros(2, dtype=torch.int64, device=self.device)  # lookups, hits

    # ---- sizes ---------------------------------------------------------------------------------------------------
    @property
    def phrase_len(self) -> int:
        return self.ngram - 1

    @property
    def num_slots(self) -> int:
        return self.tensors.num_slots

    def _all_tensors(self) -> list[torch.Tensor]:
        """Every tensor of the pool's state: the pool's, a scored pool's scores, the counters."""
        return [*self.tensors, *([] if self.scores is None else [self.scores]), self._stats]

    def nbytes(self) -> int:
        """Device bytes held by the pool tensors: ``4 V`` (key index) + ``S * (4 G P + 16)`` (slots) + small; a scored
        pool adds ``4 S G`` (its scores)."""
        return sum(t.numel() * t.element_size() for t in self._all_tensors())

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

    def insert_many(self, keys: torch.Tensor, phrases: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Insert ``phrases[b]`` under ``keys[b]`` for ``b = 0..B-1`` in order (= :meth:`PhrasePool.insert` on each).

        ``keys``: ``(B,)``; ``phrases``: ``(B, ngram-1)``; ``weights``: ``None`` (all 1) or ``(B,)`` integer weights
        a scored pool adds to the counts (an LRU pool checks the shape and ignores them). Weights are not read on the
        host: values below 1 count as 1, above ``2**31 - 1`` as that. Keys outside ``[0, vocab_size)`` (e.g. ``-1``)
        are skipped, so a fixed-shape batch can carry padding.
        """
        keys, phrases = self._tokens(keys), self._tokens(phrases)
        self._check_phrases(phrases, keys)
        weights = None if weights is None else self._tokens(weights)
        ngram_insert(self.tensors, keys, phrases, backend=self.backend, scores=self.scores, weights=weights)

    def replace_many(self, keys: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> None:
        """:meth:`PhrasePool.replace` ``(keys[b], old[b], new[b])`` for ``b = 0..B-1`` in order (scored pool: ``new``
        takes ``old``'s count plus one)."""
        keys, old, new = self._tokens(keys), self._tokens(old), self._tokens(new)
        self._check_phrases(old, keys)
        self._check_phrases(new, keys)
        ngram_insert(self.tensors, keys, new, old=old, backend=self.backend, scores=self.scores)

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
        if self.scores is not None:
            self.scores.zero_()
        self._stats.zero_()

    def empty_like(self) -> "GpuPhrasePool":
        """A new empty pool with this one's settings (so the same tensor shapes)."""
        return GpuPhrasePool(self.ngram, self.guess_set, self.max_keys, vocab_size=self.vocab_size,
                             max_bytes=self.max_bytes, device=self.device, backend=self.backend, scored=self.scored)

    def same_layout(self, other: "GpuPhrasePool") -> bool:
        """True if ``other``'s tensors have this pool's shapes, device, backend and mode (scored or not): :meth:`copy_`
        accepts it."""
        return (isinstance(other, GpuPhrasePool) and other.device == self.device and other.backend == self.backend
                and other.scored == self.scored
                and all(a.shape == b.shape for a, b in zip(self._all_tensors(), other._all_tensors())))

    def copy_(self, other: "GpuPhrasePool") -> "GpuPhrasePool":
        """Make this pool's contents (a scored pool's counts too) and counters ``other``'s, in place (device copies;
        the tensors keep their storage, so CUDA graphs captured on them stay valid)."""
        if not self.same_layout(other):
            raise ValueError("copy_ needs a pool with the same ngram, guess_set, key cap, vocabulary, device, backend "
                             "and mode (scored or not)")
        for dst, src in zip(self._all_tensors(), other._all_tensors()):
            dst.copy_(src)
        return self

    # ---- conversion and persistence (sync) -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The :meth:`PhrasePool.state_dict` format (keys oldest first, phrases in stored order) plus ``vocab_size``:
        an LRU pool's :data:`~ouroboros.drafting.pool.POOL_FORMAT`, a scored one's the host's scored format (v2:
        ``"scored": True`` and ``"weights"``, the int64 counts aligned with the ``"phrases"`` rows)."""
        keys, counts, rows, weights = ngram_pool_contents(self.tensors, self.scores)
        state = {
            "format": POOL_FORMAT,
            "ngram": self.ngram,
            "guess_set": self.guess_set,
            "max_keys": self.max_keys,
            "max_bytes": self.max_bytes,
            "keys": keys,
            "counts": counts,
            "phrases": rows.reshape(-1, self.phrase_len),
            "vocab_size": self.vocab_size,
        }
        if self.scored:
            state.update(format=POOL_FORMAT_SCORED, scored=True, weights=weights)
        return state

    @classmethod
    def from_state_dict(cls, state: dict, device: torch.device | str | None = None, vocab_size: int | None = None,
                        backend: str | None = None, scored: bool | None = None) -> "GpuPhrasePool":
        """A pool from a :meth:`PhrasePool.state_dict` / :meth:`state_dict` dict (cut to the caps as the CPU pool's
        :meth:`~PhrasePool.from_state_dict` does: newest keys, and per key its newest / best ranked phrases).

        ``vocab_size`` defaults to the dict's ``vocab_size`` or else one past the largest token it holds (later keys
        at or beyond it would be skipped: pass the model's vocabulary size).

        ``scored`` (default: the state's own mode, v2 = scored) picks the device pool's mode. A scored state loads
        into a scored pool with its counts (clamped to ``2**31 - 1``); into ``scored=False`` without them
        (``"weights"`` ignored): each key's phrases keep their stored rank order as their recency order, so lookups
        return them in the scored ranking until the next insert. An LRU (v1) state into ``scored=True`` gives every
        phrase count 1 (its recency order is then the rank order of equal counts). Raises ``ValueError`` for another
        format or a state the pool cannot hold.
        """
        if state.get("format") not in POOL_FORMATS:
            raise ValueError(f"not an ouroboros phrase pool (format {state.get('format')!r}, expected one of "
                             f"{POOL_FORMATS})")
        scored = state.get("format") == POOL_FORMAT_SCORED if scored is None else bool(scored)
        ngram, max_keys = int(state["ngram"]), int(state["max_keys"])
        max_bytes = int(state.get("max_bytes", DEFAULT_MAX_BYTES))
        max_keys, guess_set = budget_caps(ngram, int(state["guess_set"]), max_bytes, max_keys, scored)
        keys, counts, rows, weights = _state_contents(state, max_keys, guess_set, scored)
        if vocab_size is None:
            vocab_size = state.get("vocab_size")
        if vocab_size is None:
            top = max([0] + [int(keys.max()) if keys.numel() else 0] + [int(rows.max()) if rows.numel() else 0])
            vocab_size = top + 1
        pool = cls(ngram, int(state["guess_set"]), max_keys, vocab_size=int(vocab_size), max_bytes=max_bytes,
                   device=device, backend=backend, scored=scored)
        pool.tensors, scores = ngram_pool_from_contents(pool.vocab_size, pool.num_slots, guess_set, keys, counts,
                                                        rows.reshape(-1, ngram - 1), weights, pool.device)
        pool.scores = scores
        return pool

    def to_cpu(self) -> PhrasePool:
        """An equal CPU :class:`PhrasePool` (same order everywhere, same counters; scored when this pool is, with its
        counts)."""
        pool = PhrasePool.from_state_dict(self.state_dict())
        pool.stats = self.stats
        return pool

    @classmethod
    def from_cpu(cls, pool: PhrasePool, device: torch.device | str | None = None, vocab_size: int | None = None,
                 backend: str | None = None, scored: bool | None = None) -> "GpuPhrasePool":
        """A device pool equal to ``pool`` (see :meth:`from_state_dict` for ``vocab_size`` and ``scored``, which
        defaults to ``pool.scored``); counters copied too."""
        out = cls.from_state_dict(pool.state_dict(), device=device, vocab_size=vocab_size, backend=backend,
                                  scored=scored)
        out.stats = pool.stats
        return out

    def save(self, path: str | Path) -> None:
        """Write the pool in the :meth:`PhrasePool.save` format (readable by both pools)."""
        torch.save(self.state_dict(), str(path))

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str | None = None, vocab_size: int | None = None,
             backend: str | None = None, scored: bool | None = None) -> "GpuPhrasePool":
        """Read a pool written by :meth:`save` or :meth:`PhrasePool.save` (``scored``: see :meth:`from_state_dict`)."""
        return cls.from_state_dict(torch.load(str(path), weights_only=True), device=device, vocab_size=vocab_size,
                                   backend=backend, scored=scored)

    # ---- PhrasePool-compatible slow path -------------------------------------------------------------------------
    @property
    def host(self) -> "HostPoolAdapter":
        """This pool behind :class:`PhrasePool`'s per-call API (each call may sync)."""
        return HostPoolAdapter(self)

    def __repr__(self) -> str:
        return (f"GpuPhrasePool(ngram={self.ngram}, guess_set={self.guess_set}, max_keys={self.max_keys}, "
                f"max_bytes={self.max_bytes}, vocab_size={self.vocab_size}, device={self.device}, "
                f"backend={self.backend}, scored={self.scored})")
