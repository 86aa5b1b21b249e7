"""Triton kernels for the n-gram phrase pool (contract and layout: ``ouroboros_kernels/ngram.py``).

``ngram_lookup``: one program per key gathers its newest ``k`` rows (no reduction, no sync).

``ngram_insert``: two launches that together equal the sequential semantics of the contract.
  1. ``_resolve_kernel``: ONE program walks the batch in order and does only the key-level work (the global key LRU
     is inherently sequential: an insert can evict a key inserted earlier in the same batch). For item ``b`` it
     writes the slot the item lands in (``-1`` for skipped keys), whether the item starts a fresh key in that slot
     (so the slot's list must be emptied first), whether it is the first item of the batch in that slot, and the
     next item of the batch in the same slot (a chain).
  2. ``_apply_kernel``: one program per item; the program of the first item of each slot follows that slot's chain
     and applies its items to the slot's ``(G, P)`` tile in order. Distinct slots are independent: parallel. With
     ``SCORED`` (a scored pool: ``scores`` given) it also loads the slot's ``(G,)`` scores, drops the replaced / re-
     inserted / evicted row, ranks the phrase by its count (a cumulative sum gives each kept row its place) and
     writes rows and scores back; without it the LRU rule of the contract.
Cost model (not yet measured on a GPU): step 1 keeps the chunk's keys, their slots and the list ends in registers,
leaving one dependent global round trip per item (the moved slot's list neighbours; none when the key is already the
newest); step 2 costs about two round trips per item of the longest chain. The batch size is a runtime argument: the
compiled variants differ only by the register chunk (a power of two up to ``MAX_BLOCK_B``).
Memory ordering inside a program: every store that a later load of the same program may read is followed by
``tl.debug_barrier()`` (a scalar store comes from one thread, a scalar load from all; the barrier orders them).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["ngram_lookup", "ngram_insert"]


@triton.jit
def _lookup_kernel(keys_ptr, key_to_slot_ptr, counts_ptr, phrases_ptr, out_ptr, valid_ptr, stats_ptr, V, K,
                   G: tl.constexpr, P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
                   HAS_STATS: tl.constexpr):
    b = tl.program_id(0)
    key = tl.load(keys_ptr + b).to(tl.int64)
    ok = (key >= 0) & (key < V)
    slot = tl.load(key_to_slot_ptr + tl.where(ok, key, 0), mask=ok, other=-1).to(tl.int64)
    present = ok & (slot >= 0)
    slot = tl.where(present, slot, 0)
    c = tl.load(counts_ptr + slot, mask=present, other=0)
    c = tl.where(present, c, 0)
    i = tl.arange(0, BLOCK_K)
    p = tl.arange(0, BLOCK_P)
    valid = (i < c) & (i < K)
    row = tl.where(valid, c - 1 - i, 0).to(tl.int64)
    ptrs = phrases_ptr + (slot * G + row)[:, None] * P + p[None, :]
    vals = tl.load(ptrs, mask=valid[:, None] & (p[None, :] < P), other=0)
    out_ptrs = out_ptr + (b * K + i)[:, None].to(tl.int64) * P + p[None, :]
    tl.store(out_ptrs, vals.to(tl.int64), mask=(i[:, None] < K) & (p[None, :] < P))
    tl.store(valid_ptr + b * K + i, valid.to(tl.int8), mask=i < K)
    if HAS_STATS:
        tl.atomic_add(stats_ptr, (key >= 0).to(tl.int64))
        tl.atomic_add(stats_ptr + 1, ((key >= 0) & (c > 0)).to(tl.int64))


def ngram_lookup(pool, keys: torch.Tensor, k: int,
                 stats: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`ouroboros_kernels.reference.ngram_lookup`."""
    b = keys.shape[0]
    g, p = pool.phrases.shape[1], pool.phrases.shape[2]
    out = torch.empty((b, k, p), dtype=torch.int64, device=keys.device)
    valid = torch.empty((b, k), dtype=torch.int8, device=keys.device)
    if b == 0:
        return out, valid.view(torch.bool)
    _lookup_kernel[(b,)](keys.contiguous(), pool.key_to_slot, pool.counts, pool.phrases, out, valid,
                         out if stats is None else stats, pool.key_to_slot.shape[0], k, G=g, P=p,
                         BLOCK_K=triton.next_power_of_2(max(k, 1)), BLOCK_P=triton.next_power_of_2(p),
                         HAS_STATS=stats is not None, num_warps=1)
    return out, valid.view(torch.bool)


