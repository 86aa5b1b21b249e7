"""Plain-PyTorch n-gram phrase pool ops: the definition of correct for the Triton and CUDA kernels.

Layout and contract (LRU and scored lists): ``ouroboros_kernels/ngram.py``. Every op here is a loop of device ops with
no host synchronisation (no ``.item()``, no data-dependent shapes), so it also runs on CUDA tensors and in a graph.
``reference.ngram_lookup`` / ``reference.ngram_insert`` re-export these.
"""
from __future__ import annotations

import torch

__all__ = ["MAX_SCORE", "ngram_insert", "ngram_lookup"]

MAX_SCORE = (1 << 31) - 1  # a scored phrase's count saturates here on the device (int32 scores)


def _put(t: torch.Tensor, idx: torch.Tensor, val: torch.Tensor, cond: torch.Tensor) -> None:
    """``t[idx] = val`` where ``cond`` (1-element tensors), without a host sync."""
    cur = t.index_select(0, idx)
    t.index_copy_(0, idx, torch.where(cond, val.to(t.dtype), cur))


def ngram_lookup(pool, keys: torch.Tensor, k: int,
                 stats: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``k`` phrases of each key, newest first: ``(phrases (B, k, P) int64, valid (B, k) bool)``.

    Rows that are not valid are 0. Keys outside ``[0, V)`` or absent from the pool find nothing. The pool is not
    modified; ``stats`` (int64 ``(2,)``), when given, gets ``+= (#keys >= 0, #those with >= 1 phrase)``. A scored
    list is stored in rank order, so the same walk returns it best first.
    """
    v, g = pool.key_to_slot.shape[0], pool.phrases.shape[1]
    keys = keys.long()
    in_range = (keys >= 0) & (keys < v)
    slot = pool.key_to_slot.index_select(0, keys.clamp(0, v - 1)).long()
    present = in_range & (slot >= 0)
    slot = slot.clamp(min=0)
    count = torch.where(present, pool.counts.index_select(0, slot).long(), 0)
    i = torch.arange(k, device=keys.device)
    valid = i[None, :] < count[:, None]
    row = (count[:, None] - 1 - i[None, :]).clamp(0, g - 1)
    out = pool.phrases[slot[:, None], row].long()
    if stats is not None:
        counted = keys >= 0
        stats += torch.stack([counted.sum(), (counted & (count > 0)).sum()])
    return out.masked_fill(~valid[..., None], 0), valid


def _touch_key(pool, key: torch.Tensor, sent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contract step 2 for the 1-element ``key``: refresh (or place, evicting the oldest key when full) its slot at
    the newest end of the key LRU. Returns 1-element ``(ok, slot, is_new)``: ``ok`` false (and nothing changed) for a
    key outside ``[0, V)``; ``is_new``: the slot's list must be read as empty."""
    v, s_n = pool.key_to_slot.shape[0], pool.slot_key.shape[0]
    ok = (key >= 0) & (key < v)
    kc = key.clamp(0, v - 1)
    s0 = pool.key_to_slot.index_select(0, kc).long()
    present = ok & (s0 >= 0)
    is_new = ok & (s0 < 0)
    n = pool.num_keys.long()
    full = n >= s_n
    head = pool.lru_next.index_select(0, sent).long()
    slot = torch.where(present, s0, torch.where(full, head, n)).clamp(0, s_n - 1)
    evict = is_new & full
    move = present | evict
    prv = pool.lru_prev.index_select(0, slot).long()
    nxt = pool.lru_next.index_select(0, slot).long()
    _put(pool.lru_next, prv, nxt, move)
    _put(pool.lru_prev, nxt, prv, move)
    old_key = pool.slot_key.index_select(0, slot).long().clamp(0, v - 1)
    _put(pool.key_to_slot, old_key, torch.full_like(old_key, -1), evict)
    tail = pool.lru_prev.index_select(0, sent).long()
    _put(pool.lru_next, tail, slot, ok)
    _put(pool.lru_prev, slot, tail, ok)
    _put(pool.lru_next, slot, sent, ok)
    _put(pool.lru_prev, sent, slot, ok)
    _put(pool.key_to_slot, kc, slot, is_new)
    _put(pool.slot_key, slot, key, is_new)
    pool.num_keys.add_((is_new & ~full).to(torch.int32))
    return ok, slot, is_new


def _find(rows: torch.Tensor, phrase: torch.Tensor, inlist: torch.Tensor) -> torch.Tensor:
    """0-d int64: the row of ``rows`` (G, P) among ``inlist`` equal to ``phrase``, or -1."""
    hit = (rows == phrase).all(-1) & inlist
    return torch.where(hit.any(), hit.int().argmax(), -1)


def _lru_plan(r: torch.Tensor, c: torch.Tensor, mn: torch.Tensor, mo: torch.Tensor, same: torch.Tensor,
              g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An LRU list's step 3 as ``(src, w, c_new)``: new row ``j`` is old row ``src[j]``, except row ``w`` (-1: none)
    which takes the inserted phrase; the list then has ``c_new`` rows (0-d tensors; ``r`` = ``arange(G)``)."""
    ins = mo < 0
    lo = torch.where(ins, torch.where(mn >= 0, mn, torch.where(c < g, c, 0)), torch.where(same | (mn < 0), 0, mo))
    hi = torch.where(ins, torch.where(mn >= 0, c - 1, torch.clamp(c + 1, max=g) - 1),
                     torch.where(same | (mn < 0), 0, c - 1))
    w = torch.where(ins, hi, torch.where(same | (mn >= 0), -1, mo))
    c_new = torch.where(ins, hi + 1, torch.where(~same & (mn >= 0), c - 1, c))
    src = torch.where((r >= lo) & (r < hi), r + 1, r).clamp(max=g - 1)
    return src, w, c_new


def _scored_plan(r: torch.Tensor, c: torch.Tensor, mn: torch.Tensor, mo: torch.Tensor, sc: torch.Tensor,
                 weight: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A scored list's step 3 as ``(src, pos, c_new, scores)`` (the rows' meaning as in :func:`_lru_plan`; ``pos``
    the inserted phrase's row, ``scores`` the new int64 ``(G,)`` scores). ``mo`` (-1: none) is a replaced ``old``
    other than the phrase, ``mn`` the phrase's own row; ``sc`` the int64 scores, ``weight`` the clamped weight."""
    inlist = r < c
    evict = (mn < 0) & (mo < 0) & (c >= g)                          # a new phrase on a full list drops row 0
    keep = inlist & (r != mn) & (r != mo) & ~((r == 0) & evict)
    count = (torch.where(r == mn, sc, 0).sum() + torch.where(r == mo, sc, 0).sum() + weight).clamp(max=MAX_SCORE)
    pos = (keep & (sc <= count)).sum()                               # after every row of count <= its count
    k = keep.long()
    dest = torch.where(keep, (torch.cumsum(k, 0) - k) + ((torch.cumsum(k, 0) - k) >= pos).long(), -1)
    moved = dest[None, :] == r[:, None]                              # (new row j, old row i): i lands on j
    has = moved.any(1)
    src = torch.where(has, torch.where(moved, r[None, :], 0).sum(1), r)
    scores = torch.where(r == pos, count, sc.gather(0, src))
    return src, pos, k.sum() + 1, scores


def ngram_insert(pool, keys: torch.Tensor, phrases: torch.Tensor, old: torch.Tensor | None = None,
                 scores: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> None:
    """Apply ``insert(keys[b], phrases[b])`` (or ``replace(keys[b], old[b], phrases[b])``) for ``b = 0..B-1`` in order,
    in place: LRU lists, or scored lists when ``scores`` (int32 ``(S, G)``) is given, ``weights`` ``(B,)`` (clamped
    into ``[1, MAX_SCORE]``, default 1) then adding to the counts. One Python iteration of device ops per item: slow,
    obviously sequential, and free of host syncs."""
    s_n, g = pool.slot_key.shape[0], pool.phrases.shape[1]
    dev = keys.device
    sent = torch.full((1,), s_n, dtype=torch.long, device=dev)
    r = torch.arange(g, device=dev)
    new_all = phrases.to(torch.int32)
    old_all = None if old is None else old.to(torch.int32)
    w_all = None if weights is None else weights.long().clamp(1, MAX_SCORE)
    keys = keys.long()
    for b in range(keys.shape[0]):
        ok, slot, is_new = _touch_key(pool, keys[b:b + 1], sent)
        c = torch.where(is_new, 0, pool.counts.index_select(0, slot).long())[0]
        rows = pool.phrases.index_select(0, slot)[0]  # (G, P)
        new = new_all[b]
        inlist = r < c
        mn = _find(rows, new, inlist)
        if old_all is None:
            mo, same = torch.full_like(mn, -1), torch.zeros((), dtype=torch.bool, device=dev)
        else:
            mo, same = _find(rows, old_all[b], inlist), (old_all[b] == new).all()
        if scores is None:
            src, w, c_new = _lru_plan(r, c, mn, mo, same, g)
        else:
            weight = torch.ones((), dtype=torch.long, device=dev) if w_all is None else w_all[b]
            sc = scores.index_select(0, slot)[0].long()
            src, w, c_new, sc_new = _scored_plan(r, c, mn, torch.where(same, -1, mo), sc, weight, g)
            _put(scores, slot, sc_new[None], ok)
        upd = torch.where((r == w)[:, None], new[None, :], rows[src])
        _put(pool.phrases, slot, upd[None], ok)
        _put(pool.counts, slot, c_new.reshape(1), ok)
