"""The proposer's own settings, read from ``OUROBOROS_VLLM_*`` environment variables (vLLM's
``SpeculativeConfig`` has no free-form field). Every bad value raises ``ValueError`` naming the variable, when the
proposer is built."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ouroboros.drafting.pool import DEFAULT_MAX_BYTES
from ouroboros.hf.quantize import DRAFT_QUANT
from ouroboros.vllm.confidence import DEFAULT_CONFIDENCE, MAX_THRESHOLD

__all__ = ["ProposerSettings", "SETTINGS", "MODES", "PREFIX"]

PREFIX = "OUROBOROS_VLLM_"
DEFAULT_DRAFT_VOCAB = 65536       # a head of the first 65,536 ids + the requests' tokens (no-op for a smaller vocabulary)
MODES = ("pool", "draft")

# variable (without the prefix) -> what it sets; README's "Serving with vLLM" lists the same
SETTINGS = {
    "MODE": "pool (model-free, default without a draft) or draft (default when OUROBOROS_VLLM_DRAFT is set)",
    "DRAFT": "path of an HF draft model folder of the target's tokenizer (draft mode)",
    "DRAFT_QUANT": "auto (int8 for a float32 draft on a CPU), int8 or none",
    "DRAFT_VOCAB": "draft mode: the draft's output head keeps only the token ids below this number (a BPE "
                   "vocabulary's first, most frequent merges), its EOS ids and every token of the running "
                   "requests' prompts and outputs (default 65536: measured fastest at 4 concurrent requests, "
                   "bench/results/vllm_proposer_cost_cpu.json); 0: the whole vocabulary",
    "POOL": "phrase pool file: loaded at start when it exists, written as requests finish and at exit",
    "POOL_SAVE_SECONDS": "least seconds between two writes of the pool file (default 60; 0: at every finish)",
    "POOL_BYTES": f"byte budget of the shared phrase pool (default {DEFAULT_MAX_BYTES})",
    "NGRAM": "n-gram size N: phrases hold N-1 tokens (default 4)",
    "GUESS_SET": "phrases kept per key, and pooled phrases a lone request verifies per draft forward (default 3; "
                 "with R requests drafting together, each verifies ceil(GUESS_SET / R))",
    "ORDERS": "pool mode: the longest context (in tokens) a phrase is keyed by (default 3)",
    "POOL_CONFIDENCE": f"pool mode: a chain stops where the estimated chance that all of it is accepted falls below "
                       f"this number times the step's running requests less one (at most {MAX_THRESHOLD}: a lone "
                       f"request's chain is never cut); 0 proposes every chain whole (default {DEFAULT_CONFIDENCE})",
}


def _number(env: Mapping[str, str], name: str, default, low, kind: type, what: str):
    """The variable ``name`` parsed by ``kind`` (``default`` when unset or empty); ``ValueError`` naming it when it
    is not ``what`` or is below ``low``."""
    text = env.get(PREFIX + name)
    if text is None or text == "":
        return default
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{PREFIX}{name}={text!r} is not {what}") from None
    if not value >= low:                              # also refuses a float NaN
        raise ValueError(f"{PREFIX}{name}={value} must be >= {low}")
    return value


def _int(env: Mapping[str, str], name: str, default: int, low: int) -> int:
    return _number(env, name, default, low, int, "an integer")


def _fraction(env: Mapping[str, str], name: str, default: float) -> float:
    """:func:`_number` as a float in [0, 1]; ``ValueError`` naming the variable above 1."""
    value = _number(env, name, default, 0, float, "a number")
    if value > 1:
        raise ValueError(f"{PREFIX}{name}={value} must be <= 1")
    return value


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env.get(PREFIX + name) or default
    if value not in choices:
        raise ValueError(f"{PREFIX}{name}={value!r}: choose one of {', '.join(choices)}")
    return value


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    return _number(env, name, default, 0, float, "a number of seconds")


@dataclass(frozen=True)
class ProposerSettings:
    """What the proposer does. :meth:`from_env` guarantees a consistent set: draft mode has an existing draft
    folder; a pool file is readable (or absent in a writable folder); every number is in range."""

    mode: str = "pool"
    draft: Path | None = None
    draft_quant: str = "auto"
    draft_vocab: int = DEFAULT_DRAFT_VOCAB
    pool_file: Path | None = None
    pool_save_seconds: float = 60.0
    pool_bytes: int = DEFAULT_MAX_BYTES
    ngram: int = 4
    guess_set: int = 3
    orders: int = 3
    pool_confidence: float = DEFAULT_CONFIDENCE

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "ProposerSettings":
        """The settings in ``env`` (default ``os.environ``). Raises ``ValueError`` naming the variable for an
        unknown ``OUROBOROS_VLLM_*`` name (a typo), a bad value, a missing draft folder, or a pool file that cannot
        be read or written."""
        env = os.environ if env is None else env
        unknown = sorted(k for k in env if k.startswith(PREFIX) and k[len(PREFIX):] not in SETTINGS)
        if unknown:
            raise ValueError(f"unknown setting {', '.join(unknown)}; known: "
                             f"{', '.join(PREFIX + k for k in SETTINGS)}")
        draft = _path(env, "DRAFT")
        mode = _choice(env, "MODE", "draft" if draft is not None else "pool", MODES)
        if mode == "draft" and draft is None:
            raise ValueError(f"{PREFIX}MODE=draft needs {PREFIX}DRAFT=<draft model folder>")
        if draft is not None and not (draft / "config.json").is_file():
            raise ValueError(f"{PREFIX}DRAFT={str(draft)!r} is not a model folder (no config.json there)")
        settings = cls(mode=mode, draft=draft if mode == "draft" else None,
                       draft_quant=_choice(env, "DRAFT_QUANT", "auto", DRAFT_QUANT + ("auto",)),
                       draft_vocab=_int(env, "DRAFT_VOCAB", DEFAULT_DRAFT_VOCAB, 0), pool_file=_pool_file(env),
                       pool_save_seconds=_seconds(env, "POOL_SAVE_SECONDS", 60.0),
                       pool_bytes=_int(env, "POOL_BYTES", DEFAULT_MAX_BYTES, 1 << 16),
                       ngram=_int(env, "NGRAM", 4, 2), guess_set=_int(env, "GUESS_SET", 3, 1),
                       orders=_int(env, "ORDERS", 3, 1),
                       pool_confidence=_fraction(env, "POOL_CONFIDENCE", DEFAULT_CONFIDENCE))
        return settings


def _path(env: Mapping[str, str], name: str) -> Path | None:
    text = env.get(PREFIX + name)
    return Path(text).expanduser() if text else None


def _pool_file(env: Mapping[str, str]) -> Path | None:
    path = _path(env, "POOL")
    if path is None:
        return None
    name = f"{PREFIX}POOL={str(path)!r}"
    if path.exists():
        if not path.is_file() or not os.access(path, os.R_OK):
            raise ValueError(f"{name} cannot be read (not a readable file)")
    elif not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise ValueError(f"{name} does not exist and its folder {str(path.parent)!r} is not a writable folder")
    return path
