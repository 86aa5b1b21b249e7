"""One drafting rule (``ouroboros.drafting.base.Drafter``), run on the host or on the device (here: on CPU tensors).

The host drafter (trie on a dynamic-cache runner, CPU pool) and the device drafter (fixed layout on a static runner,
device pool, one host read per phase) must draft the same tokens with the same window and pool updates; the device
drafter follows the cycle's adaptive gamma.
"""
from __future__ import annotations

import math

import ouroboros
import pytest
import torch
from conftest import (
    hf_greedy,
    make_model,
    needs_triton_device,
    random_prompt,
    repetitive_prompt,
    run,
)
from ouroboros.core.config import DecodeConfig
from ouroboros.drafting.device_drafter import DeviceDrafter
from ouroboros.drafting.gpu_pool import GpuPhrasePool
from ouroboros.drafting.host_drafter import HostDrafter
from ouroboros.drafting.pool import PhrasePool
from ouroboros.drafting.select import make_drafter
from ouroboros.drafting.window import LookaheadWindow
from ouroboros.hf.runner import ModelRunner
from ouroboros.hf.static_runner import StaticRunner
from ouroboros.tuning.probes import HostReads

N, W, G, K = 4, 2, 3, 2


@pytest.fixture(scope="module")
def model():
    return make_model("llama", seed=11)


def drafters(model, prompt, eos=frozenset(), device="cpu"):
    """A host and a device drafter on ``model`` in the same state: prompt cached but its last token, same pool."""
    host_runner, dev_runner = ModelRunner(model), StaticRunner(model, 512, use_graphs=False)
    for r in (host_runner, dev_runner):
        r.prefill(prompt[:-1])
    pool = PhrasePool(ngram=N, guess_set=G)
    dpool = GpuPhrasePool(ngram=N, guess_set=G, vocab_size=model.config.vocab_size, device=device)
    pool.seed_from(prompt)
    dpool.seed_from(prompt)
    host = HostDrafter(host_runner, eos, LookaheadWindow(N, W, prompt), pool, G, K)
    dev = DeviceDrafter(dev_runner, dpool, N, W, G, prompt, topk=K, eos=eos)
    return host, dev


def test_host_and_device_drafters_follow_one_rule(model):
    """Phase by phase (several gammas, partial acceptance, a multi-token pending tail, EOS): the same draft, drafted
    tokens, guesses, suffixes, window, pool and cache length. The device phase runs gamma forwards (a budget that
    never binds), so the forwards after the rule says stop are masked and must change nothing."""
    prompt = repetitive_prompt(81, 6, 4)
    eos = frozenset([hf_greedy(model, prompt, 40)[27]])
    host, dev = drafters(model, prompt, eos)
    x = list(prompt)
    guessed = 0
    with torch.inference_mode():
        for i, gamma in enumerate([3, 6, 9, 5, 8, 4, 7, 10]):
            a = host.draft(x, gamma)
            b = dev.draft(x, gamma, forwards=gamma)
            assert (b.tokens, b.seq, b.drafted, b.guessed) == (a.tokens, a.seq, a.drafted, a.guessed), i
            assert [tuple(s) for s in b.suffixes] == [tuple(s) for s in a.suffixes], i
            assert b.forwards == gamma and a.forwards == a.drafted - a.guessed <= gamma
            assert dev.columns.tolist() == host.window.columns, i
            want, got = host.pool.state_dict(), dev.pool.state_dict()
            assert all(got[k].tolist() == want[k].tolist() for k in ("keys", "counts", "phrases")), i
            assert dev.pool.stats == host.pool.stats, i              # the same lookups (none once stopped)
            assert dev.runner.n_cached == host.runner.n_cached == len(a.seq) - 1
            assert int(dev.runner.cache.length) == dev.runner.n_cached
            guessed += a.guessed
            if eos.intersection(a.tokens):
                break
            k = i % (len(a.tokens) + 1)       # the target accepts k draft tokens, then corrects the next one
            x = x + a.tokens[:k] + ([] if k == len(a.tokens) else [(a.tokens[k] + 1) % 96])
            back = len(x) - (3 if i == 2 else 1)             # once, leave three tokens pending
            host.runner.rollback(back)
            dev.runner.rollback(back)
        else:
            pytest.fail("EOS never drafted")
    assert guessed > 0                                     # guesses were accepted: chains, not one token a forward


