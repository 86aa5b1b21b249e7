"""Report of a forward-costs JSON (``python -m bench.e2e --forward-costs``): ms of one forward by tree size."""
from __future__ import annotations


def lines(data: dict) -> list[str]:
    out = []
    for dtype, run in (data.get("runs") or {}).items():
        costs = run.get("costs") or {}
        m = run.get("machine") or {}
        out.append(f"{dtype}: one forward of T new tokens after {run.get('context_tokens')} cached, median ms "
                   f"({m.get('cpu', '?')}, {m.get('torch_threads', '?')} threads)")
        for role in ("target", "draft"):
            by_t = costs.get(role) or {}
            out.append(f"  {role:6s} " + " ".join(f"T{t}={v['median_s'] * 1e3:.1f}" for t, v in by_t.items())
                       + "  (x T1: " + " ".join(f"{v.get('relative_to_T1', 0):.2f}" for v in by_t.values()) + ")")
        if costs.get("draft_over_target_T1") is not None:
            out.append(f"  draft / target at T1: {costs['draft_over_target_T1']:.2f}")
    return out
