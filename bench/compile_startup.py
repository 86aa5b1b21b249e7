"""First-call compile time of the fast path's compiled tree forward, cold and from inductor's on-disk caches.

    python -m bench.compile_startup --tiny                 # tiny Qwen2 config, float32, CPU is fine
    python -m bench.compile_startup                        # Qwen2.5-Coder-1.5B config, random weights, bf16, CUDA
    python -m bench.compile_startup --buckets 1,16,64 --cache-dir /path/to/cache --out result.json
    python -m bench.report bench/results/compile_startup_cpu_tiny.json     # the table of a result

What it measures: two fresh Python processes, one after the other, each building the model and a ``StaticRunner``
with ``compile=True`` (``torch.compile(dynamic=False, fullgraph=True)`` per tree size; on CUDA the CUDA graph of each
size is captured around the compiled code), prefilling a prompt, then calling ``forward_device`` for each bucket in
``--buckets``: the first call of a bucket compiles it (and captures its graph), the next ones run it. Both processes
use the same ``TORCHINDUCTOR_CACHE_DIR`` (a fresh empty directory unless ``--cache-dir``), so the first one compiles
from scratch and fills the caches, and the second one is what a user's next process pays: dynamo still traces the
model, but inductor's FX graph cache and the AOTAutograd cache return the compiled code (the counters
``fxgraph_cache_hit/miss`` and ``autograd_cache_hit/miss`` say whether they hit). Per bucket and process: the first
call's seconds, a warm call's seconds, their difference (the compile cost), the cache counters, and whether the
runner is still compiled (a compile failure falls back to eager with a warning, recorded as ``compiled: false``).

Keeping the compile cache across processes (what a user does): inductor caches compiled graphs on disk in
``TORCHINDUCTOR_CACHE_DIR`` (default ``/tmp/torchinductor_<user>``), and the FX graph cache and AOTAutograd cache are
on by default (``TORCHINDUCTOR_FX_GRAPH_CACHE``, ``TORCHINDUCTOR_AUTOGRAD_CACHE``). The default directory already
survives between processes on one machine, but not a wiped /tmp (containers, CI): point it at a kept directory,

    export TORCHINDUCTOR_CACHE_DIR=$HOME/.cache/ouroboros-inductor   # before Python starts (or before importing torch)

and every later process with the same torch, model config, dtype, device, static-cache length and bucket finds its
compiled code there. Across machines, ``torch.compiler.save_cache_artifacts()`` / ``load_cache_artifacts()`` carry the
same caches as bytes.

Writes JSON (machine, versions, settings, both processes, summary) to ``--out`` (default
``bench/results/compile_startup_<device>.json``, ``..._tiny.json`` with ``--tiny``) and prints a short table
(``bench.report.compile_startup``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from bench.common import RESULTS, ROOT, slug, write_json  # noqa: E402
from bench.report.compile_startup import table  # noqa: E402

SCHEMA = "ouroboros.compile_startup/1"
PROMPT_LEN = 32
WARM_CALLS = 3
CACHE_COUNTERS = (("inductor", "fxgraph_cache_hit"), ("inductor", "fxgraph_cache_miss"),
                  ("inductor", "fxgraph_cache_bypass"), ("aot_autograd", "autograd_cache_hit"),
                  ("aot_autograd", "autograd_cache_miss"), ("aot_autograd", "autograd_cache_bypass"))


# ----------------------------------------------------------------------------------------------------- one process
def _counters() -> dict[str, int]:
    from torch._dynamo.utils import counters

    out = {name: int(counters[group][name]) for group, name in CACHE_COUNTERS}
    out["graphs"] = int(counters["stats"]["unique_graphs"])
    out["graph_breaks"] = int(sum(counters["graph_break"].values()))
    return out


def _cpu_seconds() -> float | None:
    """CPU seconds used so far by this process and its descendants (inductor's compile workers and their C++ compiler
    runs; exited ones through their parents' child times), or None without psutil. Unlike wall time, not inflated by
    other load on the machine."""
    try:
        import psutil
    except ImportError:
        return None
    me = psutil.Process()
    total = 0.0
    for proc in [me] + me.children(recursive=True):
        try:
            t = proc.cpu_times()
        except psutil.Error:            # exited meanwhile: its time is in its parent's child times
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


def _tree_inputs(t: int, vocab: int, device):
    """A random tree of ``t`` nodes as the runner's device inputs (ids (1, t), depths (t,), bits (t, t))."""
    import torch

    from ouroboros_kernels import ancestor_mask

    gen = torch.Generator().manual_seed(t)
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, t)]
    depths = [0] * t
    for i in range(1, t):
        depths[i] = depths[parents[i]] + 1
    ids = torch.randint(3, vocab, (1, t), generator=gen)
    return ids.to(device), torch.tensor(depths, device=device), ancestor_mask(parents).to(device)


