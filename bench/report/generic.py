"""Report of a JSON no benchmark module wrote (a hand-written record such as ``cpu_tuning.json``, or one whose writer
reports it itself, such as ``bench.cost_model``'s): its ``what``, its ``table`` or ``rows``, its ``conclusion``."""
from __future__ import annotations


def _cell(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else "-" if v is None else str(v)


def lines(data) -> list[str]:
    if not isinstance(data, dict):
        return [f"a JSON {type(data).__name__} of {len(data)} items (no report for it)"]
    out = [str(data["what"])] if data.get("what") else []
    if isinstance(data.get("table"), list):
        out += [str(line) for line in data["table"]]
    rows = data.get("rows")
    if isinstance(rows, list) and rows and isinstance(rows[0], dict):
        keys = list(dict.fromkeys(k for r in rows for k in r))
        width = {k: max(len(k), *(len(_cell(r.get(k))) for r in rows)) for k in keys}
        out.append("  ".join(f"{k:>{width[k]}}" for k in keys))
        out += ["  ".join(f"{_cell(r.get(k)):>{width[k]}}" for k in keys) for r in rows]
    if data.get("conclusion"):
        out.append(str(data["conclusion"]))
    if len(out) <= 1:
        out.append("keys: " + ", ".join(data))
    return out
