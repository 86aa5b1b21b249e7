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

import os
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
    """Keys/values of one layer in a fixed ``(B, H, max_len, D)`` buffer; writes at ``length + arange(T)``.

    The buffers are views into the owning cache's stacked ``(L, B, H, max_len, D)`` tensors when every layer has the
    first layer's shape (so one index copy moves a slot in all layers), else the layer's own tensors.
    """

    is_compileable = True
    is_sliding = False

    def __init__(self, owner: "StaticKVCache", index: int) -> None:
        super().__init__()
        self.owner, self.index = owner, index
        self.max_len, self.length = owner.max_len, owner.length

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys, self.values = self.owner._buffers_for(self.index, key_states, value_states)
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
        self.max_len = max_len
        self.stacked: tuple[torch.Tensor, torch.Tensor] | None = None   # (L, B, H, max_len, D) keys and values
        self._own: list[int] = []                                       # layers outside the stacked buffers
        super().__init__(layers=[_StaticLayer(self, i) for i in range(num_layers)])

    def _buffers_for(self, index: int, key_states: torch.Tensor, value_states: torch.Tensor):
        b, h, _, d = key_states.shape
        shape_k, shape_v = (b, h, self.max_len, d), (b, h, self.max_len, value_states.shape[-1])
        if self.stacked is None:
            n = len(self.layers)
            self.stacked = (key_states.new_zeros((n, *shape_k)), value_states.new_zeros((n, *shape_v)))
        k_all, v_all = self.stacked
        if (k_all.shape[1:], v_all.shape[1:]) == (shape_k, shape_v) and k_all.dtype == key_states.dtype:
            return k_all[index], v_all[index]
        self._own.append(index)
        return key_states.new_zeros(shape_k), value_states.new_zeros(shape_v)

    def gather(self, prefix: torch.Tensor, src: torch.Tensor) -> None:
        """Copy slots ``prefix + src[i]`` to ``prefix + i`` in every layer (device tensors; fixed shape)."""
        dst = prefix + torch.arange(src.shape[0], device=src.device)
        idx = prefix + src
        if self.stacked is not None:
            for buf in self.stacked:
                buf.index_copy_(3, dst, buf.index_select(3, idx))
        for i in self._own:
            layer = self.layers[i]
            layer.keys.index_copy_(2, dst, layer.keys.index_select(2, idx))
            layer.values.index_copy_(2, dst, layer.values.index_select(2, idx))


def default_compile() -> bool:
    """Whether fast-path runners compile their forward when not told: ``OUROBOROS_COMPILE=1``."""
    return os.environ.get("OUROBOROS_COMPILE", "0") == "1"


def _bucket(t: int) -> int:
    for b in BUCKETS:
        if t <= b:
            return b
    return t


class StaticRunner:
    """A model on a :class:`StaticKVCache`; see the module docstring for its two interfaces."""

    def __init__(self, model, max_len: int, use_graphs: bool | None = None, compile: bool | None = None) -> None:
        """``compile``: run the tree forward through ``torch.compile`` (inductor fuses the elementwise ops; the CUDA
        graphs are then captured around the compiled code). None reads ``OUROBOROS_COMPILE`` (1 = on; default off).
        A compile failure warns and falls back to the eager forward."""
        self.model = model
        self.config = model.config.get_text_config()
        self.device = model.device
        self.cache = StaticKVCache(self.config.num_hidden_layers, max_len, self.device)
        self._cache_kw = cache_kwarg(model)
        self._dtype = model.dtype
        self.use_graphs = (self.device.type == "cuda") if use_graphs is None else use_graphs
        self._graphs: dict[int, tuple] = {}
        self.compiled = default_compile() if compile is None else bool(compile)
        self.compile_requested = self.compiled     # ``compiled`` turns False if compiling fails
        self._compiled = None
        if self.compiled:
            # one compiled entry per runner and tree-size class (T=1, T>1): keep room for several runners
            config = torch._dynamo.config
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(config, name):
                    setattr(config, name, max(getattr(config, name), 64))
            self._compiled = torch.compile(self._forward_impl, fullgraph=False)
        self._staging: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # bucket -> (pinned host, device) inputs
        self._n = 0                      # host mirror of cache.length (valid unless a device op ran since)
        self.forwards = 0
        self.forward_time = 0.0
        self.gathers = 0

    def fits(self, max_len: int, compile: bool | None = None) -> bool:
        """True if this runner can serve a call needing ``max_len`` slots on the model as it is now, with the
        ``compile`` setting asked for (None: the default, :func:`default_compile`)."""
        want = default_compile() if compile is None else compile
        return (max_len <= self.cache.max_len and self.model.device == self.device
                and self.model.dtype == self._dtype and want == self.compile_requested)

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

    def _run_step(self, ids: torch.Tensor, depths: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        if not self.compiled:
            return self._forward_impl(ids, depths, bits)
        try:
            return self._compiled(ids, depths, bits)
        except Exception as err:  # noqa: BLE001 - an inductor/dynamo failure must not cost the generation
            warnings.warn(f"torch.compile of the tree forward failed ({type(err).__name__}: {err}); running eager")
            self.compiled = False
            return self._forward_impl(ids, depths, bits)

    def forward_device(self, ids: torch.Tensor, depths: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        """One forward of a fixed-layout tree appended at the device length; the length is not advanced."""
        self.forwards += 1
        t = ids.shape[1]
        if not self.use_graphs:
            return self._run_step(ids, depths, bits)
        graph = self._graphs.get(t) or self._capture(t, ids, depths, bits)
        if graph is None:
            return self._run_step(ids, depths, bits)
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
                    self._run_step(*static)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._run_step(*static)
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
        host, dev = self._inputs(b)
        host.zero_()                                 # ids | depths | bits (b x b), one host-to-device copy
        host[:t] = torch.tensor(tree.tokens)
        host[b:b + t] = torch.tensor(tree.depths)
        bits = host[2 * b:].view(b, b)
        bits.fill_diagonal_(1)
        bits[:t, :t] = ancestor_mask(tree.parents)
        dev.copy_(host, non_blocking=True)
        argmax = self.forward_device(dev[None, :b], dev[b:2 * b], dev[2 * b:].view(b, b).bool())
        out = argmax[:t].tolist()
        self.forward_time += time.perf_counter() - start
        return out

    def _inputs(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The staging buffers of bucket ``b``: a (pinned, on CUDA) host tensor and its device twin."""
        if b not in self._staging:
            host = torch.zeros(2 * b + b * b, dtype=torch.long)
            if self.device.type == "cuda":
                host = host.pin_memory()
            self._staging[b] = (host, torch.empty_like(host, device=self.device))
        return self._staging[b]

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
