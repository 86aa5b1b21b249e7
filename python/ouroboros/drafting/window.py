"""The 2-D Jacobi window of lookahead decoding (SPEC §2 step 1): W columns of N-1 levels that mine new n-grams."""
from __future__ import annotations

import random
from typing import Sequence

from ouroboros.drafting.pool import PhrasePool
from ouroboros.hf.tree_step import StepResult

__all__ = ["initial_columns", "LookaheadWindow"]


def initial_columns(ngram: int, width: int, context: Sequence[int], seed: int = 0) -> list[list[int]]:
    """The Jacobi window's starting state: ``width`` columns of N-1 tokens drawn from ``context`` (seeded)."""
    rng = random.Random(seed)
    return [[int(context[rng.randrange(len(context))]) for _ in range(ngram - 1)] for _ in range(width)]


class LookaheadWindow:
    """The 2-D Jacobi window: ``width`` columns of N-1 levels, each a chain hanging off the last token.

    After a forward, each column yields the n-gram (column[0]; column[1:] + prediction at its last level), which goes
    into the pool, and the column becomes that phrase (the window slides one level).
    """

    def __init__(self, ngram: int, width: int, context: Sequence[int], seed: int = 0) -> None:
        self.columns = initial_columns(ngram, width, context, seed)

    def advance(self, result: StepResult, pool: PhrasePool) -> None:
        """Slide every column using the predictions in ``result`` (whose first branches are the columns)."""
        for c, nodes in enumerate(result.branches[:len(self.columns)]):
            column = self.columns[c]
            phrase = column[1:] + [result.argmax[nodes[-1]]]
            pool.insert(column[0], phrase)
            self.columns[c] = phrase
