"""A static KV cache whose length lives on the device (:class:`StaticKVCache`): fixed buffers, writes at the device
length, one index copy per layer (or per stacked buffer) to keep accepted branch entries contiguous."""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

__all__ = ["StaticKVCache"]


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
        slots = self.owner.slots
        if slots is None or slots.shape[0] != key_states.shape[-2]:
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
        self.slots: torch.Tensor | None = None    # during a runner's forward: the slots it writes (all layers)
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
