"""The e2e benchmark's method names and summaries: per method, tokens/s and speedup over the run's HF baseline,
accepted tokens per target forward, forwards, and (greedy) exactness against HF greedy, from the per-prompt records.

Plain data in, plain data out (no torch at import): the report step uses the names and :func:`speedup_of` too.
"""
from __future__ import annotations

HF_METHODS = ("hf_greedy", "hf_sample", "hf_assisted", "hf_prompt_lookup")
OUR_METHODS = ("greedy", "speculative", "speculative_ds", "lookahead", "prompt_lookup", "ouroboros", "ouroboros_warm",
               "ouroboros_ds", "ouroboros_onehot")
ALL_METHODS = HF_METHODS + OUR_METHODS
# sampling-only labels: a draft told to sample (_ds) or not to (_onehot; unlabelled methods take the library default)
DRAFT_SAMPLING = {"speculative_ds": True, "ouroboros_ds": True, "ouroboros_onehot": False}
GREEDY_METHODS = tuple(m for m in ALL_METHODS if m != "hf_sample" and m not in DRAFT_SAMPLING)
SAMPLE_METHODS = ("hf_sample", "hf_assisted", "speculative", "speculative_ds", "ouroboros", "ouroboros_warm",
                  "ouroboros_onehot")
BASELINES = {"hf_greedy": "HF generate greedy", "hf_sample": "HF generate sampling"}   # speed (and greedy: exactness)
# label -> ouroboros.generate method
ENGINE_METHOD = {"ouroboros_warm": "ouroboros", "speculative_ds": "speculative", "ouroboros_ds": "ouroboros",
                 "ouroboros_onehot": "ouroboros"}
PARAM_NAMES = ("gamma", "ngram", "window", "guess_set", "topk", "scored", "model_free", "recycle")
PLD_TOKENS = 10


def resolved_params(device, params: dict, method: str | None = None) -> dict:
    """The engine's parameters for ``method`` on ``device`` with ``params`` applied (``ouroboros.core.config``)."""
    from ouroboros.core.config import resolve_config

    return resolve_config(device, method, **params).as_dict()


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



def speedup_vs_temperature(per_temperature: dict) -> dict:
    """method -> [speedup over HF at each temperature, in the order of ``per_temperature``]."""
    methods = list(next(iter(per_temperature.values()))["summary"])
    return {m: [speedup_of(run["summary"][m]) for run in per_temperature.values()] for m in methods}

