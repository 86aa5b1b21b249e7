"""The fast step path: a static KV cache whose length lives on the device, and CUDA-graph-captured tree forwards.

``StaticRunner`` has two faces:
- the host interface of :class:`ouroboros.hf.runner.ModelRunner` (``n_cached``, ``prefill``, ``forward_tree``,
  ``keep``, ``rollback``), so the whole engine runs on it unchanged;
- a device interface (``forward_device``, ``commit_device``) whose inputs and outputs are device tensors of fixed
  shape: no host sync, so a drafting phase can run without the host and a forward can be replayed from a CUDA graph.

Attention runs through our kernel (the runner patches the model, see :mod:`ouroboros.hf.attention`): every forward passes
the tree descriptor with the device length as ``prefix_len`` (no T x max_len mask, no host sync), and the kernel reads
only the live part ``[0, length + T)`` of the buffers. Rollback is a length update; accepted branch entries are
gathered into contiguous slots by one index copy per layer; rejected slots are simply overwritten later.
"""
from __future__ import annotations

import os
import time
import warnings
from typing import Sequence

import torch

from ouroboros.core.buckets import bucket
from ouroboros.core.tokentree import TokenTree
from ouroboros.hf.attention import TreeSpec, is_patched, patch, tree_call_kwargs
from ouroboros.hf.fused_glue import apply_fused_glue, is_fused
from ouroboros.hf.masks import layer_masks
from ouroboros.hf.refusals import attention_gets_extra_kwargs
from ouroboros.hf.runner import cache_kwarg, timed_logits
from ouroboros.hf.static_cache import StaticKVCache
from ouroboros_kernels import ancestor_mask, pack_mask

__all__ = ["StaticRunner", "default_compile", "default_glue", "fuse_glue", "route_to_kernel"]


def default_compile() -> bool:
    """Whether fast-path runners compile their forward when not told: ``OUROBOROS_COMPILE=1``."""
    return os.environ.get("OUROBOROS_COMPILE", "0") == "1"


def default_glue(device: torch.device) -> bool:
    """Whether fast-path runners fuse the model's glue when not told: ``OUROBOROS_FUSED_GLUE=1``/``0``, else on CUDA."""
    env = os.environ.get("OUROBOROS_FUSED_GLUE")
    return env == "1" if env in ("0", "1") else device.type == "cuda"


def fuse_glue(model) -> bool:
    """Fuse ``model``'s RMSNorm/RoPE/SwiGLU and pack its q/k/v and gate/up GEMMs (:mod:`ouroboros.hf.fused_glue`)
    unless already done; False (the model left as it is) for a family the fused glue does not cover."""
    if is_fused(model):
        return True
    try:
        apply_fused_glue(model)
    except ValueError:
        return False
    return True


def route_to_kernel(model) -> bool:
    """Prepare ``model`` for the fast path: patch it (when not already patched) so that trees reach our attention
    kernel; True when they do.

    False, leaving the model as it is, when its decoder layers drop extra keyword arguments before attention (StableLM,
    GPT-NeoX: the tree descriptor could not get through) or transformers cannot switch its attention; the runner then
    passes dense 4-D masks.
    """
    if is_patched(model):            # patched some other way: patch()'s own refusal check did not run
        return attention_gets_extra_kwargs(model)
    try:
        patch(model)                 # refuses (ValueError) what the tree descriptor cannot reach
    except ValueError:
        return False
    return True


