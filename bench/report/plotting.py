"""matplotlib for the report step (Agg: files only, no display), or None with a note when it is missing."""
from __future__ import annotations


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a note) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install matplotlib): no PNG written")
        return None
    return plt
