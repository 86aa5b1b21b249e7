"""The report step: tables (stdout) and PNGs drawn from benchmark JSON alone, on any machine (no GPU; no torch for
most kinds), so a GPU run's JSON is re-reported on a CPU.

    python -m bench.report bench/results/gpu_h200_run1/e2e_gpu.json      # the table, and e2e_gpu.png beside it
    python -m bench.report bench/results/*.json --no-plot                 # tables only
    python -m bench.report FILE.json --out-dir /tmp/pngs                  # the PNG elsewhere

One module per kind of result (``kind_of`` tells them apart by their keys): ``e2e`` (``bench.e2e`` runs, parameter
and temperature sweeps), ``e2e_gpu``, ``attention``, ``ngram``, ``compile_startup``, ``cpu_linear``,
``forward_costs``, ``traces``, ``batch``, and ``generic`` for hand-written records. The benchmarks print their final table
through the same functions.
"""
from __future__ import annotations

import json
from pathlib import Path

from bench.report import (
    attention,
    batch,
    compile_startup,
    cpu_linear,
    e2e,
    e2e_gpu,
    forward_costs,
    generic,
    ngram,
    traces,
)

MODULES = {"e2e_gpu": e2e_gpu, "compile_startup": compile_startup, "attention": attention, "ngram": ngram,
           "e2e": e2e, "traces": traces, "forward_costs": forward_costs, "cpu_linear": cpu_linear,
           "batch": batch, "generic": generic}


def _rows(data: dict) -> list:
    rows = data.get("rows")
    return rows if isinstance(rows, list) and rows and isinstance(rows[0], dict) else []


def kind_of(data) -> str:
    """Which report module reads ``data`` (a benchmark JSON); "generic" when no benchmark wrote it."""
    if not isinstance(data, dict):
        return "generic"
    schema = str(data.get("schema", ""))
    if schema.startswith("ouroboros.e2e_gpu/"):
        return "e2e_gpu"
    if schema.startswith("ouroboros.compile_startup/"):
        return "compile_startup"
    if schema.startswith("ouroboros.attention/") or any("sdpa_nomask" in r for r in _rows(data)):
        return "attention"
    if data.get("bench") == "ngram":
        return "ngram"
    if "per_temperature" in data or ("per_method" in data and "summary" in data):
        return "e2e"
    methods = data.get("methods")
    if isinstance(methods, dict) and any(isinstance(v, dict) and "prompts" in v for v in methods.values()):
        return "traces"
    runs = data.get("runs")
    if isinstance(runs, dict) and any(isinstance(v, dict) and "costs" in v for v in runs.values()):
        return "forward_costs"
    if any("f_linear_ms" in r for r in _rows(data)):
        return "cpu_linear"
    if "target_ms" in data and "draft_ms" in data or str(data.get("what", "")).startswith("batch benchmark"):
        return "batch"
    return "generic"


def report(path: str | Path, *, plot: bool = True, png: str | Path | None = None) -> tuple[list[str], Path | None]:
    """(the table's lines, the PNG written or None) of the JSON at ``path``; the PNG goes to ``png``, default beside
    the JSON (same name, .png), for the kinds that draw one; ``plot=False`` draws none."""
    path = Path(path)
    data = json.loads(path.read_text())
    module = MODULES[kind_of(data)]
    drawn = None
    if plot and hasattr(module, "draw"):
        target = Path(png) if png is not None else path.with_suffix(".png")
        if module.draw(data, target):
            drawn = target
    return module.lines(data), drawn
