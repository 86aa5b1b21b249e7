"""A small target/draft pair built in code, for the demo when no pretrained pair is installed.

The target is a random 12-layer Llama whose upper layers are damped; the draft is its first layer plus the shared
embedding, final norm and head (an early exit). The draft therefore costs ~1/12 of the target and agrees with it
often, as a real small model of the same family does. Random weights: the text is meaningless, only speed and
exactness are shown.
"""
from __future__ import annotations

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

__all__ = ["small_pair", "small_prompt"]


def small_pair(seed: int = 0, damp: float = 0.03) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """(target, draft), float32, eval mode, EOS disabled."""
    cfg = LlamaConfig(vocab_size=4096, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=4096,
                      eos_token_id=None, pad_token_id=0, bos_token_id=1)
    torch.manual_seed(seed)
    target = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in target.model.layers[1:]:
            layer.self_attn.o_proj.weight.mul_(damp)
            layer.mlp.down_proj.weight.mul_(damp)
    dcfg = copy.deepcopy(cfg)
    dcfg.num_hidden_layers = 1
    draft = LlamaForCausalLM(dcfg).eval()
    draft.load_state_dict({k: v for k, v in target.state_dict().items()
                           if not k.startswith("model.layers.") or k.startswith("model.layers.0.")})
    for model in (target, draft):
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
    return target, draft


def small_prompt(length: int = 96, seed: int = 1) -> list[int]:
    """A prompt with some repetition (as code and chat have), in the small pair's vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    head = torch.randint(3, 4096, (length // 2,), generator=gen).tolist()
    return head + head[: length - len(head)]
