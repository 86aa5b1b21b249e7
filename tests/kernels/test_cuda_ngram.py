"""The CUDA n-gram pool kernels (csrc/ngram.cu) against the reference backend (SPEC §3; issue 5, item 1(b)).

All but the first test need a CUDA device and the built extension ``ouroboros_kernels._cuda`` with the n-gram ops
(skipped without them). The first compiles the torch-free self-test with nvcc and runs the kernels' own sequential
logic on the CPU against its host model (``--host``: CI machines with nvcc and no GPU).
The layout comparison is exact (key_to_slot, slot_key, counts, the LRU links, num_keys) except for the rows of
``phrases`` at or beyond ``counts`` (garbage by contract: backends may leave different values). The CPU-pool
equivalence (``PhrasePool``) of the "cuda" backend is also covered by tests/drafting/test_gpu_pool.py.
The raw ops' own argument checks (csrc/bindings.cpp) are tested in process and strictly: a bad argument must raise
RuntimeError, never crash (issue 20).
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from ouroboros_kernels import ngram as ngram_ops
from ouroboros_kernels import reference
from ouroboros_kernels.ngram import NgramPool, ngram_pool_empty

ROOT = Path(__file__).resolve().parents[2]
HAVE_CUDA_OPS = torch.cuda.is_available() and ngram_ops.cuda_ngram_ops() is not None
needs_cuda_ops = pytest.mark.skipif(not HAVE_CUDA_OPS, reason="needs a CUDA device and the extension "
                                    "ouroboros_kernels._cuda built with the n-gram ops "
                                    "(pip install --no-build-isolation -e .)")
if HAVE_CUDA_OPS:
    from ouroboros_kernels import cuda_ops

DEV = torch.device("cuda")
INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc must be on PATH")
def test_kernel_logic_on_host(tmp_path):
    """No GPU needed: the kernels' __host__ __device__ logic (resolve walk, per-item list update) vs the host model."""
    if HAVE_CUDA_OPS:
        pytest.skip("the GPU tests below (and ctest's ngram_selftest) cover the kernels themselves")
    exe = tmp_path / "ngram_selftest"
    arch = os.environ.get("OUROBOROS_TEST_CUDA_ARCH", "80")
    build = subprocess.run(["nvcc", "-std=c++17", "-O1", f"-arch=sm_{arch}", "-I", str(ROOT / "csrc" / "include"),
                            str(ROOT / "csrc" / "tests" / "ngram_selftest.cu"), str(ROOT / "csrc" / "ngram.cu"),
                            "-o", str(exe)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    run = subprocess.run([str(exe), "--host"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "host run of the kernel logic passed" in run.stdout, run.stdout + run.stderr


def assert_same_pool(got: NgramPool, want: NgramPool) -> None:
    """Identical pools up to the garbage rows (row >= counts[s]) of ``phrases``."""
    for name in ("key_to_slot", "slot_key", "counts", "lru_prev", "lru_next", "num_keys"):
        a, b = getattr(got, name), getattr(want, name)
        assert torch.equal(a, b), f"{name}: {a.tolist()} != {b.tolist()}"
    g = want.phrases.shape[1]
    live = torch.arange(g, device=want.counts.device)[None, :] < want.counts[:, None]  # (S, G)
    assert torch.equal(got.phrases[live], want.phrases[live]), "phrases differ in live rows"


def clone_pool(pool: NgramPool) -> NgramPool:
    return NgramPool(*(t.clone() for t in pool))


def _fits(dtype: torch.dtype, lo: int, hi: int) -> bool:
    info = torch.iinfo(dtype)
    return info.min <= lo and hi <= info.max


def random_batches(seed: int, steps: int, vocab: int, p: int, alphabet: int, max_batch: int):
    """Seeded ("insert", keys, phrases, old|None) / ("lookup", keys, k) items: repeats, padding, any integer dtype."""
    rng = random.Random(seed)
    out = []
    for _ in range(steps):
        b = rng.randint(1, max_batch)
        if rng.random() < 0.2:
            keys = [rng.choice([-1, vocab, rng.randrange(vocab)]) if rng.random() < 0.15 else rng.randrange(vocab)
                    for _ in range(b)]
            dt = rng.choice([d for d in INT_DTYPES if _fits(d, -1, vocab)])
            out.append(("lookup", torch.tensor(keys, dtype=dt), rng.randint(0, 6)))
            continue
        keys = [rng.randrange(vocab) for _ in range(b)]
        if rng.random() < 0.3:  # repeated keys inside the batch
            keys = [rng.choice(keys[:1 + b // 2]) for _ in range(b)]
        if rng.random() < 0.2:  # padding (negative) and out-of-vocabulary keys
            keys = [rng.choice([-1, -3, vocab, vocab + 7]) if rng.random() < 0.3 else k for k in keys]
        phrases = [[rng.randrange(alphabet) for _ in range(p)] for _ in range(b)]
        if rng.random() < 0.3:  # repeated phrases inside the batch
            phrases = [list(rng.choice(phrases[:1 + b // 2])) for _ in range(b)]
        old = None
        if rng.random() < 0.35:
            old = [list(phrases[rng.randrange(b)]) if rng.random() < 0.5 else
                   [rng.randrange(alphabet) for _ in range(p)] for _ in range(b)]
        kd = rng.choice([d for d in INT_DTYPES if _fits(d, -3, vocab + 7)])
        pd = rng.choice([d for d in INT_DTYPES if _fits(d, 0, alphabet)])
        od = rng.choice([d for d in INT_DTYPES if _fits(d, 0, alphabet)])
        out.append(("insert", torch.tensor(keys, dtype=kd), torch.tensor(phrases, dtype=pd),
                    None if old is None else torch.tensor(old, dtype=od)))
    return out


# (vocab, slots, guess_set, phrase_len, alphabet, max_batch, steps)
CASES = {
    "evicting": (10, 4, 3, 2, 3, 6, 120),
    "roomy": (8, 8, 4, 3, 2, 5, 80),
    "g1": (6, 3, 1, 1, 3, 4, 80),
    "one-slot": (5, 1, 2, 2, 2, 4, 80),
    "engine": (1000, 50, 20, 6, 4, 160, 60),
    "wide": (64, 16, 40, 37, 2, 40, 40),          # > 32 rows and > 32 tokens per row: multi-pass warp loops
    "long-batch": (5000, 300, 5, 3, 3, 2600, 6),  # batches spanning several resolve chunks (1024 keys)
}


@needs_cuda_ops
@pytest.mark.parametrize("case", list(CASES))
def test_random_sequences_match_reference(case):
    vocab, s, g, p, alphabet, max_batch, steps = CASES[case]
    got = ngram_pool_empty(vocab, s, g, p, device=DEV)
    want = ngram_pool_empty(vocab, s, g, p, device=DEV)
    st_got = torch.zeros(2, dtype=torch.int64, device=DEV)
    st_want = torch.zeros(2, dtype=torch.int64, device=DEV)
    for i, item in enumerate(random_batches(list(CASES).index(case), steps, vocab, p, alphabet, max_batch)):
        if item[0] == "lookup":
            keys, k = item[1].to(DEV), item[2]
            a = cuda_ops.ngram_lookup(got, keys, k, st_got)
            b = reference.ngram_lookup(want, keys, k, st_want)
            assert a[0].shape == b[0].shape and a[0].dtype == torch.int64 and a[1].dtype == torch.bool
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), f"lookup at step {i}"
            assert torch.equal(st_got, st_want), f"stats at step {i}"
        else:
            keys, phrases, old = (None if t is None else t.to(DEV) for t in item[1:])
            cuda_ops.ngram_insert(got, keys, phrases, old)
            reference.ngram_insert(want, keys, phrases, old)
            assert_same_pool(got, want)


@needs_cuda_ops
def test_public_ops_dispatch_to_cuda():
    assert ngram_ops.ngram_backend(torch.device("cuda")) == "cuda"
    pool = ngram_pool_empty(50, 8, 4, 3, device=DEV)
    want = ngram_pool_empty(50, 8, 4, 3, device=DEV)
    keys = torch.tensor([3, 3, -1, 7, 49, 50], device=DEV)
    phrases = torch.tensor([[1, 2, 3], [4, 5, 6], [0, 0, 0], [1, 2, 3], [9, 9, 9], [8, 8, 8]], device=DEV)
    ngram_ops.ngram_insert(pool, keys, phrases, backend="cuda")
    ngram_ops.ngram_insert(want, keys, phrases, backend="reference")
    assert_same_pool(pool, want)
    a = ngram_ops.ngram_lookup(pool, keys, 3, backend="cuda")
    b = ngram_ops.ngram_lookup(want, keys, 3, backend="reference")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0][0, :2].tolist() == [[4, 5, 6], [1, 2, 3]]


@needs_cuda_ops
def test_empty_batches_and_k_zero():
    pool = ngram_pool_empty(10, 4, 3, 2, device=DEV)
    cuda_ops.ngram_insert(pool, torch.zeros(0, dtype=torch.long, device=DEV),
                          torch.zeros(0, 2, dtype=torch.long, device=DEV))
    ph, valid = cuda_ops.ngram_lookup(pool, torch.zeros(0, dtype=torch.long, device=DEV), 3)
    assert ph.shape == (0, 3, 2) and valid.shape == (0, 3)
    stats = torch.zeros(2, dtype=torch.int64, device=DEV)
    ph, valid = cuda_ops.ngram_lookup(pool, torch.tensor([1, -1, 4], device=DEV), 0, stats)
    assert ph.shape == (3, 0, 2) and valid.shape == (3, 0)
    assert stats.tolist() == [2, 0]  # k = 0 still counts the lookups


@needs_cuda_ops
def test_rejects_bad_inputs():
    """Through the public ops (what every caller uses): a clear ValueError before any kernel runs."""
    pool = ngram_pool_empty(10, 4, 3, 2, device=DEV)
    keys = torch.tensor([1], device=DEV)
    with pytest.raises(ValueError, match="integer"):
        ngram_ops.ngram_insert(pool, keys.float(), torch.tensor([[1, 2]], device=DEV), backend="cuda")
    with pytest.raises(ValueError, match="shape"):
        ngram_ops.ngram_insert(pool, keys, torch.tensor([[1, 2, 3]], device=DEV), backend="cuda")
    with pytest.raises(ValueError, match="on cuda"):
        ngram_ops.ngram_insert(pool, keys.cpu(), torch.tensor([[1, 2]], device=DEV), backend="cuda")
    with pytest.raises(ValueError, match="int32"):
        ngram_ops.ngram_lookup(pool._replace(counts=pool.counts.long()), keys, 2, backend="cuda")
    with pytest.raises(ValueError, match="stats"):
        ngram_ops.ngram_lookup(pool, keys, 2, torch.zeros(2, dtype=torch.int32, device=DEV), backend="cuda")


def _raw_bad_calls(pool: NgramPool) -> dict:
    """name -> (call of a raw op with one bad argument, the words its RuntimeError must contain)."""
    i32 = dict(dtype=torch.int32, device=DEV)
    keys, ph = torch.tensor([1], device=DEV), torch.tensor([[1, 2]], device=DEV)
    ins, look = cuda_ops.ngram_insert, cuda_ops.ngram_lookup
    big_p = ngram_pool_empty(10, 2, 1, 4096, device=DEV)     # (G + 2) * P = 12288 fits; with G = 2 it does not
    return {
        "float keys": (lambda: ins(pool, keys.float(), ph), "integer"),
        "phrase length": (lambda: ins(pool, keys, torch.tensor([[1, 2, 3]], device=DEV)), "shape"),
        "keys on the host": (lambda: ins(pool, keys.cpu(), ph), "device"),
        "2-D keys": (lambda: ins(pool, keys[None], ph), "1-D"),
        "old shape": (lambda: ins(pool, keys, ph, torch.tensor([[1]], device=DEV)), "old"),
        "float phrases": (lambda: ins(pool, keys, ph.double()), "integer"),
        "int64 counts": (lambda: look(pool._replace(counts=pool.counts.long()), keys, 2), "int32"),
        "short lru_prev": (lambda: ins(pool._replace(lru_prev=pool.lru_prev[:-1].clone()), keys, ph), "lru_prev"),
        "strided phrases": (lambda: ins(pool._replace(phrases=pool.phrases.transpose(1, 2).contiguous()
                                                      .transpose(1, 2)), keys, ph), "contiguous"),
        "pool on the host": (lambda: look(NgramPool(*(t.cpu() for t in pool))._replace(
            key_to_slot=pool.key_to_slot), keys, 2), "pool.counts"),
        "S > V": (lambda: ins(pool._replace(key_to_slot=torch.full((2,), -1, **i32)), keys, ph), "vocab_size"),
        "tile capacity": (lambda: ins(big_p._replace(phrases=torch.zeros(2, 2, 4096, **i32)), keys,
                                      torch.zeros(1, 4096, dtype=torch.long, device=DEV)), "12288"),
        "negative k": (lambda: look(pool, keys, -1), "k must be >= 0"),
        "k * P overflow": (lambda: look(pool, keys, 2**62), "k * P must be < 2^31"),
        "int32 stats": (lambda: look(pool, keys, 2, torch.zeros(2, **i32)), "stats"),
        "stats shape": (lambda: look(pool, keys, 2, torch.zeros(3, dtype=torch.long, device=DEV)), "stats"),
    }


@needs_cuda_ops
def test_raw_ops_reject_bad_inputs_without_crashing():
    """The C++ checks of the raw custom ops, in process: every bad call raises RuntimeError naming the problem, no
    crash, no sticky CUDA error, and the pool is untouched and keeps working."""
    pool = ngram_pool_empty(10, 4, 3, 2, device=DEV)
    want = clone_pool(pool)
    for name, (call, words) in _raw_bad_calls(pool).items():
        try:
            call()
        except RuntimeError as err:
            assert words in str(err), f"{name}: {err}"
        else:
            pytest.fail(f"{name}: the raw op accepted it")
        torch.cuda.synchronize()
        assert_same_pool(pool, want)
    with pytest.raises((RuntimeError, NotImplementedError)):   # all on the host: the op has only a CUDA kernel
        cuda_ops.ngram_lookup(NgramPool(*(t.cpu() for t in pool)), torch.tensor([1]), 2)
    keys, phrases = torch.tensor([1, 3, 1], device=DEV), torch.tensor([[1, 2], [3, 4], [5, 6]], device=DEV)
    cuda_ops.ngram_insert(pool, keys, phrases)
    reference.ngram_insert(want, keys, phrases)
    assert_same_pool(pool, want)
    assert cuda_ops.ngram_lookup(pool, keys, 2)[0][0].tolist() == [[5, 6], [1, 2]]


@needs_cuda_ops
def test_no_host_sync():
    pool = ngram_pool_empty(1000, 64, 20, 6, device=DEV)
    stats = torch.zeros(2, dtype=torch.int64, device=DEV)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 100, (b,), generator=gen).to(DEV), torch.randint(0, 50, (b, 6), generator=gen).to(DEV))
               for b in (1, 20, 160)]
    cuda_ops.ngram_insert(pool, *batches[0])  # load the module's kernels outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for keys, phrases in batches:
            cuda_ops.ngram_insert(pool, keys, phrases)
            cuda_ops.ngram_insert(pool, keys, phrases.flip(0), phrases)
            cuda_ops.ngram_lookup(pool, keys, 20, stats)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@needs_cuda_ops
def test_cuda_graph_capture_of_insert_and_lookup():
    w, g, n, vocab, slots = 20, 20, 7, 1000, 50
    pool = ngram_pool_empty(vocab, slots, g, n - 1, device=DEV)
    want = ngram_pool_empty(vocab, slots, g, n - 1, device=DEV)
    stats = torch.zeros(2, dtype=torch.int64, device=DEV)
    want_stats = torch.zeros(2, dtype=torch.int64, device=DEV)
    ins_keys = torch.full((w,), -1, dtype=torch.int64, device=DEV)  # padding: the warm-up changes nothing
    ins_phrases = torch.zeros(w, n - 1, dtype=torch.int64, device=DEV)
    ins_old = torch.full((w, n - 1), -1, dtype=torch.int64, device=DEV)
    look = torch.zeros(3, dtype=torch.int64, device=DEV)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            cuda_ops.ngram_insert(pool, ins_keys, ins_phrases, ins_old)
            cuda_ops.ngram_lookup(pool, look, g)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cuda_ops.ngram_insert(pool, ins_keys, ins_phrases, ins_old)
        out_phrases, out_valid = cuda_ops.ngram_lookup(pool, look, g, stats)
    gen = torch.Generator().manual_seed(1)
    for step in range(40):
        keys = torch.randint(0, 120, (w,), generator=gen)
        phrases = torch.randint(0, 4, (w, n - 1), generator=gen)
        old = torch.where(torch.rand(w, 1, generator=gen) < 0.5, phrases.roll(1, 0), -1)
        ins_keys.copy_(keys)
        ins_phrases.copy_(phrases)
        ins_old.copy_(old)
        look.copy_(keys[torch.randint(0, w, (3,), generator=gen)])
        graph.replay()
        reference.ngram_insert(want, keys.to(DEV), phrases.to(DEV), old.to(DEV))
        wp, wv = reference.ngram_lookup(want, look, g, want_stats)
        torch.cuda.synchronize()
        assert torch.equal(out_phrases, wp) and torch.equal(out_valid, wv), f"replay {step}"
        assert_same_pool(pool, want)
    assert torch.equal(stats, want_stats)


@needs_cuda_ops
def test_torch_compile_fullgraph():
    pool = ngram_pool_empty(100, 10, 4, 3, device=DEV)
    want = clone_pool(pool)

    def step(pool, keys, phrases, look, stats):
        cuda_ops.ngram_insert(pool, keys, phrases)
        return cuda_ops.ngram_lookup(pool, look, 4, stats)

    compiled = torch.compile(step, fullgraph=True)
    gen = torch.Generator().manual_seed(2)
    s1 = torch.zeros(2, dtype=torch.int64, device=DEV)
    s2 = torch.zeros(2, dtype=torch.int64, device=DEV)
    for _ in range(4):
        keys = torch.randint(-1, 30, (12,), generator=gen).to(DEV)
        phrases = torch.randint(0, 3, (12, 3), generator=gen).to(DEV)
        look = torch.randint(0, 30, (5,), generator=gen).to(DEV)
        a = compiled(pool, keys, phrases, look, s1)
        reference.ngram_insert(want, keys, phrases)
        b = reference.ngram_lookup(want, look, 4, s2)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert_same_pool(pool, want)
    assert torch.equal(s1, s2)
