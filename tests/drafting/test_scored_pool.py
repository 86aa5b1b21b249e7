"""The scored phrase history (issue #29 item 1): ``PhrasePool(scored=True)`` ranks each key's phrases by how often
they were inserted, evicts the least frequent, gives probabilities, and keeps the byte budget and the file format."""
from __future__ import annotations

import gc
import random
import sys
import tracemalloc

import pytest
import torch
from ouroboros.drafting.gpu_pool import GpuPhrasePool
from ouroboros.drafting.pool import (
    DEFAULT_MAX_BYTES,
    MAX_COUNT,
    POOL_FORMAT,
    POOL_FORMAT_SCORED,
    PhrasePool,
    key_bytes,
    lru_dict_peak_bytes,
)

CPU = torch.device("cpu")


class Reference:
    """The scored rule written plainly: per key {phrase: [count, last insert time]}, keys an LRU by insertion."""

    def __init__(self, guess_set: int, max_keys: int) -> None:
        self.g, self.max_keys, self.t = guess_set, max_keys, 0
        self.table: dict[int, dict[tuple, list[int]]] = {}

    def insert(self, key: int, phrase: tuple, weight: int = 1) -> None:
        self.t += 1
        phrases = self.table.pop(key, {})
        self.table[key] = phrases                                    # newest key
        if len(self.table) > self.max_keys:
            del self.table[next(iter(self.table))]
        if phrase not in phrases and len(phrases) >= self.g:
            del phrases[min(phrases, key=lambda p: tuple(phrases[p]))]   # lowest count, then oldest
        count = phrases.get(phrase, [0, 0])[0]
        phrases[phrase] = [min(count + weight, MAX_COUNT), self.t]

    def replace(self, key: int, old: tuple, new: tuple) -> None:
        phrases = self.table.get(key, {})
        gained = phrases.pop(old, [0])[0] if old != new else 0
        self.insert(key, new, 1 + gained)

    def lookup(self, key: int) -> list[tuple]:
        phrases = self.table.get(key, {})
        return sorted(phrases, key=lambda p: (-phrases[p][0], -phrases[p][1]))

    def keys(self) -> list[int]:
        return list(self.table)


def scored_pool(**kwargs) -> PhrasePool:
    return PhrasePool(scored=True, **kwargs)


def test_counts_rank_lookups():
    pool = scored_pool(ngram=3, guess_set=4)
    for p, times in (((1, 1), 3), ((2, 2), 1), ((3, 3), 2)):
        for _ in range(times):
            pool.insert(7, p)
    assert pool.lookup(7) == [(1, 1), (3, 3), (2, 2)]
    assert pool.lookup(7, 2) == [(1, 1), (3, 3)]
    assert [pool.count(7, p) for p in ((1, 1), (2, 2), (3, 3), (9, 9))] == [3, 1, 2, 0]
    assert pool.phrases(7) == [(2, 2), (3, 3), (1, 1)]                # stored in rank order, lowest first
    assert (pool.stats.lookups, pool.stats.hits) == (2, 2)


def test_ties_go_to_the_newest():
    pool = scored_pool(ngram=2, guess_set=4)
    for t in (1, 2, 3):
        pool.insert(0, [t])
    assert pool.lookup(0) == [(3,), (2,), (1,)]                     # all count 1: newest first, as an LRU pool
    pool.insert(0, [1])
    pool.insert(0, [2])                                              # 1 and 2 at count 2, 2 the newer
    assert pool.lookup(0) == [(2,), (1,), (3,)]
    pool.insert(0, [3])
    assert pool.lookup(0) == [(3,), (2,), (1,)]                     # 3 caught up last: the newest of count 2


def test_eviction_keeps_the_frequent_phrase():
    pool = scored_pool(ngram=2, guess_set=3)
    for _ in range(4):
        pool.insert(0, [100])
    pool.insert(0, [101])
    pool.insert(0, [101])
    for t in range(200, 260):                                        # churn of one-off phrases
        pool.insert(0, [t])
        assert pool.phrases(0) == [(t,), (101,), (100,)]             # each one-off enters, the next evicts it
    pool.insert(0, [5])                                              # 259 goes
    pool.insert(0, [5])                                              # 5 reaches 101's count, and is newer ...
    pool.insert(0, [6])                                              # ... so 101 goes
    assert pool.lookup(0) == [(100,), (5,), (6,)]
    lru = PhrasePool(ngram=2, guess_set=3)                           # the LRU pool forgets the frequent one
    for p in [100] * 4 + list(range(200, 203)):
        lru.insert(0, [p])
    assert (100,) not in lru.phrases(0)


