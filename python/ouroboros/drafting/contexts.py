"""Pool keys for contexts longer than one token: a phrase can be keyed by the last 1..k tokens before it, in the same
:class:`~ouroboros.drafting.pool.PhrasePool` as the one-token keys (which the drafters read).

A key of one token is the token id itself; a longer context is hashed to a negative int (a fixed polynomial hash, the
same in every process, so a saved pool stays valid), so the two kinds never collide."""
from __future__ import annotations

from collections.abc import Sequence

__all__ = ["context_key", "context_phrases"]

_MOD = (1 << 61) - 1


def context_key(context: Sequence[int]) -> int:
    """The pool key of ``context`` (1+ token ids): the id itself for one token, else a negative hash that differs
    between orders."""
    if len(context) == 1:
        return int(context[0])
    h = len(context)
    for t in context:
        h = (h * 1_000_003 + int(t) + 1) % _MOD
    return -1 - h


def context_phrases(tokens: Sequence[int], start: int, phrase_len: int, orders: int,
                    low: int = 1) -> list[tuple[int, list[int]]]:
    """``(key, phrase)`` for every phrase of ``tokens`` whose key token sits at index >= ``start``: for a key token at
    index i, the phrase ``tokens[i+1 : i+1+phrase_len]`` under the contexts ``tokens[i-o+1 : i+1]`` for
    o = ``low``..``orders`` (those that fit), left to right."""
    out = []
    for i in range(max(start, 0), len(tokens) - phrase_len):
        phrase = list(tokens[i + 1:i + 1 + phrase_len])
        out += [(context_key(tokens[i - o + 1:i + 1]), phrase) for o in range(low, min(orders, i + 1) + 1)]
    return out
