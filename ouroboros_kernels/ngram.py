"""N-gram phrase pool ops on the device: ``ngram_lookup`` and ``ngram_insert`` (SPEC §2 "Phrase pool", §3).

The pool is a bounded two-level LRU: key token -> at most ``G`` phrases of ``P = N - 1`` tokens (LRU per key, or a
scored list with a count per phrase when an insert is given ``scores``), and at most ``S`` keys (global LRU over keys,
refreshed only by inserts). It is the device twin of the CPU ``ouroboros.drafting.pool.PhrasePool`` (LRU or
``scored=True``) and must stay exactly equivalent to it (same phrase order, same key eviction order).

Pool layout — the contract every backend (reference, Triton, CUDA) implements
-----------------------------------------------------------------------------
All tensors are ``int32``, contiguous and on one device. ``V`` = vocabulary size (keys are token ids in ``[0, V)``),
``S`` = number of key slots (``min(max_keys, V)``), ``G`` = guess_set, ``P`` = ngram - 1.

==============  ===========  ==================================================================================
field           shape        meaning
==============  ===========  ==================================================================================
``key_to_slot`` ``(V,)``     slot holding key ``v``, or ``-1`` when ``v`` is not in the pool
``slot_key``    ``(S,)``     key held by slot ``s`` (meaningful for ``s < num_keys``)
``counts``      ``(S,)``     number of phrases of slot ``s``'s key, ``0..G``
``phrases``     ``(S,G,P)``  row ``j < counts[s]`` is the ``j``-th OLDEST phrase of slot ``s``; rows at or beyond
                             ``counts[s]`` are garbage (never read)
``lru_prev``    ``(S+1,)``   doubly linked list of the occupied slots in key recency order, sentinel index ``S``:
``lru_next``    ``(S+1,)``   ``lru_next[S]`` = least recently inserted-into slot, ``lru_prev[S]`` = most recent;
                             an empty list has ``lru_next[S] == lru_prev[S] == S``
``num_keys``    ``(1,)``     occupied slots; the occupied slots are exactly ``0..num_keys-1`` (a slot is never
                             freed, only handed from an evicted key to a new one)
==============  ===========  ==================================================================================

``ngram_lookup(pool, keys, k, stats=None) -> (phrases, valid)``
    ``keys``: ``(B,)`` any integer dtype. Returns ``phrases`` ``(B, k, P)`` int64 and ``valid`` ``(B, k)`` bool:
    ``phrases[b, i] = pool.phrases[s, counts[s] - 1 - i]`` (newest first) and ``valid[b, i] = True`` for
    ``i < min(counts[s], k)`` where ``s = key_to_slot[keys[b]]``; every other row is all ``0`` (a real token id, so
    the tensor can be embedded as is) with ``valid = False``. Keys outside ``[0, V)`` or absent find nothing.
    The pool is not modified (lookups change no recency). ``stats``: ``None`` or an int64 ``(2,)`` tensor to which
    the op adds (number of keys ``>= 0``, number of those with at least one phrase) — the CPU pool's ``lookups`` /
    ``hits`` counters, kept on the device.

``ngram_insert(pool, keys, phrases, old=None, *, scores=None, weights=None)``
    ``keys``: ``(B,)``, ``phrases``: ``(B, P)``, ``old``: ``None`` or ``(B, P)``; any integer dtypes. Modifies the pool
    in place so that the result equals applying the items ``b = 0..B-1`` one by one, in order:

    1. If ``keys[b]`` is outside ``[0, V)`` the item is skipped entirely (negative keys are padding for fixed-shape
       batches).
    2. Key recency: if the key is present its slot moves to the newest end of the list. Otherwise it gets slot
       ``num_keys`` (and ``num_keys += 1``) when ``num_keys < S``, else the oldest slot ``lru_next[S]`` whose key is
       evicted (``key_to_slot[old key] = -1``); the slot's ``counts`` restarts at 0 and it is appended at the newest
       end. (``replace`` refreshes the key exactly like ``insert``, so this step is the same for both.)
    3. Phrases of the slot (rows ``0..c-1``, ``c = counts[s]``); ``mo`` = row equal to ``old[b]`` (``-1`` if none or no
       ``old``), ``mn`` = row equal to ``phrases[b]`` (``-1`` if none):

       - ``mo < 0`` (plain insert): if ``mn >= 0`` rows ``mn+1..c-1`` shift down one and ``phrases[b]`` becomes row
         ``c-1``; else if ``c < G`` it becomes row ``c`` (``c += 1``); else rows ``1..G-1`` shift down and it becomes
         row ``G-1`` (the oldest phrase is dropped).
       - ``mo >= 0`` and ``old[b] == phrases[b]``: nothing.
       - ``mo >= 0`` and ``mn >= 0``: row ``mo`` is deleted (rows ``mo+1..c-1`` shift down, ``c -= 1``).
       - ``mo >= 0`` and ``mn < 0``: row ``mo`` is overwritten with ``phrases[b]`` (it keeps its recency).

    Scored lists (``ngram_insert(..., scores=...)``): the device twin of ``PhrasePool(scored=True)``. ``scores`` is an
    int32 ``(S, G)`` tensor row-aligned with ``phrases``: ``scores[s, j]`` is the count of stored row ``j`` of slot
    ``s``. A scored list is STORED in rank order, count ascending, ties oldest first, so ``ngram_lookup`` (newest-first
    reading of the rows) returns it best first: highest count first, ties newest first, and needs no change. Step 2
    is the same; a fresh key's slot starts with no phrases (its old scores are never read). Step 3 for item ``b``,
    ``w = weights[b]`` (default 1):

       - ``old`` given, ``mo >= 0`` and ``old[b] != phrases[b]``: row ``mo`` is dropped and its count ``x`` added to
         the weight (``w += x``: the replaced guess's observations become the phrase's, plus this one).
       - ``mn >= 0``: row ``mn`` is dropped and the phrase re-enters with count ``count(mn) + w``; else, when the list
         (after the drop above) holds ``G`` rows, row 0 (the lowest ranked) is dropped and the phrase enters with
         count ``w``.
       - The phrase is placed after every remaining row whose count is ``<=`` its count (the newest of its count);
         the rows after it move up one. The list gains one row net of the drops.

    Counts saturate at ``MAX_SCORE = 2**31 - 1`` (int32; the host pool's saturate at ``2**60 - 1``); weights are
    clamped into ``[1, MAX_SCORE]`` on the device (their values are never read on the host). ``weights`` without
    ``scores`` is checked and ignored (an LRU list has no counts), as the host pool ignores an LRU insert's weight.

    No host synchronisation and no data-dependent shapes: both ops can be captured in a CUDA graph.
    Tokens are stored as int32 (token ids must be < 2**31).

A backend that cannot keep the order of a batch in parallel must still produce this sequential result; the reference
does it with a Python loop over ``B`` of device ops, the Triton backend with one program resolving keys in order and
one program per touched slot applying that slot's items in order.

CUDA backend: a module ``ouroboros_kernels.cuda_ops`` that defines ``ngram_lookup(pool, keys, k, stats)`` and
``ngram_insert(pool, keys, phrases, old)`` (``pool`` an :class:`NgramPool`, ``stats`` / ``old`` possibly ``None``,
inputs already checked by the public ops here) is picked up automatically; without them "cuda" is not offered for
these ops and the dispatch falls back to Triton. It has no scored insert: a scored ``ngram_insert`` whose backend
resolves to "cuda" runs on Triton (on the reference when Triton is unavailable); lookups are the same for every list.
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import NamedTuple

import torch

from . import ngram_reference as reference
from .backend import backend_status, select_backend
from .ngram_reference import MAX_SCORE

__all__ = ["MAX_SCORE", "NgramPool", "ngram_pool_empty", "ngram_lookup", "ngram_insert", "check_ngram_pool",
           "cuda_ngram_ops", "ngram_backend", "ngram_insert_backend", "ngram_pool_contents", "ngram_pool_from_contents"]


class NgramPool(NamedTuple):
    """The device tensors of a phrase pool (layout: see the module docstring)."""

    key_to_slot: torch.Tensor
    slot_key: torch.Tensor
    counts: torch.Tensor
    phrases: torch.Tensor
    lru_prev: torch.Tensor
    lru_next: torch.Tensor
    num_keys: torch.Tensor

    @property
    def vocab_size(self) -> int:
        return self.key_to_slot.shape[0]

    @property
    def num_slots(self) -> int:
        return self.slot_key.shape[0]

    @property
    def guess_set(self) -> int:
        return self.phrases.shape[1]

    @property
    def phrase_len(self) -> int:
        return self.phrases.shape[2]


def ngram_pool_empty(vocab_size: int, num_slots: int, guess_set: int, phrase_len: int,
                     device: torch.device | str = "cpu") -> NgramPool:
    """An empty pool: ``num_slots`` key slots for keys in ``[0, vocab_size)``, ``guess_set`` phrases of
    ``phrase_len`` tokens per key. Memory: ``4 * (V + S * (G * P + 4) + 3)`` bytes."""
    if min(vocab_size, num_slots, guess_set, phrase_len) < 1:
        raise ValueError(f"pool sizes must be >= 1, got V={vocab_size} S={num_slots} G={guess_set} P={phrase_len}")
    if num_slots > vocab_size:
        raise ValueError(f"num_slots ({num_slots}) > vocab_size ({vocab_size}) can never be filled")
    i32 = dict(dtype=torch.int32, device=device)
    s = num_slots
    return NgramPool(
        key_to_slot=torch.full((vocab_size,), -1, **i32),
        slot_key=torch.full((s,), -1, **i32),
        counts=torch.zeros((s,), **i32),
        phrases=torch.zeros((s, guess_set, phrase_len), **i32),
        lru_prev=torch.full((s + 1,), s, **i32),
        lru_next=torch.full((s + 1,), s, **i32),
        num_keys=torch.zeros((1,), **i32),
    )


def check_ngram_pool(pool: NgramPool) -> None:
    """Raise ``ValueError`` unless ``pool`` has the contract's dtypes, shapes and a single device (no data read)."""
    v, s, (s2, g, p) = pool.key_to_slot.shape[0], pool.slot_key.shape[0], pool.phrases.shape
    want = {"key_to_slot": (v,), "slot_key": (s,), "counts": (s,), "phrases": (s, g, p), "lru_prev": (s + 1,),
            "lru_next": (s + 1,), "num_keys": (1,)}
    dev = pool.key_to_slot.device
    for name, shape in want.items():
        t = getattr(pool, name)
        if t.dtype != torch.int32 or tuple(t.shape) != shape or t.device != dev or not t.is_contiguous():
            raise ValueError(f"pool.{name}: expected contiguous int32 {shape} on {dev}, got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")


