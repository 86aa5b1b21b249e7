"""bench.vllm_replay: vLLM's ngram replayed as vLLM defines it, the step loop's accounting (accepted = common prefix,
plus the bonus; every request ends with its continuation), and the configuration syntax."""
from __future__ import annotations

import numpy as np

from bench.vllm_replay import ngram_chain, parse_configs, replay


def test_ngram_follows_the_most_recent_earlier_match_of_the_longest_tail():
    assert ngram_chain([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 2) == [7, 1]        # n = 3, the later occurrence
    assert ngram_chain([5, 6, 8, 5, 6], 4) == [8, 5, 6]
    assert ngram_chain([1, 2, 3, 4], 4) == [] and ngram_chain([1], 4) == []


class _Fixed:
    """Proposes the next ``right`` true tokens of each row, then one wrong token."""

    def __init__(self, truth: dict[int, list[int]], right: int) -> None:
        self.truth, self.right, self.calls = truth, right, 0

    def propose(self, sampled, num_tokens, token_ids):
        self.calls += 1
        out = []
        for i in range(len(sampled)):
            history = token_ids[i, :int(num_tokens[i])].tolist()
            full = self.truth[history[0]]
            nxt = full[len(history):len(history) + self.right]
            out.append(nxt + [0])
        return out


def test_replay_accepts_the_common_prefix_plus_a_bonus_and_prices_each_step():
    prompts = [[11, 12], [21]]
    conts = [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10]]
    truth = {p[0]: p + c for p, c in zip(prompts, conts)}
    r = replay(_Fixed(truth, 2), list(zip(prompts, conts)), (1.0, 0.5))
    # row 0: 6 tokens after the first, 3 per step (2 accepted + bonus) -> 2 steps; row 1: 2 tokens -> 1 step
    assert r["steps"] == 2 and r["tokens"] == 10
    assert r["accepted"] == 2 + 2 + 2 and r["proposed"] == 3 * 3       # row 1 ends on its 2nd accepted token
    assert r["target_seconds"] == (1.0 + 0.5 * 8) + (1.0 + 0.5 * 4)
    assert r["time"] >= r["target_seconds"]
    assert np.isclose(r["time"], r["target_seconds"] + r["proposer_seconds"])


def test_configs_name_proposer_environments():
    assert parse_configs(["a=MODE:pool;POOL_CONFIDENCE:0", "b=DRAFT:{draft}"], "/d") == {
        "a": {"OUROBOROS_VLLM_MODE": "pool", "OUROBOROS_VLLM_POOL_CONFIDENCE": "0"},
        "b": {"OUROBOROS_VLLM_DRAFT": "/d"}}
