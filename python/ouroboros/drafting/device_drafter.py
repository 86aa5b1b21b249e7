"""The drafting rule (:class:`ouroboros.drafting.base.Drafter`, SPEC §2 step 1) with everything on the device (SPEC §3).

The draft model runs on a :class:`~ouroboros.hf.static_runner.StaticRunner`, the pool is a :class:`GpuPhrasePool`, and each
draft forward has a fixed layout: S pending slots (the first forward of a phase: S = N + 1, enough for any tail a
verification leaves uncached; later forwards: S = 1, the bonus), of which the first ``p`` (a device count) are
valid, then the W window columns and G guess slots, each a chain of N-1 tokens off the last valid pending token. Pad
slots see only themselves and are never kept; an absent guess is an invalid chain that accepts nothing. Guesses,
acceptance, the window, the mined n-grams, the KV compaction, the growing draft and the stop rule all stay in device
tensors: a phase reads the host once (:meth:`DeviceDrafter.draft`: the draft, its length and the suffixes), or not at
all (:meth:`DeviceDrafter.draft_device`, for :mod:`ouroboros.decoding.device_cycle`, which reads once per whole cycle).

Without reading, the host cannot stop a phase early: a phase runs exactly ``budget(gamma)`` forwards, and once the
rule says stop (gamma tokens drafted, or EOS) the remaining ones are masked: they add no token, slide no window
column, insert no n-gram and commit no KV. So the drafted tokens, the window, the pool and the cache are those of a
host drafter, except that a phase whose budget binds ends short of gamma (a shorter draft; still lossless). The budget
is the forwards gamma tokens take at the yield seen so far in this generation (tokens per forward that ran live; 2
before any), at most gamma: it follows the cycle's adaptive gamma.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from ouroboros.core.buckets import bucket
from ouroboros.drafting.base import Draft, Drafter, YieldBudget
from ouroboros.drafting.gpu_pool import GpuPhrasePool
from ouroboros.drafting.window import initial_columns
from ouroboros.hf.static_runner import StaticRunner
from ouroboros_kernels import pack_mask

__all__ = ["DeviceDrafter", "DeviceDraft", "FixedTree"]


class FixedTree:
    """A fixed tree layout padded to a bucket: a stem of ``stem`` slots whose first ``v`` (1..stem) are valid, a
    causal chain, then ``chains`` chains of ``n1`` tokens hanging off the last valid stem node; pad slots see only
    themselves. Per ``v`` a row of depths (size,) and ancestor-or-self bits (size, size), indexed by ``v - 1``; with
    ``packed`` the bits are kept packed for the attention kernel (int32 (size, ceil(size/32)), packed once here).

    A draft forward is one (the pending tokens, then the window and guess chains); so is the device cycle's
    verification tree (the root and the draft trunk, then the suffix chains)."""

    def __init__(self, stem: int, chains: int, n1: int, device: torch.device, packed: bool = False) -> None:
        t = stem + chains * n1
        self.tokens, self.size, self.stem, self.n1 = t, bucket(t), stem, n1
        self.chain_nodes = (stem + torch.arange(chains * n1).view(chains, n1)).to(device)    # (C, N-1)
        depths = torch.zeros(stem, self.size, dtype=torch.long)
        bits = torch.eye(self.size, dtype=torch.bool).repeat(stem, 1, 1)
        for v in range(1, stem + 1):
            d, b = depths[v - 1], bits[v - 1]
            d[:stem] = torch.arange(stem)
            d[stem:t] = (v + torch.arange(n1)).repeat(chains)
            b[:v, :v] = torch.ones(v, v, dtype=torch.bool).tril()
            for c in range(chains):
                lo = stem + c * n1
                b[lo:lo + n1, :v] = True
                b[lo:lo + n1, lo:lo + n1] = torch.ones(n1, n1, dtype=torch.bool).tril()
        if packed:
            bits = torch.stack([pack_mask(b) for b in bits])
        self.depths, self.bits = depths.to(device), bits.to(device)

    def inputs(self, row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(depths (size,), bits) of row ``row`` = valid stem nodes - 1 (a device () count)."""
        i = row.view(1)
        return self.depths.index_select(0, i)[0], self.bits.index_select(0, i)[0]


