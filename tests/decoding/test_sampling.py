"""Lossless sampling (SPEC §2 "Sampling (lossless)"): the verification walk and every method end to end.

Statistical tests compare sample counts with the exact distribution (chi-square, cells with small expectation
merged) at fixed seeds, so they are deterministic. Each has a twin with a deliberately lossy acceptance rule
(accept a deterministic candidate whenever r(x) > 0.3) that the same test must reject: the tests have power.
"""
from __future__ import annotations

import warnings

import ouroboros
import pytest
import torch
import transformers
from conftest import chi2_pvalue, hf_greedy
from ouroboros.core.config import default_draft_sampling, resolve_config
from ouroboros.core.sampling import (
    SamplingConfig,
    TreeSampler,
    logits_processor,
    make_sampler,
    resolve_sampling,
)
from ouroboros.core.tokentree import TokenTree
from ouroboros.decoding.loop import decode
from ouroboros.decoding.stats import GenerationStats
from ouroboros.drafting.pool import PhrasePool
from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor

ALPHA = 1e-3          # an exact rule must pass every statistic at this level
POWER = 1e-6          # a lossy rule must fail at least one statistic at this level


def lossy_accept(prob: float, u: float) -> bool:
    """The classic mistake: accept a deterministic candidate whenever the target likes it enough."""
    return prob > 0.3


# ---- statistics ----------------------------------------------------------------------------------------------------
def three_token_pvalues(samples: list[list[int]], p1: torch.Tensor, joint12: torch.Tensor,
                        p3: torch.Tensor) -> dict[str, float]:
    """p-values of the first three emitted tokens against the exact marginals and the joint of positions 1-2."""
    v = p1.shape[0]
    seqs = torch.tensor([s[:3] for s in samples])
    count = lambda col: torch.bincount(col, minlength=v)        # noqa: E731
    return {"pos1": chi2_pvalue(count(seqs[:, 0]), p1), "pos2": chi2_pvalue(count(seqs[:, 1]), joint12.sum(0)),
            "pos3": chi2_pvalue(count(seqs[:, 2]), p3),
            "joint12": chi2_pvalue(torch.bincount(seqs[:, 0] * v + seqs[:, 1], minlength=v * v), joint12)}


def test_chi2_pvalue_is_calibrated_on_known_cases():
    probs = torch.tensor([0.5, 0.3, 0.2])
    assert chi2_pvalue(torch.tensor([500, 300, 200]), probs) == pytest.approx(1.0)
    assert chi2_pvalue(torch.tensor([400, 300, 300]), probs) < 1e-9
    assert chi2_pvalue(torch.tensor([5, 0, 0]), torch.tensor([1.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert chi2_pvalue(torch.tensor([4, 1, 0]), torch.tensor([1.0, 0.0, 0.0])) == 0.0
    # chi-square with 2 degrees of freedom: P(X > x) = exp(-x / 2)
    stat = (520 - 500) ** 2 / 500 + (280 - 300) ** 2 / 300
    assert chi2_pvalue(torch.tensor([520, 280, 200]), probs) == pytest.approx(torch.exp(torch.tensor(-stat / 2)).item())


# ---- config and processors -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [("temperature", -0.1), ("temperature", float("nan")), ("top_k", -1),
                                         ("top_k", 2.5), ("top_p", 0.0), ("top_p", 1.5), ("min_p", 1.5),
                                         ("repetition_penalty", 0.0), ("do_sample", 1)])
def test_sampling_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**{field: value})


