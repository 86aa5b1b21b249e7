"""The GPU layout from the cost model (issue 17 item 4), and the refit of the model's recorded inputs.

Inputs, validation against the H200 replay, the choice; the refit reads bench/results and can rewrite the package
data file the inputs ship in.

    python -m bench.cost_model                  # prints the tables, writes bench/results/cost_model.json
    python -m bench.cost_model --refit          # also re-fits the recorded inputs from bench/results/ and checks
                                                # them against the package data file (ouroboros/tuning/data)
    python -m bench.cost_model --write-data     # re-fits them and rewrites that data file (labels and goals kept)

No model runs here: the inputs are the numbers recorded in the package data of :mod:`ouroboros.tuning` (H200 run 1
step costs, the item-1 cost targets, acceptance fitted on the real-pair CPU traces and runs), so the result is
reproducible offline. The files they were fitted from are named here (:data:`H200_RUN1`, :data:`SCENARIO_FILES`),
never in the package.

Stages (all in the JSON):
- inputs: the step-cost tables and the acceptance models, and a check of the acceptance model against the traces it
  was fitted on (tokens per cycle and mean draft length at the traces' own layout, 128 tokens per prompt);
- validation: the replayed methods of bench/results/gpu_h200_run1/e2e_gpu.json (CPU HumanEval trace, forced
  acceptance, run with the OLD GPU layout's draft step on the H200). (a) the step costs alone, from each replay's
  recorded means; (b) the whole model (acceptance too) at the replayed trace's parameters;
- choice: choose_layout on the item-1 targets (the shipped GPU_DEFAULTS) and on the measured unfused costs, each
  against the old layout; then how the choice moves: per acceptance scenario, with 1 ms of bookkeeping per cycle,
  inside the measured parameter range only, and the best layout per gamma and per N.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
from dataclasses import replace
from pathlib import Path

import ouroboros.tuning as cm
from ouroboros.core.config import GPU_DEFAULTS, DecodeConfig
from ouroboros.tuning.recorded import DATA_FILE, read_data

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "cost_model.json"
DATA_PATH = ROOT / "python" / "ouroboros" / "tuning" / DATA_FILE     # the package data file, in this checkout
REPLAY_TRACE = DecodeConfig(gamma=8, ngram=4, window=0, guess_set=0, topk=1)   # the replayed trace's parameters

# The step-cost input: NVIDIA H200, torch 2.11, random bf16 weights with the real pair's configs, prompt 512
# (per cycle: tree build 0.3268 + host pool insert 0.1484 + suffix replacement 0.2581 ms).
H200_RUN1 = "bench/results/gpu_h200_run1/e2e_gpu.json"
# The acceptance inputs: real Qwen2.5-Coder-1.5B/0.5B pair on a CPU (float32 target, greedy, 128 new tokens; each
# file records its machine and parameters): traces for alpha (and suffixes), W = 0 runs for the yield.
SCENARIO_FILES = {
    "humaneval": ("bench/results/traces/humaneval_cpu_layout.json",
                  ("bench/results/e2e_humaneval_float32_10x128_int8draft.json",
                   "bench/results/e2e_humaneval_float32_10x128_int8draft_g3.json",
                   "bench/results/e2e_humaneval_float32_10x128_int8draft_topk0.json",
                   "bench/results/e2e_humaneval_float32_10x128_smallm.json",
                   "bench/results/cpu_sweep_guess_set_int8draft.json")),
    "gsm8k": ("bench/results/traces/gsm8k_cpu_layout.json",
              ("bench/results/e2e_gsm8k_float32_10x128_int8draft.json",
               "bench/results/e2e_gsm8k_float32_10x128_int8draft_topk0.json",
               "bench/results/e2e_gsm8k_float32_10x128_smallm.json")),
}


def input_files() -> list[Path]:
    """Every file the recorded inputs are fitted from (absolute)."""
    return [ROOT / H200_RUN1, *(ROOT / f for traces, runs in SCENARIO_FILES.values() for f in (traces, *runs))]


def fitted_data(base: dict | None = None) -> dict:
    """The data file's content refitted from :func:`input_files`: both step-cost tables (host and device verify),
    ``chain_decay`` (:func:`~ouroboros.tuning.fit_chain_decay` over both GSM8K trace methods' cycles, N = 4, to 4
    decimals) and every acceptance model (:func:`~ouroboros.tuning.fit_acceptance` with that chain decay). Labels,
    the item-1 goals and the order of ``base`` (default: the shipped data) are kept, so the shipped data is a fixed
    point when the fits reproduce it. FileNotFoundError when an input file is missing."""
    data = copy.deepcopy(base if base is not None else read_data())
    for name, interface in (("h200_unfused", "host"), ("h200_device", "device")):
        fitted = cm.load_step_costs(ROOT / H200_RUN1, interface=interface)
        data["step_costs"][name] = replace(fitted, label=data["step_costs"][name]["label"]).as_dict()
    gsm = ROOT / SCENARIO_FILES["gsm8k"][0]
    cycles = [c for m in ("ouroboros", "ouroboros_warm") for c in cm.load_trace_cycles(gsm, m)[0]]
    data["chain_decay"] = chain_decay = round(cm.fit_chain_decay(cycles, 4), 4)
    for dataset, methods in data["acceptance"].items():
        traces, runs = SCENARIO_FILES[dataset]
        for method, entry in methods.items():
            model = cm.fit_acceptance(ROOT / traces, method, [ROOT / r for r in runs], chain_decay=chain_decay,
                                      label=entry["label"])
            methods[method] = {k: v for k, v in model.as_dict().items() if k != "chain_decay"}
    return data


def refit(fitted: dict | None = None) -> dict:
    """Each recorded input against its refit (``fitted``, default :func:`fitted_data`): ``{name: equal}``, plus
    ``"<name> (fitted)"`` with the refitted value wherever they differ."""
    shipped = read_data()
    fitted = fitted if fitted is not None else fitted_data(shipped)
    pairs = {"H200_UNFUSED": ("step_costs", "h200_unfused"), "H200_DEVICE": ("step_costs", "h200_device"),
             "CHAIN_DECAY": ("chain_decay",),
             **{f"{d}:{m}": ("acceptance", d, m) for d, methods in shipped["acceptance"].items() for m in methods}}
    out: dict = {}
    for name, keys in pairs.items():
        old, new = shipped, fitted
        for k in keys:
            old, new = old[k], new[k]
        out[name] = old == new
        if old != new:
            out[name + " (fitted)"] = new
    return out


def write_data(path: Path = DATA_PATH) -> list[str]:
    """Rewrite the package data file at ``path`` with :func:`fitted_data`; the names of the inputs that changed."""
    fitted = fitted_data()
    changed = [name for name, same in refit(fitted).items() if same is False]
    path.write_text(json.dumps(fitted, indent=1) + "\n")
    return changed


def trace_check() -> list[dict]:
    """The acceptance models at their traces' own layout vs the traces (128 new tokens per prompt, CPU)."""
    rows = []
    for (dataset, method), model in cm.ACCEPTANCE.items():
        traces = ROOT / SCENARIO_FILES[dataset][0]
        if not traces.exists():
            rows.append({"model": model.label, "skipped": f"{traces} not found"})
            continue
        cycles, params = cm.load_trace_cycles(traces, method)
        cfg = DecodeConfig(**{k: params[k] for k in ("gamma", "ngram", "window", "guess_set", "topk", "adaptive")})
        pred = cm.predict(cfg, cm.ITEM1_TARGETS, model, new_tokens=128)
        traced = sum(int(c.get("verified", c["accepted"])) for c in cycles) / len(cycles)
        rows.append({"model": model.label, "trace_params": params,
                     "traced_tokens_per_cycle": round(traced, 3),
                     "model_tokens_per_cycle": round(pred.tokens_per_cycle, 3),
                     "traced_mean_draft_len": round(sum(int(c["draft_len"]) for c in cycles) / len(cycles), 3),
                     "model_mean_gamma": round(pred.mean_gamma, 3),
                     "error_tokens_per_cycle": round(pred.tokens_per_cycle / traced - 1, 4)})
    return rows


