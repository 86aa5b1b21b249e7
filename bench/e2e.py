"""End-to-end benchmark on a real pretrained pair and real prompts, against every baseline (issue 7).

    python bench/e2e.py --dataset humaneval --n-prompts 10 --max-new-tokens 128
    python bench/e2e.py --forward-costs                      # cost of one forward vs tree size (CPU defaults)
    python bench/e2e.py --dataset humaneval --sweep "window=2,3;guess_set=2,4" --methods ouroboros
    python bench/e2e.py --draft-quant none                   # keep the draft in float32 (default on CPU: int8)
    python bench/e2e.py --do-sample --temperature 0.7 --top-p 0.95 --seed 0     # lossless sampling, every method
    python bench/e2e.py --temperatures 0,0.3,0.7,1.0 --top-p 0.95                # speed-up against temperature
    python bench/e2e.py --pair small --n-prompts 2 --max-new-tokens 16          # the small random pair (smoke run)

Methods (``--methods``, comma separated; default: every greedy method, or with sampling the sampling set):
  hf_greedy        HF ``generate`` greedy (the reference for speed and for exactness)
  hf_sample        HF ``generate(do_sample=True)`` (the reference for speed when sampling)
  hf_assisted      HF assisted generation (``assistant_model=draft``; sampling too when sampling)
  hf_prompt_lookup HF prompt-lookup decoding (``prompt_lookup_num_tokens=10``)
  greedy, speculative, lookahead, prompt_lookup, ouroboros   ``ouroboros.generate(method=...)``
  speculative_ds   speculative with ``draft_sampling=True`` (the draft samples its proposals)
  ouroboros_warm   ouroboros with one PhrasePool carried across all prompts (history reuse)

Sampling (``--do-sample``, or ``--temperatures`` for a sweep; temperature 0 is greedy, ``do_sample=False``): every
method gets the same settings and, per prompt, the same seed (``--seed`` + prompt index, set before each call).

Per method: tokens/s, speedup over the HF baseline (greedy or sampling) measured in the same run, accepted tokens per
target forward, target and draft forwards (counted by forward hooks on both models, for every method), and, greedy,
the fraction of prompts whose output equals HF greedy exactly. Writes ``bench/results/e2e_<dataset>_<dtype>.json``
(``..._t<T>.json`` when sampling, ``temps_<dataset>_<dtype>.json`` for a temperature sweep) + ``.png`` and the
per-cycle traces of our methods to ``bench/results/traces_<dataset>.json`` (for the GPU replay benchmark).
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
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

RESULTS = ROOT / "bench" / "results"
HF_METHODS = ("hf_greedy", "hf_sample", "hf_assisted", "hf_prompt_lookup")
OUR_METHODS = ("greedy", "speculative", "speculative_ds", "lookahead", "prompt_lookup", "ouroboros", "ouroboros_warm")
ALL_METHODS = HF_METHODS + OUR_METHODS
GREEDY_METHODS = tuple(m for m in ALL_METHODS if m not in ("hf_sample", "speculative_ds"))
SAMPLE_METHODS = ("hf_sample", "hf_assisted", "speculative", "speculative_ds", "ouroboros", "ouroboros_warm")
BASELINES = {"hf_greedy": "HF generate greedy", "hf_sample": "HF generate sampling"}   # speed (and greedy: exactness)
ENGINE_METHOD = {"ouroboros_warm": "ouroboros", "speculative_ds": "speculative"}    # label -> ouroboros.generate method
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
@dataclass(frozen=True)
class Sampling:
    """The sampling settings every method of a run shares; temperature 0 means greedy (``do_sample=False``)."""

    temperature: float
    top_p: float = 1.0
    top_k: int = 50
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generate_kwargs(self) -> dict:
        """Keywords for HF ``generate`` and ``ouroboros.generate`` alike (same names, same meaning)."""
        if self.greedy:
            return {}
        return dict(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)

    def seed_for(self, prompt_index: int) -> int:
        return self.seed + prompt_index


def eos_ids(target, tok) -> list[int]:
    eos = target.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    for t in (tok.eos_token_id, tok.pad_token_id):    # Qwen instruct: <|im_end|> and <|endoftext|> both end text
        if t is not None and t not in eos:
            eos.append(t)
    return eos


def hf_run(method: str, target, draft, ids, max_new: int, eos: list[int], pad: int,
           sampling: Sampling | None = None):
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False, eos_token_id=eos,
              pad_token_id=pad, temperature=None, top_p=None, top_k=None)
    kw.update(sampling.generate_kwargs() if sampling is not None else {})
    if method == "hf_assisted":
        kw["assistant_model"] = draft
    elif method == "hf_prompt_lookup":
        kw["prompt_lookup_num_tokens"] = PLD_TOKENS
    with torch.inference_mode():
        out = target.generate(ids, **kw)
    return out[0, ids.shape[1]:].tolist(), None


DEVICE_CYCLE = False      # --device-cycle: set once by main()


def our_run(method: str, target, draft, ids, max_new: int, eos: list[int], params: dict, pool=None,
            sampling: Sampling | None = None):
    import ouroboros
    from ouroboros.core.config import DRAFT_METHODS

    m = ENGINE_METHOD.get(method, method)
    extra = sampling.generate_kwargs() if sampling is not None else {}
    if method == "speculative_ds" and extra:
        extra["draft_sampling"] = True
    if DEVICE_CYCLE and m == "ouroboros":          # the GPU path: whole cycles on the device (DeviceCycle)
        extra["fast"] = True
        if pool is None:
            extra["pool_device"] = target.device
    out, stats = ouroboros.generate(target, draft if m in DRAFT_METHODS else None, ids,
                                    max_new_tokens=max_new, method=m, pool=pool, eos_token_id=eos,
                                    return_stats=True, **params, **extra)
    return out[0, ids.shape[1]:].tolist(), stats


def resolved_params(device, params: dict, method: str | None = None) -> dict:
    from ouroboros.core.config import resolve_config

    return resolve_config(device, method, **params).as_dict()


def run_one(method, target, draft, tok, ids, max_new, eos, params, counters, pool=None,
            sampling: Sampling | None = None, prompt_index: int = 0) -> dict:
    """One generation: output, wall time, forwards counted by hooks, engine stats and trace.

    When sampling, torch's global RNG is seeded with ``sampling.seed_for(prompt_index)`` first: every method draws
    from the same seed on the same prompt."""
    if sampling is not None:
        torch.manual_seed(sampling.seed_for(prompt_index))
    counters[0].take(), counters[1].take()
    t0 = time.perf_counter()
    if method in HF_METHODS:
        out, stats = hf_run(method, target, draft, ids, max_new, eos, tok.pad_token_id, sampling)
    else:
        out, stats = our_run(method, target, draft, ids, max_new, eos, params, pool, sampling)
    dt = time.perf_counter() - t0
    (tf, tft), (df, dft) = counters[0].take(), counters[1].take()
    rec = {"tokens": len(out), "seconds": dt, "target_forwards": tf, "target_tokens_in": tft,
           "draft_forwards": df, "draft_tokens_in": dft, "output": out}
    if stats is not None:
        rec["stats"] = stats.summary()
        rec["trace"] = stats.trace
    return rec


def base_method(labels) -> str:
    """The HF baseline among ``labels`` (hf_greedy, or hf_sample in a sampling run)."""
    found = [b for b in BASELINES if b in labels]
    if len(found) != 1:
        raise SystemExit(f"a run needs exactly one HF baseline of {list(BASELINES)}, got {found}")
    return found[0]


def speedup_of(s: dict) -> float:
    """A summary row's speedup over its run's baseline."""
    return next((v for k, v in s.items() if k.startswith("speedup_vs_")), float("nan"))


def build_summary(results: dict, labels: list, runs: list, device, exact: bool = True) -> dict:
    """Per-label summary; speedups over the run's HF baseline; with ``exact`` (greedy) also the fraction of prompts
    whose output equals the baseline's (HF greedy) exactly."""
    base = base_method(labels)
    reference = [r["output"] for r in results[base]["per_prompt"]] if exact else None
    summary = {}
    for label, (m, p) in zip(labels, runs):
        res = results[label]
        if m not in HF_METHODS:
            res["resolved_params"] = resolved_params(device, p, ENGINE_METHOD.get(m, m))
        summary[label] = summarize(m, res, reference if label != base else None)
        if m not in HF_METHODS:
            summary[label]["resolved_params"] = res["resolved_params"]
    base_tps = summary[base]["tokens_per_s"]
    for s in summary.values():
        s[f"speedup_vs_{base}"] = s["tokens_per_s"] / base_tps if base_tps else 0.0
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
        rows.append(f"{m:18s} {s['tokens_per_s']:7.2f} {speedup_of(s):7.2f}x "
                    f"{acc if acc is not None else float('nan'):8.2f} {s['target_forwards']:8d} "
                    f"{s['draft_forwards']:8d} {'' if ident is None else f'{ident:.0%}':>8s}")
    return "\n".join(rows)


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a note) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install matplotlib): no PNG written")
        return None
    return plt


