"""Top-k recycling on the device cycle (issue #29 item 3): :class:`~ouroboros.decoding.recycle.Recycler`'s rule as
fixed-shape tensor ops, inside the captured cycle (no host read, no extra forward, one batched pool insertion).

The verification forward's logits give the target's top ``k + 1`` next tokens at every tree node. Per cycle:

1. *Observe*: every valid node of the tree (root, the ``cut`` trunk nodes, the suffix nodes the pool filled) records
   its token's best successor, the target's argmax there, in a ``(V + 1,)`` table (``-1``: never seen; entry ``V``
   takes the masked writes). Where one tree holds a token twice, either node may win (a proposal heuristic only).
2. *Phrases*: at every verified position (the root and the accepted path) each top candidate ``c`` that is not the
   argmax starts the phrase ``c, s(c), s(s(c)), ...`` of ``N - 1`` tokens, each next token the table's successor of
   the last, else the first token of the pool's best phrase after it (read without touching the pool's counters);
   a phrase that runs out of both is dropped.
3. *Insert*: the phrases go into the pool under the position's token in one ``insert_many`` (weight 1; key ``-1`` for
   every dropped or masked row), and the cycle's block reports how many were inserted.

Differences from the host :class:`Recycler`, all in what is proposed (never in what is emitted, so both stay
lossless): the table covers the whole vocabulary (no 65536-token bound, ``8 (V + 1)`` bytes, cleared per
generation), and a pool fallback contributes one token at a time rather than the rest of its phrase.
"""
from __future__ import annotations

import torch

from ouroboros.drafting.gpu_pool import GpuPhrasePool
from ouroboros_kernels.ngram import ngram_lookup

__all__ = ["DeviceRecycler"]


class DeviceRecycler:
    """The successor table and the per-cycle recycling step of the device cycle (module docstring)."""

    def __init__(self, k: int, phrase_len: int, vocab_size: int, device: torch.device) -> None:
        if k < 1:
            raise ValueError(f"recycling keeps k >= 1 candidates, got {k}")
        self.k, self.n1, self.vocab = k, phrase_len, vocab_size
        self.succ = torch.full((vocab_size + 1,), -1, dtype=torch.long, device=device)

    def reset(self) -> None:
        """Forget every successor (in place: a captured graph keeps reading the same storage)."""
        self.succ.fill_(-1)

    def step(self, pool: GpuPhrasePool, ids: torch.Tensor, am: torch.Tensor, top: torch.Tensor,
             valid: torch.Tensor, nodes: torch.Tensor, verified: torch.Tensor) -> torch.Tensor:
        """Observe the tree and insert its recycled phrases (steps 1-3 of the module docstring).

        ``ids`` / ``am`` / ``valid``: the tree's tokens, the target's argmax and the real (not padding) nodes, all
        ``(T,)``; ``top``: ``(T, k + 1)`` the target's top tokens per node; ``nodes`` / ``verified``: ``(E,)`` the
        verified positions (root first, then the accepted path) and which of them are real. Returns the number of
        phrases inserted (a 0-dim device tensor)."""
        self.succ.index_copy_(0, torch.where(valid, ids, self.vocab), torch.where(valid, am, -1))
        key = ids.index_select(0, nodes)                                            # (E,)
        cand = top.index_select(0, nodes)                                           # (E, k + 1)
        ok = verified[:, None] & (cand != am.index_select(0, nodes)[:, None])
        tokens = [cand.reshape(-1)]
        for _ in range(self.n1 - 1):
            last = tokens[-1]
            nxt = self.succ.index_select(0, last.clamp(0, self.vocab))
            known, found = ngram_lookup(pool.tensors, last, 1, backend=pool.backend)
            nxt = torch.where(nxt >= 0, nxt, torch.where(found[:, 0], known[:, 0, 0], -1))
            tokens.append(nxt.clamp(min=0))
            ok = ok & (nxt >= 0).view_as(ok)
        keys = torch.where(ok, key[:, None], -1).reshape(-1)
        pool.insert_many(keys, torch.stack(tokens, dim=1))
        return (keys >= 0).sum()
