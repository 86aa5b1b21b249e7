"""The vLLM proposer replayed without vLLM: its defaults tuned against vLLM's step loop in minutes, not hours.

vLLM verifies every chain itself, so what a proposer changes is only how many tokens each step accepts and what the
step costs. This replays vLLM's loop against the target's known greedy continuations (computed once with HF and
cached, ``--continuations``): every step each running request's chain is compared with its continuation (accepted =
the common prefix, plus the bonus token), exactly as vLLM's greedy verifier would. The proposer's own seconds are
measured (the real draft model runs); the target's step is priced by a linear cost model, ``a + b * tokens
verified`` (defaults from ``bench.vllm_proposer_cost``'s measured steps on this CPU: 4 concurrent requests
0.52 s + 0.022 s per token; batch 1 0.45 s + 0.005 s). vLLM's ``ngram`` (prompt lookup, n 4 down to 2) is replayed
beside, in the same loop and cost model. Run from the repository root (main environment; no vllm needed)::

    python -m bench.vllm_replay --out bench/results/vllm_replay_cpu.json

Configurations (``--configs``) are proposer environments, ``name=VAR:value;VAR:value``; ``OUROBOROS_VLLM_*``
variables without the prefix. The JSON holds, per data set and batch mode, each configuration's steps, tokens
proposed and accepted, proposer seconds, estimated wall time, and the ratio to replayed ``ngram``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from bench.common import machine_info, utc_now, write_json
from bench.vllm_serving import encoded_prompts, pair_parser
from ouroboros.vllm import OuroborosProposer
from ouroboros.vllm.settings import PREFIX

__all__ = ["continuations", "ngram_chain", "replay", "main"]

MAX_LEN = 1024
# GUESS_SET 12 verifies ceil(12 / 4) = 3 pooled phrases per row at 4 concurrent requests (the rule before
# draft_mode.row_guesses); at batch 1 it verifies 12
DEFAULT_CONFIGS = ("pool=MODE:pool", "pool_uncut=MODE:pool;POOL_CONFIDENCE:0", "draft=DRAFT:{draft}",
                   "draft_3_per_row=DRAFT:{draft};GUESS_SET:12")


def continuations(target: str, datasets: list[str], n: int, new_tokens: int, path: Path) -> dict:
    """Per data set, ``n`` measured prompts (offset 0) and ``n`` warm-up prompts (offset ``n``), each with the
    target's greedy continuation (up to and with EOS, at most ``new_tokens``): read from ``path`` when it holds
    them, else computed with HF on the CPU (float32; the ``2 n`` prompts in one left-padded batch) and written
    there."""
    from transformers import AutoModelForCausalLM  # optional: only when the cache lacks a data set
    cache = json.loads(path.read_text()) if path.is_file() else {}
    model = None
    for ds in datasets:
        if ds in cache:
            continue
        model = model or AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
        eos = model.generation_config.eos_token_id
        eos = set([eos] if isinstance(eos, int) else eos)
        pad = min(eos)
        prompts = encoded_prompts(target, ds, n, 0) + encoded_prompts(target, ds, n, n)
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=pad)
        conts = [row[:next((i + 1 for i, t in enumerate(row) if t in eos), len(row))]
                 for row in out[:, width:].tolist()]
        cache[ds] = {"measure": [[p, c] for p, c in zip(prompts[:n], conts[:n])],
                     "warm": [[p, c] for p, c in zip(prompts[n:], conts[n:])]}
        write_json(path, cache, indent=None)
    return cache


def ngram_chain(history: list[int], k: int) -> list[int]:
    """vLLM ``ngram`` (prompt_lookup_min 2, max 4): after the most recent earlier occurrence of the history's last
    n tokens (n = 4 down to 2), the up to ``k`` tokens that followed it; [] when none occurs."""
    for n in range(4, 1, -1):
        if len(history) <= n:
            continue
        tail = history[-n:]
        for start in range(len(history) - n - 1, -1, -1):
            if history[start:start + n] == tail:
                return history[start + n:start + n + k]
    return []


class _Ngram:
    def __init__(self, k: int) -> None:
        self.k = k

    def propose(self, sampled, num_tokens, token_ids):
        return [ngram_chain(token_ids[i, :int(num_tokens[i])].tolist(), self.k) if len(s) else []
                for i, s in enumerate(sampled)]


def replay(proposer, requests: list[tuple[list[int], list[int]]], cost: tuple[float, float]) -> dict:
    """Serve ``requests`` (prompt, greedy continuation) together as vLLM steps them, ``proposer.propose`` called as
    vLLM calls it. Returns steps, tokens, proposed, accepted, the proposer's seconds and the estimated time (priced
    steps + proposer seconds)."""
    hist = [list(p) + c[:1] for p, c in requests]           # the prefill step sampled each first token
    done, sampled = [1] * len(requests), [c[:1] for _, c in requests]
    running = [i for i, (_, c) in enumerate(requests) if len(c) > 1]
    out = {"steps": 0, "tokens": sum(len(c) for _, c in requests), "proposed": 0, "accepted": 0,
           "proposer_seconds": 0.0, "target_seconds": 0.0}
    while running:
        ids = np.zeros((len(running), MAX_LEN), dtype=np.int64)
        for r, i in enumerate(running):
            ids[r, :len(hist[i])] = hist[i]
        start = time.perf_counter()
        chains = proposer.propose([sampled[i] for i in running], np.array([len(hist[i]) for i in running]), ids)
        out["proposer_seconds"] += time.perf_counter() - start
        verified = 0
        for i, chain in zip(running, chains):
            truth = requests[i][1][done[i]:]
            n = next((j for j, t in enumerate(chain) if j >= len(truth) or t != truth[j]), len(chain))
            new = truth[:n + 1]
            hist[i] += new
            done[i] += len(new)
            sampled[i] = new
            out["proposed"] += len(chain)
            out["accepted"] += min(n, len(new))
            verified += 1 + len(chain)
        out["steps"] += 1
        out["target_seconds"] += cost[0] + cost[1] * verified
        running = [i for i in running if done[i] < len(requests[i][1])]
    out["time"] = out["target_seconds"] + out["proposer_seconds"]
    return out


def _sum(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0) + v for k, v in b.items()}


def run_case(make, data: dict, warm: bool, batch1: bool, costs: dict) -> dict:
    """One case: batch 1 serves each measured prompt alone, 4 concurrent serves them together; a fresh proposer
    per group, first serving the warm-up prompts (together) when ``warm``."""
    groups = [[r] for r in data["measure"]] if batch1 else [data["measure"]]
    total: dict = {}
    for group in groups:
        proposer = make()
        if warm:
            replay(proposer, [tuple(r) for r in data["warm"]], costs["concurrent"])
        total = _sum(total, replay(proposer, [tuple(r) for r in group], costs["batch1" if batch1 else "concurrent"]))
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in total.items()}


def parse_configs(text: list[str], draft: str) -> dict[str, dict[str, str]]:
    """``name=VAR:value;VAR:value`` -> {name: proposer environment} (``{draft}`` in a value: the draft folder)."""
    configs = {}
    for item in text:
        name, _, spec = item.partition("=")
        env = {}
        for part in filter(None, spec.split(";")):
            var, _, value = part.partition(":")
            env[PREFIX + var] = value.format(draft=draft)
        configs[name] = env
    return configs


def parse_args(argv=None):
    p = pair_parser(__doc__.splitlines()[0], 128)
    p.add_argument("--configs", nargs="*", default=list(DEFAULT_CONFIGS))
    p.add_argument("--cases", default="cold/concurrent,warm/concurrent,cold/batch1",
                   help="comma-separated cold|warm / batch1|concurrent")
    p.add_argument("--cost-concurrent", type=float, nargs=2, default=(0.52, 0.022), metavar=("A", "B"))
    p.add_argument("--cost-batch1", type=float, nargs=2, default=(0.45, 0.005), metavar=("A", "B"))
    p.add_argument("--continuations", default="bench/results/vllm_replay_continuations.json")
    p.add_argument("--out", default="bench/results/vllm_replay_cpu.json")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    datasets = args.datasets.split(",")
    data = continuations(args.target, datasets, args.n_prompts, args.max_new_tokens, Path(args.continuations))
    costs = {"concurrent": tuple(args.cost_concurrent), "batch1": tuple(args.cost_batch1)}
    configs = parse_configs(args.configs, args.draft)
    vllm_config = SimpleNamespace(speculative_config=SimpleNamespace(num_speculative_tokens=args.k),
                                  model_config=SimpleNamespace(max_model_len=MAX_LEN, get_vocab_size=lambda: 151936))
    rows = []
    for ds in datasets:
        for case in args.cases.split(","):
            warm, batch = case.split("/")
            base = run_case(lambda: _Ngram(args.k), data[ds], warm == "warm", batch == "batch1", costs)
            row = {"dataset": ds, "case": case, "ngram": base}
            for name, env in configs.items():
                if warm == "warm" and "DRAFT" in "".join(env):
                    continue                                  # draft mode has no pool file to warm: not a case
                r = run_case(lambda: OuroborosProposer(vllm_config, env=env), data[ds], warm == "warm",
                             batch == "batch1", costs)
                r["vs_ngram"] = round(base["time"] / r["time"], 3)
                row[name] = r
            rows.append(row)
            print(json.dumps({k: (v["vs_ngram"] if isinstance(v, dict) and "vs_ngram" in v else v)
                              for k, v in row.items() if k != "ngram"}), flush=True)
            write_json(args.out, {"date_utc": utc_now(), "machine": machine_info(), "settings": vars(args),
                                  "configs": configs, "rows": rows})


if __name__ == "__main__":
    main()
