"""Fused glue for Llama-family models, Liger style: fewer kernels per decoder layer, same outputs.

``apply_fused_glue(model)`` rewires a live transformers model (``model_type`` in :data:`FUSED_GLUE_PATCHES`: llama,
mistral, qwen2, qwen3 share ``LlamaDecoderLayer``'s structure in transformers 5.x) so that each decoder layer runs

* every RMSNorm as one kernel (:func:`ouroboros_kernels.rms_norm`), the post-attention one fused with the residual add
  before it (the decoder layer's forward is replaced by an equivalent one: same signature, same return);
* q/k/v as ONE GEMM over a concatenated weight (and bias, Qwen2), RoPE of q and k as one kernel
  (:func:`ouroboros_kernels.rope`; Qwen3's q_norm/k_norm before it as fused norms), then HF's own attention tail
  unchanged: ``cache.update``, ``ALL_ATTENTION_FUNCTIONS`` dispatch (so ``ouroboros.patch``'s tree attention still runs
  and extra kwargs such as ``ouro_tree`` pass through), ``o_proj``;
* the MLP's gate and up as ONE GEMM over a concatenated weight, then SwiGLU as one kernel
  (:func:`ouroboros_kernels.swiglu_fused`), then ``down_proj``.

Weights: ``q_proj``/``k_proj``/``v_proj`` (and ``gate_proj``/``up_proj``) keep their own ``Parameter`` objects, which
become adjacent views of one buffer, so ``state_dict``, ``named_parameters``, the parameter count and in-place loads
(``load_state_dict``) are unchanged, and each forward reads the concatenated weight as one strided view (no copy). A
conversion that gives each parameter its own storage (``model.to(...)``, ``.half()``) is noticed by the next forward,
which packs them again (one copy; not allowed during CUDA-graph capture). The shared buffer makes safetensors
refuse to save the model: :func:`revert_fused_glue` first. With autograd recording (grad enabled and weights requiring
grad) the concatenated weight is built by ``torch.cat`` instead, so gradients reach every part.

``revert_fused_glue(model)`` restores the original forwards and gives every parameter its own storage again: the
model then computes exactly what it did before patching. Composes with :func:`ouroboros.patch` in either order.
The kernels' backend follows ``ouroboros_kernels.glue`` ("triton" on CUDA; the PyTorch reference on CPU unless
"triton" is asked for under ``TRITON_INTERPRET=1``).

Requires transformers >= 5.0 (decoder layers and attention take ``cache=``, not ``past_key_values=``).
"""
from __future__ import annotations

import inspect
import types
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from ouroboros.hf.fused_forwards import (
    BACKEND_ATTR,
    FAMILY_ATTR,
    PACK_ATTR,
    GlueFamily,
    fused_forward,
)
from ouroboros.hf.packed_linear import PackedLinears
from ouroboros_kernels import glue

__all__ = ["apply_fused_glue", "revert_fused_glue", "is_fused", "FUSED_GLUE_PATCHES", "GlueFamily",
           "apply_fused_glue_to_llama", "apply_fused_glue_to_mistral", "apply_fused_glue_to_qwen2",
           "apply_fused_glue_to_qwen3"]

_STATE_ATTR = "_ouroboros_fused_glue"
_BACKENDS = ("auto", "triton", "reference")
_SILU = ("silu", "swish")


LLAMA = GlueFamily("Llama")
MISTRAL = GlueFamily("Mistral", window=lambda attn: getattr(attn.config, "sliding_window", None))
QWEN2 = GlueFamily("Qwen2", window=lambda attn: attn.sliding_window)
QWEN3 = GlueFamily("Qwen3", qk_norm=True, window=lambda attn: attn.sliding_window)


@dataclass
class _FusedState:
    """What :func:`apply_fused_glue` changed on one model: the modules whose forward it replaced and the groups of
    linear layers whose weights (and biases) it packed into one buffer each."""

    model_type: str
    backend: str
    modules: list[nn.Module] = field(default_factory=list)
    packs: list[PackedLinears] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------------ structure