def test_processors_follow_hf_order_and_defaults():
    kinds = lambda procs: [type(p).__name__ for p in procs]    # noqa: E731
    assert kinds(logits_processor(SamplingConfig())) == []
    assert kinds(logits_processor(SamplingConfig(do_sample=True))) == ["TopKLogitsWarper"]
    full = SamplingConfig(do_sample=True, temperature=0.7, top_k=5, top_p=0.9, min_p=0.1, repetition_penalty=1.2)
    user = NoRepeatNGramLogitsProcessor(2)
    assert kinds(logits_processor(full, [user])) == ["RepetitionPenaltyLogitsProcessor", "NoRepeatNGramLogitsProcessor",
                                                     "TemperatureLogitsWarper", "TopKLogitsWarper",
                                                     "TopPLogitsWarper", "MinPLogitsWarper"]
    # greedy (do_sample False or temperature 0): no warpers, the penalty stays
    assert kinds(logits_processor(SamplingConfig(temperature=0.0, do_sample=True, repetition_penalty=1.2))) == [
        "RepetitionPenaltyLogitsProcessor"]
    # a user list: None arguments add nothing (HF's prepared list already holds its warpers)
    cfg, procs = resolve_sampling(True, None, None, 0.9, None, None, custom=[user])
    assert kinds(procs) == ["NoRepeatNGramLogitsProcessor", "TopPLogitsWarper"] and cfg.top_k is None


def test_processed_scores_equal_hf_for_the_same_arguments(small_pair):
    gen = torch.Generator().manual_seed(0)
    ids, scores = torch.randint(0, V, (1, 9), generator=gen), torch.randn(1, V, generator=gen) * 3
    args = dict(temperature=0.7, top_k=6, top_p=0.8, min_p=0.05, repetition_penalty=1.3)
    cfg = transformers.GenerationConfig(do_sample=True, **args)
    hf = small_pair[0]._get_logits_processor(cfg, input_ids_seq_length=9, logits_processor=LogitsProcessorList())
    assert [type(p) for p in hf] == [type(p) for p in make_sampler(do_sample=True, **args).processors]
    ours = make_sampler(do_sample=True, **args)
    assert torch.equal(ours.scores(scores[0], ids[0]), hf(ids, scores.clone())[0])


def test_sampling_arguments_are_ignored_with_a_warning_when_greedy():
    with pytest.warns(UserWarning, match="temperature"):
        assert make_sampler(do_sample=False, temperature=0.5, top_p=0.5) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert make_sampler(do_sample=True, temperature=0.0) is None          # temperature 0: plain greedy
        assert make_sampler(do_sample=False, repetition_penalty=1.0) is None
    assert make_sampler(repetition_penalty=1.2).do_sample is False            # the penalty applies when greedy too
    with pytest.raises(ValueError, match="generator"):
        make_sampler(do_sample=True, generator=0)
    with pytest.raises(ValueError, match="top_p"):
        make_sampler(do_sample=False, top_p=2.0)                              # validated even when ignored


# ---- the verification walk on synthetic trees ----------------------------------------------------------------------
V_UNIT = 5
UNIT_PROCESSORS = dict(temperature=0.9, top_k=4, repetition_penalty=1.4)


class Synthetic:
    """A fake target and draft: raw logits that are a fixed random function of the token path."""

    def __init__(self, seed: int, scale: float = 1.6) -> None:
        self.seed, self.scale, self._memo = seed, scale, {}

    def logits(self, path: tuple[int, ...]) -> torch.Tensor:
        if path not in self._memo:
            key = self.seed
            for tok in path:
                key = (key * 1000003 + tok + 1) % (2 ** 61 - 1)
            gen = torch.Generator().manual_seed(key)
            self._memo[path] = torch.randn(V_UNIT, generator=gen) * self.scale
        return self._memo[path]


def unit_dist(sampler: TreeSampler, model: Synthetic, path: tuple[int, ...]) -> torch.Tensor:
    return torch.softmax(sampler.scores(model.logits(path), torch.tensor(path)), -1)


def run_unit_walks(sampler: TreeSampler, target: Synthetic, context: tuple[int, ...], build, trials: int,
                   proposal_gen: torch.Generator) -> tuple[list[list[int]], int]:
    """``trials`` walks; ``build(gen) -> (tree, start, proposal_q)`` gives each walk's tree (drawn before the walk).
    Emissions shorter than two tokens are completed by plain sampling from the target. Returns the samples and the
    number of accepted tree nodes."""
    samples, accepted = [], 0
    for _ in range(trials):
        tree, start, qmap = build(proposal_gen)
        rows = []
        for node in range(len(tree)):
            path, n = [], node
            while n != start:
                path.append(tree.tokens[n])
                n = tree.parents[n]
            rows.append(target.logits(context + tuple(reversed(path))))
        out = sampler.walk(tree, torch.stack(rows), start, context, qmap)
        accepted += len(out.path)
        emitted = [tree.tokens[n] for n in out.path] + [out.bonus]
        if len(emitted) < 2:
            probs = unit_dist(sampler, target, context + tuple(emitted))
            emitted.append(int(torch.multinomial(probs, 1, generator=proposal_gen)))
        samples.append(emitted[:2])
    return samples, accepted


