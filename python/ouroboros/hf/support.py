"""Which Hugging Face architectures ouroboros runs: the tested list, refusals with their reason, and the warning.

Tree verification needs three things of a model: attention layers only (a cache that can be cut back to the
accepted tokens; a recurrent or convolutional state cannot be branched over a token tree nor rolled back), attention
that honours a 4D mask and explicit position ids, and, when :func:`ouroboros.patch` routed the attention through our
kernels, the extra ``ouro_tree`` keyword argument reaching every attention call. :func:`check_model` refuses a model
that lacks one of them with a ``ValueError`` that says which, and warns once per ``model_type`` outside
:data:`TESTED_MODEL_TYPES`.
"""
from __future__ import annotations

import warnings

from ouroboros.hf.attention import is_patched
from ouroboros.hf.refusals import has_attention_interface, layer_reason, patch_refusal

__all__ = ["TESTED_MODEL_TYPES", "check_model", "unsupported_reason"]

# Exactly the model types of the lossless matrix (tests/conftest.py FAMILIES): every method token-exact against HF
# greedy in float32, on the default path and the static-cache fast path, and patched to our kernels where
# :func:`patch_refusal` allows (not Falcon: no AttentionInterface; not StableLM: its layers drop the tree kwarg).
# Gemma3 text models report "gemma3_text".
TESTED_MODEL_TYPES = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
    "granite", "olmo", "olmo2", "stablelm", "cohere", "qwen3_moe", "mixtral", "phi", "gpt_neox", "starcoder2",
    "exaone4", "seed_oss", "ernie4_5", "gpt2", "falcon",
})
_MASKABLE_ATTENTION = ("eager", "sdpa")
_warned_types: set[str] = set()


def unsupported_reason(model) -> str | None:
    """Why ouroboros cannot verify a token tree on ``model`` as it is (one sentence), or None when nothing rules it
    out. An untested model without AttentionInterface is refused: nothing ensures it honours our 4D mask."""
    reason = layer_reason(model)
    if reason is not None:
        return reason
    if not has_attention_interface(model) and model.config.get_text_config().model_type not in TESTED_MODEL_TYPES:
        return (f"{type(model).__name__} does not route attention through transformers' AttentionInterface, so "
                f"nothing ensures it honours a 4D tree mask and explicit position ids")
    if is_patched(model):
        return patch_refusal(model)
    return None


def check_model(model, role: str) -> None:
    """Raise ``ValueError`` (naming ``role``) for a model ouroboros cannot run losslessly; warn once per untested
    ``model_type``. Returns normally for every model it may run."""
    if not hasattr(model, "config") or not hasattr(model, "forward"):
        raise ValueError(f"{role} must be a Hugging Face causal LM (a PreTrainedModel), got {type(model).__name__}")
    reason = unsupported_reason(model)
    if reason is not None:
        raise ValueError(f"{role}: {reason}")
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if not is_patched(model) and impl not in _MASKABLE_ATTENTION:
        raise ValueError(f"{role} uses attn_implementation={impl!r}, which cannot take a 4D tree mask; load it with "
                         f"attn_implementation='sdpa' or 'eager', or call ouroboros.patch(model)")
    model_type = model.config.get_text_config().model_type
    if model_type not in TESTED_MODEL_TYPES and model_type not in _warned_types:
        _warned_types.add(model_type)
        warnings.warn(f"ouroboros is untested on model_type={model_type!r}; tested: {sorted(TESTED_MODEL_TYPES)}",
                      stacklevel=3)
