"""CPU PhrasePool: the definition of correct for the phrase pool (SPEC §2 "Phrase pool")."""
from __future__ import annotations

import gc
import random
import sys
import tracemalloc
from collections import OrderedDict

import pytest
import torch
from ouroboros.drafting.pool import (
    DEFAULT_MAX_BYTES,
    POOL_FORMAT,
    PhrasePool,
    PoolStats,
    budget_caps,
    key_bytes,
    lru_dict_peak_bytes,
)


def test_insert_lookup_newest_first_and_k_limit():
    pool = PhrasePool(ngram=3, guess_set=4)
    for p in [(1, 2), (3, 4), (5, 6)]:
        pool.insert(7, p)
    assert pool.lookup(7) == [(5, 6), (3, 4), (1, 2)]
    assert pool.lookup(7, 2) == [(5, 6), (3, 4)]
    assert pool.lookup(7, 10) == [(5, 6), (3, 4), (1, 2)]
    assert pool.lookup(7, 0) == []
    assert pool.lookup(8) == []
    assert pool.phrases(7) == [(1, 2), (3, 4), (5, 6)]  # oldest first


def test_lookup_changes_no_order():
    pool = PhrasePool(ngram=2, guess_set=2, max_keys=2)
    pool.insert(1, [10])
    pool.insert(2, [20])
    pool.lookup(1)
    pool.lookup(1, 1)
    assert pool.keys() == [1, 2]
    pool.insert(3, [30])  # evicts key 1: lookups did not refresh it
    assert pool.keys() == [2, 3]
    assert 1 not in pool


def test_guess_set_cap_drops_oldest():
    pool = PhrasePool(ngram=2, guess_set=3)
    for t in range(5):
        pool.insert(0, [t])
    assert pool.phrases(0) == [(2,), (3,), (4,)]
    assert len(pool) == 3


def test_duplicate_reinsert_moves_to_newest_without_growing():
    pool = PhrasePool(ngram=3, guess_set=3)
    for p in [(1, 1), (2, 2), (3, 3)]:
        pool.insert(5, p)
    pool.insert(5, (1, 1))
    assert pool.phrases(5) == [(2, 2), (3, 3), (1, 1)]
    pool.insert(5, (4, 4))  # full: the oldest, (2, 2), goes (not the re-inserted one)
    assert pool.phrases(5) == [(3, 3), (1, 1), (4, 4)]
    pool.insert(5, (4, 4))  # already newest: no change
    assert pool.phrases(5) == [(3, 3), (1, 1), (4, 4)]


def test_max_keys_evicts_least_recently_inserted_into_key():
    pool = PhrasePool(ngram=2, guess_set=2, max_keys=3)
    for key in (1, 2, 3):
        pool.insert(key, [key])
    pool.insert(1, [9])  # refresh key 1 -> order 2, 3, 1
    assert pool.keys() == [2, 3, 1]
    pool.insert(4, [4])
    assert pool.keys() == [3, 1, 4] and 2 not in pool
    pool.insert(5, [5])
    assert pool.keys() == [1, 4, 5]
    assert pool.num_keys() == 3
    pool.insert(3, [3])  # an evicted key comes back empty
    assert pool.phrases(3) == [(3,)]
    assert pool.keys() == [4, 5, 3]


def test_duplicate_insert_refreshes_key():
    pool = PhrasePool(ngram=2, guess_set=2, max_keys=2)
    pool.insert(1, [1])
    pool.insert(2, [2])
    pool.insert(1, [1])  # same phrase again still counts as an insert into key 1
    pool.insert(3, [3])
    assert pool.keys() == [1, 3]


def test_replace_in_place_keeps_recency_slot():
    pool = PhrasePool(ngram=3, guess_set=4)
    for p in [(1, 1), (2, 2), (3, 3)]:
        pool.insert(0, p)
    pool.replace(0, (2, 2), (9, 9))
    assert pool.phrases(0) == [(1, 1), (9, 9), (3, 3)]


def test_replace_old_absent_is_insert():
    pool = PhrasePool(ngram=3, guess_set=2)
    pool.insert(0, (1, 1))
    pool.insert(0, (2, 2))
    pool.replace(0, (7, 7), (3, 3))  # old absent: insert (drops the oldest)
    assert pool.phrases(0) == [(2, 2), (3, 3)]
    pool.replace(4, (7, 7), (5, 5))  # key absent: insert
    assert pool.phrases(4) == [(5, 5)]
    pool.replace(0, (7, 7), (2, 2))  # old absent, new present: insert moves new to newest
    assert pool.phrases(0) == [(3, 3), (2, 2)]


def test_replace_new_already_present_drops_old():
    pool = PhrasePool(ngram=3, guess_set=4)
    for p in [(1, 1), (2, 2), (3, 3)]:
        pool.insert(0, p)
    pool.replace(0, (1, 1), (3, 3))
    assert pool.phrases(0) == [(2, 2), (3, 3)]