def exact_two(sampler: TreeSampler, target: Synthetic, context: tuple[int, ...]) -> torch.Tensor:
    p1 = unit_dist(sampler, target, context)
    return torch.stack([p1[a] * unit_dist(sampler, target, context + (a,)) for a in range(V_UNIT)])


def two_token_pvalues(samples: list[list[int]], joint: torch.Tensor) -> dict[str, float]:
    seqs = torch.tensor(samples)
    return {"pos1": chi2_pvalue(torch.bincount(seqs[:, 0], minlength=V_UNIT), joint.sum(1)),
            "pos2": chi2_pvalue(torch.bincount(seqs[:, 1], minlength=V_UNIT), joint.sum(0)),
            "joint": chi2_pvalue(torch.bincount(seqs[:, 0] * V_UNIT + seqs[:, 1], minlength=V_UNIT ** 2), joint)}


CONTEXT = (1, 3, 1)


def deterministic_trie(gen):
    """The start token with a trie of deterministic candidates: branches at depth 1 and 2 (shared prefixes merged)."""
    tree = TokenTree()
    start = tree.add_path(-1, [CONTEXT[-1]])[-1]
    for branch in ([0, 1, 2], [0, 3], [2, 4, 0], [2, 4, 1], [1]):
        tree.add_path(start, branch)
    return tree, start, {}


def make_sampled_chain(draft: Synthetic, sampler: TreeSampler, extra: tuple[tuple[int, ...], ...] = ()):
    """A trunk of two tokens sampled from the draft's processed distribution (q kept per node), then ``extra``
    deterministic branches off the start node (they may coincide with a sampled token: the trie merges them)."""
    def build(gen):
        tree = TokenTree()
        start = tree.add_path(-1, [CONTEXT[-1]])[-1]
        path, qmap, parent = CONTEXT, {}, start
        for _ in range(2):
            q = unit_dist(sampler, draft, path)
            tok = int(torch.multinomial(q, 1, generator=gen))
            node = tree.add_path(parent, [tok])[0]
            qmap[node] = q
            path, parent = path + (tok,), node
        for branch in extra:
            tree.add_path(start, branch)
        return tree, start, qmap
    return build


@pytest.mark.parametrize("case", ["trie", "sampled_chain", "sampled_then_deterministic"])
def test_walk_matches_the_exact_distribution(case):
    target, draft = Synthetic(seed=5), Synthetic(seed=9)
    gen = torch.Generator().manual_seed(1)
    sampler = make_sampler(do_sample=True, generator=gen, **UNIT_PROCESSORS)
    builders = {"trie": deterministic_trie, "sampled_chain": make_sampled_chain(draft, sampler),
                "sampled_then_deterministic": make_sampled_chain(draft, sampler, ((0, 2), (3,), (4, 4)))}
    samples, accepted = run_unit_walks(sampler, target, CONTEXT, builders[case], 3000,
                                       torch.Generator().manual_seed(2))
    assert accepted > 600                           # candidates are accepted often: the walk goes deep
    pvalues = two_token_pvalues(samples, exact_two(sampler, target, CONTEXT))
    assert min(pvalues.values()) > ALPHA, pvalues


def test_walk_with_a_lossy_rule_fails_the_same_test():
    target = Synthetic(seed=5)
    sampler = make_sampler(do_sample=True, generator=torch.Generator().manual_seed(1), accept=lossy_accept,
                           **UNIT_PROCESSORS)
    samples, _ = run_unit_walks(sampler, target, CONTEXT, deterministic_trie, 3000, torch.Generator().manual_seed(2))
    pvalues = two_token_pvalues(samples, exact_two(sampler, target, CONTEXT))
    assert min(pvalues.values()) < POWER, pvalues


