"""The batch benchmarks (``bench.batch_forward_costs``, ``bench.batch_e2e``) run end to end on the small random pair
in seconds, write the JSON the planner and the report step read, and report as the "batch" kind."""
from __future__ import annotations

import json

from bench import batch_e2e, batch_forward_costs
from bench.report import kind_of, report


def test_batch_forward_costs_table(tmp_path):
    out = tmp_path / "costs.json"
    data = batch_forward_costs.main(["--pair", "small", "--sizes", "1,2", "--tokens", "1,2", "--repeats", "1",
                                     "--prefix", "8", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["target_ms"].keys() == saved["draft_ms"].keys() == {"1", "2"}
    assert all(ms > 0 for row in saved["target_ms"].values() for ms in row.values())
    assert kind_of(saved) == "batch" and data["predicted"] is False
    lines, _ = report(out, plot=False)
    assert any(line.startswith("| 2 |") for line in lines)


def test_batch_e2e_compares_every_method_with_hf_batched_greedy(tmp_path):
    out = tmp_path / "batch.json"
    data = batch_e2e.main(["--pair", "small", "--datasets", "synthetic", "--batch-sizes", "1,2",
                           "--max-new-tokens", "4", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["method"]) for r in rows] == [(b, m) for b in (1, 2)
                                                         for m in ("hf_greedy", "speculative", "ouroboros")]
    assert all(r["identical_rows"] == r["batch"] for r in rows)          # lossless against HF's batched rows
    assert all("plan" in r for r in rows if r["method"] != "hf_greedy" and r["batch"] > 1)
    assert kind_of(data) == "batch" and report(out, plot=False)[0][1:] == data["table"]
