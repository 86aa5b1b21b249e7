"""Token trees built as tries, and the acceptance walk (SPEC §2 steps 2-3)."""
from __future__ import annotations

from typing import Sequence

__all__ = ["TokenTree"]


class TokenTree:
    """A trie of tokens hanging off a cached prefix.

    Node indices grow in insertion order and parents precede children, so index order is topological. ``add_path``
    merges a path with an existing identical prefix, so siblings always carry distinct tokens: at most one child of a
    node can equal the model's argmax there.
    """

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.depths: list[int] = []
        self._children: list[dict[int, int]] = []
        self._roots: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def add_path(self, parent: int, tokens: Sequence[int]) -> list[int]:
        """Add ``tokens`` as a chain under ``parent`` (-1: under the prefix), reusing existing nodes; returns their ids."""
        ids = []
        for tok in tokens:
            tok = int(tok)
            siblings = self._roots if parent < 0 else self._children[parent]
            node = siblings.get(tok)
            if node is None:
                node = len(self.tokens)
                siblings[tok] = node
                self.tokens.append(tok)
                self.parents.append(parent)
                self.depths.append(0 if parent < 0 else self.depths[parent] + 1)
                self._children.append({})
            ids.append(node)
            parent = node
        return ids

    def children(self, node: int) -> list[tuple[int, int]]:
        """``(child node, token)`` pairs of ``node`` (-1: the roots) in insertion order; tokens are distinct."""
        siblings = self._roots if node < 0 else self._children[node]
        return [(child, tok) for tok, child in siblings.items()]

    def walk(self, start: int, argmax: Sequence[int]) -> list[int]:
        """Accepted nodes below ``start``: follow the child equal to ``argmax`` at each node until none matches."""
        path = []
        node = self._children[start].get(int(argmax[start]))
        while node is not None:
            path.append(node)
            node = self._children[node].get(int(argmax[node]))
        return path