class _Layout(FixedTree):
    """A draft forward: ``slots`` pending slots (the stem), then ``chains`` chains of ``n1`` tokens."""

    def __init__(self, slots: int, chains: int, n1: int, device: torch.device, packed: bool = False) -> None:
        super().__init__(slots, chains, n1, device, packed)
        self._ar = torch.arange(slots + n1, device=device)

    def keep(self, p: torch.Tensor, chain: torch.Tensor) -> torch.Tensor:
        """Node indices to keep, in order: the ``p`` valid pending slots, then chain ``chain``'s nodes ((slots+n1,);
        entries past ``p`` + the accepted count are never committed)."""
        ar = self._ar
        return torch.where(ar < p, ar, self.stem + chain * self.n1 + (ar - p)).clamp(max=self.size - 1)


@dataclass
class _DevicePhase:
    """One drafting phase's state: host facts, and device tensors that only a read brings back."""

    gamma: int | torch.Tensor   # a host int, or a device () count (the device cycle's adaptive gamma)
    start: float
    pending: torch.Tensor       # (S,) the next forward's pending tokens, the first p valid
    p: torch.Tensor             # () valid pending tokens
    buf: torch.Tensor           # (forwards * N,) the drafted tokens, valid below dlen
    dlen: torch.Tensor          # () tokens drafted
    live: torch.Tensor          # () bool: the rule lets the next forward count
    lived: torch.Tensor         # () forwards that counted
    forwards: int = 0           # forwards run
    x: list[int] | None = None  # host phases: the text


class DeviceDraft(NamedTuple):
    """A device phase's outcome, all device tensors (nothing read)."""

    buf: torch.Tensor           # (forwards * N,) drafted tokens, valid below dlen
    dlen: torch.Tensor          # () tokens drafted
    lived: torch.Tensor         # () forwards that counted
    cut: torch.Tensor           # () the draft's length: dlen cut to gamma and after the first EOS
    eos: torch.Tensor           # () bool: the draft holds EOS (then no suffixes)
    phrases: torch.Tensor       # (K, N-1) suffixes for the draft's last token
    valid: torch.Tensor         # (K,) bool