def measure(args) -> dict:
    """The worker: build the model and a compiled runner, then time each bucket's first and warm calls."""
    t0 = time.perf_counter()
    import torch
    import torch._inductor.config
    from ouroboros.hf.static_runner import StaticRunner

    from bench.e2e_gpu_models import REAL_PAIRS, TINY_PAIRS, build_model

    t_import = time.perf_counter() - t0
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    name, spec = (TINY_PAIRS if args.tiny else REAL_PAIRS)["qwen"]["target"]
    t1 = time.perf_counter()
    model = build_model(spec, getattr(torch, args.dtype), device, seed=0)
    runner = StaticRunner(model, args.max_len, compile=True, use_graphs=None if args.graphs else False)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (PROMPT_LEN,), generator=gen).tolist()
    buckets = []
    with torch.inference_mode():
        runner.prefill(prompt)                       # eager (prefill is never compiled)
        sync()
        t_setup = time.perf_counter() - t1
        for b in args.buckets:
            inputs = _tree_inputs(b, vocab, device)
            before, cpu_before = _counters(), _cpu_seconds()
            sync()
            start = time.perf_counter()
            runner.forward_device(*inputs)
            sync()
            first = time.perf_counter() - start
            cpu = None if cpu_before is None else _cpu_seconds() - cpu_before
            counts = _delta(_counters(), before)
            warm = []
            for _ in range(WARM_CALLS):
                start = time.perf_counter()
                runner.forward_device(*inputs)
                sync()
                warm.append(time.perf_counter() - start)
            warm_s = sorted(warm)[len(warm) // 2]
            buckets.append({"bucket": b, "first_call_s": round(first, 4), "warm_call_s": round(warm_s, 6),
                            "compile_s": round(first - warm_s, 4),
                            "first_call_cpu_s": None if cpu is None else round(cpu, 3), "compiled": runner.compiled,
                            "graphed": bool(runner.use_graphs), "counters": counts})
    return {"model": name, "params": sum(p.numel() for p in model.parameters()), "import_s": round(t_import, 3),
            "setup_s": round(t_setup, 3), "buckets": buckets,
            "compile_total_s": round(sum(b["compile_s"] for b in buckets), 3),
            "first_calls_total_s": round(sum(b["first_call_s"] for b in buckets), 3),
            "first_calls_cpu_s": (None if any(b["first_call_cpu_s"] is None for b in buckets)
                                  else round(sum(b["first_call_cpu_s"] for b in buckets), 3)),
            "compile_threads": torch._inductor.config.compile_threads,
            "inductor_cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}


# ----------------------------------------------------------------------------------------------------- two processes
def run_process(args, cache_dir: str, label: str) -> dict:
    """One fresh Python process running :func:`measure` with ``TORCHINDUCTOR_CACHE_DIR=cache_dir``; its record
    (with the process's wall seconds), or an error record."""
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, "-m", "bench.compile_startup", "--worker-out", out, "--device", args.device,
           "--dtype", args.dtype, "--buckets", ",".join(map(str, args.buckets)), "--max-len", str(args.max_len),
           "--threads", str(args.threads)]
    cmd += (["--tiny"] if args.tiny else []) + ([] if args.graphs else ["--no-graphs"])
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)        # CPU tensors run the reference attention; the interpreter is a test tool
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout_s, cwd=ROOT)
        error, stderr = (None if proc.returncode == 0 else f"exit status {proc.returncode}"), proc.stderr
    except subprocess.TimeoutExpired as err:
        tail = err.stderr or b""                 # bytes even with text=True
        error = f"timed out after {args.timeout_s:.0f} s (--timeout-s)"
        stderr = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
    wall = time.perf_counter() - start
    try:
        record = None if error else json.loads(Path(out).read_text())
    finally:
        Path(out).unlink(missing_ok=True)
    if record is None:
        return {"label": label, "error": error, "stderr_tail": stderr[-3000:], "process_wall_s": round(wall, 2)}
    record.update(label=label, process_wall_s=round(wall, 2))
    return record


