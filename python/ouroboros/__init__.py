"""ouroboros: lossless phrase-level speculative decoding for Hugging Face causal LMs."""
from .pool import PhrasePool

__version__ = "0.1.0"
__all__ = ["PhrasePool"]
