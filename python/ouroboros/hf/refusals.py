"""Why ouroboros' attention patch cannot take a model: recurrent or non-attention layers, no AttentionInterface, or
decoder layers that drop the tree keyword argument before attention (each one sentence)."""
from __future__ import annotations

import torch

from ouroboros.hf.masks import ATTENTION_LAYER_TYPES

__all__ = ["attention_modules", "attention_gets_extra_kwargs", "has_attention_interface", "layer_reason",
           "patch_refusal"]

_PROBE_KWARG = "ouro_probe"
# layer types that carry a recurrent state (transformers >= 5.25 reports Mamba's layers as linear_attention)
_RECURRENT_LAYER_TYPES = frozenset({"linear_attention", "mamba", "mamba2", "recurrent"})
_kwargs_reach_attention: dict[type, bool] = {}


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention modules of ``model`` (by class name, as every transformers family names them)."""
    return [m for m in model.modules() if type(m).__name__.endswith("Attention")]


def attention_gets_extra_kwargs(model) -> bool:
    """True when a keyword argument given to ``model(...)`` reaches every attention module (probed once per class
    with a one-token forward; StableLM's decoder layers, for one, drop them). False for a model without attention."""
    cls = type(model)
    if cls not in _kwargs_reach_attention:
        seen: list[bool] = []
        hooks = [m.register_forward_pre_hook(lambda _m, _a, kw: seen.append(_PROBE_KWARG in kw), with_kwargs=True)
                 for m in attention_modules(model)]
        try:
            with torch.inference_mode():
                model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=model.device), use_cache=False,
                      **{_PROBE_KWARG: True})
        finally:
            for hook in hooks:
                hook.remove()
        _kwargs_reach_attention[cls] = bool(seen) and all(seen)
    return _kwargs_reach_attention[cls]


def has_attention_interface(model) -> bool:
    """True unless ``model``'s class says transformers cannot switch its attention implementation."""
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    return can_set is None or bool(can_set())


def layer_reason(model) -> str | None:
    """Why ``model``'s layers rule out tree verification (a recurrent state, non-attention layers), or None."""
    name = type(model).__name__
    if getattr(model, "_is_stateful", False):
        return (f"{name} keeps a recurrent state, which cannot be branched over a token tree nor rolled back to the "
                f"accepted tokens; ouroboros needs an attention-only model")
    layer_types = getattr(model.config.get_text_config(), "layer_types", None) or []
    other = sorted(set(layer_types) - ATTENTION_LAYER_TYPES)
    if other:
        state = (" (a recurrent state, which cannot be branched over a token tree nor rolled back)"
                 if set(other) & _RECURRENT_LAYER_TYPES else "")
        return (f"{name} has {', '.join(other)} layers{state}; ouroboros verifies token trees only through full or "
                f"sliding-window attention layers, whose cache can be cut back to the accepted tokens")
    return None


def patch_refusal(model) -> str | None:
    """Why :func:`ouroboros.patch` cannot route ``model``'s attention through our kernels (one sentence), or None.

    ``generate`` still runs a model refused here for its attention plumbing (not for its layers): unpatched, with
    dense tree masks, also on the fast path (:func:`ouroboros.hf.static_runner.route_to_kernel`)."""
    reason = layer_reason(model)
    if reason is not None:
        return reason
    name = type(model).__name__
    if not has_attention_interface(model):
        return (f"{name} does not route attention through transformers' AttentionInterface, so ouroboros cannot patch "
                f"it (generate runs it unpatched)")
    if not attention_gets_extra_kwargs(model):
        return (f"{name}'s decoder layers do not pass extra keyword arguments on to attention, so the token tree "
                f"could not reach ouroboros' attention; ouroboros cannot patch it (generate runs it unpatched)")
    return None
