"""One model decoding several rows at once (SPEC §6): one forward carries every row's token tree.

:class:`BatchModel` keeps the rows' keys and values in one ``DynamicCache`` of shape ``(B, H, S, D)`` whose slots are
shared by all rows; each row owns the slots it kept (``valid``) and their logical positions (``pos``). A forward
appends every row's tree, padded to the largest (``T`` new slots per row): a tree token sees the row's valid slots
(inside the sliding window, by logical position) and its own ancestors; a pad slot sees only itself and is never
kept. Acceptance marks the kept slots valid (no copy), a rollback clears the slots at or past a position, and
:meth:`compact` gathers each row's valid slots into a left-padded block when the rejected ones pile up. A finished
row leaves the batch (:meth:`drop`), so it costs nothing afterwards; rows prefilled in a batch of their own join one
(:meth:`absorb`), so a long prefill is not padded across every row (a server's requests come and go).

Rows get position ``length + depth`` (their own length, whatever their padding), so each row computes what it would
alone; only float rounding of the padded batch can differ from batch 1. The linear layers compute the real slots
only on a CPU (:mod:`ouroboros.hf.real_slots`): pads cost no matrix products there.
"""
from __future__ import annotations

import inspect
import time
from typing import Mapping, Sequence

import torch

from ouroboros.core.tokentree import TokenTree
from ouroboros.hf.cache import filled_layers, new_cache
from ouroboros.hf.cpu_linear import small_m_linear
from ouroboros.hf.masks import layer_masks
from ouroboros.hf.real_slots import real_slots
from ouroboros.hf.runner import cache_kwarg
from ouroboros_kernels import ancestor_mask

__all__ = ["BatchModel"]


