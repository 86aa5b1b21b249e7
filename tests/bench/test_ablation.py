"""bench.ablation: rows from the committed ablation runs (every label, its components and the engine's counters), and
the table it prints; its own output file is skipped as an input."""
from __future__ import annotations

from pathlib import Path

import pytest

from bench import ablation

RUNS = sorted((Path(__file__).resolve().parents[2] / "bench" / "results" / "ablation").glob("*_128*.json"))


@pytest.mark.skipif(not RUNS, reason="no committed ablation runs")
def test_rows_carry_components_counters_and_ratios(tmp_path, capsys):
    rows = [r for path in RUNS for r in ablation.rows_of(path)]
    ours = [r for r in rows if r["label"].startswith("ouroboros")]
    assert ours and all(r["scored"] is not None and r["tokens_per_target_forward"] >= 1 for r in ours)
    assert any(r["model_free_cycles"] > 0 for r in ours if r["model_free"]) or not any(r["model_free"] for r in ours)
    assert all(r["recycled"] == 0 for r in ours if not r["recycle"])
    assert {r["pool"] for r in ours} <= {"cold", "warm"}
    assert {r["draft"] for r in ours} <= {None, "sampled", "one-hot"}
    assert any(r["draft"] == "sampled" for r in ours) and any(r["draft"] == "one-hot" for r in ours)
    out = tmp_path / "table.json"
    ablation.main([*map(str, RUNS), "--out", str(out)])
    ablation.main([*map(str, RUNS), str(out)])         # the table file among the inputs is skipped
    assert capsys.readouterr().out.count("| workload |") == 2
