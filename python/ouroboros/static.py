"""The fast step path: a static KV cache whose length lives on the device, and CUDA-graph-captured tree forwards.

``StaticRunner`` has two faces:
- the host interface of :class:`ouroboros.forward.ModelRunner` (``n_cached``, ``prefill``, ``forward_tree``,
  ``keep``, ``rollback``), so the whole engine runs on it unchanged;
- a device interface (``forward_device``, ``commit_device``) whose inputs and outputs are device tensors of fixed
  shape: no host sync, so a drafting phase can run without the host and a forward can be replayed from a CUDA graph.

Rollback is a length update; accepted branch entries are gathered into contiguous slots by one index copy per layer.
Rejected slots are simply overwritten later: the mask is built from the length, so stale entries are never seen.
"""
from __future__ import annotations

import time
import warnings
from typing import Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ouroboros_kernels import ancestor_mask

from .forward import cache_kwarg, layer_masks
from .tokentree import TokenTree

__all__ = ["StaticKVCache", "StaticRunner", "BUCKETS"]

BUCKETS = (1, 16, 32, 64, 128, 256, 512)


class _StaticLayer(CacheLayerMixin):
    """Keys/values of one layer in a fixed ``(B, H, max_len, D)`` buffer; writes at ``length + arange(T)``."""

    is_compileable = True
    is_sliding = False

    def __init__(self, max_len: int, length: torch.Tensor) -> None:
        super().__init__()
        self.max_len, self.length = max_len, length

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> None:
        b, h, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = torch.zeros(b, h, self.max_len, d, dtype=key_states.dtype, device=key_states.device)
        self.values = torch.zeros(b, h, self.max_len, value_states.shape[-1], dtype=value_states.dtype,
                                  device=value_states.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        slots = self.length + torch.arange(key_states.shape[-2], device=key_states.device)
        self.keys.index_copy_(2, slots, key_states)
        self.values.index_copy_(2, slots, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return int(self.length)

    def get_max_length(self) -> int:
        return self.max_len

    def get_max_cache_shape(self) -> int:
        return self.max_len

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self.max_len, 0

    def reset(self) -> None:
        self.length.zero_()


class StaticKVCache(Cache):
    """A fixed-size cache for every layer, sharing one device length counter (advanced only by the runner)."""

    def __init__(self, num_layers: int, max_len: int, device: torch.device) -> None:
        self.length = torch.zeros((), dtype=torch.long, device=device)
        super().__init__(layers=[_StaticLayer(max_len, self.length) for _ in range(num_layers)])
        self.max_len = max_len

    def gather(self, prefix: torch.Tensor, src: torch.Tensor) -> None:
        """Copy slots ``prefix + src[i]`` to ``prefix + i`` in every layer (device tensors; fixed shape)."""
        dst = prefix + torch.arange(src.shape[0], device=src.device)
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys.index_copy_(2, dst, layer.keys.index_select(2, prefix + src))
                layer.values.index_copy_(2, dst, layer.values.index_select(2, prefix + src))


def _bucket(t: int) -> int:
    for b in BUCKETS:
        if t <= b:
            return b
    return t


class StaticRunner:
    """A model on a :class:`StaticKVCache`; see the module docstring for its two interfaces."""

    def __init__(self, model, max_len: int, use_graphs: bool | None = None) -> None:
        self.model = model
        self.config = model.config.get_text_config()
        self.device = model.device
        self.cache = StaticKVCache(self.config.num_hidden_layers, max_len, self.device)
        self._cache_kw = cache_kwarg(model)
        self._dtype = model.dtype
        self.use_graphs = (self.device.type == "cuda") if use_graphs is None else use_graphs
        self._graphs: dict[int, tuple] = {}
        self._n = 0                      # host mirror of cache.length (valid unless a device op ran since)
        self.forwards = 0
        self.forward_time = 0.0
        self.gathers = 0

    def fits(self, max_len: int) -> bool:
        """True if this runner can serve a call needing ``max_len`` slots on the model as it is now."""
        return (max_len <= self.cache.max_len and self.model.device == self.device
                and self.model.dtype == self._dtype)

    def reset(self) -> None:
        """Start empty (the buffers and captured graphs stay)."""
        self.cache.length.zero_()
        self._n = 0
        self.forwards, self.forward_time, self.gathers = 0, 0.0, 0

    # ---- device interface -------------------------------------------------------------------------------------
    def _forward_impl(self, ids: torch.Tensor, depths: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        """ids (1, T), depths (T,), bits (T, T) bool ancestor-or-self -> argmax (T,). Pure device ops."""
        t, max_len = ids.shape[1], self.cache.max_len
        prefix = self.cache.length
        cols = torch.arange(max_len, device=ids.device)
        rel = cols - prefix
        in_tree = (rel >= 0) & (rel < t)
        tree_vis = bits[:, rel.clamp(0, t - 1)] & in_tree[None, :]
        visible = (cols < prefix)[None, :] | tree_vis
        q_pos = prefix + depths
        k_pos = torch.where(in_tree, prefix + depths[rel.clamp(0, t - 1)], cols)
        mask = layer_masks(self.config, visible, q_pos, k_pos, self.model.dtype)
        kw = {self._cache_kw: self.cache}
        logits = self.model(input_ids=ids, position_ids=q_pos[None], attention_mask=mask, use_cache=True, **kw).logits
        return logits[0].argmax(-1)

    def forward_device(self, ids: torch.Tensor, depths: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        """One forward of a fixed-layout tree appended at the device length; the length is not advanced."""
        self.forwards += 1
        t = ids.shape[1]
        if not self.use_graphs:
            return self._forward_impl(ids, depths, bits)
        graph = self._graphs.get(t) or self._capture(t, ids, depths, bits)
        if graph is None:
            return self._forward_impl(ids, depths, bits)
        g, s_ids, s_depths, s_bits, s_out = graph
        s_ids.copy_(ids)
        s_depths.copy_(depths)
        s_bits.copy_(bits)
        g.replay()
        return s_out.clone()

    def _capture(self, t: int, ids, depths, bits):
        """Capture the forward for tree size ``t`` (once per size); None (and graphs off) if capture fails."""
        try:
            static = (ids.clone(), depths.clone(), bits.clone())
            saved = self.cache.length.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._forward_impl(*static)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._forward_impl(*static)
            self.cache.length.copy_(saved)
            self._graphs[t] = (graph, *static, out)
            return self._graphs[t]
        except Exception as err:  # a model whose forward syncs with the host cannot be captured
            warnings.warn(f"CUDA graph capture failed ({err}); running without graphs")
            self.use_graphs = False
            return None

    def commit_device(self, src: torch.Tensor, count: torch.Tensor) -> None:
        """Keep tree slots ``src[:count]`` (node indices, increasing) after the prefix; advance the length by count."""
        self.cache.gather(self.cache.length, src)
        self.cache.length.add_(count)
        self._n = None

    # ---- host interface (same as ModelRunner) -----------------------------------------------------------------
    @property
    def n_cached(self) -> int:
        if self._n is None:
            self._n = int(self.cache.length)
        return self._n

    def _check_room(self, t: int) -> None:
        if self.n_cached + t > self.cache.max_len:
            raise ValueError(f"static cache of {self.cache.max_len} slots is full ({self.n_cached} used, {t} more "
                             f"needed); pass a larger max_len")

    def prefill(self, tokens: Sequence[int]) -> None:
        if not tokens:
            return
        self._check_room(len(tokens))
        start = time.perf_counter()
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
        depths = torch.arange(len(tokens), device=self.device)
        bits = torch.ones(len(tokens), len(tokens), dtype=torch.bool, device=self.device).tril()
        self.forwards += 1
        self._forward_impl(ids, depths, bits)
        self.cache.length.add_(len(tokens))
        self._n += len(tokens)
        self.forward_time += time.perf_counter() - start

    def forward_tree(self, tree: TokenTree) -> list[int]:
        """Padded to a bucket size (pad nodes see only the cache and themselves, and are never kept)."""
        t = len(tree)
        b = _bucket(t)
        self._check_room(b)
        start = time.perf_counter()
        ids = torch.zeros(1, b, dtype=torch.long)
        ids[0, :t] = torch.tensor(tree.tokens)
        depths = torch.zeros(b, dtype=torch.long)
        depths[:t] = torch.tensor(tree.depths)
        bits = torch.eye(b, dtype=torch.bool)
        bits[:t, :t] = ancestor_mask(tree.parents)
        argmax = self.forward_device(ids.to(self.device), depths.to(self.device), bits.to(self.device))
        out = argmax[:t].tolist()
        self.forward_time += time.perf_counter() - start
        return out

    def keep(self, prefix_len: int, nodes: Sequence[int]) -> None:
        if list(nodes) != list(range(len(nodes))):
            self.gathers += 1
            src = torch.tensor(list(nodes), dtype=torch.long, device=self.device)
            self.cache.gather(self.cache.length, src)
        self.cache.length.add_(len(nodes))
        self._n = prefix_len + len(nodes)

    def rollback(self, length: int) -> None:
        if length < self.n_cached:
            self.cache.length.fill_(length)
            self._n = length