def test_replace_same_phrase_only_refreshes_key():
    pool = PhrasePool(ngram=3, guess_set=4, max_keys=2)
    pool.insert(0, (1, 1))
    pool.insert(0, (2, 2))
    pool.insert(1, (5, 5))
    pool.replace(0, (1, 1), (1, 1))
    assert pool.phrases(0) == [(1, 1), (2, 2)]  # order unchanged
    assert pool.keys() == [1, 0]  # key refreshed
    pool.replace(1, (5, 5), (6, 6))
    assert pool.keys() == [0, 1]


def test_wrong_phrase_length_raises():
    pool = PhrasePool(ngram=4)
    with pytest.raises(ValueError):
        pool.insert(0, [1, 2])
    with pytest.raises(ValueError):
        pool.insert(0, [1, 2, 3, 4])
    with pytest.raises(ValueError):
        pool.replace(0, [1, 2, 3], [1, 2])
    with pytest.raises(ValueError):
        pool.replace(0, [1, 2], [1, 2, 3])
    assert len(pool) == 0 and pool.num_keys() == 0


@pytest.mark.parametrize("kwargs", [dict(ngram=1), dict(guess_set=0), dict(max_keys=0), dict(max_bytes=500)])
def test_bad_settings_raise(kwargs):
    with pytest.raises(ValueError):
        PhrasePool(**kwargs)


def test_seed_from_every_ngram_left_to_right():
    pool = PhrasePool(ngram=3, guess_set=4)
    pool.seed_from([1, 2, 3, 1, 2, 4])
    assert pool.keys() == [2, 3, 1]
    assert pool.phrases(1) == [(2, 3), (2, 4)]
    assert pool.phrases(2) == [(3, 1)]
    assert pool.phrases(3) == [(1, 2)]
    assert 4 not in pool  # the last N-1 tokens start no full n-gram
    empty = PhrasePool(ngram=3)
    empty.seed_from([1, 2])
    empty.seed_from([])
    assert len(empty) == 0


def test_insert_many_equals_insert_one_by_one():
    items = [(1, (2, 3)), (1, (4, 5)), (2, (2, 3)), (1, (2, 3)), (3, (0, 0))]
    a, b = PhrasePool(ngram=3, guess_set=2, max_keys=2), PhrasePool(ngram=3, guess_set=2, max_keys=2)
    a.insert_many(items)
    for k, p in items:
        b.insert(k, p)
    assert a.state_dict()["keys"].tolist() == b.state_dict()["keys"].tolist() == [1, 3]
    assert a.phrases(1) == b.phrases(1) == [(4, 5), (2, 3)]


def test_stats_count_lookups_and_hits():
    pool = PhrasePool(ngram=2)
    pool.insert(1, [2])
    pool.lookup(1)
    pool.lookup(1, 0)
    pool.lookup(5)
    pool.lookup(-3)
    assert (pool.stats.lookups, pool.stats.hits) == (4, 2)
    assert pool.stats.hit_rate == 0.5
    assert PoolStats().hit_rate == 0.0
    pool.clear()
    assert (pool.stats.lookups, len(pool), pool.num_keys()) == (0, 0, 0)


def test_len_num_keys_contains():
    pool = PhrasePool(ngram=2, guess_set=2)
    pool.insert_many([(1, [1]), (1, [2]), (1, [3]), (2, [1])])
    assert len(pool) == 3 and pool.num_keys() == 2
    assert 1 in pool and 2 in pool and 3 not in pool


def test_state_dict_format():
    pool = PhrasePool(ngram=3, guess_set=3, max_keys=10)
    pool.insert_many([(5, (1, 2)), (6, (3, 4)), (5, (7, 8))])
    st = pool.state_dict()
    assert st["format"] == POOL_FORMAT
    assert (st["ngram"], st["guess_set"], st["max_keys"], st["max_bytes"]) == (3, 3, 10, DEFAULT_MAX_BYTES)
    assert st["keys"].tolist() == [6, 5]  # oldest key first
    assert st["counts"].tolist() == [1, 2]
    assert st["phrases"].tolist() == [[3, 4], [1, 2], [7, 8]]  # per key, oldest phrase first
    assert st["phrases"].dtype == torch.int64


