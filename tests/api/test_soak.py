"""Soak (issue 20, item 3): 10,000 generate calls on one tiny model pair with varied prompts and ONE shared pool.

The pool's bytes stay under its budget on every call (a tiny budget, so keys are evicted all along), the process RSS
levels off, and the output stays the target's own greedy text. Opt-in: ``pytest -m soak -s tests/api/test_soak.py``
(a few minutes on 2 cores); it prints the RSS / pool-bytes curve.
"""
from __future__ import annotations

import gc
import os
import random

import ouroboros
import pytest
from conftest import VOCAB, hf_greedy, make_model, noisy_copy

CALLS = 10_000
BUDGET = 48_000            # bytes: ~33 keys of 3 phrases at N=4, far fewer than the 93 keys the prompts use
METHODS = ("ouroboros", "prompt_lookup", "lookahead")


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc)."""
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.soak
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the RSS from Linux /proc")
def test_ten_thousand_calls_one_pool(capsys):
    target = make_model("llama", seed=7)
    draft = noisy_copy(target, 0.02)
    pool = ouroboros.PhrasePool(ngram=4, guess_set=3, max_bytes=BUDGET)
    assert pool.max_keys < VOCAB - 3
    rng = random.Random(0)
    curve = []
    for call in range(1, CALLS + 1):
        period = rng.randint(1, 12)
        motif = [rng.randrange(3, VOCAB) for _ in range(period)]
        prompt = (motif * (1 + 40 // period))[:rng.randint(2, 40)]
        method = METHODS[call % len(METHODS)]
        ids, stats = ouroboros.generate(target, draft, prompt, max_new_tokens=6, method=method, pool=pool,
                                        return_stats=True)
        assert stats.pool_bytes == pool.nbytes() <= BUDGET, (call, stats.pool_bytes)
        if call % 500 == 0:
            assert ids[0, len(prompt):].tolist() == hf_greedy(target, prompt, 6), call
        if call % 1000 == 0 or call == 1:
            gc.collect()
            curve.append((call, rss_bytes(), pool.nbytes(), pool.num_keys(), len(pool)))
    with capsys.disabled():
        print(f"\nsoak: {CALLS} calls, pool budget {BUDGET} B ({pool.max_keys} keys x {pool.guess_set} phrases)")
        print(f"{'calls':>6} {'RSS MiB':>8} {'pool B':>7} {'keys':>5} {'phrases':>8}")
        for call, rss, nbytes, keys, phrases in curve:
            print(f"{call:6d} {rss / 2**20:8.1f} {nbytes:7d} {keys:5d} {phrases:8d}")
    assert pool.num_keys() == pool.max_keys                # the bound binds all along
    settled = [rss for call, rss, *_ in curve if call >= 2000]
    assert max(settled) - settled[0] < 16 * 2**20, "RSS kept growing after 2,000 calls"
