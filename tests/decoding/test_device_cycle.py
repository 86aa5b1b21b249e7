"""The whole Ouroboros cycle on the device (``ouroboros.decoding.device_cycle``), here on CPU tensors without graphs.

- Lossless: token-exact against HF greedy over repetitive and random prompts, EOS stops and token limits.
- The same decisions as the host-loop device drafter (same draft forwards, acceptance, pool contents): the device
  cycle is a faithful tensor version of the engine's cycle.
- Structure that CI can enforce without a GPU: at most one host read per cycle, and no eager op outside the cycle
  (the region captured as one CUDA graph on a GPU) but the block read.
"""
from __future__ import annotations

import ouroboros
import pytest
import torch
from conftest import (
    hf_greedy,
    make_model,
    needs_triton_device,
    noisy_copy,
    random_prompt,
    repetitive_prompt,
    run,
)
from ouroboros.core.config import DecodeConfig
from ouroboros.decoding.device_cycle import DeviceCycle, VerifyLayout
from ouroboros.decoding.stats import GenerationStats
from ouroboros.drafting.gpu_pool import GpuPhrasePool
from ouroboros.drafting.pool import PhrasePool
from ouroboros.hf.runner import ModelRunner
from ouroboros.hf.static_runner import StaticRunner
from ouroboros.tuning.probes import HostReads, OpCounter

LAYOUTS = [dict(gamma=3, ngram=4, window=2, guess_set=3, topk=2),      # window, guesses, suffixes
           dict(gamma=2, ngram=3, window=0, guess_set=2, topk=0),      # guesses only, no concatenation
           dict(gamma=4, ngram=5, window=1, guess_set=0, topk=3, adaptive=False)]


@pytest.fixture(scope="module")
def pair():
    target = make_model("qwen2", seed=21)
    return target, noisy_copy(target, 0.02)


def prompts():
    return [repetitive_prompt(90, 6, 5), random_prompt(91, 9), repetitive_prompt(92, 4, 8), [7]]


@pytest.mark.parametrize("kw", LAYOUTS)
def test_device_cycle_is_lossless_and_follows_the_engine(pair, kw):
    """fast=True with a device pool runs DeviceCycle; fast=False runs the host loop with the device drafter. Both
    equal HF greedy, and cycle by cycle they make the same decisions and leave the same pool."""
    target, draft = pair
    for prompt in prompts():
        expected = hf_greedy(target, prompt, 36)
        pools = [GpuPhrasePool(ngram=kw["ngram"], guess_set=5, vocab_size=96, device="cpu", backend="reference")
                 for _ in range(2)]
        got, st = run(target, draft, prompt, 36, "ouroboros", fast=True, pool=pools[0], **kw)
        ref, rst = run(target, draft, prompt, 36, "ouroboros", fast=False, pool=pools[1], **kw)
        assert got == ref == expected
        assert st.device_cycle and not rst.device_cycle
        def drop_size(trace):           # the host trie merges suffixes sharing a prefix; the fixed layout does not
            return [{k: v for k, v in c.items() if k != "tree_size"} for c in trace]
        assert drop_size(st.trace) == drop_size(rst.trace)
        for name in ("cycles", "draft_forwards", "draft_tokens", "trunk_accepted", "branch_accepted",
                     "guess_accepted", "pool_lookups", "pool_hits", "pool_size"):
            assert getattr(st, name) == getattr(rst, name), name
        want, have = pools[1].state_dict(), pools[0].state_dict()
        assert all(torch.equal(have[k], want[k]) for k in ("keys", "counts", "phrases"))


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gemma3", "phi3", "gpt_neox", "falcon"])
def test_device_cycle_every_attention_kind(family_models, family):
    """Kernel path with MHA/GQA, sliding windows and softcaps (mistral, gemma2, gemma3), fused q/k/v (phi3), and
    the dense-mask path of models whose layers drop the tree descriptor (gpt_neox, falcon): token-exact."""
    target, draft = family_models(family)
    pool = GpuPhrasePool(ngram=4, guess_set=3, vocab_size=96, device="cpu", backend="reference")
    for prompt in (repetitive_prompt(99, 5, 6), random_prompt(100, 7)):
        got, stats = run(target, draft, prompt, 30, "ouroboros", fast=True, pool=pool, **LAYOUTS[0])
        assert got == hf_greedy(target, prompt, 30) and stats.device_cycle


