"""Plain-PyTorch twins of every kernel: the definition of correct.

Every op here matches the contract of SPEC §3 and is what the Triton and CUDA kernels are tested against.
"""
from __future__ import annotations

import math
import numbers

import torch

from .tree import unpack_mask

__all__ = ["tree_attention", "check_tree_attention_args", "prefix_lengths", "tree_visibility", "ngram_lookup",
           "ngram_insert"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tree_attention_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int | torch.Tensor,
                              tree_mask: torch.Tensor | None, window: int | None = None,
                              softcap: float | None = None) -> None:
    """Raise ``ValueError`` naming the argument unless the arguments satisfy the ``tree_attention`` contract.

    A tensor ``prefix_len`` is checked for dtype, shape and device only: its value lives on the device, and reading it
    would be a host sync (the kernels clamp it into ``[0, S - T]`` instead, so a bad value never reads out of bounds).
    """
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
    if isinstance(prefix_len, torch.Tensor):
        if prefix_len.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"prefix_len must be a Python int or an int32/int64 tensor, got {prefix_len.dtype}")
        if prefix_len.dim() > 1 or (prefix_len.dim() == 1 and prefix_len.shape[0] != b):
            raise ValueError(f"prefix_len tensor must have shape () or (B,) = ({b},), got {tuple(prefix_len.shape)}")
        if prefix_len.device != q.device:
            raise ValueError(f"prefix_len is on {prefix_len.device} but q is on {q.device}")
        if t > s:
            raise ValueError(f"T ({t}) exceeds the cache length S ({s})")
    elif isinstance(prefix_len, bool) or not isinstance(prefix_len, numbers.Integral):
        raise ValueError(f"prefix_len must be a Python int or an int32/int64 tensor, got {type(prefix_len).__name__}")
    elif prefix_len < 0 or prefix_len + t > s:
        raise ValueError(f"prefix_len ({prefix_len}) + T ({t}) must be within the cache length S ({s})")
    if tree_mask is not None:
        if not isinstance(tree_mask, torch.Tensor) or tree_mask.dtype != torch.int32 \
                or tuple(tree_mask.shape) != (t, (t + 31) // 32):
            raise ValueError(f"tree_mask must be int32 of shape (T, ceil(T/32)) = ({t}, {(t + 31) // 32}), got "
                             f"{getattr(tree_mask, 'dtype', type(tree_mask).__name__)} "
                             f"{tuple(getattr(tree_mask, 'shape', ()))}")
        if tree_mask.device != q.device:
            raise ValueError(f"tree_mask is on {tree_mask.device} but q is on {q.device}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1):
        raise ValueError(f"window must be None or an int >= 1, got {window!r}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, numbers.Real)
                                or not softcap > 0 or math.isinf(softcap)):
        raise ValueError(f"softcap must be None or a finite float > 0, got {softcap!r}")


def prefix_lengths(prefix_len: int | torch.Tensor, batch: int, max_prefix: int, device: torch.device) -> torch.Tensor:
    """``prefix_len`` as an int64 ``(B,)`` tensor on ``device``, clamped into ``[0, max_prefix]`` (no host sync)."""
    if isinstance(prefix_len, torch.Tensor):
        return prefix_len.to(device=device, dtype=torch.int64).reshape(-1).expand(batch).clamp(0, max_prefix)
    return torch.full((batch,), int(prefix_len), dtype=torch.int64, device=device)


def tree_visibility(prefix: torch.Tensor, n_keys: int, t: int, tree_mask: torch.Tensor | None,
                    window: int | None) -> torch.Tensor:
    """Boolean ``(B, T, n_keys)``: whether tree token ``i`` of batch ``b`` sees key ``j`` (SPEC §3, v2).

    ``prefix`` is the int64 ``(B,)`` prefix length. Key ``j < prefix`` is a cache entry at position ``j``; key
    ``prefix + j'`` (``j' < T``) is tree token ``j'`` at position ``prefix + depth_j'``; keys past ``prefix + T`` are
    never visible. Tree token ``i`` (position ``prefix + depth_i``, ``depth_i = popcount(row i) - 1``) sees every cache
    entry and the tree tokens whose bits are set in its row (``tree_mask=None``: the causal chain, ``depth_i = i``);
    with a ``window`` w, only keys whose position is ``> position_i - w`` (transformers' sliding-window rule).
    Pure tensor ops: no host sync, graph-capturable.
    """
    device = prefix.device
    if tree_mask is None:
        bits = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    else:
        bits = unpack_mask(tree_mask, t).to(device)
    keys = torch.arange(n_keys, device=device)
    rel = keys[None, :] - prefix[:, None]                                      # (B, n): key index inside the tree
    in_tree = (rel >= 0) & (rel < t)
    rel_c = rel.clamp(0, t - 1)
    vis = (rel < 0)[:, None, :] | (in_tree[:, None, :] & bits[:, rel_c].permute(1, 0, 2))
    if window is not None:
        depth = bits.sum(1) - 1                                                # (T,)
        q_pos = prefix[:, None] + depth[None, :]                               # (B, T)
        k_pos = torch.where(in_tree, prefix[:, None] + depth[rel_c], keys[None, :])
        vis = vis & (k_pos[:, None, :] > q_pos[:, :, None] - window)
    return vis


def _live_keys(prefix_len: int | torch.Tensor, t: int, s: int) -> int:
    """How many leading keys the reference must look at: ``prefix_len + T`` when that is known on the host without a
    device sync (a Python int, or a CPU tensor outside torch.compile tracing), else the whole buffer ``S``."""
    if not isinstance(prefix_len, torch.Tensor):
        return int(prefix_len) + t
    if prefix_len.device.type == "cpu" and not torch.compiler.is_compiling():
        return min(int(prefix_len.max()) + t, s) if prefix_len.numel() else t
    return s


def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int | torch.Tensor,
                   tree_mask: torch.Tensor | None, scale: float | None = None, *, window: int | None = None,
                   softcap: float | None = None) -> torch.Tensor:
    """Attention of T tree tokens over a KV cache, per SPEC §3 (contract v2).

    Parameters
    ----------
    q : (B, Hq, T, D) queries of the tree tokens.
    k, v : (B, Hkv, S, D), ``Hq % Hkv == 0``; entries ``prefix_len .. prefix_len + T - 1`` are the tree tokens and
        entries at or past ``prefix_len + T`` are never used (a static cache is longer than the live part).
    prefix_len : a Python int, or an int32/int64 tensor of shape () or (B,) on ``q``'s device (clamped into
        ``[0, S - T]``; never read on the host for CUDA tensors).
    tree_mask : packed int32 (T, ceil(T/32)); bit j of row i set iff tree token i sees tree token j (ancestors and
        itself; depth_i = popcount(row i) - 1). None: a causal chain (prefill / decode).
    scale : score scale, default ``1 / sqrt(D)``.
    window : None or w >= 1: token i (position ``prefix_len + depth_i``) sees key j only if its position is
        ``> position_i - w`` (transformers' sliding window; cache entry j has position j).
    softcap : None or c > 0: scores become ``c * tanh(scores / c)`` before masking (Gemma2).

    Returns
    -------
    o : (B, Hq, T, D) in ``q``'s dtype, computed in float32.
    """
    check_tree_attention_args(q, k, v, prefix_len, tree_mask, window, softcap)
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    n = _live_keys(prefix_len, t, s)
    prefix = prefix_lengths(prefix_len, b, s - t, q.device)
    visible = tree_visibility(prefix, n, t, tree_mask, window)                 # (B, T, n)
    live = (torch.arange(n, device=q.device)[None, :] < (prefix + t)[:, None])[:, None, :, None]  # (B, 1, n, 1)
    # Entries past the live part may hold anything (stale slots, NaN): zero them so 0 * garbage never reaches o.
    kf = torch.where(live, k[:, :, :n].float(), 0.0).repeat_interleave(hq // hkv, dim=1)
    vf = torch.where(live, v[:, :, :n].float(), 0.0).repeat_interleave(hq // hkv, dim=1)
    scores = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
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
