"""The scored device pool: ``GpuPhrasePool(scored=True)`` is the twin of ``PhrasePool(scored=True)`` on every backend
(random operation sequences replayed on both), keeps its counts through save / load in either direction, and its
scored insert never runs on the CUDA backend (it goes to Triton)."""
from __future__ import annotations

import random

import pytest
import torch
from ouroboros.drafting.gpu_pool import GpuPhrasePool
from ouroboros.drafting.pool import POOL_FORMAT, POOL_FORMAT_SCORED, PhrasePool
from test_gpu_pool import CASES as LRU_CASES
from test_gpu_pool import (
    BACKENDS,
    CPU,
    HAVE_TRITON,
    apply_cpu,
    apply_gpu,
    assert_same,
    needs_cuda,
    random_ops,
)

from ouroboros_kernels import ngram as ngram_ops
from ouroboros_kernels.backend import triton_interpret

MAX_SCORE = ngram_ops.MAX_SCORE
needs_interpreted_triton = pytest.mark.skipif(not (HAVE_TRITON and triton_interpret()),
                                              reason="needs triton on CPU tensors (TRITON_INTERPRET=1)")


def assert_same_scored(cpu: PhrasePool, gpu: GpuPhrasePool) -> None:
    """:func:`assert_same` (keys in LRU order, phrases in stored order, every lookup) plus the same count per row."""
    assert cpu.scored and gpu.scored
    assert_same(cpu, gpu)
    want, got = cpu.state_dict(), gpu.state_dict()
    assert got["format"] == want["format"] == POOL_FORMAT_SCORED and got["scored"] is True
    assert got["weights"].dtype == torch.int64 and got["weights"].tolist() == want["weights"].tolist()


def scored_ops(seed: int, steps: int, vocab: int, ngram: int, guess_set: int, max_keys: int, alphabet: int,
               max_batch: int) -> list[tuple]:
    """:func:`random_ops` with weights 1-3 on most inserts (``("insert", keys, phrases, weights)``) and some keys
    turned into padding (-1)."""
    rng = random.Random(1000 + seed)
    out = []
    for op in random_ops(seed, steps, vocab, ngram, guess_set, max_keys, alphabet, max_batch):
        if op[0] == "seed":
            out.append(op)
            continue
        keys = [-1 if rng.random() < 0.1 else k for k in op[1]]
        if op[0] == "insert" and rng.random() < 0.7:
            out.append(("insert", keys, op[2], [rng.randint(1, 3) for _ in keys]))
        else:
            out.append((op[0], keys, *op[2:]))
    return out


def apply_both(cpu: PhrasePool, gpu: GpuPhrasePool, op: tuple) -> None:
    """Apply ``op`` to both pools (the host skips the padding keys the device skips)."""
    if op[0] == "seed":
        apply_cpu(cpu, op)
        apply_gpu(gpu, op)
        return
    keys, rest = op[1], [list(x) for x in op[2:]]
    weights = rest[1] if op[0] == "insert" and len(rest) > 1 else [1] * len(keys)
    for b, key in enumerate(keys):
        if key < 0:
            continue
        if op[0] == "insert":
            cpu.insert(key, rest[0][b], weight=weights[b])
        else:
            cpu.replace(key, rest[0][b], rest[1][b])
    if op[0] == "insert":
        gpu.insert_many(torch.tensor(keys), torch.tensor(rest[0]), torch.tensor(weights) if len(rest) > 1 else None)
    else:
        gpu.replace_many(torch.tensor(keys), torch.tensor(rest[0]), torch.tensor(rest[1]))


def pools(ngram: int, guess_set: int, max_keys: int, vocab: int, backend: str) -> tuple[PhrasePool, GpuPhrasePool]:
    cpu = PhrasePool(ngram=ngram, guess_set=guess_set, max_keys=max_keys, scored=True)
    gpu = GpuPhrasePool(ngram, guess_set, max_keys, vocab_size=vocab, device=CPU, backend=backend, scored=True)
    return cpu, gpu


