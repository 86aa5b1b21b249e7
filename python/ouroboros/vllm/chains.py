"""Pool mode (model-free): phrases keyed by the last 1..``orders`` tokens of context, harvested from each request's
own history and, shared across requests, from every request's output; a row's chain follows the longest context that
the pools know.

Keys are :func:`~ouroboros.drafting.contexts.context_key`: a one-token key is the token id itself (what
:class:`~ouroboros.drafting.host_drafter.HostDrafter` looks up, so draft mode reads the same pools), a longer context
a negative hash."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

from ouroboros.drafting.contexts import context_key, context_phrases
from ouroboros.drafting.pool import PhrasePool
from ouroboros.vllm.confidence import AcceptanceModel, Cell

__all__ = ["context_key", "harvest", "MergedPool", "pool_chain", "scored_chain", "HistoryPools", "OWN_POOL_BYTES"]

OWN_POOL_BYTES = 4 << 20          # one request's own-history pool (the shared pool has its own budget)


def harvest(pool: PhrasePool, tokens: Sequence[int], start: int, orders: int) -> int:
    """Insert into ``pool`` every phrase of ``tokens`` whose key token sits at index >= ``start``
    (:func:`~ouroboros.drafting.contexts.context_phrases`: under the contexts of 1..``orders`` tokens before it), left
    to right. Returns the first key index not harvested yet (what ``start`` is next time)."""
    pool.insert_many(context_phrases(tokens, start, pool.phrase_len, orders))
    return max(start, len(tokens) - pool.phrase_len)


@dataclass
class MergedPool:
    """One request's view of the pools: its own history first, then the shared output pool (a lookup merges them,
    duplicates dropped); the lookup interface of :class:`PhrasePool`, for the drafter."""

    own: PhrasePool
    shared: PhrasePool

    @property
    def phrase_len(self) -> int:
        return self.own.phrase_len

    def lookup(self, key: int, k: int | None = None) -> list[tuple[int, ...]]:
        """Up to ``k`` phrases of ``key``: the own pool's newest first, then the shared pool's not seen yet."""
        out = self.own.lookup(key, k)
        for phrase in self.shared.lookup(key, k):
            if phrase not in out:
                out.append(phrase)
        return out if k is None else out[:k]


def _phrases(pools: MergedPool, tokens: Sequence[int], orders: int,
             min_order: int) -> Iterator[tuple[tuple[int, ...], int]]:
    """Phrase after phrase of pool mode's chain after ``tokens``, each with its context order: the newest phrase
    under the longest context (``orders`` tokens down to ``min_order``) that either pool knows, own history first,
    the context then extended by the phrase; ends when no context of at least ``min_order`` tokens is known."""
    context = [int(t) for t in tokens[-orders:]]
    while True:
        for o in range(min(orders, len(context)), min_order - 1, -1):
            found = pools.lookup(context_key(context[-o:]), 1)
            if found:
                yield found[0], o
                context = (context + list(found[0]))[-orders:]
                break
        else:
            return


def pool_chain(pools: MergedPool, tokens: Sequence[int], k: int, orders: int, min_order: int) -> list[int]:
    """The chain pool mode proposes after ``tokens``: phrase after phrase, each the newest one under the longest
    context (``orders`` tokens down to ``min_order``) that either pool knows, own history first; at most ``k``
    tokens, [] when no context of at least ``min_order`` tokens is known."""
    return scored_chain(pools, tokens, k, orders, min_order)[0]


def scored_chain(pools: MergedPool, tokens: Sequence[int], k: int, orders: int, min_order: int,
                 model: AcceptanceModel | None = None, threshold: float = 0.0) -> tuple[list[int], list[Cell]]:
    """:func:`pool_chain`'s chain, each token with its cell (its phrase's context order, its position in the
    phrase), cut by ``model`` at ``threshold`` (:meth:`~ouroboros.vllm.confidence.AcceptanceModel.cut`): a prefix
    of :func:`pool_chain`'s chain, the whole of it without a model or with ``threshold`` 0."""
    chain: list[int] = []
    cells: list[Cell] = []
    for phrase, order in _phrases(pools, tokens, orders, min_order):
        chain.extend(phrase)
        cells.extend((order, i) for i in range(len(phrase)))
        if len(chain) >= k:
            break
    chain, cells = chain[:k], cells[:k]
    if model is not None:
        n = model.cut(cells, threshold)
        chain, cells = chain[:n], cells[:n]
    return chain, cells


class HistoryPools:
    """One request's own pool and the harvest bookkeeping: its prompt and output go into its own pool, its output
    also into the shared pool (the phrases keyed at the prompt's last token onwards: ``tokens``, as first seen, is
    the prompt plus the first token vLLM sampled)."""

    def __init__(self, shared: PhrasePool, tokens: Sequence[int], orders: int) -> None:
        own = PhrasePool(ngram=shared.ngram, guess_set=shared.guess_set, max_bytes=OWN_POOL_BYTES)
        self.pools = MergedPool(own, shared)
        self.orders = orders
        self.own_next = 0
        self.shared_next = max(len(tokens) - 2, 0)

    def update(self, tokens: Sequence[int]) -> None:
        """Harvest what ``tokens`` (the request's whole history now) adds since the last update."""
        self.own_next = harvest(self.pools.own, tokens, self.own_next, self.orders)
        self.shared_next = harvest(self.pools.shared, tokens, self.shared_next, self.orders)
