"""One ouroboros call at a time per model (and per pool): a second overlapping call raises instead of corrupting.

A call keeps state on its models that a second call would share: the fast path's static runner (static KV buffers,
CUDA graphs) is cached on the model as ``model._ouroboros_static_runner``, and a :class:`~ouroboros.PhrasePool` is
an unsynchronised LRU. So every ``ouroboros.stream`` / ``generate`` / ``custom_generate`` call takes its models and
its pool for its whole duration, without blocking: if one of them is already taken - by a call running in another
thread, or by an unfinished stream of this same thread (interleaving two generators breaks the runner just as
much) - it raises ``RuntimeError`` saying what to do. Different models (and pools) run concurrently. The cost is a
dict update under a lock per call; nothing per token.
"""
from __future__ import annotations

import threading

__all__ = ["Lease", "acquire"]

_lock = threading.Lock()
_holders: dict[int, int] = {}          # id(object) -> ident of the thread whose call holds it


def _name(obj: object) -> str:
    return f"{type(obj).__name__} at {id(obj):#x}"


class Lease:
    """Exclusive use of some objects by one call; :meth:`release` (or leaving the ``with`` block) gives them back.

    Holds strong references to its objects while held, so their ``id`` cannot be reused meanwhile.
    """

    def __init__(self, objects: list[object]) -> None:
        self._objects = objects

    def release(self) -> None:
        """Give the objects back (idempotent)."""
        with _lock:
            for obj in self._objects:
                _holders.pop(id(obj), None)
        self._objects = []

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(*objects: object) -> Lease:
    """Take ``objects`` (``None`` skipped, duplicates - a draft that is the target - counted once) for one call.

    All or nothing, never blocks. Raises ``RuntimeError`` naming the first object already held and the remedy.
    """
    unique = list({id(o): o for o in objects if o is not None}.values())
    me = threading.get_ident()
    with _lock:
        for obj in unique:
            holder = _holders.get(id(obj))
            if holder is None:
                continue
            where = ("an unfinished ouroboros.stream of this same thread (exhaust it or call its close() first)"
                     if holder == me else "a call running in another thread")
            raise RuntimeError(
                f"{_name(obj)} is already in use by {where}. One model (or pool) serves one ouroboros call at a time: "
                f"its KV cache runner (and CUDA graphs) and the pool's LRU would be shared. Wait for the other call to "
                f"finish, serialize the calls with a lock, or give each thread its own model (and pool).")
        for obj in unique:
            _holders[id(obj)] = me
    return Lease(unique)
