"""Report of a ``bench.cpu_linear`` JSON: F.linear vs the small-M path per weight shape and row count."""
from __future__ import annotations


def row_line(row: dict) -> str:
    """One measurement as the benchmark prints it while it runs."""
    return (f"{row['weight']:22s} M={row['rows']:2d} F.linear {row['f_linear_ms']:8.2f} ms  small-M "
            f"{row['small_m_ms']:8.2f} ms  {row['f_linear_ms'] / row['small_m_ms']:4.2f}x")


def lines(data: dict) -> list[str]:
    m = data.get("machine") or {}
    return [f"{data.get('dtype', 'float32')} on {m.get('cpu', '?')}, {m.get('threads', '?')} threads, torch "
            f"{m.get('torch', '?')}", *(row_line(r) for r in data["rows"])]
