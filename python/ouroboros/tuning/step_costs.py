"""Step costs of the cost model: milliseconds per forward as a function of its token count, over measured buckets.

A forward of T tokens runs in the static runner's bucket for T (:data:`ouroboros.core.buckets.BUCKETS`) and costs
what the measured points say at that bucket, piecewise-linear between them. Nothing is extrapolated: a bucket outside
the measured points, or T past the largest bucket, is a ValueError.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ouroboros.core.buckets import BUCKETS
from ouroboros.core.buckets import bucket as runner_bucket

__all__ = ["bucket", "interpolate", "StepCosts", "load_step_costs"]


def bucket(tokens: int) -> int:
    """The static-runner bucket that holds ``tokens`` tokens (:func:`ouroboros.core.buckets.bucket`), always one of
    ``BUCKETS``: ValueError past the largest (the runner would run an exact size there, which nobody measured)."""
    size = runner_bucket(tokens)
    if size > BUCKETS[-1]:
        raise ValueError(f"{tokens} tokens exceed the largest bucket {BUCKETS[-1]}")
    return size


def interpolate(points: Mapping[int, float], t: int, what: str) -> float:
    """``points`` read at ``t``: exact at a measured T, linear between the two measured T around it. ValueError
    (naming ``what``) when ``t`` lies outside the measured T range: no extrapolation."""
    keys = sorted(points)
    if not keys[0] <= t <= keys[-1]:
        raise ValueError(f"{what} step cost at T={t} is outside the measured points T={keys[0]}..{keys[-1]}")
    for lo, hi in zip(keys, keys[1:]):
        if lo <= t <= hi:
            return points[lo] + (points[hi] - points[lo]) * (t - lo) / (hi - lo)
    return points[keys[0]]


def _points(raw: Mapping) -> dict[int, float]:
    """``{"16": 4.2}``-style JSON points -> ``{16: 4.2}``."""
    return {int(t): float(ms) for t, ms in raw.items()}


@dataclass(frozen=True)
class StepCosts:
    """Milliseconds per forward as a function of its token count T (piecewise-linear over measured buckets).

    target: the target's verification forward, ``{T: ms}``; draft: a draft forward, ``{T: ms}``;
    per_forward_ms: what a draft step adds to its forward (pool lookup, acceptance, window, KV commit);
    per_cycle_ms: bookkeeping once per cycle (KV keep, tree build, pool updates, the host read).
    Construction guarantees T >= 1 integers, ms > 0 and bookkeeping >= 0 (ValueError otherwise).
    """

    target: Mapping[int, float]
    draft: Mapping[int, float]
    per_forward_ms: float = 0.0
    per_cycle_ms: float = 0.0
    label: str = ""

    def __post_init__(self) -> None:
        for name in ("target", "draft"):
            points = getattr(self, name)
            if not points or any(not isinstance(t, int) or t < 1 or not ms > 0 for t, ms in points.items()):
                raise ValueError(f"{name} step costs must map T >= 1 to ms > 0, got {points!r}")
        if not (self.per_forward_ms >= 0 and self.per_cycle_ms >= 0):
            raise ValueError(f"bookkeeping ms must be >= 0, got {self.per_forward_ms}, {self.per_cycle_ms}")

    def target_ms(self, tokens: int) -> float:
        """One target forward over a tree of ``tokens`` nodes, run in its bucket (ValueError: unmeasured bucket)."""
        return interpolate(self.target, bucket(tokens), "target")

    def draft_ms(self, tokens: int) -> float:
        """One draft forward over ``tokens`` layout tokens, run in its bucket (ValueError: unmeasured bucket)."""
        return interpolate(self.draft, bucket(tokens), "draft")

    def rescaled(self, target: tuple[float, float], draft: tuple[float, float], *, per_forward_ms: float,
                 per_cycle_ms: float, label: str) -> StepCosts:
        """These costs' shape over T, mapped affinely so that T=1 and T=64 cost exactly ``(ms at T=1, ms at T=64)``;
        every bucket inside the measured range gets a point (rounded to 4 decimals)."""
        def scale(points: Mapping[int, float], ends: tuple[float, float], what: str) -> dict[int, float]:
            full = {t: interpolate(points, t, what) for t in BUCKETS if min(points) <= t <= max(points)}
            lo, hi = full[1], full[64]
            return {t: round(ends[0] + (ms - lo) * (ends[1] - ends[0]) / (hi - lo), 4) for t, ms in full.items()}

        return StepCosts(scale(self.target, target, "target"), scale(self.draft, draft, "draft"), per_forward_ms,
                         per_cycle_ms, label)

    def as_dict(self) -> dict:
        """A JSON-ready dict (ms rounded to 4 decimals); :meth:`from_dict` reads it back."""
        return {"label": self.label, "target_ms": {str(t): round(v, 4) for t, v in sorted(self.target.items())},
                "draft_ms": {str(t): round(v, 4) for t, v in sorted(self.draft.items())},
                "per_forward_ms": self.per_forward_ms, "per_cycle_ms": self.per_cycle_ms}

    @classmethod
    def from_dict(cls, data: Mapping) -> StepCosts:
        """The inverse of :meth:`as_dict`: ``from_dict(c.as_dict()) == c`` for costs given to 4 decimals."""
        return cls(_points(data["target_ms"]), _points(data["draft_ms"]), float(data["per_forward_ms"]),
                   float(data["per_cycle_ms"]), data.get("label", ""))


def load_step_costs(e2e_gpu_json: str | Path, *, interface: str = "host") -> StepCosts:
    """The unfused step costs a ``bench/e2e_gpu.py`` run measured: the target's verify per bucket (``interface``
    "host": through ``forward_tree``, tree upload + argmax read, what the engine and the replay pay; "device": the
    graph replay alone), the draft forward at T = 1, 16 and at the measured draft layout's bucket, that draft step's
    overhead per forward, and per cycle the tree build + mask + walk and the host pool updates (an insert and the
    suffix replacement; the KV keep gathers only a non-contiguous path, so it is not in it). ValueError when the run
    has no step-cost stage or ``interface`` is neither."""
    if interface not in ("host", "device"):
        raise ValueError(f"interface must be 'host' or 'device', got {interface!r}")
    data = json.loads(Path(e2e_gpu_json).read_text())
    steps = next((p["step_costs"] for p in (data.get("pairs") or {}).values() if "step_costs" in p), None)
    if steps is None:
        raise ValueError(f"{e2e_gpu_json} has no step_costs (that stage did not run)")
    lay, book = steps["draft_layout"], steps["bookkeeping"]
    draft = {int(t): float(v) for t, v in steps["draft_forward_device"].items()}
    draft[int(lay["tokens_bucket"])] = float(lay["forward_ms"])
    target = steps["target_verify_host_interface" if interface == "host" else "target_verify_device"]
    per_cycle = book["host_tree_build_mask_walk"] + book["host_adapter_pool_insert_4"] \
        + book["host_adapter_pool_replace_topk"]
    return StepCosts({int(t): float(v) for t, v in target.items()}, draft, round(lay["step_overhead_ms"], 4),
                     round(per_cycle, 4), f"{data.get('card', '?')} unfused ({interface} verify), {e2e_gpu_json}")
