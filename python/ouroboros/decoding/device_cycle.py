"""The whole greedy Ouroboros cycle on the device (SPEC §3 "The device cycle"): one graph per cycle, one read.

A cycle is steps 1-4 of SPEC §2 as device ops on fixed shapes: the drafting phase
(:meth:`DeviceDrafter.draft_device`), the target's verification tree, acceptance, KV compaction, draft rollback,
the pool's updates, adaptive gamma and the output. Every piece of state lives in device tensors updated in place:

- ``seq`` / ``seq_len``: the text so far (the output ring: a new cycle's tokens are written after it), ``left`` the
  tokens still allowed, ``gamma`` the adaptive draft length;
- the runners' KV caches and their device lengths (target: the text but its last token; draft: a prefix of it that
  leaves at most N + 1 tokens uncached), the pool, the draft window.

Verification tree (fixed layout, padded to a bucket): node 0 the last token, nodes ``1..Gcap`` the draft trunk (the
first ``cut`` valid; Gcap = the adaptive maximum of gamma), then K suffix chains of N-1 tokens off the trunk's tip
(valid as the pool returned them). Pad nodes see only themselves and are never kept. Acceptance is the trie walk as
tensor ops: a trunk node matches when it is valid and its token is the target's argmax at its parent; the trunk
accepts the leading run of matches; when the whole trunk is accepted the suffixes are walked the same way from the
tip and the first longest wins; the bonus is the argmax after the path. Every emitted token is the target's own
greedy choice given the true prefix: lossless.

The host's part per cycle: choose the draft forwards (``budget(gamma)`` from the last read), run the cycle (on CUDA a
replay of the graph captured for that forward count; elsewhere the same code eagerly), and read one small block
(the new tokens, the done flag, gamma and the counters; on CUDA through a pinned buffer). Nothing is uploaded.
"""
from __future__ import annotations

import time
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from ouroboros.core.config import DecodeConfig
from ouroboros.decoding.cycle_graphs import CycleGraphs
from ouroboros.decoding.device_recycle import DeviceRecycler
from ouroboros.decoding.stats import count_cycle
from ouroboros.drafting.device_drafter import DeviceDrafter, FixedTree
from ouroboros.drafting.gpu_pool import GpuPhrasePool
from ouroboros.hf.static_runner import StaticRunner

__all__ = ["DeviceCycle", "VerifyLayout", "BLOCK_FIELDS"]

# the block read once per cycle: these counts, then the emitted tokens
BLOCK_FIELDS = ("emitted", "done", "trunk_accepted", "branch_accepted", "draft_len", "drafted", "lived", "gamma",
                "suffixes", "verified", "recycled")


class VerifyLayout(FixedTree):
    """The verification tree's fixed layout: the root and ``gcap`` trunk slots (the stem), then ``k`` suffix chains
    of ``n1`` tokens; its rows are indexed by the trunk length ``cut`` (0..gcap): ``inputs(cut)``."""

    def __init__(self, gcap: int, k: int, n1: int, device: torch.device, packed: bool) -> None:
        super().__init__(1 + gcap, k, n1, device, packed)
        self.suffix_nodes = self.chain_nodes                                             # (K, N-1)


