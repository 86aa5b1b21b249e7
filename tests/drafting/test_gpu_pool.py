"""GpuPhrasePool and the n-gram ops: identical to the CPU PhrasePool on every backend (SPEC §2, §3; issue 4)."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels on CPU tensors; must precede `import triton`

import random  # noqa: E402

import pytest  # noqa: E402
from ouroboros.drafting.gpu_pool import GpuPhrasePool
from ouroboros.drafting.pool import PhrasePool, PoolStats  # noqa: E402
from ouroboros.drafting.pool_adapter import HostPoolAdapter  # noqa: E402

from ouroboros_kernels import ngram as ngram_ops  # noqa: E402
from ouroboros_kernels.backend import triton_interpret  # noqa: E402

try:
    import triton  # noqa: F401, E402
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

CPU = torch.device("cpu")
BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(not HAVE_TRITON, reason="needs triton"))]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def assert_same(cpu: PhrasePool, gpu: GpuPhrasePool, k: int | None = None) -> None:
    """Same keys in the same LRU order, same phrases in the same order, and the same lookup results."""
    want, got = cpu.state_dict(), gpu.state_dict()
    assert got["keys"].tolist() == want["keys"].tolist()
    assert got["counts"].tolist() == want["counts"].tolist()
    assert got["phrases"].tolist() == want["phrases"].tolist()
    keys = list(range(-1, gpu.vocab_size + 1))
    k = gpu.guess_set + 1 if k is None else k
    phrases, valid = gpu.lookup(torch.tensor(keys), k)
    assert phrases.shape == (len(keys), k, gpu.phrase_len) and valid.shape == (len(keys), k)
    assert phrases.dtype == torch.int64 and valid.dtype == torch.bool
    assert not phrases[~valid].any()  # invalid rows are zero
    for i, key in enumerate(keys):
        got_list = [tuple(r) for r in phrases[i][valid[i]].tolist()]
        want_list = cpu.lookup(key, k) if key >= 0 else []  # negative keys are padding on the device: not counted
        assert got_list == want_list, f"key {key}"
    assert len(gpu) == len(cpu) and gpu.num_keys() == cpu.num_keys()


def random_ops(seed: int, steps: int, vocab: int, ngram: int, guess_set: int, max_keys: int, alphabet: int,
               max_batch: int):
    """A seeded list of operations: ("insert", keys, phrases) | ("replace", keys, old, new) | ("seed", tokens)."""
    rng = random.Random(seed)
    p = ngram - 1
    ops = []
    for _ in range(steps):
        r = rng.random()
        b = rng.randint(1, max_batch)
        keys = [rng.randrange(vocab) for _ in range(b)]
        if rng.random() < 0.3:  # repeat keys inside the batch
            keys = [rng.choice(keys[:1 + b // 2]) for _ in range(b)]
        phrases = [[rng.randrange(alphabet) for _ in range(p)] for _ in range(b)]
        if rng.random() < 0.3:  # repeat phrases inside the batch
            phrases = [list(rng.choice(phrases[:1 + b // 2])) for _ in range(b)]
        if r < 0.6:
            ops.append(("insert", keys, phrases))
        elif r < 0.9:
            old = [[rng.randrange(alphabet) for _ in range(p)] for _ in range(b)]
            old = [o if rng.random() < 0.5 else list(phrases[rng.randrange(b)]) for o in old]
            ops.append(("replace", keys, old, phrases))
        else:
            ops.append(("seed", [rng.randrange(min(vocab, alphabet + 2)) for _ in range(rng.randint(0, 3 * p))]))
    return ops


def apply_cpu(pool: PhrasePool, op) -> None:
    if op[0] == "insert":
        for k, ph in zip(op[1], op[2]):
            pool.insert(k, ph)
    elif op[0] == "replace":
        for k, o, n in zip(op[1], op[2], op[3]):
            pool.replace(k, o, n)
    else:
        pool.seed_from(op[1])


def apply_gpu(pool: GpuPhrasePool, op) -> None:
    if op[0] == "insert":
        pool.insert_many(torch.tensor(op[1]), torch.tensor(op[2]))
    elif op[0] == "replace":
        pool.replace_many(torch.tensor(op[1]), torch.tensor(op[2]), torch.tensor(op[3]))
    else:
        pool.seed_from(torch.tensor(op[1], dtype=torch.int64))


# (vocab, ngram, guess_set, max_keys, alphabet, max_batch, steps): eviction-heavy, roomy, tiny lists
CASES = {
    "evicting": (10, 3, 3, 4, 3, 6, 30),
    "roomy": (8, 4, 4, 1 << 20, 2, 5, 20),
    "g1": (6, 2, 1, 3, 3, 4, 20),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_random_sequences_match_cpu_pool(backend, case):
    vocab, ngram, g, mk, alphabet, max_batch, steps = CASES[case]
    if backend == "reference":
        steps *= 4  # cheap: cover more
    cpu = PhrasePool(ngram=ngram, guess_set=g, max_keys=mk)
    gpu = GpuPhrasePool(ngram, g, mk, vocab_size=vocab, device=CPU, backend=backend)
    for i, op in enumerate(random_ops(list(CASES).index(case), steps, vocab, ngram, g, mk, alphabet, max_batch)):
        apply_cpu(cpu, op)
        apply_gpu(gpu, op)
        if i % 5 == 4 or i == steps - 1:
            assert_same(cpu, gpu)
    assert gpu.stats.lookups == cpu.stats.lookups and gpu.stats.hits == cpu.stats.hits


@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
def test_triton_batches_spanning_several_register_chunks(monkeypatch):
    import ouroboros_kernels.triton.ngram as triton_ngram
    monkeypatch.setattr(triton_ngram, "MAX_BLOCK_B", 2)  # the kernel resolves keys 2 at a time: chains cross chunks
    cpu = PhrasePool(ngram=3, guess_set=2, max_keys=3)
    gpu = GpuPhrasePool(3, 2, 3, vocab_size=6, device=CPU, backend="triton")
    for op in random_ops(11, 12, 6, 3, 2, 3, 2, 7):
        apply_cpu(cpu, op)
        apply_gpu(gpu, op)
    assert_same(cpu, gpu)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_equals_one_by_one_with_eviction_inside_the_batch(backend):
    # max_keys=2: key 1 is inserted, evicted by 2 and 3 inside the same batch, then comes back fresh
    keys = [1, 1, 2, 3, 1, 3, 3, 2]
    phrases = [[1, 1], [2, 2], [1, 1], [5, 5], [3, 3], [5, 5], [6, 6], [7, 7]]
    cpu = PhrasePool(ngram=3, guess_set=2, max_keys=2)
    for k, p in zip(keys, phrases):
        cpu.insert(k, p)
    gpu = GpuPhrasePool(3, 2, 2, vocab_size=5, device=CPU, backend=backend)
    gpu.insert_many(torch.tensor(keys), torch.tensor(phrases))
    assert_same(cpu, gpu)
    assert cpu.keys() == [3, 2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_keys_are_skipped(backend):
    gpu = GpuPhrasePool(3, 2, 4, vocab_size=5, device=CPU, backend=backend)
    gpu.insert_many(torch.tensor([-1, 2, 5, 99, -7]), torch.tensor([[1, 1], [2, 2], [3, 3], [4, 4], [5, 5]]))
    cpu = PhrasePool(ngram=3, guess_set=2, max_keys=4)
    cpu.insert(2, [2, 2])
    assert_same(cpu, gpu)
    ph, valid = gpu.lookup(torch.tensor([-1, 5, 2]), 0)  # k = 0 still has a fixed (B, 0, P) shape
    assert ph.shape == (3, 0, 2) and valid.shape == (3, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_any_integer_dtype(backend):
    keys, phrases = [3, 1, 3, 2], [[1, 2], [3, 4], [5, 6], [1, 2]]
    want = GpuPhrasePool(3, 2, 2, vocab_size=4, device=CPU, backend="reference")
    want.insert_many(torch.tensor(keys), torch.tensor(phrases))
    gpu = GpuPhrasePool(3, 2, 2, vocab_size=4, device=CPU, backend=backend)
    gpu.insert_many(torch.tensor(keys, dtype=torch.int32), torch.tensor(phrases, dtype=torch.int16))
    a, b = want.lookup(torch.arange(4, dtype=torch.int32), 2), gpu.lookup(torch.arange(4, dtype=torch.int16), 2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_replace_edge_cases(backend):
    cpu = PhrasePool(ngram=3, guess_set=3, max_keys=3)
    gpu = GpuPhrasePool(3, 3, 3, vocab_size=4, device=CPU, backend=backend)
    seq = [("insert", [0, 0, 0, 1], [[1, 1], [2, 2], [3, 3], [1, 1]]),
           ("replace", [0, 0, 0, 0, 2, 1],  # in place, new present (drop old), same, old absent, new key, refresh
            [[2, 2], [1, 1], [3, 3], [8, 8], [0, 0], [1, 1]],
            [[9, 9], [3, 3], [3, 3], [7, 7], [1, 2], [1, 1]])]
    for op in seq:
        apply_cpu(cpu, op)
        apply_gpu(gpu, op)
    assert cpu.phrases(0) == [(9, 9), (3, 3), (7, 7)]
    assert cpu.keys() == [0, 2, 1]
    assert_same(cpu, gpu)
    op = ("replace", [3], [[9, 9]], [[4, 4]])  # a new key through replace evicts the oldest key
    apply_cpu(cpu, op)
    apply_gpu(gpu, op)
    assert cpu.keys() == [2, 1, 3]
    assert_same(cpu, gpu)


@pytest.mark.parametrize("backend", BACKENDS)
def test_host_adapter_mirrors_phrase_pool_calls(backend):
    cpu = PhrasePool(ngram=3, guess_set=3, max_keys=3)
    gpu = GpuPhrasePool(3, 3, 3, vocab_size=8, device=CPU, backend=backend)
    host = gpu.host
    assert isinstance(host, HostPoolAdapter)
    for pool in (cpu, host):
        pool.seed_from([1, 2, 3, 1, 2, 4, 1])
        pool.insert(5, (1, 2))
        pool.insert_many([(5, (3, 4)), (6, (1, 1))])
        pool.replace(5, (1, 2), (9, 9))
    for key, k in [(1, None), (1, 1), (5, 3), (7, 2), (-1, 2), (2, 0), (100, 1), (1, -1), (1, 50)]:
        assert host.lookup(key, k) == cpu.lookup(key, k)
    assert (host.stats.lookups, host.stats.hits) == (cpu.stats.lookups, cpu.stats.hits)
    assert host.stats.hit_rate == cpu.stats.hit_rate
    assert len(host) == len(cpu) and host.num_keys() == cpu.num_keys()
    assert host.keys() == cpu.keys()
    assert all(host.phrases(k) == cpu.phrases(k) for k in range(-1, 9))
    assert (5 in host) == (5 in cpu) and (0 in host) == (0 in cpu)
    assert (host.ngram, host.guess_set, host.max_keys, host.phrase_len) == (3, 3, 3, 2)
    with pytest.raises(ValueError):
        host.insert(1, (1, 2, 3))
    with pytest.raises(ValueError):
        host.insert(8, (1, 2))  # outside the device pool's vocabulary
    host.stats = PoolStats()
    assert host.stats.lookups == 0
    host.clear()
    assert len(host) == 0 and host.num_keys() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_to_cpu_from_cpu_round_trip(backend):
    cpu = PhrasePool(ngram=3, guess_set=2, max_keys=3)
    for op in random_ops(7, 40, 6, 3, 2, 3, 3, 4):
        apply_cpu(cpu, op)
    cpu.lookup(1)
    gpu = GpuPhrasePool.from_cpu(cpu, device=CPU, vocab_size=6, backend=backend)
    assert (gpu.stats.lookups, gpu.stats.hits) == (cpu.stats.lookups, cpu.stats.hits)
    back = gpu.to_cpu()
    assert back.keys() == cpu.keys() and all(back.phrases(k) == cpu.phrases(k) for k in cpu.keys())
    assert (back.ngram, back.guess_set, back.max_keys) == (3, 2, 3)
    # after the conversion both go on identically (the LRU links were rebuilt right)
    for op in random_ops(8, 10, 6, 3, 2, 3, 3, 4):
        apply_cpu(cpu, op)
        apply_gpu(gpu, op)
    assert_same(cpu, gpu)


def test_save_load_interoperates_with_cpu_pool(tmp_path):
    cpu = PhrasePool(ngram=4, guess_set=3, max_keys=5)
    for op in random_ops(3, 40, 9, 4, 3, 5, 3, 5):
        apply_cpu(cpu, op)
    cpu.save(tmp_path / "cpu.pt")
    gpu = GpuPhrasePool.load(tmp_path / "cpu.pt", device=CPU, vocab_size=9, backend="reference")
    assert_same(cpu, gpu)
    gpu.save(tmp_path / "gpu.pt")
    again = PhrasePool.load(tmp_path / "gpu.pt")
    assert again.keys() == cpu.keys() and all(again.phrases(k) == cpu.phrases(k) for k in cpu.keys())
    want, got = cpu.state_dict(), torch.load(tmp_path / "gpu.pt", weights_only=True)
    for name in ("format", "ngram", "guess_set", "max_keys"):
        assert got[name] == want[name]
    for name in ("keys", "counts", "phrases"):
        assert got[name].dtype == torch.int64 and torch.equal(got[name], want[name])
    assert got["vocab_size"] == 9
    gpu2 = GpuPhrasePool.load(tmp_path / "gpu.pt", device=CPU, backend="reference")  # vocab_size from the file
    assert gpu2.vocab_size == 9
    assert_same(cpu, gpu2)


def test_empty_round_trip_and_inferred_vocab(tmp_path):
    gpu = GpuPhrasePool(3, 2, 4, vocab_size=10, device=CPU, backend="reference")
    gpu.save(tmp_path / "e.pt")
    assert len(PhrasePool.load(tmp_path / "e.pt")) == 0
    cpu = PhrasePool(ngram=3)
    cpu.insert(4, (7, 1))
    assert GpuPhrasePool.from_cpu(cpu, device=CPU).vocab_size == 8  # one past the largest token held


def test_load_rejects_states_the_device_pool_cannot_hold():
    cpu = PhrasePool(ngram=3, guess_set=2, max_keys=8)
    cpu.insert_many([(1, (1, 1)), (2, (2, 2)), (3, (3, 3))])
    with pytest.raises(ValueError):
        GpuPhrasePool.from_cpu(cpu, device=CPU, vocab_size=3)  # key 3 outside the vocabulary
    with pytest.raises(ValueError):
        GpuPhrasePool.from_cpu(cpu, device=CPU, vocab_size=2)  # more keys than slots
    state = cpu.state_dict()
    state["counts"] = torch.tensor([3, 0, 0])
    with pytest.raises(ValueError):
        GpuPhrasePool.from_state_dict(state, device=CPU)  # more than guess_set phrases
    with pytest.raises(ValueError):
        GpuPhrasePool.from_state_dict({"format": "nope"}, device=CPU)


def test_device_memory_follows_the_caps():
    small = GpuPhrasePool(7, 20, 4096, vocab_size=152064, device="meta", backend="reference")
    assert small.num_slots == 4096
    assert small.nbytes() == 4 * 152064 + 4096 * (20 * 6 * 4 + 8) + 2 * 4 * 4097 + 4 + 16
    default = GpuPhrasePool(7, 20, vocab_size=152064, device="meta", backend="reference")
    assert default.num_slots == default.max_keys == PhrasePool(ngram=7, guess_set=20).max_keys < 152064
    assert default.nbytes() < 5e6 + 4 * 152064          # 64 MiB budget: ~8k keys, 4 MB of slots + the key index
    full = GpuPhrasePool(7, 20, vocab_size=32000, max_bytes=1 << 30, device="meta", backend="reference")
    assert full.num_slots == 32000  # max_keys >= vocab: one slot per token, no eviction ever


# (ngram, guess_set, max_bytes, vocab, alphabet): budgets that bind on keys, and one that also cuts the key's list
BUDGETS = {"keys": (3, 3, 6000, 12, 3), "list": (4, 6, 2028, 10, 2), "wide": (5, 2, 9000, 30, 3)}  # 4, 1, 6 keys


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(BUDGETS))
def test_same_caps_from_the_same_budget(backend, case):
    """Both pools derive max_keys / guess_set from max_bytes by one rule, then hold the same contents; the CPU
    pool's bytes stay within the budget and the device pool's slots are far below it."""
    ngram, g, max_bytes, vocab, alphabet = BUDGETS[case]
    cpu = PhrasePool(ngram=ngram, guess_set=g, max_bytes=max_bytes)
    gpu = GpuPhrasePool(ngram, g, vocab_size=vocab, max_bytes=max_bytes, device=CPU, backend=backend)
    assert (gpu.max_keys, gpu.guess_set) == (cpu.max_keys, cpu.guess_set)
    assert 1 <= cpu.max_keys < vocab and (cpu.guess_set < g) == (case == "list")
    for i, op in enumerate(random_ops(len(case), 60 if backend == "reference" else 20, vocab, ngram, cpu.guess_set,
                                      cpu.max_keys, alphabet, 6)):
        apply_cpu(cpu, op)
        apply_gpu(gpu, op)
        assert cpu.nbytes() <= max_bytes
        if i % 10 == 9:
            assert_same(cpu, gpu)
    assert cpu.num_keys() == cpu.max_keys           # the bound bound: keys were evicted
    assert gpu.nbytes() - 4 * vocab <= max_bytes
    back = GpuPhrasePool.from_state_dict(cpu.state_dict(), device=CPU, backend=backend)
    assert (back.max_keys, back.guess_set, back.max_bytes) == (cpu.max_keys, cpu.guess_set, max_bytes)


def test_tensor_path_argument_checks():
    gpu = GpuPhrasePool(3, 2, 4, vocab_size=5, device=CPU, backend="reference")
    with pytest.raises(ValueError):
        gpu.insert_many(torch.tensor([1]), torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError):
        gpu.insert_many(torch.tensor([1, 2]), torch.tensor([[1, 2]]))
    with pytest.raises(ValueError):
        gpu.insert_many(torch.tensor([1]), torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError):
        ngram_ops.ngram_lookup(gpu.tensors, torch.tensor([[1]]), 2)
    with pytest.raises(ValueError):
        ngram_ops.ngram_lookup(gpu.tensors, torch.tensor([1]), -1)
    with pytest.raises(ValueError):
        ngram_ops.ngram_lookup(gpu.tensors._replace(counts=gpu.tensors.counts.long()), torch.tensor([1]), 2)
    with pytest.raises(ValueError):
        GpuPhrasePool(1, 2, 4, vocab_size=5, device=CPU)
    with pytest.raises(ValueError):
        GpuPhrasePool(3, 2, 4, vocab_size=0, device=CPU)
    gpu.insert_many(torch.zeros(0, dtype=torch.long), torch.zeros(0, 2, dtype=torch.long))  # empty batch: no-op
    assert len(gpu) == 0


def test_backend_dispatch():
    pool = ngram_ops.ngram_pool_empty(5, 3, 2, 2)
    keys, phrases = torch.tensor([1]), torch.tensor([[1, 2]])
    ngram_ops.ngram_insert(pool, keys, phrases, backend="reference")
    ph, valid = ngram_ops.ngram_lookup(pool, keys, 2, backend="reference")
    assert ph[0, 0].tolist() == [1, 2] and valid[0].tolist() == [True, False]
    with pytest.raises(ValueError):
        ngram_ops.ngram_lookup(pool, keys, 2, backend="nonsense")
    if ngram_ops.cuda_ngram_ops() is None:
        with pytest.raises(ValueError):
            ngram_ops.ngram_lookup(pool, keys, 2, backend="cuda")
    if HAVE_TRITON and triton_interpret():
        assert ngram_ops.ngram_backend(CPU) == "triton"


# ---- CUDA only: no host sync, graph capture ---------------------------------------------------------------------
def _cuda_backends() -> list[str]:
    out = ["reference"]
    if HAVE_TRITON and not triton_interpret():
        out.append("triton")
    if ngram_ops.cuda_ngram_ops() is not None:
        out.append("cuda")
    return out


@needs_cuda
@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_cuda_no_host_sync(backend):
    if backend not in _cuda_backends():
        pytest.skip(f"backend {backend} not usable on CUDA here")
    dev = torch.device("cuda")
    gpu = GpuPhrasePool(7, 20, 64, vocab_size=1000, device=dev, backend=backend)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 100, (b,), generator=gen).to(dev), torch.randint(0, 50, (b, 6), generator=gen).to(dev))
               for b in (1, 20, 160)]
    look = torch.randint(0, 100, (4,), generator=gen).to(dev)
    for keys, phrases in batches:  # warm up: every kernel variant compiled (Triton specialises 1 and multiples of 16)
        gpu.insert_many(keys, phrases)
        gpu.replace_many(keys, phrases, phrases.flip(0))
        gpu.lookup(look, 20)
        gpu.seed_from(phrases.reshape(-1)[:30])
    torch.cuda.synchronize()
    cpu = gpu.to_cpu()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for keys, phrases in batches:
            gpu.insert_many(keys, phrases)
            gpu.replace_many(keys, phrases, phrases.flip(0))
            gpu.lookup(look, 20)
            gpu.seed_from(phrases.reshape(-1)[:30])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for keys, phrases in batches:
        op_keys, op_ph = keys.tolist(), phrases.tolist()
        apply_cpu(cpu, ("insert", op_keys, op_ph))
        apply_cpu(cpu, ("replace", op_keys, op_ph, phrases.flip(0).tolist()))
        cpu.lookup(0)
        cpu.seed_from(phrases.reshape(-1)[:30].tolist())
    want, got = cpu.state_dict(), gpu.state_dict()
    assert all(torch.equal(want[n], got[n]) for n in ("keys", "counts", "phrases"))


@needs_cuda
@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_cuda_graph_capture_of_lookup_and_insert(backend):
    if backend not in _cuda_backends():
        pytest.skip(f"backend {backend} not usable on CUDA here")
    dev = torch.device("cuda")
    w, g, n, vocab = 20, 20, 7, 1000
    gpu = GpuPhrasePool(n, g, 50, vocab_size=vocab, device=dev, backend=backend)
    cpu = PhrasePool(ngram=n, guess_set=g, max_keys=50)
    look_key = torch.zeros(1, dtype=torch.int64, device=dev)
    ins_keys = torch.full((w,), -1, dtype=torch.int64, device=dev)  # padding: the warm-up changes nothing
    ins_phrases = torch.zeros(w, n - 1, dtype=torch.int64, device=dev)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            gpu.insert_many(ins_keys, ins_phrases)
            gpu.lookup(look_key, g)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gpu.insert_many(ins_keys, ins_phrases)  # one drafting step: insert the window's n-grams, then look up
        out_phrases, out_valid = gpu.lookup(look_key, g)
    gpu._stats.zero_()
    gen = torch.Generator().manual_seed(1)
    for _ in range(30):
        keys = torch.randint(0, 120, (w,), generator=gen)
        phrases = torch.randint(0, 4, (w, n - 1), generator=gen)
        key = int(keys[torch.randint(0, w, (1,), generator=gen)])
        ins_keys.copy_(keys)
        ins_phrases.copy_(phrases)
        look_key.fill_(key)
        graph.replay()
        for k, p in zip(keys.tolist(), phrases.tolist()):
            cpu.insert(k, p)
        got = [tuple(r) for r in out_phrases[0][out_valid[0]].tolist()]
        assert got == cpu.lookup(key, g)
    want, got = cpu.state_dict(), gpu.state_dict()
    assert all(torch.equal(want[n], got[n]) for n in ("keys", "counts", "phrases"))
    assert gpu.stats.lookups == cpu.stats.lookups == 30


_AOT_SCRIPT = r"""
import sys
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except Exception as exc:
    print("SKIP", exc); sys.exit(0)
