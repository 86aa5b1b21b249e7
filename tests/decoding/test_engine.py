"""Lossless tests: every method must emit exactly the target's own greedy tokens (float32)."""
from __future__ import annotations

import ouroboros
import pytest
from conftest import (
    CORE_FAMILIES,
    MORE_FAMILIES,
    Family,
    hf_greedy,
    loop_greedy,
    make_model,
    noisy_copy,
    random_prompt,
    repetitive_prompt,
    run,
)
from ouroboros.hf.support import TESTED_MODEL_TYPES

METHODS = ouroboros.METHODS


# ---- every method x every family (the core families with and without GQA, on more prompts) ----------------------
FAMILY_PROMPTS = [
    ("random", random_prompt(11, 23)),
    ("repetitive", repetitive_prompt(12, 6, 5)),
    ("one-token", [7]),
]


@pytest.mark.parametrize("gqa", [True, False], ids=["gqa", "mha"])
@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_every_method_every_family(family_models, family, gqa):
    target, draft = family_models(family, gqa)
    for name, prompt in FAMILY_PROMPTS:
        expected = hf_greedy(target, prompt, 24)
        for method in METHODS:
            got, stats = run(target, draft, prompt, 24, method)
            assert got == expected, f"{family}/{method}/{name}"
            assert stats.tokens == 24


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_every_method_more_families(family_models, family):
    """The other tested architectures: every method, a prompt longer than their sliding windows and a 1-token one."""
    target, draft = family_models(family)
    for name, prompt in FAMILY_PROMPTS[1:]:
        expected = hf_greedy(target, prompt, 24)
        for method in METHODS:
            assert run(target, draft, prompt, 24, method)[0] == expected, f"{family}/{method}/{name}"


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_eos_inside_the_draft(family_models, family):
    """With draft == target the whole draft is accepted; EOS placed mid-draft must end generation right there."""
    target, _ = family_models(family)
    prompt = random_prompt(21, 9)
    free = hf_greedy(target, prompt, 30)
    eos = free[13]
    stop = free.index(eos)
    expected = hf_greedy(target, prompt, 30, eos=eos)
    assert expected == free[:stop + 1]
    for method in METHODS:
        got, stats = run(target, target, prompt, 30, method, eos=eos)
        assert got == expected, method
        if method in ("speculative", "ouroboros"):
            assert stats.trunk_accepted > 0


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_long_prompt(family_models, family):
    """A 600-token prompt (longer than the sliding windows of the Mistral/Gemma configs)."""
    target, draft = family_models(family)
    prompt = random_prompt(31, 200) + repetitive_prompt(32, 40, 10)
    expected = hf_greedy(target, prompt, 16)
    for method in ("greedy", "ouroboros", "lookahead"):
        got, _ = run(target, draft, prompt, 16, method)
        assert got == expected, method


# ---- many prompts on one family (>= 50 prompts in all) -----------------------------------------------------------
MANY = ([random_prompt(100 + i, 1 + (7 * i) % 60) for i in range(25)]
        + [repetitive_prompt(200 + i, 2 + i % 9, 3 + i % 5) for i in range(25)])


@pytest.fixture(scope="module")
def llama_pair():
    target = make_model("llama", gqa=True, seed=5)
    return target, noisy_copy(target, 0.01, seed=6)


@pytest.mark.parametrize("method", METHODS)
def test_fifty_prompts(llama_pair, method):
    target, draft = llama_pair
    for i, prompt in enumerate(MANY):
        expected = loop_greedy(target, prompt, 20) if i % 10 == 0 else hf_greedy(target, prompt, 20)
        got, _ = run(target, draft, prompt, 20, method)
        assert got == expected, f"prompt {i}"


# ---- the paths that only run when proposals are accepted --------------------------------------------------------
def test_draft_equal_target_accepts_everything(llama_pair):
    target, _ = llama_pair
    prompt = repetitive_prompt(41, 5, 6)
    expected = hf_greedy(target, prompt, 60)
    got, stats = run(target, target, prompt, 60, "ouroboros", gamma=8, topk=3, ngram=5, window=3, guess_set=4)
    assert got == expected
    assert stats.trunk_accepted == sum(t["draft_len"] for t in stats.trace)   # every draft token accepted
    assert stats.accepted_per_target_forward > 8          # full draft + bonus (+ branches) per forward
    assert stats.guess_accepted > 0                       # phrase-level drafting accepted pool/window guesses
    assert stats.tokens_per_draft_forward > 1.0
    assert stats.kv_gathers > 0                           # accepted guesses gathered into contiguous slots


def test_branch_acceptance_and_gather(llama_pair):
    """On repetitive text the pooled suffixes are accepted by the target after the trunk: branch + gather path."""
    target, _ = llama_pair
    prompt = repetitive_prompt(42, 7, 8)
    expected = hf_greedy(target, prompt, 48)
    got, stats = run(target, target, prompt, 48, "ouroboros", gamma=4, topk=3, ngram=5, window=3, guess_set=4)
    assert got == expected
    assert stats.branch_accepted > 0
    assert stats.kv_gathers > 0
    got, stats = run(target, None, prompt, 48, "prompt_lookup", topk=3, ngram=5, guess_set=4)
    assert got == expected and stats.branch_accepted > 0