# (vocab, ngram, guess_set, max_keys, alphabet, max_batch, steps): eviction-heavy, roomy, one phrase, two keys
CASES = {**LRU_CASES, "churn": (12, 3, 2, 2, 2, 8, 30)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_random_sequences_match_the_scored_host_pool(backend, case):
    vocab, ngram, g, mk, alphabet, max_batch, steps = CASES[case]
    if backend == "reference":
        steps *= 3
    cpu, gpu = pools(ngram, g, mk, vocab, backend)
    assert (gpu.max_keys, gpu.guess_set) == (cpu.max_keys, cpu.guess_set)
    top = 0
    for i, op in enumerate(scored_ops(list(CASES).index(case), steps, vocab, ngram, g, mk, alphabet, max_batch)):
        apply_both(cpu, gpu, op)
        if i % 5 == 4 or i == steps - 1:
            assert_same_scored(cpu, gpu)
            top = max([top, *cpu.state_dict()["weights"].tolist()])
    assert gpu.stats == cpu.stats
    assert top > 2                                                   # the counts did rank something


@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
def test_triton_scored_batches_spanning_several_register_chunks(monkeypatch):
    import ouroboros_kernels.triton.ngram as triton_ngram
    monkeypatch.setattr(triton_ngram, "MAX_BLOCK_B", 2)
    cpu, gpu = pools(3, 2, 3, 6, "triton")
    for op in scored_ops(11, 12, 6, 3, 2, 3, 2, 7):
        apply_both(cpu, gpu, op)
    assert_same_scored(cpu, gpu)


def found(gpu: GpuPhrasePool, key: int, k: int | None = None) -> list[tuple]:
    phrases, valid = gpu.lookup(torch.tensor([key]), k)
    return [tuple(r) for r in phrases[0][valid[0]].tolist()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_device_lookups_rank_by_counts(backend):
    gpu = GpuPhrasePool(3, 4, 8, vocab_size=10, device=CPU, backend=backend, scored=True)
    gpu.insert_many(torch.tensor([7, 7, 7, 7, 7]), torch.tensor([[1, 1], [2, 2], [3, 3], [1, 1], [3, 3]]),
                    torch.tensor([1, 1, 1, 1, 1]))
    gpu.insert_many(torch.tensor([7]), torch.tensor([[1, 1]]))      # counts: (1,1) 3, (3,3) 2, (2,2) 1
    assert found(gpu, 7) == [(1, 1), (3, 3), (2, 2)] and found(gpu, 7, 2) == [(1, 1), (3, 3)]
    gpu.insert_many(torch.tensor([7]), torch.tensor([[4, 4]]), torch.tensor([2]))   # ties: the newest first
    assert found(gpu, 7) == [(1, 1), (4, 4), (3, 3), (2, 2)]
    gpu.insert_many(torch.tensor([7]), torch.tensor([[5, 5]]), torch.tensor([5]))   # full: drops the lowest, (2,2)
    assert found(gpu, 7) == [(5, 5), (1, 1), (4, 4), (3, 3)]
    host = gpu.host
    assert [host.count(7, p) for p in ((5, 5), (1, 1), (4, 4), (3, 3), (2, 2))] == [5, 3, 2, 2, 0]
    assert host.phrases(7) == [(3, 3), (4, 4), (1, 1), (5, 5)]       # stored in rank order, lowest first
    assert gpu.scores[int(gpu.tensors.key_to_slot[7])].tolist() == [2, 2, 3, 5]


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_equals_one_by_one_with_key_eviction_inside_the_batch(backend):
    keys = [1, 1, 2, 3, 1, 3, 3, 2, 1, 1]
    phrases = [[1, 1], [2, 2], [1, 1], [5, 5], [3, 3], [5, 5], [6, 6], [7, 7], [3, 3], [4, 4]]
    weights = [2, 1, 1, 3, 1, 1, 1, 2, 2, 1]
    cpu, gpu = pools(3, 2, 2, 5, backend)
    apply_both(cpu, gpu, ("insert", keys, phrases, weights))
    assert cpu.keys() == [2, 1] and cpu.lookup(1) == [(3, 3), (4, 4)] and cpu.count(1, (3, 3)) == 2
    assert_same_scored(cpu, gpu)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scored_replace_edge_cases(backend):
    cpu, gpu = pools(3, 3, 3, 5, backend)
    apply_both(cpu, gpu, ("insert", [0, 0, 0, 1], [[1, 1], [2, 2], [3, 3], [1, 1]], [3, 1, 2, 1]))
    # old present, new absent: new gets count(old) + 1; old present, new present: adds; old == new: + 1;
    # old absent: a plain insert (+ 1); a new key; padding
    apply_both(cpu, gpu, ("replace", [0, 0, 0, 0, 2, -1], [[2, 2], [3, 3], [9, 9], [8, 8], [0, 0], [1, 1]],
                          [[9, 9], [9, 9], [9, 9], [7, 7], [1, 2], [4, 4]]))
    assert cpu.lookup(0) == [(9, 9), (1, 1), (7, 7)] and cpu.count(0, (9, 9)) == 2 + 2 + 1 + 1
    assert_same_scored(cpu, gpu)
    apply_both(cpu, gpu, ("replace", [3], [[9, 9]], [[4, 4]]))      # a new key through replace evicts the oldest
    assert cpu.keys() == [0, 2, 3]
    assert_same_scored(cpu, gpu)


@pytest.mark.parametrize("backend", BACKENDS)
def test_device_counts_saturate_at_int32(backend):
    gpu = GpuPhrasePool(3, 2, 4, vocab_size=5, device=CPU, backend=backend, scored=True)
    big = torch.tensor([MAX_SCORE - 1, MAX_SCORE, 1 << 40, 0])      # out-of-range weights are clamped into [1, max]
    gpu.insert_many(torch.tensor([1, 1, 2, 3]), torch.tensor([[1, 1], [1, 1], [2, 2], [3, 3]]), big)
    gpu.replace_many(torch.tensor([1]), torch.tensor([[1, 1]]), torch.tensor([[4, 4]]))
    host = gpu.host
    assert (host.count(1, (4, 4)), host.count(1, (1, 1)), host.count(2, (2, 2)), host.count(3, (3, 3))) == \
        (MAX_SCORE, 0, MAX_SCORE, 1)
    assert PhrasePool.from_state_dict(gpu.state_dict()).count(1, (4, 4)) == MAX_SCORE


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_load_keeps_the_counts_both_ways(backend, tmp_path):
    cpu = PhrasePool(ngram=3, guess_set=3, max_keys=4, scored=True)
    gpu = GpuPhrasePool(3, 3, 4, vocab_size=7, device=CPU, backend="reference", scored=True)
    for op in scored_ops(5, 40, 7, 3, 3, 4, 3, 5):
        apply_both(cpu, gpu, op)
    cpu.lookup(1)
    cpu.save(tmp_path / "host.pt")
    for loaded in (GpuPhrasePool.from_cpu(cpu, device=CPU, vocab_size=7, backend=backend),
                   GpuPhrasePool.load(tmp_path / "host.pt", device=CPU, vocab_size=7, backend=backend)):
        assert loaded.scored and loaded.scores.dtype == torch.int32
        assert_same_scored(cpu, loaded)
    gpu.save(tmp_path / "device.pt")
    keys = cpu.keys()
    for back in (gpu.to_cpu(), PhrasePool.load(tmp_path / "device.pt")):
        assert back.scored and back.keys() == keys
        assert all(back.lookup_scored(k) == cpu.lookup_scored(k) for k in keys)
    moved = GpuPhrasePool.from_cpu(cpu, device=CPU, vocab_size=7, backend=backend)
    for op in scored_ops(6, 15, 7, 3, 3, 4, 3, 5):                 # after the conversion both go on alike
        apply_both(cpu, moved, op)
    assert_same_scored(cpu, moved)


def test_an_lru_state_loads_into_a_scored_pool_with_count_one(tmp_path):
    lru = PhrasePool(ngram=3, guess_set=3, max_keys=4)
    lru.insert_many([(1, (1, 1)), (1, (2, 2)), (2, (3, 3)), (1, (1, 1))])
    gpu = GpuPhrasePool.from_cpu(lru, device=CPU, vocab_size=5, backend="reference", scored=True)
    assert gpu.scored and gpu.state_dict()["weights"].tolist() == [1, 1, 1]
    assert found(gpu, 1) == lru.lookup(1) == [(1, 1), (2, 2)]
    assert not GpuPhrasePool.from_cpu(lru, device=CPU, vocab_size=5).scored   # the default: the state's own mode
    back = gpu.to_cpu()
    assert back.scored and back.state_dict()["format"] == POOL_FORMAT_SCORED and back.keys() == lru.keys()
    assert GpuPhrasePool.from_cpu(back, device=CPU, scored=False).state_dict()["format"] == POOL_FORMAT


def test_a_scored_state_with_bad_counts_is_rejected():
    cpu = PhrasePool(ngram=3, guess_set=3, max_keys=4, scored=True)
    cpu.insert(1, (1, 1))
    cpu.insert(1, (2, 2), weight=2)
    state = cpu.state_dict()
    state["weights"] = torch.tensor([2, 1])                         # not in rank order
    with pytest.raises(ValueError):
        GpuPhrasePool.from_state_dict(state, device=CPU)
    state = cpu.state_dict()
    assert GpuPhrasePool.from_state_dict(state, device=CPU).host.count(1, (2, 2)) == 2   # the state as saved loads
    state["keys"], state["counts"] = torch.tensor([1, 1]), torch.tensor([1, 1])     # one key twice
    with pytest.raises(ValueError, match="duplicate"):
        GpuPhrasePool.from_state_dict(state, device=CPU)


def test_bad_scores_and_weights_raise():
    gpu = GpuPhrasePool(3, 2, 4, vocab_size=5, device=CPU, backend="reference", scored=True)
    pool, keys, phrases = gpu.tensors, torch.tensor([1, 2]), torch.tensor([[1, 2], [3, 4]])
    bad_scores = [gpu.scores.long(), gpu.scores[:, :1].contiguous(), torch.zeros(4, 3, dtype=torch.int32),
                  torch.zeros(2, 4, dtype=torch.int32).t(), torch.zeros(4, 2, dtype=torch.int32, device="meta"),
                  [[0, 0]] * 4]
    for scores in bad_scores:
        with pytest.raises(ValueError, match="scores"):
            ngram_ops.ngram_insert(pool, keys, phrases, scores=scores)
    for weights in (torch.tensor([1.0, 2.0]), torch.tensor([1]), torch.tensor([[1, 1]]), torch.tensor([True, True]),
                    [1, 1], torch.ones(2, dtype=torch.long, device="meta")):
        with pytest.raises(ValueError, match="weights"):
            ngram_ops.ngram_insert(pool, keys, phrases, scores=gpu.scores, weights=weights)
    with pytest.raises(ValueError, match="weights"):
        gpu.insert_many(keys, phrases, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="weights"):                # checked without scores too (then ignored)
        ngram_ops.ngram_insert(pool, keys, phrases, weights=torch.tensor([1]))
    for weight in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="weight"):
            gpu.host.insert(1, (1, 2), weight=weight)
    assert len(gpu) == 0


def test_weights_are_ignored_by_an_lru_pool():
    lru = GpuPhrasePool(3, 2, 4, vocab_size=5, device=CPU, backend="reference")
    cpu = PhrasePool(ngram=3, guess_set=2, max_keys=4)
    lru.insert_many(torch.tensor([1, 1, 1]), torch.tensor([[1, 1], [2, 2], [1, 1]]), torch.tensor([5, 1, 1]))
    lru.host.insert(1, (3, 3), weight=4)
    for p, w in (((1, 1), 5), ((2, 2), 1), ((1, 1), 1), ((3, 3), 4)):
        cpu.insert(1, p, weight=w)
    assert lru.scores is None
    assert_same(cpu, lru)


@needs_interpreted_triton
def test_a_scored_insert_on_the_cuda_backend_runs_on_triton(monkeypatch):
    """The CUDA extension has no scored insert: where "cuda" is chosen, the scored insert goes to Triton (the LRU
    insert and every lookup still go to CUDA). Faked on CPU tensors: ``ngram_backend`` answers "cuda"."""
    calls = []

    class FakeCuda:
        def ngram_insert(self, *args):
            calls.append("insert")
            return ngram_ops.reference.ngram_insert(*args)

        def ngram_lookup(self, *args):
            calls.append("lookup")
            return ngram_ops.reference.ngram_lookup(*args)

    monkeypatch.setattr(ngram_ops, "ngram_backend", lambda device, backend=None: "cuda")
    monkeypatch.setattr(ngram_ops, "cuda_ngram_ops", lambda: FakeCuda())
    assert ngram_ops.ngram_insert_backend(CPU, "cuda", scored=True) == "triton"
    assert ngram_ops.ngram_insert_backend(CPU, "cuda", scored=False) == "cuda"
    cpu, gpu = pools(3, 2, 3, 6, "cuda")
    for op in scored_ops(3, 10, 6, 3, 2, 3, 2, 5):
        apply_both(cpu, gpu, op)
    assert "insert" not in calls
    assert_same_scored(cpu, gpu)
    assert "lookup" in calls and "insert" not in calls
    lru = GpuPhrasePool(3, 2, 3, vocab_size=6, device=CPU, backend="cuda")
    lru.insert_many(torch.tensor([1]), torch.tensor([[1, 2]]))
    assert calls[-1] == "insert"
    monkeypatch.setattr(ngram_ops, "backend_status", lambda: {"triton": "triton is not installed"})
    assert ngram_ops.ngram_insert_backend(CPU, "cuda", scored=True) == "reference"


@pytest.mark.parametrize("backend", BACKENDS)
def test_host_adapter_mirrors_the_scored_host_pool(backend):
    cpu = PhrasePool(ngram=3, guess_set=3, max_keys=3, scored=True)
    gpu = GpuPhrasePool(3, 3, 3, vocab_size=8, device=CPU, backend=backend, scored=True)
    host = gpu.host
    assert host.scored
    for pool in (cpu, host):
        pool.seed_from([1, 2, 3, 1, 2, 4, 1, 2, 3])
        pool.insert(5, (1, 2), weight=3)
        pool.insert(5, (3, 4))
        pool.insert_many([(5, (3, 4)), (6, (1, 1))])
        pool.replace(5, (1, 2), (9, 9))
    for key in range(-1, 9):
        assert host.lookup(key) == cpu.lookup(key)
        for k, prior in ((None, 0), (1, 0), (2, 1.5)):
            assert host.lookup_scored(key, k, prior) == cpu.lookup_scored(key, k, prior)
        assert host.best(key) == cpu.best(key) and host.phrases(key) == cpu.phrases(key)
        assert all(host.count(key, p) == cpu.count(key, p) for p in ((9, 9), (3, 4), (2, 3), (0, 0)))
    with pytest.raises(ValueError):
        host.lookup_scored(5, prior=-1)
    lru_cpu, lru = PhrasePool(ngram=3, guess_set=3), GpuPhrasePool(3, 3, vocab_size=8, device=CPU, backend=backend)
    for pool in (lru_cpu, lru.host):
        pool.seed_from([1, 2, 3, 1, 2, 4])
    assert lru.host.lookup_scored(1, prior=1) == lru_cpu.lookup_scored(1, prior=1)
    assert lru.host.count(1, (2, 3)) == lru_cpu.count(1, (2, 3)) == 1


def test_copy_clear_and_layout_of_a_scored_pool():
    a = GpuPhrasePool(ngram=4, guess_set=3, vocab_size=50, device=CPU, backend="reference", scored=True)
    b = a.empty_like()
    assert b.scored and b.same_layout(a)
    b.insert_many(torch.tensor([3, 3, 7]), torch.tensor([[1, 2, 3], [1, 2, 3], [4, 5, 6]]), torch.tensor([1, 2, 1]))
    ptrs = [t.data_ptr() for t in (*a.tensors, a.scores)]
    a.copy_(b)
    assert [t.data_ptr() for t in (*a.tensors, a.scores)] == ptrs
    assert torch.equal(a.scores, b.scores) and a.host.count(3, (1, 2, 3)) == 3
    a.clear()
    assert [t.data_ptr() for t in (*a.tensors, a.scores)] == ptrs and len(a) == 0 and not a.scores.any()
    lru = GpuPhrasePool(ngram=4, guess_set=3, max_keys=a.max_keys, vocab_size=50, device=CPU, backend="reference")
    assert not a.same_layout(lru) and not lru.same_layout(a)
    with pytest.raises(ValueError, match="scored"):
        a.copy_(lru)
    assert a.nbytes() == lru.nbytes() + 4 * a.num_slots * a.guess_set
    assert "scored=True" in repr(a)


def test_scored_caps_follow_the_scored_budget():
    for max_bytes in (6000, 2028, 1 << 20):
        host = PhrasePool(ngram=4, guess_set=6, max_bytes=max_bytes, scored=True)
        gpu = GpuPhrasePool(4, 6, vocab_size=1000, max_bytes=max_bytes, device="meta", backend="reference",
                            scored=True)
        assert (gpu.max_keys, gpu.guess_set) == (host.max_keys, host.guess_set)
        assert gpu.scores.shape == (min(gpu.max_keys, 1000), gpu.guess_set)
    lru = GpuPhrasePool(4, 6, vocab_size=1000, max_bytes=1 << 20, device="meta", backend="reference")
    assert lru.max_keys > gpu.max_keys                               # counts cost bytes on the host: fewer keys


@needs_cuda
@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_cuda_scored_inserts_do_not_sync(backend):
    dev = torch.device("cuda")
    if backend != "reference" and (not HAVE_TRITON or triton_interpret()):
        pytest.skip("needs compiled triton")
    gpu = GpuPhrasePool(7, 20, 64, vocab_size=1000, device=dev, backend=backend, scored=True)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 100, (b,), generator=gen).to(dev), torch.randint(0, 3, (b, 6), generator=gen).to(dev),
                torch.randint(1, 4, (b,), generator=gen).to(dev)) for b in (1, 20, 160)]
    for keys, phrases, weights in batches:  # warm up: every kernel variant compiled
        gpu.insert_many(keys, phrases, weights)
        gpu.replace_many(keys, phrases, phrases.flip(0))
    torch.cuda.synchronize()
    cpu = gpu.to_cpu()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for keys, phrases, weights in batches:
            gpu.insert_many(keys, phrases, weights)
            gpu.replace_many(keys, phrases, phrases.flip(0))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for keys, phrases, weights in batches:
        for k, p, w in zip(keys.tolist(), phrases.tolist(), weights.tolist()):
            cpu.insert(k, p, weight=w)
        for k, o, n in zip(keys.tolist(), phrases.tolist(), phrases.flip(0).tolist()):
            cpu.replace(k, o, n)
    want, got = cpu.state_dict(), gpu.state_dict()
    assert all(torch.equal(want[n], got[n]) for n in ("keys", "counts", "phrases", "weights"))