_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _check_tokens(name: str, t: torch.Tensor, shape: tuple, device: torch.device) -> None:
    if t.dtype not in _INT_DTYPES or tuple(t.shape) != shape or t.device != device:
        raise ValueError(f"{name}: expected an integer tensor of shape {shape} on {device}, got {t.dtype} "
                         f"{tuple(t.shape)} on {t.device}")


@functools.lru_cache(maxsize=None)
def cuda_ngram_ops():
    """The CUDA module when it implements the n-gram ops, else None (looked up once per process)."""
    try:
        mod = importlib.import_module("ouroboros_kernels.cuda_ops")
    except Exception:  # not written / not built / import error: the backend is simply unsupported
        return None
    if hasattr(mod, "ngram_lookup") and hasattr(mod, "ngram_insert"):
        return mod
    return None


def ngram_backend(device: torch.device, backend: str | None = None) -> str:
    """The backend the n-gram ops run on for ``device`` (``backend``, else the best available or
    ``OUROBOROS_BACKEND``)."""
    # select_backend probes imports (milliseconds when an import fails): cache per device type and environment
    return _select(device.type, backend, os.environ.get("OUROBOROS_BACKEND"), os.environ.get("TRITON_INTERPRET"))


@functools.lru_cache(maxsize=64)
def _select(device_type: str, backend: str | None, env_backend: str | None, env_interpret: str | None) -> str:
    supported = ("cuda", "triton", "reference") if cuda_ngram_ops() is not None else ("triton", "reference")
    return select_backend(torch.device(device_type), backend, supported=supported)