class BatchModel:
    """``model`` with one KV cache for the rows ``0 .. rows-1``, or for the given row ids (ids stay fixed while rows
    leave and join)."""

    def __init__(self, model, rows: int | Sequence[int]) -> None:
        self.model = model
        self.config = model.config.get_text_config()
        self.device = model.device
        self.cache = new_cache()
        self._cache_kw = cache_kwarg(model)
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.rows = list(range(rows)) if isinstance(rows, int) else [int(r) for r in rows]   # row id per index
        if len(set(self.rows)) != len(self.rows):
            raise ValueError(f"row ids must differ, got {self.rows}")
        rows = len(self.rows)
        self.valid = torch.zeros(rows, 0, dtype=torch.bool, device=self.device)
        self.pos = torch.zeros(rows, 0, dtype=torch.long, device=self.device)
        self.length = {r: 0 for r in self.rows}     # tokens each row holds (its next position)
        self._last_start = 0                          # first slot of the last forward
        self.forwards = 0
        self.forward_time = 0.0
        self.row_tokens = 0                           # tree tokens run, summed over rows (pads not counted)

    def _stage(self, trees: Mapping[int, TokenTree]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids (B, T), depths (B, T), ancestor-or-self (B, T, T) of every row's tree, padded (absent rows: pads)."""
        b, t = len(self.rows), max(len(tree) for tree in trees.values())
        ids = torch.zeros(b, t, dtype=torch.long)
        depths = torch.zeros(b, t, dtype=torch.long)
        anc = torch.eye(t, dtype=torch.bool).repeat(b, 1, 1)
        for i, row in enumerate(self.rows):
            tree = trees.get(row)
            if tree is not None:
                n = len(tree)
                ids[i, :n] = torch.tensor(tree.tokens)
                depths[i, :n] = torch.tensor(tree.depths)
                anc[i, :n, :n] = ancestor_mask(tree.parents)
        return ids.to(self.device), depths.to(self.device), anc.to(self.device)

    def forward(self, trees: Mapping[int, TokenTree], logits: bool = True) -> dict[int, torch.Tensor]:
        """One forward of each given row's tree appended to its cache; rows not given run pads only.

        Returns row -> logits (T_row, V) in the model's dtype; with ``logits=False`` (a prefill that only fills the
        cache) {} and the output head runs at one slot at most. The new slots stay invalid until :meth:`keep`."""
        if not trees or any(r not in self.length for r in trees):
            raise ValueError(f"trees for rows {sorted(trees)}, but the batch holds rows {self.rows}")
        start = time.perf_counter()
        ids, depths, anc = self._stage(trees)
        b, t = ids.shape
        lengths = torch.tensor([self.length[r] for r in self.rows], dtype=torch.long, device=self.device)
        q_pos = lengths[:, None] + depths
        visible = torch.cat([self.valid[:, None, :].expand(b, t, self.valid.shape[1]), anc], dim=2)
        mask = layer_masks(self.config, visible, q_pos, torch.cat([self.pos, q_pos], dim=1), self.model.dtype)
        sizes = [len(trees[r]) if r in trees else 0 for r in self.rows]
        cpu = self.device.type == "cpu"
        skip = {"logits_to_keep": 1} if not logits and self._logits_to_keep else {}
        with small_m_linear(self.model, enabled=cpu), real_slots(self.model, sizes, t, self.device, enabled=cpu):
            out = self.model(input_ids=ids, position_ids=q_pos, attention_mask=mask, use_cache=True,
                             **{self._cache_kw: self.cache}, **skip)
        self._last_start = self.valid.shape[1]
        self.valid = torch.cat([self.valid, torch.zeros(b, t, dtype=torch.bool, device=self.device)], dim=1)
        self.pos = torch.cat([self.pos, q_pos], dim=1)
        rows_logits = ({row: out.logits[i, :len(trees[row])] for i, row in enumerate(self.rows) if row in trees}
                       if logits else {})
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.forwards += 1
        self.row_tokens += sum(sizes)
        self.forward_time += time.perf_counter() - start
        return rows_logits

    def keep(self, row: int, prefix_len: int, nodes: Sequence[int]) -> None:
        """After :meth:`forward`: ``row`` keeps its ``prefix_len`` tokens plus the tree entries ``nodes`` (a
        root-down path, so their positions follow on)."""
        if prefix_len != self.length[row]:
            raise ValueError(f"row {row} holds {self.length[row]} tokens, not {prefix_len}")
        if nodes:
            slots = self._last_start + torch.as_tensor(list(nodes), dtype=torch.long, device=self.device)
            self.valid[self.rows.index(row), slots] = True
        self.length[row] = prefix_len + len(nodes)

    def rollback(self, row: int, length: int) -> None:
        """``row`` keeps only its first ``length`` tokens."""
        if length < self.length[row]:
            i = self.rows.index(row)
            self.valid[i] &= self.pos[i] < length
            self.length[row] = length

    def drop(self, rows: Sequence[int]) -> None:
        """The given rows leave the batch: their cache rows are freed, later forwards no longer carry them."""
        leaving = set(rows)
        keep = [i for i, r in enumerate(self.rows) if r not in leaving]
        if len(keep) == len(self.rows):
            return
        self._select_rows(torch.tensor(keep, dtype=torch.long, device=self.device))
        for r in leaving:
            self.length.pop(r, None)
        self.rows = [self.rows[i] for i in keep]

    def absorb(self, other: "BatchModel") -> None:
        """Take every row of ``other`` (a batch of the same model, row ids not in this one) into this batch, caches
        and all; ``other`` is spent. Both sides' slots are padded with invalid ones to one width, so every row
        computes afterwards exactly what it did before."""
        if other.model is not self.model:
            raise ValueError("absorb needs a batch of the same model")
        clash = sorted(set(other.rows) & set(self.length))
        if clash:
            raise ValueError(f"rows {clash} are in both batches")
        if not self.rows or not filled_layers(self.cache):
            self.cache, self.valid, self.pos = other.cache, other.valid, other.pos
        elif other.rows:
            width = max(self.valid.shape[1], other.valid.shape[1])
            for mine, theirs in zip(filled_layers(self.cache), filled_layers(other.cache), strict=True):
                for name in ("keys", "values"):
                    setattr(mine, name, torch.cat([_pad_slots(getattr(mine, name), width, 2),
                                                   _pad_slots(getattr(theirs, name), width, 2)]))
            self.valid = torch.cat([_pad_slots(self.valid, width, 1), _pad_slots(other.valid, width, 1)])
            self.pos = torch.cat([_pad_slots(self.pos, width, 1), _pad_slots(other.pos, width, 1)])
        self.rows += other.rows
        self.length.update(other.length)
        other.rows, other.length = [], {}

    def compact(self, slack: int = 64) -> None:
        """Gather each row's valid slots into one left-padded block once more than ``slack`` slots per row are
        rejected ones (the slot order, and so each row's computation, is unchanged)."""
        if not self.rows:
            return
        counts = self.valid.sum(dim=1)
        width = int(counts.max())
        if self.valid.shape[1] - width <= slack:
            return
        # a valid slot's rank among its row's valid slots, shifted so that every row's block ends at ``width``
        rank = self.valid.long().cumsum(dim=1) - 1 + (width - counts)[:, None]
        src = torch.zeros(len(self.rows), width, dtype=torch.long, device=self.device)
        rows, slots = self.valid.nonzero(as_tuple=True)
        src[rows, rank[rows, slots]] = slots
        new_valid = torch.arange(width, device=self.device)[None, :] >= (width - counts)[:, None]
        self._gather_slots(src)
        self.pos = torch.where(new_valid, self.pos.gather(1, src), 0)
        self.valid = new_valid

    def _select_rows(self, index: torch.Tensor) -> None:
        for layer in filled_layers(self.cache):
            layer.keys, layer.values = layer.keys[index], layer.values[index]
        self.valid, self.pos = self.valid[index], self.pos[index]

    def _gather_slots(self, src: torch.Tensor) -> None:
        for layer in filled_layers(self.cache):
            for name in ("keys", "values"):
                buf = getattr(layer, name)
                idx = src[:, None, :, None].expand(buf.shape[0], buf.shape[1], src.shape[1], buf.shape[3])
                setattr(layer, name, buf.gather(2, idx))


def _pad_slots(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``t`` with zeros (False for masks) appended along the slot dimension ``dim`` up to ``width`` slots."""
    if t.shape[dim] >= width:
        return t
    shape = list(t.shape)
    shape[dim] = width - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)
