"""GGUF models shipped on PyPI as chunk packages: finding the chunks, reading the header (parameter count),
assembling the file and de-quantizing it once into a plain float32 model folder."""
from __future__ import annotations

import importlib
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
)

from ouroboros.cli.extras import is_installed, missing_error

__all__ = ["ChunkedModel", "chunk_paths", "gguf_parameter_count", "converted_bytes", "announce_conversion",
           "assemble_gguf", "convert_gguf"]


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

    def missing_requirements(self) -> list[str]:
        """pip requirement strings of the chunk packages that are not installed."""
        return [req for req, mod in zip(self.requirements, self.modules) if not is_installed(mod)]


def _progress(total: int, desc: str, unit: str = "B"):
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", unit_divisor=1024 if unit == "B" else 1000,
                leave=False)


def chunk_paths(model: ChunkedModel) -> list[Path]:
    """The chunk files of ``model`` in order (raises :class:`MissingModelError` / ``FileNotFoundError``)."""
    missing = model.missing_requirements()
    if missing:
        raise missing_error(f"model {model.hf_name}", missing)
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
    return 4 * gguf_parameter_count(chunk_paths(model))


def announce_conversion(models: list[ChunkedModel], root: Path) -> None:
    """One line on stderr before the first-run conversion: what, where, how big, and that it happens once."""
    try:
        size = f"{sum(converted_bytes(m) for m in models) / 2**30:.1f} GiB"
    except (OSError, ValueError, struct.error):
        size = "several GB"
    names = " and ".join(m.hf_name.split("/")[-1] for m in models)
    print(f"[ouroboros] one-time setup: converting {names} ({models[0].quantization} GGUF from the installed chunk "
          f"packages) to float32 safetensors in {root} ({size}; set OUROBOROS_CACHE to put it elsewhere). This "
          f"happens once and takes a few minutes; later runs load the cache in seconds.", file=sys.stderr, flush=True)


def assemble_gguf(model: ChunkedModel, dest: Path) -> Path:
    """Concatenate the chunk files of ``model`` into ``dest`` (verifying sizes), with a byte progress bar."""
    parts = chunk_paths(model)
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


def _plain_model(model: ChunkedModel, gguf_path: Path, steps):
    """(config, plain float32 model) holding the de-quantized weights of ``gguf_path``, without
    ``quantization_config``; ``steps`` (a progress bar) advances once the GGUF is loaded."""
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
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False, assign=True)
    if config.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch converting {model.hf_name}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        plain.tie_weights()
    return config, plain


def convert_gguf(model: ChunkedModel, gguf_path: Path, out: Path, with_tokenizer: bool) -> None:
    """De-quantize ``gguf_path`` with transformers and save a plain float32 model (+ tokenizer) into ``out``."""
    from safetensors.torch import save_model  # optional: the models extra

    steps = tqdm(total=4 if with_tokenizer else 3, desc=f"converting {model.model_id}", unit="step", leave=False)
    config, plain = _plain_model(model, gguf_path, steps)
    steps.update()
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    gen = GenerationConfig.from_model_config(config)
    gen.do_sample = False
    gen.save_pretrained(out)
    save_model(plain, str(out / "model.safetensors"), metadata={"format": "pt"})
    del plain
    steps.update()
    if with_tokenizer:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        tok.save_pretrained(out)
        steps.update()
    steps.close()