def ngram_lookup(pool: NgramPool, keys: torch.Tensor, k: int, stats: torch.Tensor | None = None,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``k`` phrases of each key, newest first (contract: module docstring).

    Parameters
    ----------
    pool : NgramPool
        The device pool.
    keys : torch.Tensor
        ``(B,)`` integer key tokens on the pool's device.
    k : int
        Phrases per key (the output is always ``(B, k, P)``).
    stats : torch.Tensor, optional
        int64 ``(2,)`` lookup / hit counters to add to (see the module docstring).
    backend : str, optional
        "cuda", "triton" or "reference" (default: best available, or ``OUROBOROS_BACKEND``).

    Returns
    -------
    phrases : torch.Tensor
        ``(B, k, P)`` int64, zero where not valid.
    valid : torch.Tensor
        ``(B, k)`` bool; row ``b`` is ``True`` for its first ``min(count, k)`` entries.
    """
    check_ngram_pool(pool)
    dev = pool.key_to_slot.device
    if keys.dim() != 1:
        raise ValueError(f"keys must be 1-D, got shape {tuple(keys.shape)}")
    _check_tokens("keys", keys, (keys.shape[0],), dev)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if stats is not None and (stats.dtype != torch.int64 or tuple(stats.shape) != (2,) or stats.device != dev):
        raise ValueError(f"stats must be an int64 (2,) tensor on {dev}")
    name = ngram_backend(dev, backend)
    if name == "reference":
        return reference.ngram_lookup(pool, keys, k, stats)
    if name == "triton":
        from .triton.ngram import ngram_lookup as fn  # optional: triton
        return fn(pool, keys, k, stats)
    return cuda_ngram_ops().ngram_lookup(pool, keys, k, stats)


def ngram_insert_backend(device: torch.device, backend: str | None = None, scored: bool = False) -> str:
    """The backend ``ngram_insert`` runs on: :func:`ngram_backend`, except that a scored insert (``scored``) whose
    backend is "cuda" runs on "triton" (the CUDA extension has no scored insert), or on "reference" without Triton."""
    name = ngram_backend(device, backend)
    if scored and name == "cuda":
        return "triton" if backend_status()["triton"] == "available" else "reference"
    return name


def _check_scored(scores: torch.Tensor | None, weights: torch.Tensor | None, pool: NgramPool, b: int) -> None:
    """Raise ``ValueError`` unless ``scores`` is ``None`` or a contiguous int32 ``(S, G)`` tensor and ``weights``
    ``None`` or an integer ``(B,)`` tensor, both on the pool's device (no data read)."""
    dev, shape = pool.key_to_slot.device, (pool.num_slots, pool.guess_set)
    if scores is not None and (not isinstance(scores, torch.Tensor) or scores.dtype != torch.int32
                               or tuple(scores.shape) != shape or scores.device != dev or not scores.is_contiguous()):
        got = f"{scores.dtype} {tuple(scores.shape)} on {scores.device}" if isinstance(scores, torch.Tensor) else \
            type(scores).__name__
        raise ValueError(f"scores: expected a contiguous int32 tensor of shape {shape} on {dev}, got {got}")
    if weights is not None:
        if not isinstance(weights, torch.Tensor):
            raise ValueError(f"weights: expected an integer tensor of shape ({b},), got {type(weights).__name__}")
        _check_tokens("weights", weights, (b,), dev)


def ngram_insert(pool: NgramPool, keys: torch.Tensor, phrases: torch.Tensor, old: torch.Tensor | None = None,
                 backend: str | None = None, *, scores: torch.Tensor | None = None,
                 weights: torch.Tensor | None = None) -> None:
    """Insert (or, with ``old``, replace) a batch of phrases in order, in place (contract: module docstring).

    Parameters
    ----------
    pool : NgramPool
        The device pool, modified in place.
    keys : torch.Tensor
        ``(B,)`` integer key tokens; keys outside ``[0, V)`` (e.g. ``-1`` padding) are skipped.
    phrases : torch.Tensor
        ``(B, P)`` phrases to insert (the new phrase of a replace).
    old : torch.Tensor, optional
        ``(B, P)``: item ``b`` is ``replace(keys[b], old[b], phrases[b])``; an ``old`` row that is not in the key's
        list (e.g. all ``-1``) makes the item a plain insert.
    backend : str, optional
        "cuda", "triton" or "reference" (default: best available, or ``OUROBOROS_BACKEND``); a scored insert asked
        to run on "cuda" runs on Triton (:func:`ngram_insert_backend`).
    scores : torch.Tensor, optional
        int32 ``(S, G)``, the pool's counts, modified in place: the lists are scored (module docstring).
    weights : torch.Tensor, optional
        ``(B,)`` integer weights added to the counts of a scored insert (default 1; clamped into
        ``[1, MAX_SCORE]``); checked and ignored without ``scores``.
    """
    check_ngram_pool(pool)
    dev = pool.key_to_slot.device
    if keys.dim() != 1:
        raise ValueError(f"keys must be 1-D, got shape {tuple(keys.shape)}")
    b, p = keys.shape[0], pool.phrase_len
    _check_tokens("keys", keys, (b,), dev)
    _check_tokens("phrases", phrases, (b, p), dev)
    if old is not None:
        _check_tokens("old", old, (b, p), dev)
    _check_scored(scores, weights, pool, b)
    if b == 0:
        return
    weights = None if scores is None else weights
    name = ngram_insert_backend(dev, backend, scores is not None)
    if name == "reference":
        reference.ngram_insert(pool, keys, phrases, old, scores, weights)
    elif name == "triton":
        from .triton.ngram import ngram_insert as fn  # optional: triton
        fn(pool, keys, phrases, old, scores, weights)
    else:
        cuda_ngram_ops().ngram_insert(pool, keys, phrases, old)


# ---- host-side conversion (syncs): the pool's contents as lists, and a pool built from them --------------------------
def ngram_pool_contents(pool: NgramPool, scores: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(keys, counts, rows, row_scores)`` of ``pool`` on the host, all int64: the keys least recently inserted-into
    first, each key's number of phrases, its phrase rows ``(sum(counts), P)`` in stored order, key after key, and
    (``scores`` given) each row's score, else ``None``. Copies the pool to the host (a sync)."""
    host = NgramPool(*(x.cpu() for x in pool))
    nxt = host.lru_next.tolist()
    order, s = [], nxt[host.num_slots]
    while s != host.num_slots:
        order.append(s)
        s = nxt[s]
    idx = torch.tensor(order, dtype=torch.int64)
    counts = host.counts[idx].long()
    keep = torch.arange(host.guess_set)[None, :] < counts[:, None]
    row_scores = None if scores is None else scores.cpu()[idx][keep].long()
    return host.slot_key[idx].long(), counts, host.phrases[idx][keep].long(), row_scores


def ngram_pool_from_contents(vocab_size: int, num_slots: int, guess_set: int, keys: torch.Tensor, counts: torch.Tensor,
                             rows: torch.Tensor, row_scores: torch.Tensor | None = None,
                             device: torch.device | str = "cpu") -> tuple[NgramPool, torch.Tensor | None]:
    """The pool holding ``keys`` (distinct, least recently inserted-into first) with ``counts[i]`` phrases each, taken
    in order from ``rows`` ``(sum(counts), P)`` (stored order), and (``row_scores`` given) its int32 ``(S, G)`` scores,
    each row's score clamped to ``MAX_SCORE`` (else ``None``): the inverse of :func:`ngram_pool_contents`. Raises
    ``ValueError`` for more keys than slots, keys outside ``[0, vocab_size)`` or counts above ``guess_set``."""
    n, p = keys.numel(), rows.shape[1]
    if n > num_slots:
        raise ValueError(f"pool state holds {n} keys, more than the {num_slots} slots (vocab_size = {vocab_size})")
    if n and (int(keys.min()) < 0 or int(keys.max()) >= vocab_size):
        raise ValueError(f"pool state has keys outside [0, {vocab_size})")
    if n and int(counts.max()) > guess_set:
        raise ValueError(f"pool state has a key with more than guess_set = {guess_set} phrases")
    pool = ngram_pool_empty(vocab_size, num_slots, guess_set, p)
    pool.key_to_slot[keys] = torch.arange(n, dtype=torch.int32)
    pool.slot_key[:n] = keys.to(torch.int32)
    pool.counts[:n] = counts.to(torch.int32)
    slot_of_row = torch.repeat_interleave(torch.arange(n), counts)
    row_in_slot = torch.arange(rows.shape[0]) - (torch.cumsum(counts, 0) - counts)[slot_of_row]
    pool.phrases[slot_of_row, row_in_slot] = rows.to(torch.int32)
    scores = None
    if row_scores is not None:
        scores = torch.zeros((num_slots, guess_set), dtype=torch.int32)
        scores[slot_of_row, row_in_slot] = row_scores.clamp(max=MAX_SCORE).to(torch.int32)
        scores = scores.to(device)
    if n:
        order = torch.arange(n, dtype=torch.int32)
        pool.lru_prev[1:n], pool.lru_next[:n - 1] = order[:-1], order[1:]
        pool.lru_prev[0], pool.lru_next[n - 1] = num_slots, num_slots
        pool.lru_next[num_slots], pool.lru_prev[num_slots] = 0, n - 1
        pool.num_keys[0] = n
    return NgramPool(*(x.to(device) for x in pool)), scores
