"""Per-draft-step time of phrase lookup + insert: CPU dict pool vs the device pool (issue 4, SPEC §4).

One drafting step = insert a batch of B n-grams (the window's new columns: B = W = 20; B = 1 and 160 bracket it) and
look up the guesses of one key (k = G). Providers:

- ``cpu-dict``: :class:`ouroboros.drafting.pool.PhrasePool`, including the copies it forces when the model runs on a
  GPU: the step's key + n-grams come to the host (``.tolist()``, a sync) and the guesses go back (``torch.tensor(...,
  device=...)``). On a CPU-only machine those copies are host-to-host and the table is labelled CPU.
- ``reference`` / ``triton`` / ``cuda``: :class:`ouroboros.drafting.gpu_pool.GpuPhrasePool` with that backend, eager;
  on CUDA also ``<backend>+graph``: the same step captured in a CUDA graph (fixed inputs) and replayed.

Settings: G=20, N=7, vocab 32000 and 152064, pools pre-filled from a Zipf-distributed token stream.

    python -m bench.ngram                      # GPU: full table, JSON in bench/results/ngram_<card>.json
    TRITON_INTERPRET=1 python -m bench.ngram --quick   # CPU: a short run (Triton through the interpreter)
    python -m bench.report bench/results/ngram_cpu.json  # the table of a result
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch
from ouroboros.drafting.gpu_pool import GpuPhrasePool
from ouroboros.drafting.pool import PhrasePool

from bench.common import RESULTS, slug, write_json
from bench.report.ngram import lines as table_lines
from bench.report.ngram import row_line
from ouroboros_kernels import ngram as ngram_ops
from ouroboros_kernels.backend import backend_status


def card_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def zipf_tokens(n: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` tokens with a Zipf-like rank distribution (text-like repetition), ids spread over the vocabulary."""
    ranks = torch.arange(1, min(vocab, 50000) + 1, dtype=torch.float64)
    idx = torch.multinomial(1.0 / ranks, n, replacement=True, generator=gen)
    perm = torch.randperm(vocab, generator=gen)[: ranks.numel()]
    return perm[idx]


def make_steps(n_steps: int, batch: int, vocab: int, ngram: int, gen: torch.Generator) -> list:
    """(keys (B,), phrases (B, N-1), lookup key (1,)) per step, from a token stream (so keys repeat like text)."""
    steps = []
    for _ in range(n_steps):
        toks = zipf_tokens(batch + ngram, vocab, gen)
        cols = toks.unfold(0, ngram, 1)[:batch]
        steps.append((cols[:, 0].contiguous(), cols[:, 1:].contiguous(), toks[-1:].clone()))
    return steps


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loop(fn, n: int, device: torch.device) -> list[float]:
    """Per-call microseconds of ``fn(i)`` for ``i < n`` (synchronised per call)."""
    out = []
    for i in range(n):
        sync(device)
        t0 = time.perf_counter()
        fn(i)
        sync(device)
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def bench_cpu_dict(pool: PhrasePool, steps: list, device: torch.device, g: int, iters: int) -> list[float]:
    dev_steps = [(k.to(device), p.to(device), q.to(device)) for k, p, q in steps]

    def step(i: int) -> None:
        keys, phrases, key = dev_steps[i % len(dev_steps)]
        host_keys, host_phrases, host_key = keys.tolist(), phrases.tolist(), int(key[0])  # device -> host (sync)
        pool.insert_many(zip(host_keys, host_phrases))
        guesses = pool.lookup(host_key, g)
        if guesses:
            torch.tensor(guesses, dtype=torch.int64, device=device)  # host -> device
    step(0)
    return time_loop(step, iters, device)


def bench_gpu_eager(pool: GpuPhrasePool, steps: list, device: torch.device, g: int, iters: int) -> list[float]:
    dev_steps = [(k.to(device), p.to(device), q.to(device)) for k, p, q in steps]

    def step(i: int) -> None:
        keys, phrases, key = dev_steps[i % len(dev_steps)]
        pool.insert_many(keys, phrases)
        pool.lookup(key, g)
    step(0)
    return time_loop(step, iters, device)


