"""The cost of one forward by tree size on the real pair (``python -m bench.e2e --forward-costs``): median seconds of
one forward of T new tokens (a causal chain) after a KV cache of ``--context`` tokens, target and draft. Writes
``bench/results/cpu_forward_costs.json`` (or ``--out``), one entry per dtype under "runs"."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from bench.common import RESULTS, loadavg, write_json


def forward_costs(target, draft, tok, dtype_name: str, context: int, sizes: list[int], reps: int) -> dict:
    """Seconds of one forward of T new tokens (a chain, causal) after a KV cache of ``context`` tokens."""
    from ouroboros.cli.datasets import encode_prompt, load_prompts
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



def run(args, target, draft, tok, machine: dict) -> Path:
    """Measure at ``--sizes`` and add the run to the JSON under its dtype (other dtypes' runs are kept)."""
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
    write_json(path, old)
    print("wrote", path)
    return path
