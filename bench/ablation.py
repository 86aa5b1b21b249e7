"""The issue #29 ablation table, assembled from ``bench.e2e`` runs (one per workload) that ran the components as points.

Each input is a ``python -m bench.e2e --points "scored=0;scored=1;scored=1,model_free=0.3;..."`` JSON with the
methods ``ouroboros`` (a fresh pool per prompt: cold) and ``ouroboros_warm`` (one pool carried across the prompts:
warm) beside the HF baselines; every number below comes from those files, measured side by side::

    python -m bench.ablation bench/results/ablation/*_128.json --out bench/results/ablation/ablation_cpu.json

Per (workload, label): tokens per target forward, draft forwards per token, tokens/s, the ratio to HF greedy (or HF
sampling) of the same run, the share of outputs identical to HF greedy, and the model-free cycles and recycled phrases
summed over the prompts (from the engine's own stats).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common import utc_now, write_json

COMPONENTS = ("scored", "model_free", "recycle")
# A sampling run's plain "ouroboros" label is the library default, which became a sampling draft on a CPU on
# 2026-12-07 (commit 36149d6, ``ouroboros.core.config.default_draft_sampling``): runs started after this time ran it,
# earlier ones (the 0-4 tuning run among them) proposed one-hot tokens.
SAMPLING_DRAFT_DEFAULT_SINCE = "2026-12-07 15:10"
EXPLICIT_DRAFT = {"ouroboros_ds": "sampled", "speculative_ds": "sampled", "ouroboros_onehot": "one-hot"}


def draft_of(run: dict, label: str) -> str | None:
    """How a sampling run's ``label`` drafted ("sampled" / "one-hot"); None for greedy runs and the HF baselines."""
    if run.get("sampling") is None or label.startswith("hf_"):
        return None
    name = label.split("[")[0]
    if name in EXPLICIT_DRAFT:
        return EXPLICIT_DRAFT[name]
    new_default = name.startswith("ouroboros") and run["date_utc"] >= SAMPLING_DRAFT_DEFAULT_SINCE
    return "sampled" if new_default else "one-hot"


def _engine_sum(per_prompt: list[dict], name: str) -> int:
    return sum(int(p.get("stats", {}).get(name, 0) or 0) for p in per_prompt)


def rows_of(path: str | Path) -> list[dict]:
    """One row per label of one ``bench.e2e`` JSON (HF baselines included, for reference)."""
    run = json.loads(Path(path).read_text())
    base = "hf_sample" if "hf_sample" in run["summary"] else "hf_greedy"
    out = []
    for label, s in run["summary"].items():
        per_prompt = run["per_method"][label]["per_prompt"]
        cfg = s.get("config") or {}
        tokens = s["tokens"]
        out.append({
            "workload": run["dataset"], "prompts": f"{run['offset']}-{run['offset'] + run['n_prompts'] - 1}",
            "label": label, "pool": "warm" if label.startswith("ouroboros_warm") else "cold",
            **{c: cfg.get(c) for c in COMPONENTS}, "draft": draft_of(run, label),
            "tokens_per_target_forward": round(s["accepted_per_target_forward"], 2),
            "draft_forwards_per_token": round(s["draft_forwards"] / tokens, 3) if tokens else None,
            "tokens_per_s": round(s["tokens_per_s"], 3),
            f"vs_{base}": round(s.get(f"speedup_vs_{base}", 1.0), 3),
            "identical": s.get("identical_to_hf_greedy"),
            "model_free_cycles": _engine_sum(per_prompt, "model_free_cycles"),
            "recycled": _engine_sum(per_prompt, "recycled"),
        })
    return out


def table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    lines = ["| workload | prompts | label | sampling draft | tok/target fwd | draft fwd/tok | tok/s | vs HF | identical | "
             "model-free cycles | recycled |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r.get("vs_hf_greedy", r.get("vs_hf_sample"))
        lines.append(f"| {r['workload']} | {r['prompts']} | {r['label']} | {r['draft'] or '-'} | "
                     f"{r['tokens_per_target_forward']} | "
                     f"{r['draft_forwards_per_token']} | {r['tokens_per_s']:.2f} | {ratio:.2f}x | "
                     f"{r['identical'] if r['identical'] is not None else '-'} | {r['model_free_cycles']} | "
                     f"{r['recycled']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", help="bench.e2e JSON files")
    p.add_argument("--out", default=None, help="write the rows here (JSON)")
    args = p.parse_args(argv)
    runs = [p for p in args.inputs if "per_method" in json.loads(Path(p).read_text())]   # e2e runs (not this table)
    rows = [r for path in runs for r in rows_of(path)]
    if args.out:
        write_json(args.out, {"date_utc": utc_now(), "inputs": [str(x) for x in runs], "rows": rows})
    print(table(rows))


if __name__ == "__main__":
    main()
