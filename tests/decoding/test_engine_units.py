"""Unit tests of the engine's pieces: trie merge, acceptance walk, KV gather, tree masks for HF forward."""
from __future__ import annotations

import torch
from ouroboros.core.config import CPU_DEFAULTS, GPU_DEFAULTS, resolve_config
from ouroboros.core.tokentree import TokenTree
from ouroboros.decoding.verify import mine_verification
from ouroboros.drafting.pool import PhrasePool
from ouroboros.drafting.window import LookaheadWindow
from ouroboros.hf.cache import keep_entries, new_cache
from ouroboros.hf.masks import dense_tree_masks
from ouroboros.hf.tree_step import StepResult


def test_trie_merges_shared_prefixes():
    tree = TokenTree()
    root = tree.add_path(-1, [9])
    trunk = tree.add_path(root[-1], [1, 2])
    a = tree.add_path(trunk[-1], [3, 4, 5])
    b = tree.add_path(trunk[-1], [3, 4, 6])
    c = tree.add_path(trunk[-1], [7])
    assert a[:2] == b[:2] and a[2] != b[2]
    assert len(tree) == 3 + 4 + 1
    assert tree.parents == [-1, 0, 1, 2, 3, 4, 4, 2]
    assert tree.depths == [0, 1, 2, 3, 4, 5, 5, 3]
    assert c == [7]


def test_walk_follows_argmax_and_stops():
    tree = TokenTree()
    tree.add_path(-1, [9, 1, 2])
    tree.add_path(2, [3, 4])
    tree.add_path(2, [8])
    # argmax per node: 9->1, 1->2, 2->8 (branch 8), 8->anything
    argmax = [1, 2, 8, 0, 0, 5]
    assert tree.walk(0, argmax) == [1, 2, 5]
    argmax = [1, 3, 0, 0, 0, 0]      # rejects the trunk at its second token
    assert tree.walk(0, argmax) == [1]
    assert tree.walk(0, [4, 0, 0, 0, 0, 0]) == []


def test_keep_entries_gathers_in_place():
    cache = new_cache()
    k = torch.arange(2 * 3 * 10 * 4, dtype=torch.float32).reshape(2, 3, 10, 4)
    cache.update(k.clone(), -k.clone(), 0)
    n = keep_entries(cache, 4, [0, 2, 5])
    assert n == 7
    layer = cache.layers[0]
    expected = torch.cat([k[:, :, :4], k[:, :, [4, 6, 9]]], dim=2)
    assert torch.equal(layer.keys, expected) and torch.equal(layer.values, -expected)
    assert cache.get_seq_length() == 7
    keep_entries(cache, 5, [0])      # contiguous: only a crop
    assert cache.get_seq_length() == 6


def test_dense_masks_see_prefix_ancestors_and_window():
    from transformers import MistralConfig
    parents, depths = [-1, 0, 1, 1], [0, 1, 2, 2]
    full = dense_tree_masks(MistralConfig(sliding_window=None), 3, parents, depths, torch.float32, "cpu")
    vis = full[0, 0] == 0
    assert vis.shape == (4, 7)
    assert vis[:, :3].all()
    assert vis[3].tolist()[3:] == [True, True, False, True]
    slid = dense_tree_masks(MistralConfig(sliding_window=2), 3, parents, depths, torch.float32, "cpu")[0, 0] == 0
    # query 3 sits at position 5: sees keys at positions 4 and 5 only (node 1 at 4, itself at 5)
    assert slid[3].tolist() == [False, False, False, False, True, False, True]


def test_dense_masks_per_layer_type():
    from transformers import Gemma2Config
    masks = dense_tree_masks(Gemma2Config(sliding_window=2), 3, [-1, 0], [0, 1], torch.float32, "cpu")
    assert set(masks) == {"full_attention", "sliding_attention"}
    assert (masks["full_attention"][0, 0] == 0).tolist() == [[True] * 4 + [False], [True] * 5]
    assert (masks["sliding_attention"][0, 0, 1] == 0).tolist() == [False, False, False, True, True]


def test_window_slides_and_feeds_the_pool():
    pool = PhrasePool(ngram=3, guess_set=4)
    window = LookaheadWindow(3, 2, [10, 11, 12])
    assert all(len(c) == 2 for c in window.columns)
    cols = [list(c) for c in window.columns]
    tree = TokenTree()
    given = tree.add_path(-1, [5])
    branches = [tree.add_path(given[-1], c) for c in cols]
    argmax = list(range(100, 100 + len(tree)))
    window.advance(StepResult(tree, argmax, given, [], branches, []), pool)
    for c, nodes, new in zip(cols, branches, window.columns):
        assert new == [c[1], argmax[nodes[-1]]]
        assert tuple(new) in pool.phrases(c[0])


def test_mining_from_verification():
    pool = PhrasePool(ngram=3, guess_set=4)
    pool.insert(4, (20, 21))
    tree = TokenTree()
    given = tree.add_path(-1, [9])
    trunk = tree.add_path(given[-1], [1, 2, 3, 4])
    branch = tree.add_path(trunk[-1], [20, 21])
    #        9  1  2  3  4  20 21
    argmax = [1, 7, 8, 9, 30, 31, 32]
    result = StepResult(tree, argmax, given, trunk, [branch], tree.walk(given[-1], argmax))
    assert result.trunk_accepted == 1
    mine_verification(pool, result, [1, 2, 3, 4], [(20, 21)])
    assert pool.phrases(2) == [(8, 9)]         # rejected draft token 2 -> target's argmaxes after it
    assert pool.phrases(3) == [(9, 30)]
    assert pool.phrases(4) == [(30, 31)]       # suffix rewritten as the target's predictions, in place


def test_device_defaults():
    assert resolve_config("cpu") == CPU_DEFAULTS
    assert resolve_config("cuda") == GPU_DEFAULTS
    assert resolve_config("cpu", gamma=3).gamma == 3
    la = resolve_config("cpu", "lookahead")
    assert la.window > 0 and la.guess_set > 0            # lookahead never degenerates to greedy
    assert resolve_config("cpu", "lookahead", window=5).window == 5
    gla = resolve_config("cuda", "lookahead")
    assert gla.window > 0 and gla.guess_set > 0 and resolve_config("cuda", "prompt_lookup").topk > 0
    assert resolve_config("cpu", "prompt_lookup").topk > 0       # prompt lookup never degenerates to greedy