def test_walk_handles_exact_zeros_and_certain_candidates():
    """A candidate of probability 0 is always rejected and never drawn; one of probability 1 always accepted; a
    sampled candidate whose q equals r is always accepted; no NaN anywhere."""
    tree = TokenTree()
    start = tree.add_path(-1, [0])[-1]
    zero, certain = tree.add_path(start, [1])[0], tree.add_path(start, [2])[0]
    logits = torch.full((len(tree), 4), float("-inf"))
    logits[:, 2] = 0.0                               # r = one-hot(2) at every node
    sampler = TreeSampler(do_sample=True, generator=torch.Generator().manual_seed(0))
    for _ in range(50):
        out = sampler.walk(tree, logits, start, [0])
        assert out.path == [certain] and out.bonus == 2 and not torch.isnan(out.dist).any()
    # only the zero candidate: rejected, and the bonus comes from the rest
    tree2 = TokenTree()
    start2 = tree2.add_path(-1, [0])[-1]
    tree2.add_path(start2, [1])
    out = sampler.walk(tree2, logits[:2], start2, [0])
    assert out.path == [] and out.bonus == 2
    # a sampled candidate with q == r is accepted
    q = torch.softmax(logits[0], -1)
    out = sampler.walk(tree2, logits[:2], start2, [0], {1: q})
    assert out.path == [] and out.bonus == 2        # q(1) = 0: never accepted; r - q = 0 everywhere: r kept
    tree3 = TokenTree()
    start3 = tree3.add_path(-1, [0])[-1]
    node = tree3.add_path(start3, [2])[0]
    out = sampler.walk(tree3, logits[:2], start3, [0], {node: q})
    assert out.path == [node]


def test_greedy_walk_takes_the_processed_argmax():
    """do_sample=False with a processor: each choice is the argmax of the processed scores on the node's path."""
    target = Synthetic(seed=5)
    sampler = make_sampler(repetition_penalty=3.0)
    tree, start, _ = deterministic_trie(None)
    rows = [target.logits(CONTEXT)] * len(tree)      # the same raw logits everywhere: only the penalty differs
    out = sampler.walk(tree, torch.stack(rows), start, CONTEXT)
    chosen, path = [], list(CONTEXT)
    for node in out.path + [None]:
        best = int(sampler.scores(target.logits(CONTEXT), torch.tensor(path)).argmax())
        chosen.append(best)
        if node is not None:
            assert tree.tokens[node] == best
            path.append(best)
    assert out.bonus == chosen[-1]


# ---- end to end: every method on a tiny model with a small vocabulary -----------------------------------------------
V = 16
# Text the target itself sampled (seed 1, temperature 0.6): repetitive, so the pool's phrases are ones the target
# often accepts, and its next-token distribution is split (0.45 / 0.45 / ...), so a lossy rule shows at once.
PROMPT = [3, 14, 1, 10, 0, 1, 14, 13, 2, 11, 1, 14, 13, 2, 11]


@torch.inference_mode()
def exact_three(target, prompt: list[int], processors: LogitsProcessorList):
    """The target's exact processed distributions over the first three tokens, by enumerating all V^2 prefixes:
    (p1 (V,), joint of positions 1-2 (V, V), p3 (V,))."""
    n = len(prompt)
    pairs = torch.cartesian_prod(torch.arange(V), torch.arange(V))
    seqs = torch.cat([torch.tensor(prompt).expand(V * V, n), pairs], dim=1)
    logits = target(seqs).logits.float()

    def dist(pos: int) -> torch.Tensor:
        return torch.softmax(processors(seqs[:, :pos + 1], logits[:, pos].clone()), -1)
    p1, p2, p3 = dist(n - 1)[0], dist(n).view(V, V, V)[:, 0], dist(n + 1)
    joint12 = p1[:, None] * p2
    return p1, joint12, (joint12.flatten()[:, None] * p3).sum(0)


