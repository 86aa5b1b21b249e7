"""Top-k recycling (issue #29 item 3, after Token Recycling, ACL 2025): the target's own second choices, kept.

Every verification forward already computes logits at every tree node. :class:`Recycler` keeps, per token, the
target's top-k next tokens the last time it saw that token (an adjacency table: token -> top-k successors, newest
wins, bounded), and turns every verified position into phrases: at a node on the accepted path (or the last decided
token) holding token t, each of the target's top-k candidates c after it (the argmax, already in the text, aside)
starts a phrase c, s(c), s(s(c)), ... continued through the table's best successors (where the table has none yet,
by the pool's own best phrase after that token). They go into the pool under t
with weight 1 (one batched insertion per cycle, no extra forward), so later cycles can draft the target's own
alternatives. Proposals stay deterministic functions of target argmaxes and logits: lossless as any pooled phrase.
"""
from __future__ import annotations

from collections import OrderedDict

from ouroboros.hf.tree_step import StepResult

__all__ = ["Recycler"]

MAX_TOKENS = 1 << 16     # tokens the adjacency table remembers (least recently updated dropped): <= ~10 MB at k=8


class Recycler:
    """The adjacency table and the phrases it makes (see the module docstring): ``k`` candidates per position
    besides the argmax, so the verifier is asked for the top ``k + 1``."""

    def __init__(self, k: int, phrase_len: int, max_tokens: int = MAX_TOKENS) -> None:
        if k < 1:
            raise ValueError(f"recycling keeps k >= 1 candidates, got {k}")
        self.k, self.phrase_len, self.max_tokens = k, phrase_len, max_tokens
        self.next: OrderedDict[int, tuple[int, ...]] = OrderedDict()
        self.inserted = 0

    def observe(self, result: StepResult) -> None:
        """Record the top-k after every node of a verified tree (``result.topk``, from ``tree_step(topk=k)``)."""
        for token, top in zip(result.tree.tokens, result.topk):
            self.next[token] = tuple(top[:self.k])
            self.next.move_to_end(token)
        while len(self.next) > self.max_tokens:
            self.next.popitem(last=False)

    def _continue(self, first: int, pool) -> list[int] | None:
        """``first`` and ``phrase_len - 1`` tokens after it: the table's best successor of each token, else the rest
        of the pool's best phrase after it (no counters touched); None when neither knows the token."""
        phrase = [first]
        while len(phrase) < self.phrase_len:
            top = self.next.get(phrase[-1])
            if top:
                phrase.append(top[0])
                continue
            known = pool.best(phrase[-1]) if pool is not None else None
            if known is None:
                return None
            phrase += list(known[0][:self.phrase_len - len(phrase)])
        return phrase

    def phrases(self, result: StepResult, pool=None) -> list[tuple[int, list[int]]]:
        """``(key, phrase)`` for every verified position of ``result`` (the last decided token and the accepted
        path) and each of its top candidates but the argmax (``k`` of them), where the table (or ``pool``) can
        continue it."""
        out = []
        for node in [result.given[-1], *result.path]:
            key = result.tree.tokens[node]
            for cand in result.topk[node]:
                if cand == result.argmax[node]:
                    continue
                phrase = self._continue(cand, pool)
                if phrase is not None:
                    out.append((key, phrase))
        return out

    def recycle(self, pool, result: StepResult) -> int:
        """Observe ``result`` and insert its phrases into ``pool`` (one batch); the number inserted."""
        self.observe(result)
        items = self.phrases(result, pool)
        pool.insert_many(items)
        self.inserted += len(items)
        return len(items)
