"""``OuroborosProposer``: ouroboros as a vLLM V1 speculative proposer (``method="custom_class"``).

The contract (read off vLLM 0.32.0, ``v1/worker/gpu_model_runner.py`` and ``v1/spec_decode/custom_class_proposer.py``;
the CPU runner ``v1/worker/cpu_model_runner.py`` calls ``load_model`` with no hasattr check): ``cls(vllm_config)``,
``load_model(target_model)``, then once per engine step ``propose(sampled_token_ids, num_tokens_no_spec,
token_ids_cpu, slot_mappings=None)`` for every running request: row i's history is
``token_ids_cpu[i, :num_tokens_no_spec[i]]``, ``sampled_token_ids[i]`` this step's accepted tokens plus the bonus
token ([] for a request still in prefill). It returns one chain per row, at most ``num_speculative_tokens`` long.
vLLM verifies the chains itself (greedy or its rejection sampler), so the output never depends on what is proposed.
This module imports no vllm: the config is read by attribute.
"""
from __future__ import annotations

import atexit
import logging
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ouroboros.drafting.pool import PhrasePool
from ouroboros.vllm.chains import HistoryPools, scored_chain
from ouroboros.vllm.confidence import AcceptanceModel, Proposal, step_threshold
from ouroboros.vllm.draft_mode import BatchDraft, DraftRequest, load_draft
from ouroboros.vllm.requests import RequestTable
from ouroboros.vllm.settings import PREFIX, ProposerSettings

__all__ = ["OuroborosProposer", "load_shared_pool"]

log = logging.getLogger(__name__)


def load_shared_pool(settings: ProposerSettings) -> PhrasePool:
    """The shared pool: read from ``settings.pool_file`` when it exists (``ValueError`` naming
    ``OUROBOROS_VLLM_POOL`` when it is not a pool file, or one of another n-gram size than ``OUROBOROS_VLLM_NGRAM``),
    else a new empty one."""
    path = settings.pool_file
    if path is None or not path.exists():
        return PhrasePool(ngram=settings.ngram, guess_set=settings.guess_set, max_bytes=settings.pool_bytes)
    try:
        pool = PhrasePool.load(path)
    except Exception as err:  # torch.load raises many kinds for a file that is not a pool
        raise ValueError(f"{PREFIX}POOL={str(path)!r} cannot be read as a phrase pool: {err}") from err
    if pool.ngram != settings.ngram:
        raise ValueError(f"{PREFIX}POOL={str(path)!r} holds {pool.ngram}-grams but {PREFIX}NGRAM={settings.ngram}")
    return pool


class _Request:
    """What the proposer keeps per request: its pools, in draft mode its draft state, in pool mode its last chain
    (what the next step's history is compared with)."""

    def __init__(self, pools: HistoryPools, draft: DraftRequest | None) -> None:
        self.pools, self.draft = pools, draft
        self.last: Proposal | None = None