class DeviceCycle:
    """Greedy Ouroboros on ``target`` / ``draft`` static runners with a device ``pool`` (see the module docstring).

    One object serves many generations (:meth:`generate`) on the same runners and settings, so the graphs it captures
    (one per draft-forward count) are reused. It cycles on a pool of its own with ``pool``'s layout; a generation
    copies the caller's pool in and back out (device copies), so any pool of that layout, fresh or warm, is served by
    the same graphs. ``use_graphs``: capture whole cycles (default: on CUDA).
    """

    def __init__(self, target: StaticRunner, draft: StaticRunner, pool: GpuPhrasePool, cfg: DecodeConfig,
                 eos: frozenset[int], use_graphs: bool | None = None) -> None:
        for name, r in (("target", target), ("draft", draft)):
            if not isinstance(r, StaticRunner):
                raise ValueError(f"the device cycle needs a StaticRunner for the {name}, got {type(r).__name__}")
        if not isinstance(pool, GpuPhrasePool):
            raise ValueError(f"the device cycle needs a GpuPhrasePool, got {type(pool).__name__}")
        if target.device != draft.device or pool.device != target.device:
            raise ValueError(f"target ({target.device}), draft ({draft.device}) and pool ({pool.device}) must share "
                             "one device")
        self.tgt, self.drf, self.cfg, self.eos = target, draft, cfg, frozenset(eos)
        self.pool = pool.empty_like()                           # the cycle's own: its storage never changes
        self.device = dev = target.device
        self.drafter = DeviceDrafter(draft, self.pool, cfg.ngram, cfg.window, cfg.guess_set, [0], topk=cfg.topk, eos=eos)
        n1 = cfg.ngram - 1
        self.layout = VerifyLayout(cfg.max_gamma, cfg.topk, n1, dev, target.tree_kernel)
        self.emax = cfg.max_gamma + n1 + 1                      # the most tokens a cycle emits
        self.recycler = DeviceRecycler(cfg.recycle, n1, pool.vocab_size, dev) if cfg.recycle else None
        self.block_len = len(BLOCK_FIELDS) + self.emax
        long = torch.long
        self.seq = torch.zeros(0, dtype=long, device=dev)      # sized per generation (grown, never shrunk)
        self.seq_len = torch.zeros((), dtype=long, device=dev)
        self.left = torch.zeros((), dtype=long, device=dev)
        self.gamma = torch.zeros((), dtype=long, device=dev)
        self._eos = torch.tensor(sorted(self.eos), dtype=long, device=dev)
        self._ar_g = torch.arange(cfg.max_gamma, device=dev)
        self._ar_e = torch.arange(self.emax, device=dev)
        self._ar_n = torch.arange(n1, device=dev)
        # (draft forwards, forced?) -> the captured cycle
        self.graphs = CycleGraphs(dev, (dev.type == "cuda") if use_graphs is None else use_graphs, (target, draft))
        self._forced: torch.Tensor | None = None                # replay: (cycles, 3) recorded cut, trunk, branch
        self._forced_buf = torch.zeros(0, 3, dtype=long, device=dev)   # its storage (graphs read it: grown only)
        self._forced_at = torch.zeros((), dtype=long, device=dev)
        self._state: tuple = ()                                # data pointers the captured graphs read

    def fits(self, target, draft, pool, cfg: DecodeConfig, eos: frozenset[int]) -> bool:
        """True if this cycle serves a generation with these runners, settings and a pool of its layout."""
        return (target is self.tgt and draft is self.drf and self.pool.same_layout(pool) and cfg == self.cfg
                and frozenset(eos) == self.eos)

    # ---- the cycle: device ops only -------------------------------------------------------------------------------
    def _cycle(self, forwards: int) -> torch.Tensor:
        """One cycle with ``forwards`` draft forwards; returns the block (BLOCK_FIELDS + emitted tokens)."""
        cfg, lay = self.cfg, self.layout
        seq, seq_len, old_len = self.seq, self.seq_len, self.seq_len.clone()
        d = self.drafter.draft_device(seq, seq_len, self.gamma, forwards)        # step 1: the draft (+ suffixes)
        row = None
        if self._forced is not None:                                               # replay: the recorded cycle
            row = self._forced.index_select(0, self._forced_at.view(1))[0]
            self._forced_at.add_(1)
        cut = d.cut if row is None else row[0]
        # step 2-3: root + trunk slots + suffix chains, one target forward
        root = seq.index_select(0, (seq_len - 1).view(1))
        trunk = torch.where(self._ar_g < cut, F.pad(d.buf, (0, max(0, cfg.max_gamma - d.buf.shape[0])))[:cfg.max_gamma],
                            0)
        ids = F.pad(torch.cat([root, trunk, d.phrases.flatten()]), (0, lay.size - lay.tokens))
        out = self.tgt.forward_device(ids.view(1, -1), *lay.inputs(cut), logits=self.recycler is not None)
        am = out if self.recycler is None else out.argmax(-1)                     # (size,) argmax
        a, b, path = self._accept(ids, am, trunk, cut, d, row)
        length = a + b
        last = torch.where(length > 0, path.index_select(0, (length - 1).clamp(min=0).view(1)), 0)
        emitted = torch.where(self._ar_e < length, ids[path], am.index_select(0, last.view(1)))   # path, then bonus
        # stop: EOS among the emitted, or no tokens left
        count = torch.minimum(length + 1, self.left)
        done = count >= self.left
        if self.eos:
            hits = torch.isin(emitted, self._eos) & (self._ar_e < count)
            done = done | hits.any()
            count = torch.where(hits.any(), hits.long().argmax() + 1, count)
        # target KV: keep the root and the accepted path
        self.tgt.commit_device(torch.cat([torch.zeros(1, dtype=torch.long, device=self.device), path]), 1 + length)
        self._mine(ids, am, trunk, a, cut, d)                                      # step 4
        recycled = self._recycle(ids, am, out, cut, d, path, length)
        # the output: the text grows by ``count`` tokens, and the pool learns its n-grams
        seq.index_copy_(0, seq_len + self._ar_e, emitted)
        seq_len.add_(count)
        self.left.sub_(count)
        self._learn_text(old_len, count)
        # draft rollback: keep what agrees with the new text (and leave its last token uncached)
        n = min(d.buf.shape[0], self.emax)
        agree = ((d.buf[:n] == emitted[:n]) & (self._ar_e[:n] < d.dlen) & (self._ar_e[:n] < count)).long()
        keep = torch.minimum(old_len + torch.minimum(agree.cumprod(0).sum(), count - 1), self.drf.cache.length)
        if row is not None:               # replay: the draft is taken to have drafted what was kept (junk KV)
            keep = old_len + count - 1
        self.drf.cache.length.copy_(keep)
        if cfg.adaptive:                  # adaptive gamma: +2 after a fully accepted draft, -1 after a rejection
            self.gamma.copy_(torch.where(a == cut, (self.gamma + 2).clamp(max=cfg.max_gamma),
                                         (self.gamma - 1).clamp(min=1)))
        counts = torch.stack([count, done.long(), a, b, cut, d.dlen, d.lived, self.gamma, d.valid.long().sum(),
                              length + 1, recycled])
        return torch.cat([counts, emitted])

    def _accept(self, ids, am, trunk, cut, d, row):
        """The trie walk as tensor ops: (trunk tokens accepted, suffix tokens accepted, the accepted nodes first in
        an (Emax,) vector). The trunk accepts its leading run of tokens equal to the argmax at their parent (trunk
        node j's parent is node j); a wholly accepted trunk is followed by the first longest matching suffix, whose
        first node hangs off the tip (node ``cut``). ``row``: a replayed record forcing (cut, trunk, suffix)."""
        cfg, lay, n1 = self.cfg, self.layout, self.cfg.ngram - 1
        a = ((trunk == am[:cfg.max_gamma]) & (self._ar_g < cut)).long().cumprod(0).sum()
        b = torch.zeros_like(a)
        branch = torch.zeros(n1, dtype=torch.long, device=self.device)
        if cfg.topk:
            match = (d.phrases == self._suffix_parents(am, cut)) & d.valid[:, None] & (a == cut)
            s = match.long().cumprod(1).sum(1)
            best = s.argmax().view(1)                     # index_select: indexing with a 0-dim tensor reads it
            b, branch = s.index_select(0, best)[0], lay.suffix_nodes.index_select(0, best)[0]
        if row is not None:
            a, b = row[1], row[2]
            branch = lay.suffix_nodes[0] if cfg.topk else branch
        path = torch.where(self._ar_e < a, 1 + self._ar_e, branch[(self._ar_e - a).clamp(0, n1 - 1)])
        return a, b, torch.where(self._ar_e < a + b, path, 0)

    def _suffix_parents(self, am: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
        """(K, N-1): the target's argmax before each suffix token (the tip's, then the chain's own)."""
        tip = am.index_select(0, cut.view(1)).expand(self.cfg.topk, 1)
        return torch.cat([tip, am[self.layout.suffix_nodes[:, :-1]]], dim=1)

    def _mine(self, ids, am, trunk, a, cut, d) -> None:
        """Phrases from verification (the engine's ``mine_verification`` as fixed batches; -1 keys are skipped):
        the target's argmax run after each rejected draft position, and each verified suffix rewritten as the
        target's own prediction."""
        n1, j = self.cfg.ngram - 1, self._ar_g
        miss = (j >= a) & (j + n1 <= cut)
        self.pool.insert_many(torch.where(miss, trunk, -1),
                              am[(1 + j[:, None] + self._ar_n).clamp(max=self.layout.size - 1)])
        if self.cfg.topk:
            key = torch.where(d.valid, ids.index_select(0, cut.view(1)), -1)
            self.pool.replace_many(key, d.phrases, self._suffix_parents(am, cut))

    def _recycle(self, ids, am, logits, cut, d, path, length) -> torch.Tensor:
        """Top-k recycling (:mod:`ouroboros.decoding.device_recycle`) of this verification: the real nodes are the
        root, the ``cut`` trunk nodes and the filled suffixes; the verified ones the root and the accepted path.
        Returns the phrases inserted (0 without recycling)."""
        if self.recycler is None:
            return torch.zeros((), dtype=torch.long, device=self.device)
        n1, lay = self.cfg.ngram - 1, self.layout
        valid = torch.cat([torch.ones(1, dtype=torch.bool, device=self.device), self._ar_g < cut,
                           d.valid.repeat_interleave(n1)])
        valid = F.pad(valid, (0, lay.size - valid.shape[0]))
        nodes = torch.cat([torch.zeros(1, dtype=torch.long, device=self.device), path])
        verified = torch.cat([torch.ones(1, dtype=torch.bool, device=self.device), self._ar_e < length])
        top = logits.topk(self.recycler.k + 1, dim=-1).indices
        return self.recycler.step(self.pool, ids, am, top, valid, nodes, verified)

    def _learn_text(self, old_len: torch.Tensor, count: torch.Tensor) -> None:
        """The new text's own n-grams into the pool, as the host engine inserts them (key x[i], phrase
        x[i+1 : i+N], for every i whose phrase ends in the ``count`` new tokens)."""
        n1, seq = self.cfg.ngram - 1, self.seq
        i = old_len - n1 + self._ar_e
        ok = (self._ar_e < count) & (i >= 0)
        grams = seq[(i[:, None] + 1 + self._ar_n).clamp(0, seq.shape[0] - 1)]
        self.pool.insert_many(torch.where(ok, seq[i.clamp(min=0)], -1), grams)

    # ---- the host loop -----------------------------------------------------------------------------------------
    @property
    def use_graphs(self) -> bool:
        return self.graphs.use_graphs

    @property
    def cycles_replayed(self) -> int:
        return self.graphs.replayed

    def _run(self, forwards: int) -> list[int]:
        """Run one cycle (a graph replay when captured) and read its block: the cycle's one host read."""
        return self.graphs.run((forwards, self._forced is not None), lambda: self._cycle(forwards))

    def _start(self, prompt: Sequence[int], max_new_tokens: int) -> None:
        """Load a generation: the state tensors in place (the captured graphs read them), the caches prefilled."""
        size = len(prompt) + max_new_tokens + self.emax + 1
        if self.seq.shape[0] < size:
            self.seq = torch.zeros(max(size, 2 * self.seq.shape[0]), dtype=torch.long, device=self.device)
        self.seq[:len(prompt)] = torch.tensor(list(prompt), dtype=torch.long).to(self.device)
        self.seq_len.fill_(len(prompt))
        self.left.fill_(max_new_tokens)
        self.gamma.fill_(self.cfg.gamma)
        for r in (self.tgt, self.drf):
            r.prefill(list(prompt[:-1]))
        self.drafter.restart(prompt)
        self.pool.seed_from(self.seq[:len(prompt)])
        if self.recycler is not None:
            self.recycler.reset()
        scores = self.pool.scores                                                  # a scored pool's counts
        state = (self.seq.data_ptr(), *(t.data_ptr() for t in self.pool.tensors),
                 *(() if scores is None else (scores.data_ptr(),)),
                 *(t.data_ptr() for r in (self.tgt, self.drf) if r.cache.stacked for t in r.cache.stacked))
        if state != self._state:                # a buffer the captured graphs read was replaced (grown, cleared)
            self.graphs.clear()
            self._state = state

    @torch.inference_mode()
    def replay(self, prompt: Sequence[int], trace: Sequence[dict], stats=None) -> int:
        """Run the recorded cycles of ``trace`` (entries of ``GenerationStats.trace``: ``draft_forwards``,
        ``draft_len``, ``accepted``) on this cycle's models, with acceptance FORCED to the record: each cycle drafts
        with the recorded forwards, verifies a trunk of the recorded length and keeps the recorded number of tokens
        (trunk first, then the first suffix), whatever the models predict. The same kernels and the same single read
        per cycle as a live generation (a benchmark of a real acceptance on random weights); returns the tokens
        accepted. The runners start empty; the records are uploaded once, before the first cycle."""
        n1 = self.cfg.ngram - 1
        rows = []
        for c in trace:
            cut = max(0, min(int(c["draft_len"]), self.cfg.max_gamma))
            kept = max(0, min(int(c["accepted"]) - 1, cut + (n1 if self.cfg.topk else 0)))
            rows.append([cut, min(kept, cut), kept - min(kept, cut)])
        total = sum(int(c["accepted"]) for c in trace)
        for r in (self.tgt, self.drf):
            r.reset()
        rows = torch.tensor(rows or [[0, 0, 0]], dtype=torch.long)
        if self._forced_buf.shape[0] < rows.shape[0]:
            self._forced_buf = torch.zeros(max(rows.shape[0], 2 * self._forced_buf.shape[0]), 3, dtype=torch.long,
                                           device=self.device)
            self.graphs.clear(keep=lambda k: not k[1])                               # they read the old buffer
        self._forced_buf[:rows.shape[0]].copy_(rows)
        self._forced = self._forced_buf
        self._forced_at.zero_()
        self.pool.clear()
        try:
            steps = self.generate(prompt, total + 1, stats,
                                  forwards=[max(1, int(c["draft_forwards"])) for c in trace])
            return sum(len(new) for new in steps)
        finally:
            self._forced = None

    def generate(self, prompt: Sequence[int], max_new_tokens: int, stats=None,
                 forwards: Sequence[int] | None = None, pool: GpuPhrasePool | None = None) -> Iterator[list[int]]:
        """Yield the emitted tokens cycle by cycle until EOS or ``max_new_tokens`` (runners reset and empty).
        ``forwards``: the draft forwards of each cycle, and so the number of cycles (replay; default: the drafter's
        budget for the current gamma, until done). ``pool``: the phrases to start from, and where they are left
        afterwards (its layout must be the cycle's; None: the cycle's own pool as it is)."""
        if pool is not None and not self.pool.same_layout(pool):
            raise ValueError("the pool's layout (ngram, guess_set, key cap, vocabulary, device) is not this cycle's")
        need = len(prompt) + max_new_tokens + self.layout.size
        if need > self.tgt.cache.max_len or need + self.drafter.slots + self.emax > self.drf.cache.max_len:
            raise ValueError(f"the static caches ({self.tgt.cache.max_len}, {self.drf.cache.max_len} slots) are too "
                             f"small for {len(prompt)} + {max_new_tokens} tokens")
        t0 = time.perf_counter()
        if pool is not None:
            self.pool.copy_(pool)
        try:
            yield from self._loop(prompt, max_new_tokens, stats, forwards, t0)
        finally:
            if pool is not None:
                pool.copy_(self.pool)

    def _loop(self, prompt, max_new_tokens, stats, forwards, t0) -> Iterator[list[int]]:
        self._start(prompt, max_new_tokens)
        gamma, produced = self.cfg.gamma, 0
        if stats is not None:
            stats.time_prefill = time.perf_counter() - t0
        for k in range(len(forwards) if forwards is not None else 1 << 62):
            f = self.drafter.budget(gamma) if forwards is None else forwards[k]
            block = self._run(f)
            c = dict(zip(BLOCK_FIELDS, block))
            new = block[len(BLOCK_FIELDS):len(BLOCK_FIELDS) + c["emitted"]]
            self.drafter.observe(c["drafted"], c["lived"])
            if stats is not None:
                count_cycle(stats, c, f, gamma, self.cfg.ngram - 1)
            gamma = c["gamma"]
            produced += len(new)
            if stats is not None:
                stats.tokens = produced
                stats.time_total = time.perf_counter() - t0
            yield new
            if c["done"]:
                break

