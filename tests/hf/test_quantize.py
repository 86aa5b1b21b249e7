"""The int8 draft (``ouroboros.hf.quantize``): the output stays the float target's greedy tokens; bad input is refused."""
from __future__ import annotations

import copy

import ouroboros
import pytest
import torch
from conftest import (
    VOCAB,
    hf_greedy,
    make_model,
    noisy_copy,
    random_prompt,
    repetitive_prompt,
)
from ouroboros.hf.quantize import (
    draft_quantization,
    quantize_draft,
    resolve_draft_quant,
)

pytestmark = pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines
                                and "x86" not in torch.backends.quantized.supported_engines,
                                reason="this torch build has no x86 int8 GEMM engine")


@pytest.fixture(scope="module")
def int8_pair():
    target = make_model("qwen2", gqa=True, seed=21)
    return target, quantize_draft(noisy_copy(target, 0.01, seed=22))


def _prompts() -> list[list[int]]:
    randoms = [random_prompt(23 + i, n) for i, n in enumerate((1, 5, 17, 40))]
    return randoms + [repetitive_prompt(30 + i, p, r) for i, (p, r) in enumerate(((4, 8), (7, 5), (3, 12)))]


def test_quantize_converts_every_linear_in_place():
    draft = noisy_copy(make_model("llama", seed=3), 0.01)
    assert draft_quantization(draft) == "none"
    same = quantize_draft(draft)
    assert same is draft and draft_quantization(draft) == "int8"
    assert not any(isinstance(m, torch.nn.Linear) for m in draft.modules())
    assert quantize_draft(draft) is draft        # a second call is a no-op
    assert quantize_draft(make_model("llama"), "none") is not None


@pytest.mark.parametrize("method", ["speculative", "ouroboros"])
def test_int8_draft_is_lossless(int8_pair, method):
    target, draft = int8_pair
    for i, prompt in enumerate(_prompts()):
        got = ouroboros.generate(target, draft, torch.tensor([prompt]), max_new_tokens=24, method=method)
        assert got[0, len(prompt):].tolist() == hf_greedy(target, prompt, 24), f"prompt {i}"


def test_int8_draft_with_eos_and_warm_pool(int8_pair):
    target, draft = int8_pair
    pool = ouroboros.PhrasePool(ngram=4, guess_set=1)
    for prompt in _prompts()[-3:]:
        ref = hf_greedy(target, prompt, 30)
        eos = ref[len(ref) // 2]              # a token the target does emit: generation must stop on it
        expected = ref[:ref.index(eos) + 1]
        got = ouroboros.generate(target, draft, torch.tensor([prompt]), max_new_tokens=30, pool=pool,
                                 eos_token_id=eos)
        assert got[0, len(prompt):].tolist() == expected
    assert len(pool) > 0


def test_hf_assisted_generation_takes_the_int8_draft(int8_pair):
    target, draft = int8_pair
    prompt = _prompts()[4]
    ids = torch.tensor([prompt])
    out = target.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=draft, do_sample=False,
                          max_new_tokens=20, pad_token_id=0)
    assert out[0, len(prompt):].tolist() == hf_greedy(target, prompt, 20)


def test_vocab_mismatch_is_still_detected_after_quantization():
    target = make_model("llama", seed=4)
    other = copy.deepcopy(target)
    other.resize_token_embeddings(VOCAB + 8)
    quantize_draft(other)
    with pytest.raises(ValueError, match="vocabularies differ"):
        ouroboros.generate(target, other, torch.tensor([[5, 6, 7]]), max_new_tokens=4, method="ouroboros")


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="float32 model on the CPU"):
        quantize_draft(make_model("llama").to(torch.bfloat16))
    with pytest.raises(ValueError, match="unknown draft quantization"):
        quantize_draft(make_model("llama"), "int4")
    with pytest.raises(ValueError, match="unknown draft quantization"):
        resolve_draft_quant("fp8", "cpu")


def test_auto_picks_int8_only_for_a_float32_cpu_draft():
    assert resolve_draft_quant("auto", "cpu", torch.float32) == "int8"
    assert resolve_draft_quant("auto", "cpu") == "int8"
    assert resolve_draft_quant("auto", "cpu", torch.bfloat16) == "none"
    assert resolve_draft_quant("auto", "cuda", torch.float32) == "none"
    assert resolve_draft_quant("none", "cpu", torch.float32) == "none"
