"""ouroboros: lossless phrase-level speculative decoding for Hugging Face causal LMs.

The package is a one-way stack; a module imports only from its own layer or a lower one (``tests/test_layout.py``
checks it, lazy imports included, and that only optional extras are imported inside functions):

- `ouroboros_kernels` (beside this package): tree attention and n-gram ops, PyTorch / Triton / CUDA; no transformers;
- `core/`: the decoding config and defaults, the token trie, stop rules, shape buckets, sampling acceptance, the
  one-call guard;
- `tuning/`: the cost model that picks the GPU layout (fitted constants as package data) and the measurement probes;
- `hf/`: Hugging Face model support (tested list, refusals, ``check_model``), the attention patch, fused glue, the
  small-M CPU linear, draft quantization, cache helpers, the eager and static/graph model runners, the tree step;
- `drafting/`: the ``Drafter`` interface and draft types, the host and device drafters, the Jacobi window, the host
  and device phrase pools;
- `decoding/`: verification (phrases from verification), stats, the host loop, the device cycle;
- `api`, `hf_generate`: the public entry points ``generate``, ``stream`` and ``custom_generate``;
- `cli/`: ``python -m ouroboros generate|demo|bench|info``, the real-pair loader, the small demo pair;
- this ``__init__``: the public names below.
"""
from ouroboros.api import generate, stream
from ouroboros.cli.pairs import load_pair
from ouroboros.core.config import CPU_DEFAULTS, GPU_DEFAULTS, METHODS, DecodeConfig
from ouroboros.core.sampling import SamplingConfig
from ouroboros.decoding.stats import GenerationStats
from ouroboros.drafting.gpu_pool import GpuPhrasePool
from ouroboros.drafting.pool import PhrasePool
from ouroboros.hf.attention import TreeSpec, is_patched, patch, unpatch
from ouroboros.hf.fused_glue import apply_fused_glue, revert_fused_glue
from ouroboros.hf.quantize import quantize_draft
from ouroboros.hf.support import TESTED_MODEL_TYPES, check_model
from ouroboros.hf_generate import custom_generate

__version__ = "0.1.0"
__all__ = ["generate", "stream", "custom_generate", "patch", "unpatch", "is_patched", "TreeSpec", "PhrasePool",
           "GpuPhrasePool", "GenerationStats", "DecodeConfig", "METHODS", "CPU_DEFAULTS", "GPU_DEFAULTS",
           "quantize_draft", "SamplingConfig", "TESTED_MODEL_TYPES", "check_model", "load_pair",
           "apply_fused_glue", "revert_fused_glue"]
