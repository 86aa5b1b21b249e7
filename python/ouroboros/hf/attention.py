"""Route a live Hugging Face model's attention through ``ouroboros_kernels.tree_attention`` (SPEC §3).

The only module that touches transformers' attention plumbing. ``patch(model)`` registers one attention function
(name ``"ouroboros"``) with ``transformers.AttentionInterface`` and a mask function with ``AttentionMaskInterface``,
then switches the live model with ``model.set_attn_implementation("ouroboros")``; ``unpatch(model)`` switches back to
the implementation the model had before. Checked against transformers 5.24 for Llama, Mistral, Qwen2, Qwen3, Gemma2,
Gemma3 and Phi3 (every family whose attention calls ``ALL_ATTENTION_FUNCTIONS.get_interface``).

Engine contract: a tree verification call is

    model(input_ids=ids (1, T), position_ids=(1, T), cache=..., use_cache=True, **tree_call_kwargs(spec))

with ``spec = TreeSpec(prefix_len, packed_mask, depths)``; ``tree_call_kwargs`` adds ``ouro_tree=spec`` and an empty
4-D ``attention_mask`` (transformers uses a 4-D mask as given, so it builds no mask at all; the attention ignores it).
``ouro_tree`` travels unfiltered through ``**kwargs`` to every attention call. Cache entry ``p < prefix_len`` has
position ``p``; tree token ``i`` has position ``prefix_len + depths[i]`` and sees the whole cache, itself and the tree
tokens whose bits are set in its row of ``mask`` (None: a causal chain). ``prefix_len`` may be a device tensor (the
static cache's length): the kernel reads it, so the call has no host sync and replays from a CUDA graph.

Without ``ouro_tree``:
- no mask (prefill, decode, ``generate`` without padding): bottom-right causal, done by the kernel;
- a 4-D mask (bool True = attend, or additive float; built by transformers from a padded 2-D mask or a static cache,
  or passed by the caller): used as given, like SDPA, on a dense PyTorch path.

Sliding windows (``sliding_window=``; key position > query position - window) and ``softcap=`` (Gemma2) are passed
to the kernel, which applies them on true positions (SPEC §3, contract v2).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import ouroboros_kernels
from ouroboros.hf.refusals import attention_modules, patch_refusal
from ouroboros_kernels import custom_ops
from ouroboros_kernels.attention import resolve_backend

__all__ = ["ATTN_NAME", "TreeSpec", "tree_call_kwargs", "patch", "unpatch", "is_patched", "ouroboros_attention"]

ATTN_NAME = "ouroboros"
_BACKEND_ATTR = "_ouroboros_backend"
_PREV_ATTR = "_ouroboros_prev_attn_implementation"
_BACKENDS = ("auto",) + tuple(ouroboros_kernels.BACKENDS)


@dataclass
class TreeSpec:
    """The token tree of one verification forward.

    prefix_len : number of cache entries before the tree (all visible to every tree token, within a sliding window):
        a Python int, or an int32/int64 tensor of shape () or (B,) on the model device (read by the kernel).
    mask : packed int32 on the model device; bit j of row i set iff token i sees token j. ``(T, ceil(T/32))``: one
        tree for every batch row; ``(B, T, ceil(T/32))``: batch row b verifies its own tree ``mask[b]`` (contract v3,
        passed to the kernel as is). None: a causal chain (prefill).
    depths : int64 ``(T,)``, or ``(B, T)`` with a per-row mask; tree token i (of row b) has position ``prefix_len[b] +
        depths[b, i]`` (``popcount(mask row i) - 1``; the kernel derives it from the mask, the caller passes the same
        positions as ``position_ids``).
    """

    prefix_len: int | torch.Tensor
    mask: torch.Tensor | None
    depths: torch.Tensor


def tree_call_kwargs(spec: TreeSpec) -> dict:
    """Keyword arguments that make a patched model's forward verify the tree ``spec``: ``ouro_tree`` plus an empty 4-D
    ``attention_mask``, so transformers builds no mask at all (a 4-D mask is used as given; ours ignores it)."""
    device = spec.depths.device
    return {"ouro_tree": spec, "attention_mask": torch.ones((1, 1, 0, 0), dtype=torch.bool, device=device)}


# ------------------------------------------------------------------------------------------------------ dense fallback
def _dense_attention(q, k, v, visible, scale, softcap):
    """Exact attention with an explicit 4-D mask; ``visible`` is bool (True = attend) or additive float,
    broadcastable to ``(B, Hq, T, S)``. Used only for masks given by transformers or the caller (padding)."""
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


# ------------------------------------------------------------------------------------------------- kernel choice
def _resolve_backend(requested: str, q: torch.Tensor) -> str:
    """The kernel backend for this call: "auto" steps down from "cuda" where its kernel does not apply (see
    :func:`ouroboros_kernels.attention.resolve_backend`); a named backend is used as asked."""
    return resolve_backend(q, None if requested == "auto" else requested)


def _tree_kernel(requested: str, q: torch.Tensor):
    """``(tree-attention function, backend argument)`` for this call.

    Eager: the kernel dispatcher with the backend resolved here. Under ``torch.compile`` tracing: the custom op of
    :mod:`ouroboros_kernels.custom_ops` (one opaque graph node, so the forward stays one graph), given the backend as
    requested (None for "auto") and resolving it when it runs: the choice reads caches and imports, which dynamo
    cannot trace. Eager calls skip the op's dispatch, which costs ~25-35 us per call on a CPU.
    """
    if torch.compiler.is_compiling():
        return custom_ops.tree_attention, None if requested == "auto" else requested
    return ouroboros_kernels.tree_attention, _resolve_backend(requested, q)


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
    kernel, backend = _tree_kernel(getattr(module, _BACKEND_ATTR, "auto"), query)
    b, hq, t, d = query.shape
    s = key.shape[2]
    scale = d ** -0.5 if scaling is None else scaling
    window = sliding_window if sliding_window else None

    if ouro_tree is not None:
        p = ouro_tree.prefix_len
        if not isinstance(p, torch.Tensor):
            p = int(p)
            if p + t > s:
                raise ValueError(
                    f"ouro_tree.prefix_len ({p}) + T ({t}) exceeds the {s} keys of layer "
                    f"{getattr(module, 'layer_idx', '?')}: the cache must keep the full history (use DynamicCache() "
                    "without a config, not a sliding-window cache)")
        out = kernel(query, key, value, p, ouro_tree.mask, scale, window=window, softcap=softcap, backend=backend)
    elif attention_mask is None:
        # Keys are contiguous positions ending at the last query (also in a sliding-window cache layer, which keeps
        # the newest entries): bottom-right causal, the window in index space.
        out = kernel(query, key, value, s - t, None, scale, window=window, softcap=softcap, backend=backend)
    elif attention_mask.dim() == 4 and attention_mask.numel() == 0:
        raise ValueError(f"layer {getattr(module, 'layer_idx', '?')} got tree_call_kwargs' empty mask but no "
                         f"ouro_tree: {type(module).__name__}'s decoder layer drops extra keyword arguments, so the "
                         "tree cannot reach ouroboros attention; pass dense 4-D masks to this model instead")
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
    q_length, kv_length, q_offset = kwargs.get("q_length"), kwargs.get("kv_length"), kwargs.get("q_offset", 0)
    if kwargs.get("attention_mask") is None and not isinstance(q_offset, torch.Tensor) \
            and q_length is not None and kv_length is not None and q_offset + q_length == kv_length:
        return None
    mask = sdpa_mask(*args, **kwargs)
    if mask is None and not (q_length == 1 or q_length == kv_length):
        mask = sdpa_mask(*args, **{**kwargs, "allow_is_causal_skip": False})
    return mask


def _register() -> None:
    AttentionInterface.register(ATTN_NAME, ouroboros_attention)
    AttentionMaskInterface.register(ATTN_NAME, _ouroboros_mask)


# ------------------------------------------------------------------------------------------------------- public API
def is_patched(model: torch.nn.Module) -> bool:
    """True when ``model``'s attention runs through ouroboros."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) == ATTN_NAME


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
        reason = patch_refusal(model)      # no AttentionInterface, or layers that drop the tree kwarg
        if reason is not None:
            raise ValueError(reason)
        prev = model.config._attn_implementation
        model.set_attn_implementation(ATTN_NAME)
        if not is_patched(model):
            raise ValueError(f"transformers refused to switch {type(model).__name__} to {ATTN_NAME!r}")
        setattr(model, _PREV_ATTR, prev)
    for m in attention_modules(model):
        setattr(m, _BACKEND_ATTR, backend)
    return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Restore the attention implementation ``model`` had before :func:`patch`; a no-op on an unpatched model."""
    if is_patched(model):
        prev = getattr(model, _PREV_ATTR, None) or "sdpa"
        model.set_attn_implementation(prev)
    if hasattr(model, _PREV_ATTR):
        delattr(model, _PREV_ATTR)
    for m in attention_modules(model):
        if hasattr(m, _BACKEND_ATTR):
            delattr(m, _BACKEND_ATTR)
    return model