from ouroboros_kernels.triton import ngram as k
jobs = [
    (k._lookup_kernel, dict(keys_ptr="*i64", key_to_slot_ptr="*i32", counts_ptr="*i32", phrases_ptr="*i32",
                            out_ptr="*i64", valid_ptr="*i8", stats_ptr="*i64", V="i32", K="i32"),
     dict(G=20, P=6, BLOCK_K=32, BLOCK_P=8, HAS_STATS=True)),
    (k._resolve_kernel, dict(keys_ptr="*i64", key_to_slot_ptr="*i32", slot_key_ptr="*i32", prev_ptr="*i32",
                             next_ptr="*i32", num_keys_ptr="*i32", item_ptr="*i32", V="i32", S="i32", B="i32"),
     dict(B_STATIC=0, BLOCK_B=32)),
] + [
    (k._apply_kernel, dict(new_ptr="*i64", old_ptr="*i64", counts_ptr="*i32", phrases_ptr="*i32", item_ptr="*i32",
                           scores_ptr="*i32", weights_ptr="*i64", B="i32"),
     dict(G=20, P=6, HAS_OLD=True, SCORED=scored, HAS_WEIGHTS=scored, BLOCK_G=32, BLOCK_P=8))
    for scored in (False, True)
]
for fn, sig, consts in jobs:
    sig = dict(sig, **{name: "constexpr" for name in consts})
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    except Exception as exc:  # another Triton version's API: nothing to say about our kernels
        print("SKIP", exc); sys.exit(0)
    out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 1})
    ptx = out.asm["ptx"]
    assert "ld.global.nc" not in ptx, "a non-coherent load would miss this program's own stores"
    print("compiled", fn.__name__)