class DeviceDrafter(YieldBudget, Drafter):
    """Drafts on ``runner`` with ``pool``; owns the window (a device tensor) for one generation.

    ``ngram``, ``window``, ``guess_set``, ``topk``: N, W, G, K of SPEC §2 (W + G >= 1); ``context`` seeds the window
    (as :class:`~ouroboros.drafting.window.LookaheadWindow` does); ``eos``: the tokens that end drafting.
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
        self.slots = ngram + 1              # the longest tail a verification leaves uncached (SPEC §2, device cycle)
        self.device = dev = runner.device
        self.columns = torch.tensor(initial_columns(ngram, window, context, seed), dtype=torch.long,
                                    device=dev).view(window, self.n1)
        self._window_ok = torch.ones(window, dtype=torch.bool, device=dev)
        self._eos = torch.tensor(sorted(self.eos), dtype=torch.long, device=dev)
        self._pos = torch.arange(ngram, device=dev)
        self._layouts: dict[int, _Layout] = {}

    def restart(self, context: Sequence[int], seed: int = 0) -> None:
        """Start a new generation after ``context``: the window re-seeded (in place) and the yield forgotten."""
        if self.w:
            cols = initial_columns(self.n1 + 1, self.w, context, seed)
            self.columns.copy_(torch.tensor(cols, dtype=torch.long).view(self.w, self.n1))
        self.forget_yield()

    def _layout(self, slots: int) -> _Layout:
        if slots not in self._layouts:
            self._layouts[slots] = _Layout(slots, self.w + self.g, self.n1, self.device, self.runner.tree_kernel)
        return self._layouts[slots]

    def _phase(self, gamma, forwards: int, pending: torch.Tensor, p: torch.Tensor) -> _DevicePhase:
        dev, long = self.device, torch.long
        return _DevicePhase(gamma, time.perf_counter(), pending, p,
                            buf=torch.zeros(forwards * (self.n1 + 1), dtype=long, device=dev),
                            dlen=torch.zeros((), dtype=long, device=dev),
                            live=torch.ones((), dtype=torch.bool, device=dev),
                            lived=torch.zeros((), dtype=long, device=dev))

    def _begin(self, x: list[int], gamma: int, forwards: int) -> _DevicePhase:
        prefix = self.runner.n_cached
        if len(x) - prefix > self.slots:           # a longer uncached tail (host callers only): cache its head
            self.runner.prefill(x[prefix:len(x) - self.slots])
            prefix = len(x) - self.slots
        tail = x[prefix:]
        block = torch.tensor(tail + [0] * (self.slots - len(tail)) + [len(tail)], dtype=torch.long, device=self.device)
        ph = self._phase(gamma, forwards, block[:-1], block[-1])
        ph.x = x
        return ph

    def draft_device(self, seq: torch.Tensor, seq_len: torch.Tensor, gamma: torch.Tensor, forwards: int) -> DeviceDraft:
        """One phase after the text ``seq[:seq_len]`` (device buffer and count; the runner's cache holds a prefix of
        it, leaving at most N + 1 tokens uncached) aiming at ``gamma`` (a device count), in exactly ``forwards``
        forwards; device ops only, nothing read. Afterwards the cache holds the text and the drafted tokens but the
        last; the caller must :meth:`observe` the yield it reads."""
        idx = (self.runner.cache.length + torch.arange(self.slots, device=self.device)).clamp(max=seq.shape[0] - 1)
        ph = self._phase(gamma, forwards, seq.index_select(0, idx), seq_len - self.runner.cache.length)
        for _ in range(forwards):
            self._forward(ph)
        return self._outcome(ph)

    def _forward(self, ph: _DevicePhase) -> bool:
        """One draft forward by the rule, masked once the rule says stop. Device ops only: no host read."""
        lay = self._layout(ph.pending.shape[0])
        depths, bits = lay.inputs(ph.p - 1)
        chains, ok = self.columns, self._window_ok
        last = ph.pending.index_select(0, ph.p.view(1) - 1)                          # (1,) the root token
        if self.g:
            key = torch.where(ph.live, last, -1)                                     # -1: no lookup once stopped
            guesses, valid = self.pool.lookup(key, self.g)                           # (1, G, N-1), (1, G)
            chains, ok = torch.cat([chains, guesses[0]]), torch.cat([ok, valid[0]])  # (C, N-1), (C,)
        ids = F.pad(torch.cat([ph.pending, chains.flatten()]), (0, lay.size - lay.tokens)).view(1, -1)
        argmax = self.runner.forward_device(ids, depths, bits)
        ph.forwards += 1
        root = argmax.index_select(0, ph.p.view(1) - 1)
        after = torch.cat([root.expand(chains.shape[0], 1), argmax[lay.chain_nodes]], dim=1)   # argmax after 0..N-1 tokens
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
            self.columns.copy_(torch.where(live, slid, self.columns))     # in place: a captured graph's state
        # keep the pending entries and the accepted chain's; the bonus is the next pending token
        self.runner.commit_device(lay.keep(ph.p, best[0]), torch.where(live, ph.p + m[0], 0))
        ph.pending, ph.p = bonus, torch.ones_like(ph.p)
        return True

    def _outcome(self, ph: _DevicePhase) -> DeviceDraft:
        """The phase's draft cut to gamma and after its first EOS, and the suffixes for its last token (device)."""
        n = ph.buf.shape[0]
        cut = ph.dlen.clamp(max=ph.gamma)
        has_eos = torch.zeros((), dtype=torch.bool, device=self.device)
        if self.eos:
            hits = torch.isin(ph.buf, self._eos) & (torch.arange(n, device=self.device) < cut)
            has_eos = hits.any()
            cut = torch.where(has_eos, hits.long().argmax() + 1, cut)
        if self.topk:                    # a draft holding EOS gets no suffixes: key -1 looks up nothing
            key = torch.where(has_eos, -1, ph.buf.index_select(0, (cut - 1).view(1)))
            phrases, valid = self.pool.lookup(key, self.topk)
            phrases, valid = phrases[0], valid[0]
        else:
            phrases = torch.zeros(0, self.n1, dtype=torch.long, device=self.device)
            valid = torch.zeros(0, dtype=torch.bool, device=self.device)
        return DeviceDraft(ph.buf, ph.dlen, ph.lived, cut, has_eos, phrases, valid)

    def _end(self, ph: _DevicePhase) -> Draft:
        """The phase's one host read: the drafted tokens, and the suffixes for the cut draft's last token."""
        out = self._outcome(ph)
        n = out.buf.shape[0]
        block = torch.cat([out.dlen.view(1), out.lived.view(1), out.buf, out.valid.long(),
                           out.phrases.flatten()]).tolist()                 # the one read per phase
        drafted, lived = block[0], block[1]
        tokens, ok, rows = block[2:2 + drafted], block[2 + n:2 + n + self.topk], block[2 + n + self.topk:]
        suffixes = [tuple(rows[i * self.n1:(i + 1) * self.n1]) for i in range(self.topk) if ok[i]]
        # each live forward cached its pending tokens and accepted chain: every drafted token but the last
        self.runner._n = len(ph.x) + drafted - 1
        self.runner.forward_time += time.perf_counter() - ph.start
        self.observe(drafted, lived)
        return Draft(self._cut(tokens, ph.gamma), ph.x + tokens, suffixes, ph.forwards, drafted, drafted - lived)
