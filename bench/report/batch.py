"""Report of the batch benchmarks: ``bench.batch_e2e`` (the per-B table it recorded) and ``bench.batch_forward_costs``
(ms of one batched forward by B x T, target and draft)."""
from __future__ import annotations


def _costs(data: dict) -> list[str]:
    out = [f"ms of one batched forward, {data.get('label', '')} (prefix {data.get('prefix_tokens')} tokens per row)"]
    for name in ("target_ms", "draft_ms"):
        table = data[name]
        tokens = sorted({int(t) for row in table.values() for t in row})
        out.append(f"| {name} B \\ T | " + " | ".join(str(t) for t in tokens) + " |")
        out.append("|" + "---|" * (1 + len(tokens)))
        for b in sorted(table, key=int):
            out.append(f"| {b} | " + " | ".join(f"{table[b].get(str(t), '-')}" for t in tokens) + " |")
    return out


def lines(data: dict) -> list[str]:
    """The table lines of a batch benchmark JSON."""
    if "target_ms" in data:
        return _costs(data)
    return [str(data.get("what", "batch benchmark"))] + [str(line) for line in data["table"]]
