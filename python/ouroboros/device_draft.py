"""The drafting rule (:class:`ouroboros.engine.Drafter`, SPEC §2 step 1) with everything on the device (SPEC §3).

The draft model runs on a :class:`~ouroboros.static.StaticRunner`, the pool is a :class:`GpuPhrasePool`, and each
draft forward has a fixed layout: the pending token(s), then the W window columns and G guess slots, each a chain of
N-1 tokens off the last pending token (an absent guess is an invalid slot that accepts nothing). Guesses,
acceptance, the window, the mined n-grams, the KV compaction, the growing draft and the stop rule all stay in device
tensors: the host reads one block per phase (the draft, its length and the suffixes to verify after it).

Without reading, the host cannot stop a phase early: a phase runs exactly ``budget(gamma)`` forwards, and once the
rule says stop (gamma tokens drafted, or EOS) the remaining ones are masked: they add no token, slide no window
column, insert no n-gram and commit no KV. So the drafted tokens, the window, the pool and the cache are those of a
host drafter, except that a phase whose budget binds ends short of gamma (a shorter draft; still lossless). The budget
is the forwards gamma tokens take at the yield seen so far in this generation (tokens per forward that ran live; 2
before any), at most gamma: it follows the cycle's adaptive gamma.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .engine import Draft, Drafter, initial_columns
from .gpu_pool import GpuPhrasePool
from .static import StaticRunner, _bucket

__all__ = ["DeviceDrafter"]


class _Layout:
    """Depths, ancestor bits and chain node indices of ``pending`` tokens + ``chains`` chains of ``n1`` tokens."""

    def __init__(self, pending: int, chains: int, n1: int, device: torch.device) -> None:
        t = pending + chains * n1
        self.tokens, self.size, self.pending = t, _bucket(t), pending
        self.pending_nodes = torch.arange(pending, device=device)                          # (P,)
        self.nodes = (pending + torch.arange(chains * n1).view(chains, n1)).to(device)     # (C, N-1)
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


@dataclass
class _DevicePhase:
    """One drafting phase's state: host facts, and device tensors that only the final read brings back."""

    x: list[int]
    gamma: int
    prefix: int                 # tokens cached when the phase began
    n_pending: int              # host tokens pending then
    start: float
    pending: torch.Tensor       # (P,) the next forward's pending tokens
    buf: torch.Tensor           # (forwards * N,) the drafted tokens, valid below dlen
    dlen: torch.Tensor          # () tokens drafted
    live: torch.Tensor          # () bool: the rule lets the next forward count
    lived: torch.Tensor         # () forwards that counted
    forwards: int = 0           # forwards run


