"""Batch benchmark (issue 27): HF batched greedy ``generate`` vs ours on the same batches, same run.

    python -m bench.batch_e2e --datasets humaneval,gsm8k --batch-sizes 1,2,4,8 --max-new-tokens 128
    python -m bench.batch_e2e --pair small --datasets synthetic --batch-sizes 1,2 --max-new-tokens 8   # smoke run
    python -m bench.report bench/results/batch_humaneval_gsm8k_128.json

Per dataset and B the batch is prompts 0..B-1, left-padded (HF's convention for decoder-only models). Each B runs
HF batched greedy first, then ``ouroboros.generate`` with every ``--methods`` entry (its defaults: for a batch the
draft length comes from the batch plan, :mod:`ouroboros.tuning.batch_plan`, recorded per row of the result). Per
method: new tokens (padding after EOS excluded), seconds, tokens/s, ratio to HF in the same run, rows identical to
HF's batched rows (and the first differing position where not), forwards, and the plan.
"""
from __future__ import annotations

import time
from types import SimpleNamespace

import ouroboros
import torch

from bench.batch_forward_costs import pair_parser
from bench.common import RESULTS, loadavg, machine_info, utc_now, write_json
from bench.e2e_setup import load_models, load_prompt_ids
from ouroboros.core.config import CPU_DEFAULTS
from ouroboros.tuning.batch_plan import default_batch_plan


def left_pad(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids and attention mask, left-padded."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def new_tokens(out: torch.Tensor, width: int, eos: set[int], pad: int) -> list[list[int]]:
    """Each row's new tokens up to and including its first EOS (the rest is padding)."""
    rows = []
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows


def first_diff(a: list[int], b: list[int]) -> int | None:
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def run_batch(target, draft, prompts, method: str, args, eos: set[int], pad: int) -> dict:
    """One timed generation of the batch by ``method`` ("hf_greedy" or an ouroboros method)."""
    ids, mask = left_pad(prompts, pad)
    start = time.perf_counter()
    stats = None
    with torch.inference_mode():
        if method == "hf_greedy":
            out = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=args.max_new_tokens,
                                  pad_token_id=pad, eos_token_id=sorted(eos) or None)
        else:
            out, stats = ouroboros.generate(target, draft, ids, attention_mask=mask, method=method,
                                            max_new_tokens=args.max_new_tokens, return_stats=True,
                                            eos_token_id=sorted(eos) or None)
    seconds = time.perf_counter() - start
    rows = new_tokens(out, ids.shape[1], eos, pad)
    n = sum(len(r) for r in rows)
    rec = {"method": method, "tokens": n, "seconds": round(seconds, 3), "tokens_per_s": round(n / seconds, 3),
           "_rows": rows}
    if stats is not None:
        summary = stats.summary() if len(prompts) > 1 else {"target_forwards": stats.target_forwards,
                                                              "draft_forwards": stats.draft_forwards}
        rec.update(target_forwards=summary["target_forwards"], draft_forwards=summary["draft_forwards"],
                   target_row_tokens=summary.get("target_row_tokens"), plan=summary.get("plan"))
    return rec


def run_dataset(target, draft, tok, dataset: str, args, eos: set[int], pad: int) -> list[dict]:
    """Every B and method on ``dataset``; one result row per (B, method)."""
    spec = SimpleNamespace(pair=args.pair, dataset=dataset, n_prompts=max(args.sizes), offset=0, chat="auto")
    prompts = [p[0].tolist() for p in load_prompt_ids(spec, tok)[0]]
    out = []
    for b in args.sizes:
        batch = prompts[:b]
        hf = run_batch(target, draft, batch, "hf_greedy", args, eos, pad)
        hf_rows = hf["_rows"]
        for rec in [hf] + [run_batch(target, draft, batch, m, args, eos, pad) for m in args.methods]:
            diffs = [first_diff(r, h) for r, h in zip(rec["_rows"], hf_rows)]
            rec.update(dataset=dataset, batch=b, ratio_to_hf=round(rec["tokens_per_s"] / hf["tokens_per_s"], 3),
                       identical_rows=sum(d is None for d in diffs), first_diffs=diffs)
            del rec["_rows"]
            out.append(rec)
            print(f"{dataset} B={b} {rec['method']:>12}: {rec['tokens_per_s']:.2f} tok/s  "
                  f"x{rec['ratio_to_hf']:.2f}  identical {rec['identical_rows']}/{b}", flush=True)
    return out


