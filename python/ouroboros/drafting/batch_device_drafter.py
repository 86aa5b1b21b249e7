"""The drafting rule on the device for B rows at once (SPEC §2 step 1, §6): the batched device cycle's drafter.

Row b follows :class:`~ouroboros.drafting.device_drafter.DeviceDrafter`'s rule on its own text, with its own
pending tokens, draft, length and stop flag, in (B, ...) device tensors; every draft forward carries all rows (one
:class:`~ouroboros.hf.batch_static_runner.BatchStaticRunner` forward), each row's tree being its S pending slots (the
first ``p[b]`` valid) and its G pooled guesses, chains of N-1 tokens off its last valid pending token. All rows read
one shared pool; a row whose rule says stop (its gamma drafted, EOS, or a row that is not active) is masked: it looks
up nothing, adds no token and commits no KV. No Jacobi window (W = 0, the default on every device): batches with a
window run on the host loop. Nothing here reads the host.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ouroboros.drafting.base import YieldBudget
from ouroboros.drafting.device_drafter import FixedTree
from ouroboros.drafting.gpu_pool import GpuPhrasePool
from ouroboros.hf.batch_static_runner import BatchStaticRunner

__all__ = ["BatchDeviceDrafter", "BatchDraft", "RowLayout"]


class RowLayout(FixedTree):
    """A :class:`FixedTree` read per row: ``rows_inputs(v)`` for a (B,) count of valid stem nodes gives (depths
    (B, size), bits (B, size, size) or packed (B, size, W))."""

    def rows_inputs(self, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row inputs for ``valid`` (B,) valid stem nodes (1..stem)."""
        i = (valid - 1).clamp(0, self.stem - 1)
        return self.depths.index_select(0, i), self.bits.index_select(0, i)

    def rows_keep(self, p: torch.Tensor, chain: torch.Tensor) -> torch.Tensor:
        """(B, stem + n1) node indices to keep per row: its ``p[b]`` valid stem slots, then chain ``chain[b]``'s
        nodes (entries past what the row accepted are never committed)."""
        ar = torch.arange(self.stem + self.n1, device=p.device)[None, :]
        kept = torch.where(ar < p[:, None], ar, self.stem + chain[:, None] * self.n1 + (ar - p[:, None]))
        return kept.clamp(max=self.size - 1)


class BatchDraft(NamedTuple):
    """A batched phase's outcome, all (B, ...) device tensors."""

    buf: torch.Tensor           # (B, forwards * N) drafted tokens, valid below dlen
    dlen: torch.Tensor          # (B,) tokens drafted
    lived: torch.Tensor         # (B,) forwards that counted
    cut: torch.Tensor           # (B,) the draft's length: dlen cut to gamma and after the first EOS
    phrases: torch.Tensor       # (B, K, N-1) suffixes for each row's last draft token
    valid: torch.Tensor         # (B, K) bool


@dataclass
class _Phase:
    gamma: torch.Tensor         # (B,) the rows' draft lengths
    pending: torch.Tensor       # (B, S) next forward's pending tokens, the first p valid
    p: torch.Tensor             # (B,)
    buf: torch.Tensor           # (B, forwards * N)
    dlen: torch.Tensor          # (B,)
    live: torch.Tensor          # (B,) bool
    lived: torch.Tensor         # (B,)


