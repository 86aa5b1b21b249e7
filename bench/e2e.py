"""End-to-end benchmark on a real pretrained pair and real prompts, against every baseline (issue 7).

    python -m bench.e2e --dataset humaneval --n-prompts 10 --max-new-tokens 128
    python -m bench.e2e --forward-costs                      # cost of one forward vs tree size (CPU defaults)
    python -m bench.e2e --dataset humaneval --sweep "window=2,3;guess_set=2,4" --methods ouroboros
    python -m bench.e2e --draft-quant none                   # keep the draft in float32 (default on CPU: int8)
    python -m bench.e2e --do-sample --temperature 0.7 --top-p 0.95 --seed 0     # lossless sampling, every method
    python -m bench.e2e --temperatures 0,0.3,0.7,1.0 --top-p 0.95                # speed-up against temperature
    python -m bench.e2e --pair small --n-prompts 2 --max-new-tokens 16          # the small random pair (smoke run)
    python -m bench.report bench/results/e2e_humaneval_float32_10x128_int8draft_topk0.json    # a result's table + PNG

Methods (``--methods``, comma separated; default: every greedy method, or with sampling the sampling set):
  hf_greedy        HF ``generate`` greedy (the reference for speed and for exactness)
  hf_sample        HF ``generate(do_sample=True)`` (the reference for speed when sampling)
  hf_assisted      HF assisted generation (``assistant_model=draft``; sampling too when sampling)
  hf_prompt_lookup HF prompt-lookup decoding (``prompt_lookup_num_tokens=10``)
  greedy, speculative, lookahead, prompt_lookup, ouroboros   ``ouroboros.generate(method=...)``
  speculative_ds   speculative with ``draft_sampling=True`` (the draft samples its proposals)
  ouroboros_ds     ouroboros with ``draft_sampling=True`` (the draft samples its trunk, pooled guesses included)
  ouroboros_onehot ouroboros with ``draft_sampling=False`` (one-hot proposals; sampling ``ouroboros`` takes the
                   library default: a sampling draft on a CPU)
  ouroboros_warm   ouroboros with one PhrasePool carried across all prompts (history reuse)

Sampling (``--do-sample``, or ``--temperatures`` for a sweep; temperature 0 is greedy, ``do_sample=False``): every
method gets the same settings and, per prompt, the same seed (``--seed`` + prompt index, set before each call).

Per method: tokens/s, speedup over the HF baseline (greedy or sampling) measured in the same run, accepted tokens per
target forward, target and draft forwards (counted by forward hooks on both models, for every method), and, greedy,
the fraction of prompts whose output equals HF greedy exactly. Writes ``bench/results/e2e_<dataset>_<dtype>.json``
(``..._t<T>.json`` when sampling, ``temps_<dataset>_<dtype>.json`` for a temperature sweep, ``sweep_...`` for a
parameter sweep) and the per-cycle traces of our methods to ``traces/<dataset>[_t<T>].json`` beside it
(``--traces-out``; read by the GPU replay benchmark, ``bench.e2e_gpu``), then prints the table and draws the PNG
beside the JSON through the report step (``bench.report``).

Parts: ``bench.e2e_setup`` (pair, prompts, methods, points), ``bench.e2e_methods`` (one generation, the prompt loop),
``bench.e2e_summary`` (per-method summaries), ``bench.e2e_files`` (``--resummarize``, ``--merge``),
``bench.forward_costs`` (``--forward-costs``), ``bench.report.e2e`` (table and PNG).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from bench import forward_costs
from bench.common import RESULTS, loadavg, machine_info, utc_now, write_json
from bench.e2e_files import merge, resummarize
from bench.e2e_methods import ForwardCounter, Sampling, eos_ids, run_prompts
from bench.e2e_setup import (
    deadline_time,
    load_models,
    load_prompt_ids,
    parse_params,
    parse_sweep,
    parse_temperatures,
    plan_runs,
    resolve_methods,
)
from bench.e2e_summary import (
    GREEDY_METHODS,
    PLD_TOKENS,
    SAMPLE_METHODS,
    build_summary,
    resolved_params,
    speedup_vs_temperature,
)
from bench.report import report
from bench.report.e2e import table

HF_SETTINGS = {"greedy": "do_sample=False, explicit attention_mask",
               "sample": "do_sample=True with the run's temperature, top_p and top_k; torch's global RNG "
                         "seeded with seed + prompt index before every method's call",
               "assisted": "assistant_model=draft, the same draft object our methods use (HF default "
                           "num_assistant_tokens schedule; samples when the run samples)",
               "prompt_lookup": f"prompt_lookup_num_tokens={PLD_TOKENS}"}
TIMING = ("wall clock per generate call, summed over prompts; tokens/s = new tokens / seconds; forwards counted by "
          "forward pre-hooks on the target and draft models; prompts outer loop, methods inner loop (each prompt "
          "runs every method back to back, so background load hits all alike)")
TRACE_META = ("machine", "pair", "dtype", "dataset", "n_prompts", "max_new_tokens", "prompt_format", "date_utc",
              "sampling")
TRACE_WHAT = ("per cycle: tree_size = tokens in the target's verification tree, accepted = tokens emitted by that "
              "cycle (accepted + bonus), draft_len = draft trunk length, draft_forwards = draft-model forwards of "
              "that cycle")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", default="qwen2.5-coder-1.5b/0.5b",
                    help="a registered pair (ouroboros.cli.pairs.PAIRS), or 'small': the random pair built in code "
                         "(ouroboros.cli.smallpair) with synthetic prompts, for smoke runs")
    ap.add_argument("--dataset", default="humaneval", choices=["humaneval", "gsm8k", "mtbench", "codeedit"])
    ap.add_argument("--n-prompts", type=int, default=10)
    ap.add_argument("--offset", type=int, default=0, help="skip this many prompts of the data set")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--methods", default=None,
                    help=f"default: {','.join(GREEDY_METHODS)}; when sampling: {','.join(SAMPLE_METHODS)}")
    ap.add_argument("--params", default=None,
                    help="parameters for the ouroboros methods, e.g. window=3,ngram=5 (the baselines keep the device "
                         "defaults of ouroboros.core.config)")
    ap.add_argument("--chat", choices=["auto", "yes", "no"], default="auto",
                    help="apply the chat template (auto: HumanEval raw, GSM8K/MT-Bench chat)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--draft-quant", default="auto", choices=["auto", "none", "int8"],
                    help="quantize the draft (never the target) for every method that uses it, HF assisted "
                         "included; auto: int8 for a float32 pair on a CPU")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/e2e_<dataset>_<dtype>.json)")
    ap.add_argument("--traces-out", default=None,
                    help="traces JSON path (default traces/<dataset>[_t<T>].json in the folder of the JSON)")
    ap.add_argument("--no-traces", action="store_true")
    ap.add_argument("--device-cycle", action="store_true",
                    help="run the ouroboros methods as on a GPU: fast=True with a device pool, so whole cycles run "
                         "on the device (DeviceCycle, fixed layouts); greedy only")
    ap.add_argument("--sweep", default=None,
                    help="grid over parameters, e.g. 'window=2,4;guess_set=2,4': runs --methods per point "
                         "(HF greedy once as reference) and writes a sweep JSON")
    ap.add_argument("--points", default=None,
                    help="explicit parameter points, e.g. 'gamma=8,window=0;gamma=12,window=1' (like --sweep)")
    ap.add_argument("--deadline", default=None,
                    help="UTC time HH:MM: start no new prompt after it and write the results of the prompts done")
    ap.add_argument("--resummarize", default=None, metavar="JSON",
                    help="recompute the summary, table and PNG of an e2e JSON from its per-prompt records and exit")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="join e2e JSONs of one setting over consecutive prompt ranges (e.g. a run its deadline "
                         "stopped and a run with --offset for the rest) into --out, then resummarize")
    ap.add_argument("--forward-costs", action="store_true", help="measure one forward vs tree size and exit")
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--sizes", default="1,4,8,16,32,64")
    ap.add_argument("--reps", type=int, default=5)
    s = ap.add_argument_group("sampling (HF's names and defaults; every method gets the same settings and seeds)")
    s.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=50, help="0 turns top-k off")
    s.add_argument("--seed", type=int, default=0, help="prompt i of the data set is generated with seed + i")
    s.add_argument("--temperatures", default=None, metavar="T,T,...",
                   help="e.g. 0,0.3,0.7,1.0: run the methods at each temperature (0 = greedy) and plot the speedup "
                        "over HF against temperature (temps_<dataset>_<dtype>.json + .png)")
    return ap.parse_args(argv)




def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge:
        merge(args.merge, Path(args.out) if args.out else None)
        return 0
    if args.resummarize:
        resummarize(Path(args.resummarize))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    temperatures = parse_temperatures(args)
    target, draft, tok, load_s = load_models(args)
    with torch.inference_mode():       # page the mmapped weights in, so the first timed method does not pay for it
        for model in (target, draft):
            model(torch.arange(16)[None] + 100)
    RESULTS.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    if args.forward_costs:
        forward_costs.run(args, target, draft, tok, machine)
        return 0
    return run_benchmark(args, (target, draft, tok), load_s, machine, temperatures)


def run_benchmark(args, models, load_s: float, machine: dict, temperatures: list[float] | None) -> int:
    """Every method on every prompt, at each sampling setting; writes the JSON (and the traces) and reports it."""
    target, draft, tok = models
    prompts, dataset, prompt_format = load_prompt_ids(args, tok)
    eos = eos_ids(target, tok)
    params = parse_params(args.params)
    methods = resolve_methods(args.methods, sampling=temperatures is not None)
    points = parse_sweep(args.sweep) if args.sweep else [params]
    if args.points:
        points = [{**params, **parse_params(pt)} for pt in args.points.split(";") if pt.strip()]
        args.sweep = args.points
    counters = (ForwardCounter(target), ForwardCounter(draft))
    la_start = loadavg()
    with torch.inference_mode():       # warm-up: first calls pay one-time costs (thread pools, allocator)
        for m in (target, draft):
            m(input_ids=prompts[0][:, :16])
    labels, runs = plan_runs(methods, params, points, bool(args.sweep))
    stop_at = deadline_time(args.deadline)
    settings = [Sampling(t, args.top_p, args.top_k, args.seed) for t in temperatures] if temperatures else [None]
    meta = run_meta(args, machine, models, prompts, dataset, prompt_format, eos, params, points, settings, load_s)
    meta["sampling"] = None if temperatures is None else \
        {**asdict(settings[0]), **({"temperature": None} if args.temperatures else {})}
    meta["temperatures"] = temperatures if args.temperatures else None
    tag = f"{dataset}_{args.dtype}"
    per_temperature = {}
    for sampling in settings:
        run_tag = tag if sampling is None else f"{tag}_t{sampling.temperature:g}"
        results, done = run_prompts(prompts, labels, runs, models, args, eos, counters, sampling, stop_at, run_tag)
        exact = sampling is None or sampling.greedy
        summary = build_summary(results, labels, runs, target.device, exact)
        print(("" if sampling is None else f"temperature {sampling.temperature:g}\n") + table(summary))
        per_temperature[f"{sampling.temperature:g}" if sampling else "greedy"] = {
            "sampling": None if sampling is None else asdict(sampling), "n_prompts": done, "summary": summary,
            "table": table(summary).splitlines(), "per_method": results}
    meta["loadavg_start_end"] = [la_start, loadavg()]
    if args.temperatures:
        path = write_temperatures(args, meta, per_temperature, tag)
    else:
        path = write_run(args, meta, per_temperature, settings[0], prompts, dataset, tag)
    _, png = report(path)
    print("wrote", path, *(("and", png) if png else ()))
    return 0


def run_meta(args, machine: dict, models, prompts, dataset: str, prompt_format: str, eos: list[int], params: dict,
             points: list[dict], settings: list, load_s: float) -> dict:
    """What the JSON records about the run besides its measurements (keys in the order they always had)."""
    from ouroboros.core.config import (
        CPU_DEFAULTS,
        CPU_LOOKAHEAD_DEFAULTS,
        CPU_PROMPT_LOOKUP_DEFAULTS,
        GPU_DEFAULTS,
    )
    from ouroboros.hf.quantize import draft_quantization

    target, draft, _ = models
    return {
        "machine": machine, "pair": args.pair, "dtype": args.dtype, "dataset": dataset,
        "n_prompts": len(prompts), "offset": args.offset, "max_new_tokens": args.max_new_tokens,
        "prompt_format": prompt_format,
        "prompt_tokens": [int(p.shape[1]) for p in prompts], "eos_token_id": eos,
        "draft_quant": draft_quantization(draft), "sampling": None, "temperatures": None,
        "hf_settings": HF_SETTINGS, "ouroboros_params_override": params, "sweep": points if args.sweep else None,
        "resolved_ouroboros_params": resolved_params(target.device, params),
        "device_defaults": {"cpu": CPU_DEFAULTS.as_dict(), "cpu_lookahead": CPU_LOOKAHEAD_DEFAULTS.as_dict(),
                            "cpu_prompt_lookup": CPU_PROMPT_LOOKUP_DEFAULTS.as_dict(), "gpu": GPU_DEFAULTS.as_dict()},
        "load_seconds": round(load_s, 2), "date_utc": utc_now(), "timing": TIMING,
    }


def write_temperatures(args, meta: dict, per_temperature: dict, tag: str) -> Path:
    """A temperature sweep's JSON (``temps_<dataset>_<dtype>.json``), without traces."""
    path = Path(args.out) if args.out else RESULTS / f"temps_{tag}.json"
    for run in per_temperature.values():
        for res in run["per_method"].values():
            for r in res["per_prompt"]:
                r.pop("trace", None)
    return write_json(path, {**meta, "per_temperature": per_temperature,
                             "speedup_vs_temperature": speedup_vs_temperature(per_temperature)})


