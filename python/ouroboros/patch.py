"""Route a live Hugging Face model's attention through ``ouroboros_kernels.tree_attention`` (SPEC §3).

The only module that touches transformers' attention plumbing. ``patch(model)`` registers one attention function
(name ``"ouroboros"``) with ``transformers.AttentionInterface`` and a mask function with ``AttentionMaskInterface``,
then switches the live model with ``model.set_attn_implementation("ouroboros")``; ``unpatch(model)`` switches back to
the implementation the model had before. Checked against transformers 5.24 for Llama, Mistral, Qwen2, Qwen3, Gemma2,
Gemma3 and Phi3 (every family whose attention calls ``ALL_ATTENTION_FUNCTIONS.get_interface``).

Engine contract: a tree verification call is

    model(input_ids=ids (1, T), position_ids=(1, T), cache=DynamicCache(), use_cache=True, attention_mask=None,
          ouro_tree=TreeSpec(prefix_len, packed_mask, depths))

``ouro_tree`` travels unfiltered through ``**kwargs`` to every attention call. Cache entry ``p < prefix_len`` has
position ``p``; tree token ``i`` has position ``prefix_len + depths[i]`` and sees the whole cache, itself and the tree
tokens whose bits are set in its row of ``mask``. With ``ouro_tree`` the mask describes visibility completely and any
``attention_mask`` is ignored.

Without ``ouro_tree``:
- no mask (prefill, decode, ``generate`` without padding): bottom-right causal, done by the kernel;
- a 4-D mask (bool True = attend, or additive float; built by transformers from a padded 2-D mask or a static cache,
  or passed by the caller): used as given, like SDPA, on a dense PyTorch path.

Sliding windows (``sliding_window=``; key position > query position - window) are exact: when the window cannot cut
anything the kernel runs, otherwise the dense path applies the window. ``softcap=`` (Gemma2) is passed to the kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import ouroboros_kernels
from ouroboros_kernels.attention import resolve_backend
from ouroboros_kernels.tree import unpack_mask

__all__ = ["ATTN_NAME", "TreeSpec", "patch", "unpatch", "is_patched", "ouroboros_attention"]

ATTN_NAME = "ouroboros"
_BACKEND_ATTR = "_ouroboros_backend"
_PREV_ATTR = "_ouroboros_prev_attn_implementation"
_BACKENDS = ("auto",) + tuple(ouroboros_kernels.BACKENDS)


@dataclass
class TreeSpec:
    """The token tree of one verification forward.

    prefix_len : number of cache entries before the tree (all visible to every tree token).
    mask : packed int32 ``(T, ceil(T/32))`` on the model device; bit j of row i set iff token i sees token j.
    depths : int64 ``(T,)``; tree token i has position ``prefix_len + depths[i]``.
    """

    prefix_len: int
    mask: torch.Tensor
    depths: torch.Tensor


# ------------------------------------------------------------------------------------------------------ dense fallback
def _dense_attention(q, k, v, visible, scale, softcap):
    """Exact attention with an explicit mask; ``visible`` is bool (True = attend) or additive float, broadcastable to
    ``(B, Hq, T, S)``. Used only where the kernel's visibility rule does not apply (4-D masks, cutting windows)."""
    g = q.shape[1] // k.shape[1]
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, enable_gqa=g > 1)
    kf = k.float().repeat_interleave(g, dim=1)
    vf = v.float().repeat_interleave(g, dim=1)
    scores = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale
    scores = softcap * torch.tanh(scores / softcap)
    if visible.dtype == torch.bool:
        scores = scores.masked_fill(~visible, float("-inf"))
    else:
        scores = scores + visible.float()
    return torch.matmul(torch.softmax(scores, dim=-1), vf).to(q.dtype)


def _tree_visibility(tree: TreeSpec, t: int, window: int | None, device) -> torch.Tensor:
    """Bool ``(T, prefix_len + T)`` of a tree call, with the sliding window applied on true positions."""
    p = tree.prefix_len
    tree_vis = unpack_mask(tree.mask, t).to(device)
    vis = torch.cat([torch.ones(t, p, dtype=torch.bool, device=device), tree_vis], dim=1)
    if window is not None:
        qpos = p + tree.depths.to(device)
        kpos = torch.cat([torch.arange(p, device=device), qpos])
        vis = vis & (kpos[None, :] > qpos[:, None] - window)
    return vis


def _causal_visibility(t: int, s: int, window: int | None, device) -> torch.Tensor:
    """Bool ``(T, S)`` bottom-right causal mask, with the window in key-index space (keys are contiguous positions
    ending at the last query, so index differences are position differences, also for sliding-window cache layers)."""
    qidx = torch.arange(s - t, s, device=device)[:, None]
    kidx = torch.arange(s, device=device)[None, :]
    vis = kidx <= qidx
    if window is not None:
        vis = vis & (kidx > qidx - window)
    return vis


# ------------------------------------------------------------------------------------------------- backend choice
def _resolve_backend(requested: str, q: torch.Tensor) -> str:
    """The kernel backend for this call: "auto" steps down from "cuda" where its kernel does not apply (see
    :func:`ouroboros_kernels.attention.resolve_backend`); a named backend is used as asked."""
    return resolve_backend(q, None if requested == "auto" else requested)