@torch.inference_mode()
def sample_runs(target, draft, method: str, sampler: TreeSampler, runs: int, draft_sampling: bool = False,
                **params) -> tuple[list[list[int]], GenerationStats]:
    """``runs`` independent generations of 3 tokens through the engine; the stats summed over the runs."""
    cfg = resolve_config("cpu", method, **params)
    total = GenerationStats()
    samples = []
    for _ in range(runs):
        pool = PhrasePool(ngram=cfg.ngram, guess_set=cfg.pool_capacity)
        stats = GenerationStats()
        out = []
        for new in decode(target, draft, PROMPT, method=method, cfg=cfg, max_new_tokens=3, eos=frozenset(),
                          pool=pool if method in ("lookahead", "prompt_lookup", "ouroboros") else None,
                          stats=stats, sampler=sampler, draft_sampling=draft_sampling):
            out.extend(new)
        samples.append(out)
        for name in ("target_forwards", "draft_tokens", "trunk_accepted", "branch_accepted", "guess_accepted"):
            setattr(total, name, getattr(total, name) + getattr(stats, name))
    return samples, total


E2E_CASES = {   # method, sampling arguments, engine parameters, draft_sampling
    "greedy-t0.7-topk8": ("greedy", dict(temperature=0.7, top_k=8), {}, False),
    "speculative-topp0.9": ("speculative", dict(top_p=0.9), dict(gamma=3), False),
    "speculative-draft_sampling-t1.3-rp1.5": ("speculative", dict(temperature=1.3, repetition_penalty=1.5),
                                              dict(gamma=3), True),
    "lookahead-rp1.3-topk6": ("lookahead", dict(repetition_penalty=1.3, top_k=6), {}, False),
    "prompt_lookup-minp0.05-t0.8": ("prompt_lookup", dict(min_p=0.05, temperature=0.8), {}, False),
    "ouroboros-default": ("ouroboros", {}, dict(gamma=3, topk=2), False),
    "ouroboros-draft_sampling-t0.8-topp0.9": ("ouroboros", dict(temperature=0.8, top_p=0.9), dict(gamma=3, topk=2),
                                              True),
}
E2E_RUNS = 400
POWER_RUNS = 300


@pytest.mark.parametrize("case", list(E2E_CASES))
def test_every_method_samples_the_target_distribution(small_pair, case):
    target, draft = small_pair
    method, args, params, draft_sampling = E2E_CASES[case]
    sampler = make_sampler(do_sample=True, generator=torch.Generator().manual_seed(7), **args)
    samples, stats = sample_runs(target, draft, method, sampler, E2E_RUNS, draft_sampling, **params)
    pvalues = three_token_pvalues(samples, *exact_three(target, PROMPT, sampler.processors))
    assert min(pvalues.values()) > ALPHA, pvalues
    # the proposals were really exercised: accepted and rejected candidates at several depths
    if method in ("speculative", "ouroboros"):
        assert 0 < stats.trunk_accepted < stats.draft_tokens
    if method in ("prompt_lookup", "ouroboros"):
        assert stats.branch_accepted > 0
    if method == "lookahead" or (method == "ouroboros" and draft_sampling):    # pooled guesses the draw took
        assert stats.guess_accepted > 0
    assert stats.target_forwards < 3 * E2E_RUNS or method == "greedy"


@pytest.mark.parametrize("method", ["ouroboros", "prompt_lookup"])
def test_a_lossy_rule_fails_the_end_to_end_test(small_pair, method):
    target, draft = small_pair
    _, args, params, _ = E2E_CASES[next(k for k in E2E_CASES if k.startswith(method))]
    sampler = make_sampler(do_sample=True, generator=torch.Generator().manual_seed(7), accept=lossy_accept, **args)
    samples, _ = sample_runs(target, draft, method, sampler, POWER_RUNS, **params)
    pvalues = three_token_pvalues(samples, *exact_three(target, PROMPT, sampler.processors))
    assert min(pvalues.values()) < POWER, pvalues


