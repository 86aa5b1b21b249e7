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

import torch

from .forward import ATTENTION_LAYER_TYPES, uses_our_attention

__all__ = ["TESTED_MODEL_TYPES", "check_model", "patch_refusal", "unsupported_reason"]

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
_PROBE_KWARG = "ouro_probe"
_warned_types: set[str] = set()
_kwargs_reach_attention: dict[type, bool] = {}


def _attention_gets_extra_kwargs(model) -> bool:
    """True when a keyword argument given to ``model(...)`` reaches every attention module (probed once per class
    with a one-token forward; StableLM's decoder layers, for one, drop them). False for a model without attention."""
    from .patch import _attention_modules

    cls = type(model)
    if cls not in _kwargs_reach_attention:
        seen: list[bool] = []
        hooks = [m.register_forward_pre_hook(lambda _m, _a, kw: seen.append(_PROBE_KWARG in kw), with_kwargs=True)
                 for m in _attention_modules(model)]
        try:
            with torch.inference_mode():
                model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=model.device), use_cache=False,
                      **{_PROBE_KWARG: True})
        finally:
            for hook in hooks:
                hook.remove()
        _kwargs_reach_attention[cls] = bool(seen) and all(seen)
    return _kwargs_reach_attention[cls]


def _has_attention_interface(model) -> bool:
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    return can_set is None or bool(can_set())


def _layer_reason(model) -> str | None:
    """Why ``model``'s layers rule out tree verification (a recurrent state, non-attention layers), or None."""
    name = type(model).__name__
    if getattr(model, "_is_stateful", False):
        return (f"{name} keeps a recurrent state, which cannot be branched over a token tree nor rolled back to the "
                f"accepted tokens; ouroboros needs an attention-only model")
    layer_types = getattr(model.config.get_text_config(), "layer_types", None) or []
    other = sorted(set(layer_types) - ATTENTION_LAYER_TYPES)
    if other:
        return (f"{name} has {', '.join(other)} layers; ouroboros verifies token trees only through full or "
                f"sliding-window attention layers, whose cache can be cut back to the accepted tokens")
    return None


def patch_refusal(model) -> str | None:
    """Why :func:`ouroboros.patch` cannot route ``model``'s attention through our kernels (one sentence), or None.

    ``generate`` still runs a model refused here for its attention plumbing (not for its layers): unpatched, with
    dense tree masks, also on the fast path (:func:`ouroboros.static.route_to_kernel`)."""
    reason = _layer_reason(model)
    if reason is not None:
        return reason
    name = type(model).__name__
    if not _has_attention_interface(model):
        return (f"{name} does not route attention through transformers' AttentionInterface, so ouroboros cannot patch "
                f"it (generate runs it unpatched)")
    if not _attention_gets_extra_kwargs(model):
        return (f"{name}'s decoder layers do not pass extra keyword arguments on to attention, so the token tree "
                f"could not reach ouroboros' attention; ouroboros cannot patch it (generate runs it unpatched)")
    return None


def unsupported_reason(model) -> str | None:
    """Why ouroboros cannot verify a token tree on ``model`` as it is (one sentence), or None when nothing rules it
    out. An untested model without AttentionInterface is refused: nothing ensures it honours our 4D mask."""
    reason = _layer_reason(model)
    if reason is not None:
        return reason
    if not _has_attention_interface(model) and model.config.get_text_config().model_type not in TESTED_MODEL_TYPES:
        return (f"{type(model).__name__} does not route attention through transformers' AttentionInterface, so "
                f"nothing ensures it honours a 4D tree mask and explicit position ids")
    if uses_our_attention(model):
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
    if not uses_our_attention(model) and impl not in _MASKABLE_ATTENTION:
        raise ValueError(f"{role} uses attn_implementation={impl!r}, which cannot take a 4D tree mask; load it with "
                         f"attn_implementation='sdpa' or 'eager', or call ouroboros.patch(model)")
    model_type = model.config.get_text_config().model_type
    if model_type not in TESTED_MODEL_TYPES and model_type not in _warned_types:
        _warned_types.add(model_type)
        warnings.warn(f"ouroboros is untested on model_type={model_type!r}; tested: {sorted(TESTED_MODEL_TYPES)}",
                      stacklevel=3)