def bench_gpu_graph(pool: GpuPhrasePool, steps: list, device: torch.device, g: int, iters: int) -> list[float]:
    keys, phrases, key = (t.to(device) for t in steps[0])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            pool.insert_many(keys, phrases)
            pool.lookup(key, g)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pool.insert_many(keys, phrases)
        pool.lookup(key, g)
    graph.replay()
    torch.cuda.synchronize()
    reps = 20
    out = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(max(1, iters // reps)):
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) * 1e3 / reps)
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few iterations (CPU smoke run)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 152064])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 20, 160])
    ap.add_argument("--guess-set", type=int, default=20)
    ap.add_argument("--ngram", type=int, default=7)
    ap.add_argument("--prefill", type=int, default=20000, help="tokens seeded into each pool before timing")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--providers", nargs="+", default=None,
                    help="subset of cpu-dict reference triton cuda (default: all usable)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/ngram_<card>.json)")
    return ap.parse_args(argv)


def providers_for(args, device: torch.device, status: dict) -> list[str]:
    """The usable providers (Triton only on a GPU or under the interpreter, CUDA when its ops are built)."""
    on_gpu = device.type == "cuda"
    providers = ["cpu-dict", "reference"]
    if status["triton"] == "available" and (on_gpu or os.environ.get("TRITON_INTERPRET") == "1"):
        providers.append("triton")
    if on_gpu and ngram_ops.cuda_ngram_ops() is not None:
        providers.append("cuda")
    if args.providers:
        providers = [p for p in providers if p in args.providers]
    return providers


def measure(args, device: torch.device, providers: list[str], iters: int) -> list[dict]:
    """A row per vocabulary, batch and provider (``+graph`` variants on CUDA), printed as measured."""
    on_gpu = device.type == "cuda"
    g, n = args.guess_set, args.ngram
    gen = torch.Generator().manual_seed(0)
    rows = []
    for vocab in args.vocab:
        prefill = PhrasePool(ngram=n, guess_set=g)
        prefill.seed_from(zipf_tokens(args.prefill, vocab, gen).tolist())
        for batch in args.batches:
            steps = make_steps(16, batch, vocab, n, gen)
            for prov in providers:
                it = iters
                if prov == "triton" and not on_gpu:  # the interpreter: ~20 ms per program, seconds per step
                    if args.quick and batch > 20:
                        continue
                    it = min(iters, 2)
                variants = []
                if prov == "cpu-dict":
                    pool = PhrasePool.from_state_dict(prefill.state_dict())
                    variants.append((prov, bench_cpu_dict(pool, steps, device, g, it)))
                else:
                    pool = GpuPhrasePool.from_cpu(prefill, device=device, vocab_size=vocab, backend=prov)
                    variants.append((prov, bench_gpu_eager(pool, steps, device, g, it)))
                    if on_gpu:
                        pool = GpuPhrasePool.from_cpu(prefill, device=device, vocab_size=vocab, backend=prov)
                        variants.append((prov + "+graph", bench_gpu_graph(pool, steps, device, g, it)))
                for name, times in variants:
                    rows.append(dict(vocab=vocab, batch=batch, provider=name, us_median=statistics.median(times),
                                     us_min=min(times), iters=len(times)))
                    print(row_line(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    iters = args.iters or (5 if args.quick else 200)
    status = backend_status()
    card = card_name(device)
    rows = measure(args, device, providers_for(args, device, status), iters)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    result = dict(
        bench="ngram", card=card, device=str(device), kind="GPU" if on_gpu else "CPU",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        versions=dict(torch=torch.__version__, triton=triton_version, python=platform.python_version(),
                      cuda=torch.version.cuda),
        settings=dict(guess_set=args.guess_set, ngram=args.ngram, vocab=args.vocab, batches=args.batches,
                      prefill_tokens=args.prefill, iters=iters, quick=args.quick,
                      triton_interpret=os.environ.get("TRITON_INTERPRET") == "1"),
        backend_status=status, results=rows,
    )
    print("\n" + "\n".join(table_lines(result)))       # median us per step, and speedup over cpu-dict
    out = args.out or RESULTS / f"ngram_{slug(card if on_gpu else 'cpu')}.json"
    write_json(out, result, indent=2)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
