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

from ouroboros_kernels import ancestor_mask, pack_mask

from .cache import cache_length, crop_cache, keep_entries, new_cache
from .cpu_linear import small_m_linear
from .tokentree import TokenTree

__all__ = ["ATTENTION_LAYER_TYPES", "ModelRunner", "cache_kwarg", "dense_tree_masks", "layer_masks",
           "uses_our_attention"]

# the layer types whose cache can be cut back to the accepted tokens, and so verify token trees
ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})


def cache_kwarg(model) -> str:
    """The name ``model.forward`` takes the KV cache under ("cache" from transformers 5.x, else "past_key_values")."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def uses_our_attention(model) -> bool:
    """True when ``ouroboros.patch`` routed this model's attention through our kernels."""
    try:
        from .patch import is_patched
    except ImportError:
        return False
    return is_patched(model)


def layer_masks(config, visible: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, dtype: torch.dtype):
    """4D additive mask(s) ``(1, 1, T, S)`` for HF ``forward`` from a boolean visibility ``(T, S)``.

    ``q_pos``/``k_pos`` are the logical positions of queries and keys. Returns one tensor, or a dict
    ``layer_type -> mask`` for models that mix sliding and full attention layers. Sliding windows follow HF's rule
    (key position > query position - window). Pure tensor ops: no host sync, graph-capturable.
    """
    def additive(mask: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        return torch.where(mask, zero, torch.finfo(dtype).min)[None, None]

    def windowed(window: int) -> torch.Tensor:
        return visible & (k_pos[None, :] > q_pos[:, None] - window)

    window = getattr(config, "sliding_window", None)
    layer_types = set(getattr(config, "layer_types", None) or [])
    if layer_types - ATTENTION_LAYER_TYPES:
        raise ValueError(f"layer types {sorted(layer_types - ATTENTION_LAYER_TYPES)} are not supported by ouroboros "
                         "tree verification")
    if "sliding_attention" in layer_types:
        return {kind: additive(windowed(window) if kind == "sliding_attention" else visible) for kind in layer_types}
    if window is not None and not layer_types and getattr(config, "use_sliding_window", True):
        return additive(windowed(window))
    return additive(visible)


def dense_tree_masks(config, prefix_len: int, parents: Sequence[int], depths: Sequence[int],
                     dtype: torch.dtype, device: torch.device):
    """The 4D mask(s) ``(1, 1, T, prefix_len + T)`` for a tree appended to ``prefix_len`` cached tokens."""
    t = len(parents)
    visible = torch.cat([torch.ones(t, prefix_len, dtype=torch.bool), ancestor_mask(parents)], dim=1).to(device)
    q_pos = prefix_len + torch.as_tensor(list(depths), dtype=torch.long, device=device)
    k_pos = torch.cat([torch.arange(prefix_len, device=device), q_pos])
    return layer_masks(config, visible, q_pos, k_pos, dtype)


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
        if uses_our_attention(self.model):
            from .patch import TreeSpec, tree_call_kwargs
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