print("OK")
"""


@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
def test_triton_kernels_compile_for_sm90_without_a_gpu():
    """Ahead-of-time compile to sm_90 cubin (ptxas ships with Triton): catches what the interpreter lets through."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    if proc.stdout.startswith("SKIP"):
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr


def test_copy_and_clear_keep_the_storage():
    """``copy_`` and ``clear`` work in place (a captured CUDA graph reads these tensors); ``copy_`` refuses another
    layout."""
    a = GpuPhrasePool(ngram=4, guess_set=3, vocab_size=50, device="cpu", backend="reference")
    b = a.empty_like()
    b.insert_many(torch.tensor([3, 7]), torch.tensor([[1, 2, 3], [4, 5, 6]]))
    b.lookup(torch.tensor([3]))
    ptrs = [t.data_ptr() for t in a.tensors]
    a.copy_(b)
    assert [t.data_ptr() for t in a.tensors] == ptrs
    assert a.state_dict()["keys"].tolist() == b.state_dict()["keys"].tolist() and a.stats == b.stats
    a.clear()
    assert [t.data_ptr() for t in a.tensors] == ptrs and len(a) == 0 and a.stats.lookups == 0
    with pytest.raises(ValueError, match="same ngram"):
        a.copy_(GpuPhrasePool(ngram=5, guess_set=3, vocab_size=50, device="cpu", backend="reference"))
