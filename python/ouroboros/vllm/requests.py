"""Per-request state without request ids: vLLM passes each step's running requests as rows, repacked between steps,
so a row is matched to its state by content (the state's history is a prefix of the row's), and the state of a
request that is no longer running is freed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

import numpy as np

__all__ = ["RequestState", "RequestTable"]

S = TypeVar("S")


@dataclass
class RequestState(Generic[S]):
    """One request as last seen: its history (prompt + output) as of the last step it ran in, and what a mode keeps
    for it (``data``)."""

    tokens: np.ndarray
    data: S


def _extends(row: np.ndarray, state: RequestState) -> bool:
    n = len(state.tokens)
    return len(row) >= n and bool(np.array_equal(row[:n], state.tokens))


class RequestTable(Generic[S]):
    """The states of the requests of the last step, matched to this step's rows by content.

    Guarantees of :meth:`step`: each row gets exactly one state; a row gets an existing state only if that state's
    history is a prefix of the row's history (so a request keeps its state however rows are repacked, and two
    requests never share one); every other row gets a new state from ``new``; states matched by no row are freed
    (``free`` is called on their data), so the table never holds more states than the last step had rows.
    """

    def __init__(self, new: Callable[[np.ndarray], S], free: Callable[[S], None] = lambda data: None) -> None:
        self.new, self.free = new, free
        self.rows: list[RequestState[S] | None] = []      # the state of each row of the last step
        self.created = 0
        self.freed = 0

    def __len__(self) -> int:
        return sum(s is not None for s in self.rows)

    def step(self, histories: list[np.ndarray | None]) -> list[RequestState[S] | None]:
        """The state of every row (None where ``histories[i]`` is None: a row with nothing to propose for gets no
        state, and is not matched to one). Rows are first tried against the state that
        stood at the same index last step (vLLM keeps most rows in place), then against every unmatched state."""
        old = [s for s in self.rows if s is not None]
        taken: set[int] = set()
        out: list[RequestState[S] | None] = [None] * len(histories)
        pending = []
        for i, row in enumerate(histories):
            same = self.rows[i] if i < len(self.rows) else None
            if row is not None and same is not None and _extends(row, same):
                out[i] = same
                taken.add(id(same))
            elif row is not None:
                pending.append(i)
        for i in pending:
            row = histories[i]
            match = next((s for s in old if id(s) not in taken and _extends(row, s)), None)
            if match is None:
                match = RequestState(row.copy(), self.new(row))
                self.created += 1
            taken.add(id(match))
            out[i] = match
        for state, row in zip(out, histories):
            if state is not None:
                state.tokens = row.copy()
        for s in old:
            if id(s) not in taken:
                self.free(s.data)
                self.freed += 1
        self.rows = out
        return out
