"""`python -m ouroboros generate | demo | bench | info`."""
from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from .api import generate, stream
from .config import METHODS
from .engine import GenerationStats
from .quantize import draft_quantization, quantize_draft, resolve_draft_quant

__all__ = ["main"]


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _add_params(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    for name in ("gamma", "ngram", "window", "guess-set", "topk"):
        p.add_argument(f"--{name}", type=int, default=None, help="SPEC §2 parameter (default: per device)")
    p.add_argument("--fixed-gamma", action="store_true", help="keep the draft length fixed (no adaptation)")
    p.add_argument("--draft-quant", default="auto", choices=["auto", "none", "int8"],
                   help="quantize the draft (never the target); auto: int8 for a float32 draft on a CPU")


def _params(args) -> dict:
    return dict(gamma=args.gamma, ngram=args.ngram, window=args.window, guess_set=args.guess_set, topk=args.topk,
                adaptive=False if args.fixed_gamma else None)


class TextStreamer:
    """Prints the decoded text of a growing token list, only the part not printed yet."""

    def __init__(self, tokenizer, out=None) -> None:
        self.tokenizer, self.out, self.tokens, self.printed = tokenizer, out or sys.stdout, [], 0

    def __call__(self, new: list[int]) -> None:
        self.tokens.extend(new)
        if self.tokenizer is None:
            text = " ".join(map(str, self.tokens)) + " "
        else:
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


def _load_dir(path: str, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()


def cmd_generate(args) -> int:
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.target)
    target = _load_dir(args.target, _dtype(args.dtype), args.device)
    draft = _load_dir(args.draft, _dtype(args.dtype), args.device) if args.draft else None
    if draft is not None:
        quantize_draft(draft, resolve_draft_quant(args.draft_quant, args.device, _dtype(args.dtype)))
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    stats = GenerationStats()
    streamer = TextStreamer(tokenizer)
    for new in stream(target, draft, ids, max_new_tokens=args.max_new_tokens, method=args.method,
                      stats=stats, **_params(args)):
        streamer(new)
    print_stats(stats)
    return 0


DEFAULT_CODE_PROMPT = ("Write a Python function `merge_sorted(a, b)` that merges two sorted lists into one sorted "
                       "list, with a docstring and three doctest examples.")


def _demo_models(args):
    """The real pair when its extra is installed, else the small pair built in code (with a note)."""
    if not args.small:
        try:
            from .models import DEFAULT_PAIR, encode_prompt, load_pair, load_prompts
            target, draft, tokenizer = load_pair(DEFAULT_PAIR, dtype=_dtype(args.dtype), attn_implementation="sdpa",
                                                 draft_quant=args.draft_quant)
            text = args.prompt
            if text is None:
                try:
                    text = "Complete this Python function:\n```python\n" + load_prompts("humaneval", 1)[0] + "```"
                except (ImportError, OSError):
                    text = DEFAULT_CODE_PROMPT
            return target, draft, tokenizer, encode_prompt(tokenizer, text, chat=True)[0].tolist()
        except ImportError as err:
            print(f"[demo] real pair unavailable ({err}).\n[demo] To run it: pip install -e '.[models]'\n"
                  f"[demo] Falling back to the small random pair built in code.\n")
    from .smallpair import small_pair, small_prompt
    target, draft = small_pair()
    return target, draft, None, small_prompt()


def _eos_ids(target, tokenizer) -> list[int]:
    """The target's EOS ids plus the tokenizer's end-of-text tokens (chat models end turns with either)."""
    eos = target.generation_config.eos_token_id
    ids = set([eos] if isinstance(eos, int) else (eos or []))
    if tokenizer is not None:
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


def cmd_demo(args) -> int:
    target, draft, tokenizer, prompt = _demo_models(args)
    params = {**_params(args), "eos_token_id": _eos_ids(target, tokenizer)}
    print(f"[demo] target {target.config.model_type} {_n_params(target) / 1e6:.0f}M, "
          f"draft {_n_params(draft) / 1e6:.0f}M params (draft quantization: "
          f"{draft_quantization(draft)}), prompt {len(prompt)} tokens\n")
    with torch.inference_mode():      # page the weights in first, so neither timed run pays for it
        for model in (target, draft):
            model(torch.tensor([prompt[:16]], device=model.device))
    print("[ouroboros] ", end="")
    streamer = TextStreamer(tokenizer)
    ours, s_ours = generate(target, draft, [prompt], max_new_tokens=args.max_new_tokens, method="ouroboros",
                            return_stats=True, on_tokens=streamer, **params)
    print_stats(s_ours)
    print("[greedy] running the target's plain greedy decoding for comparison ...")
    ref, s_ref = generate(target, None, [prompt], max_new_tokens=args.max_new_tokens, method="greedy",
                          return_stats=True, eos_token_id=params["eos_token_id"])
    print_stats(s_ref)
    same = torch.equal(ours, ref)
    print(f"\n{'':<12}{'tok/s':>10}{'tokens/target fwd':>20}\n{'greedy':<12}{s_ref.tokens_per_second:>10.2f}"
          f"{s_ref.accepted_per_target_forward:>20.2f}\n{'ouroboros':<12}{s_ours.tokens_per_second:>10.2f}"
          f"{s_ours.accepted_per_target_forward:>20.2f}\n"
          f"speedup {s_ours.tokens_per_second / max(s_ref.tokens_per_second, 1e-9):.2f}x; "
          f"identical to greedy: {'yes' if same else 'NO'}; parameters {s_ours.config}")
    if args.json:
        import json
        import platform as _platform
        record = {"what": "python -m ouroboros demo", "machine": _platform.processor() or _platform.machine(),
                  "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": args.dtype,
                  "draft_quant": draft_quantization(draft),
                  "prompt_tokens": len(prompt), "max_new_tokens": args.max_new_tokens,
                  "identical_to_greedy": same, "speedup": s_ours.tokens_per_second / max(s_ref.tokens_per_second, 1e-9),
                  "greedy": s_ref.summary(), "ouroboros": s_ours.summary()}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return 0 if same else 1


def cmd_bench(args) -> int:
    """Every method on one prompt, side by side, against greedy measured in the same run."""
    target, draft, tokenizer, prompt = _demo_models(args)
    rows, ref = [], None
    for method in args.methods.split(","):
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ouroboros", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text from local HF model directories, streaming")
    g.add_argument("--target", required=True)
    g.add_argument("--draft", default=None)
    g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the target's)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--method", default="ouroboros", choices=METHODS)
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    _add_params(g)
    g.set_defaults(func=cmd_generate)
    for name, func, help_text in (("demo", cmd_demo, "ouroboros vs greedy on the default pair, side by side"),
                                  ("bench", cmd_bench, "every method on the default pair, side by side")):
        d = sub.add_parser(name, help=help_text)
        d.add_argument("--prompt", default=None, help="prompt text (real pair only)")
        d.add_argument("--small", action="store_true", help="use the small random pair built in code")
        d.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        if name == "demo":
            d.add_argument("--json", default=None, help="also write the measured stats to this JSON file")
        if name == "bench":
            d.add_argument("--methods", default=",".join(METHODS))
        _add_params(d)
        d.set_defaults(func=func)
    i = sub.add_parser("info", help="versions and available kernel backends")
    i.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