class StaticRunner:
    """A model on a :class:`StaticKVCache`; see the module docstring for its two interfaces."""

    def __init__(self, model, max_len: int, use_graphs: bool | None = None, compile: bool | None = None,
                 glue: bool | None = None) -> None:
        """``compile``: run the tree forward through ``torch.compile(dynamic=False, fullgraph=True)``, one graph per
        tree-size bucket, our attention one opaque custom op in it (:mod:`ouroboros_kernels.custom_ops`), so inductor
        fuses the glue around it; the CUDA graphs are captured around the compiled code. None reads
        ``OUROBOROS_COMPILE`` (1 = on; default off). A graph break warns and compiles with breaks; any other compile
        failure warns and falls back to the eager forward. The inductor cache (``TORCHINDUCTOR_CACHE_DIR``) makes a
        second process start fast (``bench/compile_startup.py``).

        ``glue``: fuse the model's RMSNorm / RoPE / SwiGLU into single kernels and its q/k/v and gate/up GEMMs into
        one each (:func:`ouroboros.hf.fused_glue.apply_fused_glue`; outputs unchanged; the model stays fused). None:
        ``OUROBOROS_FUSED_GLUE`` (1/0), else on for CUDA models. Families without fused glue run as they are.

        The model is switched to ouroboros attention (:func:`ouroboros.patch`, backend "auto") unless it already is,
        and stays patched, which leaves its outputs (and ``generate``) unchanged; see :func:`route_to_kernel` for the
        models whose trees take dense masks instead (``tree_kernel`` False)."""
        self.tree_kernel = route_to_kernel(model)
        self.glue_requested = default_glue(model.device) if glue is None else bool(glue)
        self.glue = self.glue_requested and fuse_glue(model)    # False: the family has no fused glue
        self.model = model
        self.config = model.config.get_text_config()
        self.device = model.device
        self.cache = StaticKVCache(self.config.num_hidden_layers, max_len, self.device)
        self._cache_kw = cache_kwarg(model)
        self._dtype = model.dtype
        self.use_graphs = (self.device.type == "cuda") if use_graphs is None else use_graphs
        self._graphs: dict[tuple, tuple] = {}
        self.inside_capture = False      # a caller is capturing a larger graph: run forwards directly, no own graphs
        self.compiled = default_compile() if compile is None else bool(compile)
        self.compile_requested = self.compiled     # ``compiled`` turns False if compiling fails
        self._compiled: dict[bool, object] = {}   # logits? -> the compiled step (argmax or float32 logits)
        if self.compiled:
            # dynamic=False: one compiled graph per (runner, bucket) for each step, never a dynamic-shape one; the
            # limits are per step function (shared by all runners): keep room for many runners' 7 buckets
            config = torch._dynamo.config
            for name, least in (("recompile_limit", 64), ("cache_size_limit", 64),
                                ("accumulated_recompile_limit", 1024), ("accumulated_cache_size_limit", 1024)):
                if hasattr(config, name):
                    setattr(config, name, max(getattr(config, name), least))
            self._compile_steps(fullgraph=True)
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
                and self.model.dtype == self._dtype and want == self.compile_requested
                and (is_patched(self.model) or not self.tree_kernel)
                and default_glue(self.device) == self.glue_requested and (not self.glue or is_fused(self.model)))

    def reset(self) -> None:
        """Start empty (the buffers and captured graphs stay)."""
        self.cache.length.zero_()
        self._n = 0
        self.forwards, self.forward_time, self.gathers = 0, 0.0, 0

    # ---- device interface -------------------------------------------------------------------------------------
    def _logits_impl(self, ids: torch.Tensor, depths: torch.Tensor, bits: torch.Tensor | None) -> torch.Tensor:
        """ids (1, T), depths (T,), bits (T, T) bool ancestor-or-self, or (on the kernel path, ``tree_kernel``)
        already packed int32 (T, ceil(T/32)); None: a causal chain -> logits (T, V) of every tree node.

        Pure device ops, no host sync (graph-capturable): the tree goes to the attention kernel as a packed mask with
        the device length as its prefix length (on a model whose layers drop the descriptor: dense masks over the
        buffer). Writes the tree's keys/values at the device length, which it does not advance."""
        prefix = self.cache.length
        if self.tree_kernel:
            mask = bits if bits is None or bits.dtype == torch.int32 else pack_mask(bits)
            spec = TreeSpec(prefix_len=prefix, mask=mask, depths=depths)
            kw = tree_call_kwargs(spec)
        else:
            kw = {"attention_mask": self._dense_masks(depths, bits)}
        kw[self._cache_kw] = self.cache
        self.cache.slots = prefix + torch.arange(ids.shape[1], device=ids.device)     # once, not once per layer
        try:
            return self.model(input_ids=ids, position_ids=(prefix + depths)[None], use_cache=True, **kw).logits[0]
        finally:
            self.cache.slots = None

    def _dense_masks(self, depths: torch.Tensor, bits: torch.Tensor | None):
        """The (T x max_len) 4-D mask(s) of a tree at the device length, for models the kernel path cannot reach."""
        t, max_len = depths.shape[0], self.cache.max_len
        if bits is None:
            bits = torch.ones(t, t, dtype=torch.bool, device=depths.device).tril()
        prefix = self.cache.length
        cols = torch.arange(max_len, device=depths.device)
        rel = cols - prefix
        in_tree = (rel >= 0) & (rel < t)
        tree_vis = bits[:, rel.clamp(0, t - 1)] & in_tree[None, :]
        visible = (cols < prefix)[None, :] | tree_vis
        q_pos = prefix + depths
        k_pos = torch.where(in_tree, prefix + depths[rel.clamp(0, t - 1)], cols)
        return layer_masks(self.config, visible, q_pos, k_pos, self.model.dtype)

    def _forward_impl(self, ids: torch.Tensor, depths: torch.Tensor, bits: torch.Tensor | None) -> torch.Tensor:
        """ids (1, T), depths (T,), bits (T, T) bool ancestor-or-self -> argmax (T,) of :meth:`_logits_impl`."""
        return self._logits_impl(ids, depths, bits).argmax(-1)

    def _float_logits(self, ids: torch.Tensor, depths: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        """:meth:`_logits_impl` as float32 (T, V)."""
        return self._logits_impl(ids, depths, bits).float()

    def _compile_steps(self, fullgraph: bool) -> None:
        """Wrap both steps in ``torch.compile(dynamic=False)`` (compiled lazily, per input shape: one graph per bucket).
        ``fullgraph``: the whole forward as one graph (our attention is one opaque custom op in it, see
        :mod:`ouroboros_kernels.custom_ops`), so inductor fuses all the glue between the kernels."""
        self._fullgraph = fullgraph
        self._compiled = {False: torch.compile(self._forward_impl, dynamic=False, fullgraph=fullgraph),
                          True: torch.compile(self._float_logits, dynamic=False, fullgraph=fullgraph)}

    def _run_compiled(self, logits: bool, ids: torch.Tensor, depths: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        """The step (argmax, or float32 logits) compiled when ``compiled``, else eager. A graph break under
        ``fullgraph`` warns and recompiles without it; any other compile failure warns and runs eager from then on
        (both steps). A failed compile has run nothing, so retrying the same inputs is exact."""
        eager = self._float_logits if logits else self._forward_impl
        if not self.compiled:
            return eager(ids, depths, bits)
        try:
            return self._compiled[logits](ids, depths, bits)
        except Exception as err:  # noqa: BLE001 - an inductor/dynamo failure must not cost the generation
            if self._fullgraph and isinstance(err, torch._dynamo.exc.Unsupported):   # a graph break
                warnings.warn(f"the tree forward does not compile as one graph ({type(err).__name__}: {err}); "
                              "compiling it with graph breaks")
                self._compile_steps(fullgraph=False)
                return self._run_compiled(logits, ids, depths, bits)
            warnings.warn(f"torch.compile of the tree forward failed ({type(err).__name__}: {err}); running eager")
            self.compiled = False
            return eager(ids, depths, bits)

    def _run_step(self, ids: torch.Tensor, depths: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        """The argmax step (T,): compiled or eager, see :meth:`_run_compiled`."""
        return self._run_compiled(False, ids, depths, bits)

    def _run_logits(self, ids: torch.Tensor, depths: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        """The logits step (T, V) float32: compiled or eager like the argmax, and graphed like it."""
        return self._run_compiled(True, ids, depths, bits)

    def forward_device(self, ids: torch.Tensor, depths: torch.Tensor, bits: torch.Tensor,
                       logits: bool = False) -> torch.Tensor:
        """One forward of a fixed-layout tree appended at the device length; the length is not advanced.

        Returns the argmax (T,), or with ``logits`` the logits (T, V) float32 (captured in its own graph per size)."""
        self.forwards += 1
        t = ids.shape[1]
        step = self._run_logits if logits else self._run_step
        if not self.use_graphs or self.inside_capture:
            return step(ids, depths, bits)
        key = (t, logits, bits.dtype)
        graph = self._graphs.get(key) or self._capture(key, step, ids, depths, bits)
        if graph is None:
            return step(ids, depths, bits)
        g, s_ids, s_depths, s_bits, s_out = graph
        s_ids.copy_(ids)
        s_depths.copy_(depths)
        s_bits.copy_(bits)
        g.replay()
        return s_out.clone()

    def _capture(self, key: tuple, step, ids, depths, bits):
        """Capture ``step`` for ``key`` = (tree size, logits?, mask dtype) (once per key); None (and graphs off) if
        capture fails."""
        try:
            static = (ids.clone(), depths.clone(), bits.clone())
            saved = self.cache.length.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    step(*static)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = step(*static)
            self.cache.length.copy_(saved)
            self._graphs[key] = (graph, *static, out)
            return self._graphs[key]
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
        self.forwards += 1
        self._forward_impl(ids, depths, None)
        self.cache.length.add_(len(tokens))
        self._n += len(tokens)
        self.forward_time += time.perf_counter() - start

    def forward_tree(self, tree: TokenTree) -> list[int]:
        """Padded to a bucket size (pad nodes see only the cache and themselves, and are never kept)."""
        start = time.perf_counter()
        argmax = self.forward_device(*self._stage(tree))
        out = argmax[:len(tree)].tolist()
        self.forward_time += time.perf_counter() - start
        return out

    def forward_tree_logits(self, tree: TokenTree) -> torch.Tensor:
        """Like :meth:`forward_tree`, but the raw logits (T, V) float32 of every node, on the model device."""
        start = time.perf_counter()
        return timed_logits(self, self.forward_device(*self._stage(tree), logits=True)[:len(tree)], start)

    def _stage(self, tree: TokenTree) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``tree`` padded to its bucket as device inputs (ids (1, b), depths (b,), bits (b, b)): one copy."""
        t = len(tree)
        b = bucket(t)
        self._check_room(b)
        host, dev = self._inputs(b)
        host.zero_()                                 # ids | depths | bits (b x b), one host-to-device copy
        host[:t] = torch.tensor(tree.tokens)
        host[b:b + t] = torch.tensor(tree.depths)
        bits = host[2 * b:].view(b, b)
        bits.fill_diagonal_(1)
        bits[:t, :t] = ancestor_mask(tree.parents)
        dev.copy_(host, non_blocking=True)
        return dev[None, :b], dev[b:2 * b], dev[2 * b:].view(b, b).bool()

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