def table(rows: list[dict], methods: list[str]) -> list[str]:
    """Markdown lines: per dataset x B, tok/s and ratio to HF of each method, identical rows."""
    head = "| dataset | B | HF tok/s | " + " | ".join(f"{m} tok/s (x HF, identical)" for m in methods) + " |"
    lines = [head, "|" + "---|" * (3 + len(methods))]
    for key in dict.fromkeys((r["dataset"], r["batch"]) for r in rows):
        cell = {r["method"]: r for r in rows if (r["dataset"], r["batch"]) == key}
        parts = [f"{cell[m]['tokens_per_s']:.2f} (x{cell[m]['ratio_to_hf']:.2f}, {cell[m]['identical_rows']}/"
                 f"{key[1]})" for m in methods if m in cell]
        lines.append(f"| {key[0]} | {key[1]} | {cell['hf_greedy']['tokens_per_s']:.2f} | " + " | ".join(parts) + " |")
    return lines


def plans(sizes: list[int]) -> list[dict]:
    """Per B: the plan on this CPU (its measured cost table) beside the plan the cost model predicts for a CUDA
    device (the H200 step costs batched as B * T tokens: predicted, not measured)."""
    out = []
    for b in sizes:
        for device in ("cpu", "cuda"):
            plan = default_batch_plan(device, b, CPU_DEFAULTS).as_dict()
            best = max(plan["candidates"], key=lambda c: c["speedup"])
            out.append({"batch": b, "device": device, "predicted_costs": plan["costs_predicted"],
                        "speculate": plan["speculate"], "gamma": best["gamma"],
                        "predicted_speedup": plan["predicted_speedup"], "verify_ms": best["verify_ms"],
                        "draft_ms": best["draft_ms"], "greedy_ms_per_token": best["greedy_ms_per_token"]})
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = pair_parser(__doc__)
    ap.add_argument("--datasets", default="humaneval,gsm8k")
    ap.add_argument("--batch-sizes", default="1,2,4,8")
    ap.add_argument("--methods", default="speculative,ouroboros")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.methods = args.methods.split(",")
    target, draft, tok, load_s = load_models(args)
    eos = set()
    for source in (tok.eos_token_id, target.generation_config.eos_token_id):     # the tokenizer's and the model's
        eos |= {source} if isinstance(source, int) else set(source or [])
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(eos or {0})
    warm = SimpleNamespace(**{**vars(args), "max_new_tokens": 2})
    for method in ["hf_greedy"] + args.methods:          # first calls pay one-time setup: not in the timings
        run_batch(target, draft, [[pad + 1] * 4, [pad + 2] * 3], method, warm, eos, pad)
    start_load = loadavg()
    rows = []
    for dataset in args.datasets.split(","):
        rows += run_dataset(target, draft, tok, dataset, args, eos, pad)
    data = {"what": f"batch benchmark: HF batched greedy vs ouroboros.generate, {args.max_new_tokens} new tokens, "
                    "same run (ratio_to_hf)", "machine": machine_info(), "date_utc": utc_now(), "pair": args.pair,
            "dtype": args.dtype, "draft_quant": args.draft_quant, "max_new_tokens": args.max_new_tokens,
            "load_seconds": round(load_s, 1), "loadavg_start_end": [start_load, loadavg()],
            "table": table(rows, args.methods), "rows": rows, "plans": plans(args.sizes)}
    out = args.out or RESULTS / f"batch_{'_'.join(args.datasets.split(','))}_{args.max_new_tokens}.json"
    write_json(out, data)
    print("\n".join(data["table"]))
    return data


if __name__ == "__main__":
    main()
