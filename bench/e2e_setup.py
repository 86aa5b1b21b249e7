"""The e2e benchmark's plan: the pair and prompts to load, the methods and parameter points to run, the sampling
temperatures, and the deadline; parsed from the command line."""
from __future__ import annotations

import itertools
import time
from types import SimpleNamespace

import torch

from bench.e2e_summary import ALL_METHODS, GREEDY_METHODS, HF_METHODS, PARAM_NAMES, SAMPLE_METHODS


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
    from ouroboros.cli.datasets import DATASETS, encode_prompt, load_prompts

    chat = DATASETS[args.dataset].style == "chat" if args.chat == "auto" else args.chat == "yes"
    texts = load_prompts(args.dataset, args.n_prompts, offset=args.offset)
    fmt = "chat template, one user turn + generation prompt" if chat else \
        "raw completion (the prompt text itself, no chat template)"
    return [encode_prompt(tok, t, chat=chat) for t in texts], args.dataset, fmt



def parse_params(text: str | None) -> dict:
    params = {}
    for item in filter(None, (text or "").split(",")):
        k, v = item.split("=")
        if k not in PARAM_NAMES:
            raise SystemExit(f"unknown parameter {k!r}; known: {PARAM_NAMES}")
        params[k] = param_value(k, v)
    return params


def param_value(name: str, text: str) -> int | bool | float:
    """A parameter's value from the command line: ``scored`` 0/1, ``model_free`` a float, the others ints."""
    if name == "scored":
        return bool(int(text))
    return float(text) if name == "model_free" else int(text)


def parse_sweep(text: str) -> list[dict]:
    axes = []
    for part in filter(None, text.split(";")):
        k, vs = part.split("=")
        if k not in PARAM_NAMES:
            raise SystemExit(f"unknown parameter {k!r}; known: {PARAM_NAMES}")
        axes.append([(k, param_value(k, v)) for v in vs.split(",")])
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



def deadline_time(text: str | None) -> float | None:
    """``time.time()`` of the UTC clock time HH:MM today, or None."""
    if not text:
        return None
    hh, mm = (int(x) for x in text.split(":"))
    now = time.gmtime()
    return time.time() + ((hh * 60 + mm) - (now.tm_hour * 60 + now.tm_min)) * 60 - now.tm_sec

