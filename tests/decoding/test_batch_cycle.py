"""The batched device cycle (``ouroboros.decoding.batch_cycle``) on CPU tensors, without graphs.

- Each row lossless: token for token the target's batch-1 greedy output for that prompt (up to a near-tie), over
  rows of different lengths, per-row limits and an EOS that stops one row early, on every attention kind.
- The structure CI can enforce without a GPU: at most one host read per cycle for the whole batch.
- Routing: ``generate(..., fast=True)`` on a batch with a device pool runs it; batches it cannot run are refused
  (fast=True) or run on the host loop.
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
)
from ouroboros.core.config import DecodeConfig
from ouroboros.decoding.batch import BatchStats
from ouroboros.decoding.batch_cycle import BatchDeviceCycle
from ouroboros.decoding.stats import GenerationStats
from ouroboros.drafting.gpu_pool import GpuPhrasePool
from ouroboros.hf.batch_static_runner import BatchStaticRunner
from ouroboros.tuning.probes import HostReads
from test_batch import assert_row_lossless, batch_prompts

LAYOUTS = [dict(gamma=2, ngram=4, window=0, guess_set=3, topk=2),      # guesses and suffixes
           dict(gamma=2, ngram=3, window=0, guess_set=2, topk=0),      # guesses only
           dict(gamma=3, ngram=5, window=0, guess_set=1, topk=3, adaptive=False)]


def device_pool(ngram: int, backend: str | None = "reference") -> GpuPhrasePool:
    return GpuPhrasePool(ngram=ngram, guess_set=5, vocab_size=96, device="cpu", backend=backend)


@pytest.fixture(scope="module")
def pair():
    target = make_model("qwen2", seed=21)
    return target, noisy_copy(target, 0.02)


def decode_rows(cycle: BatchDeviceCycle, prompts, limits, stats=None) -> list[list[int]]:
    out = [[] for _ in prompts]
    for step in cycle.generate(prompts, limits, stats):
        for row, new in step:
            out[row].extend(new)
    return out


@pytest.mark.parametrize("kw", LAYOUTS)
def test_every_row_is_its_batch1_greedy(pair, kw):
    """B = 3 rows of different lengths, one with its own shorter limit; B = 5 with an EOS stopping row 0 early."""
    target, draft = pair
    cfg = DecodeConfig(**kw)
    for b, limits, eos in ((3, [30, 9, 30], None), (5, [20] * 5, "row0")):
        prompts = batch_prompts(b)
        if eos == "row0":
            eos = hf_greedy(target, prompts[0], 20)[3]
        cycle = BatchDeviceCycle(BatchStaticRunner(target, b, 256), BatchStaticRunner(draft, b, 320),
                                 device_pool(cfg.ngram), cfg, frozenset() if eos is None else frozenset([eos]))
        stats = [GenerationStats() for _ in prompts]
        got = decode_rows(cycle, prompts, limits, stats)
        for p, g, n, s in zip(prompts, got, limits, stats):
            assert_row_lossless(target, p, g, hf_greedy(target, p, n, eos=eos))
            assert s.tokens == len(g) and s.cycles <= len(g)
        if eos is not None:
            assert len(got[0]) <= 4 and got[0][-1] == eos


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gpt2", "phi3", "falcon"])
def test_every_attention_kind(family_models, family):
    """The kernel path (RoPE, GQA, sliding windows and softcaps, absolute positions, fused q/k/v) and the dense-mask
    path of models whose layers drop the tree descriptor (falcon), through ``generate(fast=True)``."""
    target, draft = family_models(family)
    prompts = [repetitive_prompt(99, 5, 6), random_prompt(100, 7), [11]]
    out, stats = ouroboros.generate(target, draft, prompts, max_new_tokens=24, method="ouroboros", fast=True,
                                    pool=device_pool(4), return_stats=True, **LAYOUTS[0])
    width = max(len(p) for p in prompts)
    assert isinstance(stats, BatchStats) and all(s.device_cycle for s in stats.rows)
    for i, p in enumerate(prompts):
        got = out[i, width:width + stats.rows[i].tokens].tolist()
        assert_row_lossless(target, p, got, hf_greedy(target, p, 24))
    assert stats.target_forwards <= 1 + max(s.cycles for s in stats.rows)


def test_cycle_is_kept_and_a_warm_pool_helps(pair):
    """One cycle (and its graphs) serves later batches of the same shape; the caller's pool carries history."""
    target, draft = pair
    prompts = [repetitive_prompt(94, 7, 4), repetitive_prompt(95, 5, 5)]
    pool = device_pool(4)
    first, s1 = ouroboros.generate(target, draft, prompts, max_new_tokens=30, fast=True, pool=pool,
                                   return_stats=True, **LAYOUTS[0])
    cycle = target._ouroboros_batch_cycle
    second, s2 = ouroboros.generate(target, draft, prompts, max_new_tokens=30, fast=True, pool=pool,
                                    return_stats=True, **LAYOUTS[0])
    assert torch.equal(first, second) and target._ouroboros_batch_cycle is cycle
    assert s2.target_forwards <= s1.target_forwards
    assert len(pool) > 0