def test_a_sampled_ouroboros_draft_verified_with_the_wrong_q_fails_the_end_to_end_test(small_pair, monkeypatch):
    """The lossy variant of draft sampling: the verifier is told a wrong q for the draft's tokens (q at a quarter of
    the temperature it was drawn at, q^4 renormalised: the slip of recording the distribution before the warpers),
    so min(1, p/q) and the residual are off. (Dropping q altogether would stay exact: a sampled token verified as a deterministic proposal
    is accepted with p(x), which is lossless for any candidate, only slower.)"""
    from ouroboros.drafting.host_drafter import HostDrafter
    end = HostDrafter._end

    def wrong_q(self, phase):
        out = end(self, phase)
        out.qs = [q ** 4 / (q ** 4).sum() for q in out.qs]
        return out
    monkeypatch.setattr(HostDrafter, "_end", wrong_q)
    target, draft = small_pair
    _, args, params, _ = E2E_CASES["ouroboros-draft_sampling-t0.8-topp0.9"]
    sampler = make_sampler(do_sample=True, generator=torch.Generator().manual_seed(7), **args)
    samples, _ = sample_runs(target, draft, "ouroboros", sampler, 3 * POWER_RUNS, True, **params)
    pvalues = three_token_pvalues(samples, *exact_three(target, PROMPT, sampler.processors))
    assert min(pvalues.values()) < POWER, pvalues


# ---- the public API: seeds, scores, greedy with processors ---------------------------------------------------------
def _generate(target, draft, method, **kw):
    return ouroboros.generate(target, draft, torch.tensor([PROMPT]), max_new_tokens=10, method=method,
                              gamma=3, **kw)[0, len(PROMPT):].tolist()


@pytest.mark.parametrize("method", ouroboros.METHODS)
def test_same_seed_same_output(small_pair, method):
    target, draft = small_pair
    kw = dict(do_sample=True, temperature=1.2, draft_sampling=method == "speculative")
    runs = [_generate(target, draft, method, generator=torch.Generator().manual_seed(s), **kw) for s in (0, 0, 1)]
    assert runs[0] == runs[1] and len(runs[0]) == 10
    globals_ = []
    for seed in (5, 5):
        torch.manual_seed(seed)
        globals_.append(_generate(target, draft, method, **kw))
    assert globals_[0] == globals_[1]
    assert len({tuple(r) for r in runs + globals_}) > 1          # different seeds give different text


@pytest.mark.parametrize("method", ouroboros.METHODS)
def test_greedy_with_processors_equals_hf(family_models, method):
    """do_sample=False with a repetition penalty and a user processor (history-dependent, so evaluated on each
    node's own path): token-exact with HF's greedy generate under the same processors."""
    target, draft = family_models("llama")
    prompt = [5, 6, 7, 8, 9, 10] * 4
    user = LogitsProcessorList([NoRepeatNGramLogitsProcessor(3)])
    ids = torch.tensor([prompt])
    expected = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                               repetition_penalty=1.3, logits_processor=user, pad_token_id=0)[0, len(prompt):]
    assert expected.tolist() != hf_greedy(target, prompt, 20)        # the processors change the text
    got = ouroboros.generate(target, draft, ids, max_new_tokens=20, method=method, repetition_penalty=1.3,
                             logits_processor=user)
    assert got[0, len(prompt):].tolist() == expected.tolist()


def test_ouroboros_samples_its_draft_by_default_on_a_cpu(small_pair):
    """draft_sampling=None (the default) is the measured CPU choice: "ouroboros" with the host pool samples its draft
    (the same seed gives the same text as draft_sampling=True); elsewhere it stays off."""
    target, draft = small_pair
    runs = [_generate(target, draft, "ouroboros", do_sample=True, temperature=1.1,
                      generator=torch.Generator().manual_seed(8), **kw) for kw in ({}, {"draft_sampling": True})]
    assert runs[0] == runs[1]
    assert default_draft_sampling("cpu", "ouroboros", device_pool=False)
    assert not default_draft_sampling("cuda", "ouroboros", device_pool=False)
    assert not default_draft_sampling("cpu", "ouroboros", device_pool=True)
    assert not default_draft_sampling("cpu", "speculative", device_pool=False)