def test_save_load_round_trip_keeps_every_order(tmp_path):
    pool = PhrasePool(ngram=4, guess_set=3, max_keys=5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        key = int(torch.randint(0, 9, (1,), generator=gen))
        pool.insert(key, torch.randint(0, 3, (3,), generator=gen).tolist())
    path = tmp_path / "pool.pt"
    pool.save(path)
    back = PhrasePool.load(path)
    assert (back.ngram, back.guess_set, back.max_keys) == (4, 3, 5)
    assert back.keys() == pool.keys()
    for key in pool.keys():
        assert back.phrases(key) == pool.phrases(key)
    # the loaded pool goes on evicting in the same order
    for p in (pool, back):
        p.insert(100, (1, 1, 1))
        p.insert(101, (1, 1, 1))
    assert back.keys() == pool.keys()


def test_empty_pool_round_trip(tmp_path):
    pool = PhrasePool(ngram=3)
    pool.save(tmp_path / "e.pt")
    back = PhrasePool.load(tmp_path / "e.pt")
    assert len(back) == 0 and back.keys() == [] and back.ngram == 3


def test_load_rejects_other_formats():
    with pytest.raises(ValueError):
        PhrasePool.from_state_dict({"format": "something-else"})


# ---- the byte budget (issue 20) -------------------------------------------------------------------------------------
def test_caps_derive_from_the_byte_budget():
    pool = PhrasePool(ngram=4, guess_set=3)                       # CPU defaults: 64 MiB
    assert pool.max_bytes == DEFAULT_MAX_BYTES == 64 << 20
    assert pool.max_keys == (DEFAULT_MAX_BYTES - 384) // key_bytes(4, 3) and pool.guess_set == 3
    assert PhrasePool(ngram=4, guess_set=3, max_keys=10).max_keys == 10          # a smaller explicit cap stays
    assert PhrasePool(ngram=4, guess_set=3, max_keys=1 << 40).max_keys == pool.max_keys   # a larger one cannot
    small = PhrasePool(ngram=7, guess_set=20, max_bytes=3000)      # not one full key: fewer phrases per key
    assert small.max_keys == 1 and 1 <= small.guess_set < 20 and key_bytes(7, small.guess_set) <= 3000
    assert budget_caps(7, 20, 1 << 30)[1] == 20


def test_bytes_stay_under_the_budget_under_churn():
    rng = random.Random(0)
    for ngram, g, max_bytes in ((3, 4, 12_000), (5, 2, 5_000), (2, 9, 20_000)):
        pool = PhrasePool(ngram=ngram, guess_set=g, max_bytes=max_bytes)
        n = ngram - 1
        for step in range(1500):
            key = rng.randrange(300, 340)
            phrase = [rng.randrange(300, 306) for _ in range(n)]
            if step % 5 == 4:
                pool.replace(key, [rng.randrange(300, 306) for _ in range(n)], phrase)
            elif step % 17 == 0:
                pool.seed_from([rng.randrange(300, 340) for _ in range(3 * n)])
            else:
                pool.insert(key, phrase)
            assert pool.nbytes() <= max_bytes
        assert pool.num_keys() == pool.max_keys            # the bound binds: keys were evicted


def test_nbytes_matches_what_python_allocates():
    """nbytes() against tracemalloc for pools built under tracing (token ids >= 257: no shared singletons)."""
    for ngram, g, per_key in ((4, 3, 3), (7, 20, 20), (7, 20, 2)):
        gc.collect()
        tracemalloc.start()
        try:
            rng = random.Random(ngram * g)
            pool = PhrasePool(ngram=ngram, guess_set=g)
            for key in range(1000, 1800):
                for _ in range(per_key):
                    pool.insert(key, [rng.randrange(1000, 100_000) for _ in range(ngram - 1)])
            for _ in range(1000):                           # churn: evictions inside the lists
                pool.insert(rng.randrange(1000, 1800), [rng.randrange(1000, 100_000) for _ in range(ngram - 1)])
            gc.collect()
            traced = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        assert 0.95 <= pool.nbytes() / traced <= 1.10, (ngram, g, per_key, pool.nbytes(), traced)


def test_key_table_slot_bound_holds_under_churn():
    """The 200 B a key's slot in the table of keys may cost (pool module docstring), checked on this CPython."""
    base = sys.getsizeof(OrderedDict({0: None}))
    for keys in (*range(1, 120), 170, 171, 700, 1400, 2800):
        assert lru_dict_peak_bytes(keys) <= base + 200 * keys, keys


def test_load_cuts_a_larger_state_to_the_caps(tmp_path):
    big = PhrasePool(ngram=3, guess_set=4)
    for key in range(400, 420):
        for t in range(5):
            big.insert(key, (key, t))
    state = big.state_dict()
    state["max_bytes"] = 6000                              # as if saved by a pool with a small budget ...
    cut = PhrasePool.from_state_dict(state)
    assert cut.max_keys < 20 and cut.keys() == big.keys()[-cut.max_keys:]        # ... newest keys kept
    assert all(cut.phrases(k) == big.phrases(k)[-cut.guess_set:] for k in cut.keys())
    old = {k: v for k, v in big.state_dict().items() if k != "max_bytes"}       # a file from before byte budgets
    old["max_keys"] = 1 << 20
    again = PhrasePool.from_state_dict(old)
    assert again.max_bytes == DEFAULT_MAX_BYTES and again.keys() == big.keys()
