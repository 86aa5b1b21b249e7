"""ouroboros: lossless phrase-level speculative decoding for Hugging Face causal LMs."""
from ouroboros.api import generate, stream
from ouroboros.core.config import CPU_DEFAULTS, GPU_DEFAULTS, METHODS, DecodeConfig
from ouroboros.core.sampling import SamplingConfig
from ouroboros.decoding.stats import GenerationStats
from ouroboros.drafting.gpu_pool import GpuPhrasePool
from ouroboros.drafting.pool import PhrasePool
from ouroboros.hf.attention import TreeSpec, is_patched, patch, unpatch
from ouroboros.hf.quantize import quantize_draft
from ouroboros.hf_generate import custom_generate

__version__ = "0.1.0"
__all__ = ["generate", "stream", "custom_generate", "patch", "unpatch", "is_patched", "TreeSpec", "PhrasePool",
           "GpuPhrasePool", "GenerationStats", "DecodeConfig", "METHODS", "CPU_DEFAULTS", "GPU_DEFAULTS",
           "quantize_draft", "SamplingConfig"]
