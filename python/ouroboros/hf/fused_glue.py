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
import sys
import types
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ouroboros_kernels import glue

__all__ = ["apply_fused_glue", "revert_fused_glue", "is_fused", "FUSED_GLUE_PATCHES", "GlueFamily",
           "apply_fused_glue_to_llama", "apply_fused_glue_to_mistral", "apply_fused_glue_to_qwen2",
           "apply_fused_glue_to_qwen3"]

_STATE_ATTR = "_ouroboros_fused_glue"
_BACKEND_ATTR = "_ouroboros_glue_backend"
_FAMILY_ATTR = "_ouroboros_glue_family"
_PACK_ATTR = "_ouroboros_glue_packed"
_BACKENDS = ("auto", "triton", "reference")
_SILU = ("silu", "swish")


@dataclass(frozen=True)
class GlueFamily:
    """How one family lays out the Llama decoder layer (class names ``{prefix}DecoderLayer``, ``{prefix}Attention``,
    ``{prefix}MLP``, ``{prefix}RMSNorm``).

    qk_norm : RMSNorm of q and k over the head dim before RoPE (Qwen3's ``q_norm``/``k_norm``).
    window : the ``sliding_window`` keyword its attention passes to the attention function, read off the attention
        module (None: the family passes none).
    """

    prefix: str
    qk_norm: bool = False
    window: Callable[[nn.Module], int | None] | None = None


LLAMA = GlueFamily("Llama")
MISTRAL = GlueFamily("Mistral", window=lambda attn: getattr(attn.config, "sliding_window", None))
QWEN2 = GlueFamily("Qwen2", window=lambda attn: attn.sliding_window)
QWEN3 = GlueFamily("Qwen3", qk_norm=True, window=lambda attn: attn.sliding_window)


# ---------------------------------------------------------------------------------------------------- packed weights
def _adjacent(ts: list[torch.Tensor]) -> bool:
    """True when ``ts`` are contiguous, of one dtype and device, and lie back to back inside the first one's storage
    (so one strided view of the first covers them all)."""
    first = ts[0]
    es = first.element_size()
    ptr = first.data_ptr()
    for t in ts:
        if t.data_ptr() != ptr or t.dtype != first.dtype or not t.is_contiguous():
            return False
        ptr += t.numel() * es
    storage = first.untyped_storage()
    return ptr <= storage.data_ptr() + storage.nbytes()


def _pack(parts: tuple[nn.Linear, ...], name: str) -> None:
    """Make the ``name`` parameters ("weight" or "bias") of ``parts`` adjacent views of one new buffer (values and
    Parameter objects unchanged)."""
    params = [getattr(p, name) for p in parts]
    if params[0].is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("fused glue: the packed q/k/v or gate/up weights were moved or converted since the last "
                           "forward; run one forward outside CUDA-graph capture to pack them again")
    with torch.inference_mode(False), torch.no_grad():   # a normal tensor, so later in-place loads still work
        buf = torch.cat([p.detach() for p in params], 0)
        start = 0
        for p in params:
            p.data = buf[start:start + p.shape[0]]
            start += p.shape[0]


def _unpack(parts: tuple[nn.Linear, ...], name: str) -> None:
    """Give each ``name`` parameter of ``parts`` its own contiguous storage again (values unchanged)."""
    with torch.inference_mode(False), torch.no_grad():
        for p in parts:
            t = getattr(p, name)
            if t is not None:
                t.data = t.detach().clone()


class PackedLinears:
    """A group of linear layers (q/k/v, or gate/up) whose weights, and biases, are adjacent views of one buffer each,
    with the concatenated views one GEMM uses.

    :meth:`weight_and_bias` costs a pointer comparison per part when nothing moved; a conversion that split the
    parameters (new data pointers) makes it pack them again. The cached views keep the buffer they view alive until
    then, so the pointers they were checked against cannot be reused by another allocation.
    """

    __slots__ = ("parts", "_ptrs", "_views")

    def __init__(self, parts: tuple[nn.Linear, ...]) -> None:
        self.parts = parts
        self._ptrs: tuple[int, ...] | None = None
        self._views: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def _params(self, name: str) -> list[torch.Tensor | None]:
        return [p._parameters[name] for p in self.parts]

    def _data_ptrs(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for name in ("weight", "bias") for t in self._params(name) if t is not None)

    def pack(self) -> None:
        """Make the parts' weights (and biases) adjacent views of one buffer each, unless they already are."""
        for name in ("weight", "bias"):
            if self.parts[0]._parameters[name] is not None and not _adjacent(self._params(name)):
                _pack(self.parts, name)
        views = []
        with torch.inference_mode(False), torch.no_grad():   # plain views, usable in and out of inference mode
            for name in ("weight", "bias"):
                ts = self._params(name)
                first = ts[0]
                views.append(None if first is None else first.detach().as_strided(
                    (sum(t.shape[0] for t in ts), *first.shape[1:]), first.stride()))
        self._views = (views[0], views[1])
        self._ptrs = self._data_ptrs()

    def unpack(self) -> None:
        """Give every part's parameters their own contiguous storage again (values unchanged)."""
        self._ptrs = self._views = None
        for name in ("weight", "bias"):
            _unpack(self.parts, name)

    def weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The concatenated (along dim 0) weight and bias (None without biases): views of the shared buffers, or, while
        autograd records a part that requires grad, ``torch.cat`` copies through which gradients reach every part."""
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for name in ("weight", "bias") for t in self._params(name)):
            w, b = self._params("weight"), self._params("bias")
            return torch.cat(w, 0), (None if b[0] is None else torch.cat(b, 0))
        if self._views is not None and torch.compiler.is_compiling():
            return self._views          # traced: a data-pointer check would break the graph (packed when compiled)
        if self._data_ptrs() != self._ptrs:
            self.pack()
        return self._views


@dataclass
class _FusedState:
    """What :func:`apply_fused_glue` changed on one model: the modules whose forward it replaced and the groups of
    linear layers whose weights (and biases) it packed into one buffer each."""

    model_type: str
    backend: str
    modules: list[nn.Module] = field(default_factory=list)
    packs: list[PackedLinears] = field(default_factory=list)


def _backend(module: nn.Module) -> str | None:
    name = getattr(module, _BACKEND_ATTR, "auto")
    return None if name == "auto" else name


# ------------------------------------------------------------------------------------------------- patched forwards
def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm.forward as one kernel."""
    return glue.rms_norm(hidden_states, self.weight, self.variance_epsilon, backend=_backend(self))


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """LlamaMLP.forward: ``down(silu(gate(x)) * up(x))`` with gate/up as one GEMM and the SwiGLU as one kernel."""
    gate_up = F.linear(x, *getattr(self, _PACK_ATTR).weight_and_bias())
    return self.down_proj(glue.swiglu_fused(gate_up, backend=_backend(self)))