def write_run(args, meta: dict, per_temperature: dict, sampling, prompts, dataset: str, tag: str) -> Path:
    """One run's JSON (``e2e_...`` or ``sweep_...``) and, unless a sweep or ``--no-traces``, its traces file."""
    (run,) = per_temperature.values()
    results, summary = run["per_method"], run["summary"]
    meta["n_prompts"] = run["n_prompts"]
    meta["prompt_tokens"] = meta["prompt_tokens"][:run["n_prompts"]]
    suffix = "" if sampling is None else f"_t{sampling.temperature:g}"
    stem = f"{'sweep' if args.sweep else 'e2e'}_{tag}{suffix}"
    path = Path(args.out) if args.out else RESULTS / f"{stem}.json"
    if not args.sweep and not args.no_traces:
        traces = {label: {"resolved_params": res.get("resolved_params"),
                          "prompts": [{"prompt_tokens": int(p.shape[1]), "tokens": r["tokens"],
                                       "seconds": r["seconds"], "trace": r["trace"]}
                                      for p, r in zip(prompts, res["per_prompt"])]}
                  for label, res in results.items() if res["per_prompt"] and "trace" in res["per_prompt"][0]}
        tpath = Path(args.traces_out) if args.traces_out else path.parent / "traces" / f"{dataset}{suffix}.json"
        write_json(tpath, {**{k: meta[k] for k in TRACE_META}, "what": TRACE_WHAT, "methods": traces}, indent=None)
        print("wrote", tpath)
    for res in results.values():       # the traces went to their own file
        for r in res["per_prompt"]:
            r.pop("trace", None)
    return write_json(path, {**meta, "summary": summary, "table": table(summary).splitlines(),
                             "per_method": results})


if __name__ == "__main__":
    sys.exit(main())
