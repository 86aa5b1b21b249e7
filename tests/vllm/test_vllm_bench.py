"""bench.vllm_serving's vLLM-free parts: every method's configuration and the summary rows (ratios to plain vLLM,
acceptance length, outputs compared with plain's)."""
from __future__ import annotations

from bench.vllm_serving import METHODS, method_setup, summarize


def test_every_method_has_a_configuration_and_ours_use_the_proposer():
    for method in METHODS:
        spec, env = method_setup(method, 4, "/draft", "/tmp/pool.pt")
        assert spec is None if method == "vllm_plain" else spec["num_speculative_tokens"] == 4
        if method.startswith("ours"):
            assert spec["model"] == "ouroboros.vllm.OuroborosProposer" and env


def test_summary_rows_compare_with_plain_vllm():
    run = {"time": 2.0, "tokens": 10, "drafts": 0, "draft_tokens": 0, "accepted": 0, "outputs": [[1, 2], [3]]}
    fast = {**run, "time": 1.0, "drafts": 4, "draft_tokens": 16, "accepted": 6, "outputs": [[1, 2], [4]]}
    rows = summarize([{"method": "vllm_plain", "runs": {"x": run}}, {"method": "ours_pool", "runs": {"x": fast}},
                      {"method": "vllm_draft", "error": "not supported"}])
    assert [(r["method"], r["vs_plain"], r["acceptance_length"], r["same_as_plain"]) for r in rows] == [
        ("vllm_plain", 1.0, 1.0, 2), ("ours_pool", 2.0, 2.5, 1)]