@triton.jit
def _resolve_chunk(start, n, head, tail, keys_ptr, key_to_slot_ptr, slot_key_ptr, prev_ptr, next_ptr, item_ptr,
                   B, V, S, BLOCK_B: tl.constexpr):
    """Key-level steps (contract step 2) of items ``start .. start+BLOCK_B-1``; returns ``(num_keys, head, tail)``.

    Latency is what matters here (one program, items in order), so everything that can live in registers does: the
    chunk's keys and their slots (``sv``, patched as keys arrive or are evicted), the list ends ``head`` / ``tail``,
    and the slots of the chunk's items already done (``lv``, for the chains). The one global round trip left per item
    is reading the moved slot's list neighbours. ``item_ptr`` rows: slot, fresh, next item in the same slot, head.
    """
    offs = tl.arange(0, BLOCK_B)
    idx = start + offs
    raw = tl.load(keys_ptr + idx, mask=idx < B, other=-1)
    okv = (raw >= 0) & (raw < V)
    kv = tl.where(okv, raw, -1).to(tl.int32)
    sv = tl.load(key_to_slot_ptr + tl.where(okv, kv, 0), mask=okv, other=-1)
    lv = tl.full([BLOCK_B], -1, tl.int32)
    for i in range(0, BLOCK_B):
        sel = offs == i
        key = tl.max(tl.where(sel, kv, -1), axis=0)
        s0 = tl.max(tl.where(sel, sv, -1), axis=0)
        ok = key >= 0
        present = ok & (s0 >= 0)
        is_new = ok & (s0 < 0)
        full = n >= S
        slot = tl.where(present, s0, tl.where(full, head, n))
        slot = tl.where(ok, slot, 0)
        evict = is_new & full
        move = (present & (slot != tail)) | evict  # a present key that is already the newest stays put
        prv = tl.load(prev_ptr + slot, mask=move, other=0)
        nxt = tl.load(next_ptr + slot, mask=move, other=0)
        old_key = tl.load(slot_key_ptr + slot, mask=evict, other=-1)
        tl.debug_barrier()
        # unlink the slot (moved key or evicted key), forget the evicted key
        tl.store(next_ptr + prv, nxt, mask=move)
        tl.store(prev_ptr + nxt, prv, mask=move)
        tl.store(key_to_slot_ptr + tl.where(evict, old_key, 0), -1, mask=evict)
        head = tl.where(move & (slot == head), nxt, head)
        tail = tl.where(move & (slot == tail), prv, tail)
        sv = tl.where(evict & (kv == old_key), -1, sv)
        tl.debug_barrier()
        # append at the newest end (for an empty list tail == S, so next[S] = slot makes it the head too)
        app = move | is_new
        tl.store(next_ptr + tail, slot, mask=app)
        tl.store(prev_ptr + slot, tail, mask=app)
        tl.debug_barrier()
        tl.store(next_ptr + slot, S, mask=app)
        tl.store(prev_ptr + S, slot, mask=app)
        head = tl.where(app & (head == S), slot, head)
        tail = tl.where(app, slot, tail)
        tl.store(key_to_slot_ptr + tl.where(is_new, key, 0), slot, mask=is_new)
        tl.store(slot_key_ptr + slot, key, mask=is_new)
        sv = tl.where(is_new & (kv == key), slot, sv)
        n = n + (is_new & (n < S)).to(tl.int32)
        # chain: the latest earlier item of the batch in the same slot points to this one
        b = start + i
        last = tl.max(tl.where((lv == slot) & ok, idx, -1), axis=0)
        scan = ok & (last < 0)
        for st in range(0, start, BLOCK_B):  # earlier chunks (only when B > BLOCK_B)
            j = st + offs
            sj = tl.load(item_ptr + j, mask=(j < start) & scan, other=-1)
            last = tl.maximum(last, tl.max(tl.where(sj == slot, j, -1), axis=0))
        lv = tl.where(sel & ok, slot, lv)
        inb = b < B
        tl.store(item_ptr + 2 * B + tl.where(last >= 0, last, 0), b, mask=inb & (last >= 0))
        tl.store(item_ptr + b, tl.where(ok, slot, -1), mask=inb)
        tl.store(item_ptr + B + b, is_new.to(tl.int32), mask=inb)
        tl.store(item_ptr + 2 * B + b, -1, mask=inb)
        tl.store(item_ptr + 3 * B + b, (ok & (last < 0)).to(tl.int32), mask=inb)
        tl.debug_barrier()
    return n, head, tail