def plot(summary: dict, title: str, path: Path) -> None:
    plt = _pyplot()
    if plt is None:
        return
    names = list(summary)
    speed = [speedup_of(summary[m]) for m in names]
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
    ax.set_ylabel(f"speedup over {BASELINES[base_method(names)]}")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, max(speed + [1.0]) * 1.25)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_temperatures(runs: dict, title: str, path: Path) -> None:
    """Speedup over HF's own decoding (greedy at temperature 0, sampling above) against temperature, a line per
    method; ``runs``: temperature (str) -> one run's record with its "summary"."""
    plt = _pyplot()
    if plt is None:
        return
    temps = sorted(runs, key=float)
    methods = [m for m in runs[temps[0]]["summary"] if m not in BASELINES]
    fig, ax = plt.subplots(figsize=(10, 5))
    for m in methods:
        ys = [speedup_of(runs[t]["summary"][m]) for t in temps]
        ax.plot([float(t) for t in temps], ys, marker="o", label=m,
                ls="--" if m in HF_METHODS else "-", color="#999999" if m in HF_METHODS else None)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("temperature (0 = greedy)")
    ax.set_ylabel("speedup over HF generate (same decoding)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------- forward costs
def forward_costs(target, draft, tok, dtype_name: str, context: int, sizes: list[int], reps: int) -> dict:
    """Seconds of one forward of T new tokens (a chain, causal) after a KV cache of ``context`` tokens."""
    from ouroboros.cli.pairs import encode_prompt, load_prompts
    from transformers import DynamicCache

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
def _resummarize_run(run: dict, exact: bool) -> dict:
    """Recompute one run's summary and table (in ``run``) from its per-prompt records; returns the summary."""
    results = run["per_method"]
    labels = list(results)
    runs = [(lab.split("[")[0], results[lab].get("params", {})) for lab in labels]
    stored = {lab: results[lab].get("resolved_params") for lab in labels}   # as resolved during the run
    summary = build_summary(results, labels, runs, "cpu", exact=exact)
    for lab in labels:
        results[lab]["resolved_params"] = stored[lab]
        if stored[lab] is not None:
            summary[lab]["resolved_params"] = stored[lab]
        else:
            summary[lab].pop("resolved_params", None)
    run["summary"], run["table"] = summary, table(summary).splitlines()
    return summary


def resummarize(path: Path) -> None:
    """Recompute the summary, table and PNG of an e2e JSON (a temperature sweep too) from its per-prompt records."""
    data = json.loads(path.read_text())
    if "per_temperature" in data:
        for temp, run in data["per_temperature"].items():
            _resummarize_run(run, exact=float(temp) == 0)
            print(f"temperature {temp}\n" + "\n".join(run["table"]))
        data["speedup_vs_temperature"] = speedup_vs_temperature(data["per_temperature"])
        path.write_text(json.dumps(data, indent=1))
        plot_temperatures(data["per_temperature"], plot_title(data), path.with_suffix(".png"))
        return
    sampling = data.get("sampling")
    summary = _resummarize_run(data, exact=sampling is None or sampling["temperature"] == 0)
    path.write_text(json.dumps(data, indent=1))
    plot(summary, plot_title(data), path.with_suffix(".png"))
    print(table(summary))


def speedup_vs_temperature(per_temperature: dict) -> dict:
    """method -> [speedup over HF at each temperature, in the order of ``per_temperature``]."""
    methods = list(next(iter(per_temperature.values()))["summary"])
    return {m: [speedup_of(run["summary"][m]) for run in per_temperature.values()] for m in methods}


def plot_title(meta: dict) -> str:
    """The PNG title of an e2e run, from its JSON metadata."""
    m = meta["machine"]
    title = (f"{meta['pair']} {meta['dtype']} (draft quant {meta.get('draft_quant', 'none')}) on {m['cpu']} "
             f"({m['torch_threads']} threads), {meta['dataset']} {meta['n_prompts']} prompts x "
             f"{meta['max_new_tokens']} new tokens")
    s = meta.get("sampling")
    if s:
        temps = "T " + ",".join(f"{t:g}" for t in meta["temperatures"]) if meta.get("temperatures") else \
            f"T={s['temperature']:g}"
        title += f"\nsampling {temps}, top_p={s['top_p']:g}, top_k={s['top_k']}, seed {s['seed']}+prompt index"
    return title


MERGE_KEYS = ("pair", "dtype", "dataset", "max_new_tokens", "prompt_format", "draft_quant", "ouroboros_params_override",
              "sampling")


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


def parse_temperatures(args) -> list[float] | None:
    """The temperatures of this run: None for a greedy run, one for ``--do-sample``, several for ``--temperatures``
    (each validated with ouroboros' SamplingConfig, which holds HF's rules)."""
    from ouroboros.core.sampling import SamplingConfig

    if args.temperatures:
        temps = [float(t) for t in args.temperatures.split(",") if t.strip()]
    elif args.do_sample:
        temps = [args.temperature]
    else:
        return None
    try:
        for t in temps:
            SamplingConfig(do_sample=True, temperature=t, top_p=args.top_p, top_k=args.top_k)
    except ValueError as err:
        raise SystemExit(f"bad sampling settings: {err}") from None
    return temps


def resolve_methods(text: str | None, sampling: bool) -> list[str]:
    """The methods to run, the run's HF baseline first (added when missing)."""
    default = SAMPLE_METHODS if sampling else GREEDY_METHODS
    methods = [m.strip() for m in (text or ",".join(default)).split(",") if m.strip()]
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad:
        raise SystemExit(f"unknown methods {bad}; known: {ALL_METHODS}")
    base, other = ("hf_sample", "hf_greedy") if sampling else ("hf_greedy", "hf_sample")
    if other in methods:
        kind = "greedy" if sampling else "sampling"
        raise SystemExit(f"{other} is the baseline of {kind} runs; this run's is {base}")
    if base not in methods:
        methods.insert(0, base)          # the reference for speed (and exactness), always in the same run
    return methods


def plan_runs(methods: list[str], params: dict, points: list[dict], sweep: bool) -> tuple[list[str], list]:
    """(labels, [(method, params)]): in a parameter sweep only the ouroboros methods visit every point; the other
    methods run once with --params."""
    runs = [(m, {}) for m in methods if m in HF_METHODS] + \
        [(m, params if m.startswith("ouroboros") else {}) for m in methods
         if m not in HF_METHODS and not (sweep and m.startswith("ouroboros"))] + \
        [(m, p) for p in (points if sweep else []) for m in methods if m.startswith("ouroboros")]
    labels = [m if not (sweep and m.startswith("ouroboros")) else
              f"{m}[{','.join(f'{k}={v}' for k, v in p.items())}]" for m, p in runs]
    return labels, runs


def make_pools(labels: list[str], runs: list, device, vocab: int) -> dict:
    """One empty PhrasePool (GpuPhrasePool with ``--device-cycle``) per ouroboros_warm label, carried across all
    prompts (history reuse)."""
    from ouroboros import GpuPhrasePool, PhrasePool
    from ouroboros.core.config import resolve_config

    pools = {}
    for label, (m, p) in zip(labels, runs):
        if m == "ouroboros_warm":
            cfg = resolve_config(device, "ouroboros", **p)     # the same capacity as generate's own pool
            pools[label] = (GpuPhrasePool(ngram=cfg.ngram, guess_set=cfg.pool_capacity, vocab_size=vocab,
                                          device=device) if DEVICE_CYCLE
                            else PhrasePool(ngram=cfg.ngram, guess_set=cfg.pool_capacity))
    return pools


def deadline_time(text: str | None) -> float | None:
    """``time.time()`` of the UTC clock time HH:MM today, or None."""
    if not text:
        return None
    hh, mm = (int(x) for x in text.split(":"))
    now = time.gmtime()
    return time.time() + ((hh * 60 + mm) - (now.tm_hour * 60 + now.tm_min)) * 60 - now.tm_sec


def run_prompts(prompts, labels, runs, models, args, eos, counters, sampling: Sampling | None,
                stop_at: float | None, tag: str) -> tuple[dict, int]:
    """Every (label, run) on every prompt, prompts outer and methods inner (load from other processes hits every
    method alike); returns the per-label records and how many prompts were done (a deadline may stop early)."""
    from ouroboros.cli.pairs import cache_root
    from tqdm.auto import tqdm

    target, draft, tok = models
    pools = make_pools(labels, runs, target.device, target.config.get_text_config().vocab_size)
    exact = sampling is None or sampling.greedy
    base = base_method(labels)
    results = {label: {"per_prompt": [], "params": p, "loadavg": []} for label, (m, p) in zip(labels, runs)}
    bar = tqdm(total=len(runs) * len(prompts), desc=f"e2e {tag}", unit="gen")
    done = len(prompts)
    for i, ids in enumerate(prompts):
        if stop_at is not None and i > 0 and time.time() > stop_at:
            tqdm.write(f"deadline {args.deadline} UTC passed: stopping after {i} prompts")
            done = i
            break
        for label, (m, p) in zip(labels, runs):
            bar.set_postfix_str(f"prompt {i} {label}")
            results[label]["loadavg"].append(loadavg())
            rec = run_one(m, target, draft, tok, ids, args.max_new_tokens, eos, p, counters, pools.get(label),
                          sampling, args.offset + i)
            results[label]["per_prompt"].append(rec)
            bar.update(1)
        ref = results[base]["per_prompt"][i]
        tqdm.write(f"prompt {i}: " + ", ".join(
            f"{label} {r['per_prompt'][i]['tokens'] / r['per_prompt'][i]['seconds']:.2f} tok/s"
            f"{' MISMATCH' if exact and r['per_prompt'][i]['output'] != ref['output'] else ''}"
            for label, r in results.items()))
        summary = build_summary(results, labels, runs, target.device, exact)
        partial = cache_root() / "bench" / f"partial_{tag}.json"    # outside the repo
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"prompts_done": i + 1, "table": table(summary).splitlines(),
                                       "summary": summary}, indent=1))
    bar.close()
    return results, done


