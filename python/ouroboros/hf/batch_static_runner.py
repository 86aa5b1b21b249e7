"""Several rows on one static cache, device interface only: the batched device cycle's runner (SPEC §6).

:class:`BatchStaticRunner` is :class:`~ouroboros.hf.static_runner.StaticRunner`'s device interface for B rows: one
:class:`~ouroboros.hf.static_cache.StaticKVCache` of ``rows`` rows with a device length per row, and forwards of
``(B, T)`` fixed-layout trees, row b appended at its own length with its own tree (per-row packed masks to the
attention kernel, or per-row dense masks for models whose layers drop the tree descriptor). Pure device ops: nothing
syncs with the host, so a whole batched cycle can be captured as one CUDA graph by its caller.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ouroboros.hf.attention import TreeSpec, tree_call_kwargs
from ouroboros.hf.masks import layer_masks
from ouroboros.hf.runner import cache_kwarg
from ouroboros.hf.static_cache import StaticKVCache
from ouroboros.hf.static_runner import fuse_glue, route_to_kernel
from ouroboros_kernels import pack_mask

__all__ = ["BatchStaticRunner"]


class BatchStaticRunner:
    """``model`` on a static cache of ``rows`` rows of ``max_len`` slots each (see the module docstring).

    ``glue``: fuse the model's glue as :class:`StaticRunner` does (True/False; the model stays fused). The model is
    patched to ouroboros attention unless its layers drop the tree descriptor (``tree_kernel`` False: dense masks)."""

    def __init__(self, model, rows: int, max_len: int, glue: bool = False) -> None:
        if rows < 1:
            raise ValueError(f"a batch runner needs at least one row, got {rows}")
        self.tree_kernel = route_to_kernel(model)
        self.glue = bool(glue) and fuse_glue(model)
        self.model = model
        self.config = model.config.get_text_config()
        self.device = model.device
        self.rows = rows
        self.cache = StaticKVCache(self.config.num_hidden_layers, max_len, self.device, rows=rows)
        self._cache_kw = cache_kwarg(model)
        self.inside_capture = False          # the caller captures whole cycles; this runner captures nothing
        self.forwards = 0

    def reset(self) -> None:
        """Every row empty (the buffers stay)."""
        self.cache.length.zero_()
        self.forwards = 0

    def _masks(self, depths: torch.Tensor, bits: torch.Tensor | None):
        """The per-row (B, 1, T, max_len) dense mask(s) of the trees at the rows' lengths (no host sync)."""
        b, t = depths.shape
        if bits is None:
            bits = torch.ones(t, t, dtype=torch.bool, device=depths.device).tril().expand(b, t, t)
        prefix = self.cache.length[:, None]                                        # (B, 1)
        cols = torch.arange(self.cache.max_len, device=depths.device)[None, :]    # (1, S)
        rel = cols - prefix                                                         # (B, S)
        in_tree = (rel >= 0) & (rel < t)
        relc = rel.clamp(0, t - 1)
        tree_vis = bits.gather(2, relc[:, None, :].expand(b, t, relc.shape[1])) & in_tree[:, None, :]
        visible = (cols < prefix)[:, None, :] | tree_vis
        q_pos = prefix + depths
        k_pos = torch.where(in_tree, prefix + depths.gather(1, relc), cols.expand(b, -1))
        return layer_masks(self.config, visible, q_pos, k_pos, self.model.dtype)

    def logits_device(self, ids: torch.Tensor, depths: torch.Tensor, bits: torch.Tensor | None,
                      keep: int = 0) -> torch.Tensor:
        """ids (B, T), depths (B, T), bits: per-row ancestor-or-self (B, T, T) bool, or packed int32 (B, T, W) on
        the kernel path; None: a causal chain. -> logits (B, T, V). Writes row b's tree keys/values at its length,
        which it does not advance; row b computes exactly what it would alone on the same cache contents.
        ``keep`` > 0: only the last ``keep`` positions' logits (a prefill)."""
        prefix = self.cache.length
        if self.tree_kernel:
            mask = bits if bits is None or bits.dtype == torch.int32 else pack_mask(bits)
            kw = tree_call_kwargs(TreeSpec(prefix_len=prefix, mask=mask, depths=depths))
        else:
            kw = {"attention_mask": self._masks(depths, None if bits is None else self._unpacked(bits))}
        kw[self._cache_kw] = self.cache
        self.cache.slots = self.cache.write_slots(ids.shape[1])
        try:
            self.forwards += 1
            return self.model(input_ids=ids, position_ids=prefix[:, None] + depths, use_cache=True,
                              logits_to_keep=keep, **kw).logits
        finally:
            self.cache.slots = None

    @staticmethod
    def _unpacked(bits: torch.Tensor) -> torch.Tensor:
        if bits.dtype == torch.bool:
            return bits
        raise ValueError("dense-mask models take (B, T, T) bool trees, not packed ones")

    def forward_device(self, ids: torch.Tensor, depths: torch.Tensor, bits: torch.Tensor | None) -> torch.Tensor:
        """:meth:`logits_device`'s argmax, (B, T)."""
        return self.logits_device(ids, depths, bits).argmax(-1)

    def commit_device(self, src: torch.Tensor, count: torch.Tensor) -> None:
        """Row b keeps tree slots ``src[b, :count[b]]`` (node indices, increasing) after its prefix; its length
        advances by ``count[b]``."""
        self.cache.gather(self.cache.length, src)
        self.cache.length.add_(count)

    def prefill(self, prompts: Sequence[Sequence[int]]) -> None:
        """Row b's cache holds ``prompts[b]`` (rows start empty; prompts may be empty or of different lengths): one
        forward of the prompts right-padded to the longest (pads come after each row's tokens, so no token sees
        them; their slots are overwritten later)."""
        if len(prompts) != self.rows:
            raise ValueError(f"{len(prompts)} prompts for a runner of {self.rows} rows")
        t = max(len(p) for p in prompts)
        if t > self.cache.max_len:
            raise ValueError(f"a prompt of {t} tokens does not fit the static cache of {self.cache.max_len} slots")
        if t == 0:
            return
        ids = torch.tensor([list(p) + [0] * (t - len(p)) for p in prompts], dtype=torch.long, device=self.device)
        depths = torch.arange(t, device=self.device).expand(self.rows, t)
        self.cache.length.zero_()
        self.logits_device(ids, depths, None, keep=1)
        self.cache.length.copy_(torch.tensor([len(p) for p in prompts], dtype=torch.long, device=self.device))
