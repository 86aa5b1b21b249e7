"""e2e JSON files after the run: recompute a file's summaries from its per-prompt records, and join runs of one
setting over consecutive prompt ranges (a run its deadline stopped, and the rest with ``--offset``)."""
from __future__ import annotations

import json
from pathlib import Path

from bench.e2e_summary import build_summary, speedup_vs_temperature
from bench.report import report
from bench.report.e2e import table


def _resummarize_run(run: dict, exact: bool) -> dict:
    """Recompute one run's summary and table (in ``run``) from its per-prompt records; returns the summary."""
    results = run["per_method"]
    labels = list(results)
    runs = [(lab.split("[")[0], results[lab].get("params", {})) for lab in labels]
    stored = {lab: results[lab].get("resolved_params") for lab in labels}   # as resolved during the run
    summary = build_summary(results, labels, runs, "cpu", exact=exact)
    for lab in labels:
        results[lab]["resolved_params"] = stored[lab]
        if stored[lab] is not None:
            summary[lab]["resolved_params"] = stored[lab]
        else:
            summary[lab].pop("resolved_params", None)
    run["summary"], run["table"] = summary, table(summary).splitlines()
    return summary


def resummarize(path: Path) -> None:
    """Recompute the summary and table of an e2e JSON (a temperature sweep too) from its per-prompt records, then
    report it (table to stdout, PNG beside it)."""
    data = json.loads(path.read_text())
    if "per_temperature" in data:
        for temp, run in data["per_temperature"].items():
            _resummarize_run(run, exact=float(temp) == 0)
        data["speedup_vs_temperature"] = speedup_vs_temperature(data["per_temperature"])
    else:
        sampling = data.get("sampling")
        _resummarize_run(data, exact=sampling is None or sampling["temperature"] == 0)
    path.write_text(json.dumps(data, indent=1))
    lines, _ = report(path)
    print("\n".join(lines))


MERGE_KEYS = ("pair", "dtype", "dataset", "max_new_tokens", "prompt_format", "draft_quant", "ouroboros_params_override",
              "sampling")


def merge(paths: list[str], out: Path | None) -> None:
    """Join runs of one setting over consecutive prompt ranges into ``out`` (default: the first path)."""
    parts = sorted((json.loads(Path(p).read_text()) for p in paths), key=lambda d: d["offset"])
    first = parts[0]
    for d in parts[1:]:
        diff = [k for k in MERGE_KEYS if d.get(k) != first.get(k)]
        if diff or list(d["per_method"]) != list(first["per_method"]):
            raise SystemExit(f"cannot merge: settings differ in {diff or ['methods']}")
    for a, b in zip(parts, parts[1:]):
        if b["offset"] != a["offset"] + a["n_prompts"]:
            raise SystemExit(f"cannot merge: prompts {a['offset']}..{a['offset'] + a['n_prompts'] - 1} are not "
                             f"followed by offset {b['offset']}")
    merged = dict(first)
    merged["n_prompts"] = sum(d["n_prompts"] for d in parts)
    merged["prompt_tokens"] = [t for d in parts for t in d["prompt_tokens"]]
    merged["merged_from"] = [{k: d[k] for k in ("offset", "n_prompts", "date_utc", "loadavg_start_end")}
                             for d in parts]
    merged["loadavg_start_end"] = [first["loadavg_start_end"][0], parts[-1]["loadavg_start_end"][1]]
    joined = ("per_prompt", "loadavg")
    merged["per_method"] = {label: {**res, **{key: [x for d in parts for x in d["per_method"][label][key]]
                                              for key in joined}}
                            for label, res in first["per_method"].items()}
    if any(label.startswith("ouroboros_warm") for label in merged["per_method"]):
        merged["note_warm_pool"] = "each part starts its warm pool empty; the pool is carried only within a part"
    path = out or Path(paths[0])
    path.write_text(json.dumps(merged, indent=1))
    resummarize(path)
    print("wrote", path)