def validation(e2e_gpu: Path) -> dict:
    """The model against the replayed methods of an H200 e2e_gpu.json (see the module docstring)."""
    if not e2e_gpu.exists():
        return {"skipped": f"{e2e_gpu} not found"}
    data = json.loads(e2e_gpu.read_text())
    replay = next(p["replay"] for p in data["pairs"].values() if "replay" in p)["methods"]
    steps = next(p["step_costs"] for p in data["pairs"].values() if "step_costs" in p)
    unfused, book = cm.H200_UNFUSED, steps["bookkeeping"]
    old_step = steps["draft_layout"]["full_step_ms"]              # the old 241 -> 256-token draft step, measured
    host_read = unfused.target[1] - cm.H200_DEVICE.target[1]      # the host interface's cost at T=1 (target's)
    spec_step = unfused.draft[1] + host_read
    out: dict = {"source": str(e2e_gpu.relative_to(ROOT)), "trace_params": REPLAY_TRACE.as_dict(),
                 "old_layout_draft_step_ms": old_step, "speculative_draft_step_ms": round(spec_step, 4),
                 "speculative_draft_step_note": "draft T=1 forward + the host interface's T=1 overhead (measured "
                                                "on the target: upload + argmax read); its keep is contiguous",
                 "per_cycle_ms_ouroboros": unfused.per_cycle_ms,
                 "per_cycle_ms_speculative": book["host_tree_build_mask_walk"],
                 "methods": {}}
    full_costs = {   # the replay's costs as StepCosts: every draft forward in the fixed layout it ran
        "ouroboros_warm": replace(unfused, draft={1: steps["draft_layout"]["forward_ms"],
                                                  256: steps["draft_layout"]["forward_ms"]}),
        "speculative": replace(unfused, draft={1: spec_step, 256: spec_step}, per_forward_ms=0.0,
                               per_cycle_ms=book["host_tree_build_mask_walk"]),
    }
    notes = {
        "ouroboros_warm": "clean: it ran after the others on the same runners, every graph already captured",
        "speculative": "not clean: it ran first on fresh runners, so its 13 cycles hold the lazy CUDA-graph captures "
                       "(its verify split is ~17.7 ms per cycle against 6.4 ms per measured verify); the model has "
                       "no capture cost",
        "ouroboros": "not checked: it ran second and holds the device pool's setup and the 256-token draft "
                     "graph's capture (bookkeeping split 122 ms per cycle)",
    }
    for label, draft_step, per_cycle, model_key in (
            ("ouroboros_warm", old_step, unfused.per_cycle_ms, ("humaneval", "ouroboros_warm")),
            ("speculative", spec_step, book["host_tree_build_mask_walk"], ("humaneval", "ouroboros"))):
        rec = replay.get(label)
        if not rec or "tok_s" not in rec:
            out["methods"][label] = {"skipped": "not in the replay"}
            continue
        cost_only = cm.predict_replay(unfused, rec, draft_step, per_cycle)
        cfg = REPLAY_TRACE if label != "speculative" else replace(REPLAY_TRACE, topk=0)
        pred = cm.predict(cfg, full_costs[label], cm.ACCEPTANCE[model_key], new_tokens=rec["accepted_tokens"])
        out["methods"][label] = {
            "note": notes[label], "cost_only": cost_only,
            "whole_model": {"acceptance": cm.ACCEPTANCE[model_key].label,
                            "predicted_tok_s": round(pred.tokens_per_ms * 1e3, 2),
                            "predicted_tokens_per_cycle": round(pred.tokens_per_cycle, 3),
                            "replayed_tokens_per_cycle": rec["mean_accepted"],
                            "predicted_draft_forwards_per_cycle": round(pred.draft_forwards_per_cycle, 3),
                            "replayed_draft_forwards_per_cycle": rec["mean_draft_forwards"],
                            "error": round(pred.tokens_per_ms * 1e3 / rec["tok_s"] - 1, 4),
                            "note": "the model verifies a fixed tree at capacity (1 + 4 gamma + K(N-1) nodes, "
                                    "bucket 64); the replay verified each recorded tree (bucket 16)"}}
    out["methods"]["ouroboros"] = {"skipped": notes["ouroboros"]}
    return out


