"""ouroboros: lossless phrase-level speculative decoding for Hugging Face causal LMs."""
from .api import generate, stream
from .config import CPU_DEFAULTS, GPU_DEFAULTS, METHODS, DecodeConfig
from .engine import GenerationStats
from .gpu_pool import GpuPhrasePool
from .pool import PhrasePool

__version__ = "0.1.0"
__all__ = ["generate", "stream", "PhrasePool", "GpuPhrasePool", "GenerationStats", "DecodeConfig", "METHODS",
           "CPU_DEFAULTS", "GPU_DEFAULTS"]
