"""End-to-end GPU benchmark on the real pairs' shapes, with replayed acceptance (issue 6 item 4; SPEC §4).

    python -m bench.e2e_gpu                                  # both pairs, prompt 512, 256 new tokens, bf16, one GPU
    python -m bench.e2e_gpu --pairs qwen --traces bench/results/traces/humaneval_cpu_layout.json
    python -m bench.e2e_gpu --tiny                           # tiny configs, float32, CPU is fine (a smoke run)
    python -m bench.report bench/results/gpu_h200_run1/e2e_gpu.json    # a result's table (and PNG) on any machine

Models are random-weight models built in code from the real configs (no network, no checkpoints; only speed is
measured): pair ``qwen`` = Qwen2.5-Coder-1.5B (target) / Qwen2.5-Coder-0.5B (draft), the real pair's shapes; pair
``llama`` = Llama-2-7B (target) / TinyLlama-1.1B (draft), a scale point. Per pair, all in the same run on the same card:

columns (tokens/s of a ``--prompt-len`` random prompt + ``--new-tokens`` greedy tokens, EOS off)
  hf_eager            HF ``generate`` greedy, default attention (sdpa), DynamicCache
  hf_static_compile   HF ``generate`` greedy, ``cache_implementation="static"`` + torch.compile (``--hf-compile``:
                      "auto" = HF's own decode-step compile via ``compile_config=CompileConfig(fullgraph=True,
                      mode="reduce-overhead")``; "manual" = ``model.forward = torch.compile(model.forward,
                      mode="reduce-overhead", fullgraph=True)``; "off"); if fullgraph=True raises, one retry with
                      fullgraph=False (the first error is kept); a failure is recorded as an error, not raised
  ours_greedy         ``ouroboros.generate(method="greedy", fast=True)`` (static KV, CUDA graph per bucket)
  ours_ouroboros_live ``ouroboros.generate(method="ouroboros", fast=True, pool_device=...)`` on the random pair: a smoke
                      run of the real device-drafting path; random weights accept ~nothing, so its speed means little
  replayed_<method>   REPLAYED: every recorded cycle of the acceptance traces (``--traces``) run through the fast path
                      on these shapes (see below). Not a real generation: labelled "replayed" everywhere.
Each column's ``decode_tok_s`` excludes the prefill (HF: (t(N) - t(1)) / (N - 1); ours: time after the first token);
``e2e_tok_s`` = N / whole call. Ratios use decode rates (both are in the JSON).

step costs (CUDA events on a GPU, perf_counter on a CPU; the fast path's StaticRunner, prompt in the cache)
  target verify per bucket T in {1,16,32,64,128} (device, graph replay) and through the host interface
  (``forward_tree``: tree upload + argmax download); draft forward and full draft step (pool lookup, acceptance,
  window, pool insert, KV commit) of the ouroboros draft layout 1 + (W+G)*(N-1) tokens for ``GPU_DEFAULTS``;
  bookkeeping: KV gather, keep+rollback (host), GPU-pool lookup/insert, host-adapter pool updates, tree building.
  kernels per forward at T in {1,64}, target and draft (``kernels_per_forward``): the torch profiler on a GPU
  (``ouroboros.tuning.probes.cuda_kernels``: graph replays included where the profiler sees them, else the eager forward);
  on a CPU the proxy ``ouroboros.tuning.probes.OpCounter`` (aten ops that launch a GPU kernel; our kernels' reference
  twins count as one kernel each). Columns: ``lean`` = the floor, a gpt-fast-style CUDA-graph decoder with the same
  weights (``bench.lean_decoder``), ``none`` = our runners as they are, and the ``--glue`` modes with their ratio to
  lean; ``ms_per_forward`` by tree size for the same columns.
  ``cycle_probe``: host reads (``ouroboros.tuning.probes.HostReads``) and eager ops (OpCounter: on a GPU the ops outside the
  captured graphs) per cycle of ``generate(method="ouroboros", fast=True, pool_device=...)``, after a warm-up call.

glue (``--glue``: none | fused | compile | all; default all, --tiny: fused), on fresh static runners, last in a pair
  (the other stages run the engine's runners as they ship, "default": fused glue on CUDA)
  none     HF's own glue (``ouroboros.hf.fused_glue.revert_fused_glue``, ``StaticRunner(glue=False)``)
  fused    ``StaticRunner(glue=True)``: ``ouroboros.hf.fused_glue.apply_fused_glue`` on target and draft
  compile  ``StaticRunner(compile=True)`` (fused) with ``automatic_dynamic_shapes`` off (one static graph per tree
           size), at T in {1,64}; records each size's first-call seconds (compile + capture); skipped when the budget
           is short

live vs replay (``live_vs_replay``): the live run's own ``stats.trace`` replayed (below) on the same models and
  runners with the live run's parameters; tok/s of both over the cycles after the first, and replay/live (issue 17:
  at the same acceptance they should agree within 10%).

replay (per recorded cycle: tree_size, accepted, draft_forwards, draft_len)
  ouroboros*: the live path's own code, ``DeviceCycle.replay``: whole cycles on the device (one graph and one read
  each) with the recorded ``draft_forwards``, a trunk of ``draft_len`` and ``accepted - 1`` tokens kept (trunk first,
  then the first suffix), each recorded prompt from the prompt, after one untimed pass that captures the graphs;
  speculative: ``draft_forwards`` host tree steps of the pending token(s); then one target verify of a tree of exactly
  ``tree_size`` nodes (root + draft trunk of ``draft_len`` + branches), FORCED acceptance: the target keeps
  ``accepted - 1`` nodes down the trunk (then the first branch) regardless of its argmax (a benchmark-only path:
  ``StaticRunner.keep`` called with the recorded path instead of the tree walk), the engine's pool updates, and the
  draft-cache rollback to what the real run would have kept. tokens/s = recorded accepted tokens / replay time.
  A missing or unreadable traces file is reported and the replay skipped.

Stage order per pair (the baseline first, so a short budget never loses it; its compile state is reset after it):
build, hf_static_compile, ours_greedy, step costs, replay, ours_ouroboros_live, live_vs_replay, hf_eager, glue
(last: fusing repacks the weights, which stales CUDA graphs captured before it).
A replayed method's ``tok_s`` has no prefill in it, like the columns' ``decode_tok_s`` it is compared with;
``e2e_estimate_tok_s`` adds the static-runner prefill measured in the step costs.

Writes JSON (card, versions, settings, every number) to ``--out`` (default ``bench/results/e2e_gpu_<card>.json``,
``..._tiny.json`` with ``--tiny``) after every stage (a killed run keeps what it measured), then reports it through
``bench.report``: a PNG next to it when matplotlib is available (not with ``--no-plot``), and a short table printed
last. ``--budget-s`` skips the remaining stages (recorded as skipped) once the run has used that much time.

Parts: ``bench.e2e_gpu_models`` (configs, random-weight models), ``bench.e2e_gpu_columns`` (the columns),
``bench.e2e_gpu_steps`` and ``bench.e2e_gpu_probes`` (step costs, kernel and cycle probes, glue modes),
``bench.e2e_gpu_replay`` (replay, live vs replay), ``bench.traces`` (trace files), ``bench.report.e2e_gpu`` (table,
PNG). The default ``--traces`` are the real pair's GPU-layout traces,
``bench/results/traces/{humaneval,gsm8k}_gpu_layout.json`` (the CPU layout's HumanEval file when they are missing).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from bench.clock import Clock, free_memory  # noqa: E402
from bench.common import RESULTS, card_name, card_slug, error_record, utc_now, versions, write_json  # noqa: E402
from bench.e2e_gpu_columns import (  # noqa: E402
    cleanup_compile,
    col_hf_eager,
    col_hf_static_compile,
    col_ours,
    prefix_match,
)
from bench.e2e_gpu_models import REAL_PAIRS, SPEC_ANCHORS_H200, TINY_PAIRS, build_model, model_info  # noqa: E402
from bench.e2e_gpu_probes import GLUE_MODES, VERIFY_BUCKETS, glue_stage, merge_glue  # noqa: E402
from bench.e2e_gpu_replay import live_vs_replay, replay_stage  # noqa: E402
from bench.e2e_gpu_steps import step_costs  # noqa: E402
from bench.report import report  # noqa: E402
from bench.report.e2e_gpu import table  # noqa: E402
from bench.traces import default_traces, load_trace_files  # noqa: E402

SCHEMA = "ouroboros.e2e_gpu/1"
DEFAULT_TRACES = default_traces()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny configs, float32, few tokens (runs on a CPU)")
    ap.add_argument("--pairs", default="qwen,llama", help="comma list of: qwen, llama")
    ap.add_argument("--prompt-len", type=int, default=None, help="random prompt tokens (default 512; tiny 24)")
    ap.add_argument("--new-tokens", type=int, default=None, help="new tokens (default 256; tiny 12)")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="default bfloat16 (tiny: float32)")
    ap.add_argument("--device", default=None, help="default cuda when available (tiny: cpu unless --device)")
    ap.add_argument("--traces", default=DEFAULT_TRACES,
                    help="acceptance traces to replay (a comma list: labels get the file's data set as prefix)")
    ap.add_argument("--replay-methods", default="", help="comma list of trace labels (default: all in the file)")
    ap.add_argument("--replay-max-cycles", type=int, default=None, help="per method (default 400; tiny 12)")
    ap.add_argument("--replay-layout", choices=["gpu", "trace", "both"], default="both",
                    help="draft layout (and n-gram size) for replay: GPU_DEFAULTS, the trace's resolved params, or "
                         "both (default: GPU_DEFAULTS for every method, plus '<label>@trace_layout' for ouroboros "
                         "methods whose trace carries other params)")
    ap.add_argument("--hf-compile", choices=["auto", "manual", "off"], default="auto")
    ap.add_argument("--ours-compile", action="store_true",
                    help="our fast path with torch.compile inside the CUDA graphs (OUROBOROS_COMPILE=1); adds an "
                         "ours_greedy_nocompile column")
    ap.add_argument("--skip", default="", help="comma list of stages to skip: hf_eager, hf_static_compile, "
                                               "ours_greedy, ours_ouroboros_live, step_costs, replay, "
                                               "live_vs_replay, glue")
    ap.add_argument("--glue", choices=["none", "fused", "compile", "all"], default=None,
                    help="step costs of the glue modes besides our runners as they are ('none'): 'fused' "
                         "(ouroboros.hf.fused_glue), 'compile' (StaticRunner(compile=True), static shapes), 'all' = "
                         "both (default: all; --tiny: fused, as a CPU inductor compile takes ~45 s per shape)")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations per step cost (default 20; tiny 3)")
    ap.add_argument("--budget-s", type=float, default=450.0,
                    help="skip remaining stages after this many seconds (the whole script should fit 8 minutes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    tiny = args.tiny
    args.prompt_len = args.prompt_len or (24 if tiny else 512)
    args.new_tokens = args.new_tokens or (12 if tiny else 256)
    args.dtype = args.dtype or ("float32" if tiny else "bfloat16")
    args.iters = args.iters or (3 if tiny else 20)
    args.replay_max_cycles = args.replay_max_cycles or (12 if tiny else 400)
    args.glue = args.glue or ("fused" if tiny else "all")
    if args.device is None and not tiny and not torch.cuda.is_available():
        ap.error("no CUDA device: the real shapes (up to 7B) need a GPU; use --tiny for a CPU smoke run, or pass "
                 "--device cpu to insist")
    args.device = args.device or ("cpu" if tiny else "cuda")
    args.replay_methods = [m for m in args.replay_methods.split(",") if m]
    args.skip = {s for s in args.skip.split(",") if s}
    if args.ours_compile:
        os.environ["OUROBOROS_COMPILE"] = "1"
    args.pairs = [p for p in args.pairs.split(",") if p]
    for p in args.pairs:
        if p not in REAL_PAIRS:
            ap.error(f"unknown pair {p!r}; choose from {sorted(REAL_PAIRS)}")
    if args.new_tokens < 2 or args.prompt_len < 2:
        ap.error("--new-tokens and --prompt-len must be >= 2")
    return args



class Run:
    """The run's record and its clock: ``save`` writes the JSON (after every stage), ``stage`` runs one stage of a
    pair under the time budget and records its result, error or skip."""

    def __init__(self, args, results: dict, out_path: Path) -> None:
        self.args, self.results, self.out_path = args, results, out_path
        self.t_start = time.perf_counter()

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.perf_counter() - self.t_start, 2)
        self.results["table"] = table(self.results)
        write_json(self.out_path, self.results)

    def budget_left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t_start)

    def stage(self, name: str, key: str, fn, where: dict, need_s: float = 0.0) -> None:
        """``where[key] = fn()`` for pair ``name``, unless skipped (``--skip``, or less than ``need_s`` left)."""
        if key in self.args.skip:
            where[key] = {"skipped": "--skip"}
            return
        if self.budget_left() < need_s:
            where[key] = {"skipped": f"time budget ({self.args.budget_s:.0f} s) would be exceeded"}
            self.save()
            return
        t0 = time.perf_counter()
        errors = self.results["errors"]
        try:
            where[key] = fn()
            errors.extend(f"{name}: {key}.{path}: {msg}" for path, msg in nested_errors(where[key]))
        except Exception as err:  # noqa: BLE001 - record and go on
            where[key] = error_record(err)
            errors.append(f"{name}: {key}: {where[key]['error']}")
            free_memory()
        where[key]["stage_s"] = round(time.perf_counter() - t0, 2)
        status = where[key].get("error") or where[key].get("decode_tok_s") or "done"
        print(f"[{name}] {key}: {status} ({where[key]['stage_s']} s)", flush=True)
        self.save()


def build_pair(run: Run, name: str, pair: dict, specs: dict, dtype, device, clock: Clock):
    """(target, draft) of pair ``name``, random weights; None (the error recorded in ``pair``) when building fails."""
    t0 = time.perf_counter()
    try:
        (tname, tspec), (dname, dspec) = specs[name]["target"], specs[name]["draft"]
        target = build_model(tspec, dtype, device, run.args.seed)
        draft = build_model(dspec, dtype, device, run.args.seed + 1)
        clock.sync()
    except Exception as err:  # noqa: BLE001
        pair.update(error_record(err))
        run.results["errors"].append(f"{name}: build: {pair['error']}")
        run.save()
        target = draft = None   # noqa: F841 - free what was built before the failure
        free_memory()
        return None
    pair["build_s"] = round(time.perf_counter() - t0, 2)
    pair["models"] = {"target": model_info(tname, tspec, target), "draft": model_info(dname, dspec, draft)}
    print(f"[{name}] built {tname} + {dname} in {pair['build_s']} s", flush=True)
    return target, draft


def run_stages(run: Run, name: str, pi: int, pair: dict, models, prompt: list[int], vocab: int, clock: Clock,
               traces, trace_status: str) -> None:
    """The stages of one pair, in the order of the module docstring (the baseline first, glue last)."""
    from ouroboros.core.config import GPU_DEFAULTS

    args, (target, draft), device = run.args, models, models[0].device
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    cols, holder, tiny = pair["columns"], {}, args.tiny
    new = args.new_tokens
    run.stage(name, "hf_static_compile", lambda: col_hf_static_compile(target, ids, new, clock, args.hf_compile),
              cols, need_s=0 if tiny else 60)   # the baseline first: it must not be lost to the budget
    cleanup_compile(target)
    if args.ours_compile:       # the same path without torch.compile, for comparison (first: the compiled runner
        run.stage(name, "ours_greedy_nocompile",                       # then stays for the rest)
                  lambda: col_ours(target, None, ids, new, clock, "greedy", compile=False), cols)
    run.stage(name, "ours_greedy", lambda: col_ours(target, None, ids, new, clock, "greedy"), cols)
    run.stage(name, "step_costs", lambda: step_costs(target, draft, prompt, GPU_DEFAULTS, clock, args.iters, vocab,
                                                     new), holder)
    pair["step_costs"] = holder.get("step_costs")
    free_memory()
    if "replay" in args.skip:
        pair["replay"] = {"status": "skipped: --skip"}
    elif traces is None:
        pair["replay"] = {"status": trace_status}
    else:
        run.stage(name, "replay", lambda: replay_stage(target, draft, prompt, vocab, traces, args, clock), holder)
        pair["replay"] = holder["replay"]
        pair["replay"].setdefault("status", trace_status)
        free_memory()
    run.stage(name, "ours_ouroboros_live", lambda: col_ours(target, draft, ids, new, clock, "ouroboros",
                                                            pool_device=device), cols, need_s=0 if tiny else 20)
    live = cols.get("ours_ouroboros_live") or {}
    if "trace" in live:
        run.stage(name, "live_vs_replay", lambda: live_vs_replay(target, draft, prompt, vocab, live, clock, new),
                  holder, need_s=0 if tiny else 15)
        pair["live_vs_replay"] = holder.get("live_vs_replay")
    run.stage(name, "hf_eager", lambda: col_hf_eager(target, ids, new, clock), cols, need_s=0 if tiny else 30)
    modes = GLUE_MODES if args.glue == "all" else (args.glue,)
    if modes:           # last: fusing repacks the weights (graphs captured before it would go stale)
        reserve = 0 if tiny else 150 * (len(args.pairs) - pi - 1)    # the pairs still to run
        run.stage(name, "glue", lambda: glue_stage(target, draft, prompt, modes, clock, args.iters, vocab, new,
                                                   GPU_DEFAULTS, lambda: run.budget_left() - reserve),
                  holder, need_s=0 if tiny else 45)
        pair["glue"] = holder.get("glue")
        merge_glue(pair)


def finish_pair(pair: dict, device) -> None:
    """After a pair's stages: the live run's note, output matches against HF eager, the ratios, the peak memory."""
    live = pair["columns"].get("ours_ouroboros_live")
    if isinstance(live, dict) and "stats" in live:
        live["note"] = ("live run of the real fast ouroboros path (device drafting, GPU pool) on the RANDOM "
                        "pair: acceptance ~0, so this shows the path runs and its overhead, not its speedup")
    ref = (pair["columns"].get("hf_eager") or {}).get("output")
    for key, col in pair["columns"].items():
        out = col.get("output") if isinstance(col, dict) else None
        if out is not None and ref is not None and key != "hf_eager":
            col["prefix_match_vs_hf_eager"] = prefix_match(out, ref)
            col["exact_match_vs_hf_eager"] = out == ref
    compute_ratios(pair)
    if device.type == "cuda":
        pair["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)


def nested_errors(rec, path: str = "") -> list[tuple[str, str]]:
    """(path, message) of every ``"error"`` recorded below ``rec`` (a probe or mode that failed inside a stage)."""
    found = []
    if isinstance(rec, dict):
        for key, value in rec.items():
            if key == "error" and path:
                found.append((path, str(value)[:300]))
            elif isinstance(value, dict):
                found.extend(nested_errors(value, f"{path}.{key}" if path else key))
    return found




def compute_ratios(pair: dict) -> None:
    cols = pair.get("columns", {})

    def rate(name, key="decode_tok_s"):
        c = cols.get(name) or {}
        return c.get(key) if isinstance(c, dict) else None

    hf_c, ours = rate("hf_static_compile"), rate("ours_greedy")
    hf_e = rate("hf_eager")
    ratios = {}
    if ours and hf_c:
        ratios["ours_greedy_vs_hf_static_compile"] = round(ours / hf_c, 3)
    if ours and hf_e:
        ratios["ours_greedy_vs_hf_eager"] = round(ours / hf_e, 3)
    if hf_c and hf_e:
        ratios["hf_static_compile_vs_hf_eager"] = round(hf_c / hf_e, 3)
    steps = pair.get("step_costs") or {}
    pre = (steps.get("prefill_ms") or {})
    for label, rec in ((pair.get("replay") or {}).get("methods") or {}).items():
        if not isinstance(rec, dict) or not rec.get("tok_s"):
            continue
        if hf_c:
            rec["vs_hf_static_compile"] = round(rec["tok_s"] / hf_c, 3)
            ratios[f"replayed_{label}_vs_hf_static_compile"] = rec["vs_hf_static_compile"]
        if ours:
            rec["vs_ours_greedy"] = round(rec["tok_s"] / ours, 3)
            ratios[f"replayed_{label}_vs_ours_greedy"] = rec["vs_ours_greedy"]
        if pre.get("target") is not None and pre.get("draft") is not None:
            new = pair["settings"]["new_tokens"]
            prefill_s = (pre["target"] + (pre["draft"] if rec.get("kind") in ("ouroboros", "speculative") else 0)) / 1e3
            rec["e2e_estimate_tok_s"] = round(new / (prefill_s + new / rec["tok_s"]), 3)
            rec["e2e_estimate_note"] = "N / (static-runner prefill of target (+draft) + N / replayed tok/s)"
    pair["ratios"] = ratios



def new_results(args, device, card: str, trace_status: str) -> dict:
    """The run's record before any stage: card, versions, settings."""
    from ouroboros.core.config import GPU_DEFAULTS

    clock = Clock(device)
    return {
        "schema": SCHEMA, "what": "random-weight models with real configs; speed only (see bench/e2e_gpu.py)",
        "tiny": args.tiny, "card": card, "device": str(device), "date_utc": utc_now(), "versions": versions(),
        "settings": {"pairs": args.pairs, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                     "dtype": args.dtype, "hf_compile": args.hf_compile, "ours_compile": args.ours_compile,
                     "glue": args.glue, "iters": args.iters, "seed": args.seed,
                     "budget_s": args.budget_s, "skip": sorted(args.skip), "traces": args.traces,
                     "replay_layout": args.replay_layout, "replay_max_cycles": args.replay_max_cycles,
                     "gpu_defaults": GPU_DEFAULTS.as_dict(), "verify_buckets": list(VERIFY_BUCKETS),
                     "timing": clock.kind,
                     "prompt": "uniform random token ids (seeded), EOS disabled, greedy"},
        "traces_status": trace_status, "spec_anchors_h200": SPEC_ANCHORS_H200, "pairs": {}, "errors": [],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    clock = Clock(device)
    if device.type == "cpu" and args.tiny:
        torch.set_num_threads(1)        # tiny models are per-op overhead bound: one thread is fastest
    card = card_name() if device.type == "cuda" else "cpu"
    stem = f"e2e_gpu_{card_slug(card)}" + ("_tiny" if args.tiny else "")
    out_path = Path(args.out) if args.out else RESULTS / f"{stem}.json"
    traces, trace_status = load_trace_files(args.traces)
    print(trace_status, flush=True)
    run = Run(args, new_results(args, device, card, trace_status), out_path)
    specs = TINY_PAIRS if args.tiny else REAL_PAIRS
    # no_grad, not inference_mode, around everything: HF generate + torch.compile see ordinary tensors; the stages
    # that drive our runners directly enter inference_mode themselves (ouroboros.generate does so too)
    with torch.no_grad():
        for pi, name in enumerate(args.pairs):
            pair = {"settings": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens}, "columns": {}}
            run.results["pairs"][name] = pair
            if run.budget_left() <= 0:
                pair["skipped"] = "time budget used up"
                run.save()
                continue
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            models = build_pair(run, name, pair, specs, dtype, device, clock)
            if models is None:
                continue
            vocab = specs[name]["target"][1]["vocab_size"]
            gen = torch.Generator().manual_seed(args.seed + 17 * pi)
            prompt = torch.randint(3, vocab, (args.prompt_len,), generator=gen).tolist()
            run_stages(run, name, pi, pair, models, prompt, vocab, clock, traces, trace_status)
            finish_pair(pair, device)
            run.save()
            models = None   # noqa: F841 - drop the pair's models before the next pair
            with contextlib.suppress(Exception):
                torch._dynamo.reset()
            free_memory()
    for pair in run.results["pairs"].values():   # outputs are long; keep only their first tokens
        for col in (pair.get("columns") or {}).values():
            if isinstance(col, dict) and "output" in col:
                col["output_head"] = col.pop("output")[:16]
    run.save()
    lines, png = report(out_path, plot=not args.no_plot)
    print(f"wrote {out_path}" + (f" and {png}" if png else " (no PNG: matplotlib missing or --no-plot)"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
