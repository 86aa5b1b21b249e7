"""ouroboros: lossless phrase-level speculative decoding for Hugging Face causal LMs."""
from .api import generate, stream
from .config import CPU_DEFAULTS, GPU_DEFAULTS, METHODS, DecodeConfig
from .engine import GenerationStats
from .gpu_pool import GpuPhrasePool
from .hf_generate import custom_generate
from .patch import TreeSpec, is_patched, patch, unpatch
from .pool import PhrasePool
from .quantize import quantize_draft
from .sampling import SamplingConfig

__version__ = "0.1.0"
__all__ = ["generate", "stream", "custom_generate", "patch", "unpatch", "is_patched", "TreeSpec", "PhrasePool",
           "GpuPhrasePool", "GenerationStats", "DecodeConfig", "METHODS", "CPU_DEFAULTS", "GPU_DEFAULTS",
           "quantize_draft", "SamplingConfig"]