@needs_triton_device
def test_one_host_read_per_cycle_for_the_whole_batch():
    """B = 3, Triton kernels (interpreted on CPU tensors) and the Triton pool: each cycle reads the host once."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    target = ouroboros.patch(make_model("llama", seed=22).to(device), backend="triton")
    draft = ouroboros.patch(noisy_copy(target, 0.2).to(device), backend="triton")
    prompts = [repetitive_prompt(95, 6, 4), random_prompt(96, 5), repetitive_prompt(97, 3, 3)]
    cfg = DecodeConfig(**LAYOUTS[0])
    pool = GpuPhrasePool(ngram=4, guess_set=3, vocab_size=96, device=device)
    cycle = BatchDeviceCycle(BatchStaticRunner(target, 3, 256), BatchStaticRunner(draft, 3, 320), pool, cfg,
                             frozenset(), use_graphs=False)
    with torch.inference_mode():
        decode_rows(cycle, prompts, 6)                # first use: layouts and tables built
        steps = cycle.generate(prompts, [20, 12, 20])
        next(steps)                                   # load + first cycle
        reads = []
        while True:
            with HostReads() as seen:
                try:
                    next(steps)
                except StopIteration:
                    break
            reads.append(seen.seen)
    assert len(reads) >= 4 and all(len(r) <= 1 for r in reads), reads


def test_bad_input_is_refused(pair):
    target, draft = pair
    tgt, drf = BatchStaticRunner(target, 2, 128), BatchStaticRunner(draft, 3, 128)
    with pytest.raises(ValueError, match="rows"):
        BatchDeviceCycle(tgt, drf, device_pool(4), DecodeConfig(**LAYOUTS[0]), frozenset())
    drf = BatchStaticRunner(draft, 2, 128)
    with pytest.raises(ValueError, match="window"):
        BatchDeviceCycle(tgt, drf, device_pool(4), DecodeConfig(gamma=2, ngram=4, window=2, guess_set=2),
                         frozenset())
    cycle = BatchDeviceCycle(tgt, drf, device_pool(4), DecodeConfig(**LAYOUTS[0]), frozenset())
    with pytest.raises(ValueError, match="3 prompts"):
        list(cycle.generate([[1], [2], [3]], 4))
    with pytest.raises(ValueError, match="at least one token"):
        list(cycle.generate([[1], []], 4))
    with pytest.raises(ValueError, match="too small"):
        list(cycle.generate([[1], [2]], 500))
    with pytest.raises(ValueError, match="batched device cycle"):      # sampling cannot run there: no silent path
        ouroboros.generate(target, draft, [[1, 2], [3]], max_new_tokens=4, fast=True, pool=device_pool(4),
                           do_sample=True, **LAYOUTS[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the cycle captured as one CUDA graph)")
def test_captured_batch_cycles_on_cuda_are_lossless():
    """On CUDA the batched cycle is captured once per draft-forward count and replayed: rows stay token-exact."""
    target = make_model("llama", seed=23)
    draft = noisy_copy(target, 0.02)
    prompts = [repetitive_prompt(98, 6, 5), random_prompt(99, 8), [5, 6]]
    want = [hf_greedy(target, p, 40) for p in prompts]
    target, draft = target.cuda(), draft.cuda()
    pool = GpuPhrasePool(ngram=4, guess_set=3, vocab_size=96, device="cuda")
    for _ in range(2):                                 # the second call replays the first one's graphs
        out, stats = ouroboros.generate(target, draft, prompts, max_new_tokens=40, fast=True, pool=pool,
                                        return_stats=True, **LAYOUTS[0])
        width = max(len(p) for p in prompts)
        got = [out[i, width:width + s.tokens].tolist() for i, s in enumerate(stats.rows)]
        assert sum(g == w for g, w in zip(got, want)) >= 2      # bf16-free fp32; a near-tie may differ at most
    assert target._ouroboros_batch_cycle.graphs.replayed > 0