def _check_linear(module: nn.Module, owner: str, name: str) -> nn.Linear:
    lin = getattr(module, name, None)
    if type(lin) is not nn.Linear:
        raise ValueError(f"fused glue: {owner}.{name} is {type(lin).__name__}, not a plain nn.Linear (quantized or "
                         f"adapter layers cannot be fused)")
    if lin._forward_hooks or lin._forward_pre_hooks:
        raise ValueError(f"fused glue: {owner}.{name} has forward hooks, which a fused GEMM would skip")
    return lin


def _check_forward_free(module: nn.Module, what: str) -> None:
    if "forward" in module.__dict__:
        raise ValueError(f"fused glue: {what} already has an instance-level forward (accelerate hooks or another "
                         f"patch); refusing to replace it")


def _takes(cls: type, *names: str) -> bool:
    params = inspect.signature(inspect.unwrap(cls.forward)).parameters
    return all(n in params for n in names)


def _layers(model: nn.Module, family: GlueFamily) -> list[nn.Module]:
    """The model's decoder layers, checked against the structure the fused forwards assume."""
    layers = [m for m in model.modules() if type(m).__name__ == f"{family.prefix}DecoderLayer"]
    if not layers:
        raise ValueError(f"fused glue: {type(model).__name__} has no {family.prefix}DecoderLayer modules")
    hidden_act = getattr(model.config, "hidden_act", None)
    if hidden_act not in _SILU:
        raise ValueError(f"fused glue: hidden_act {hidden_act!r} is not SiLU; the fused MLP computes SwiGLU")
    for i, layer in enumerate(layers):
        where = f"layer {i}"
        attn, mlp = layer.self_attn, layer.mlp
        if not _takes(type(layer), "cache", "position_embeddings") or \
                not _takes(type(attn), "cache", "position_embeddings"):
            raise ValueError(f"fused glue needs transformers >= 5.0 (decoder layers taking cache=); "
                             f"{type(layer).__name__}.forward does not")
        for lin in ("q_proj", "k_proj", "v_proj", "o_proj"):
            _check_linear(attn, f"{where}.self_attn", lin)
        for lin in ("gate_proj", "up_proj", "down_proj"):
            _check_linear(mlp, f"{where}.mlp", lin)
        for name in ("input_layernorm", "post_attention_layernorm"):
            norm = getattr(layer, name)
            if type(norm).__name__ != f"{family.prefix}RMSNorm":
                raise ValueError(f"fused glue: {where}.{name} is {type(norm).__name__}, not {family.prefix}RMSNorm")
        if family.qk_norm and not (hasattr(attn, "q_norm") and hasattr(attn, "k_norm")):
            raise ValueError(f"fused glue: {where}.self_attn lacks the q_norm/k_norm of {family.prefix}")
        for module, what in ((layer, where), (attn, f"{where}.self_attn"), (mlp, f"{where}.mlp")):
            _check_forward_free(module, what)
    return layers


def _set_forward(module: nn.Module, kind: str, backend: str, state: _FusedState) -> None:
    module.forward = types.MethodType(fused_forward(kind), module)
    setattr(module, BACKEND_ATTR, backend)
    state.modules.append(module)


def _patch_family(model: nn.Module, family: GlueFamily, backend: str = "auto") -> nn.Module:
    """Fuse the glue of every decoder layer of ``model`` (a ``family`` model) and of its RMSNorm modules."""
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {_BACKENDS}")
    if backend != "auto":
        glue.resolve_glue_backend(next(model.parameters()), backend)   # raises ValueError if it cannot run here
    state = getattr(model, _STATE_ATTR, None)
    if state is not None:                              # already fused: only the backend changes
        state.backend = backend
        for m in state.modules:
            setattr(m, BACKEND_ATTR, backend)
        return model
    layers = _layers(model, family)
    norms = [m for m in model.modules() if type(m).__name__ == f"{family.prefix}RMSNorm"]
    for i, norm in enumerate(norms):
        if not (hasattr(norm, "weight") and hasattr(norm, "variance_epsilon")):
            raise ValueError(f"fused glue: {type(norm).__name__} #{i} lacks weight/variance_epsilon")
        _check_forward_free(norm, f"{type(norm).__name__} #{i}")
    state = _FusedState(model.config.model_type, backend)
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        for module, parts in ((attn, (attn.q_proj, attn.k_proj, attn.v_proj)), (mlp, (mlp.gate_proj, mlp.up_proj))):
            group = PackedLinears(parts)
            group.pack()
            setattr(module, PACK_ATTR, group)
            state.packs.append(group)
    for layer in layers:
        _set_forward(layer, "layer", backend, state)
        _set_forward(layer.self_attn, "attention", backend, state)
        setattr(layer.self_attn, FAMILY_ATTR, family)
        _set_forward(layer.mlp, "mlp", backend, state)
    for norm in norms:
        _set_forward(norm, "norm", backend, state)
    setattr(model, _STATE_ATTR, state)
    return model