# ------------------------------------------------------------------------------------------------ attention function
def ouroboros_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                        sliding_window: int | None = None, softcap: float | None = None,
                        ouro_tree: TreeSpec | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """The function registered as ``"ouroboros"`` in ``transformers.AttentionInterface``.

    ``query`` (B, Hq, T, D); ``key``/``value`` (B, Hkv, S, D) after the cache update, not repeated for GQA. Returns
    ``(out (B, T, Hq, D), None)``.
    """
    if dropout:
        raise ValueError("ouroboros attention is inference-only (got dropout > 0); call model.eval()")
    backend = _resolve_backend(getattr(module, _BACKEND_ATTR, "auto"), query)
    b, hq, t, d = query.shape
    s = key.shape[2]
    scale = d ** -0.5 if scaling is None else scaling
    window = sliding_window if sliding_window else None

    if ouro_tree is not None:
        p = int(ouro_tree.prefix_len)
        if p + t > s:
            raise ValueError(
                f"ouro_tree.prefix_len ({p}) + T ({t}) exceeds the {s} keys of layer "
                f"{getattr(module, 'layer_idx', '?')}: the cache must keep the full history (use DynamicCache() "
                "without a config, not a sliding-window cache)")
        # Without a host sync we only know depth <= T - 1: the window cannot cut when p + T - 1 < window.
        if window is not None and p + t - 1 >= window:
            vis = _tree_visibility(ouro_tree, t, window, query.device)
            out = _dense_attention(query, key[:, :, :p + t], value[:, :, :p + t], vis, scale, softcap)
        else:
            out = ouroboros_kernels.tree_attention(query, key, value, p, ouro_tree.mask, scale, softcap,
                                                   backend=backend)
    elif attention_mask is None:
        if window is not None and s - 1 >= window:
            out = _dense_attention(query, key, value, _causal_visibility(t, s, window, query.device), scale, softcap)
        else:
            out = ouroboros_kernels.tree_attention(query, key, value, s - t, None, scale, softcap, backend=backend)
    else:
        if attention_mask.dim() != 4:
            raise ValueError(f"ouroboros attention expects a 4-D attention mask or None, got shape "
                             f"{tuple(attention_mask.shape)}")
        mask = attention_mask[..., :s]
        if mask.shape[-1] < s:
            key, value = key[:, :, :mask.shape[-1]], value[:, :, :mask.shape[-1]]
        out = _dense_attention(query, key, value, mask, scale, softcap)
    return out.transpose(1, 2), None


def _ouroboros_mask(*args, **kwargs):
    """Mask function for ``AttentionMaskInterface``.

    Returns None (the kernel applies bottom-right causal itself) when that is exactly the mask transformers means: no
    2-D padding mask and the keys end at the last query. Otherwise the SDPA-style 4-D boolean mask; SDPA's own "None"
    shortcut is taken only where it agrees with bottom-right causal (T = 1, or as many keys as queries), since for a
    longer static cache it means SDPA's top-left ``is_causal``.
    """
    from transformers.masking_utils import sdpa_mask

    q_length, kv_length, q_offset = kwargs.get("q_length"), kwargs.get("kv_length"), kwargs.get("q_offset", 0)
    if kwargs.get("attention_mask") is None and not isinstance(q_offset, torch.Tensor) \
            and q_length is not None and kv_length is not None and q_offset + q_length == kv_length:
        return None
    mask = sdpa_mask(*args, **kwargs)
    if mask is None and not (q_length == 1 or q_length == kv_length):
        mask = sdpa_mask(*args, **{**kwargs, "allow_is_causal_skip": False})
    return mask


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, ouroboros_attention)
    AttentionMaskInterface.register(ATTN_NAME, _ouroboros_mask)


# ------------------------------------------------------------------------------------------------------- public API
def is_patched(model: torch.nn.Module) -> bool:
    """True when ``model``'s attention runs through ouroboros."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) == ATTN_NAME


def _attention_modules(model: torch.nn.Module):
    return [m for m in model.modules() if type(m).__name__.endswith("Attention")]


def patch(model: torch.nn.Module, backend: str = "auto") -> torch.nn.Module:
    """Switch the live ``model`` (a transformers ``PreTrainedModel``) to ouroboros attention; returns ``model``.

    ``backend``: "auto" (best available for the model's device: cuda > triton > reference, or ``OUROBOROS_BACKEND``),
    or one of "cuda", "triton", "reference". Idempotent: patching again only changes the backend. Reversible with
    :func:`unpatch`.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {_BACKENDS}")
    if not hasattr(model, "set_attn_implementation") or not hasattr(model, "config"):
        raise ValueError(f"{type(model).__name__} is not a transformers PreTrainedModel")
    if backend != "auto":
        device = next(model.parameters()).device
        ouroboros_kernels.select_backend(device, backend)  # raises ValueError if it cannot run here
    _register()
    if not is_patched(model):
        if not type(model)._can_set_attn_implementation():
            raise ValueError(f"{type(model).__name__} does not route attention through transformers' "
                             "AttentionInterface; ouroboros cannot patch it")
        prev = model.config._attn_implementation
        model.set_attn_implementation(ATTN_NAME)
        if not is_patched(model):
            raise ValueError(f"transformers refused to switch {type(model).__name__} to {ATTN_NAME!r}")
        setattr(model, _PREV_ATTR, prev)
    for m in _attention_modules(model):
        setattr(m, _BACKEND_ATTR, backend)
    return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Restore the attention implementation ``model`` had before :func:`patch`; a no-op on an unpatched model."""
    if is_patched(model):
        prev = getattr(model, _PREV_ATTR, None) or "sdpa"
        model.set_attn_implementation(prev)
    if hasattr(model, _PREV_ATTR):
        delattr(model, _PREV_ATTR)
    for m in _attention_modules(model):
        if hasattr(m, _BACKEND_ATTR):
            delattr(m, _BACKEND_ATTR)
    return model
