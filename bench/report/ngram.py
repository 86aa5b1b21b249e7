"""Report of a ``bench.ngram`` JSON: median us per draft step (lookup + insert) per provider, vocabulary and batch,
with the speedup over the CPU dict pool."""
from __future__ import annotations


def row_line(row: dict) -> str:
    """One measurement as the benchmark prints it while it runs."""
    return f"  vocab={row['vocab']:>6} batch={row['batch']:>3} {row['provider']:<16} {row['us_median']:>12.1f} us"


def lines(data: dict) -> list[str]:
    s, rows = data["settings"], data["results"]
    on_gpu = data.get("kind") == "GPU"
    out = [f"phrase lookup + insert per draft step, G={s['guess_set']}, N={s['ngram']}, on {data['card']} "
           f"({'GPU' if on_gpu else 'CPU'}; median us, x = speedup over cpu-dict)"]
    names = list(dict.fromkeys(r["provider"] for r in rows))
    out.append(f"{'vocab':>7} {'batch':>5} " + " ".join(f"{p:>22}" for p in names))
    for vocab in s["vocab"]:
        for batch in s["batches"]:
            sel = {r["provider"]: r["us_median"] for r in rows if r["vocab"] == vocab and r["batch"] == batch}
            base = sel.get("cpu-dict")
            cells = []
            for p in names:
                if p not in sel:
                    cells.append(f"{'-':>22}")
                else:
                    ratio = f" ({base / sel[p]:.2f}x)" if base else ""
                    cells.append(f"{sel[p]:>13.1f}{ratio:>9}")
            out.append(f"{vocab:>7} {batch:>5} " + " ".join(cells))
    return out
