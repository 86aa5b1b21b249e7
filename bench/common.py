"""What every benchmark shares: the paths, the machine and versions a result records, JSON in and out.

torch and transformers are imported inside the functions that describe them: the report step imports nothing
heavier than the standard library.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TRACES = RESULTS / "traces"


def utc_now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def write_json(path: str | Path, data, indent: int | None = 1) -> Path:
    """``data`` as JSON at ``path`` (its folder created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent))
    return path


def slug(name: str) -> str:
    """A file-name part of a device name: lower case, runs of other characters as one underscore."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()


def loadavg() -> list[float] | None:
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


def _cpuinfo(key: str) -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    return None


def machine_info() -> dict:
    """The CPU (model, SIMD flags, cores, memory), torch's thread count and the library versions."""
    import torch  # a measuring helper: the report step never calls it
    import transformers

    flags = [f for f in (_cpuinfo("flags") or "").split() if f.startswith(("avx", "amx", "fma"))]
    info = {"cpu": _cpuinfo("model name") or platform.processor() or "", "cpu_flags": flags,
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    with contextlib.suppress(Exception):
        import ouroboros
        info["ouroboros"] = ouroboros.__version__
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
        info["memory_gib"] = round(int(mem) / 2**20, 1)
    return info


def versions() -> dict:
    """torch (and its CUDA), transformers, python, the platform, ouroboros and its kernel backends, the GPU."""
    import torch  # a measuring helper: the report step never calls it
    import transformers

    info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform()}
    with contextlib.suppress(Exception):
        import ouroboros
        info["ouroboros"] = ouroboros.__version__
    with contextlib.suppress(Exception):
        import ouroboros_kernels
        info["kernel_backends"] = ouroboros_kernels.backend_status()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["gpu_capability"] = f"{props.major}.{props.minor}"
    return info


def card_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def card_slug(name: str) -> str:
    """A short name of a GPU for file names ("h200", "a100"), else :func:`slug` of the whole name."""
    m = re.search(r"(h100|h200|h20|a100|a10g?|l40s?|l4|b200|gh200|rtx\s*\d+)", name.lower())
    if m:
        return re.sub(r"\s+", "", m.group(1))
    return slug(name) or "device"


def error_record(err: BaseException) -> dict:
    tb = traceback.format_exception(type(err), err, err.__traceback__)
    return {"error": f"{type(err).__name__}: {err}"[:2000], "traceback_tail": "".join(tb)[-3000:]}
