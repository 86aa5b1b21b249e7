"""Batch > 1 on the host loop (SPEC §6): every row lossless on its own, per-row trees, ragged acceptance, one pool.

Greedy rows are compared with the target's batch-1 greedy output for that prompt alone; a difference is allowed only
at a position whose batch-1 top-2 logit margin is below 1e-4 (float rounding of the padded batch). Sampled rows are
tested against the exact distribution, and the same test is shown failing for a lossy acceptance rule.
"""
from __future__ import annotations

import ouroboros
import pytest
import torch
from conftest import hf_greedy, make_model, noisy_copy, random_prompt, repetitive_prompt
from ouroboros.core.config import resolve_config
from ouroboros.core.sampling import make_sampler
from ouroboros.decoding.batch import BatchStats, decode_batch
from ouroboros.drafting.pool import PhrasePool
from test_sampling import (
    ALPHA,
    E2E_CASES,
    POWER,
    PROMPT,
    exact_three,
    lossy_accept,
    three_token_pvalues,
)

BATCH_FAMILIES = ["llama", "qwen2", "gemma2", "gpt2"]      # RoPE, biases, sliding window + softcap, absolute positions
MARGIN = 1e-4


def near_ties(model, prompt: list[int], continuation: list[int]) -> set[int]:
    """Positions i of ``continuation`` where the batch-1 top-2 logit margin before token i is below MARGIN."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + continuation])).logits[0, len(prompt) - 1:-1].float()
    top2 = logits.topk(2, dim=-1).values
    return {i for i, m in enumerate((top2[:, 0] - top2[:, 1]).tolist()) if m < MARGIN}


def assert_row_lossless(model, prompt, got, want):
    """``got`` equals ``want`` except from a near-tie position of ``want`` on."""
    if got == want:
        return
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    assert first in near_ties(model, prompt, want), (prompt, got, want)


def batch_prompts(b: int) -> list[list[int]]:
    """``b`` prompts of different lengths, some repetitive (the pool hits), one of a single token."""
    pool = [random_prompt(31, 11), repetitive_prompt(32, 5, 5), [9], random_prompt(34, 27), repetitive_prompt(35, 3, 4)]
    return pool[:b]


@pytest.fixture(scope="module")
def batch_models():
    cache = {}

    def get(family):
        if family not in cache:
            target = make_model(family, seed=41)
            cache[family] = (target, noisy_copy(target, 0.15))
        return cache[family]
    return get


@pytest.mark.parametrize("b", [2, 3, 5])
@pytest.mark.parametrize("family", BATCH_FAMILIES)
@pytest.mark.parametrize("method", ouroboros.METHODS)
def test_every_row_equals_its_batch1_greedy(batch_models, family, method, b):
    target, draft = batch_models(family)
    prompts = batch_prompts(b)
    n = 14
    alone = [hf_greedy(target, p, n) for p in prompts]
    eos = alone[0][3]                    # row 0 stops early (at its 4th token); others may stop on it too
    want = [hf_greedy(target, p, n, eos=eos) for p in prompts]
    out, stats = ouroboros.generate(target, draft, prompts, max_new_tokens=n, method=method, eos_token_id=eos,
                                    return_stats=True)
    width, pad = max(len(p) for p in prompts), target.generation_config.pad_token_id
    assert out.shape == (b, width + max(len(w) for w in want))
    for i, (p, w) in enumerate(zip(prompts, want)):
        row = out[i, width - len(p):].tolist()
        assert row[:len(p)] == p and out[i, :width - len(p)].tolist() == [pad] * (width - len(p))
        got = row[len(p):len(p) + stats.rows[i].tokens]
        assert_row_lossless(target, p, got, w)
        assert row[len(p) + len(got):] == [pad] * (len(row) - len(p) - len(got))      # right padding
    assert stats.rows[0].tokens == len(want[0]) <= 4
    assert stats.target_forwards < sum(len(w) for w in want) + 1 or method == "greedy"


def test_left_padded_tensor_with_attention_mask(batch_models):
    target, draft = batch_models("llama")
    prompts = batch_prompts(3)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[5] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = ouroboros.generate(target, draft, ids, attention_mask=mask, max_new_tokens=8)
    assert out.shape == (3, width + 8)
    assert torch.equal(out[:, :width], ids)                            # the caller's padding is kept
    for i, p in enumerate(prompts):
        assert out[i, width:].tolist() == hf_greedy(target, p, 8)
    one = ouroboros.generate(target, draft, ids[2:], attention_mask=mask[2:], max_new_tokens=8)   # batch 1, padded
    assert torch.equal(one, out[2:])


def test_stream_yields_rows_that_make_up_generate(batch_models):
    target, draft = batch_models("qwen2")
    prompts = batch_prompts(3)
    pieces = {i: [] for i in range(3)}
    for row, new in ouroboros.stream(target, draft, prompts, max_new_tokens=9):
        assert new
        pieces[row].extend(new)
    out = ouroboros.generate(target, draft, prompts, max_new_tokens=9)
    width = max(len(p) for p in prompts)
    assert [out[i, width:].tolist() for i in range(3)] == [pieces[i] for i in range(3)]


def test_one_pool_serves_every_row_in_a_fixed_order(batch_models):
    target, draft = batch_models("llama")
    prompts = batch_prompts(3)
    runs = []
    for _ in range(2):
        pool = PhrasePool(ngram=4, guess_set=3)
        out, stats = ouroboros.generate(target, draft, prompts, max_new_tokens=12, pool=pool, return_stats=True)
        runs.append((out, pool.state_dict(), [s.trace for s in stats.rows]))
        for p in prompts:                       # every row's own n-grams went into the one pool
            if len(p) >= 4:
                assert p[0] in pool
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][2] == runs[1][2]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1].values(), runs[1][1].values())
               if isinstance(a, torch.Tensor))


def test_finished_rows_leave_the_batch(batch_models):
    target, draft = batch_models("llama")
    prompts = batch_prompts(3)
    stats = BatchStats()
    cfg = resolve_config("cpu", "speculative")
    budget_rows = []
    with torch.inference_mode():
        for row, new in decode_batch(target, draft, prompts, method="speculative", cfg=cfg, max_new_tokens=6,
                                     eos=frozenset(), pool=None, stats=stats):
            budget_rows.append(row)
    assert [s.tokens for s in stats.rows] == [6, 6, 6]
    # one batched target forward per step: far fewer than the rows' forwards added up
    assert stats.target_forwards <= max(s.target_forwards for s in stats.rows) + 1
    assert stats.target_forwards < sum(s.target_forwards for s in stats.rows)


# ---- sampling ---------------------------------------------------------------------------------------------------
def batch_samples(target, draft, method, sampler, runs, draft_sampling=False, **params):
    """``runs`` batches of 3 copies of PROMPT, 3 tokens each: the samples of each row."""
    cfg = resolve_config("cpu", method, **params)
    rows = [[], [], []]
    for _ in range(runs):
        pool = PhrasePool(ngram=cfg.ngram, guess_set=cfg.pool_capacity)
        out = {0: [], 1: [], 2: []}
        with torch.inference_mode():
            for row, new in decode_batch(target, draft, [PROMPT] * 3, method=method, cfg=cfg, max_new_tokens=3,
                                         eos=frozenset(), pool=pool if method != "speculative" else None,
                                         stats=BatchStats(), sampler=sampler, draft_sampling=draft_sampling):
                out[row].extend(new)
        for i in range(3):
            rows[i].append(out[i])
    return rows


@pytest.mark.parametrize("case", ["ouroboros-default", "speculative-draft_sampling-t1.3-rp1.5"])
def test_every_row_samples_the_target_distribution(small_pair, case):
    target, draft = small_pair
    method, args, params, draft_sampling = E2E_CASES[case]
    sampler = make_sampler(do_sample=True, generator=torch.Generator().manual_seed(11), **args)
    rows = batch_samples(target, draft, method, sampler, 400, draft_sampling, **params)
    exact = exact_three(target, PROMPT, sampler.processors)
    for samples in rows:
        pvalues = three_token_pvalues(samples, *exact)
        assert min(pvalues.values()) > ALPHA, pvalues
    assert rows[0] != rows[1]                   # the rows draw independently


def test_a_lossy_rule_fails_the_batch_sampling_test(small_pair):
    target, draft = small_pair
    _, args, params, _ = E2E_CASES["ouroboros-default"]
    sampler = make_sampler(do_sample=True, generator=torch.Generator().manual_seed(11), accept=lossy_accept, **args)
    rows = batch_samples(target, draft, "ouroboros", sampler, 300, **params)
    pooled = [s for row in rows for s in row]
    pvalues = three_token_pvalues(pooled, *exact_three(target, PROMPT, sampler.processors))
    assert min(pvalues.values()) < POWER, pvalues


def test_same_seed_same_batch(small_pair):
    target, draft = small_pair
    prompts = [PROMPT, PROMPT[:7], PROMPT[3:]]
    runs = [ouroboros.generate(target, draft, prompts, max_new_tokens=8, do_sample=True, temperature=1.1,
                               generator=torch.Generator().manual_seed(s)) for s in (3, 3, 4)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


# ---- bad input --------------------------------------------------------------------------------------------------
BAD = {
    "mask shape": (lambda: torch.tensor([[1, 2, 3], [4, 5, 6]]), lambda: torch.ones(2, 2, dtype=torch.long),
                   "attention_mask has shape"),
    "right padding": (lambda: torch.tensor([[1, 2, 0], [4, 5, 6]]), lambda: torch.tensor([[1, 1, 0], [1, 1, 1]]),
                      "left-padded"),
    "all padding": (lambda: torch.tensor([[0, 0, 0], [4, 5, 6]]), lambda: torch.tensor([[0, 0, 0], [1, 1, 1]]),
                    "all padding"),
    "B = 0": (lambda: torch.zeros(0, 3, dtype=torch.long), lambda: None, "B >= 1"),
    "empty prompt": (lambda: [[1, 2], []], lambda: None, "prompt 1 is empty"),
    "too long": (lambda: [[1] * 5000, [2, 3]], lambda: None, "longer than the target's context"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_batches_are_refused_before_any_forward(batch_models, case):
    target, draft = batch_models("llama")
    ids, mask, why = BAD[case]
    calls = []
    hook = target.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=why):
            ouroboros.generate(target, draft, ids(), attention_mask=mask(), max_new_tokens=4)
    finally:
        hook.remove()
    assert not calls


def test_a_batch_without_a_pad_id_is_refused(batch_models):
    target, draft = batch_models("llama")
    saved = target.generation_config.pad_token_id
    target.generation_config.pad_token_id = None
    try:
        with pytest.raises(ValueError, match="pad id"):
            ouroboros.generate(target, draft, [[1, 2], [3]], max_new_tokens=4)
        with pytest.raises(ValueError, match="fast=True"):
            ouroboros.generate(target, draft, [[1, 2], [3]], max_new_tokens=4, eos_token_id=2, fast=True)
    finally:
        target.generation_config.pad_token_id = saved