def test_eviction_ties_drop_the_oldest_and_keys_stay_lru():
    pool = scored_pool(ngram=2, guess_set=2, max_keys=2)
    pool.insert(0, [1])
    pool.insert(0, [2])
    pool.insert(0, [3])                                              # 1 and 2 both count 1: 1, the older, goes
    assert pool.lookup(0) == [(3,), (2,)]
    pool.insert(1, [1])
    for _ in range(5):
        pool.insert(1, [1])                                          # frequent phrases do not protect a key
    pool.insert(0, [4])
    pool.insert(2, [1])
    assert pool.keys() == [0, 2] and 1 not in pool


def test_weights():
    a, b = scored_pool(ngram=3, guess_set=3), scored_pool(ngram=3, guess_set=3)
    a.insert(1, (5, 5), weight=4)
    a.insert(1, (6, 6))
    for _ in range(4):
        b.insert(1, (5, 5))
    b.insert(1, (6, 6))
    assert a.state_dict()["weights"].tolist() == b.state_dict()["weights"].tolist() == [1, 4]
    a.insert(1, (6, 6), weight=torch.tensor(9).item())
    assert a.lookup(1) == [(6, 6), (5, 5)] and a.count(1, (6, 6)) == 10
    a.insert(1, (7, 7), weight=MAX_COUNT)
    a.insert(1, (7, 7), weight=5)
    assert a.count(1, (7, 7)) == MAX_COUNT                           # saturates
    lru = PhrasePool(ngram=3)
    lru.insert(1, (5, 5), weight=3)                                  # checked, then ignored
    assert lru.count(1, (5, 5)) == 1
    for pool in (a, lru):
        for bad in (0, -1, 1.0, 1.5, 2.0, True, "2"):
            with pytest.raises(ValueError):
                pool.insert(1, (5, 5), weight=bad)


def test_lookup_scored_probabilities_sum_to_one():
    pool = scored_pool(ngram=3, guess_set=4)
    for p, w in (((1, 1), 5), ((2, 2), 2), ((3, 3), 1)):
        pool.insert(9, p, weight=w)
    got = pool.lookup_scored(9)
    assert got == [((1, 1), 5 / 8), ((2, 2), 2 / 8), ((3, 3), 1 / 8)]
    assert sum(prob for _, prob in got) == pytest.approx(1.0)
    assert pool.lookup_scored(9, 1) == [((1, 1), 5 / 8)]            # the key's total, not the k returned
    assert pool.lookup_scored(8) == [] and pool.lookup_scored(9, 0) == []
    assert pool.lookup_scored(9, 2, prior=2) == [((1, 1), 0.5), ((2, 2), 0.2)]   # 2 pseudo-counts of the unseen
    with pytest.raises(ValueError):
        pool.lookup_scored(9, prior=-1)
    assert pool.stats.lookups == 0                                   # no counters touched
    lru = PhrasePool(ngram=3, guess_set=4)
    lru.insert_many([(9, (1, 1)), (9, (2, 2)), (9, (1, 1))])
    assert lru.lookup_scored(9) == [((1, 1), 0.5), ((2, 2), 0.5)]   # LRU: every count 1, newest first
    assert lru.lookup_scored(9, 1, prior=2) == [((1, 1), 0.25)]


def test_best():
    pool = scored_pool(ngram=3, guess_set=4)
    assert pool.best(3) is None
    pool.insert(3, (1, 2))
    assert pool.best(3) == ((1, 2), 1.0)
    pool.insert(3, (4, 5), weight=3)
    pool.insert(3, (6, 7))
    assert pool.best(3) == ((4, 5), 0.6) and pool.best(3, prior=1) == ((4, 5), 0.5)
    lru = PhrasePool(ngram=3)
    lru.insert_many([(3, (1, 2)), (3, (4, 5))])
    assert lru.best(3) == ((4, 5), 0.5) and lru.best(4) is None
    assert pool.stats.lookups == lru.stats.lookups == 0


