"""The command line's shared flags and their checks, all made before any model loads.

Every check raises ``ValueError`` naming the flag; :func:`ouroboros.cli.entry.main` turns it into one line
``error: <message>`` and exit code 2. A model that is not a local directory is looked up in the Hugging Face cache
only (never the network): :func:`model_source`.
"""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache

from ouroboros.core.config import CPU_DEFAULTS, GPU_DEFAULTS, resolve_config
from ouroboros.core.sampling import SamplingConfig
from ouroboros.hf.quantize import resolve_draft_quant

__all__ = ["DTYPES", "add_decoding_flags", "decoding_params", "add_sampling_flags", "sampling_kwargs",
           "check_device", "check_run", "ModelSource", "model_source"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

# --------------------------------------------------------------------------------------------------- flags
_PARAM_HELP = {
    "gamma": "draft tokens per cycle (the starting length while it adapts)",
    "ngram": "n-gram size N: the phrase pool stores phrases of N-1 tokens",
    "window": "width of the Jacobi lookahead window in each draft forward, which mines new phrases (0: off)",
    "guess-set": "pooled phrases the draft verifies per forward; also the pool's capacity per key",
    "topk": "pooled phrases appended to the finished draft for the target to verify in the same forward (0: off)",
}


def add_decoding_flags(p: argparse.ArgumentParser) -> None:
    """``--max-new-tokens``, the method's parameters, ``--fixed-gamma`` and ``--draft-quant``."""
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


def decoding_params(args) -> dict:
    """The method's keywords of ``ouroboros.generate`` / ``stream`` for the flags (None: the default)."""
    return dict(gamma=args.gamma, ngram=args.ngram, window=args.window, guess_set=args.guess_set, topk=args.topk,
                adaptive=False if args.fixed_gamma else None)


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--do-sample", action="store_true",
                   help="sample instead of greedy (lossless: distributed as the target's own sampling)")
    p.add_argument("--temperature", type=float, default=None, help="with --do-sample (default 1.0)")
    p.add_argument("--top-p", type=float, default=None, help="with --do-sample (default 1.0: off)")
    p.add_argument("--top-k", type=int, default=None, help="with --do-sample (default 50; 0: off)")
    p.add_argument("--seed", type=int, default=None, help="with --do-sample: the same seed gives the same text")


def sampling_kwargs(args) -> dict:
    """The sampling keywords of ``ouroboros.stream`` for the flags (none when greedy); bad flags raise ValueError
    naming them, before any model loads."""
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


# --------------------------------------------------------------------------------------------------- checks
def check_device(name: str) -> None:
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


def check_run(args, method: str, device: str) -> None:
    """ValueError for arguments that cannot work together (checked before any model loads)."""
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    dtype = DTYPES[args.dtype]
    if resolve_draft_quant(args.draft_quant, device, dtype) == "int8" and (
            torch.device(device).type != "cpu" or dtype != torch.float32):
        raise ValueError(f"--draft-quant int8 needs a float32 draft on the CPU, got --dtype {args.dtype} on {device}; "
                         f"use --draft-quant none, or --dtype float32")
    resolve_config(device, method, **decoding_params(args))      # names a bad --gamma, --ngram, --window, ...


# --------------------------------------------------------------------------------------------------- model sources
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


def model_source(value: str, flag: str, need: str = "config.json") -> ModelSource:
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