def load_models(args):
    """(target, draft, tokenizer, load seconds) of ``--pair``; "small" is the random pair built in code, with a
    stand-in tokenizer (no EOS, pad 0)."""
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    if args.pair == "small":
        from ouroboros.cli.smallpair import small_pair
        from ouroboros.hf.quantize import quantize_draft, resolve_draft_quant

        target, draft = (m.to(dtype) for m in small_pair())
        quantize_draft(draft, resolve_draft_quant(args.draft_quant, "cpu", dtype))
        tok = SimpleNamespace(eos_token_id=None, pad_token_id=0)
    else:
        from ouroboros.cli.pairs import load_pair

        target, draft, tok = load_pair(args.pair, dtype=dtype, draft_quant=args.draft_quant)
    return target, draft, tok, time.perf_counter() - t0


def load_prompt_ids(args, tok) -> tuple[list[torch.Tensor], str, str]:
    """(prompts as (1, L) ids, data set name, prompt format) for ``--dataset`` (synthetic for the small pair)."""
    if args.pair == "small":
        from ouroboros.cli.smallpair import small_prompt

        prompts = [torch.tensor([small_prompt(64, seed=1 + args.offset + i)]) for i in range(args.n_prompts)]
        return prompts, "synthetic", "synthetic token ids with repetition (ouroboros.cli.smallpair.small_prompt)"
    from ouroboros.cli.pairs import DATASETS, encode_prompt, load_prompts

    chat = DATASETS[args.dataset].style == "chat" if args.chat == "auto" else args.chat == "yes"
    texts = load_prompts(args.dataset, args.n_prompts, offset=args.offset)
    fmt = "chat template, one user turn + generation prompt" if chat else \
        "raw completion (the prompt text itself, no chat template)"
    return [encode_prompt(tok, t, chat=chat) for t in texts], args.dataset, fmt


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", default="qwen2.5-coder-1.5b/0.5b",
                    help="a registered pair (ouroboros.cli.pairs.PAIRS), or 'small': the random pair built in code "
                         "(ouroboros.cli.smallpair) with synthetic prompts, for smoke runs")
    ap.add_argument("--dataset", default="humaneval", choices=["humaneval", "gsm8k", "mtbench"])
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
    from ouroboros.hf.quantize import draft_quantization

    target, draft, tok, load_s = load_models(args)
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

    prompts, dataset, prompt_format = load_prompt_ids(args, tok)
    eos = eos_ids(target, tok)
    global DEVICE_CYCLE
    DEVICE_CYCLE = args.device_cycle
    params = parse_params(args.params)
    methods = resolve_methods(args.methods, sampling=temperatures is not None)
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

    labels, runs = plan_runs(methods, params, points, bool(args.sweep))
    stop_at = deadline_time(args.deadline)
    models = (target, draft, tok)
    settings = [Sampling(t, args.top_p, args.top_k, args.seed) for t in temperatures] if temperatures else [None]

    from ouroboros.core.config import (
        CPU_DEFAULTS,
        CPU_LOOKAHEAD_DEFAULTS,
        CPU_PROMPT_LOOKUP_DEFAULTS,
        GPU_DEFAULTS,
    )
    meta = {
        "machine": machine, "pair": args.pair, "dtype": args.dtype, "dataset": dataset,
        "n_prompts": len(prompts), "offset": args.offset, "max_new_tokens": args.max_new_tokens,
        "prompt_format": prompt_format,
        "prompt_tokens": [int(p.shape[1]) for p in prompts], "eos_token_id": eos,
        "draft_quant": draft_quantization(draft),
        "sampling": None if temperatures is None else
        {**asdict(settings[0]), **({"temperature": None} if args.temperatures else {})},
        "temperatures": temperatures if args.temperatures else None,
        "hf_settings": {"greedy": "do_sample=False, explicit attention_mask",
                        "sample": "do_sample=True with the run's temperature, top_p and top_k; torch's global RNG "
                                  "seeded with seed + prompt index before every method's call",
                        "assisted": "assistant_model=draft, the same draft object our methods use (HF default "
                                    "num_assistant_tokens schedule; samples when the run samples)",
                        "prompt_lookup": f"prompt_lookup_num_tokens={PLD_TOKENS}"},
        "ouroboros_params_override": params, "sweep": points if args.sweep else None,
        "resolved_ouroboros_params": resolved_params(target.device, params),
        "device_defaults": {"cpu": CPU_DEFAULTS.as_dict(), "cpu_lookahead": CPU_LOOKAHEAD_DEFAULTS.as_dict(),
                            "cpu_prompt_lookup": CPU_PROMPT_LOOKUP_DEFAULTS.as_dict(), "gpu": GPU_DEFAULTS.as_dict()},
        "load_seconds": round(load_s, 2), "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "timing": "wall clock per generate call, summed over prompts; tokens/s = new tokens / seconds; forwards "
                  "counted by forward pre-hooks on the target and draft models; prompts outer loop, methods inner "
                  "loop (each prompt runs every method back to back, so background load hits all alike)",
    }
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
        path = Path(args.out) if args.out else RESULTS / f"temps_{tag}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        for run in per_temperature.values():
            for res in run["per_method"].values():
                for r in res["per_prompt"]:
                    r.pop("trace", None)
        path.write_text(json.dumps({**meta, "per_temperature": per_temperature,
                                    "speedup_vs_temperature": speedup_vs_temperature(per_temperature)}, indent=1))
        plot_temperatures(per_temperature, plot_title(meta), path.with_suffix(".png"))
        print("wrote", path, "and", path.with_suffix(".png"))
        return 0

    (run,) = per_temperature.values()
    results, summary = run["per_method"], run["summary"]
    meta["n_prompts"] = run["n_prompts"]
    meta["prompt_tokens"] = meta["prompt_tokens"][:run["n_prompts"]]
    suffix = "" if settings[0] is None else f"_t{settings[0].temperature:g}"
    stem = f"{'sweep' if args.sweep else 'e2e'}_{tag}{suffix}"
    path = Path(args.out) if args.out else RESULTS / f"{stem}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not args.sweep and not args.no_traces:
        traces = {label: {"resolved_params": res.get("resolved_params"),
                          "prompts": [{"prompt_tokens": int(p.shape[1]), "tokens": r["tokens"],
                                       "seconds": r["seconds"], "trace": r["trace"]}
                                      for p, r in zip(prompts, res["per_prompt"])]}
                  for label, res in results.items() if res["per_prompt"] and "trace" in res["per_prompt"][0]}
        tpath = path.parent / f"traces_{dataset}{suffix}.json"
        tpath.write_text(json.dumps({**{k: meta[k] for k in ("machine", "pair", "dtype", "dataset", "n_prompts",
                                                             "max_new_tokens", "prompt_format", "date_utc",
                                                             "sampling")},
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