@triton.jit
def _resolve_kernel(keys_ptr, key_to_slot_ptr, slot_key_ptr, prev_ptr, next_ptr, num_keys_ptr, item_ptr, V, S, B,
                    B_STATIC: tl.constexpr, BLOCK_B: tl.constexpr):
    n = tl.load(num_keys_ptr)
    head = tl.load(next_ptr + S)
    tail = tl.load(prev_ptr + S)
    # the loop bound must be a kernel argument used directly: see _static_batch
    if B_STATIC > 0:
        for start in range(0, B_STATIC, BLOCK_B):
            n, head, tail = _resolve_chunk(start, n, head, tail, keys_ptr, key_to_slot_ptr, slot_key_ptr, prev_ptr,
                                           next_ptr, item_ptr, B_STATIC, V, S, BLOCK_B)
    else:
        for start in range(0, B, BLOCK_B):
            n, head, tail = _resolve_chunk(start, n, head, tail, keys_ptr, key_to_slot_ptr, slot_key_ptr, prev_ptr,
                                           next_ptr, item_ptr, B, V, S, BLOCK_B)
    tl.store(num_keys_ptr, n)


@triton.jit
def _row_of(rows, vec, pm, inlist, r):
    """The row of the tile ``rows`` among ``inlist`` equal to the phrase ``vec``, or -1."""
    hit = (tl.min(tl.where(pm[None, :], (rows == vec[None, :]).to(tl.int32), 1), axis=1) > 0) & inlist
    return tl.max(tl.where(hit, r, -1), axis=0)


@triton.jit
def _lru_plan(r, c, mn, mo, same, G: tl.constexpr):
    """An LRU list's contract step 3 as ``(src, w, c_new)``: new row ``j`` is old row ``src[j]``, except row ``w``
    (-1: none), which takes the inserted phrase; the list then has ``c_new`` rows."""
    ins = mo < 0
    keep = same | (mn < 0)
    lo = tl.where(ins, tl.where(mn >= 0, mn, tl.where(c < G, c, 0)), tl.where(keep, 0, mo))
    hi = tl.where(ins, tl.where(mn >= 0, c - 1, tl.minimum(c + 1, G) - 1), tl.where(keep, 0, c - 1))
    w = tl.where(ins, hi, tl.where(same | (mn >= 0), -1, mo))
    c_new = tl.where(ins, hi + 1, tl.where(~same & (mn >= 0), c - 1, c))
    src = tl.where((r >= lo) & (r < hi), r + 1, r)
    return tl.minimum(src, G - 1), w, c_new


@triton.jit
def _scored_plan(r, c, mn, mo, sc, weight, G: tl.constexpr):
    """A scored list's step 3 as ``(src, pos, c_new, scores)`` (rows as in :func:`_lru_plan`, ``pos`` the inserted
    phrase's row, ``scores`` the new int64 scores): drop ``mo`` (a replaced ``old`` other than the phrase, -1: none),
    the phrase's own row ``mn`` and, for a new phrase on a full list, row 0; place the phrase, its count the sum of
    the dropped counts of ``mn`` / ``mo`` and ``weight`` (saturating), after every row of count <= its count."""
    evict = (mn < 0) & (mo < 0) & (c >= G)
    keep = (r < c) & (r != mn) & (r != mo) & ~((r == 0) & evict)
    count = tl.sum(tl.where((r == mn) | (r == mo), sc, 0), axis=0) + weight
    count = tl.minimum(count, 2147483647)
    pos = tl.sum((keep & (sc <= count)).to(tl.int32), axis=0)
    k = keep.to(tl.int32)
    rank = tl.cumsum(k, axis=0) - k                                   # index among the kept rows
    dest = tl.where(keep, rank + (rank >= pos).to(tl.int32), -1)
    moved = dest[None, :] == r[:, None]                               # (new row j, old row i): i lands on j
    has = tl.sum(moved.to(tl.int32), axis=1) > 0
    src = tl.where(has, tl.sum(tl.where(moved, r[None, :], 0), axis=1), r)
    gathered = tl.where(has, tl.sum(tl.where(moved, sc[None, :], 0), axis=1), sc)
    return tl.minimum(src, G - 1), pos, tl.sum(k, axis=0) + 1, tl.where(r == pos, count, gathered)


