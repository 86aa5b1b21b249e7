"""ouroboros_kernels: tree attention and n-gram phrase ops, with no model knowledge (no transformers import).

Backends: "cuda" (compiled extension) > "triton" > "reference" (plain PyTorch); ``OUROBOROS_BACKEND`` forces one.
"""
from .attention import tree_attention
from .backend import BACKENDS, available_backends, backend_status, select_backend
from .glue import rms_norm, rope, swiglu, swiglu_fused
from .ngram import NgramPool, ngram_insert, ngram_lookup, ngram_pool_empty
from .tree import ancestor_mask, causal_packed_mask, depths, pack_mask, path_to, unpack_mask

__version__ = "0.1.0"

__all__ = [
    "tree_attention",
    "rms_norm", "rope", "swiglu", "swiglu_fused",
    "NgramPool", "ngram_insert", "ngram_lookup", "ngram_pool_empty",
    "BACKENDS", "available_backends", "backend_status", "select_backend",
    "ancestor_mask", "causal_packed_mask", "depths", "pack_mask", "path_to", "unpack_mask",
]