def test_replace_carries_the_old_count():
    pool = scored_pool(ngram=2, guess_set=4, max_keys=2)
    pool.insert(0, [1], weight=3)
    pool.insert(0, [2])
    pool.insert(5, [9])
    pool.replace(0, [1], [7])                                        # new absent: old's count + 1
    assert pool.count(0, [1]) == 0 and pool.count(0, [7]) == 4 and pool.keys() == [5, 0]
    pool.replace(0, [2], [7])                                        # new present: its count + old's + 1
    assert pool.phrases(0) == [(7,)] and pool.count(0, [7]) == 6
    pool.replace(0, [7], [7])                                        # equal: an insert
    pool.replace(0, [8], [3])                                        # old absent: an insert
    assert pool.lookup_scored(0) == [((7,), 7 / 8), ((3,), 1 / 8)]
    pool.replace(6, [1], [2])                                        # key absent: an insert (evicts key 5)
    assert pool.keys() == [0, 6] and pool.count(6, [2]) == 1
    pool.replace_many([(6, (2,), (4,)), (6, (4,), (4,))])
    assert pool.phrases(6) == [(4,)] and pool.count(6, [4]) == 3


def test_seed_from_and_insert_many_accumulate():
    pool = scored_pool(ngram=3, guess_set=4)
    pool.seed_from([1, 2, 3, 1, 2, 3, 1, 2, 4])
    assert pool.count(1, (2, 3)) == 2 and pool.count(1, (2, 4)) == 1 and pool.lookup(1) == [(2, 3), (2, 4)]
    pool.insert_many([(1, (2, 4))] * 2)
    assert pool.lookup(1) == [(2, 4), (2, 3)] and pool.count(1, (2, 4)) == 3


def test_random_operations_match_the_plain_rule():
    rng = random.Random(29)
    for guess_set, max_keys in ((1, 3), (3, 4), (5, 2), (20, 6)):
        pool, ref = scored_pool(ngram=3, guess_set=guess_set, max_keys=max_keys), Reference(guess_set, max_keys)
        for _ in range(1500):
            key, phrase = rng.randrange(8), (rng.randrange(4), rng.randrange(3))
            op = rng.random()
            if op < 0.6:
                w = 1 if rng.random() < 0.8 else rng.randrange(1, 400)
                pool.insert(key, phrase, weight=w)
                ref.insert(key, phrase, w)
            else:
                old = rng.choice(pool.phrases(key) or [phrase])
                pool.replace(key, old, phrase)
                ref.replace(key, old, phrase)
            assert pool.keys() == ref.keys()
            assert pool.lookup(key) == ref.lookup(key)
        assert all(pool.lookup(k) == ref.lookup(k) for k in ref.table)


# ---- the byte budget ------------------------------------------------------------------------------------------------
def test_scored_caps_count_each_phrase_count():
    assert key_bytes(4, 3, scored=True) - key_bytes(4, 3) == 3 * 32 and key_bytes(4, 3, scored=True) == 1448
    assert key_bytes(7, 20, scored=True) == 9016
    assert scored_pool(ngram=4, guess_set=3).max_keys == (DEFAULT_MAX_BYTES - 384) // 1448 == 46_345
    assert scored_pool(ngram=7, guess_set=20).max_keys == 7_443
    assert PhrasePool(ngram=4, guess_set=3).max_keys == 49_636                    # the LRU pool's caps stay
    budget = 384 + key_bytes(7, 5)                                   # one LRU key of 5 phrases, not a scored one
    small = scored_pool(ngram=7, guess_set=20, max_bytes=budget)
    assert PhrasePool(ngram=7, guess_set=20, max_bytes=budget).guess_set == 5
    assert (small.max_keys, small.guess_set) == (1, 4) and 384 + key_bytes(7, 4, scored=True) <= budget


