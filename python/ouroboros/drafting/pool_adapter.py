"""The host face of a :class:`~ouroboros.drafting.gpu_pool.GpuPhrasePool`: :class:`PhrasePool`'s per-call API over
the device tensors (each call may sync; the engine uses it only off the hot path)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch

from ouroboros.drafting.pool import PoolStats, check_weight, ranked_shares
from ouroboros_kernels.ngram import MAX_SCORE

__all__ = ["HostPoolAdapter"]


def _check_weight(weight: int) -> int:
    """``weight`` as an int >= 1 (:func:`~ouroboros.drafting.pool.check_weight`), capped at the device's largest
    count (:data:`ouroboros_kernels.ngram.MAX_SCORE`)."""
    return min(check_weight(weight), MAX_SCORE)


class HostPoolAdapter:
    """:class:`PhrasePool`'s calls on a :class:`GpuPhrasePool` (the slow, syncing compatibility path).

    Same results and counters as the CPU pool for keys in ``[0, vocab_size)``; inserting a key outside raises
    ``ValueError`` (the device pool cannot store it), looking one up finds nothing.
    """

    def __init__(self, gpu: "GpuPhrasePool") -> None:  # noqa: F821  (a type name only: gpu_pool imports this module)
        self.gpu = gpu

    ngram = property(lambda self: self.gpu.ngram)
    guess_set = property(lambda self: self.gpu.guess_set)
    max_keys = property(lambda self: self.gpu.max_keys)
    max_bytes = property(lambda self: self.gpu.max_bytes)
    phrase_len = property(lambda self: self.gpu.phrase_len)
    scored = property(lambda self: self.gpu.scored)

    def nbytes(self) -> int:
        return self.gpu.nbytes()

    @property
    def stats(self) -> PoolStats:
        return self.gpu.stats

    @stats.setter
    def stats(self, value: PoolStats) -> None:
        self.gpu.stats = value

    def __len__(self) -> int:
        return len(self.gpu)

    def num_keys(self) -> int:
        return self.gpu.num_keys()

    def __contains__(self, key: int) -> bool:
        key = int(key)
        return 0 <= key < self.gpu.vocab_size and int(self.gpu.tensors.key_to_slot[key].item()) >= 0

    def _key(self, key: int) -> int:
        key = int(key)
        if not 0 <= key < self.gpu.vocab_size:
            raise ValueError(f"key {key} outside the device pool's vocabulary [0, {self.gpu.vocab_size})")
        return key

    def _phrase(self, phrase: Sequence[int]) -> list[int]:
        phrase = [int(t) for t in phrase]
        if len(phrase) != self.gpu.phrase_len:
            raise ValueError(f"phrase must have ngram-1 = {self.gpu.phrase_len} tokens, got {len(phrase)}")
        return phrase

    def insert(self, key: int, phrase: Sequence[int], weight: int = 1) -> None:
        """:meth:`PhrasePool.insert`: ``weight`` (an integer >= 1, else ``ValueError``) adds to a scored pool's count
        (saturating at ``2**31 - 1`` on the device); an LRU pool checks and ignores it."""
        weight = _check_weight(weight)
        weights = [weight] if self.gpu.scored and weight != 1 else None
        self.gpu.insert_many([self._key(key)], [self._phrase(phrase)], weights)

    def insert_many(self, items: Iterable[tuple[int, Sequence[int]]]) -> None:
        items = [(self._key(k), self._phrase(p)) for k, p in items]
        if items:
            self.gpu.insert_many([k for k, _ in items], [p for _, p in items])

    def replace(self, key: int, old: Sequence[int], new: Sequence[int]) -> None:
        self.gpu.replace_many([self._key(key)], [self._phrase(old)], [self._phrase(new)])

    def replace_many(self, items: Iterable[tuple[int, Sequence[int], Sequence[int]]]) -> None:
        items = [(self._key(k), self._phrase(o), self._phrase(n)) for k, o, n in items]
        if items:
            self.gpu.replace_many(*([it[i] for it in items] for i in range(3)))

    def lookup(self, key: int, k: int | None = None) -> list[tuple[int, ...]]:
        key = int(key)
        if key < 0:  # the tensor path treats negative keys as padding; the CPU pool counts them as lookups
            self.gpu._stats[0] += 1
            return []
        phrases, valid = self.gpu.lookup(torch.tensor([key]), self.gpu.guess_set)
        rows = torch.cat([valid[0, :, None].long(), phrases[0]], dim=1).tolist()  # one device -> host copy
        out = [tuple(r[1:]) for r in rows if r[0]]
        return out if k is None else out[:k]

    def _list(self, key: int) -> tuple[list[tuple[int, ...]], list[int] | None]:
        """``key``'s phrases in stored order and (scored pool) their counts, else ``None``; empty for a key outside
        the vocabulary or absent (no counters touched)."""
        key = int(key)
        t, scores = self.gpu.tensors, self.gpu.scores
        slot = int(t.key_to_slot[key].item()) if 0 <= key < self.gpu.vocab_size else -1
        if slot < 0:
            return [], None if scores is None else []
        c = int(t.counts[slot].item())
        return [tuple(r) for r in t.phrases[slot, :c].tolist()], None if scores is None else scores[slot, :c].tolist()

    def phrases(self, key: int) -> list[tuple[int, ...]]:
        """All phrases of ``key`` in stored order (no counters touched): LRU oldest first; scored in rank order,
        lowest count first (ties oldest first)."""
        return self._list(key)[0]

    def lookup_scored(self, key: int, k: int | None = None, prior: float = 0) -> list[tuple[tuple[int, ...], float]]:
        """:meth:`PhrasePool.lookup_scored`: the phrases :meth:`lookup` would return, each with its count over the
        sum of ``key``'s counts plus ``prior`` (an LRU pool counts each phrase once). No counters touched."""
        return ranked_shares(*self._list(key), k, prior)

    def best(self, key: int, prior: float = 0) -> tuple[tuple[int, ...], float] | None:
        """:meth:`PhrasePool.best`: ``key``'s first phrase by lookup order with its probability, or ``None``."""
        found = self.lookup_scored(key, 1, prior)
        return found[0] if found else None

    def count(self, key: int, phrase: Sequence[int]) -> int:
        """:meth:`PhrasePool.count`: ``phrase``'s count under ``key`` (an LRU pool: 1), 0 when absent."""
        phrases, counts = self._list(key)
        phrase = tuple(int(t) for t in phrase)
        if phrase not in phrases:
            return 0
        return 1 if counts is None else counts[phrases.index(phrase)]

    def keys(self) -> list[int]:
        return self.gpu.state_dict()["keys"].tolist()

    def seed_from(self, tokens: Sequence[int]) -> None:
        tokens = [int(t) for t in tokens]
        n = self.gpu.phrase_len
        for t in tokens[:max(0, len(tokens) - n)]:
            self._key(t)
        self.gpu.seed_from(tokens)

    def clear(self) -> None:
        self.gpu.clear()

    def state_dict(self) -> dict:
        return self.gpu.state_dict()

    def save(self, path: str | Path) -> None:
        self.gpu.save(path)