def test_device_cycle_stops_at_eos_and_at_the_limit(pair):
    target, draft = pair
    prompt = repetitive_prompt(93, 5, 6)
    greedy = hf_greedy(target, prompt, 40)
    eos = greedy[17]
    expected = greedy[:greedy.index(eos) + 1]
    def pool():
        return GpuPhrasePool(ngram=4, guess_set=3, vocab_size=96, device="cpu", backend="reference")
    kw = dict(fast=True, **LAYOUTS[0])
    assert run(target, draft, prompt, 40, "ouroboros", eos=eos, pool=pool(), **kw)[0] == expected
    for n in (1, 2, 7):
        assert run(target, draft, prompt, n, "ouroboros", pool=pool(), **kw)[0] == greedy[:n]


def test_device_cycle_is_reused_and_learns_across_calls(pair):
    """Same runners and settings: one DeviceCycle serves every call (its graphs would be reused), with the caller's
    pool copied in and out: the same pool carries history, so the second call on the same text needs fewer target
    forwards; a fresh pool starts cold and ends holding what the host-loop path leaves."""
    target, draft = pair
    prompt = repetitive_prompt(94, 7, 4)
    expected = hf_greedy(target, prompt, 40)
    pool = GpuPhrasePool(ngram=4, guess_set=3, vocab_size=96, device="cpu", backend="reference")
    first, s1 = run(target, draft, prompt, 40, "ouroboros", fast=True, pool=pool, **LAYOUTS[0])
    cycle = target._ouroboros_static_runner._device_cycle
    second, s2 = run(target, draft, prompt, 40, "ouroboros", fast=True, pool=pool, **LAYOUTS[0])
    assert first == second == expected
    assert target._ouroboros_static_runner._device_cycle is cycle
    assert s2.target_forwards <= s1.target_forwards
    fresh = GpuPhrasePool(ngram=4, guess_set=3, vocab_size=96, device="cpu", backend="reference")
    third, s3 = run(target, draft, prompt, 40, "ouroboros", fast=True, pool=fresh, **LAYOUTS[0])
    assert third == expected and s3.target_forwards == s1.target_forwards     # a fresh pool: as cold as the first
    assert target._ouroboros_static_runner._device_cycle is cycle              # ... on the same cycle (and graphs)
    assert fresh.state_dict()["keys"].tolist() == pool_after_first(target, draft, prompt)


def pool_after_first(target, draft, prompt):
    """The keys a fresh pool holds after one 40-token generation on the host-loop path."""
    pool = GpuPhrasePool(ngram=4, guess_set=3, vocab_size=96, device="cpu", backend="reference")
    run(target, draft, prompt, 40, "ouroboros", fast=False, pool=pool, **LAYOUTS[0])
    return pool.state_dict()["keys"].tolist()


@needs_triton_device
@pytest.mark.parametrize("extra", [{}, {"recycle": 2, "scored": True}])
def test_one_host_read_and_no_eager_op_outside_the_cycle(extra):
    """Per cycle the host reads once (the block) and runs no op outside the cycle function, which on CUDA is one
    captured graph. The kernels run as they would on a GPU: Triton (interpreted on CPU tensors), no reference
    fallback that reads the device. Top-k recycling into a scored pool keeps it so (issue #29)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    target = ouroboros.patch(make_model("llama", seed=22).to(device), backend="triton")
    draft = ouroboros.patch(noisy_copy(target, 0.2).to(device), backend="triton")
    prompt = repetitive_prompt(95, 6, 4)
    cfg = DecodeConfig(gamma=3, ngram=4, window=2, guess_set=2, topk=2, **extra)
    pool = GpuPhrasePool(ngram=4, guess_set=2, vocab_size=96, device=device, scored=cfg.scored)
    tgt, drf = StaticRunner(target, 256, use_graphs=False), StaticRunner(draft, 256, use_graphs=False)
    cycle = DeviceCycle(tgt, drf, pool, cfg, frozenset(), use_graphs=False)
    with torch.inference_mode():
        list(cycle.generate(prompt, 8))                   # first use: layouts and tables built
        for r in (tgt, drf):
            r.reset()
        stats = GenerationStats()
        steps = cycle.generate(prompt, 24, stats)
        next(steps)                                         # load + first cycle
        reads, ops = [], []
        while True:
            with HostReads() as seen, OpCounter() as counter, counter.opaque_function(DeviceCycle, "_cycle", "cycle"):
                try:
                    next(steps)
                except StopIteration:
                    break
            reads.append(seen.seen)
            ops.append(counter.total - counter.counts["cycle"])
    assert stats.cycles >= 4 and stats.draft_forwards > stats.cycles      # several forwards per phase
    assert (stats.recycled > 0) == bool(extra)
    assert all(len(r) <= 1 for r in reads), reads
    assert max(ops) <= 1, ops                        # at most the block's copy to the host (none on CPU tensors)


def test_verify_layout_tables():
    """Node order root | trunk | suffix chains; suffix chains hang off the trunk's tip at every cut."""
    lay = VerifyLayout(gcap=3, k=2, n1=2, device=torch.device("cpu"), packed=False)
    assert (lay.tokens, lay.size) == (8, 16)
    depths, bits = lay.inputs(torch.tensor(2))
    assert depths[:8].tolist() == [0, 1, 2, 3, 3, 4, 3, 4]
    assert bits[5, :8].tolist() == [True, True, True, False, True, True, False, False]   # root, trunk 0-1, own chain
    assert bits[3, :8].tolist() == [False, False, False, True] + [False] * 4             # a pad trunk slot
    assert bits[8:].sum().item() == 8 and bits[8:, 8:].diagonal().all()                  # pads: themselves only
    depths, bits = lay.inputs(torch.tensor(0))
    assert depths[4:8].tolist() == [1, 2, 1, 2] and bits[6, :8].tolist() == [True] + [False] * 5 + [True, False]


