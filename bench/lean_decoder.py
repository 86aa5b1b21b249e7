"""A lean decoder for a Qwen2/Llama config: the floor a step of the fast path is measured against (issue 17).

gpt-fast style, plain PyTorch: a static KV cache ``(L, B, Hkv, max_len, D)`` written by index, fused ``qkv`` and
``gate_up`` weights, ``F.rms_norm``, RoPE as ``x * cos + cat(x2, x1) * sin_signed`` (3 kernels for q and k
together), SDPA over the live length ``prefix_len + T`` (the query heads of a KV head grouped into one batch row, so GQA
needs no repeated keys), residual adds folded into ``addmm``, and for T > 1 an additive tree mask built once per tree
shape outside the step. On CUDA each (T, prefix_len) step is captured as one CUDA graph.

    dec = LeanDecoder(config, torch.bfloat16, "cuda")      # random weights, or LeanDecoder.from_hf(model)
    dec.step_ms(T=64, prefix_len=511, iters=20)             # CUDA events on a GPU, perf_counter on a CPU
    dec.kernels_per_forward(T=1)                            # CUDA profiler on a GPU, probes.OpCounter on a CPU

Kernels per layer (what :class:`ouroboros.tuning.probes.OpCounter` counts): rms_norm, qkv GEMM (bias folded in), RoPE 3, KV
writes 2, attention 1, o-proj + residual 1, rms_norm, gate_up GEMM, silu, mul, down + residual 1 = 14; T > 1 with
GQA adds the two copies that regroup queries and outputs (16; with one query head per KV head they are views). Per
forward: embedding, cos and sin lookups, final norm, lm_head, argmax (6). Attention over the live length only makes
this a floor: a graph serves one (T, prefix_len), where our runners' graphs serve every prefix length.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["LeanShape", "LeanDecoder", "KERNELS_PER_LAYER", "KERNELS_PER_FORWARD", "expected_kernels"]

KERNELS_PER_LAYER = {1: 14, "tree": 16}      # T = 1, T > 1 with GQA (see the module docstring)
KERNELS_PER_FORWARD = 6


@dataclass(frozen=True)
class LeanShape:
    """The sizes of a Qwen2/Llama decoder, read from an HF config object or a config.json dict."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    eps: float
    rope_theta: float
    qkv_bias: bool
    tied: bool

    @classmethod
    def from_config(cls, config) -> "LeanShape":
        get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
        model_type = get("model_type")
        if model_type not in ("qwen2", "llama"):
            raise ValueError(f"LeanDecoder covers qwen2 and llama configs, got model_type {model_type!r}")
        rope = get("rope_parameters") or {}
        theta = rope.get("rope_theta") if isinstance(rope, dict) else None
        heads = get("num_attention_heads")
        return cls(layers=get("num_hidden_layers"), hidden=get("hidden_size"), heads=heads,
                   kv_heads=get("num_key_value_heads") or heads,
                   head_dim=get("head_dim") or get("hidden_size") // heads, intermediate=get("intermediate_size"),
                   vocab=get("vocab_size"), eps=float(get("rms_norm_eps")),
                   rope_theta=float(theta or get("rope_theta") or 10000.0),
                   qkv_bias=model_type == "qwen2" or bool(get("attention_bias", False)),
                   tied=bool(get("tie_word_embeddings", False)))


