"""Packed tree masks (SPEC §3 layout): pack/unpack round trips, ancestor masks, depths and paths."""
from __future__ import annotations

import pytest
import torch

from ouroboros_kernels import tree


@pytest.mark.parametrize("t", [1, 7, 31, 32, 33, 64, 130, 256])
def test_pack_unpack_round_trip(t):
    gen = torch.Generator().manual_seed(t)
    dense = torch.rand(t, t, generator=gen) < 0.5
    packed = tree.pack_mask(dense)
    assert packed.dtype == torch.int32 and tuple(packed.shape) == (t, (t + 31) // 32)
    assert torch.equal(tree.unpack_mask(packed, t), dense)
    assert torch.equal(tree.unpack_mask(packed), dense)


def test_bit_layout():
    """Bit j % 32 of word j // 32 in row i; bit 31 makes the int32 word negative."""
    dense = torch.zeros(40, 40, dtype=torch.bool)
    dense[0, 0] = True
    dense[1, 31] = True
    dense[2, 32] = True
    dense[3, 39] = True
    packed = tree.pack_mask(dense)
    assert packed[0].tolist() == [1, 0]
    assert packed[1].tolist() == [-(2**31), 0]
    assert packed[2].tolist() == [0, 1]
    assert packed[3].tolist() == [0, 1 << 7]
    full = tree.pack_mask(torch.ones(32, 32, dtype=torch.bool))
    assert (full == -1).all()


@pytest.mark.parametrize("t", [1, 5, 33, 130])
def test_causal_packed_mask(t):
    assert torch.equal(tree.causal_packed_mask(t), tree.pack_mask(torch.ones(t, t, dtype=torch.bool).tril()))
    assert torch.equal(tree.ancestor_mask(list(range(-1, t - 1))), torch.ones(t, t, dtype=torch.bool).tril())


def test_ancestor_mask_small_tree():
    #        (prefix)
    #       0       4
    #      / \      |
    #     1   2     5
    #     |
    #     3
    parents = [-1, 0, 0, 1, -1, 4]
    m = tree.ancestor_mask(parents)
    want = {0: {0}, 1: {0, 1}, 2: {0, 2}, 3: {0, 1, 3}, 4: {4}, 5: {4, 5}}
    for i, seen in want.items():
        assert set(torch.nonzero(m[i]).flatten().tolist()) == seen
    assert tree.depths(parents) == [0, 1, 1, 2, 0, 1]
    assert tree.path_to(parents, 3) == [0, 1, 3]
    assert tree.path_to(parents, 5) == [4, 5]
    assert torch.equal(tree.unpack_mask(tree.pack_mask(m)), m)


def test_ancestor_mask_random_trees_match_walk():
    gen = torch.Generator().manual_seed(0)
    for t in (1, 17, 64, 200):
        parents = [int(torch.randint(-1, i, (1,), generator=gen)) if i else -1 for i in range(t)]
        m = tree.ancestor_mask(parents)
        for i in range(t):
            assert set(torch.nonzero(m[i]).flatten().tolist()) == set(tree.path_to(parents, i))
        d = tree.depths(parents)
        assert all(m[i].sum().item() == d[i] + 1 for i in range(t))


def test_bad_inputs():
    with pytest.raises(ValueError):
        tree.validate_parents([-1, 1])
    with pytest.raises(ValueError):
        tree.ancestor_mask([0])
    with pytest.raises(ValueError):
        tree.pack_mask(torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError):
        tree.unpack_mask(torch.zeros(3, 1, dtype=torch.int64))
    with pytest.raises(ValueError):
        tree.unpack_mask(torch.zeros(40, 1, dtype=torch.int32))
