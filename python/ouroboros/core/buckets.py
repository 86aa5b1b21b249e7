"""Tree-size buckets: fixed-shape forwards are padded to one of these sizes (one CUDA graph per bucket)."""
from __future__ import annotations

__all__ = ["BUCKETS", "bucket"]

BUCKETS = (1, 16, 32, 64, 128, 256, 512)


def bucket(tokens: int) -> int:
    """The smallest bucket that holds ``tokens`` tokens; past the largest, ``tokens`` itself (an exact size)."""
    for b in BUCKETS:
        if tokens <= b:
            return b
    return tokens