def summarize(first: dict, second: dict) -> dict:
    """Compile seconds of both processes, and whether the second one's graphs all came from the caches."""
    if "error" in first or "error" in second:
        return {"error": "a process failed; see runs"}
    hits = {k: sum(b["counters"][k] for b in second["buckets"])
            for k in ("fxgraph_cache_hit", "fxgraph_cache_miss", "autograd_cache_hit", "autograd_cache_miss")}
    graphs = sum(b["counters"]["graphs"] for b in second["buckets"])
    return {"first_process_compile_s": first["compile_total_s"], "second_process_compile_s": second["compile_total_s"],
            "first_process_first_calls_cpu_s": first["first_calls_cpu_s"],
            "second_process_first_calls_cpu_s": second["first_calls_cpu_s"],
            "speedup": round(first["compile_total_s"] / max(second["compile_total_s"], 1e-9), 2),
            "second_process_graphs": graphs, **{f"second_{k}": v for k, v in hits.items()},
            "cache_hit": graphs > 0 and (hits["fxgraph_cache_hit"] >= graphs or hits["autograd_cache_hit"] >= graphs),
            "all_compiled": all(b["compiled"] for run in (first, second) for b in run["buckets"])}


def machine() -> dict:
    import torch
    import transformers

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": platform.processor() or
            platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "torch_cuda": torch.version.cuda,
            "cxx": shutil.which(os.environ.get("CXX", "g++")),
            "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ----------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny Qwen2 config, float32 (runs on a CPU)")
    ap.add_argument("--buckets", default="1,16,64", help="comma list of tree sizes to compile (default 1,16,64)")
    ap.add_argument("--device", default=None, help="default cuda (tiny: cpu)")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="default bfloat16 (tiny: float32)")
    ap.add_argument("--max-len", type=int, default=4096, help="static cache slots (the engine's default size)")
    ap.add_argument("--no-graphs", dest="graphs", action="store_false", help="no CUDA graphs (compile only)")
    ap.add_argument("--threads", type=int, default=1, help="CPU intra-op threads in the workers (default 1)")
    ap.add_argument("--cache-dir", default=None,
                    help="TORCHINDUCTOR_CACHE_DIR for both processes (default: a fresh temporary directory, removed "
                         "afterwards); an existing non-empty one makes the first process warm too")
    ap.add_argument("--timeout-s", type=float, default=1200.0, help="per process")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)   # internal: run one measuring process
    args = ap.parse_args(argv)
    args.buckets = [int(b) for b in args.buckets.split(",") if b]
    if not args.buckets or min(args.buckets) < 1:
        ap.error("--buckets must be a comma list of sizes >= 1")
    args.dtype = args.dtype or ("float32" if args.tiny else "bfloat16")
    if args.device is None:
        import torch
        if not args.tiny and not torch.cuda.is_available():
            ap.error("no CUDA device: the real config (1.5B, bf16) is a GPU measurement; use --tiny on a CPU, or "
                     "pass --device cpu to insist")
        args.device = "cpu" if args.tiny else "cuda"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker_out:
        Path(args.worker_out).write_text(json.dumps(measure(args)))
        return 0
    info = machine()                             # before the runs: its load average is the one they ran under
    device_name = info.get("gpu", "cpu") if args.device.startswith("cuda") else "cpu"
    name = slug(device_name)
    out_path = Path(args.out) if args.out else RESULTS / f"compile_startup_{name}{'_tiny' if args.tiny else ''}.json"
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="ouroboros_inductor_")
    try:
        runs = [run_process(args, cache_dir, "first"), run_process(args, cache_dir, "second")]
    finally:
        if args.cache_dir is None:
            shutil.rmtree(cache_dir, ignore_errors=True)
    result = {"schema": SCHEMA, "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "machine": info,
              "settings": {"tiny": args.tiny, "device": args.device, "dtype": args.dtype, "buckets": args.buckets,
                           "max_len": args.max_len, "graphs": args.graphs and args.device.startswith("cuda"),
                           "threads": args.threads, "prompt_len": PROMPT_LEN, "warm_calls": WARM_CALLS,
                           "cache_dir": args.cache_dir or "fresh temporary directory",
                           "compile": "torch.compile(dynamic=False, fullgraph=True) per bucket (StaticRunner)"},
              "runs": runs, "summary": summarize(*runs)}
    result["table"] = table(result)
    write_json(out_path, result)
    print("\n".join(result["table"]))
    print(f"wrote {out_path}")
    return 0 if "error" not in result["summary"] else 1


if __name__ == "__main__":
    sys.exit(main())