@pytest.mark.parametrize("method,draft_sampling", [("ouroboros", False), ("speculative", True), ("lookahead", False)])
def test_fast_path_samples_like_the_dynamic_path(small_pair, method, draft_sampling):
    """The static-cache runner's logits (``forward_tree_logits``) drive the same walk: same seed, same text."""
    target, draft = small_pair
    runs = [_generate(target, draft, method, do_sample=True, temperature=1.3, repetition_penalty=1.2, fast=fast,
                      draft_sampling=draft_sampling, generator=torch.Generator().manual_seed(3))
            for fast in (False, True)]
    assert runs[0] == runs[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_capture_logits_beside_argmax(small_pair):
    """On CUDA the fast path captures a logits graph per bucket beside the argmax graph; both replay correctly and
    sampling with a CUDA generator reproduces."""
    from ouroboros.hf.runner import ModelRunner
    from ouroboros.hf.static_runner import StaticRunner
    target = small_pair[0].to("cuda")
    try:
        tree = TokenTree()
        tree.add_path(-1, PROMPT[-3:])
        tree.add_path(2, [4, 5])
        static, dynamic = StaticRunner(target, 256, use_graphs=True), ModelRunner(target)
        for runner in (static, dynamic):
            runner.prefill(PROMPT[:-3])
        for _ in range(2):                                   # capture, then replay (the length is not advanced)
            argmax = static.forward_tree(tree)
            logits = static.forward_tree_logits(tree)
        assert {(16, False), (16, True)} <= set(static._graphs)     # one graph per (bucket, logits?)
        expected = dynamic.forward_tree_logits(tree)
        torch.testing.assert_close(logits, expected, atol=1e-3, rtol=1e-3)
        assert argmax == expected.argmax(-1).tolist()
        outs = [ouroboros.generate(target, None, torch.tensor([PROMPT], device="cuda"), max_new_tokens=12,
                                   method="lookahead", do_sample=True, fast=True,
                                   generator=torch.Generator(device="cuda").manual_seed(0)).tolist()
                for _ in range(2)]
        assert outs[0] == outs[1]
    finally:
        target.to("cpu")
        if hasattr(target, "_ouroboros_static_runner"):
            del target._ouroboros_static_runner


def test_scores_out_matches_hf_output_scores(family_models):
    target, draft = family_models("llama")
    prompt = [5, 6, 7, 8, 9, 10] * 3
    ids = torch.tensor([prompt])
    hf = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                         repetition_penalty=1.2, pad_token_id=0, output_scores=True, output_logits=True,
                         return_dict_in_generate=True)
    scores: list = []
    out = ouroboros.generate(target, draft, ids, max_new_tokens=8, method="ouroboros", repetition_penalty=1.2,
                             scores_out=scores)
    assert out.tolist() == hf.sequences.tolist() and len(scores) == 8
    for (processed, raw), hf_proc, hf_raw in zip(scores, hf.scores, hf.logits):
        assert processed.shape == raw.shape == (1, target.config.vocab_size) and processed.dtype == torch.float32
        torch.testing.assert_close(processed, hf_proc, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(raw, hf_raw, atol=1e-4, rtol=1e-4)
    # plain greedy keeps scores too (processed == raw), and sampling gives one pair per emitted token
    plain: list = []
    ouroboros.generate(target, draft, ids, max_new_tokens=5, method="speculative", scores_out=plain)
    assert len(plain) == 5 and all(torch.equal(p, r) for p, r in plain)
    sampled: list = []
    n = ouroboros.generate(target, draft, ids, max_new_tokens=7, method="prompt_lookup", do_sample=True,
                           generator=torch.Generator().manual_seed(0), scores_out=sampled).shape[1] - len(prompt)
    assert len(sampled) == n == 7


def test_bad_sampling_arguments_raise_value_errors(small_pair):
    target, draft = small_pair
    ids = torch.tensor([PROMPT])
    for kw, name in ((dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"),
                     (dict(min_p=3.0), "min_p"), (dict(repetition_penalty=-1.0), "repetition_penalty"),
                     (dict(generator="seed"), "generator"), (dict(scores_out=()), "scores_out"),
                     (dict(draft_sampling=True, method="lookahead"), "draft_sampling")):
        kw = {"do_sample": True, "method": "speculative", **kw}
        with pytest.raises(ValueError, match=name):
            ouroboros.generate(target, draft, ids, max_new_tokens=2, **kw)
