"""A static KV cache whose length lives on the device (:class:`StaticKVCache`): fixed buffers, writes at the device
length, one index copy per layer (or per stacked buffer) to keep accepted branch entries contiguous.

With ``rows=B`` the cache holds B rows with a length each (a ``(B,)`` device tensor): every row writes at its own
length and keeps its own accepted entries (the batched device cycle, SPEC §6)."""
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
        if slots is None or slots.shape[-1] != key_states.shape[-2]:
            slots = self.owner.write_slots(key_states.shape[-2])
        if slots.dim() == 2:                     # one row of slots per batch row
            for buf, new in ((self.keys, key_states), (self.values, value_states)):
                idx = slots[:, None, :, None].expand(new.shape[0], new.shape[1], new.shape[2], new.shape[3])
                buf.scatter_(2, idx, new)
        else:
            self.keys.index_copy_(2, slots, key_states)
            self.values.index_copy_(2, slots, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return int(self.length.max()) if self.length.dim() else int(self.length)

    def get_max_length(self) -> int:
        return self.max_len

    def get_max_cache_shape(self) -> int:
        return self.max_len

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self.max_len, 0

    def reset(self) -> None:
        self.length.zero_()


class StaticKVCache(Cache):
    """A fixed-size cache for every layer, sharing one device length counter (advanced only by the runner); with
    ``rows`` a ``(rows,)`` length, one per batch row."""

    def __init__(self, num_layers: int, max_len: int, device: torch.device, rows: int | None = None) -> None:
        self.length = torch.zeros(() if rows is None else (rows,), dtype=torch.long, device=device)
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

    def write_slots(self, t: int) -> torch.Tensor:
        """The slots a forward of ``t`` tokens writes: ``length + arange(t)``, (t,) or per row (B, t)."""
        ar = torch.arange(t, device=self.length.device)
        return self.length[..., None] + ar if self.length.dim() else self.length + ar

    def gather(self, prefix: torch.Tensor, src: torch.Tensor) -> None:
        """Copy slots ``prefix + src[i]`` to ``prefix + i`` in every layer (device tensors; fixed shape). Per row:
        ``prefix`` (B,) and ``src`` (B, K), row b's slots moved within row b."""
        if prefix.dim():
            self._gather_rows(prefix, src)
            return
        dst = prefix + torch.arange(src.shape[0], device=src.device)
        idx = prefix + src
        if self.stacked is not None:
            for buf in self.stacked:
                buf.index_copy_(3, dst, buf.index_select(3, idx))
        for i in self._own:
            layer = self.layers[i]
            layer.keys.index_copy_(2, dst, layer.keys.index_select(2, idx))
            layer.values.index_copy_(2, dst, layer.values.index_select(2, idx))

    def _gather_rows(self, prefix: torch.Tensor, src: torch.Tensor) -> None:
        """:meth:`gather` per row: row b's slots ``prefix[b] + src[b, i]`` to ``prefix[b] + i``."""
        rows = torch.arange(src.shape[0], device=src.device)[:, None]
        dst = (prefix[:, None] + torch.arange(src.shape[1], device=src.device)).clamp(max=self.max_len - 1)
        idx = (prefix[:, None] + src).clamp(max=self.max_len - 1)
        if self.stacked is not None:
            for buf in self.stacked:                   # (L, B, H, S, D): advanced indices -> (B, K, L, H, D)
                buf[:, rows, :, dst] = buf[:, rows, :, idx]
        for i in self._own:
            layer = self.layers[i]
            for buf in (layer.keys, layer.values):     # (B, H, S, D) -> (B, K, H, D)
                buf[rows, :, dst] = buf[rows, :, idx]
