"""Top-k recycling on the device cycle (issue #29 item 3, ``ouroboros.decoding.device_recycle``): the phrases of one
verification as tensor ops, and the device cycle with recycling on: token-exact, phrases inserted (at most k per
verified position), and still one host read per cycle."""
from __future__ import annotations

import pytest
import torch
from conftest import hf_greedy, random_prompt, repetitive_prompt, run
from test_device_cycle import LAYOUTS, pair, prompts  # noqa: F401  (pair: a fixture)

from ouroboros.decoding.device_recycle import DeviceRecycler
from ouroboros.drafting.gpu_pool import GpuPhrasePool


def _pool(ngram: int = 3, **kw) -> GpuPhrasePool:
    return GpuPhrasePool(ngram=ngram, guess_set=4, vocab_size=96, device="cpu", backend="reference", **kw)


def _step(rec: DeviceRecycler, pool: GpuPhrasePool, top_last: list[int]) -> int:
    """Tree: root 5, trunk 6 7 (accepted), one pad node; the target's top-3 per node (argmax first)."""
    ids = torch.tensor([5, 6, 7, 0])
    top = torch.tensor([[6, 8, 9], [7, 10, 11], top_last, [1, 2, 3]])
    valid = torch.tensor([True, True, True, False])
    nodes, verified = torch.tensor([0, 1, 2]), torch.tensor([True, True, True])
    return int(rec.step(pool, ids, top[:, 0], top, valid, nodes, verified))


def test_every_verified_position_gives_k_phrases_continued_through_the_table():
    rec, pool = DeviceRecycler(k=2, phrase_len=2, vocab_size=96, device=torch.device("cpu")), _pool()
    for tok in (8, 9, 10, 11, 13, 14):                        # successors seen earlier
        rec.succ[tok] = tok + 20
    assert _step(rec, pool, [12, 13, 14]) == 6
    assert pool.host.lookup(5) == [(9, 29), (8, 28)]          # newest first, as inserted in one batch
    assert pool.host.lookup(6) == [(11, 31), (10, 30)] and pool.host.lookup(7) == [(14, 34), (13, 33)]
    assert rec.succ[[5, 6, 7]].tolist() == [6, 7, 12]         # observed: each token's argmax successor
    assert rec.succ[0] == -1                                  # the pad node wrote nowhere real


def test_the_pool_continues_what_the_table_cannot_and_unknown_candidates_are_dropped():
    rec, pool = DeviceRecycler(k=2, phrase_len=3, vocab_size=96, device=torch.device("cpu")), _pool(ngram=4)
    pool.insert_many(torch.tensor([15]), torch.tensor([[40, 41, 42]]))
    rec.succ[40] = 50
    lookups = pool.stats.lookups
    # only 15 can be continued: by the pool's phrase (40), then by the table (50)
    assert _step(rec, pool, [12, 13, 15]) == 1
    assert pool.stats.lookups == lookups                      # the fallback reads touch no counters
    assert pool.host.lookup(7) == [(15, 40, 50)]
    rec.reset()
    assert (rec.succ == -1).all()


@pytest.mark.parametrize("kw", LAYOUTS)
@pytest.mark.parametrize("scored", [False, True])
def test_device_cycle_with_recycling_is_lossless_and_recycles(pair, kw, scored):  # noqa: F811
    target, draft = pair
    recycled = 0
    for prompt in prompts():
        expected = hf_greedy(target, prompt, 36)
        pool = GpuPhrasePool(ngram=kw["ngram"], guess_set=5, vocab_size=96, device="cpu", backend="reference",
                             scored=scored)
        got, st = run(target, draft, prompt, 36, "ouroboros", fast=True, pool=pool, recycle=2, **kw)
        assert got == expected and st.device_cycle
        assert st.recycled <= 3 * (st.tokens + st.cycles)      # at most k (+1 on an argmax tie) per position
        recycled += st.recycled
    assert recycled > 0


def test_a_batch_with_a_device_pool_refuses_recycling(pair):  # noqa: F811
    import ouroboros
    target, draft = pair
    pool = _pool(ngram=4)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(ValueError, match="recycle with a device pool"):
        ouroboros.generate(target, draft, ids, max_new_tokens=4, pool=pool, recycle=2)


def test_recycling_on_the_host_loop_with_a_device_pool_is_lossless(pair):  # noqa: F811
    """fast=False with a device pool: the host loop's recycler writes through the pool's host adapter."""
    target, draft = pair
    for prompt in (repetitive_prompt(61, 5, 6), random_prompt(62, 9)):
        got, st = run(target, draft, prompt, 30, "ouroboros", fast=False, pool=_pool(ngram=4), recycle=2,
                      **LAYOUTS[0])
        assert got == hf_greedy(target, prompt, 30) and not st.device_cycle