class DeviceDrafter(Drafter):
    """Drafts on ``runner`` with ``pool``; owns the window (a device tensor) for one generation.

    ``ngram``, ``window``, ``guess_set``, ``topk``: N, W, G, K of SPEC §2 (W + G >= 1); ``context`` seeds the window
    (as :class:`~ouroboros.engine.LookaheadWindow` does); ``eos``: the tokens that end drafting.
    """

    def __init__(self, runner: StaticRunner, pool: GpuPhrasePool, ngram: int, window: int, guess_set: int,
                 context: Sequence[int], *, topk: int = 0, eos: frozenset[int] = frozenset(), seed: int = 0) -> None:
        if not isinstance(runner, StaticRunner):
            raise ValueError(f"device drafting needs a StaticRunner, got {type(runner).__name__}")
        if not isinstance(pool, GpuPhrasePool):
            raise ValueError(f"device drafting needs a GpuPhrasePool, got {type(pool).__name__}")
        if pool.ngram != ngram:
            raise ValueError(f"the pool holds {pool.ngram}-grams but ngram={ngram}")
        if window + guess_set < 1:
            raise ValueError(f"device drafting needs window + guess_set >= 1, got {window} + {guess_set}")
        self.runner, self.pool, self.eos = runner, pool, frozenset(eos)
        self.n1, self.w, self.g, self.topk = ngram - 1, window, guess_set, topk
        self.device = dev = runner.device
        self.columns = torch.tensor(initial_columns(ngram, window, context, seed), dtype=torch.long,
                                    device=dev).view(window, self.n1)
        self._window_ok = torch.ones(window, dtype=torch.bool, device=dev)
        self._eos = torch.tensor(sorted(self.eos), dtype=torch.long, device=dev)
        self._pos = torch.arange(ngram, device=dev)
        self._layouts: dict[int, _Layout] = {}
        self._drafted = self._lived = 0          # the yield so far (host ints, from the phase reads)

    def budget(self, gamma: int) -> int:
        """The forwards ``gamma`` tokens take at the yield so far (tokens per live forward; 2 before any phase),
        between 1 and gamma."""
        rate = (self._drafted + 2) / (self._lived + 1)
        return max(1, min(gamma, math.ceil(gamma / rate)))

    def _layout(self, pending: int) -> _Layout:
        if pending not in self._layouts:
            self._layouts[pending] = _Layout(pending, self.w + self.g, self.n1, self.device)
        return self._layouts[pending]

    def _begin(self, x: list[int], gamma: int, forwards: int) -> _DevicePhase:
        prefix = self.runner.n_cached
        dev, long = self.device, torch.long
        return _DevicePhase(x, gamma, prefix, len(x) - prefix, time.perf_counter(),
                            pending=torch.tensor(x[prefix:], dtype=long, device=dev),
                            buf=torch.zeros(forwards * (self.n1 + 1), dtype=long, device=dev),
                            dlen=torch.zeros((), dtype=long, device=dev),
                            live=torch.ones((), dtype=torch.bool, device=dev),
                            lived=torch.zeros((), dtype=long, device=dev))

    def _forward(self, ph: _DevicePhase) -> bool:
        """One draft forward by the rule, masked once the rule says stop. Device ops only: no host read."""
        lay = self._layout(ph.pending.shape[0])
        chains, ok = self.columns, self._window_ok
        if self.g:
            key = torch.where(ph.live, ph.pending[-1:], -1)                         # -1: no lookup once stopped
            guesses, valid = self.pool.lookup(key, self.g)                           # (1, G, N-1), (1, G)
            chains, ok = torch.cat([chains, guesses[0]]), torch.cat([ok, valid[0]])  # (C, N-1), (C,)
        ids = F.pad(torch.cat([ph.pending, chains.flatten()]), (0, lay.size - lay.tokens)).view(1, -1)
        argmax = self.runner.forward_device(ids, lay.depths, lay.bits)
        ph.forwards += 1
        root = argmax[lay.pending - 1:lay.pending]
        after = torch.cat([root.expand(chains.shape[0], 1), argmax[lay.nodes]], dim=1)   # argmax after 0..N-1 tokens
        accepted = ((chains == after[:, :-1]) & ok[:, None]).long().cumprod(1).sum(1)    # (C,)
        best = accepted.argmax().view(1)                                                # the first longest chain
        m = accepted.index_select(0, best)                                              # (1,)
        bonus = after.index_select(0, best)[0].gather(0, m)                             # (1,)
        emitted = torch.where(self._pos < m, F.pad(chains.index_select(0, best)[0], (0, 1)), bonus)   # (N,)
        live = ph.live
        ph.buf.index_copy_(0, ph.dlen + self._pos, emitted)     # past the drafted length when not live: never read
        ph.dlen += torch.where(live, m[0] + 1, 0)
        ph.lived += live
        ph.live = live & (ph.dlen < ph.gamma)
        if self.eos:
            ph.live &= ~(torch.isin(emitted, self._eos) & (self._pos <= m)).any()
        if self.w:        # the window slides one level; its columns become n-grams in the pool (-1 keys: skipped)
            slid = torch.cat([self.columns[:, 1:], after[:self.w, -1:]], dim=1)
            self.pool.insert_many(torch.where(live, self.columns[:, 0], -1), slid)
            self.columns = torch.where(live, slid, self.columns)
        # keep the pending entries and the accepted chain's; the bonus is the next pending token
        src = torch.cat([lay.pending_nodes, lay.nodes.index_select(0, best)[0]])
        self.runner.commit_device(src, torch.where(live, lay.pending + m[0], 0))
        ph.pending = bonus
        return True

    def _end(self, ph: _DevicePhase) -> Draft:
        """The phase's one host read: the drafted tokens, and the suffixes for the cut draft's last token."""
        n = ph.buf.shape[0]
        parts = [ph.dlen.view(1), ph.lived.view(1), ph.buf]
        if self.topk:
            cut = ph.dlen.clamp(max=ph.gamma)
            key = ph.buf.index_select(0, (cut - 1).view(1))
            if self.eos:                 # a draft holding EOS gets no suffixes: key -1 looks up nothing
                in_draft = torch.arange(n, device=self.device) < cut
                key = torch.where((torch.isin(ph.buf, self._eos) & in_draft).any(), -1, key)
            phrases, valid = self.pool.lookup(key, self.topk)
            parts += [valid[0].long(), phrases[0].flatten()]
        block = torch.cat(parts).tolist()                              # the one read per phase
        drafted, lived = block[0], block[1]
        tokens, ok, rows = block[2:2 + drafted], block[2 + n:2 + n + self.topk], block[2 + n + self.topk:]
        suffixes = [tuple(rows[i * self.n1:(i + 1) * self.n1]) for i in range(self.topk) if ok[i]]
        # each live forward cached its pending tokens and accepted chain: every drafted token but the last
        self.runner._n = ph.prefix + ph.n_pending + drafted - 1
        self.runner.forward_time += time.perf_counter() - ph.start
        self._drafted += drafted
        self._lived += lived
        return Draft(self._cut(tokens, ph.gamma), ph.x + tokens, suffixes, ph.forwards, drafted, drafted - lived)
