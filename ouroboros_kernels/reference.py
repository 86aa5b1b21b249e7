"""Plain-PyTorch twins of every kernel: the definition of correct.

Every op here matches the contract of SPEC §3 and is what the Triton and CUDA kernels are tested against.
"""
from __future__ import annotations

import math

import torch

from .tree import unpack_mask

__all__ = ["tree_attention", "check_tree_attention_args", "ngram_lookup", "ngram_insert"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tree_attention_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int,
                              tree_mask: torch.Tensor | None) -> None:
    """Raise ``ValueError`` naming the problem unless the arguments satisfy the ``tree_attention`` contract."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, T/S, D); got {q.dim()}, {k.dim()}, {v.dim()} dims")
    b, hq, t, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    bk, hkv, s, dk = k.shape
    if bk != b or dk != d:
        raise ValueError(f"k/v batch and head dim must match q: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if q.dtype not in _FLOAT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if prefix_len < 0 or prefix_len + t > s:
        raise ValueError(f"prefix_len ({prefix_len}) + T ({t}) must be within the cache length S ({s})")
    if tree_mask is not None:
        if tree_mask.dtype != torch.int32 or tuple(tree_mask.shape) != (t, (t + 31) // 32):
            raise ValueError(f"tree_mask must be int32 of shape (T, ceil(T/32)) = ({t}, {(t + 31) // 32}), "
                             f"got {tree_mask.dtype} {tuple(tree_mask.shape)}")
        if tree_mask.device != q.device:
            raise ValueError(f"tree_mask is on {tree_mask.device} but q is on {q.device}")


def dense_visibility(t: int, prefix_len: int, tree_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Boolean ``(T, prefix_len + T)``: which cache entries each tree token may see (cache prefix + tree bits)."""
    if tree_mask is None:
        tree = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    else:
        tree = unpack_mask(tree_mask, t).to(device)
    return torch.cat([torch.ones(t, prefix_len, dtype=torch.bool, device=device), tree], dim=1)


def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int,
                   tree_mask: torch.Tensor | None, scale: float | None = None,
                   softcap: float | None = None) -> torch.Tensor:
    """Attention of T tree tokens over a KV cache, per SPEC §3.

    Returns ``o`` of shape ``(B, Hq, T, D)`` in ``q``'s dtype. Token ``i`` sees every one of the first ``prefix_len``
    cache entries and the tree entries ``prefix_len + j`` whose bit ``j`` is set in row ``i`` of ``tree_mask``;
    ``tree_mask=None`` means a plain causal chain (prefill / decode). Entries at or past ``prefix_len + T`` are
    ignored. Computed in float32. ``softcap`` (Gemma2) applies ``softcap * tanh(scores / softcap)`` before masking.
    """
    check_tree_attention_args(q, k, v, prefix_len, tree_mask)
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    n = prefix_len + t
    kf = k[:, :, :n].float().repeat_interleave(hq // hkv, dim=1)
    vf = v[:, :, :n].float().repeat_interleave(hq // hkv, dim=1)
    scores = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    visible = dense_visibility(t, prefix_len, tree_mask, q.device)
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), vf).to(q.dtype)


# ---- n-gram phrase pool (layout and contract: ouroboros_kernels/ngram.py) --------------------------------------------
def _one(x: torch.Tensor) -> torch.Tensor:
    """A 1-element int64 index tensor (1-D, so indexing never turns it into a Python int: no host sync)."""
    return x.reshape(1).long()


def _put(t: torch.Tensor, idx: torch.Tensor, val: torch.Tensor, cond: torch.Tensor) -> None:
    """``t[idx] = val`` where ``cond`` (1-element tensors), without a host sync."""
    cur = t.index_select(0, idx)
    t.index_copy_(0, idx, torch.where(cond, val.to(t.dtype), cur))


def ngram_lookup(pool, keys: torch.Tensor, k: int,
                 stats: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``k`` phrases of each key, newest first: ``(phrases (B, k, P) int64, valid (B, k) bool)``.

    Rows that are not valid are 0. Keys outside ``[0, V)`` or absent from the pool find nothing. The pool is not
    modified; ``stats`` (int64 ``(2,)``), when given, gets ``+= (#keys >= 0, #those with >= 1 phrase)``.
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


def ngram_insert(pool, keys: torch.Tensor, phrases: torch.Tensor, old: torch.Tensor | None = None) -> None:
    """Apply ``insert(keys[b], phrases[b])`` (or ``replace(keys[b], old[b], phrases[b])``) for ``b = 0..B-1`` in order,
    in place. One Python iteration of device ops per item: slow, obviously sequential, and free of host syncs."""
    v, s_n, g = pool.key_to_slot.shape[0], pool.slot_key.shape[0], pool.phrases.shape[1]
    dev = keys.device
    sent = torch.full((1,), s_n, dtype=torch.long, device=dev)
    rows_i = torch.arange(g, device=dev)
    new_all = phrases.to(torch.int32)
    old_all = None if old is None else old.to(torch.int32)
    keys = keys.long()
    for b in range(keys.shape[0]):
        key = keys[b:b + 1]
        ok = (key >= 0) & (key < v)
        kc = key.clamp(0, v - 1)
        # 2. key recency and slot
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
        # 3. the slot's phrase list
        c = torch.where(is_new, 0, pool.counts.index_select(0, slot).long())
        rows = pool.phrases.index_select(0, slot)[0]  # (G, P)
        new = new_all[b]
        inlist = rows_i < c
        hit_new = (rows == new).all(-1) & inlist
        mn = torch.where(hit_new.any(), hit_new.int().argmax(), -1)
        if old_all is None:
            mo = torch.full_like(mn, -1)
            same = torch.zeros((), dtype=torch.bool, device=dev)
        else:
            hit_old = (rows == old_all[b]).all(-1) & inlist
            mo = torch.where(hit_old.any(), hit_old.int().argmax(), -1)
            same = (old_all[b] == new).all()
        c1 = c[0]
        ins = mo < 0
        # (lo, hi): rows lo..hi-1 take row r+1; row w takes `new`; count becomes c_new
        lo = torch.where(ins, torch.where(mn >= 0, mn, torch.where(c1 < g, c1, 0)), torch.where(same | (mn < 0), 0, mo))
        hi = torch.where(ins, torch.where(mn >= 0, c1 - 1, torch.clamp(c1 + 1, max=g) - 1),
                         torch.where(same | (mn < 0), 0, c1 - 1))
        w = torch.where(ins, hi, torch.where(same | (mn >= 0), -1, mo))
        c_new = torch.where(ins, hi + 1, torch.where(~same & (mn >= 0), c1 - 1, c1))
        src = torch.where((rows_i >= lo) & (rows_i < hi), rows_i + 1, rows_i).clamp(max=g - 1)
        upd = torch.where((rows_i == w)[:, None], new[None, :], rows[src])
        _put(pool.phrases, slot, upd[None], ok)
        _put(pool.counts, slot, c_new.reshape(1), ok)