def test_scored_bytes_stay_under_the_budget_under_heavy_churn():
    rng = random.Random(1)
    for ngram, g, max_bytes in ((3, 4, 12_000), (5, 2, 5_000), (2, 9, 20_000), (4, 3, 30_000)):
        pool = scored_pool(ngram=ngram, guess_set=g, max_bytes=max_bytes)
        n = ngram - 1
        for step in range(3000):
            key = rng.randrange(300, 340)
            phrase = [rng.randrange(300, 306) for _ in range(n)]
            if step % 5 == 4:
                pool.replace(key, rng.choice(pool.phrases(key) or [phrase]), phrase)
            elif step % 17 == 0:
                pool.seed_from([rng.randrange(300, 340) for _ in range(3 * n)])
            else:                                                    # large weights: counts of their own objects
                pool.insert(key, phrase, weight=rng.choice((1, 1, 300, 1 << 40)))
            assert pool.nbytes() <= max_bytes
        assert pool.num_keys() == pool.max_keys
        assert any(c > 256 for c in pool.state_dict()["weights"].tolist())


def test_scored_list_churn_stays_under_the_lru_peak():
    """A scored list evicts before it inserts and moves entries in place: its OrderedDict never outgrows the LRU
    churn peak the rule charges (lru_dict_peak_bytes), for every list size up to 40."""
    rng = random.Random(2)
    for g in range(1, 41):
        pool = scored_pool(ngram=2, guess_set=g, max_keys=1)
        peak = 0
        for step in range(40 * g + 100):
            if step % 4 == 3 and pool.phrases(0):
                pool.replace(0, rng.choice(pool.phrases(0)), [rng.randrange(3 * g)])
            else:
                pool.insert(0, [rng.randrange(3 * g)], weight=rng.choice((1, 1, 2, 5)))
            peak = max(peak, sys.getsizeof(pool._table[0]))
        assert peak <= lru_dict_peak_bytes(g), g


def test_scored_nbytes_matches_what_python_allocates():
    """nbytes() against tracemalloc for a scored pool whose counts are int objects of their own (>= 257)."""
    gc.collect()
    tracemalloc.start()
    try:
        rng = random.Random(3)
        pool = scored_pool(ngram=4, guess_set=3)
        for _ in range(4000):
            pool.insert(rng.randrange(1000, 1800), [rng.randrange(1000, 1004) for _ in range(3)],
                        weight=rng.randrange(300, 1 << 40))
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert 0.95 <= pool.nbytes() / traced <= 1.10, (pool.nbytes(), traced)


def test_nbytes_counts_large_counts():
    small, large = scored_pool(ngram=3, guess_set=4), scored_pool(ngram=3, guess_set=4)
    for key in range(500, 510):
        for t in range(3):
            small.insert(key, (key, t), weight=2)
            large.insert(key, (key, t), weight=1000)
    lru = PhrasePool(ngram=3, guess_set=4)
    for key in range(500, 510):
        for t in range(3):
            lru.insert(key, (key, t))
    assert small.nbytes() == lru.nbytes() and large.nbytes() == lru.nbytes() + 30 * 32


# ---- persistence ----------------------------------------------------------------------------------------------------
def churned(scored: bool) -> PhrasePool:
    pool = PhrasePool(ngram=4, guess_set=3, max_keys=5, scored=scored)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        key = int(torch.randint(0, 9, (1,), generator=gen))
        pool.insert(key, torch.randint(0, 3, (3,), generator=gen).tolist(), weight=int(torch.randint(1, 4, (1,))))
    return pool


@pytest.mark.parametrize("scored", [False, True])
def test_save_load_round_trip_exactly(tmp_path, scored):
    pool = churned(scored)
    pool.save(tmp_path / "pool.pt")
    back = PhrasePool.load(tmp_path / "pool.pt")
    want, got = pool.state_dict(), back.state_dict()
    assert back.scored is scored and set(got) == set(want)
    assert got["format"] == (POOL_FORMAT_SCORED if scored else POOL_FORMAT)
    assert ("weights" in got) is scored and ("scored" in got) is scored
    for name, value in want.items():
        assert torch.equal(got[name], value) if isinstance(value, torch.Tensor) else got[name] == value, name
    keys = pool.keys()
    assert all(back.lookup_scored(k) == pool.lookup_scored(k) for k in keys)
    oldest = keys[0]
    for p in (pool, back):                                           # and both go on alike
        p.insert(oldest, (2, 2, 2), weight=2)
        p.insert(100, (1, 1, 1))
    assert back.state_dict()["phrases"].tolist() == pool.state_dict()["phrases"].tolist()


