"""`python -m ouroboros generate | demo | bench | info`.

Every ``ValueError`` (bad arguments, models that cannot work together) ends the command with one line
``error: <message>`` on stderr and exit code 2; ``--debug`` shows the traceback instead. Arguments are checked before
any model loads; a model that is not a local directory is looked up in the Hugging Face cache only (never the network).
"""
from __future__ import annotations

import argparse
import sys

import torch

from ouroboros.cli.args import DTYPES, add_decoding_flags, add_sampling_flags
from ouroboros.cli.commands import cmd_generate, cmd_info
from ouroboros.cli.demo import cmd_bench, cmd_demo
from ouroboros.core.config import METHODS

__all__ = ["main", "build_parser"]


def _add_generate(sub, common: argparse.ArgumentParser) -> None:
    g = sub.add_parser("generate", parents=[common],
                       help="stream a continuation of a prompt from a target and a draft model on disk")
    g.add_argument("--target", required=True,
                   help="the model whose own output you get: a directory saved with save_pretrained (or a model "
                        "already in the Hugging Face cache; nothing is downloaded)")
    g.add_argument("--draft", default=None,
                   help="a smaller model with the same tokenizer that proposes tokens; needed by --method "
                        "speculative and ouroboros")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the target's)")
    g.add_argument("--prompt", action="append", default=None,
                   help="the text to continue (echoed, then the continuation streams); give --prompt several times "
                        "to decode the prompts as one batch (each printed with its continuation at the end)")
    g.add_argument("--prompt-file", default=None,
                   help="a text file with one prompt per line, decoded as one batch (with or instead of --prompt)")
    g.add_argument("--method", default="ouroboros", choices=METHODS,
                   help="how tokens are proposed for the target to verify: greedy (none), speculative (the draft, "
                        "token by token), lookahead (the target's own n-grams), prompt_lookup (n-grams of the "
                        "prompt), ouroboros (the draft, phrase by phrase; default)")
    g.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="weights dtype; float32 (default) gives exactly plain greedy's tokens, bfloat16/float16 may "
                        "differ where two tokens nearly tie")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda when available)")
    add_decoding_flags(g)
    add_sampling_flags(g)
    g.set_defaults(func=cmd_generate)


def _add_demo_and_bench(sub, common: argparse.ArgumentParser) -> None:
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
        add_decoding_flags(d)
        d.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subparser's default must not overwrite `--debug` given before the subcommand
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on an error, show the full traceback")
    parser = argparse.ArgumentParser(prog="python -m ouroboros", description=__doc__.split("\n")[0],
                                     parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub, common)
    _add_demo_and_bench(sub, common)
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
