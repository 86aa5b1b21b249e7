"""Where emitted tokens stop: the token budget and the EOS set."""
from __future__ import annotations

__all__ = ["clip_at_stop"]


def clip_at_stop(tokens: list[int], budget: int, eos: frozenset[int]) -> tuple[list[int], bool]:
    """At most ``budget`` tokens, cut after the first EOS; second value: generation is finished."""
    tokens = tokens[:budget]
    for i, tok in enumerate(tokens):
        if tok in eos:
            return tokens[:i + 1], True
    return tokens, len(tokens) == budget