def test_device_cycle_refuses_bad_input(pair):
    target, draft = pair
    cfg = DecodeConfig(gamma=2, ngram=3, window=1, guess_set=1, topk=1)
    static = StaticRunner(target, 64, use_graphs=False)
    pool = GpuPhrasePool(ngram=3, guess_set=1, vocab_size=96, device="cpu")
    with pytest.raises(ValueError, match="StaticRunner"):
        DeviceCycle(ModelRunner(target), static, pool, cfg, frozenset())
    with pytest.raises(ValueError, match="GpuPhrasePool"):
        DeviceCycle(static, StaticRunner(draft, 64, use_graphs=False), PhrasePool(ngram=3), cfg, frozenset())
    cycle = DeviceCycle(static, StaticRunner(draft, 64, use_graphs=False), pool, cfg, frozenset())
    with pytest.raises(ValueError, match="too small"):
        next(cycle.generate(list(range(3, 40)), 40))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (whole-cycle graph capture)")
def test_captured_cycles_are_lossless_on_cuda():
    """On CUDA each draft-forward count is captured once as one graph and replayed: token-exact, and replays
    happen."""
    target = make_model("llama", seed=23).cuda()
    draft = noisy_copy(target, 0.02).cuda()
    prompt = repetitive_prompt(96, 6, 5)
    expected = hf_greedy(target, prompt, 48)
    pool = GpuPhrasePool(ngram=4, guess_set=3, vocab_size=96, device="cuda")
    for _ in range(3):
        got, stats = run(target, draft, prompt, 48, "ouroboros", fast=True, pool=pool, **LAYOUTS[0])
        assert got == expected and stats.device_cycle
    assert target._ouroboros_static_runner._device_cycle.cycles_replayed > 0


def test_replay_forces_the_recorded_acceptance(pair):
    """``DeviceCycle.replay`` runs a recorded trace on another text: the recorded forwards per cycle and the recorded
    tokens kept, whatever the models predict (the GPU benchmark's replay runs the live path's code)."""
    target, draft = pair
    pool = GpuPhrasePool(ngram=4, guess_set=3, vocab_size=96, device="cpu", backend="reference")
    _, live = run(target, draft, repetitive_prompt(97, 6, 5), 40, "ouroboros", fast=True, pool=pool, **LAYOUTS[0])
    cycle = target._ouroboros_static_runner._device_cycle
    other = random_prompt(98, 11)                           # the live acceptance on this text would differ
    stats = GenerationStats()
    kept = cycle.replay(other, live.trace, stats)
    assert kept == live.tokens and stats.cycles == live.cycles
    assert [c["draft_forwards"] for c in stats.trace] == [c["draft_forwards"] for c in live.trace]
    assert [c["accepted"] for c in stats.trace] == [c["accepted"] for c in live.trace]
    _, fresh = run(target, draft, other, 40, "ouroboros", fast=True, pool=pool, **LAYOUTS[0])
    assert [c["accepted"] for c in fresh.trace] != [c["accepted"] for c in live.trace]
