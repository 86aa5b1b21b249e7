"""BatchModel rows that come and go (a server's requests): rows prefilled in batches of their own and taken in by
``absorb`` compute what they compute alone; dropped rows free their cache rows; bad merges are refused."""
from __future__ import annotations

import pytest
import torch
from conftest import make_model

from ouroboros.core.tokentree import TokenTree
from ouroboros.hf.batch_model import BatchModel


def _chain(tokens: list[int]) -> tuple[TokenTree, list[int]]:
    tree = TokenTree()
    return tree, tree.add_path(-1, tokens)


def _prefilled(model, row: int, tokens: list[int], logits: bool = True) -> BatchModel:
    batch = BatchModel(model, [row])
    tree, nodes = _chain(tokens)
    out = batch.forward({row: tree}, logits=logits)
    assert (row in out) == logits
    batch.keep(row, 0, nodes)
    return batch


def _next_logits(batch: BatchModel, row: int, tokens: list[int]) -> torch.Tensor:
    tree, _ = _chain(tokens)
    return batch.forward({row: tree})[row].float()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_absorbed_rows_compute_what_they_compute_alone(family):
    torch.manual_seed(0)
    model = make_model(family)
    prompts = {3: [5, 9, 2, 7, 7, 1, 4, 8, 3, 3, 6], 10: [4, 4, 2], 7: list(range(2, 30))}
    alone = {row: _next_logits(_prefilled(model, row, p), row, [11, 12]) for row, p in prompts.items()}
    batch = BatchModel(model, [])
    for row, p in prompts.items():                  # join one at a time, of different lengths
        batch.absorb(_prefilled(model, row, p))
    assert batch.rows == [3, 10, 7] and batch.length == {r: len(p) for r, p in prompts.items()}
    tree, _ = _chain([11, 12])
    together = batch.forward({row: tree for row in prompts})
    for row in prompts:
        torch.testing.assert_close(together[row].float(), alone[row], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_prefill_without_logits_fills_the_same_cache(family):
    model = make_model(family)
    prompt = [5, 9, 2, 7, 7, 1, 4, 8, 3, 3, 6]
    expect = _next_logits(_prefilled(model, 0, prompt), 0, [11, 12])
    torch.testing.assert_close(_next_logits(_prefilled(model, 0, prompt, logits=False), 0, [11, 12]), expect)


def test_a_row_joins_after_others_left_and_dropping_every_row_frees_the_cache():
    model = make_model("llama")
    batch = BatchModel(model, [])
    batch.absorb(_prefilled(model, 0, [1, 2, 3]))
    batch.absorb(_prefilled(model, 1, [4, 5, 6, 7]))
    batch.drop([0, 1])
    assert batch.rows == [] and batch.valid.shape[0] == 0
    batch.absorb(_prefilled(model, 2, [8, 9]))
    expect = _next_logits(_prefilled(model, 2, [8, 9]), 2, [10])
    torch.testing.assert_close(_next_logits(batch, 2, [10]), expect, atol=1e-4, rtol=1e-4)


def test_bad_merges_are_refused():
    model, other = make_model("llama"), make_model("qwen2")
    batch = BatchModel(model, [])
    batch.absorb(_prefilled(model, 0, [1, 2]))
    with pytest.raises(ValueError, match="in both batches"):
        batch.absorb(_prefilled(model, 0, [3, 4]))
    with pytest.raises(ValueError, match="same model"):
        batch.absorb(_prefilled(other, 5, [3, 4]))
    with pytest.raises(ValueError, match="must differ"):
        BatchModel(model, [1, 1])
