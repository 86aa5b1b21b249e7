"""Phrases from verification (SPEC §2 step 4): what the target's verification teaches the pool."""
from __future__ import annotations

from typing import Sequence

from ouroboros.drafting.pool import PhrasePool
from ouroboros.hf.tree_step import StepResult

__all__ = ["mine_verification"]


def mine_verification(pool: PhrasePool, result: StepResult, draft: Sequence[int],
                      suffixes: Sequence[Sequence[int]]) -> None:
    """Phrases from verification (SPEC §2 step 4): (a) the target's argmax runs after rejected draft positions;
    (b) every verified suffix rewritten as the target's own predictions, replacing it in place. One batch each."""
    n = pool.phrase_len
    argmax, trunk = result.argmax, result.trunk
    accepted = result.trunk_accepted
    if accepted < len(draft):
        pool.insert_many((draft[j], [argmax[trunk[j + i]] for i in range(n)])
                         for j in range(accepted, len(draft) - n + 1))
    key = result.tree.tokens[result.tip]
    pool.replace_many((key, suffix, [argmax[result.tip]] + [argmax[node] for node in nodes[:n - 1]])
                      for suffix, nodes in zip(suffixes, result.branches))