def test_an_old_v1_file_still_loads(tmp_path):
    old = {"format": "ouroboros-pool-v1", "ngram": 3, "guess_set": 2, "max_keys": 10,
           "keys": torch.tensor([6, 5]), "counts": torch.tensor([1, 2]),
           "phrases": torch.tensor([[3, 4], [1, 2], [7, 8]])}                   # before byte budgets and scores
    torch.save(old, tmp_path / "old.pt")
    pool = PhrasePool.load(tmp_path / "old.pt")
    assert not pool.scored and pool.keys() == [6, 5] and pool.lookup(5) == [(7, 8), (1, 2)]
    assert pool.state_dict()["format"] == POOL_FORMAT and "weights" not in pool.state_dict()


def test_load_cuts_a_larger_scored_state_to_the_caps():
    big = scored_pool(ngram=3, guess_set=4)
    for key in range(400, 420):
        for t in range(4):
            big.insert(key, (key, t), weight=4 - t)                  # (key, 0) the most frequent
    for max_bytes, caps in ((6000, (3, 4)), (1800, (1, 3))):         # fewer keys; fewer phrases per key
        state = big.state_dict()
        state["max_bytes"] = max_bytes
        cut = PhrasePool.from_state_dict(state)
        assert cut.scored and (cut.max_keys, cut.guess_set) == caps
        kept_keys = cut.keys()
        assert kept_keys == big.keys()[-cut.max_keys:]                   # the newest keys ...
        for k in kept_keys:                                              # ... with their best phrases and counts
            kept = big.lookup(k)[:cut.guess_set]
            assert cut.lookup(k) == kept and [cut.count(k, p) for p in kept] == [big.count(k, p) for p in kept]


@pytest.mark.parametrize("edit", ["no weights", "short", "zero", "too large", "unranked", "flag"])
def test_load_rejects_a_bad_scored_state(edit):
    pool = scored_pool(ngram=3, guess_set=3)
    pool.insert(1, (1, 1))
    pool.insert(1, (2, 2), weight=2)
    state = pool.state_dict()
    if edit == "no weights":
        del state["weights"]
    elif edit == "flag":
        state["scored"] = False
    else:
        state["weights"] = {"short": torch.tensor([1]), "zero": torch.tensor([0, 2]), "unranked": torch.tensor([2, 1]),
                            "too large": torch.tensor([1, MAX_COUNT + 1])}[edit]
    with pytest.raises(ValueError):
        PhrasePool.from_state_dict(state)


def test_the_device_pool_loads_a_scored_state_with_its_counts_unless_asked_not_to(tmp_path):
    pool = scored_pool(ngram=3, guess_set=3, max_keys=4)
    for key, phrase, w in ((1, (1, 1), 5), (1, (2, 2), 1), (1, (3, 3), 2), (2, (4, 4), 1), (2, (5, 5), 1)):
        pool.insert(key, phrase, weight=w)
    pool.save(tmp_path / "scored.pt")
    for scored in (None, True, False):                               # None: the state's own mode (scored)
        for gpu in (GpuPhrasePool.from_cpu(pool, device=CPU, vocab_size=8, backend="reference", scored=scored),
                    GpuPhrasePool.load(tmp_path / "scored.pt", device=CPU, vocab_size=8, backend="reference",
                                       scored=scored)):
            assert gpu.scored is (scored is not False)
            assert (gpu.max_keys, gpu.guess_set) == (pool.max_keys, pool.guess_set)
            phrases, valid = gpu.lookup(torch.tensor([1, 2]), 3)
            assert [[tuple(p) for p, v in zip(row, ok) if v] for row, ok in zip(phrases.tolist(), valid.tolist())] \
                == [pool.lookup(1), pool.lookup(2)]                  # the ranking (an LRU pool: as recency)
            back = gpu.to_cpu()
            assert back.scored is gpu.scored and back.keys() == pool.keys()
            assert back.lookup(1) == [(1, 1), (3, 3), (2, 2)]
            if gpu.scored:                                           # with its counts
                assert back.lookup_scored(1) == pool.lookup_scored(1)
                assert torch.equal(gpu.state_dict()["weights"], pool.state_dict()["weights"])
            else:                                                    # without them
                assert "weights" not in gpu.state_dict() and back.count(1, (1, 1)) == 1
