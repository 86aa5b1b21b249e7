"""A draft output head over the tokens a draft can use: a fixed base (a BPE vocabulary's first, most frequent ids,
FR-Spec's frequency-ranked head, and the EOS ids) plus the tokens of the running requests' histories.

The head is a large share of a small draft's forward on a CPU (Qwen2.5-0.5B: 151,936 rows of 896, a quarter of its
weights, computed at every tree slot). A head of the first 32,768 ids alone costs a third less per proposer step but
cannot propose the prompt's own identifiers (more engine steps on HumanEval, ``bench/results/vllm_proposer_cost_cpu
.json``). :class:`HistoryHead` adds back every token the running requests have seen: its ``extra`` rows are rebuilt
when a history brings a token the head lacks.

The target verifies every proposal, so what the head leaves out can only lower acceptance, never change an output.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn
from torch.ao.nn.quantized import dynamic as qdynamic

from ouroboros.hf.quantize import quantize_draft

__all__ = ["HistoryHead", "install_history_head"]


def _linear_rows(weight: torch.Tensor, bias: torch.Tensor | None, ids: Sequence[int]) -> nn.Linear:
    """A float ``nn.Linear`` whose output ``j`` is row ``ids[j]`` of ``weight`` (and ``bias``)."""
    index = torch.tensor(list(ids), dtype=torch.long, device=weight.device)
    out = nn.Linear(weight.shape[1], len(ids), bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight.index_select(0, index))
        if bias is not None:
            out.bias.copy_(bias.index_select(0, index))
    return out


class HistoryHead(nn.Module):
    """Output ``j`` scores token ``ids[j]``: ``base`` ids first (fixed), then the ``extra`` ids last set by
    :meth:`track`. Both parts are linear modules of their own (``quantize_draft`` turns them to int8 with the rest of
    the draft; :meth:`track` quantizes new extra rows the same way), and the ``extra`` module keeps its identity when
    its rows change, so forwards installed on it (:mod:`ouroboros.hf.real_slots`) stay in place."""

    def __init__(self, head: nn.Linear, base_ids: Sequence[int]) -> None:
        super().__init__()
        self.base_ids = sorted(set(int(i) for i in base_ids))
        self._base_set = frozenset(self.base_ids)
        weight = head.weight.detach()
        bias = head.bias.detach() if head.bias is not None else None
        self._full = (weight, bias)                   # the full rows (the tied input embeddings: no copy)
        self.vocab = weight.shape[0]
        self.base = _linear_rows(weight, bias, self.base_ids)
        self.extra = _linear_rows(weight, bias, [0])  # replaced by track(); unused while extra_ids is empty
        self.extra_ids: list[int] = []
        self._extra_set: frozenset[int] = frozenset()
        self.ids = list(self.base_ids)
        self.rebuilds = 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.base(hidden)
        if self.extra_ids:
            out = torch.cat([out, self.extra(hidden)], dim=-1)
        return out

    def track(self, histories: Iterable[Sequence[int]]) -> bool:
        """Make the head score every token of ``histories`` (the running requests' prompts and outputs). The extra
        rows are rebuilt, to exactly the histories' tokens outside the base, only when one is missing (a request gone
        leaves its tokens until the next rebuild: the head stays bounded by the histories it last served). Returns
        True when it rebuilt."""
        needed = set()
        for history in histories:
            needed.update(int(t) for t in history)
        needed -= self._base_set
        needed = {t for t in needed if 0 <= t < self.vocab}
        if needed <= self._extra_set:
            return False
        ids = sorted(needed)
        weight, bias = self._full
        rows = _linear_rows(weight, bias, ids)
        if isinstance(self.extra, qdynamic.Linear):
            quantized = quantize_draft(nn.Sequential(rows))[0]
            self.extra.set_weight_bias(quantized.weight(), quantized.bias())
        else:
            self.extra.weight, self.extra.bias = rows.weight, rows.bias
        self.extra.out_features = len(ids)
        self.extra_ids, self._extra_set = ids, frozenset(ids)
        self.ids = self.base_ids + ids
        self.rebuilds += 1
        return True


def install_history_head(model: nn.Module, base_ids: Sequence[int]) -> HistoryHead:
    """Give ``model`` a :class:`HistoryHead` over ``base_ids`` (an untied module; the input embeddings are unchanged)
    in place of its output embeddings, and return it. Call it before ``quantize_draft`` (its parts are then int8)."""
    head = HistoryHead(model.get_output_embeddings(), base_ids)
    model.set_output_embeddings(head)
    return head