class LeanDecoder:
    """The decoder of ``config`` with random weights (or :meth:`from_hf`'s), batch 1, ``max_len`` cache slots."""

    def __init__(self, config, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                 max_len: int = 1024, seed: int = 0, use_graphs: bool | None = None, init: bool = True) -> None:
        """``init`` False leaves the weights empty (:meth:`from_hf` fills them)."""
        s = self.shape = LeanShape.from_config(config)
        self.dtype, self.device, self.max_len = dtype, torch.device(device), max_len
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        torch.manual_seed(seed)
        qkv_out = (s.heads + 2 * s.kv_heads) * s.head_dim

        def w(*shape, std=0.02):
            if not init:
                return torch.empty(0, device=self.device, dtype=dtype)
            return torch.randn(*shape, device=self.device, dtype=dtype) * std

        self.embed = w(s.vocab, s.hidden)
        self.lm_head = self.embed if s.tied else w(s.vocab, s.hidden)
        self.norm = torch.ones(s.hidden, device=self.device, dtype=dtype)
        self.ln1 = [torch.ones_like(self.norm) for _ in range(s.layers)]
        self.ln2 = [torch.ones_like(self.norm) for _ in range(s.layers)]
        self.wqkv = [w(qkv_out, s.hidden) for _ in range(s.layers)]
        self.bqkv = [w(qkv_out) if s.qkv_bias else None for _ in range(s.layers)]
        self.wo_t = [w(s.heads * s.head_dim, s.hidden) for _ in range(s.layers)]          # (in, out)
        self.w_gate_up = [w(2 * s.intermediate, s.hidden) for _ in range(s.layers)]
        self.w_down_t = [w(s.intermediate, s.hidden) for _ in range(s.layers)]          # (in, out)
        cache = (s.layers, 1, s.kv_heads, max_len, s.head_dim)
        self.k_cache = torch.zeros(cache, device=self.device, dtype=dtype)
        self.v_cache = torch.zeros(cache, device=self.device, dtype=dtype)
        inv = 1.0 / s.rope_theta ** (torch.arange(0, s.head_dim, 2, dtype=torch.float32) / s.head_dim)
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)
        self.cos = freqs.cos().repeat(1, 2).to(self.device, dtype)
        self.sin = torch.cat([-freqs.sin(), freqs.sin()], -1).to(self.device, dtype)   # rotate_half's sign folded in
        self._graphs: dict[tuple[int, int], tuple] = {}

    @classmethod
    @torch.no_grad()
    def from_hf(cls, model, max_len: int = 1024) -> "LeanDecoder":
        """The decoder with ``model``'s own weights (fused copies), on its device and dtype: same logits as HF."""
        dec = cls(model.config, model.dtype, model.device, max_len=max_len, init=False)
        inner = model.model
        dec.embed = inner.embed_tokens.weight
        dec.lm_head = model.lm_head.weight
        dec.norm = inner.norm.weight
        for i, layer in enumerate(inner.layers):
            a, m = layer.self_attn, layer.mlp
            dec.ln1[i], dec.ln2[i] = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
            dec.wqkv[i] = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
            if dec.shape.qkv_bias:
                dec.bqkv[i] = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
            dec.wo_t[i] = a.o_proj.weight.t().contiguous()
            dec.w_gate_up[i] = torch.cat([m.gate_proj.weight, m.up_proj.weight])
            dec.w_down_t[i] = m.down_proj.weight.t().contiguous()
        return dec

    # ---- one forward ------------------------------------------------------------------------------------------
    def tree_mask(self, bits: torch.Tensor, prefix_len: int) -> torch.Tensor:
        """The additive ``(G * T, prefix_len + T)`` mask of a tree (``bits`` (T, T) bool ancestor-or-self): every
        cached key, and the visible tree keys; rows repeat per query head of a KV head."""
        t = bits.shape[0]
        vis = torch.cat([torch.ones(t, prefix_len, dtype=torch.bool, device=bits.device), bits], 1)
        add = torch.zeros(vis.shape, dtype=self.dtype, device=self.device).masked_fill_(~vis.to(self.device),
                                                                                       float("-inf"))
        return add.repeat(self.shape.heads // self.shape.kv_heads, 1)

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor | None,
                live: int, logits: bool = False) -> torch.Tensor:
        """ids (1, T), positions (T,), cache slots (T,) to write, ``mask`` from :meth:`tree_mask` (None: T = 1),
        ``live`` = prefix_len + T keys -> argmax (T,) (or logits (T, V)). Writes the tree's keys/values."""
        s = self.shape
        t, g = ids.shape[1], s.heads // s.kv_heads
        x = F.embedding(ids[0], self.embed)
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]
        nq, half = (s.heads + s.kv_heads) * s.head_dim, s.head_dim // 2
        for i in range(s.layers):
            h = F.rms_norm(x, (s.hidden,), self.ln1[i], s.eps)
            qkv = F.linear(h, self.wqkv[i], self.bqkv[i])
            qk = qkv[:, :nq].view(t, s.heads + s.kv_heads, s.head_dim)
            qk = torch.addcmul(qk * cos, torch.cat([qk[..., half:], qk[..., :half]], -1), sin)
            k, v = qk[:, s.heads:], qkv[:, nq:].view(t, s.kv_heads, s.head_dim)
            self.k_cache[i, 0].index_copy_(1, slots, k.transpose(0, 1))
            self.v_cache[i, 0].index_copy_(1, slots, v.transpose(0, 1))
            q = qk[:, :s.heads].view(t, s.kv_heads, g, s.head_dim).permute(1, 2, 0, 3).reshape(1, s.kv_heads,
                                                                                                g * t, s.head_dim)
            o = F.scaled_dot_product_attention(q, self.k_cache[i, :, :, :live], self.v_cache[i, :, :, :live],
                                               attn_mask=mask)
            o = o.view(s.kv_heads, g, t, s.head_dim).permute(2, 0, 1, 3).reshape(t, s.heads * s.head_dim)
            x = torch.addmm(x, o, self.wo_t[i])
            gate, up = F.linear(F.rms_norm(x, (s.hidden,), self.ln2[i], s.eps), self.w_gate_up[i]).chunk(2, -1)
            x = torch.addmm(x, F.silu(gate) * up, self.w_down_t[i])
        out = F.linear(F.rms_norm(x, (s.hidden,), self.norm, s.eps), self.lm_head)
        return out.float() if logits else out.argmax(-1)

    # ---- measurement ------------------------------------------------------------------------------------------
    def _inputs(self, t: int, prefix_len: int):
        """A chain of ``t`` tokens after ``prefix_len`` cached ones: (ids, pos, slots, mask, live)."""
        if prefix_len + t > self.max_len:
            raise ValueError(f"prefix_len + T = {prefix_len + t} exceeds max_len {self.max_len}")
        ids = torch.randint(3, self.shape.vocab, (1, t), device=self.device)
        pos = torch.arange(prefix_len, prefix_len + t, device=self.device)
        mask = None if t == 1 else self.tree_mask(torch.ones(t, t, dtype=torch.bool).tril(), prefix_len)
        return ids, pos, pos.clone(), mask, prefix_len + t

    def _step(self, t: int, prefix_len: int):
        """A callable running one forward of the (t, prefix_len) step: a CUDA graph replay on CUDA, else eager."""
        args = self._inputs(t, prefix_len)
        if not self.use_graphs:
            return lambda: self.forward(*args)
        key = (t, prefix_len)
        if key not in self._graphs:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.forward(*args)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.forward(*args)
            self._graphs[key] = (graph, args)
        return self._graphs[key][0].replay

    @torch.inference_mode()
    def step_ms(self, T: int, prefix_len: int, iters: int = 20) -> float:
        """Milliseconds per forward of a T-token chain after ``prefix_len`` cached tokens (graph replays on CUDA,
        timed with CUDA events; eager forwards timed with perf_counter elsewhere), after two warm-up calls."""
        step = self._step(T, prefix_len)
        for _ in range(2):
            step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        return (time.perf_counter() - t0) * 1e3 / iters

    @torch.inference_mode()
    def kernel_profile(self, T: int, prefix_len: int = 64) -> dict:
        """Kernels one forward launches: ``{"total", "source", "top"}`` (CUDA profiler over a graph replay on CUDA,
        eager if the replay's kernels are invisible to it; :class:`ouroboros.tuning.probes.OpCounter` elsewhere)."""
        from ouroboros.tuning.probes import count_kernels

        step = self._step(T, prefix_len)
        step()
        args = self._inputs(T, prefix_len) if self.device.type == "cuda" else None
        return count_kernels(step, self.device, eager=(lambda: self.forward(*args)) if args else None)

    def kernels_per_forward(self, T: int, prefix_len: int = 64) -> int:
        """The number of kernels one T-token forward launches (see :meth:`kernel_profile`)."""
        return self.kernel_profile(T, prefix_len)["total"]


def expected_kernels(layers: int, t: int) -> int:
    """What :meth:`LeanDecoder.kernels_per_forward` should count on a CPU for ``layers`` GQA layers and ``t``
    tokens."""
    return KERNELS_PER_FORWARD + layers * KERNELS_PER_LAYER[1 if t == 1 else "tree"]


if __name__ == "__main__":      # a quick look: python -m bench.lean_decoder
    cfg = dict(model_type="qwen2", vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=128, rms_norm_eps=1e-6, rope_theta=1e6,
               tie_word_embeddings=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    d = LeanDecoder(cfg, torch.bfloat16 if dev == "cuda" else torch.float32, dev)
    for t in (1, 16, 64):
        print(f"T={t}: {d.step_ms(t, 100, 10):.3f} ms, {d.kernels_per_forward(t, 100)} kernels "
              f"(expected {expected_kernels(2, t)})")
