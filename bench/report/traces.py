"""Report of an acceptance-traces JSON (``bench.e2e`` writes them, ``bench.e2e_gpu`` replays them): per method, the
prompts, cycles and tokens, and the means per cycle of tree size, accepted tokens, draft length and forwards."""
from __future__ import annotations


def lines(data: dict) -> list[str]:
    m = data.get("machine") or {}
    out = [f"traces of {data.get('pair', '?')} on {data.get('dataset', '?')}, {data.get('n_prompts', '?')} prompts x "
           f"{data.get('max_new_tokens', '?')} new tokens ({m.get('cpu', '?')}, {data.get('date_utc', '?')})",
           f"{'method':18s} {'prompts':>7s} {'cycles':>7s} {'tokens':>7s} {'tree/cyc':>8s} {'acc/cyc':>8s} "
           f"{'dlen/cyc':>8s} {'dfwd/cyc':>8s}  params"]
    for label, entry in (data.get("methods") or {}).items():
        cycles = [c for p in entry.get("prompts", []) for c in (p.get("trace") or [])]
        n = max(len(cycles), 1)

        def mean(key, cycles=cycles, n=n):
            return sum(c.get(key) or 0 for c in cycles) / n

        params = ",".join(f"{k}={v}" for k, v in (entry.get("resolved_params") or {}).items())
        out.append(f"{label:18s} {len(entry.get('prompts', [])):7d} {len(cycles):7d} "
                   f"{sum(p.get('tokens', 0) for p in entry.get('prompts', [])):7d} {mean('tree_size'):8.2f} "
                   f"{mean('accepted'):8.2f} {mean('draft_len'):8.2f} {mean('draft_forwards'):8.2f}  {params}")
    return out
