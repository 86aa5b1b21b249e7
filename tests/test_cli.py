"""`python -m ouroboros generate | demo | bench | info` on models saved to disk (no hub)."""
from __future__ import annotations

import pytest
import torch

from conftest import VOCAB, hf_greedy, make_model, noisy_copy
from ouroboros.cli import main


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    root = tmp_path_factory.mktemp("models")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    target = make_model("llama")
    draft = noisy_copy(target, 0.01)
    for name, model in (("target", target), ("draft", draft)):
        model.save_pretrained(root / name)
        fast.save_pretrained(root / name)
    return root, target, fast


@pytest.mark.parametrize("quant", ["auto", "none", "int8"])
def test_generate_streams_the_greedy_text(model_dirs, capsys, quant):
    root, target, tok = model_dirs
    prompt = "w5 w6 w7 w8 w5 w6 w7 w8 w5"
    assert main(["generate", "--target", str(root / "target"), "--draft", str(root / "draft"), "--prompt", prompt,
                 "--max-new-tokens", "12", "--device", "cpu", "--draft-quant", quant]) == 0
    out = capsys.readouterr().out
    ids = tok(prompt).input_ids
    expected = tok.decode(hf_greedy(target, ids, 12), skip_special_tokens=True)
    assert expected in out
    assert "[ouroboros] 12 tokens" in out and "tokens each" in out


def test_info_lists_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backend reference" in out and "available" in out and "torch" in out


def test_demo_on_the_small_pair(capsys):
    assert main(["demo", "--small", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "identical to greedy: yes" in out and "speedup" in out