def _attention_forward(self, hidden_states: torch.Tensor,
                       position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                       attention_mask: torch.Tensor | None = None, cache=None, **kwargs):
    """LlamaAttention.forward (Mistral/Qwen2/Qwen3 variants) with q/k/v as one GEMM and RoPE as one kernel; from the
    cache update on, transformers' code unchanged."""
    family: GlueFamily = getattr(self, _FAMILY_ATTR)
    backend = _backend(self)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    qkv = F.linear(hidden_states, *getattr(self, _PACK_ATTR).weight_and_bias())
    q, k, v = qkv.split([self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features], dim=-1)
    q, k = q.view(hidden_shape), k.view(hidden_shape)
    if family.qk_norm:
        q, k = self.q_norm(q), self.k_norm(k)
    cos, sin = position_embeddings
    query_states, key_states = glue.rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin, backend=backend)
    value_states = v.view(hidden_shape).transpose(1, 2)

    if cache is not None:
        key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    eager = sys.modules[type(self).__module__].eager_attention_forward
    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager)
    extra = {} if family.window is None else {"sliding_window": family.window(self)}
    attn_output, attn_weights = attention_interface(
        self, query_states, key_states, value_states, attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **extra, **kwargs)
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


def _decoder_layer_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                           position_ids: torch.LongTensor | None = None, cache=None, use_cache: bool | None = False,
                           position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                           **kwargs) -> torch.Tensor:
    """LlamaDecoderLayer.forward with the residual add fused into the post-attention RMSNorm (one kernel for both);
    same arguments and result. A post-attention norm carrying hooks is called as a module instead (hooks run)."""
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask,
                                      position_ids=position_ids, cache=cache, use_cache=use_cache,
                                      position_embeddings=position_embeddings, **kwargs)
    post = self.post_attention_layernorm
    if post._forward_hooks or post._forward_pre_hooks:
        residual = residual + hidden_states
        hidden_states = post(residual)
    else:
        hidden_states, residual = glue.rms_norm(hidden_states, post.weight, post.variance_epsilon, residual,
                                                backend=_backend(self))
    hidden_states = self.mlp(hidden_states)
    return residual + hidden_states


def _with_cache_rename(fn):
    """Wrap ``fn`` like transformers wraps the forwards it replaces: ``past_key_values=`` is renamed ``cache=``."""
    from transformers.utils.deprecation import deprecate_kwarg
    return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(fn)


_FORWARDS: dict[str, Callable] = {}


def _forward(kind: str) -> Callable:
    if not _FORWARDS:
        _FORWARDS.update(norm=_rms_norm_forward, mlp=_mlp_forward,
                         attention=_with_cache_rename(_attention_forward),
                         layer=_with_cache_rename(_decoder_layer_forward))
    return _FORWARDS[kind]


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
    module.forward = types.MethodType(_forward(kind), module)
    setattr(module, _BACKEND_ATTR, backend)
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
            setattr(m, _BACKEND_ATTR, backend)
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
            setattr(module, _PACK_ATTR, group)
            state.packs.append(group)
    for layer in layers:
        _set_forward(layer, "layer", backend, state)
        _set_forward(layer.self_attn, "attention", backend, state)
        setattr(layer.self_attn, _FAMILY_ATTR, family)
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
        for attr in (_BACKEND_ATTR, _FAMILY_ATTR, _PACK_ATTR):
            if hasattr(module, attr):
                delattr(module, attr)
    for group in state.packs:
        group.unpack()
    delattr(model, _STATE_ATTR)
    return model
