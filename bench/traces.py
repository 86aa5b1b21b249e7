"""Acceptance traces: the per-cycle records (tree_size, accepted, draft_forwards, draft_len) that ``bench.e2e``
writes for the real pair and ``bench.e2e_gpu`` replays on a GPU. The committed ones are in
``bench/results/traces/`` (the CPU layout's and the GPU layout's, per data set)."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

from bench.common import TRACES

# the real pair's traces recorded with the GPU layout (bench.e2e --device-cycle); the older CPU-layout ones else
GPU_LAYOUT_TRACES = [TRACES / f"{d}_gpu_layout.json" for d in ("humaneval", "gsm8k")]
CPU_LAYOUT_TRACES = [TRACES / f"{d}_cpu_layout.json" for d in ("humaneval", "gsm8k")]


def default_traces() -> str:
    """The GPU-layout traces of both data sets (a comma list) when present, else the CPU-layout HumanEval ones."""
    if all(p.exists() for p in GPU_LAYOUT_TRACES):
        return ",".join(map(str, GPU_LAYOUT_TRACES))
    return str(CPU_LAYOUT_TRACES[0])


def is_cycle(c) -> bool:
    return isinstance(c, dict) and "tree_size" in c and "accepted" in c


def clean_cycles(cycles) -> list[dict]:
    out = []
    for c in cycles:
        if not is_cycle(c):
            continue
        out.append({"tree_size": max(1, int(c["tree_size"])), "accepted": max(1, int(c["accepted"])),
                    "draft_forwards": max(0, int(c.get("draft_forwards", 0) or 0)),
                    "draft_len": max(0, int(c.get("draft_len", 0) or 0))})
    return out


def prompts_of(entry) -> list[list[dict]]:
    """Per-prompt cycle lists from one method's entry in any supported shape."""
    if isinstance(entry, list):
        if any(is_cycle(c) for c in entry):          # a list of cycles (other items are ignored)
            return [clean_cycles(entry)]
        prompts = []
        for p in entry:
            prompts.extend(prompts_of(p))
        return prompts
    if isinstance(entry, dict):
        if is_cycle(entry):
            return [clean_cycles([entry])]
        for key in ("prompts", "trace", "cycles"):
            if key in entry:
                return prompts_of(entry[key])
    return []


def load_traces(path: Path) -> tuple[dict | None, str]:
    """``label -> {"prompts": [[cycle, ...], ...], "resolved_params": dict | None}`` and a status line.

    Accepted shapes: the real-models benchmark's file (``{"methods": {label: {"resolved_params", "prompts":
    [{"trace": [cycle, ...]}, ...]}}}``), a plain list of cycles (label "trace"), a list of per-prompt lists, or a
    dict ``label -> list``. A cycle is a dict with ``tree_size`` and ``accepted`` (+ optional ``draft_forwards``,
    ``draft_len``).
    """
    if path is None or not path.exists():
        return None, f"traces file not found: {path} (replay skipped; run python -m bench.e2e on the real pair first)"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return None, f"traces file unreadable: {path}: {err} (replay skipped)"
    entries: dict = {}
    if isinstance(data, list):
        entries["trace"] = data
    elif isinstance(data, dict):
        methods = data.get("methods", data)
        if isinstance(methods, dict) and any(k in methods for k in ("prompts", "trace", "cycles")):
            methods = {"trace": methods}
        if isinstance(methods, dict):
            entries = {k: v for k, v in methods.items() if isinstance(v, (list, dict))}
    out = {}
    for label, entry in entries.items():
        prompts = [p for p in prompts_of(entry) if p]
        if prompts:
            params = entry.get("resolved_params") if isinstance(entry, dict) else None
            out[label] = {"prompts": prompts, "resolved_params": params}
    if not out:
        return None, f"traces file {path} holds no cycles with tree_size/accepted (replay skipped)"
    return out, f"loaded {path}: " + ", ".join(f"{k} ({sum(len(p) for p in v['prompts'])} cycles)"
                                              for k, v in out.items())


def load_trace_files(spec: str | None) -> tuple[dict | None, str]:
    """:func:`load_traces` of each file in the comma list ``spec``; with several files each label is prefixed by its
    file's data set (``"gsm8k/ouroboros"``)."""
    paths = [Path(p) for p in (spec or "").split(",") if p.strip()]
    if len(paths) <= 1:
        return load_traces(paths[0] if paths else None)
    merged, status = {}, []
    for path in paths:
        traces, line = load_traces(path)
        status.append(line)
        if traces:
            tag = None
            with contextlib.suppress(OSError, ValueError, AttributeError):
                tag = json.loads(path.read_text()).get("dataset")
            tag = tag if isinstance(tag, str) and tag else path.stem
            merged.update({f"{tag}/{label}": entry for label, entry in traces.items()})
    return (merged or None), "; ".join(status)