def test_noisy_draft_partial_acceptance(llama_pair):
    target, _ = llama_pair
    draft = noisy_copy(target, 0.2, seed=9)
    prompt = random_prompt(43, 30)
    expected = hf_greedy(target, prompt, 40)
    got, stats = run(target, draft, prompt, 40, "ouroboros")
    assert got == expected
    assert 0 < stats.trunk_accepted < stats.draft_tokens     # some drafts rejected, some accepted
    assert stats.target_forwards < 40


def test_max_new_tokens_inside_accepted_phrase(llama_pair):
    target, _ = llama_pair
    prompt = random_prompt(44, 12)
    for n in (5, 11, 13):
        expected = hf_greedy(target, prompt, n)
        got, stats = run(target, target, prompt, n, "ouroboros", gamma=8)
        assert got == expected and len(got) == n
        if n == 5:  # gamma=8 fully accepted verifies >= 9 tokens in the first cycle: the budget cuts it
            assert stats.cycles == 1 and stats.trace[-1]["verified"] > stats.trace[-1]["accepted"] == 5


def test_warm_pool_is_reused_and_stays_lossless(llama_pair):
    target, draft = llama_pair
    pool = ouroboros.PhrasePool(ngram=5, guess_set=4)
    prompt = repetitive_prompt(45, 9, 4)
    expected = hf_greedy(target, prompt, 30)
    cold, s1 = run(target, draft, prompt, 30, "ouroboros", pool=pool)
    size = len(pool)
    warm, s2 = run(target, draft, prompt, 30, "ouroboros", pool=pool)
    assert cold == warm == expected
    assert size > 0 and s2.target_forwards <= s1.target_forwards


def test_parameters_are_honoured(llama_pair):
    target, draft = llama_pair
    prompt = random_prompt(46, 10)
    expected = hf_greedy(target, prompt, 20)
    for params in (dict(gamma=1, ngram=2, window=0, guess_set=0, topk=0),
                   dict(gamma=3, ngram=4, window=0, guess_set=0, topk=2),
                   dict(gamma=12, ngram=7, window=20, guess_set=20, topk=3)):
        for adaptive in (True, False):
            got, stats = run(target, draft, prompt, 20, "ouroboros", adaptive=adaptive, **params)
            assert got == expected
            assert stats.config == {**params, "adaptive": adaptive, "scored": False, "model_free": 0.0, "recycle": 0}


def test_stream_yields_chunks_and_stats(llama_pair):
    target, draft = llama_pair
    prompt = repetitive_prompt(47, 4, 5)
    stats = ouroboros.GenerationStats()
    chunks = list(ouroboros.stream(target, draft, prompt, max_new_tokens=25, stats=stats))
    assert sum(chunks, []) == hf_greedy(target, prompt, 25)
    assert len(chunks) == stats.cycles == len(stats.trace)
    summary = stats.summary()
    assert summary["tokens"] == 25 and summary["time_total"] > 0
    assert summary["time_draft"] > 0 and summary["time_verify"] > 0


def test_untested_architecture_runs_with_one_warning():
    model = make_model(Family("GlmConfig", "GlmForCausalLM"))
    assert model.config.model_type not in TESTED_MODEL_TYPES
    prompt = repetitive_prompt(48, 5, 3)
    expected = hf_greedy(model, prompt, 12)
    with pytest.warns(UserWarning, match="untested"):
        got, _ = run(model, model, prompt, 12, "ouroboros")
    assert got == expected


# ---- the engine on models patched to our attention kernels --------------------------------------------------------
UNPATCHABLE = ("stablelm", "falcon")      # patch refuses them (tests/api/test_inputs.py); the fast path uses dense masks
# (family, backend, methods, prompts): the Triton interpreter is slow, and the other families run fewer prompts.
PATCH_CASES = ([(f, "reference", METHODS, 3) for f in ("llama", "gemma2", "mistral")]
               + [(f, "reference", METHODS, 2) for f in ["gemma"] + MORE_FAMILIES if f not in UNPATCHABLE]
               + [("llama", "triton", ("greedy", "ouroboros"), 2), ("gemma", "triton", ("ouroboros",), 1)])


@pytest.mark.parametrize("family,backend,methods,n_prompts", PATCH_CASES,
                         ids=[f"{f}-{b}" for f, b, _, _ in PATCH_CASES])
def test_patched_models_stay_lossless(family, backend, methods, n_prompts):
    if backend == "triton":
        pytest.importorskip("triton")
    target = make_model(family)
    draft = noisy_copy(target, 0.01)
    prompts = [repetitive_prompt(71, 5, 5), random_prompt(72, 60), [4]][:n_prompts]
    expected = [hf_greedy(target, p, 16) for p in prompts]
    ouroboros.patch(target, backend=backend)
    ouroboros.patch(draft, backend=backend)
    try:
        assert ouroboros.is_patched(target)
        for prompt, exp in zip(prompts, expected):
            for method in methods:
                assert run(target, draft, prompt, 16, method)[0] == exp, (method, prompt)
            assert run(target, draft, prompt, 16, "ouroboros", fast=True)[0] == exp
    finally:
        ouroboros.unpatch(target)
        ouroboros.unpatch(draft)
    assert not ouroboros.is_patched(target)