class BatchDeviceDrafter(YieldBudget):
    """Drafts B rows on ``runner`` with the shared ``pool``: N = ``ngram``, G = ``guess_set`` >= 1 guesses per
    forward, K = ``topk`` suffixes per draft; ``eos`` ends a row's drafting."""

    def __init__(self, runner: BatchStaticRunner, pool: GpuPhrasePool, ngram: int, guess_set: int, *,
                 topk: int = 0, eos: frozenset[int] = frozenset()) -> None:
        if not isinstance(runner, BatchStaticRunner):
            raise ValueError(f"batched device drafting needs a BatchStaticRunner, got {type(runner).__name__}")
        if not isinstance(pool, GpuPhrasePool) or pool.ngram != ngram:
            raise ValueError(f"batched device drafting needs a GpuPhrasePool of {ngram}-grams")
        if guess_set < 1:
            raise ValueError(f"batched device drafting needs guess_set >= 1, got {guess_set}")
        self.runner, self.pool, self.eos = runner, pool, frozenset(eos)
        self.n1, self.g, self.topk = ngram - 1, guess_set, topk
        self.slots = ngram + 1              # the longest tail a verification leaves uncached
        self.device = dev = runner.device
        self._eos = torch.tensor(sorted(self.eos), dtype=torch.long, device=dev)
        self._pos = torch.arange(ngram, device=dev)
        self._layouts: dict[int, RowLayout] = {}

    def restart(self) -> None:
        """A new generation: the yield forgotten."""
        self.forget_yield()

    def _layout(self, slots: int) -> RowLayout:
        if slots not in self._layouts:
            self._layouts[slots] = RowLayout(slots, self.g, self.n1, self.device, self.runner.tree_kernel)
        return self._layouts[slots]

    def draft_device(self, seq: torch.Tensor, seq_len: torch.Tensor, gamma: torch.Tensor, active: torch.Tensor,
                     forwards: int) -> BatchDraft:
        """One phase per row after its text ``seq[b, :seq_len[b]]`` (the runner's row b caches a prefix of it that
        leaves at most N + 1 tokens uncached), aiming at ``gamma[b]`` tokens, in exactly ``forwards`` forwards;
        rows with ``active`` False draft nothing. Device ops only. Afterwards row b's cache holds its text and its
        drafted tokens but the last."""
        b = seq.shape[0]
        length = self.runner.cache.length
        idx = (length[:, None] + torch.arange(self.slots, device=self.device)).clamp(max=seq.shape[1] - 1)
        zeros = torch.zeros(b, dtype=torch.long, device=self.device)
        ph = _Phase(gamma, seq.gather(1, idx), seq_len - length,
                    torch.zeros(b, forwards * (self.n1 + 1), dtype=torch.long, device=self.device), zeros,
                    active.clone(), zeros.clone())
        for _ in range(forwards):
            self._forward(ph)
        return self._outcome(ph)

    def _forward(self, ph: _Phase) -> None:
        """One draft forward of every row by the rule, masked where a row's rule says stop."""
        lay = self._layout(ph.pending.shape[1])
        depths, bits = lay.rows_inputs(ph.p)
        last = ph.pending.gather(1, (ph.p - 1).clamp(min=0)[:, None])[:, 0]            # (B,) the root tokens
        chains, ok = self.pool.lookup(torch.where(ph.live, last, -1), self.g)          # (B, G, N-1), (B, G)
        ids = F.pad(torch.cat([ph.pending, chains.flatten(1)], dim=1), (0, lay.size - lay.tokens))
        argmax = self.runner.forward_device(ids, depths, bits)                          # (B, size)
        root = argmax.gather(1, (ph.p - 1).clamp(min=0)[:, None])                      # (B, 1)
        after = torch.cat([root[:, None, :].expand(-1, self.g, 1), argmax[:, lay.chain_nodes]], dim=2)  # (B, G, N)
        accepted = ((chains == after[..., :-1]) & ok[..., None]).long().cumprod(2).sum(2)     # (B, G)
        best = accepted.argmax(1)                                                       # the first longest chain
        m = accepted.gather(1, best[:, None])[:, 0]                                     # (B,)
        rows = torch.arange(best.shape[0], device=self.device)
        win, win_after = chains[rows, best], after[rows, best]                          # (B, N-1), (B, N)
        bonus = win_after.gather(1, m[:, None])                                         # (B, 1)
        emitted = torch.where(self._pos[None, :] < m[:, None], F.pad(win, (0, 1)), bonus)   # (B, N)
        live = ph.live
        ph.buf.scatter_(1, ph.dlen[:, None] + self._pos[None, :], emitted)   # past dlen when not live: never read
        ph.dlen += torch.where(live, m + 1, 0)
        ph.lived += live
        ph.live = live & (ph.dlen < ph.gamma)
        if self.eos:
            ph.live &= ~(torch.isin(emitted, self._eos) & (self._pos[None, :] <= m[:, None])).any(1)
        self.runner.commit_device(lay.rows_keep(ph.p, best), torch.where(live, ph.p + m, 0))
        ph.pending, ph.p = bonus, torch.ones_like(ph.p)

    def _outcome(self, ph: _Phase) -> BatchDraft:
        """Each row's draft cut to its gamma and after its first EOS, and the suffixes for its last token."""
        b, n = ph.buf.shape
        cut = torch.minimum(ph.dlen, ph.gamma)
        has_eos = torch.zeros(b, dtype=torch.bool, device=self.device)
        if self.eos:
            hits = torch.isin(ph.buf, self._eos) & (torch.arange(n, device=self.device)[None, :] < cut[:, None])
            has_eos = hits.any(1)
            cut = torch.where(has_eos, hits.long().argmax(1) + 1, cut)
        if self.topk:                    # a draft holding EOS gets no suffixes; an empty draft neither
            tip = ph.buf.gather(1, (cut - 1).clamp(min=0)[:, None])[:, 0]
            phrases, valid = self.pool.lookup(torch.where(has_eos | (cut == 0), -1, tip), self.topk)
        else:
            phrases = torch.zeros(b, 0, self.n1, dtype=torch.long, device=self.device)
            valid = torch.zeros(b, 0, dtype=torch.bool, device=self.device)
        return BatchDraft(ph.buf, ph.dlen, ph.lived, cut, phrases, valid)
