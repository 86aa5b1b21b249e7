"""The lossless suite on a GPU: the fast path (static caches, CUDA graphs, device drafting) against HF greedy.

float32 must be token-exact. bfloat16 reports its match rate (different tree sizes take different GEMM kernels, so
a near-tie can flip); ``OUROBOROS_REPORT_DIR`` set -> the rates are appended there to ``gpu_lossless.jsonl``.
"""
from __future__ import annotations

import json
import os

import ouroboros
import pytest
import torch
from conftest import FAMILIES, make_model, noisy_copy, random_prompt, repetitive_prompt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PROMPTS = {"random": random_prompt(81, 23), "repetitive": repetitive_prompt(82, 6, 5), "one-token": [7]}
NEW = 32
DEVICE = "cuda"   # the tests are skipped without CUDA; a CPU dry run of the logic may set this to "cpu"


def cuda_pair(family: str, dtype: torch.dtype):
    target = make_model(family).to(device=DEVICE, dtype=dtype)
    return target, noisy_copy(make_model(family), 0.02).to(device=DEVICE, dtype=dtype)


def hf_greedy_cuda(model, prompt: list[int], eos: int | None = None) -> list[int]:
    ids = torch.tensor([prompt], device=DEVICE)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                         eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def ours(target, draft, prompt, method, eos=None, **kw) -> list[int]:
    ids = ouroboros.generate(target, draft, torch.tensor([prompt], device=DEVICE), max_new_tokens=NEW,
                             method=method, eos_token_id=eos, fast=True, **kw)
    return ids[0, len(prompt):].tolist()


def cases(target, draft, **kw):
    """(label, expected, got) for every method and prompt, plus device-pool drafting and an EOS stop."""
    for name, prompt in PROMPTS.items():
        expected = hf_greedy_cuda(target, prompt)
        for method in ouroboros.METHODS:
            yield f"{method}/{name}", expected, ours(target, draft, prompt, method, **kw)
        yield (f"ouroboros+device_pool/{name}", expected,
               ours(target, draft, prompt, "ouroboros", pool_device=DEVICE, **kw))
    prompt = PROMPTS["random"]
    eos = hf_greedy_cuda(target, prompt)[NEW // 2]
    expected = hf_greedy_cuda(target, prompt, eos=eos)
    for method in ("speculative", "ouroboros"):
        yield f"{method}/eos", expected, ours(target, target, prompt, method, eos=eos, **kw)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fast_path_float32_is_token_exact(family):
    target, draft = cuda_pair(family, torch.float32)
    wrong = [label for label, expected, got in cases(target, draft) if got != expected]
    assert not wrong, f"{family}: outputs differ from HF greedy for {wrong}"
    runner = target._ouroboros_static_runner      # the fast path ran the tree through our kernel (issue 16)
    assert runner.tree_kernel == ouroboros.is_patched(target)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "mistral"])
def test_fast_path_bfloat16_match_rate(family):
    target, draft = cuda_pair(family, torch.bfloat16)
    results = [(label, got == expected) for label, expected, got in cases(target, draft)]
    rate = sum(ok for _, ok in results) / len(results)
    print(f"bf16 {family}: {rate:.1%} identical to HF greedy; differing: {[lab for lab, ok in results if not ok]}")
    report = os.environ.get("OUROBOROS_REPORT_DIR")
    if report:   # one JSON line per family (xdist workers append to the same file)
        with open(os.path.join(report, "gpu_lossless.jsonl"), "a") as f:
            f.write(json.dumps({"family": family, "dtype": "bfloat16", "identical": sum(ok for _, ok in results),
                                "cases": len(results), "differing": [lab for lab, ok in results if not ok],
                                "device": torch.cuda.get_device_name()}) + "\n")
    assert rate >= 0.5, f"bf16 {family}: only {rate:.0%} of outputs equal HF greedy"


@pytest.mark.parametrize("family", ["llama"])     # one family: each compile takes tens of seconds
def test_compiled_fast_path_float32_is_token_exact(family):
    target, draft = cuda_pair(family, torch.float32)
    wrong = [label for label, expected, got in cases(target, draft, compile=True) if got != expected]
    assert target._ouroboros_static_runner.compiled
    assert not wrong, f"{family} (compiled): outputs differ from HF greedy for {wrong}"
