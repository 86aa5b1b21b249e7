"""The greedy Ouroboros cycle on the device for B rows at once (SPEC §6): one graph and one read per cycle.

:class:`BatchDeviceCycle` is :class:`~ouroboros.decoding.device_cycle.DeviceCycle` with a batch dimension: every
piece of state is a (B, ...) device tensor (the texts, lengths, tokens left, adaptive gammas, an ``active`` flag per
row) and every forward carries all rows: the drafting phase (:class:`BatchDeviceDrafter`, one draft forward per step
for all rows) and one target forward verifying every row's tree, each row's fixed-layout tree at its own KV length
with its own mask and positions. Acceptance, KV compaction, draft rollback, the pool's updates and the output are
per row, as tensor ops. A row that ends (EOS or its token limit) is masked from then on: its slot does no work that
counts (no token, no KV advance, no pool write). Every row's tokens are the target's own greedy choices given that
row's true prefix: each row is lossless (up to the float rounding of a batched forward).

All rows share one pool. A cycle's pool writes (phrases from verification, then the new text's n-grams) are batched
in row order after the cycle's verification, so runs are deterministic. The host's part per cycle: choose the draft
forwards (from the rows' gammas of the last read), run the cycle (on CUDA a graph replay), and read one block of
``B * (len(ROW_FIELDS) + Emax)`` ints. Nothing is uploaded.
"""
from __future__ import annotations

import time
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from ouroboros.core.config import DecodeConfig
from ouroboros.decoding.cycle_graphs import CycleGraphs
from ouroboros.decoding.stats import GenerationStats, count_cycle
from ouroboros.drafting.batch_device_drafter import (
    BatchDeviceDrafter,
    BatchDraft,
    RowLayout,
)
from ouroboros.drafting.gpu_pool import GpuPhrasePool
from ouroboros.hf.batch_static_runner import BatchStaticRunner

__all__ = ["BatchDeviceCycle", "ROW_FIELDS"]

# per row in the block read once per cycle: these counts, then the emitted tokens
ROW_FIELDS = ("emitted", "done", "trunk_accepted", "branch_accepted", "draft_len", "drafted", "lived", "gamma",
              "suffixes", "verified")


