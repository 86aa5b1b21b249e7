"""A TreeSpec with one tree per batch row (contract v3): a patched tiny Llama verifying three different trees over three
different prefix lengths in ONE batched forward gives, row for row, the logits of that row run alone with its own 2-D
mask (and those match the unpatched model with a dense mask).

The batch shares one cache buffer whose rows have different live lengths: a small per-row cache written here (row b's
keys go to ``length[b] + arange(T)``), entries past each row's live part NaN, so any read of them shows.
"""
from __future__ import annotations

import pytest
import torch
from conftest import CUDA, INTERP, make_model
from ouroboros.hf.attention import TreeSpec, patch, tree_call_kwargs, unpatch
from transformers import DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin

from ouroboros_kernels import tree

BACKENDS = ["reference"] + (["triton"] if CUDA or INTERP else [])


class RowLayer(CacheLayerMixin):
    """One layer's keys/values in a ``(B, H, max_len, D)`` buffer; ``update`` writes row b at ``length[b] + i``."""

    is_compileable = False
    is_sliding = False

    def __init__(self, owner: "RowCache") -> None:
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states, value_states, *args, **kwargs) -> None:
        raise AssertionError("the test fills the buffers before the batched call")

    def update(self, key_states, value_states, *args, **kwargs):
        pos = self.owner.length[:, None] + torch.arange(key_states.shape[2])          # (B, T)
        rows = torch.arange(key_states.shape[0])[:, None]
        self.keys[rows, :, pos] = key_states.transpose(1, 2)
        self.values[rows, :, pos] = value_states.transpose(1, 2)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return int(self.owner.length.max())

    def get_max_length(self) -> int:
        return self.owner.max_len

    def get_max_cache_shape(self) -> int:
        return self.owner.max_len

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self.owner.max_len, 0


class RowCache(Cache):
    """Rows of different live lengths ``length`` (B,) in one fixed buffer per layer, copied from per-row caches."""

    def __init__(self, per_row: list[DynamicCache], max_len: int) -> None:
        self.length = torch.tensor([c.get_seq_length() for c in per_row])
        self.max_len = max_len
        super().__init__(layers=[RowLayer(self) for _ in per_row[0].layers])
        for i, layer in enumerate(self.layers):
            shape = (len(per_row), *per_row[0].layers[i].keys.shape[1:2], max_len, per_row[0].layers[i].keys.shape[3])
            layer.keys = torch.full(shape, float("nan"))
            layer.values = torch.full(shape, float("nan"))
            for b, c in enumerate(per_row):
                n = c.get_seq_length()
                layer.keys[b, :, :n] = c.layers[i].keys[0]
                layer.values[b, :, :n] = c.layers[i].values[0]
            layer.is_initialized = True
            layer.dtype, layer.device = layer.keys.dtype, layer.keys.device


def prefilled(model, prompt: torch.Tensor) -> DynamicCache:
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=prompt, cache=cache, use_cache=True)
    return cache


def row_trees(t: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(t)
    rand = [int(torch.randint(-1, j, (1,), generator=gen)) if j else -1 for j in range(t)]
    return [rand, [j - 1 for j in range(t)], [-1] + [0] * (t - 1)]


def dense_4d(prefix: int, parents: list[int]) -> torch.Tensor:
    """(1, 1, T, prefix + T) bool for the unpatched (SDPA) model: the cache plus ancestors-or-self."""
    t = len(parents)
    return torch.cat([torch.ones(t, prefix, dtype=torch.bool), tree.ancestor_mask(parents)], dim=1)[None, None]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t", [1, 6, 37])
def test_per_row_tree_spec_matches_each_row_alone(backend, t):
    model = make_model("llama")
    gen = torch.Generator().manual_seed(t)
    lengths = [11, 4, 23]
    prompts = [torch.randint(3, 96, (1, n), generator=gen) for n in lengths]
    ids = torch.randint(3, 96, (3, t), generator=gen)
    parents = row_trees(t)
    depths = torch.tensor([tree.depths(p) for p in parents])                         # (B, T)
    masks = tree.pack_mask(torch.stack([tree.ancestor_mask(p) for p in parents]))    # (B, T, W)
    pos = torch.tensor(lengths)[:, None] + depths

    dense = []
    with torch.no_grad():
        for b in range(3):     # the unpatched model, one row at a time, with its dense mask
            dense.append(model(input_ids=ids[b:b + 1], position_ids=pos[b:b + 1], use_cache=True,
                               cache=prefilled(model, prompts[b]),
                               attention_mask=dense_4d(lengths[b], parents[b])).logits)
    patch(model, backend=backend)
    try:
        with torch.no_grad():
            caches = [prefilled(model, p) for p in prompts]
            alone = [model(input_ids=ids[b:b + 1], position_ids=pos[b:b + 1], cache=prefilled(model, prompts[b]),
                           use_cache=True, **tree_call_kwargs(TreeSpec(lengths[b], masks[b], depths[b]))).logits
                     for b in range(3)]
            spec = TreeSpec(prefix_len=torch.tensor(lengths), mask=masks, depths=depths)
            batched = model(input_ids=ids, position_ids=pos, cache=RowCache(caches, max(lengths) + t + 5),
                            use_cache=True, **tree_call_kwargs(spec)).logits
    finally:
        unpatch(model)
    assert batched.shape == (3, t, model.config.vocab_size) and not torch.isnan(batched).any()
    for b in range(3):
        torch.testing.assert_close(batched[b:b + 1], alone[b], atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(alone[b], dense[b], atol=2e-5, rtol=2e-5)
