"""ouroboros as a vLLM proposer against vLLM's own methods, on vLLM's CPU build (issue #28).

Run in the vLLM environment (``.venv-vllm``, see README "Serving with vLLM"), from the repository root::

    python -m bench.vllm_serving --n-prompts 4 --max-new-tokens 128 --out bench/results/vllm_serving_cpu.json

Every method runs in its own process (vLLM builds one ``LLM`` per process), on the same prompts, greedy: batch 1
(one request at a time, the first ``--batch1-prompts`` prompts) and ``--n-prompts`` requests at once (concurrent).
Per run: output tokens per second (wall time of ``llm.generate``), the mean acceptance length (1 + accepted / drafts,
vLLM's definition) from ``llm.get_metrics()``, and whether each output equals plain vLLM's. ``ours_pool_warm`` first
serves ``--n-prompts`` other prompts of the same data set (``--warmup-tokens`` each; the pool file written as they
finish), then measures. The JSON is rewritten after every method, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import machine_info, utc_now, write_json

PROPOSER = "ouroboros.vllm.OuroborosProposer"
METHODS = ("vllm_plain", "vllm_ngram", "vllm_draft", "ours_pool", "ours_pool_warm", "ours_draft")
MARK = "VLLM-SERVING-RESULT "


def method_setup(method: str, k: int, draft: str, pool_file: str) -> tuple[dict | None, dict]:
    """(speculative_config, proposer environment) of ``method``."""
    ours = {"method": "custom_class", "model": PROPOSER, "num_speculative_tokens": k}
    return {
        "vllm_plain": (None, {}),
        "vllm_ngram": ({"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4,
                        "prompt_lookup_min": 2}, {}),
        "vllm_draft": ({"method": "draft_model", "model": draft, "num_speculative_tokens": k}, {}),
        "ours_pool": (ours, {"OUROBOROS_VLLM_MODE": "pool"}),
        "ours_pool_warm": (ours, {"OUROBOROS_VLLM_MODE": "pool", "OUROBOROS_VLLM_POOL": pool_file,
                                  "OUROBOROS_VLLM_POOL_SAVE_SECONDS": "0"}),
        "ours_draft": (ours, {"OUROBOROS_VLLM_DRAFT": draft}),
    }[method]


def encoded_prompts(target: str, dataset: str, n: int, offset: int) -> list[list[int]]:
    """Token ids of ``n`` prompts of ``dataset`` from ``offset``, encoded as bench.e2e does."""
    from transformers import AutoTokenizer  # optional: the vLLM environment has it
    from ouroboros.cli.datasets import encode_prompt, load_prompts  # optional: imported in the child only
    tok = AutoTokenizer.from_pretrained(target)
    return [encode_prompt(tok, t, dataset=dataset)[0].tolist() for t in load_prompts(dataset, n, offset=offset)]


def _counters(llm) -> dict:
    return {m.name: getattr(m, "value", 0) or 0 for m in llm.get_metrics() if "spec_decode" in m.name}


def timed(llm, prompts: list[list[int]], tokens: int) -> dict:
    """One ``llm.generate`` of all ``prompts`` at once: wall time, tokens, outputs, acceptance counters."""
    from vllm import SamplingParams  # optional: vllm (the vLLM environment only)
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=False)
    before = _counters(llm)
    start = time.perf_counter()
    gens = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    wall = time.perf_counter() - start
    after = _counters(llm)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    outs = [list(g.outputs[0].token_ids) for g in gens]
    return {"time": wall, "tokens": sum(map(len, outs)), "outputs": outs,
            "drafts": delta.get("vllm:spec_decode_num_drafts", 0),
            "draft_tokens": delta.get("vllm:spec_decode_num_draft_tokens", 0),
            "accepted": delta.get("vllm:spec_decode_num_accepted_tokens", 0)}


def _merge(parts: list[dict]) -> dict:
    out = {k: sum(p[k] for p in parts) for k in ("time", "tokens", "drafts", "draft_tokens", "accepted")}
    out["outputs"] = [o for p in parts for o in p["outputs"]]
    return out


def serve_one(args) -> dict:
    """The child process: one method, every data set, batch 1 then concurrent."""
    from vllm import LLM  # optional: vllm (the vLLM environment only)
    spec, _ = method_setup(args.method, args.k, args.draft, args.pool_file)
    llm = LLM(model=args.target, speculative_config=spec, max_model_len=args.max_model_len, dtype="float32",
              enforce_eager=True, max_num_seqs=max(args.n_prompts, 1), disable_log_stats=False, seed=0)
    result: dict = {"method": args.method, "runs": {}}
    for dataset in args.datasets.split(","):
        prompts = encoded_prompts(args.target, dataset, args.n_prompts, 0)
        if args.method == "ours_pool_warm":
            warm = encoded_prompts(args.target, dataset, args.n_prompts, args.n_prompts)
            result.setdefault("warmup", {})[dataset] = {k: v for k, v in timed(llm, warm, args.warmup_tokens).items()
                                                        if k != "outputs"}
        timed(llm, prompts[:1], 8)                              # warm the engine up (not counted)
        one = _merge([timed(llm, [p], args.max_new_tokens) for p in prompts[:args.batch1_prompts]])
        result["runs"][f"{dataset}/batch1"] = one
        result["runs"][f"{dataset}/concurrent{len(prompts)}"] = timed(llm, prompts, args.max_new_tokens)
    return result


def run_method(args, method: str, pool_file: str) -> dict:
    """``serve_one`` for ``method`` in a fresh process (its proposer settings in the environment)."""
    _, env = method_setup(method, args.k, args.draft, pool_file)
    cmd = [sys.executable, "-m", "bench.vllm_serving", "--serve-one", method, "--pool-file", pool_file,
           "--target", args.target, "--draft", args.draft, "--datasets", args.datasets, "--k", str(args.k),
           "--n-prompts", str(args.n_prompts), "--batch1-prompts", str(args.batch1_prompts),
           "--max-new-tokens", str(args.max_new_tokens), "--max-model-len", str(args.max_model_len),
           "--warmup-tokens", str(args.warmup_tokens)]
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE",
                                                                                         "2"), **env}
    lib = Path(sys.prefix) / "lib" / "libiomp5.so"
    if lib.is_file():
        full["LD_PRELOAD"] = str(lib)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=full, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        return {"method": method, "error": proc.stderr[-3000:], "returncode": proc.returncode}
    out = json.loads(lines[-1][len(MARK):])
    out["process_time"] = time.perf_counter() - start
    return out


def summarize(results: list[dict]) -> list[dict]:
    """One row per (method, run): tok/s, acceptance length, ratio to plain vLLM, outputs equal to plain's."""
    plain = next((r for r in results if r["method"] == "vllm_plain" and "runs" in r), None)
    rows = []
    for r in results:
        for name, run in r.get("runs", {}).items():
            base = plain["runs"][name] if plain else None
            tps = run["tokens"] / run["time"] if run["time"] else 0.0
            base_tps = base["tokens"] / base["time"] if base and base["time"] else 0.0
            rows.append({"method": r["method"], "run": name, "tokens": run["tokens"], "time": round(run["time"], 2),
                         "tok_s": round(tps, 3), "vs_plain": round(tps / base_tps, 3) if base_tps else None,
                         "acceptance_length": round(1 + run["accepted"] / run["drafts"], 3) if run["drafts"] else 1.0,
                         "draft_tokens": run["draft_tokens"], "accepted": run["accepted"],
                         "same_as_plain": (sum(a == b for a, b in zip(run["outputs"], base["outputs"]))
                                           if base else None), "outputs": len(run["outputs"])})
    return rows


