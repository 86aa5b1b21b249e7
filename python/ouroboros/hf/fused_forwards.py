"""The fused forwards :func:`~ouroboros.hf.fused_glue.apply_fused_glue` installs on a Llama-family model's modules:
RMSNorm as one kernel, q/k/v and gate/up as one GEMM each, RoPE and SwiGLU as one kernel each, the post-attention
norm fused with the residual add. Same signatures and results as the transformers forwards they replace."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.deprecation import deprecate_kwarg

from ouroboros_kernels import glue

__all__ = ["GlueFamily", "fused_forward", "BACKEND_ATTR", "FAMILY_ATTR", "PACK_ATTR"]

BACKEND_ATTR = "_ouroboros_glue_backend"      # on a fused module: the glue kernels' backend
FAMILY_ATTR = "_ouroboros_glue_family"        # on a fused attention module: its GlueFamily
PACK_ATTR = "_ouroboros_glue_packed"          # on a fused attention/MLP module: its PackedLinears


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




def _backend(module: nn.Module) -> str | None:
    name = getattr(module, BACKEND_ATTR, "auto")
    return None if name == "auto" else name



def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm.forward as one kernel."""
    return glue.rms_norm(hidden_states, self.weight, self.variance_epsilon, backend=_backend(self))


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """LlamaMLP.forward: ``down(silu(gate(x)) * up(x))`` with gate/up as one GEMM and the SwiGLU as one kernel."""
    gate_up = F.linear(x, *getattr(self, PACK_ATTR).weight_and_bias())
    return self.down_proj(glue.swiglu_fused(gate_up, backend=_backend(self)))


def _attention_forward(self, hidden_states: torch.Tensor,
                       position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                       attention_mask: torch.Tensor | None = None, cache=None, **kwargs):
    """LlamaAttention.forward (Mistral/Qwen2/Qwen3 variants) with q/k/v as one GEMM and RoPE as one kernel; from the
    cache update on, transformers' code unchanged."""
    family: GlueFamily = getattr(self, FAMILY_ATTR)
    backend = _backend(self)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    qkv = F.linear(hidden_states, *getattr(self, PACK_ATTR).weight_and_bias())
    q, k, v = qkv.split([self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features], dim=-1)
    q, k = q.view(hidden_shape), k.view(hidden_shape)
    if family.qk_norm:
        q, k = self.q_norm(q), self.k_norm(k)
    cos, sin = position_embeddings
    query_states, key_states = glue.rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin, backend=backend)
    value_states = v.view(hidden_shape).transpose(1, 2)

    if cache is not None:
        key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

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
    return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(fn)


_FORWARDS: dict[str, Callable] = {}


def fused_forward(kind: str) -> Callable:
    """The fused forward of ``kind``: \"norm\", \"mlp\", \"attention\" or \"layer\" (the decoder layer)."""
    if not _FORWARDS:
        _FORWARDS.update(norm=_rms_norm_forward, mlp=_mlp_forward,
                         attention=_with_cache_rename(_attention_forward),
                         layer=_with_cache_rename(_decoder_layer_forward))
    return _FORWARDS[kind]