@triton.jit
def _apply_kernel(new_ptr, old_ptr, counts_ptr, phrases_ptr, item_ptr, scores_ptr, weights_ptr, B,
                  G: tl.constexpr, P: tl.constexpr, HAS_OLD: tl.constexpr, SCORED: tl.constexpr,
                  HAS_WEIGHTS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr):
    b0 = tl.program_id(0)
    slot = tl.load(item_ptr + b0)
    item_fresh_ptr = item_ptr + B
    item_next_ptr = item_ptr + 2 * B
    if tl.load(item_ptr + 3 * B + b0) != 0:  # the first item of its slot walks the slot's chain
        r = tl.arange(0, BLOCK_G)
        p = tl.arange(0, BLOCK_P)
        pm = p < P
        tile_mask = (r[:, None] < G) & pm[None, :]
        base = phrases_ptr + slot.to(tl.int64) * (G * P)
        sbase = scores_ptr + slot.to(tl.int64) * G
        c = tl.load(counts_ptr + slot)
        b = b0
        while b >= 0:
            b_next = tl.load(item_next_ptr + b)  # issued with this item's loads: one round trip, not two
            fresh = tl.load(item_fresh_ptr + b)
            c = tl.where(fresh != 0, 0, c)
            new = tl.load(new_ptr + b * P + p, mask=pm, other=0).to(tl.int32)
            rows = tl.load(base + r[:, None] * P + p[None, :], mask=tile_mask, other=-1)
            inlist = r < c
            mn = _row_of(rows, new, pm, inlist, r)
            if HAS_OLD:
                old = tl.load(old_ptr + b * P + p, mask=pm, other=0).to(tl.int32)
                mo = _row_of(rows, old, pm, inlist, r)
                same = tl.min(tl.where(pm, (old == new).to(tl.int32), 1), axis=0) > 0
            else:
                mo = mn * 0 - 1
                same = mn < -1
            if SCORED:
                if HAS_WEIGHTS:
                    weight = tl.minimum(tl.maximum(tl.load(weights_ptr + b).to(tl.int64), 1), 2147483647)
                else:
                    weight = tl.full([], 1, tl.int64)
                sc = tl.load(sbase + r, mask=r < G, other=0).to(tl.int64)
                src, w, c, sc = _scored_plan(r, c, mn, tl.where(same, -1, mo), sc, weight, G)
            else:
                src, w, c = _lru_plan(r, c, mn, mo, same, G)
            shifted = tl.load(base + src[:, None] * P + p[None, :], mask=tile_mask, other=0)
            upd = tl.where((r == w)[:, None], new[None, :], shifted)
            tl.debug_barrier()
            tl.store(base + r[:, None] * P + p[None, :], upd, mask=tile_mask)
            if SCORED:
                tl.store(sbase + r, sc.to(tl.int32), mask=r < G)
            tl.debug_barrier()
            b = b_next
        tl.store(counts_ptr + slot, c)


MAX_BLOCK_B = 1024  # tests lower it to exercise batches spanning several chunks


def _block_b(b: int) -> int:
    """Items per register chunk of ``_resolve_kernel``: a power of two (few compiled variants), at most MAX_BLOCK_B."""
    return min(triton.next_power_of_2(b), MAX_BLOCK_B)


def _static_batch(b: int, device: torch.device) -> int:
    """The batch size as a compile-time constant under the interpreter (CPU tensors), else 0 (a runtime bound).

    The interpreter cannot loop to a runtime scalar with numpy >= 2.4 (``int()`` of a 1-element array); compiled
    kernels must not specialise on the batch size, or every new batch size would compile again.
    """
    return b if device.type == "cpu" else 0


def ngram_insert(pool, keys: torch.Tensor, phrases: torch.Tensor, old: torch.Tensor | None = None,
                 scores: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> None:
    """Triton twin of :func:`ouroboros_kernels.reference.ngram_insert` (in place, no host sync; scored lists when
    ``scores`` is given)."""
    b = keys.shape[0]
    if b == 0:
        return
    dev = keys.device
    g, p = pool.phrases.shape[1], pool.phrases.shape[2]
    v, s = pool.key_to_slot.shape[0], pool.slot_key.shape[0]
    items = torch.empty((4, b), dtype=torch.int32, device=dev)  # per item: slot, fresh, next in slot, chain head
    _resolve_kernel[(1,)](keys.contiguous(), pool.key_to_slot, pool.slot_key, pool.lru_prev, pool.lru_next,
                          pool.num_keys, items, v, s, b, _static_batch(b, dev),
                          BLOCK_B=_block_b(b), num_warps=1)
    new = phrases.contiguous()
    old_t = new if old is None else old.contiguous()
    scored, has_weights = scores is not None, scores is not None and weights is not None
    _apply_kernel[(b,)](new, old_t, pool.counts, pool.phrases, items, scores if scored else pool.counts,
                        weights.contiguous() if has_weights else new, b, G=g, P=p, HAS_OLD=old is not None,
                        SCORED=scored, HAS_WEIGHTS=has_weights, BLOCK_G=triton.next_power_of_2(g),
                        BLOCK_P=triton.next_power_of_2(p), num_warps=1)