def old_vs_chosen(costs: cm.StepCosts, chosen: DecodeConfig) -> dict:
    """The old GPU layout against ``chosen`` under ``costs``: mean tokens/ms over the acceptance models, the ratio,
    and each model's predictions."""
    models = tuple(cm.ACCEPTANCE.values())
    old = [cm.predict(cm.OLD_GPU_LAYOUT, costs, m) for m in models]
    new = [cm.predict(chosen, costs, m) for m in models]
    mean_old = sum(p.tokens_per_ms for p in old) / len(old)
    mean_new = sum(p.tokens_per_ms for p in new) / len(new)
    return {"old_layout": cm.OLD_GPU_LAYOUT.as_dict(), "old_tokens_per_ms": round(mean_old, 5),
            "chosen_tokens_per_ms": round(mean_new, 5), "ratio": round(mean_new / mean_old, 3),
            "old_per_model": {m.label: p.as_dict() for m, p in zip(models, old)},
            "chosen_per_model": {m.label: p.as_dict() for m, p in zip(models, new)}}


def sensitivity(top: int) -> dict:
    """How the item-1 choice moves when one input changes."""
    models = tuple(cm.ACCEPTANCE.values())
    measured_range = replace(cm.GPU_SPACE, ngrams=(4, 5), chains=(1, 2, 3), topks=(0, 1))
    out: dict = {}
    for name, (costs, accept, space) in {
            "item1": (cm.ITEM1_TARGETS, models, cm.GPU_SPACE),
            "item1_per_cycle_1ms": (replace(cm.ITEM1_TARGETS, per_cycle_ms=1.0), models, cm.GPU_SPACE),
            "item1_measured_range_only (N 4-5, G 1-3, K 0-1)": (cm.ITEM1_TARGETS, models, measured_range),
            **{f"item1_{m.label}_alone": (cm.ITEM1_TARGETS, m, cm.GPU_SPACE) for m in models},
    }.items():
        cfg, rate, table = cm.choose_layout(costs, accept, space, top=top)
        out[name] = {"chosen": cfg.as_dict(), "tok_s": round(rate * 1e3, 1),
                     "draft_tokens": cm.draft_layout_tokens(cfg), "verify_nodes": cm.verify_tree_nodes(cfg)}
    _, _, every = cm.choose_layout(cm.ITEM1_TARGETS, models, cm.GPU_SPACE, top=10 ** 6)
    for key, attr in (("best_per_gamma", "gamma"), ("best_per_ngram", "ngram")):
        best: dict = {}
        for c in every:                      # best first
            best.setdefault(getattr(c.config, attr), c)
        out[key] = {str(k): {"config": c.config.as_dict(), "tok_s": round(c.tokens_per_ms * 1e3, 1)}
                    for k, c in sorted(best.items())}
    return out