def apply_fused_glue_to_llama(model: nn.Module, backend: str = "auto") -> nn.Module:
    """:func:`apply_fused_glue` for a ``LlamaForCausalLM`` (or ``LlamaModel``)."""
    return _patch_family(model, LLAMA, backend)


def apply_fused_glue_to_mistral(model: nn.Module, backend: str = "auto") -> nn.Module:
    """:func:`apply_fused_glue` for Mistral (its attention passes ``config.sliding_window``)."""
    return _patch_family(model, MISTRAL, backend)


def apply_fused_glue_to_qwen2(model: nn.Module, backend: str = "auto") -> nn.Module:
    """:func:`apply_fused_glue` for Qwen2 (q/k/v biases are packed like the weights; per-layer sliding windows)."""
    return _patch_family(model, QWEN2, backend)


def apply_fused_glue_to_qwen3(model: nn.Module, backend: str = "auto") -> nn.Module:
    """:func:`apply_fused_glue` for Qwen3 (q_norm/k_norm over the head dim before RoPE run as fused norms)."""
    return _patch_family(model, QWEN3, backend)


#: ``config.model_type`` -> patch function (every family whose decoder layer is LlamaDecoderLayer's in transformers 5).
FUSED_GLUE_PATCHES: dict[str, Callable[..., nn.Module]] = {
    "llama": apply_fused_glue_to_llama,
    "mistral": apply_fused_glue_to_mistral,
    "qwen2": apply_fused_glue_to_qwen2,
    "qwen3": apply_fused_glue_to_qwen3,
}


# ------------------------------------------------------------------------------------------------------- public API
def is_fused(model: nn.Module) -> bool:
    """True when :func:`apply_fused_glue` has rewired ``model`` (and :func:`revert_fused_glue` has not undone it)."""
    return getattr(model, _STATE_ATTR, None) is not None


def apply_fused_glue(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Rewire the live ``model`` (a transformers model of a family in :data:`FUSED_GLUE_PATCHES`) to the fused glue
    kernels (module docstring); returns ``model``.

    ``backend``: "auto" (``ouroboros_kernels.glue``'s choice per call), "triton" or "reference". Idempotent (applying
    again only changes the backend); undone by :func:`revert_fused_glue`. Outputs equal the unpatched model's within
    floating-point rounding of the reordered reductions (fp32: ~1e-6 relative).

    Raises
    ------
    ValueError
        For a ``model_type`` not in the table (naming it), a structure that differs from what the family's fused
        forwards assume (non-``nn.Linear`` projections, hooks on them, a non-SiLU MLP, modules whose forward was
        already replaced on the instance), or a backend that cannot run on the model's device.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FUSED_GLUE_PATCHES:
        raise ValueError(f"fused glue does not support model_type {model_type!r} ({type(model).__name__}); "
                         f"supported: {sorted(FUSED_GLUE_PATCHES)}")
    return FUSED_GLUE_PATCHES[model_type](model, backend)


def revert_fused_glue(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_fused_glue`: the original forwards come back and every packed parameter gets its own
    contiguous storage (same values), so the model computes exactly what it did before. A no-op on an unfused
    model; returns ``model``."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        return model
    for module in state.modules:
        module.__dict__.pop("forward", None)
        for attr in (BACKEND_ATTR, FAMILY_ATTR, PACK_ATTR):
            if hasattr(module, attr):
                delattr(module, attr)
    for group in state.packs:
        group.unpack()
    delattr(model, _STATE_ATTR)
    return model
