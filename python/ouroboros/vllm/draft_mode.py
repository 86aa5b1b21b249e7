"""Draft mode: a small HF draft model of the target's tokenizer, run by the proposer with phrase-level drafting
(:class:`~ouroboros.drafting.host_drafter.HostDrafter`: pooled phrases verified in each draft forward).

Every running request is a row of one :class:`~ouroboros.hf.batch_model.BatchModel`: its KV cache is kept from step
to step (a step costs a draft forward per few tokens, not a re-prefill), and the step's requests draft together, each
row's forwards batched with the others' by a :class:`~ouroboros.decoding.batch.BatchScheduler` (one draft forward
per drafting round for all of them, as the batch host loop does). A new request is prefilled in a batch of its own,
then joins (its prompt is not padded across every row)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM

from ouroboros.core.tokentree import TokenTree
from ouroboros.decoding.batch import BatchScheduler, RowRunner
from ouroboros.decoding.loop import common_prefix
from ouroboros.drafting.host_drafter import HostDrafter
from ouroboros.hf.attention import patch
from ouroboros.hf.batch_model import BatchModel
from ouroboros.hf.quantize import quantize_draft, resolve_draft_quant
from ouroboros.hf.refusals import patch_refusal
from ouroboros.vllm.chains import MergedPool
from ouroboros.vllm.draft_head import HistoryHead, install_history_head

__all__ = ["load_draft", "row_guesses", "DraftRequest", "BatchDraft"]


def _eos_ids(model) -> frozenset[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    return frozenset([eos] if isinstance(eos, int) else (eos or []))


def load_draft(path: Path, quant: str, target_vocab: int, device: torch.device | None = None,
               head_vocab: int = 0) -> tuple[torch.nn.Module, HistoryHead | None]:
    """The draft model in ``path`` in eval mode (float32 on a CPU, int8 there when ``quant`` resolves to it, with
    ouroboros attention where the model takes it; bfloat16 on a GPU), and its :class:`HistoryHead` when
    ``0 < head_vocab <`` the vocabulary (a head over the ids below ``head_vocab``, the EOS ids and the running
    requests' tokens), else None (the whole vocabulary).
    Raises ``ValueError`` naming ``OUROBOROS_VLLM_DRAFT`` when it cannot be loaded or its vocabulary size differs
    from the target's ``target_vocab``."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"OUROBOROS_VLLM_DRAFT={str(path)!r} cannot be loaded as a causal LM: {err}") from err
    vocab = model.config.get_text_config().vocab_size
    if vocab != target_vocab:
        raise ValueError(f"OUROBOROS_VLLM_DRAFT={str(path)!r} has a vocabulary of {vocab} tokens, the target "
                         f"{target_vocab}: the draft must share the target's tokenizer")
    head = None
    if 0 < head_vocab < vocab:
        head = install_history_head(model, sorted(set(range(head_vocab)) | _eos_ids(model)))
    model = quantize_draft(model, resolve_draft_quant(quant, device, dtype))
    if device.type == "cpu" and patch_refusal(model) is None:
        patch(model)      # masked attention with GQA, not K/V repeated per query head: ~20% off a CPU draft forward
    return model, head


def row_guesses(guess_set: int, rows: int) -> int:
    """Pooled phrases each of ``rows`` requests drafting together verifies per draft forward: ``guess_set`` for a
    lone request, ``ceil(guess_set / rows)`` for more (at least one). A lone row's draft forward is memory bound (its
    weights are read once, extra tree slots cost little), so its phrases come nearly free; with several rows the
    forward's linear layers are compute bound, every slot costs, and phrases pay less than they cost (4 concurrent
    requests, ``bench/results/vllm_replay_cpu.json``: 1 phrase per row against 3 takes 15-16% less proposer time for
    2 more engine steps in about 40; in vLLM 3% / 5% more tokens per second, ``vllm_proposer_cost_cpu.json``)."""
    return max(1, -(-guess_set // max(rows, 1)))


class _HeadRowRunner(RowRunner):
    """A draft row whose model's head scores only ``ids`` (a :class:`HistoryHead`'s): its argmax outputs are mapped
    back to token ids."""

    def __init__(self, scheduler: BatchScheduler, model: BatchModel, row: int, ids: list[int]) -> None:
        super().__init__(scheduler, model, row)
        self.ids = ids

    def forward_tree(self, tree: TokenTree) -> list[int]:
        return [self.ids[j] for j in super().forward_tree(tree)]

    def forward_tree_logits(self, tree: TokenTree) -> torch.Tensor:
        raise ValueError("a draft with a history head (OUROBOROS_VLLM_DRAFT_VOCAB) has no full-vocabulary logits")


class DraftRequest:
    """One request's draft state: its row in the shared batch, its pools, the tokens its cache rows hold, and the
    adaptive draft length (+2 after a fully accepted proposal, -1 otherwise, within 1..k: the host loop's rule)."""

    def __init__(self, row: int, pools: MergedPool, k: int) -> None:
        self.row, self.pools, self.k = row, pools, k
        self.gamma = k
        self.cached: list[int] = []            # the tokens in the cache (the last draft's sequence, cut)
        self.proposal: list[int] = []
        self.proposed_at = 0                  # history length the proposal followed

    def adapt(self, history: Sequence[int]) -> None:
        """Update the draft length from how much of the last proposal ``history`` shows accepted."""
        if not self.proposal:
            return
        new = history[self.proposed_at:self.proposed_at + len(self.proposal)]
        full = list(new) == self.proposal and len(history) > self.proposed_at + len(self.proposal)
        self.gamma = min(self.gamma + 2, self.k) if full else max(self.gamma - 1, 1)


class BatchDraft:
    """The draft model serving every running request, one row each (see the module docstring).

    :meth:`propose` guarantees: at most ``k`` tokens per request; each request's chain is what its drafter computes
    alone (up to the float rounding of the padded batch); afterwards a request's cache rows hold a prefix of its
    history plus drafted tokens, never anything its next history contradicts (the next step rolls back to the common
    prefix). :meth:`free` releases a request's rows.
    """

    def __init__(self, model, guess_set: int, head: HistoryHead | None = None) -> None:
        self.model, self.guess_set, self.eos = model, guess_set, _eos_ids(model)
        self.head = head                         # None: the model's own head over the whole vocabulary
        self.batch = BatchModel(model, [])
        self._next_row = 0
        self.prefill_forwards = 0

    @property
    def forwards(self) -> int:
        """Draft forwards run for drafting (batched: one per round for every drafting request)."""
        return self.batch.forwards

    def new_request(self, pools: MergedPool, k: int) -> DraftRequest:
        row, self._next_row = self._next_row, self._next_row + 1
        return DraftRequest(row, pools, k)

    def free(self, request: DraftRequest) -> None:
        with torch.inference_mode():
            self.batch.drop([request.row])

    def _join(self, request: DraftRequest, history: list[int]) -> None:
        """Prefill a new request's history but its last token in a batch of its own, then take it in."""
        alone = BatchModel(self.model, [request.row])
        tree = TokenTree()
        nodes = tree.add_path(-1, history[:-1])
        alone.forward({request.row: tree}, logits=False)      # the cache only: no head over the prompt
        alone.keep(request.row, 0, nodes)
        self.prefill_forwards += 1
        self.batch.absorb(alone)
        request.cached = history[:-1]

    def _sync(self, request: DraftRequest, history: list[int]) -> None:
        """Roll a request's rows back to the longest prefix its history agrees with (one token left uncached)."""
        n = min(self.batch.length[request.row], len(history) - 1)
        same = common_prefix(request.cached[:n], history, 0)
        self.batch.rollback(request.row, same)
        request.cached = request.cached[:same]

    def propose(self, jobs: Sequence[tuple[DraftRequest, list[int], int]]) -> list[list[int]]:
        """The chain of each ``(request, history, k)``: a drafting phase of the request's draft length (at most
        ``k``), every request's draft forwards batched together."""
        with torch.inference_mode():               # the caches are inference tensors, updated in place
            return self._propose(jobs)

    def _propose(self, jobs: Sequence[tuple[DraftRequest, list[int], int]]) -> list[list[int]]:
        by_row = {}
        for request, history, k in jobs:
            request.adapt(history)
            if len(history) < 2:
                continue                          # nothing to prefill from: no draft this step
            if request.row in self.batch.length:
                self._sync(request, history)
            else:
                self._join(request, history)
            by_row[request.row] = (request, history, max(1, min(request.gamma, k)))
        scheduler = BatchScheduler([self.batch], keep_rows=True)
        guesses = row_guesses(self.guess_set, len(by_row))
        head_ids = None
        if self.head is not None:
            self.head.track(history for _, history, _ in by_row.values())
            head_ids = self.head.ids

        def draft_row(row: int):
            request, history, gamma = by_row[row]
            runner = (RowRunner(scheduler, self.batch, row) if head_ids is None
                      else _HeadRowRunner(scheduler, self.batch, row, head_ids))
            drafter = HostDrafter(runner, self.eos, pool=request.pools, guess_set=guesses)
            draft = drafter.draft(history, gamma)
            request.cached = draft.seq[:self.batch.length[row]]
            request.proposal, request.proposed_at = draft.tokens[:gamma], len(history)
            return iter(())

        for _ in scheduler.run(sorted(by_row), draft_row):
            pass
        return [request.proposal[:k] if request.row in by_row else [] for request, _, k in jobs]
