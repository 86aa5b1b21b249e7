"""The static-cache fast path and device-side drafting stay token-exact (run here without CUDA graphs)."""
from __future__ import annotations

import os

import ouroboros
import pytest
import torch
from conftest import FAMILIES, hf_greedy, random_prompt, repetitive_prompt, run
from ouroboros.core.tokentree import TokenTree
from ouroboros.hf.static_runner import StaticRunner
from ouroboros.tuning.probes import HostReads

from ouroboros_kernels import ancestor_mask

PROMPTS = [random_prompt(61, 17), repetitive_prompt(62, 5, 6), [9]]

@pytest.mark.parametrize("family", list(FAMILIES))
def test_fast_path_every_method(family_models, family):
    target, draft = family_models(family)
    for prompt in PROMPTS:
        expected = hf_greedy(target, prompt, 20)
        for method in ouroboros.METHODS:
            got, stats = run(target, draft, prompt, 20, method, fast=True)
            assert got == expected, (method, prompt)


@pytest.mark.parametrize("family", ["llama", "gemma2", "mistral", "qwen3"])
def test_device_drafting_with_device_pool(family_models, family):
    target, draft = family_models(family)
    for d in (draft, target):
        for prompt in PROMPTS:
            expected = hf_greedy(target, prompt, 24)
            got, stats = run(target, d, prompt, 24, "ouroboros", pool_device="cpu")
            assert got == expected
            assert stats.draft_forwards > 0 and stats.pool_size > 0
    _, stats = run(target, target, PROMPTS[1], 24, "ouroboros", pool_device="cpu", window=3, guess_set=4, topk=2)
    assert stats.guess_accepted > 0 and stats.trunk_accepted > 0 and stats.branch_accepted > 0


def test_warm_device_pool_carries_across_calls(family_models):
    target, draft = family_models("llama")
    pool = ouroboros.GpuPhrasePool(ngram=5, guess_set=4, vocab_size=target.config.vocab_size, device="cpu")
    prompt = repetitive_prompt(63, 7, 4)
    expected = hf_greedy(target, prompt, 20)
    assert run(target, draft, prompt, 20, "ouroboros", pool=pool)[0] == expected
    size = len(pool)
    assert size > 0
    assert run(target, draft, prompt, 20, "ouroboros", pool=pool)[0] == expected


def test_static_runner_gather_and_rollback(family_models):
    """Static-cache bookkeeping: tree forward, gather of a branch path, rollback as a length update."""
    target, _ = family_models("llama")
    prompt = random_prompt(64, 12)
    runner = StaticRunner(target, max_len=64)
    runner.prefill(prompt[:-1])
    assert runner.n_cached == len(prompt) - 1
    greedy = hf_greedy(target, prompt, 4)
    tree = TokenTree()
    root = tree.add_path(-1, [prompt[-1]])
    tree.add_path(root[0], [greedy[0] + 1 if greedy[0] + 1 < 96 else 3])     # a wrong branch first
    path = tree.add_path(root[0], greedy[:3])                                   # the right one second
    argmax = runner.forward_tree(tree)
    assert tree.walk(root[0], argmax) == path
    runner.keep(len(prompt) - 1, root + path)
    assert runner.gathers == 1 and runner.n_cached == len(prompt) + 3
    nxt = TokenTree()
    nxt.add_path(-1, [greedy[3]])
    assert runner.forward_tree(nxt)[0] == hf_greedy(target, prompt, 5)[4]
    runner.rollback(len(prompt))
    again = TokenTree()
    again.add_path(-1, greedy[:4])
    assert runner.forward_tree(again)[:3] == greedy[1:4]


def test_static_cache_full_is_reported(family_models):
    target, _ = family_models("llama")
    runner = StaticRunner(target, max_len=8)
    with pytest.raises(ValueError, match="static cache"):
        runner.prefill(list(range(3, 13)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (graph capture)")
def test_graphs_on_cuda_are_lossless():
    from conftest import make_model, noisy_copy
    target = make_model("llama").cuda()
    draft = noisy_copy(target, 0.01).cuda()
    prompt = repetitive_prompt(65, 6, 5)
    expected = hf_greedy(target.cpu(), prompt, 32)
    target.cuda()
    for method in ouroboros.METHODS:
        assert run(target, draft, prompt, 32, method, fast=True)[0] == expected
    assert run(target, draft, prompt, 32, "ouroboros", fast=True, pool_device="cuda")[0] == expected


def test_static_runner_is_reused_across_calls_and_draft_equal_target(family_models):
    target, draft = family_models("qwen2")
    prompt = repetitive_prompt(66, 4, 6)
    expected = hf_greedy(target, prompt, 16)
    assert run(target, draft, prompt, 16, "ouroboros", fast=True)[0] == expected
    first = target._ouroboros_static_runner
    assert run(target, draft, prompt, 16, "speculative", fast=True)[0] == expected
    assert target._ouroboros_static_runner is first                  # same buffers (and graphs) reused
    assert run(target, target, prompt, 16, "ouroboros", fast=True)[0] == expected   # draft is target: own runner


def test_compiled_fast_path_is_lossless(family_models):
    """torch.compile of the tree forward (inductor; here on CPU, without graphs) changes no token."""
    target, draft = family_models("llama")
    prompt = PROMPTS[1]
    expected = hf_greedy(target, prompt, 16)
    for method in ("greedy", "speculative", "ouroboros"):
        got, _ = run(target, draft, prompt, 16, method, fast=True, compile=True)
        assert got == expected, method
    assert target._ouroboros_static_runner.compiled          # compiled, not silently fallen back to eager
    assert run(target, draft, prompt, 16, "greedy", fast=True, compile=False)[0] == expected
    assert not target._ouroboros_static_runner.compile_requested   # a runner per setting


def test_fast_path_patches_and_leaves_greedy_unchanged():
    """The fast path routes the model through our kernel (it patches it); afterwards HF's own generate and the
    dynamic-cache path still give the unpatched greedy output."""
    from conftest import make_model

    target = make_model("gemma2", seed=3)
    prompt = repetitive_prompt(67, 5, 4)
    expected = hf_greedy(target, prompt, 16)
    assert not ouroboros.is_patched(target)
    assert run(target, target, prompt, 16, "speculative", fast=True)[0] == expected
    assert ouroboros.is_patched(target) and target._ouroboros_static_runner.tree_kernel
    assert hf_greedy(target, prompt, 16) == expected
    assert run(target, target, prompt, 16, "ouroboros", fast=False)[0] == expected


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="the GPU kernels run on CUDA, or on CPU tensors under TRITON_INTERPRET=1")
@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3", "mistral"])
def test_tree_forward_reads_nothing_back(family):
    """One fast-path forward (prefill done, a tree at the device length) on the GPU kernel's code makes no host read:
    no .item(), no nonzero, no mask built from the host length (counted with :class:`HostReads`)."""
    from conftest import make_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = ouroboros.patch(make_model(family).to(device), backend="triton")
    runner = StaticRunner(model, max_len=64, use_graphs=False)
    runner.prefill(random_prompt(68, 19))
    parents = [-1, 0, 1, 1, 3]
    bits = ancestor_mask(parents, device)
    with torch.no_grad(), HostReads() as counter:
        runner._logits_impl(torch.tensor([[3, 4, 5, 6, 7]], device=device), torch.tensor([0, 1, 2, 2, 3],
                                                                                           device=device), bits)
    assert counter.seen == []
