"""The ``generate`` and ``info`` commands: stream a continuation from models on disk; versions and kernel backends."""
from __future__ import annotations

import platform
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

import ouroboros_kernels
from ouroboros.api import stream
from ouroboros.cli.args import (
    DTYPES,
    ModelSource,
    check_device,
    check_run,
    decoding_params,
    model_source,
    sampling_kwargs,
)
from ouroboros.cli.pairs import no_progress_bars
from ouroboros.core.config import DRAFT_METHODS
from ouroboros.decoding.batch import BatchStats
from ouroboros.decoding.stats import GenerationStats
from ouroboros.hf.quantize import quantize_draft, resolve_draft_quant

__all__ = ["TextStreamer", "print_stats", "cmd_generate", "cmd_info"]


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


def _load_model(source: ModelSource, dtype: torch.dtype, device: str):
    """The model at ``source``, on ``device``, eval mode, loaded without transformers' progress bars."""
    with no_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, attn_implementation="sdpa",
                                                     **source.kwargs())
    return model.to(device).eval()


def _prompts(args) -> list[str]:
    """The prompts of ``generate``: every ``--prompt``, then the lines of ``--prompt-file``; ValueError for none, an
    empty one or an unreadable file."""
    prompts = list(args.prompt or [])
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        except OSError as err:
            raise ValueError(f"--prompt-file {args.prompt_file}: {err.strerror or err}") from None
    if not prompts or not all(prompts):
        raise ValueError("the prompt is empty: pass some text with --prompt (or a file of prompts with "
                         "--prompt-file)")
    return prompts


def _sources(args) -> tuple[ModelSource, ModelSource | None, ModelSource]:
    """(target, draft or None, tokenizer) sources of ``generate``, after the checks of its other flags."""
    args.prompts = _prompts(args)
    if args.method in DRAFT_METHODS and not args.draft:
        raise ValueError(f"--method {args.method} needs a draft model: pass --draft DIR (a smaller model with the "
                         f"target's tokenizer), or use --method greedy, lookahead or prompt_lookup")
    check_run(args, args.method, args.device)
    target = model_source(args.target, "--target")
    draft = model_source(args.draft, "--draft") if args.draft else None
    tokenizer = model_source(args.tokenizer or args.target, "--tokenizer" if args.tokenizer else "--target",
                             need="tokenizer")
    return target, draft, tokenizer


def cmd_generate(args) -> int:
    check_device(args.device)
    sampling = sampling_kwargs(args)
    target_src, draft_src, tok_src = _sources(args)
    tokenizer = AutoTokenizer.from_pretrained(tok_src.location, **tok_src.kwargs())
    dtype = DTYPES[args.dtype]
    target = _load_model(target_src, dtype, args.device)
    draft = _load_model(draft_src, dtype, args.device) if draft_src is not None else None
    if draft is not None:
        quantize_draft(draft, resolve_draft_quant(args.draft_quant, args.device, dtype))
    call = dict(max_new_tokens=args.max_new_tokens, method=args.method, **decoding_params(args), **sampling)
    if len(args.prompts) > 1:
        return _generate_batch(target, draft, tokenizer, args.prompts, call)
    ids = tokenizer(args.prompts[0], return_tensors="pt").input_ids
    stats = GenerationStats()
    streamer = TextStreamer(tokenizer, prefix=ids[0].tolist())
    streamer([])                                  # echo the prompt before the first token arrives
    for new in stream(target, draft, ids, stats=stats, **call):
        streamer(new)
    print_stats(stats)
    return 0


def _generate_batch(target, draft, tokenizer, prompts: list[str], call: dict) -> int:
    """Decode ``prompts`` as one batch; print each prompt with its continuation, then the batch's stats."""
    ids = [tokenizer(p).input_ids for p in prompts]
    stats = BatchStats()
    new: list[list[int]] = [[] for _ in prompts]
    for row, tokens in stream(target, draft, ids, stats=stats, **call):
        new[row].extend(tokens)
    for i, (prompt, tokens) in enumerate(zip(ids, new)):
        text = tokenizer.decode(prompt + tokens, skip_special_tokens=True)
        sys.stdout.write(f"=== prompt {i + 1} of {len(ids)}\n{text}\n")
    s = stats.summary()
    sys.stdout.write(f"\n[{call['method']}, batch of {len(ids)}] {s['tokens']} tokens in {s['time_total']:.2f}s = "
                     f"{s['tokens_per_second']:.2f} tok/s; target forwards {s['target_forwards']}, draft forwards "
                     f"{s['draft_forwards']} (one per step for all rows)\n")
    return 0


def cmd_info(args) -> int:
    print(f"ouroboros {ouroboros_kernels.__version__}; python {platform.python_version()}; torch {torch.__version__} "
          f"(cuda {torch.version.cuda}); transformers {transformers.__version__}")
    try:
        import triton  # optional: Triton kernels (not installed on every machine)
        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton not installed")
    print(f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    for name, why in ouroboros_kernels.backend_status().items():
        print(f"  backend {name:<10} {why}")
    return 0
