"""End-to-end benchmark on a real pretrained pair and real prompts, against every baseline (issue 7).

    python bench/e2e.py --dataset humaneval --n-prompts 10 --max-new-tokens 128
    python bench/e2e.py --forward-costs                      # cost of one forward vs tree size (CPU defaults)
    python bench/e2e.py --dataset humaneval --sweep "window=2,3;guess_set=2,4" --methods ouroboros
    python bench/e2e.py --draft-quant none                   # keep the draft in float32 (default on CPU: int8)

Methods (``--methods``, comma separated, default all):
  hf_greedy        HF ``generate`` greedy (the reference for speed and for exactness)
  hf_assisted      HF assisted generation (``assistant_model=draft``)
  hf_prompt_lookup HF prompt-lookup decoding (``prompt_lookup_num_tokens=10``)
  greedy, speculative, lookahead, prompt_lookup, ouroboros   ``ouroboros.generate(method=...)``
  ouroboros_warm   ouroboros with one PhrasePool carried across all prompts (history reuse)

Per method: tokens/s, speedup over HF greedy measured in the same run, accepted tokens per target forward, target and
draft forwards (counted by forward hooks on both models, for every method), and the fraction of prompts whose output
equals HF greedy exactly. Writes ``bench/results/e2e_<dataset>_<dtype>.json`` + ``.png`` and the per-cycle traces of
our methods to ``bench/results/traces_<dataset>.json`` (for the GPU replay benchmark).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

RESULTS = ROOT / "bench" / "results"
HF_METHODS = ("hf_greedy", "hf_assisted", "hf_prompt_lookup")
OUR_METHODS = ("greedy", "speculative", "lookahead", "prompt_lookup", "ouroboros", "ouroboros_warm")
ALL_METHODS = HF_METHODS + OUR_METHODS
PARAM_NAMES = ("gamma", "ngram", "window", "guess_set", "topk")
PLD_TOKENS = 10


# --------------------------------------------------------------------------------------------------- machine
def machine_info() -> dict:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    flags = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = [f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma"))]
                break
    import transformers

    info = {"cpu": cpu, "cpu_flags": flags, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cuda": torch.cuda.get_device_name(0)
            if torch.cuda.is_available() else None}
    with contextlib.suppress(Exception):
        import ouroboros
        info["ouroboros"] = ouroboros.__version__
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
        info["memory_gib"] = round(int(mem) / 2**20, 1)
    return info


def loadavg() -> list[float] | None:
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


class ForwardCounter:
    """Counts top-level forward calls of a model (works for HF generate and for our engine alike)."""

    def __init__(self, model) -> None:
        self.n = 0
        self.tokens = 0
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.n += 1
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self.tokens += ids.shape[-1]

    def take(self) -> tuple[int, int]:
        n, t = self.n, self.tokens
        self.n = self.tokens = 0
        return n, t


# --------------------------------------------------------------------------------------------------- methods
def eos_ids(target, tok) -> list[int]:
    eos = target.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    for t in (tok.eos_token_id, tok.pad_token_id):    # Qwen instruct: <|im_end|> and <|endoftext|> both end text
        if t is not None and t not in eos:
            eos.append(t)
    return eos


def hf_run(method: str, target, draft, ids, max_new: int, eos: list[int], pad: int):
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False, eos_token_id=eos,
              pad_token_id=pad, temperature=None, top_p=None, top_k=None)
    if method == "hf_assisted":
        kw["assistant_model"] = draft
    elif method == "hf_prompt_lookup":
        kw["prompt_lookup_num_tokens"] = PLD_TOKENS
    with torch.inference_mode():
        out = target.generate(ids, **kw)
    return out[0, ids.shape[1]:].tolist(), None


def our_run(method: str, target, draft, ids, max_new: int, eos: list[int], params: dict, pool=None):
    import ouroboros

    m = "ouroboros" if method == "ouroboros_warm" else method
    out, stats = ouroboros.generate(target, draft if m in ("speculative", "ouroboros") else None, ids,
                                    max_new_tokens=max_new, method=m, pool=pool, eos_token_id=eos,
                                    return_stats=True, **params)
    return out[0, ids.shape[1]:].tolist(), stats


def resolved_params(device, params: dict, method: str | None = None) -> dict:
    from ouroboros.config import resolve_config

    return resolve_config(device, method, **params).as_dict()


def run_one(method, target, draft, tok, ids, max_new, eos, params, counters, pool=None) -> dict:
    """One generation: output, wall time, forwards counted by hooks, engine stats and trace."""
    counters[0].take(), counters[1].take()
    t0 = time.perf_counter()
    if method in HF_METHODS:
        out, stats = hf_run(method, target, draft, ids, max_new, eos, tok.pad_token_id)
    else:
        out, stats = our_run(method, target, draft, ids, max_new, eos, params, pool)
    dt = time.perf_counter() - t0
    (tf, tft), (df, dft) = counters[0].take(), counters[1].take()
    rec = {"tokens": len(out), "seconds": dt, "target_forwards": tf, "target_tokens_in": tft,
           "draft_forwards": df, "draft_tokens_in": dft, "output": out}
    if stats is not None:
        rec["stats"] = stats.summary()
        rec["trace"] = stats.trace
    return rec


def build_summary(results: dict, labels: list, runs: list, device) -> dict:
    reference = [r["output"] for r in results["hf_greedy"]["per_prompt"]]
    summary = {}
    for label, (m, p) in zip(labels, runs):
        res = results[label]
        if m not in HF_METHODS:
            res["resolved_params"] = resolved_params(device, p, m)
        summary[label] = summarize(m, res, reference if m != "hf_greedy" else None)
        if m not in HF_METHODS:
            summary[label]["resolved_params"] = res["resolved_params"]
    base = summary["hf_greedy"]["tokens_per_s"]
    for s in summary.values():
        s["speedup_vs_hf_greedy"] = s["tokens_per_s"] / base if base else 0.0
    return summary


def summarize(method: str, res: dict, reference: list[list[int]] | None) -> dict:
    per = res["per_prompt"]
    tokens = sum(r["tokens"] for r in per)
    secs = sum(r["seconds"] for r in per)
    tf = sum(r["target_forwards"] for r in per)
    df = sum(r["draft_forwards"] for r in per)
    out = {"tokens": tokens, "seconds": round(secs, 3), "tokens_per_s": tokens / secs if secs else 0.0,
           "target_forwards": tf, "draft_forwards": df,
           "accepted_per_target_forward": tokens / tf if tf else None,
           "target_tokens_per_forward": sum(r["target_tokens_in"] for r in per) / tf if tf else None,
           "draft_tokens_per_forward": sum(r["draft_tokens_in"] for r in per) / df if df else None}
    if reference is not None:
        same = [r["output"] == ref for r, ref in zip(per, reference)]
        out["identical_to_hf_greedy"] = sum(same) / len(same)
        out["mismatched_prompts"] = [i for i, s in enumerate(same) if not s]
    stats = [r["stats"] for r in per if "stats" in r]
    if stats:   # our engine: its own counts (the hooks also see the prefill forward, which emits nothing here)
        out["target_forwards_incl_prefill"], out["draft_forwards_incl_prefill"] = tf, df
        out["target_forwards"] = sum(s["target_forwards"] for s in stats)
        out["draft_forwards"] = sum(s["draft_forwards"] for s in stats)
        out["accepted_per_target_forward"] = tokens / max(1, out["target_forwards"])
        for k in ("time_draft", "time_verify", "time_bookkeeping", "time_total"):
            out[k] = round(sum(s[k] for s in stats), 3)
        out["engine_target_forwards"] = sum(s["target_forwards"] for s in stats)
        out["engine_draft_forwards"] = sum(s["draft_forwards"] for s in stats)
        out["tokens_per_draft_forward"] = (sum(s["draft_tokens"] for s in stats) /
                                           max(1, sum(s["draft_forwards"] for s in stats)))
        lk = sum(s["pool_lookups"] for s in stats)
        out["pool_hit_rate"] = sum(s["pool_hits"] for s in stats) / lk if lk else None
        out["pool_size_end"] = stats[-1]["pool_size"]
        out["config"] = stats[0].get("config")
    return out


# --------------------------------------------------------------------------------------------------- output
def table(summary: dict) -> str:
    rows = [f"{'method':18s} {'tok/s':>7s} {'speedup':>8s} {'acc/fwd':>8s} {'tgt fwd':>8s} {'drf fwd':>8s} "
            f"{'==greedy':>8s}"]
    for m, s in summary.items():
        acc = s.get("accepted_per_target_forward")
        ident = s.get("identical_to_hf_greedy")
        rows.append(f"{m:18s} {s['tokens_per_s']:7.2f} {s.get('speedup_vs_hf_greedy', float('nan')):7.2f}x "
                    f"{acc if acc is not None else float('nan'):8.2f} {s['target_forwards']:8d} "
                    f"{s['draft_forwards']:8d} {'' if ident is None else f'{ident:.0%}':>8s}")
    return "\n".join(rows)


def plot(summary: dict, title: str, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install matplotlib): no PNG written")
        return
    names = list(summary)
    speed = [summary[m].get("speedup_vs_hf_greedy", 0.0) for m in names]
    colors = ["#999999" if m in HF_METHODS else "#4c72b0" if not m.startswith("ouroboros") else "#dd8452"
              for m in names]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    bars = ax.bar(names, speed, color=colors)
    for b, m in zip(bars, names):
        s = summary[m]
        acc = s.get("accepted_per_target_forward")
        ax.text(b.get_x() + b.get_width() / 2, b.get_height(),
                f"{s['tokens_per_s']:.2f} tok/s\n{acc:.2f} acc/fwd" if acc else f"{s['tokens_per_s']:.2f} tok/s",
                ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_ylabel("speedup over HF generate greedy")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, max(speed + [1.0]) * 1.25)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------- forward costs
def forward_costs(target, draft, tok, dtype_name: str, context: int, sizes: list[int], reps: int) -> dict:
    """Seconds of one forward of T new tokens (a chain, causal) after a KV cache of ``context`` tokens."""
    from transformers import DynamicCache
    from ouroboros.models import encode_prompt, load_prompts

    text = "\n".join(load_prompts("humaneval", 8))
    ids = encode_prompt(tok, text, chat=False)[:, :context]
    out = {}
    for name, model in (("target", target), ("draft", draft)):
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            model(input_ids=ids, cache=cache, use_cache=True)
            res = {}
            for T in sizes:
                new = torch.randint(100, 20000, (1, T))
                pos = torch.arange(context, context + T)[None]
                times = []
                for r in range(reps + 1):
                    t0 = time.perf_counter()
                    model(input_ids=new, cache=cache, use_cache=True, position_ids=pos)
                    times.append(time.perf_counter() - t0)
                    cache.crop(-T)
                times = sorted(times[1:])
                res[T] = {"median_s": times[len(times) // 2], "min_s": times[0]}
        base = res[sizes[0]]["median_s"]
        for T in sizes:
            res[T]["relative_to_T1"] = res[T]["median_s"] / base
        out[name] = res
        print(name, {T: round(v["median_s"] * 1000, 1) for T, v in res.items()}, "ms")
    out["draft_over_target_T1"] = out["draft"][sizes[0]]["median_s"] / out["target"][sizes[0]]["median_s"]
    return out


# --------------------------------------------------------------------------------------------------- files
def resummarize(path: Path) -> None:
    """Recompute the summary, table and PNG of an e2e JSON from its per-prompt records."""
    data = json.loads(path.read_text())
    results = data["per_method"]
    labels = list(results)
    runs = [(lab.split("[")[0], results[lab].get("params", {})) for lab in labels]
    stored = {lab: results[lab].get("resolved_params") for lab in labels}   # as resolved during the run
    summary = build_summary(results, labels, runs, "cpu")
    for lab in labels:
        results[lab]["resolved_params"] = stored[lab]
        if stored[lab] is not None:
            summary[lab]["resolved_params"] = stored[lab]
        else:
            summary[lab].pop("resolved_params", None)
    data["summary"], data["table"] = summary, table(summary).splitlines()
    path.write_text(json.dumps(data, indent=1))
    plot(summary, plot_title(data), path.with_suffix(".png"))
    print(table(summary))


def plot_title(meta: dict) -> str:
    """The PNG title of an e2e run, from its JSON metadata."""
    m = meta["machine"]
    return (f"{meta['pair']} {meta['dtype']} (draft quant {meta.get('draft_quant', 'none')}) on {m['cpu']} "
            f"({m['torch_threads']} threads), {meta['dataset']} {meta['n_prompts']} prompts x "
            f"{meta['max_new_tokens']} new tokens")


MERGE_KEYS = ("pair", "dtype", "dataset", "max_new_tokens", "prompt_format", "draft_quant", "ouroboros_params_override")


def merge(paths: list[str], out: Path | None) -> None:
    """Join runs of one setting over consecutive prompt ranges into ``out`` (default: the first path)."""
    parts = sorted((json.loads(Path(p).read_text()) for p in paths), key=lambda d: d["offset"])
    first = parts[0]
    for d in parts[1:]:
        diff = [k for k in MERGE_KEYS if d.get(k) != first.get(k)]
        if diff or list(d["per_method"]) != list(first["per_method"]):
            raise SystemExit(f"cannot merge: settings differ in {diff or ['methods']}")
    for a, b in zip(parts, parts[1:]):
        if b["offset"] != a["offset"] + a["n_prompts"]:
            raise SystemExit(f"cannot merge: prompts {a['offset']}..{a['offset'] + a['n_prompts'] - 1} are not "
                             f"followed by offset {b['offset']}")
    merged = dict(first)
    merged["n_prompts"] = sum(d["n_prompts"] for d in parts)
    merged["prompt_tokens"] = [t for d in parts for t in d["prompt_tokens"]]
    merged["merged_from"] = [{k: d[k] for k in ("offset", "n_prompts", "date_utc", "loadavg_start_end")}
                             for d in parts]
    merged["loadavg_start_end"] = [first["loadavg_start_end"][0], parts[-1]["loadavg_start_end"][1]]
    joined = ("per_prompt", "loadavg")
    merged["per_method"] = {label: {**res, **{key: [x for d in parts for x in d["per_method"][label][key]]
                                              for key in joined}}
                            for label, res in first["per_method"].items()}
    if any(label.startswith("ouroboros_warm") for label in merged["per_method"]):
        merged["note_warm_pool"] = "each part starts its warm pool empty; the pool is carried only within a part"
    path = out or Path(paths[0])
    path.write_text(json.dumps(merged, indent=1))
    resummarize(path)
    print("wrote", path)


# --------------------------------------------------------------------------------------------------- main
def parse_params(text: str | None) -> dict:
    params = {}
    for item in filter(None, (text or "").split(",")):
        k, v = item.split("=")
        if k not in PARAM_NAMES:
            raise SystemExit(f"unknown parameter {k!r}; known: {PARAM_NAMES}")
        params[k] = int(v)
    return params


def parse_sweep(text: str) -> list[dict]:
    axes = []
    for part in filter(None, text.split(";")):
        k, vs = part.split("=")
        if k not in PARAM_NAMES:
            raise SystemExit(f"unknown parameter {k!r}; known: {PARAM_NAMES}")
        axes.append([(k, int(v)) for v in vs.split(",")])
    return [dict(c) for c in itertools.product(*axes)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", default="qwen2.5-coder-1.5b/0.5b")
    ap.add_argument("--dataset", default="humaneval", choices=["humaneval", "gsm8k", "mtbench"])
    ap.add_argument("--n-prompts", type=int, default=10)
    ap.add_argument("--offset", type=int, default=0, help="skip this many prompts of the data set")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--methods", default=",".join(ALL_METHODS))
    ap.add_argument("--params", default=None,
                    help="parameters for the ouroboros methods, e.g. window=3,ngram=5 (the baselines keep the device "
                         "defaults of ouroboros.config)")
    ap.add_argument("--chat", choices=["auto", "yes", "no"], default="auto",
                    help="apply the chat template (auto: HumanEval raw, GSM8K/MT-Bench chat)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--draft-quant", default="auto", choices=["auto", "none", "int8"],
                    help="quantize the draft (never the target) for every method that uses it, HF assisted "
                         "included; auto: int8 for a float32 pair on a CPU")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/e2e_<dataset>_<dtype>.json)")
    ap.add_argument("--no-traces", action="store_true")
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
    args = ap.parse_args(argv)

    if args.merge:
        merge(args.merge, Path(args.out) if args.out else None)
        return 0
    if args.resummarize:
        resummarize(Path(args.resummarize))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    from tqdm.auto import tqdm
    from ouroboros.models import DATASETS, cache_root, encode_prompt, load_pair, load_prompts
    from ouroboros.quantize import draft_quantization

    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    target, draft, tok = load_pair(args.pair, dtype=dtype, draft_quant=args.draft_quant)
    load_s = time.perf_counter() - t0
    with torch.inference_mode():       # page the mmapped weights in, so the first timed method does not pay for it
        for model in (target, draft):
            model(torch.arange(16)[None] + 100)
    RESULTS.mkdir(parents=True, exist_ok=True)
    machine = machine_info()

    if args.forward_costs:
        sizes = [int(s) for s in args.sizes.split(",")]
        res = {"machine": machine, "dtype": args.dtype, "context_tokens": args.context, "reps": args.reps,
               "what": "median seconds of one forward of T new tokens (causal chain, DynamicCache, "
                       "default sdpa attention) after a KV cache of context_tokens",
               "loadavg": loadavg(), "costs": forward_costs(target, draft, tok, args.dtype, args.context, sizes,
                                                            args.reps)}
        path = Path(args.out) if args.out else RESULTS / "cpu_forward_costs.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        old = old if isinstance(old, dict) and "runs" in old else {"runs": {}}
        old["runs"][args.dtype] = res
        path.write_text(json.dumps(old, indent=1))
        print("wrote", path)
        return 0

    chat = DATASETS[args.dataset].style == "chat" if args.chat == "auto" else args.chat == "yes"
    texts = load_prompts(args.dataset, args.n_prompts, offset=args.offset)
    prompts = [encode_prompt(tok, t, chat=chat) for t in texts]
    eos = eos_ids(target, tok)
    params = parse_params(args.params)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad:
        raise SystemExit(f"unknown methods {bad}; known: {ALL_METHODS}")
    if "hf_greedy" not in methods:
        methods.insert(0, "hf_greedy")          # the reference for speed and exactness, always in the same run
    points = parse_sweep(args.sweep) if args.sweep else [params]
    if args.points:
        points = [{**params, **parse_params(pt)} for pt in args.points.split(";") if pt.strip()]
        args.sweep = args.points
    counters = (ForwardCounter(target), ForwardCounter(draft))
    la_start = loadavg()

    # warm-up: first calls pay one-time costs (thread pools, allocator)
    with torch.inference_mode():
        for m in (target, draft):
            m(input_ids=prompts[0][:, :16])

    # In a sweep only the ouroboros methods visit every point; the other methods run once with --params.
    runs = [(m, {}) for m in methods if m in HF_METHODS] + \
        [(m, params if m.startswith("ouroboros") else {}) for m in methods
         if m not in HF_METHODS and not (args.sweep and m.startswith("ouroboros"))] + \
        [(m, p) for p in (points if args.sweep else []) for m in methods if m.startswith("ouroboros")]
    labels = [m if not (args.sweep and m.startswith("ouroboros")) else
              f"{m}[{','.join(f'{k}={v}' for k, v in p.items())}]" for m, p in runs]
    pools = {}
    for label, (m, p) in zip(labels, runs):
        if m == "ouroboros_warm":       # one pool carried across all prompts (history reuse)
            from ouroboros import PhrasePool
            from ouroboros.config import resolve_config
            cfg = resolve_config(target.device, "ouroboros", **p)     # the same capacity as generate's own pool
            pools[label] = PhrasePool(ngram=cfg.ngram, guess_set=cfg.pool_capacity)
    # Prompts outer, methods inner: load from other processes hits every method alike.
    results = {label: {"per_prompt": [], "params": p, "loadavg": []} for label, (m, p) in zip(labels, runs)}
    bar = tqdm(total=len(runs) * len(prompts), desc=f"e2e {args.dataset}", unit="gen")
    stop_at = None
    if args.deadline:
        hh, mm = (int(x) for x in args.deadline.split(":"))
        now = time.gmtime()
        stop_at = time.time() + ((hh * 60 + mm) - (now.tm_hour * 60 + now.tm_min)) * 60 - now.tm_sec
    for i, ids in enumerate(prompts):
        if stop_at is not None and i > 0 and time.time() > stop_at:
            tqdm.write(f"deadline {args.deadline} UTC passed: stopping after {i} prompts")
            prompts = prompts[:i]
            break
        for label, (m, p) in zip(labels, runs):
            bar.set_postfix_str(f"prompt {i} {label}")
            results[label]["loadavg"].append(loadavg())
            rec = run_one(m, target, draft, tok, ids, args.max_new_tokens, eos, p, counters, pools.get(label))
            results[label]["per_prompt"].append(rec)
            bar.update(1)
        ref = results["hf_greedy"]["per_prompt"][i]
        tqdm.write(f"prompt {i}: " + ", ".join(
            f"{label} {r['per_prompt'][i]['tokens'] / r['per_prompt'][i]['seconds']:.2f} tok/s"
            f"{'' if r['per_prompt'][i]['output'] == ref['output'] else ' MISMATCH'}"
            for label, r in results.items()))
        summary = build_summary(results, labels, runs, target.device)
        partial = cache_root() / "bench" / f"partial_{args.dataset}_{args.dtype}.json"    # outside the repo
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"prompts_done": i + 1, "table": table(summary).splitlines(),
                                       "summary": summary}, indent=1))
    bar.close()
    summary = build_summary(results, labels, runs, target.device)

    from ouroboros.config import CPU_DEFAULTS, CPU_LOOKAHEAD_DEFAULTS, CPU_PROMPT_LOOKUP_DEFAULTS, GPU_DEFAULTS
    meta = {
        "machine": machine, "pair": args.pair, "dtype": args.dtype, "dataset": args.dataset,
        "n_prompts": len(prompts), "offset": args.offset, "max_new_tokens": args.max_new_tokens,
        "prompt_format": "chat template, one user turn + generation prompt" if chat else
        "raw completion (the prompt text itself, no chat template)",
        "prompt_tokens": [int(p.shape[1]) for p in prompts], "eos_token_id": eos,
        "draft_quant": draft_quantization(draft),
        "hf_settings": {"greedy": "do_sample=False, explicit attention_mask",
                        "assisted": "assistant_model=draft, the same draft object our methods use (HF default "
                                    "num_assistant_tokens schedule)",
                        "prompt_lookup": f"prompt_lookup_num_tokens={PLD_TOKENS}"},
        "ouroboros_params_override": params, "sweep": points if args.sweep else None,
        "resolved_ouroboros_params": resolved_params(target.device, params),
        "device_defaults": {"cpu": CPU_DEFAULTS.as_dict(), "cpu_lookahead": CPU_LOOKAHEAD_DEFAULTS.as_dict(),
                            "cpu_prompt_lookup": CPU_PROMPT_LOOKUP_DEFAULTS.as_dict(), "gpu": GPU_DEFAULTS.as_dict()},
        "load_seconds": round(load_s, 2), "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "timing": "wall clock per generate call, summed over prompts; tokens/s = new tokens / seconds; forwards "
                  "counted by forward pre-hooks on the target and draft models; prompts outer loop, methods inner "
                  "loop (each prompt runs every method back to back, so background load hits all alike)",
        "loadavg_start_end": [la_start, loadavg()],
    }
    print(table(summary))
    stem = f"{'sweep' if args.sweep else 'e2e'}_{args.dataset}_{args.dtype}"
    path = Path(args.out) if args.out else RESULTS / f"{stem}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not args.sweep and not args.no_traces:
        traces = {label: {"resolved_params": res.get("resolved_params"),
                          "prompts": [{"prompt_tokens": int(p.shape[1]), "tokens": r["tokens"],
                                       "seconds": r["seconds"], "trace": r["trace"]}
                                      for p, r in zip(prompts, res["per_prompt"])]}
                  for label, res in results.items() if res["per_prompt"] and "trace" in res["per_prompt"][0]}
        tpath = path.parent / f"traces_{args.dataset}.json"
        tpath.write_text(json.dumps({**{k: meta[k] for k in ("machine", "pair", "dtype", "dataset", "n_prompts",
                                                             "max_new_tokens", "prompt_format", "date_utc")},
                                     "what": "per cycle: tree_size = tokens in the target's verification tree, "
                                             "accepted = tokens emitted by that cycle (accepted + bonus), "
                                             "draft_len = draft trunk length, draft_forwards = draft-model "
                                             "forwards of that cycle",
                                     "methods": traces}))
        print("wrote", tpath)
    for res in results.values():       # the traces went to their own file
        for r in res["per_prompt"]:
            r.pop("trace", None)
    path.write_text(json.dumps({**meta, "summary": summary, "table": table(summary).splitlines(),
                                "per_method": results}, indent=1))
    plot(summary, plot_title(meta), path.with_suffix(".png"))
    print("wrote", path, "and", path.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