def print_table(rows: list[dict]) -> None:
    print("| method | run | tok/s | vs plain vLLM | acceptance length | outputs = plain |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['run']} | {r['tok_s']:.2f} | {r['vs_plain'] or 0:.2f}x | "
              f"{r['acceptance_length']:.2f} | {r['same_as_plain']}/{r['outputs']} |")


def pair_parser(description: str, max_new_tokens: int) -> argparse.ArgumentParser:
    """The arguments every vLLM benchmark takes: the real pair's folders (default: the cached
    qwen2.5-coder-1.5b/0.5b), data sets, prompts per data set, new tokens, ``num_speculative_tokens``."""
    from ouroboros.cli.pairs import PAIRS, cache_root  # optional: resolves the default pair folders only
    pair = PAIRS["qwen2.5-coder-1.5b/0.5b"]
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--target", default=str(cache_root() / pair.target.model_id))
    p.add_argument("--draft", default=str(cache_root() / pair.draft.model_id))
    p.add_argument("--datasets", default="humaneval,gsm8k")
    p.add_argument("--n-prompts", type=int, default=4, help="prompts per data set, served at once (concurrent)")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    return p


def parse_args(argv=None):
    p = pair_parser(__doc__.splitlines()[0], 128)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--batch1-prompts", type=int, default=1, help="of those, how many also run one at a time")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--warmup-tokens", type=int, default=128, help="ours_pool_warm: new tokens per warm-up prompt")
    p.add_argument("--out", default="bench/results/vllm_serving_cpu.json")
    p.add_argument("--serve-one", dest="method", default=None, help=argparse.SUPPRESS)
    p.add_argument("--pool-file", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.method:
        print(MARK + json.dumps(serve_one(args)), flush=True)
        return
    import vllm  # optional: vllm (the vLLM environment only)
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):       # the JSON is rewritten after each method (a partial run counts)
            results.append(run_method(args, method, str(Path(tmp) / "pool.pt")))
            print(method, "done" if "runs" in results[-1] else results[-1].get("error", "")[-1500:], flush=True)
            rows = summarize(results)
            write_json(args.out, {"date_utc": utc_now(), "machine": machine_info(), "vllm": vllm.__version__,
                                  "settings": {k: v for k, v in vars(args).items() if k not in ("method", "pool_file")},
                                  "rows": rows, "results": results})
    print_table(rows)


if __name__ == "__main__":
    main()