def test_host_drafter_stops_at_gamma_or_eos(model):
    """Speculative drafting (no window, no guesses): one token per forward, gamma forwards, or fewer at EOS."""
    prompt = random_prompt(82, 9)
    greedy = hf_greedy(model, prompt, 8)
    for eos, want in ((frozenset(), 6), (frozenset([greedy[2]]), greedy.index(greedy[2]) + 1)):
        runner = ModelRunner(model)
        runner.prefill(prompt[:-1])
        with torch.inference_mode():
            d = HostDrafter(runner, eos).draft(list(prompt), 6)
        assert d.tokens == greedy[:want] and d.forwards == d.drafted == want and d.guessed == 0


def test_device_budget_follows_gamma(model):
    """A device phase runs exactly ``budget(gamma)`` forwards: gamma / 2 before any phase (at most gamma), then gamma
    over the yield seen."""
    prompt = repetitive_prompt(83, 5, 5)
    _, dev = drafters(model, prompt)
    assert [dev.budget(g) for g in (1, 2, 3, 8, 13)] == [1, 1, 2, 4, 7]
    with torch.inference_mode():
        before = dev.runner.forwards
        d = dev.draft(list(prompt), 8)
    assert d.forwards == dev.runner.forwards - before == 4
    rate = (d.drafted + 2) / (d.drafted - d.guessed + 1)
    assert dev.budget(20) == min(20, math.ceil(20 / rate))


def test_device_drafting_follows_adaptive_gamma():
    """pool_device on CPU tensors, fast path: a draft equal to the target is always fully accepted, so gamma grows
    by 2 a cycle up to 4x its start and the draft forwards per cycle grow with it; without adaptive gamma they stay
    put. Token-exact either way."""
    target = make_model("qwen2", seed=12)
    prompt = repetitive_prompt(84, 7, 4)
    expected = hf_greedy(target, prompt, 48)
    kw = dict(pool_device="cpu", fast=True, gamma=2, ngram=3, window=1, guess_set=2, topk=1)
    got, stats = run(target, target, prompt, 48, "ouroboros", **kw)
    assert got == expected
    gammas = [c["gamma"] for c in stats.trace]
    assert gammas[:4] == [2, 4, 6, 8] and max(gammas) == 8
    assert all(c["draft_len"] <= c["gamma"] for c in stats.trace)
    forwards = [c["draft_forwards"] for c in stats.trace]
    assert forwards[0] == 1
    fixed, fstats = run(target, target, prompt, 48, "ouroboros", adaptive=False, **kw)
    assert fixed == expected
    assert {c["gamma"] for c in fstats.trace} == {2}
    # forwards = ceil(gamma / yield), yield <= N = 3 tokens a forward: at most 2 for gamma 2, at least 3 for gamma 8
    assert max(c["draft_forwards"] for c in fstats.trace) <= 2 < 3 <= max(forwards)


@needs_triton_device
def test_one_host_read_per_device_drafting_phase():
    """A device drafting phase of several forwards (window, guesses, EOS watch, suffix lookup) reads the device once:
    the final block. Counted with HostReads on the device kernels' code (CPU tensors: Triton interpreter)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = ouroboros.patch(make_model("llama", seed=13).to(device), backend="triton")
    prompt = repetitive_prompt(85, 6, 4)
    _, dev = drafters(model, prompt, eos=frozenset([5]), device=device)
    x = list(prompt)
    with torch.inference_mode():
        d = dev.draft(x, 6)                     # the first phase builds the layouts
        x += d.tokens
        dev.runner.rollback(len(x) - 1)
        with HostReads() as reads:
            d = dev.draft(x, 12)
    assert d.forwards >= 3
    assert len(reads.seen) <= 1, reads.seen


def test_drafters_refuse_bad_input(model):
    runner = ModelRunner(model)
    pool = GpuPhrasePool(ngram=N, guess_set=G, vocab_size=96, device="cpu")
    with pytest.raises(ValueError, match="StaticRunner"):
        DeviceDrafter(runner, pool, N, W, G, [3, 4])
    static = StaticRunner(model, 64, use_graphs=False)
    with pytest.raises(ValueError, match="ngram"):
        DeviceDrafter(static, pool, N + 1, W, G, [3, 4])
    with pytest.raises(ValueError, match="window \\+ guess_set"):
        DeviceDrafter(static, pool, N, 0, 0, [3, 4])
    with pytest.raises(ValueError, match="sampling draft has no Jacobi window"):
        HostDrafter(runner, frozenset(), LookaheadWindow(N, 2, [3, 4]), pool=PhrasePool(ngram=N), sampler=object())
    host = HostDrafter(runner, frozenset())
    with pytest.raises(ValueError, match="gamma"):
        host.draft([3, 4], 0)
    with pytest.raises(ValueError, match="forwards"):
        host.draft([3, 4], 2, forwards=0)
    with pytest.raises(ValueError, match="no drafting model"):
        make_drafter("lookahead", runner, [3, 4], DecodeConfig(), None, frozenset())
