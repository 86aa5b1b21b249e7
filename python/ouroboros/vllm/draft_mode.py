"""Draft mode: a small HF draft model of the target's tokenizer, run by the proposer with phrase-level drafting
(:class:`~ouroboros.drafting.host_drafter.HostDrafter`: pooled phrases verified in each draft forward), its KV cache
kept per request, so a step costs a draft forward per few tokens, not a re-prefill."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM

from ouroboros.drafting.host_drafter import HostDrafter
from ouroboros.hf.quantize import quantize_draft, resolve_draft_quant
from ouroboros.hf.runner import ModelRunner
from ouroboros.vllm.chains import MergedPool

__all__ = ["load_draft", "DraftRequest"]


def _eos_ids(model) -> frozenset[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    return frozenset([eos] if isinstance(eos, int) else (eos or []))


def load_draft(path: Path, quant: str, target_vocab: int, device: torch.device | None = None):
    """The draft model in ``path`` in eval mode (float32 on a CPU, int8 there when ``quant`` resolves to it;
    bfloat16 on a GPU). Raises ``ValueError`` naming ``OUROBOROS_VLLM_DRAFT`` when it cannot be loaded or its
    vocabulary size differs from the target's ``target_vocab``."""
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
    return quantize_draft(model, resolve_draft_quant(quant, device, dtype))


class DraftRequest:
    """One request's draft state: a runner (the draft's KV cache of this request), the drafter over the request's
    pools, and the adaptive draft length.

    :meth:`propose` guarantees: at most ``k`` tokens; the cache afterwards holds a prefix of the history and the
    drafted tokens (never anything the history contradicts at the next call, which rolls back to the common prefix).
    """

    def __init__(self, model, pools: MergedPool, guess_set: int, k: int) -> None:
        self.runner = ModelRunner(model)
        self.drafter = HostDrafter(self.runner, _eos_ids(model), pool=pools, guess_set=guess_set)
        self.k = k
        self.gamma = k
        self.cached: list[int] = []            # the tokens in the cache (the last draft's sequence, cut)
        self.proposal: list[int] = []
        self.proposed_at = 0                  # history length the proposal followed

    def _adapt(self, history: Sequence[int]) -> None:
        """Draft length after seeing how much of the last proposal the target accepted: +2 after a full
        acceptance, -1 otherwise (the host loop's rule), within 1..k."""
        if not self.proposal:
            return
        new = history[self.proposed_at:self.proposed_at + len(self.proposal)]
        full = list(new) == self.proposal and len(history) > self.proposed_at + len(self.proposal)
        self.gamma = min(self.gamma + 2, self.k) if full else max(self.gamma - 1, 1)

    def _sync_cache(self, history: list[int]) -> None:
        """Roll the cache back to its longest prefix the history agrees with (at least one token left uncached);
        a new request is prefilled with all of its history but the last token."""
        if self.runner.n_cached == 0 and len(history) > 1:
            self.runner.prefill(history[:-1])
            self.cached = history[:-1]
            return
        n = min(self.runner.n_cached, len(history) - 1)
        same = 0
        while same < n and self.cached[same] == history[same]:
            same += 1
        self.runner.rollback(same)
        self.cached = self.cached[:same]

    def propose(self, history: list[int], k: int) -> list[int]:
        """The chain to verify after ``history``: a drafting phase of the current draft length (at most ``k``)."""
        self._adapt(history)
        self._sync_cache(history)
        with torch.inference_mode():
            draft = self.drafter.draft(history, max(1, min(self.gamma, k)))
        self.cached = draft.seq[:self.runner.n_cached]
        self.proposal, self.proposed_at = draft.tokens[:k], len(history)
        return self.proposal
