"""Bad input gets a ValueError that names the problem."""
from __future__ import annotations

import ouroboros
import pytest
import torch
from conftest import Family, hf_greedy, make_model


@pytest.fixture(scope="module")
def pair():
    target = make_model("llama")
    return target, make_model("llama", seed=1)


def test_batch_greater_than_one_is_decoded_row_by_row(pair):
    """Batches are supported (tests/decoding/test_batch.py); what is still batch 1 says so."""
    target, draft = pair
    out = ouroboros.generate(target, draft, torch.tensor([[5, 6], [7, 8]]), max_new_tokens=4)
    for i in range(2):
        assert torch.equal(out[i:i + 1], ouroboros.generate(target, draft, out[i:i + 1, :2], max_new_tokens=4))
    with pytest.raises(ValueError, match="batch size 1"):
        target.generate(torch.tensor([[5, 6], [7, 8]]), custom_generate=ouroboros.custom_generate, draft=draft,
                        max_new_tokens=4, return_dict_in_generate=True, output_scores=True)


def test_empty_prompt(pair):
    target, draft = pair
    with pytest.raises(ValueError, match="prompt is empty"):
        ouroboros.generate(target, draft, torch.zeros(1, 0, dtype=torch.long), max_new_tokens=4)


@pytest.mark.parametrize("n", [0, -3, 2.5])
def test_max_new_tokens(pair, n):
    target, draft = pair
    with pytest.raises(ValueError, match="max_new_tokens"):
        ouroboros.generate(target, draft, torch.tensor([[5, 6]]), max_new_tokens=n)


def test_vocabulary_mismatch(pair):
    target, _ = pair
    from transformers import LlamaConfig, LlamaForCausalLM
    other = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2)).eval()
    with pytest.raises(ValueError, match="vocabularies differ"):
        ouroboros.generate(target, other, torch.tensor([[5, 6]]), max_new_tokens=4)


def test_models_on_different_devices(pair):
    target, _ = pair
    draft = make_model("llama", seed=2).to("meta")
    with pytest.raises(ValueError, match="device"):
        ouroboros.generate(target, draft, torch.tensor([[5, 6]]), max_new_tokens=4)


def test_attention_that_cannot_take_a_4d_mask():
    target = make_model("llama", attn="flex_attention")
    with pytest.raises(ValueError, match="cannot take a 4D tree mask"):
        ouroboros.generate(target, None, torch.tensor([[5, 6]]), max_new_tokens=4, method="greedy")


def test_unknown_method_and_missing_draft(pair):
    target, _ = pair
    with pytest.raises(ValueError, match="unknown method"):
        ouroboros.generate(target, None, torch.tensor([[5]]), max_new_tokens=4, method="beam")
    with pytest.raises(ValueError, match="needs a draft model"):
        ouroboros.generate(target, None, torch.tensor([[5]]), max_new_tokens=4, method="ouroboros")


def test_token_ids_outside_vocabulary_and_wrong_dtype(pair):
    target, draft = pair
    with pytest.raises(ValueError, match="outside the target vocabulary"):
        ouroboros.generate(target, draft, torch.tensor([[5, 10_000]]), max_new_tokens=4)
    with pytest.raises(ValueError, match="integer tensor"):
        ouroboros.generate(target, draft, torch.tensor([[5.0, 6.0]]), max_new_tokens=4)


def test_bad_parameters_and_pool_mismatch(pair):
    target, draft = pair
    with pytest.raises(ValueError, match="gamma"):
        ouroboros.generate(target, draft, torch.tensor([[5]]), max_new_tokens=4, gamma=0)
    with pytest.raises(ValueError, match="ngram"):
        ouroboros.generate(target, draft, torch.tensor([[5]]), max_new_tokens=4, ngram=1)
    with pytest.raises(ValueError, match="5-grams but ngram=7"):
        ouroboros.generate(target, draft, torch.tensor([[5]]), max_new_tokens=4, ngram=7,
                           pool=ouroboros.PhrasePool(ngram=5))


# ---- architectures ouroboros cannot verify a tree on: refused with the reason, not warned about ----------------------
REFUSED = {
    "mamba": (Family("MambaConfig", "MambaForCausalLM", {"state_size": 4}, attn="eager"), "recurrent state"),
    "lfm2-conv": (Family("Lfm2Config", "Lfm2ForCausalLM", {"layer_types": ["conv", "full_attention"]}),
                  "has conv layers"),
    "bloom": (Family("BloomConfig", "BloomForCausalLM"), "AttentionInterface"),   # untested, builds ALiBi itself
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_architectures_that_cannot_work_are_refused(name):
    family, why = REFUSED[name]
    model = make_model(family)
    with pytest.raises(ValueError, match=why):
        ouroboros.generate(model, None, torch.tensor([[5, 6]]), max_new_tokens=4, method="greedy")
    with pytest.raises(ValueError, match=why):
        ouroboros.patch(model)


@pytest.mark.parametrize("family,why", [("stablelm", "keyword arguments"),
                                        ("falcon", "AttentionInterface|keyword arguments")])
def test_patch_refuses_attention_the_tree_cannot_reach(family, why):
    """StableLM's decoder layers do not pass ``ouro_tree`` on to attention (a patched StableLM would verify every
    tree as a chain); Falcon has no AttentionInterface before transformers 5.25 and, from it on, decoder layers that
    drop the kwarg. patch refuses both; generate runs them with dense masks."""
    model = make_model(family)
    with pytest.raises(ValueError, match=why):
        ouroboros.patch(model, backend="reference")
    assert not ouroboros.is_patched(model)
    prompt = [5, 6, 7, 5, 6, 7, 5]
    got = ouroboros.generate(model, model, torch.tensor([prompt]), max_new_tokens=8)
    assert got[0, len(prompt):].tolist() == hf_greedy(model, prompt, 8)
