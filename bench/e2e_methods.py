"""The e2e benchmark's generation runs: one call of a method (HF's or ours) on one prompt, with forwards counted by
hooks on both models, and the loop of every method over every prompt (prompts outer, methods inner)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch

from bench.common import loadavg
from bench.e2e_summary import DRAFT_SAMPLING, ENGINE_METHOD, HF_METHODS, PLD_TOKENS, base_method, build_summary
from bench.report.e2e import table


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

def our_run(method: str, target, draft, ids, max_new: int, eos: list[int], params: dict, pool=None,
            sampling: Sampling | None = None, device_cycle: bool = False):
    """``ouroboros.generate`` with ``method``; ``device_cycle`` (``--device-cycle``): the ouroboros methods as on a GPU
    (fast=True with a device pool: whole cycles on the device)."""
    import ouroboros
    from ouroboros.core.config import DRAFT_METHODS

    m = ENGINE_METHOD.get(method, method)
    extra = sampling.generate_kwargs() if sampling is not None else {}
    if method in DRAFT_SAMPLING and extra:
        extra["draft_sampling"] = DRAFT_SAMPLING[method]
    if device_cycle and m == "ouroboros":          # the GPU path: whole cycles on the device (DeviceCycle)
        extra["fast"] = True
        if pool is None:
            extra["pool_device"] = target.device
    out, stats = ouroboros.generate(target, draft if m in DRAFT_METHODS else None, ids,
                                    max_new_tokens=max_new, method=m, pool=pool, eos_token_id=eos,
                                    return_stats=True, **params, **extra)
    return out[0, ids.shape[1]:].tolist(), stats



def run_one(method, target, draft, tok, ids, max_new, eos, params, counters, pool=None,
            sampling: Sampling | None = None, prompt_index: int = 0, device_cycle: bool = False) -> dict:
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
        out, stats = our_run(method, target, draft, ids, max_new, eos, params, pool, sampling, device_cycle)
    dt = time.perf_counter() - t0
    (tf, tft), (df, dft) = counters[0].take(), counters[1].take()
    rec = {"tokens": len(out), "seconds": dt, "target_forwards": tf, "target_tokens_in": tft,
           "draft_forwards": df, "draft_tokens_in": dft, "output": out}
    if stats is not None:
        rec["stats"] = stats.summary()
        rec["trace"] = stats.trace
    return rec



def make_pools(labels: list[str], runs: list, device, vocab: int, device_cycle: bool = False) -> dict:
    """One empty PhrasePool (GpuPhrasePool with ``--device-cycle``) per ouroboros_warm label, carried across all
    prompts (history reuse)."""
    from ouroboros import GpuPhrasePool, PhrasePool
    from ouroboros.core.config import resolve_config

    pools = {}
    for label, (m, p) in zip(labels, runs):
        if m == "ouroboros_warm":
            cfg = resolve_config(device, "ouroboros", **p)     # the same capacity as generate's own pool
            pools[label] = (GpuPhrasePool(ngram=cfg.ngram, guess_set=cfg.pool_capacity, vocab_size=vocab,
                                          device=device) if device_cycle
                            else PhrasePool(ngram=cfg.ngram, guess_set=cfg.pool_capacity, scored=cfg.scored))
    return pools


def run_prompts(prompts, labels, runs, models, args, eos, counters, sampling: Sampling | None,
                stop_at: float | None, tag: str) -> tuple[dict, int]:
    """Every (label, run) on every prompt, prompts outer and methods inner (load from other processes hits every
    method alike); returns the per-label records and how many prompts were done (a deadline may stop early)."""
    from ouroboros.cli.pairs import cache_root
    from tqdm.auto import tqdm

    target, draft, tok = models
    pools = make_pools(labels, runs, target.device, target.config.get_text_config().vocab_size, args.device_cycle)
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
                          sampling, args.offset + i, args.device_cycle)
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

