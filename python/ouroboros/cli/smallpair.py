"""A small target/draft pair built in code, for the demo when no pretrained pair is installed.

The target is a random 12-layer Llama whose upper layers are damped; the draft is its first layer plus the shared
embedding, final norm and head (an early exit). The draft therefore costs ~1/12 of the target and agrees with it
often, as a real small model of the same family does. Random weights: the text is meaningless, only speed and
exactness are shown. The pair has no tokenizer; :class:`SmallTokenizer` spells each token id as a made-up word.
"""
from __future__ import annotations

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

__all__ = ["SmallTokenizer", "small_pair", "small_prompt", "SMALL_VOCAB"]

SMALL_VOCAB = 4096
_ONSETS = "bdfghklmnprstvwz"      # 16 x 4 vowels = 64 syllables; two syllables name each of the 4096 ids
_VOWELS = "aeio"
_SPECIAL = {0: "<pad>", 1: "<s>", 2: "</s>"}


def small_pair(seed: int = 0, damp: float = 0.03) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """(target, draft), float32, eval mode, EOS disabled."""
    cfg = LlamaConfig(vocab_size=SMALL_VOCAB, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
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
    head = torch.randint(3, SMALL_VOCAB, (length // 2,), generator=gen).tolist()
    return head + head[: length - len(head)]


class SmallTokenizer:
    """A stand-in for the small pair's missing tokenizer: id ``i`` decodes to the made-up two-syllable word
    :meth:`word` (one per id, so distinct tokens read differently); ids 0-2 are the special ``<pad>``, ``<s>``,
    ``</s>``. It only decodes (``decode`` has the signature of a Hugging Face tokenizer's)."""

    @staticmethod
    def word(token: int) -> str:
        if token in _SPECIAL:
            return _SPECIAL[token]
        if not 0 <= token < SMALL_VOCAB:
            raise ValueError(f"token id {token} is outside the small pair's vocabulary [0, {SMALL_VOCAB})")
        return "".join(_ONSETS[s // 4] + _VOWELS[s % 4] for s in divmod(token, 64))

    def decode(self, tokens, skip_special_tokens: bool = False) -> str:
        """The words of ``tokens`` joined by spaces (special tokens left out with ``skip_special_tokens``)."""
        ids = [int(t) for t in tokens]
        return " ".join(self.word(t) for t in ids if not (skip_special_tokens and t in _SPECIAL))
