"""One forward of an unmodified HF model over a token tree appended to its KV cache (SPEC §2 step 3).

``ModelRunner`` owns a model's cache and the count of tokens it holds. Tree tokens get position ``prefix + depth``
and see the whole cache, their ancestors and themselves: through our patched attention (a packed bit mask travels as
the ``ouro_tree`` kwarg) or, on an unpatched model, through a 4D additive mask passed to ``forward``.
"""
from __future__ import annotations

import inspect
import time
from typing import Sequence

import torch

from ouroboros.core.tokentree import TokenTree
from ouroboros.hf.attention import TreeSpec, is_patched, tree_call_kwargs
from ouroboros.hf.cache import cache_length, crop_cache, keep_entries, new_cache
from ouroboros.hf.cpu_linear import small_m_linear
from ouroboros.hf.masks import dense_tree_masks
from ouroboros_kernels import ancestor_mask, pack_mask

__all__ = ["ModelRunner", "cache_kwarg", "timed_logits"]


def cache_kwarg(model) -> str:
    """The name ``model.forward`` takes the KV cache under ("cache" from transformers 5.x, else "past_key_values")."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def timed_logits(runner, logits: torch.Tensor, start: float) -> torch.Tensor:
    """``logits`` as float32, once the device has finished them; their time since ``start`` added to
    ``runner.forward_time`` (so the timing is honest)."""
    logits = logits.float()
    if logits.device.type == "cuda":
        torch.cuda.synchronize(logits.device)
    runner.forward_time += time.perf_counter() - start
    return logits


class ModelRunner:
    """A model, its KV cache, and counters. ``n_cached`` tokens of the sequence are in the cache."""

    def __init__(self, model) -> None:
        self.model = model
        self.config = model.config.get_text_config()
        self.device = model.device
        self.cache = new_cache()
        self._cache_kw = cache_kwarg(model)
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.forwards = 0
        self.forward_time = 0.0
        self.gathers = 0

    @property
    def n_cached(self) -> int:
        return cache_length(self.cache)

    def _call(self, ids: torch.Tensor, **kw):
        kw[self._cache_kw] = self.cache
        start = time.perf_counter()
        with small_m_linear(self.model, enabled=self.device.type == "cpu"):
            out = self.model(input_ids=ids, use_cache=True, **kw)
        self.forwards += 1
        return out, start

    def prefill(self, tokens: Sequence[int]) -> None:
        """Put ``tokens`` (may be empty) into the cache with one causal forward."""
        if not tokens:
            return
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
        kw = {"logits_to_keep": 1} if self._logits_to_keep else {}
        out, start = self._call(ids, **kw)
        out.logits.sum().item()  # wait for the device so the timing is honest
        self.forward_time += time.perf_counter() - start

    def forward_tree(self, tree: TokenTree) -> list[int]:
        """Append ``tree`` to the cache, run one forward, return the model's argmax token at every node."""
        logits, start = self._tree_logits(tree)
        argmax = logits.argmax(-1).tolist()
        self.forward_time += time.perf_counter() - start
        return argmax

    def forward_tree_logits(self, tree: TokenTree) -> torch.Tensor:
        """Like :meth:`forward_tree`, but return the raw logits (T, V) of every node, float32 on the model device."""
        logits, start = self._tree_logits(tree)
        return timed_logits(self, logits, start)

    def _tree_logits(self, tree: TokenTree) -> tuple[torch.Tensor, float]:
        """One forward of ``tree`` appended to the cache: its logits (T, V) in the model dtype and the start time."""
        prefix = self.n_cached
        ids = torch.tensor([tree.tokens], dtype=torch.long, device=self.device)
        pos = torch.tensor([tree.depths], dtype=torch.long, device=self.device) + prefix
        if is_patched(self.model):
            packed = pack_mask(ancestor_mask(tree.parents)).to(self.device)
            kw = tree_call_kwargs(TreeSpec(prefix_len=prefix, mask=packed, depths=pos[0] - prefix))
        else:
            mask = dense_tree_masks(self.config, prefix, tree.parents, tree.depths, self.model.dtype, self.device)
            kw = {"attention_mask": mask}
        out, start = self._call(ids, position_ids=pos, **kw)
        return out.logits[0], start

    def keep(self, prefix_len: int, nodes: Sequence[int]) -> None:
        """After ``forward_tree``: keep the cache prefix plus the entries of ``nodes`` (a root-down path)."""
        if list(nodes) != list(range(len(nodes))):
            self.gathers += 1
        keep_entries(self.cache, prefix_len, nodes)

    def rollback(self, length: int) -> None:
        """Keep only the first ``length`` cached tokens."""
        if length < self.n_cached:
            crop_cache(self.cache, length)
