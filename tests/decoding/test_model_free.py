"""Model-free cycles (issue #29 item 2): the pooled chain and the gate, and the cycles lossless, greedy over the family
matrix and sampling against the exact distribution (with a lossy rule failing the same test)."""
from __future__ import annotations

import pytest
import torch
from conftest import CORE_FAMILIES, MORE_FAMILIES, hf_greedy, random_prompt, repetitive_prompt, run
from test_sampling import ALPHA, POWER, POWER_RUNS, PROMPT, exact_three, lossy_accept, sample_runs, \
    three_token_pvalues

from ouroboros.core.config import DecodeConfig
from ouroboros.core.sampling import make_sampler
from ouroboros.drafting.model_free import ModelFreeGate, pooled_chain
from ouroboros.drafting.pool import PhrasePool


# ---- the chain and the gate -----------------------------------------------------------------------------------
def test_the_chain_follows_the_most_frequent_phrase_while_it_is_probable():
    pool = PhrasePool(ngram=3, guess_set=3, scored=True)
    for _ in range(3):
        pool.insert(1, (2, 3))
    pool.insert(1, (4, 5))                  # newer, but seen once
    for _ in range(9):
        pool.insert(3, (6, 7))
    tokens, probs = pooled_chain(pool, [1], 8, floor=0.3)
    # key 1: (2, 3) has 3 of 4 (+1 unseen) -> 0.6; key 3: (6, 7) 9 of 9 (+1) -> 0.9, product 0.54; key 7: nothing
    assert tokens == [2, 3, 6, 7]
    assert probs == pytest.approx([0.6, 0.6, 0.54, 0.54])
    assert pooled_chain(pool, [1], 3, floor=0.3)[0] == [2, 3, 6]          # at most max_tokens
    assert pooled_chain(pool, [1], 8, floor=0.55)[0] == [2, 3]            # the product fell under the floor
    assert pooled_chain(pool, [9], 8, floor=0.0) == ([], [])


def test_the_gate_weighs_measured_costs_and_learns_from_acceptance():
    gate = ModelFreeGate(floor=0.3)
    assert not gate.worth_it([0.9, 0.9])                # nothing measured yet
    gate.observe_draft(tokens=6, draft_seconds=0.2, verify_seconds=0.4)   # 6 tokens per 0.6 s = 10/s
    assert gate.worth_it([0.9, 0.9, 0.9])               # (1 + 2.7) / 0.4 = 9.25/s: >= half, never tried yet
    assert not gate.worth_it([0.5])                     # 1.5 / 0.4 = 3.75/s: under half
    assert not gate.worth_it([])
    gate.observe_free(accepted=3, probs=[0.9, 0.9, 0.9], verify_seconds=0.4)   # tried: 3 of 2.7 predicted
    assert gate.calibration == pytest.approx(3 / 2.7)
    assert gate.worth_it([0.9, 0.9, 0.9, 0.9])          # (1 + 1.11 * 3.6) / 0.4 = 12.5/s > 10/s
    assert not gate.worth_it([0.9, 0.9, 0.9])           # (1 + 3) / 0.4 = 10/s: not above
    for _ in range(10):                                 # the pool promised 2.7 tokens, the target took none
        gate.observe_free(accepted=0, probs=[0.9, 0.9, 0.9], verify_seconds=0.4)
    assert gate.calibration < 0.15
    assert not gate.worth_it([0.9] * 8)                 # (1 + 0.12 * 7.2) / 0.4 = 4.6/s: back to the draft model


@pytest.mark.parametrize("value", [-0.1, 1.0, True, "0.5"])
def test_a_bad_floor_is_refused(value):
    with pytest.raises(ValueError, match="model_free"):
        DecodeConfig(model_free=value)


# ---- lossless --------------------------------------------------------------------------------------------------
@pytest.fixture
def forced(monkeypatch):
    """Every cycle with a pooled chain goes model-free (the gate's cost rule off), counted."""
    calls = {"free": 0}

    def always(self, probs):
        calls["free"] += bool(probs)
        return bool(probs)
    monkeypatch.setattr(ModelFreeGate, "worth_it", always)
    return calls


PROMPTS = [("random", random_prompt(31, 23)), ("repetitive", repetitive_prompt(32, 5, 6)), ("one-token", [7])]


@pytest.mark.parametrize("family", CORE_FAMILIES + MORE_FAMILIES)
def test_model_free_cycles_are_greedy_exact(family_models, family, forced):
    target, draft = family_models(family)
    for name, prompt in PROMPTS:
        expected = hf_greedy(target, prompt, 24)
        for scored in (True, False):
            got, stats = run(target, draft, prompt, 24, "ouroboros", model_free=0.2, scored=scored)
            assert got == expected, f"{family}/{name}/scored={scored}"
            assert stats.tokens == 24
    assert forced["free"] > 0


def test_model_free_cycles_stop_on_eos(family_models, forced):
    target, draft = family_models("llama")
    prompt = repetitive_prompt(33, 4, 6)
    free = hf_greedy(target, prompt, 30)
    eos = free[10]
    got, stats = run(target, draft, prompt, 30, "ouroboros", eos=eos, model_free=0.2, scored=True)
    assert got == free[:free.index(eos) + 1] and stats.model_free_cycles > 0


def test_the_cost_gate_left_to_itself_is_greedy_exact(family_models):
    """Whether it skips drafts here depends on measured times (not asserted); the output never does."""
    target, draft = family_models("llama")
    for prompt in (repetitive_prompt(34, 4, 10), random_prompt(35, 17)):
        got, _ = run(target, draft, prompt, 48, "ouroboros", model_free=0.2, scored=True)
        assert got == hf_greedy(target, prompt, 48)


def test_a_device_pool_is_refused_with_model_free(family_models):
    from ouroboros.drafting.gpu_pool import GpuPhrasePool
    target, draft = family_models("llama")
    pool = GpuPhrasePool(ngram=4, guess_set=3, vocab_size=target.config.vocab_size, device="cpu")
    with pytest.raises(ValueError, match="host PhrasePool"):
        run(target, draft, [1, 2, 3], 4, "ouroboros", pool=pool, model_free=0.3)


def _model_free_samples(small_pair, accept=None):
    target, draft = small_pair
    kw = {"accept": accept} if accept is not None else {}
    sampler = make_sampler(do_sample=True, generator=torch.Generator().manual_seed(11), **kw)
    samples, _ = sample_runs(target, draft, "ouroboros", sampler, POWER_RUNS if accept else 400, gamma=3,
                             model_free=0.2, scored=True)
    return three_token_pvalues(samples, *exact_three(target, PROMPT, sampler.processors))


def test_model_free_cycles_sample_the_target_distribution(small_pair, forced):
    pvalues = _model_free_samples(small_pair)
    assert forced["free"] > 0
    assert min(pvalues.values()) > ALPHA, pvalues


def test_a_lossy_rule_fails_the_model_free_sampling_test(small_pair, forced):
    pvalues = _model_free_samples(small_pair, accept=lossy_accept)
    assert min(pvalues.values()) < POWER, pvalues