class BatchDeviceCycle:
    """Greedy Ouroboros for B rows on batched ``target`` / ``draft`` runners and one device ``pool``.

    One object serves many batch generations of B rows with the same settings (:meth:`generate`), so its captured
    graphs (one per draft-forward count) are reused; a generation copies the caller's pool in and back out.
    Configurations with a Jacobi window (W > 0) or no guesses (G = 0) are refused: they run on the host loop."""

    def __init__(self, target: BatchStaticRunner, draft: BatchStaticRunner, pool: GpuPhrasePool, cfg: DecodeConfig,
                 eos: frozenset[int], use_graphs: bool | None = None) -> None:
        for name, r in (("target", target), ("draft", draft)):
            if not isinstance(r, BatchStaticRunner):
                raise ValueError(f"the batched device cycle needs a BatchStaticRunner for the {name}, got "
                                 f"{type(r).__name__}")
        if target.rows != draft.rows:
            raise ValueError(f"target runner has {target.rows} rows, draft runner {draft.rows}")
        if cfg.window or not cfg.guess_set:
            raise ValueError(f"the batched device cycle drafts with G >= 1 pooled guesses and no window, got W="
                             f"{cfg.window}, G={cfg.guess_set}: run this configuration on the host loop")
        if not isinstance(pool, GpuPhrasePool) or pool.device != target.device or target.device != draft.device:
            raise ValueError("target, draft and a GpuPhrasePool must share one device")
        self.tgt, self.drf, self.cfg, self.eos, self.rows = target, draft, cfg, frozenset(eos), target.rows
        self.pool = pool.empty_like()
        self.device = dev = target.device
        self.drafter = BatchDeviceDrafter(draft, self.pool, cfg.ngram, cfg.guess_set, topk=cfg.topk, eos=self.eos)
        self.n1 = n1 = cfg.ngram - 1
        self.layout = RowLayout(1 + cfg.max_gamma, cfg.topk, n1, dev, target.tree_kernel)
        self.emax = cfg.max_gamma + n1 + 1
        long, b = torch.long, self.rows
        self.seq = torch.zeros(b, 0, dtype=long, device=dev)
        self.seq_len, self.left, self.gamma = (torch.zeros(b, dtype=long, device=dev) for _ in range(3))
        self.active = torch.zeros(b, dtype=torch.bool, device=dev)
        self._eos = torch.tensor(sorted(self.eos), dtype=long, device=dev)
        self._ar_g, self._ar_e = torch.arange(cfg.max_gamma, device=dev), torch.arange(self.emax, device=dev)
        self._ar_n, self._rows = torch.arange(n1, device=dev), torch.arange(b, device=dev)
        self.graphs = CycleGraphs(dev, (dev.type == "cuda") if use_graphs is None else use_graphs, (target, draft))
        self._state: tuple = ()

    def fits(self, target, draft, pool, cfg: DecodeConfig, eos: frozenset[int]) -> bool:
        """True if this cycle serves a batch generation with these runners, settings and a pool of its layout."""
        return (target is self.tgt and draft is self.drf and self.pool.same_layout(pool) and cfg == self.cfg
                and frozenset(eos) == self.eos)

    # ---- the cycle: device ops only -------------------------------------------------------------------------------
    def _cycle(self, forwards: int) -> torch.Tensor:
        """One cycle of every row with ``forwards`` draft forwards; the block (B, ROW_FIELDS + Emax) flattened."""
        cfg, lay, act = self.cfg, self.layout, self.active
        seq, old_len = self.seq, self.seq_len.clone()
        d = self.drafter.draft_device(seq, self.seq_len, self.gamma, act, forwards)      # step 1, every row
        root = seq.gather(1, (old_len - 1).clamp(min=0)[:, None])
        width = max(cfg.max_gamma, d.buf.shape[1])
        trunk = torch.where(self._ar_g < d.cut[:, None], F.pad(d.buf, (0, width - d.buf.shape[1]))[:, :cfg.max_gamma],
                            0)
        ids = F.pad(torch.cat([root, trunk, d.phrases.flatten(1)], dim=1), (0, lay.size - lay.tokens))
        am = self.tgt.forward_device(ids, *lay.rows_inputs(d.cut + 1))                  # steps 2-3: (B, size)
        a, b, path = self._accept(am, trunk, d)
        length = a + b
        last = path.gather(1, (length - 1).clamp(min=0)[:, None])
        last = torch.where(length[:, None] > 0, last, 0)
        emitted = torch.where(self._ar_e < length[:, None], ids.gather(1, path), am.gather(1, last))
        count = torch.minimum(length + 1, self.left)
        done = count >= self.left
        if self.eos:
            hits = torch.isin(emitted, self._eos) & (self._ar_e < count[:, None])
            done = done | hits.any(1)
            count = torch.where(hits.any(1), hits.long().argmax(1) + 1, count)
        count = torch.where(act, count, 0)
        keep_root = torch.cat([torch.zeros_like(path[:, :1]), path], dim=1)
        self.tgt.commit_device(keep_root, torch.where(act, 1 + length, 0))
        self._mine(ids, am, trunk, a, d)                                                  # step 4
        seq.scatter_(1, (self.seq_len[:, None] + self._ar_e).clamp(max=seq.shape[1] - 1), emitted)
        self.seq_len.add_(count)
        self.left.sub_(count)
        self._learn_text(old_len, count)
        self._rollback(d, emitted, old_len, count)
        if cfg.adaptive:
            grown = torch.where(a == d.cut, (self.gamma + 2).clamp(max=cfg.max_gamma), (self.gamma - 1).clamp(min=1))
            self.gamma.copy_(torch.where(act, grown, self.gamma))
        self.active.copy_(act & ~done)
        counts = torch.stack([count, (done | ~act).long(), a, b, d.cut, d.dlen, d.lived, self.gamma,
                              d.valid.long().sum(1), length + 1], dim=1)
        return torch.cat([counts, emitted], dim=1).flatten()

    def _accept(self, am: torch.Tensor, trunk: torch.Tensor, d: BatchDraft):
        """Per row: trunk tokens accepted (the leading run equal to the argmax at their parent), suffix tokens
        accepted (the first longest suffix matching off a wholly accepted trunk's tip), and the accepted nodes
        first in a (B, Emax) tensor."""
        cfg, n1 = self.cfg, self.n1
        a = ((trunk == am[:, :cfg.max_gamma]) & (self._ar_g < d.cut[:, None])).long().cumprod(1).sum(1)
        b = torch.zeros_like(a)
        branch = torch.zeros(a.shape[0], n1, dtype=torch.long, device=self.device)
        if cfg.topk:
            match = (d.phrases == self._suffix_parents(am, d.cut)) & d.valid[..., None] & (a == d.cut)[:, None, None]
            s = match.long().cumprod(2).sum(2)                                             # (B, K)
            best = s.argmax(1)
            b, branch = s.gather(1, best[:, None])[:, 0], self.layout.chain_nodes[best]
        ar = self._ar_e[None, :]
        path = torch.where(ar < a[:, None], 1 + ar, branch.gather(1, (ar - a[:, None]).clamp(0, n1 - 1)))
        return a, b, torch.where(ar < (a + b)[:, None], path, 0)

    def _suffix_parents(self, am: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
        """(B, K, N-1): the target's argmax before each suffix token (the tip's, then the chain's own)."""
        tip = am.gather(1, cut[:, None])[:, None, :].expand(-1, self.cfg.topk, 1)
        return torch.cat([tip, am[:, self.layout.chain_nodes[:, :-1]]], dim=2)

    def _mine(self, ids, am, trunk, a, d: BatchDraft) -> None:
        """Phrases from verification, rows in order (inactive rows write nothing): the target's argmax run after
        each rejected draft position, and each verified suffix rewritten as the target's own prediction."""
        n1, j = self.n1, self._ar_g[None, :]
        miss = (j >= a[:, None]) & (j + n1 <= d.cut[:, None]) & self.active[:, None]
        nxt = (1 + j[..., None] + self._ar_n).clamp(max=self.layout.size - 1)          # (1, Gcap, N-1)
        phrases = am.gather(1, nxt.expand(am.shape[0], -1, -1).flatten(1)).view(am.shape[0], -1, n1)
        self.pool.insert_many(torch.where(miss, trunk, -1).flatten(), phrases.flatten(0, 1))
        if self.cfg.topk:
            tip = ids.gather(1, d.cut[:, None])
            key = torch.where(d.valid & self.active[:, None], tip, -1)
            self.pool.replace_many(key.flatten(), d.phrases.flatten(0, 1),
                                   self._suffix_parents(am, d.cut).flatten(0, 1))

    def _learn_text(self, old_len: torch.Tensor, count: torch.Tensor) -> None:
        """Each row's new n-grams into the pool, rows in order (key x[i], phrase x[i+1 : i+N], for every i whose
        phrase ends in the row's ``count`` new tokens)."""
        seq, n1 = self.seq, self.n1
        i = old_len[:, None] - n1 + self._ar_e                                            # (B, Emax)
        ok = (self._ar_e < count[:, None]) & (i >= 0)
        idx = (i[..., None] + 1 + self._ar_n).clamp(0, seq.shape[1] - 1)                  # (B, Emax, N-1)
        grams = seq.gather(1, idx.flatten(1)).view(*idx.shape)
        keys = torch.where(ok, seq.gather(1, i.clamp(min=0)), -1)
        self.pool.insert_many(keys.flatten(), grams.flatten(0, 1))

    def _rollback(self, d: BatchDraft, emitted, old_len, count) -> None:
        """Each row's draft cache keeps what agrees with its new text (leaving its last token uncached)."""
        n = min(d.buf.shape[1], self.emax)
        ar = self._ar_e[None, :n]
        agree = ((d.buf[:, :n] == emitted[:, :n]) & (ar < d.dlen[:, None]) & (ar < count[:, None])).long()
        keep = old_len + torch.minimum(agree.cumprod(1).sum(1), (count - 1).clamp(min=0))
        keep = torch.where(self.active, torch.minimum(keep, self.drf.cache.length), self.drf.cache.length)
        self.drf.cache.length.copy_(keep)

    # ---- the host loop -----------------------------------------------------------------------------------------
    def _start(self, prompts: Sequence[Sequence[int]], limits: Sequence[int]) -> None:
        """Load a batch: the state tensors in place (the captured graphs read them), the caches prefilled."""
        width = max(len(p) + n for p, n in zip(prompts, limits)) + self.emax + 1
        if self.seq.shape[1] < width:
            self.seq = torch.zeros(self.rows, max(width, 2 * self.seq.shape[1]), dtype=torch.long, device=self.device)
        self.seq.zero_()
        for r, p in enumerate(prompts):
            self.seq[r, :len(p)] = torch.tensor(list(p), dtype=torch.long).to(self.device)
        self.seq_len.copy_(torch.tensor([len(p) for p in prompts], dtype=torch.long))
        self.left.copy_(torch.tensor(list(limits), dtype=torch.long))
        self.gamma.fill_(self.cfg.gamma)
        self.active.copy_(self.left > 0)
        for runner in (self.tgt, self.drf):
            runner.prefill([list(p[:-1]) for p in prompts])
        self.drafter.restart()
        for r, p in enumerate(prompts):           # the prompts' n-grams, rows in order
            self.pool.seed_from(self.seq[r, :len(p)])
        state = (self.seq.data_ptr(), *(t.data_ptr() for t in self.pool.tensors),
                 *(t.data_ptr() for r in (self.tgt, self.drf) if r.cache.stacked for t in r.cache.stacked))
        if state != self._state:
            self.graphs.clear()
            self._state = state

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                 stats: Sequence[GenerationStats] | None = None,
                 pool: GpuPhrasePool | None = None) -> Iterator[list[tuple[int, list[int]]]]:
        """Yield, cycle by cycle, ``(row, new tokens)`` for every row that emitted tokens in that cycle, until every
        row ends (EOS or its limit: ``max_new_tokens`` one for all rows or one per row). ``stats``: one
        :class:`GenerationStats` per row, filled as rows advance. ``pool``: the phrases to start from and where they
        are left afterwards (its layout must be the cycle's). ValueError: wrong row count, an empty prompt, or
        caches too small."""
        limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(prompts) != self.rows or len(limits) != self.rows:
            raise ValueError(f"this cycle decodes {self.rows} rows, got {len(prompts)} prompts, {len(limits)} limits")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if pool is not None and not self.pool.same_layout(pool):
            raise ValueError("the pool's layout (ngram, guess_set, key cap, vocabulary, device) is not this cycle's")
        need = max(len(p) + n for p, n in zip(prompts, limits)) + self.layout.size
        if need > self.tgt.cache.max_len or need + self.drafter.slots + self.emax > self.drf.cache.max_len:
            raise ValueError(f"the static caches ({self.tgt.cache.max_len}, {self.drf.cache.max_len} slots) are too "
                             f"small for {need - self.layout.size} tokens per row")
        if pool is not None:
            self.pool.copy_(pool)
        try:
            yield from self._loop(prompts, limits, stats)
        finally:
            if pool is not None:
                pool.copy_(self.pool)

    def _loop(self, prompts, limits, stats) -> Iterator[list[tuple[int, list[int]]]]:
        t0 = time.perf_counter()
        self._start(prompts, limits)
        gammas, done = [self.cfg.gamma] * self.rows, [n <= 0 for n in limits]
        width = len(ROW_FIELDS) + self.emax
        while not all(done):
            f = self.drafter.budget(max(g for g, d in zip(gammas, done) if not d))
            block = self.graphs.run(f, lambda: self._cycle(f))
            out, drafted, lived = [], 0, 0
            for r in range(self.rows):
                row = block[r * width:(r + 1) * width]
                c = dict(zip(ROW_FIELDS, row))
                if done[r]:
                    continue
                new = row[len(ROW_FIELDS):len(ROW_FIELDS) + c["emitted"]]
                drafted, lived = drafted + c["drafted"], lived + c["lived"]
                if stats is not None:
                    count_cycle(stats[r], c, f, gammas[r], self.n1)
                    stats[r].tokens += len(new)
                    stats[r].time_total = time.perf_counter() - t0
                gammas[r], done[r] = c["gamma"], bool(c["done"])
                if new:
                    out.append((r, new))
            self.drafter.observe(drafted, lived)
            yield out

