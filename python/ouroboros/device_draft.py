"""Phrase-level drafting with everything on the device (SPEC §2 step 1; GPU pool issue item 3).

The draft model runs on a :class:`~ouroboros.static.StaticRunner`, the pool is a :class:`GpuPhrasePool`, and each
draft forward has a fixed layout: the pending token(s), the W window columns and G guess slots, each a chain of N-1
tokens hanging off the last pending token. Guesses, acceptance lengths, the window, mined n-grams, the KV compaction
and the growing draft all stay in device tensors; the host reads the draft once per cycle (``DeviceDrafter.draft``).

Differences from the host drafting loop, none of which affects losslessness: guess chains are not merged into a trie
(the longest accepted chain is taken, first on ties, which emits the same tokens), and a cycle runs a fixed number
of draft forwards (``steps``) instead of stopping as soon as ``gamma`` tokens exist (the draft is then cut to gamma).
"""
from __future__ import annotations

import math
import random
import time
from typing import Sequence

import torch

from .gpu_pool import GpuPhrasePool
from .static import StaticRunner, _bucket

__all__ = ["DeviceDrafter"]


class _Layout:
    """Depths, ancestor bits and chain node indices of ``pending`` tokens + ``chains`` chains of ``n1`` tokens."""

    def __init__(self, pending: int, chains: int, n1: int, device: torch.device) -> None:
        t = pending + chains * n1
        self.size = _bucket(t)
        self.nodes = (pending + torch.arange(chains * n1).view(chains, n1)).to(device)   # (C, N-1)
        depths = torch.zeros(self.size, dtype=torch.long)
        depths[:pending] = torch.arange(pending)
        depths[pending:t] = (pending + torch.arange(n1)).repeat(chains)
        bits = torch.eye(self.size, dtype=torch.bool)
        bits[:pending, :pending] = torch.ones(pending, pending, dtype=torch.bool).tril()
        for c in range(chains):
            lo = pending + c * n1
            bits[lo:lo + n1, :pending] = True
            bits[lo:lo + n1, lo:lo + n1] = torch.ones(n1, n1, dtype=torch.bool).tril()
        self.depths, self.bits = depths.to(device), bits.to(device)
        self.pending = pending


class DeviceDrafter:
    """Owns the window (a device tensor) for one generation; ``draft`` runs one cycle's drafting phase."""

    def __init__(self, runner: StaticRunner, pool: GpuPhrasePool, ngram: int, window: int, guess_set: int,
                 gamma: int, context: Sequence[int], seed: int = 0) -> None:
        self.runner, self.pool = runner, pool
        self.n1, self.w, self.g, self.gamma = ngram - 1, window, guess_set, gamma
        self.device = runner.device
        rng = random.Random(seed)
        cols = [[int(context[rng.randrange(len(context))]) for _ in range(self.n1)] for _ in range(window)]
        self.columns = torch.tensor(cols, dtype=torch.long, device=self.device).view(window, self.n1)
        self.steps = max(1, math.ceil(gamma / 2))
        self._layouts: dict[int, _Layout] = {}
        self.forwards = 0

    def _layout(self, pending: int) -> _Layout:
        if pending not in self._layouts:
            self._layouts[pending] = _Layout(pending, self.w + self.g, self.n1, self.device)
        return self._layouts[pending]

    def _step(self, pending: torch.Tensor, buf: torch.Tensor, dlen: torch.Tensor) -> torch.Tensor:
        """One draft forward from ``pending`` (P,) device tokens; appends 1..N tokens to ``buf`` at ``dlen``."""
        lay = self._layout(pending.shape[0])
        guesses, valid = self.pool.lookup(pending[-1:], self.g)                       # (1, G, N-1), (1, G)
        chains = torch.cat([self.columns, guesses[0]])                                 # (C, N-1)
        chain_ok = torch.cat([torch.ones(self.w, dtype=torch.bool, device=self.device), valid[0]])
        ids = torch.zeros(1, lay.size, dtype=torch.long, device=self.device)
        ids[0, :lay.pending] = pending
        ids[0, lay.nodes.flatten()] = chains.flatten()
        argmax = self.runner.forward_device(ids, lay.depths, lay.bits)
        self.forwards += 1
        root = argmax[lay.pending - 1]
        preds = argmax[lay.nodes]                                                      # (C, N-1)
        expected = torch.cat([root.expand(chains.shape[0], 1), preds[:, :-1]], dim=1)
        accepted = ((chains == expected) & chain_ok[:, None]).long().cumprod(1).sum(1)  # (C,)
        best = torch.argmax(accepted)                                                  # first longest chain
        m = accepted[best]
        bonus = torch.where(m == 0, root, preds[best, (m - 1).clamp(min=0)])
        emitted = torch.cat([chains[best], bonus.view(1)])
        emitted[m] = bonus
        buf[dlen + torch.arange(self.n1 + 1, device=self.device)] = emitted
        dlen += m + 1
        # the window slides one level; its columns become n-grams in the pool
        if self.w:
            new_cols = torch.cat([self.columns[:, 1:], preds[:self.w, -1:]], dim=1)
            self.pool.insert_many(self.columns[:, 0], new_cols)
            self.columns = new_cols
        # keep the pending entries and the accepted chain's entries; the bonus is the next pending token
        src = torch.cat([torch.arange(lay.pending, device=self.device), lay.nodes[best]])
        self.runner.commit_device(src, lay.pending + m)
        return bonus.view(1)

    def draft(self, pending: Sequence[int]) -> tuple[list[int], list[tuple[int, ...]], int]:
        """Run ``steps`` draft forwards from ``pending`` (host tokens not yet in the draft cache).

        Returns the draft (cut to ``gamma``), the pool's newest phrases for its last token (for phrase
        concatenation), and the number of tokens drafted before the cut. One device-to-host read.
        """
        start, prefix = time.perf_counter(), self.runner.n_cached
        buf = torch.zeros(self.steps * (self.n1 + 1) + 1, dtype=torch.long, device=self.device)
        dlen = torch.zeros((), dtype=torch.long, device=self.device)
        token = torch.tensor(list(pending), dtype=torch.long, device=self.device)
        for _ in range(self.steps):
            token = self._step(token, buf, dlen)
        cut = dlen.clamp(max=self.gamma)
        phrases, valid = self.pool.lookup(buf[cut - 1].view(1), self.g)
        head = torch.stack([dlen, cut])
        flat = torch.cat([head, buf, valid[0].long(), phrases[0].flatten()]).tolist()  # the one read per cycle
        total, n = flat[0], flat[1]
        draft = flat[2:2 + n]
        off = 2 + buf.shape[0]
        ok = flat[off:off + self.g]
        rows = flat[off + self.g:]
        suffixes = [tuple(rows[i * self.n1:(i + 1) * self.n1]) for i in range(self.g) if ok[i]]
        # each step caches its pending tokens and accepted guesses: all drafted tokens but the last are cached now
        self.runner._n = prefix + len(pending) + total - 1
        self.runner.forward_time += time.perf_counter() - start
        return draft, suffixes, total