def fmt(c: cm.Candidate) -> str:
    """One table row: tok/s, the layout, its draft and verify buckets, each model's tok/s."""
    cfg, p = c.config, c.predictions[0]
    return (f"{c.tokens_per_ms * 1e3:7.1f}  gamma={cfg.gamma:<2} N={cfg.ngram} W={cfg.window} G={cfg.guess_set} "
            f"K={cfg.topk}  draft {p.draft_tokens:>3} -> {p.draft_bucket:<3} verify {p.verify_nodes:>3} -> "
            f"{p.verify_bucket:<3} " + " ".join(f"{q.tokens_per_ms * 1e3:6.1f}" for q in c.predictions))


def main(argv=None) -> dict:
    """Run the stages, print the tables, write ``--out`` and return its dict (``--write-data``: refit, rewrite the
    package data file, and return what changed)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--refit", action="store_true", help="re-fit the recorded inputs from bench/results/")
    ap.add_argument("--write-data", action="store_true",
                    help="re-fit the recorded inputs and rewrite the package data file "
                         f"python/ouroboros/tuning/{DATA_FILE}, then stop")
    args = ap.parse_args(argv)
    if args.write_data:
        changed = write_data()
        print(f"wrote {DATA_PATH} ({'changed: ' + ', '.join(changed) if changed else 'no input changed'})")
        return {"wrote": str(DATA_PATH), "changed": changed}

    chosen, rate, table = cm.choose_gpu_defaults()
    unfused_cfg, unfused_rate, unfused_table = cm.choose_gpu_defaults(cm.H200_UNFUSED)
    result = {
        "what": "GPU layout from the cost model (python/ouroboros/tuning/; issue 17 item 4). Tokens/ms are "
                "model predictions (decode, 256 new tokens, mean over the acceptance models), not measurements.",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "inputs": {"step_costs": {c.label: c.as_dict() for c in (cm.ITEM1_TARGETS, cm.H200_UNFUSED, cm.H200_DEVICE)},
                   "acceptance": {m.label: m.as_dict() for m in cm.ACCEPTANCE.values()},
                   "step_costs_file": H200_RUN1, "acceptance_files": SCENARIO_FILES,
                   "chain_decay": cm.CHAIN_DECAY,
                   "space": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(cm.GPU_SPACE).items()},
                   "new_tokens": 256, "tolerance": 0.01,
                   "extrapolated": cm.__doc__.split("**What is measured and what is extrapolated**")[1].strip()},
        "acceptance_check_vs_traces": trace_check(),
        "validation_vs_h200_replay": validation(ROOT / H200_RUN1),
        "choice_item1_targets": {"chosen": chosen.as_dict(), "tokens_per_ms": round(rate, 5),
                                 "draft_tokens": cm.draft_layout_tokens(chosen),
                                 "verify_nodes": cm.verify_tree_nodes(chosen),
                                 "shipped_gpu_defaults": GPU_DEFAULTS.as_dict(),
                                 "shipped_equals_chosen": GPU_DEFAULTS == chosen,
                                 **old_vs_chosen(cm.ITEM1_TARGETS, chosen),
                                 "top": [c.as_dict() for c in table[:args.top]]},
        "choice_measured_unfused": {"chosen": unfused_cfg.as_dict(), "tokens_per_ms": round(unfused_rate, 5),
                                    **old_vs_chosen(cm.H200_UNFUSED, unfused_cfg),
                                    "top": [c.as_dict() for c in unfused_table[:args.top]]},
        "sensitivity": sensitivity(args.top),
    }
    if args.refit:
        result["refit_matches_recorded"] = refit()

    labels = " ".join(f"{m.label[:6]:>6}" for m in cm.ACCEPTANCE.values())
    print(f"models (per-model tok/s columns): {', '.join(m.label for m in cm.ACCEPTANCE.values())}")
    for title, costs, rows, cfg, got in (("item-1 targets", cm.ITEM1_TARGETS, table, chosen, rate),
                                         ("measured unfused H200", cm.H200_UNFUSED, unfused_table, unfused_cfg,
                                          unfused_rate)):
        cmp = old_vs_chosen(costs, cfg)
        print(f"\n== {title}: chosen {cfg.as_dict()}  {got * 1e3:.1f} tok/s vs old layout "
              f"{cmp['old_tokens_per_ms'] * 1e3:.1f} ({cmp['ratio']:.2f}x)")
        print(f"  tok/s   layout                         draft tokens  verify nodes  {labels}")
        for c in rows[:args.top]:
            print("  " + fmt(c))
    print("\n== validation against the H200 replay (old layout's draft step, CPU HumanEval trace)")
    for label, rec in result["validation_vs_h200_replay"].get("methods", {}).items():
        if "cost_only" in rec:
            co, wm = rec["cost_only"], rec["whole_model"]
            print(f"  {label:15} replayed {co['replayed_tok_s']:6.1f} tok/s | step costs only "
                  f"{co['predicted_tok_s']:6.1f} ({co['error']:+.1%}) | whole model {wm['predicted_tok_s']:6.1f} "
                  f"({wm['error']:+.1%})")
        else:
            print(f"  {label:15} {rec['skipped']}")
    print("\n== acceptance model vs its traces (tokens per cycle)")
    for row in result["acceptance_check_vs_traces"]:
        if "skipped" not in row:
            print(f"  {row['model']:26} traced {row['traced_tokens_per_cycle']:5.2f}  model "
                  f"{row['model_tokens_per_cycle']:5.2f} ({row['error_tokens_per_cycle']:+.1%})")
    print("\n== sensitivity (item-1 targets)")
    for name, rec in result["sensitivity"].items():
        if "chosen" in rec:
            c = rec["chosen"]
            print(f"  {name:52} gamma={c['gamma']:<2} N={c['ngram']} G={c['guess_set']} K={c['topk']} "
                  f"{rec['tok_s']:6.1f} tok/s")
    if args.refit:
        print("\n== re-fit matches the recorded inputs:", result["refit_matches_recorded"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