class OuroborosProposer:
    """A vLLM proposer in one of two modes (``OUROBOROS_VLLM_MODE``, :mod:`ouroboros.vllm.settings`):

    - **pool**: the chain out of the phrase pools (the request's own history; every request's output, shared),
      cut where its estimated acceptance, learnt online from every request's steps, falls below a threshold that
      grows with the step's running requests (:mod:`ouroboros.vllm.confidence`);
    - **draft**: the draft model's phrase-level draft (pooled phrases verified in each draft forward, adaptive
      length), its KV cache kept per request, the step's requests drafting in one batch.

    Guarantees: every chain has at most ``num_speculative_tokens`` tokens and never runs past ``max_model_len``; per
    request state is found by content and freed when its request is no longer running; bad settings raise
    ``ValueError`` naming the variable here, in the constructor, not inside a step.
    """

    def __init__(self, vllm_config, env: dict | None = None) -> None:
        self.settings = ProposerSettings.from_env(env)
        spec = vllm_config.speculative_config
        self.k = int(spec.num_speculative_tokens)
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        self.shared = load_shared_pool(self.settings)
        self.draft: BatchDraft | None = None
        self.acceptance = AcceptanceModel()           # pool mode's acceptance estimates, shared by all requests
        if self.settings.mode == "draft":
            model, head = load_draft(self.settings.draft, self.settings.draft_quant,
                                     int(vllm_config.model_config.get_vocab_size()),
                                     head_vocab=self.settings.draft_vocab)
            self.draft = BatchDraft(model, self.settings.guess_set, head)
        self.table: RequestTable[_Request] = RequestTable(self._new_request, self._free_request)
        self.steps = self.proposed = 0
        self._saved_at = time.monotonic()
        if self.settings.pool_file is not None:
            atexit.register(self.save_pool)

    def load_model(self, target_model) -> None:
        """Called by vLLM with the target once it is loaded; the proposer needs nothing from it."""

    def _new_request(self, tokens: np.ndarray) -> _Request:
        pools = HistoryPools(self.shared, tokens, self.settings.orders)
        draft = self.draft.new_request(pools.pools, self.k) if self.draft is not None else None
        return _Request(pools, draft)

    def _free_request(self, request: _Request) -> None:
        if request.draft is not None:
            self.draft.free(request.draft)

    def propose(self, sampled_token_ids: Sequence[Sequence[int]], num_tokens_no_spec: np.ndarray,
                token_ids_cpu: np.ndarray, slot_mappings=None) -> list[list[int]]:
        """One chain per row (see the module docstring); [] for a row in prefill or at ``max_model_len``."""
        histories = []
        for i, sampled in enumerate(sampled_token_ids):
            n = int(num_tokens_no_spec[i])
            histories.append(token_ids_cpu[i, :n] if len(sampled) and n < self.max_model_len else None)
        before = self.table.freed
        states = self.table.step(histories)
        out: list[list[int]] = [[] for _ in histories]
        jobs, job_rows = [], []
        threshold = step_threshold(self.settings.pool_confidence, len(histories))
        self.acceptance.tick()
        for i, (state, row) in enumerate(zip(states, histories)):
            if state is None:
                continue
            tokens = row.tolist()
            state.data.pools.update(tokens)
            k = min(self.k, self.max_model_len - len(tokens))
            if state.data.draft is not None:
                jobs.append((state.data.draft, tokens, k))
                job_rows.append(i)
            else:
                out[i] = self._pool_chain(state.data, tokens, k, threshold)
        if jobs:
            for i, chain in zip(job_rows, self.draft.propose(jobs)):
                out[i] = chain
        out = [[int(t) for t in chain[:self.k]] for chain in out]
        self.steps += 1
        self.proposed += sum(len(c) for c in out)
        if self.table.freed > before:
            self._maybe_save()
        return out

    def _pool_chain(self, request: _Request, tokens: list[int], k: int, threshold: float) -> list[int]:
        """Pool mode's chain for one row: the estimates first learn what ``tokens`` shows of the request's last
        chain, then the chain is cut at ``threshold``; it is kept as the request's last chain."""
        self.acceptance.observe(request.last, tokens)
        chain, cells = scored_chain(request.pools.pools, tokens, k, self.settings.orders, 1, self.acceptance,
                                    threshold)
        request.last = Proposal(chain, cells, len(tokens))
        return chain

    def _maybe_save(self) -> None:
        if self.settings.pool_file is None:
            return
        if time.monotonic() - self._saved_at >= self.settings.pool_save_seconds:
            self.save_pool()

    def save_pool(self, path: str | Path | None = None) -> None:
        """Write the shared pool to ``path`` (default ``OUROBOROS_VLLM_POOL``) atomically (a temporary file
        renamed over it); without either, nothing."""
        path = Path(path) if path is not None else self.settings.pool_file
        if path is None:
            return
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.shared.save(tmp)
        os.replace(tmp, path)
        self._saved_at = time.monotonic()
