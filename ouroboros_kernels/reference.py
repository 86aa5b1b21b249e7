"""Plain-PyTorch twins of every kernel: the definition of correct.

Every op here matches the contract of SPEC §3 and is what the Triton and CUDA kernels are tested against. The n-gram
phrase pool ops live in :mod:`ouroboros_kernels.ngram_reference` and are re-exported here.
"""
from __future__ import annotations

import math
import numbers

import torch

from .ngram_reference import ngram_insert, ngram_lookup  # re-exported
from .tree import check_tree_mask, unpack_mask

__all__ = ["tree_attention", "check_tree_attention_args", "prefix_lengths", "tree_visibility", "ngram_lookup",
           "ngram_insert"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tree_attention_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int | torch.Tensor,
                              tree_mask: torch.Tensor | None, window: int | None = None,
                              softcap: float | None = None) -> None:
    """Raise ``ValueError`` naming the argument unless the arguments satisfy the ``tree_attention`` contract.

    A tensor ``prefix_len`` is checked for dtype, shape and device only: its value lives on the device, and reading it
    would be a host sync (the kernels clamp it into ``[0, S - T]`` instead, so a bad value never reads out of bounds).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, T/S, D); got {q.dim()}, {k.dim()}, {v.dim()} dims")
    b, hq, t, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    bk, hkv, s, dk = k.shape
    if bk != b or dk != d:
        raise ValueError(f"k/v batch and head dim must match q: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if q.dtype not in _FLOAT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if isinstance(prefix_len, torch.Tensor):
        if prefix_len.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"prefix_len must be a Python int or an int32/int64 tensor, got {prefix_len.dtype}")
        if prefix_len.dim() > 1 or (prefix_len.dim() == 1 and prefix_len.shape[0] != b):
            raise ValueError(f"prefix_len tensor must have shape () or (B,) = ({b},), got {tuple(prefix_len.shape)}")
        if prefix_len.device != q.device:
            raise ValueError(f"prefix_len is on {prefix_len.device} but q is on {q.device}")
        if t > s:
            raise ValueError(f"T ({t}) exceeds the cache length S ({s})")
    elif isinstance(prefix_len, bool) or not isinstance(prefix_len, numbers.Integral):
        raise ValueError(f"prefix_len must be a Python int or an int32/int64 tensor, got {type(prefix_len).__name__}")
    elif prefix_len < 0 or prefix_len + t > s:
        raise ValueError(f"prefix_len ({prefix_len}) + T ({t}) must be within the cache length S ({s})")
    check_tree_mask(tree_mask, b, t, q.device)
    if window is not None and (isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1):
        raise ValueError(f"window must be None or an int >= 1, got {window!r}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, numbers.Real)
                                or not softcap > 0 or math.isinf(softcap)):
        raise ValueError(f"softcap must be None or a finite float > 0, got {softcap!r}")


def prefix_lengths(prefix_len: int | torch.Tensor, batch: int, max_prefix: int, device: torch.device) -> torch.Tensor:
    """``prefix_len`` as an int64 ``(B,)`` tensor on ``device``, clamped into ``[0, max_prefix]`` (no host sync)."""
    if isinstance(prefix_len, torch.Tensor):
        return prefix_len.to(device=device, dtype=torch.int64).reshape(-1).expand(batch).clamp(0, max_prefix)
    return torch.full((batch,), int(prefix_len), dtype=torch.int64, device=device)


def tree_visibility(prefix: torch.Tensor, n_keys: int, t: int, tree_mask: torch.Tensor | None,
                    window: int | None) -> torch.Tensor:
    """Boolean ``(B, T, n_keys)``: whether tree token ``i`` of batch row ``b`` sees key ``j`` (SPEC §3, v3).

    ``prefix`` is the int64 ``(B,)`` prefix length; ``tree_mask`` packed ``(T, W)`` (one tree for every row) or
    ``(B or 1, T, W)`` (row ``b``'s tree in ``tree_mask[b]``). Key ``j < prefix`` is a cache entry at position ``j``;
    key ``prefix + j'`` (``j' < T``) is tree token ``j'`` at position ``prefix + depth_j'``; keys past ``prefix + T``
    are never visible. Tree token ``i`` (position ``prefix + depth_i``, ``depth_i = popcount(row i of its row's mask)
    - 1``) sees every cache entry and the tree tokens whose bits are set in its row (``tree_mask=None``: the causal
    chain, ``depth_i = i``); with a ``window`` w, only keys whose position is ``> position_i - w`` (transformers'
    sliding-window rule). Pure tensor ops: no host sync, graph-capturable.
    """
    device, b = prefix.device, prefix.shape[0]
    if tree_mask is None:
        bits = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    else:
        bits = unpack_mask(tree_mask, t).to(device)
    bits = bits.expand(b, t, t)                                                # (B, T, T): row b's tree
    keys = torch.arange(n_keys, device=device)
    rel = keys[None, :] - prefix[:, None]                                      # (B, n): key index inside the tree
    in_tree = (rel >= 0) & (rel < t)
    rel_c = rel.clamp(0, t - 1)
    seen = bits.gather(2, rel_c[:, None, :].expand(b, t, n_keys))              # (B, T, n): bit rel_c of row i
    vis = (rel < 0)[:, None, :] | (in_tree[:, None, :] & seen)
    if window is not None:
        depth = bits.sum(-1) - 1                                               # (B, T)
        q_pos = prefix[:, None] + depth                                        # (B, T)
        k_pos = torch.where(in_tree, prefix[:, None] + depth.gather(1, rel_c), keys[None, :])
        vis = vis & (k_pos[:, None, :] > q_pos[:, :, None] - window)
    return vis


def _live_keys(prefix_len: int | torch.Tensor, t: int, s: int) -> int:
    """How many leading keys the reference must look at: ``prefix_len + T`` when that is known on the host without a
    device sync (a Python int, or a CPU tensor outside torch.compile tracing), else the whole buffer ``S``."""
    if not isinstance(prefix_len, torch.Tensor):
        return int(prefix_len) + t
    if prefix_len.device.type == "cpu" and not torch.compiler.is_compiling():
        return min(int(prefix_len.max()) + t, s) if prefix_len.numel() else t
    return s


def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int | torch.Tensor,
                   tree_mask: torch.Tensor | None, scale: float | None = None, *, window: int | None = None,
                   softcap: float | None = None) -> torch.Tensor:
    """Attention of T tree tokens over a KV cache, per SPEC §3 (contract v3).

    Parameters
    ----------
    q : (B, Hq, T, D) queries of the tree tokens.
    k, v : (B, Hkv, S, D), ``Hq % Hkv == 0``; entries ``prefix_len .. prefix_len + T - 1`` are the tree tokens and
        entries at or past ``prefix_len + T`` are never used (a static cache is longer than the live part).
    prefix_len : a Python int, or an int32/int64 tensor of shape () or (B,) on ``q``'s device (clamped into
        ``[0, S - T]``; never read on the host for CUDA tensors).
    tree_mask : packed int32 (T, ceil(T/32)), one tree for every batch row, or (B, T, ceil(T/32)), batch row b's tree
        in ``tree_mask[b]`` (B may be 1; dim 0 may have stride 0); bit j of row i set iff tree token i sees tree token
        j (ancestors and itself; depth_i = popcount(row i) - 1). None: a causal chain (prefill / decode).
    scale : score scale, default ``1 / sqrt(D)``.
    window : None or w >= 1: token i (position ``prefix_len + depth_i``) sees key j only if its position is
        ``> position_i - w`` (transformers' sliding window; cache entry j has position j).
    softcap : None or c > 0: scores become ``c * tanh(scores / c)`` before masking (Gemma2).

    Returns
    -------
    o : (B, Hq, T, D) in ``q``'s dtype, computed in float32.
    """
    check_tree_attention_args(q, k, v, prefix_len, tree_mask, window, softcap)
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    n = _live_keys(prefix_len, t, s)
    prefix = prefix_lengths(prefix_len, b, s - t, q.device)
    visible = tree_visibility(prefix, n, t, tree_mask, window)                 # (B, T, n)
    live = (torch.arange(n, device=q.device)[None, :] < (prefix + t)[:, None])[:, None, :, None]  # (B, 1, n, 1)
    # Entries past the live part may hold anything (stale slots, NaN): zero them so 0 * garbage never reaches o.
    kf = torch.where(live, k[:, :, :n].float(), 0.0).repeat_interleave(hq // hkv, dim=1)
    vf = torch.where(live, v[:, :, :n].float(), 0.0).repeat_interleave(hq // hkv, dim=1)
    scores = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), vf).to(q.dtype)


# ---- fused glue: RMSNorm, rotary embedding, SwiGLU (kernels: ouroboros_kernels/triton/glue.py) ----------------------
RMS_NORM_CASTS = ("llama", "gemma")
MAX_NORM_SIZE = 65536  # one row lives in one program's registers (Triton)


def _check_float(name: str, t, dtypes=_FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must be fp16/bf16/fp32, got {t.dtype}")


def rms_norm_dtype(x: torch.Tensor, weight: torch.Tensor, cast: str) -> torch.dtype:
    """The output dtype of ``rms_norm``: ``x``'s dtype promoted with ``weight``'s for the Llama cast (``weight *
    x_norm.to(x.dtype)`` promotes), ``x``'s dtype for the Gemma cast."""
    return torch.promote_types(x.dtype, weight.dtype) if cast == "llama" else x.dtype


def check_rms_norm_args(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                        offset: float = 0.0, cast: str = "llama") -> None:
    """Raise ``ValueError`` naming the argument unless the arguments satisfy the ``rms_norm`` contract."""
    _check_float("x", x)
    _check_float("weight", weight)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    n = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != n:
        raise ValueError(f"weight must have shape ({n},) to match x's last dimension, got {tuple(weight.shape)}")
    if n > MAX_NORM_SIZE:
        raise ValueError(f"x's last dimension ({n}) exceeds the {MAX_NORM_SIZE} a norm row may have")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if residual is not None:
        _check_float("residual", residual)
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(f"residual must match x in shape, dtype and device: x {tuple(x.shape)} {x.dtype} "
                             f"{x.device}, residual {tuple(residual.shape)} {residual.dtype} {residual.device}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0 or math.isinf(eps):
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    if isinstance(offset, bool) or not isinstance(offset, numbers.Real) or not math.isfinite(offset):
        raise ValueError(f"offset must be a finite float, got {offset!r}")
    if cast not in RMS_NORM_CASTS:
        raise ValueError(f"cast must be one of {RMS_NORM_CASTS}, got {cast!r}")


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, *,
                       offset: float = 0.0, cast: str = "llama") -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dimension, exactly as transformers computes it.

    ``cast="llama"`` (LlamaRMSNorm, Mistral, Qwen2/3):
    ``(weight + offset) * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)`` with ``weight + offset`` in ``weight``'s
    dtype (just ``weight`` for offset 0: HF's code op for op).
    ``cast="gemma"`` (GemmaRMSNorm, offset 1): ``(x32 * rsqrt(mean(x32^2) + eps) * (offset + weight32)).to(x.dtype)``.
    With ``residual``: ``s = x + residual`` in ``x``'s dtype (the decoder layer's residual add) is normalised instead,
    and ``(norm(s), s)`` is returned.
    """
    check_rms_norm_args(x, weight, eps, residual, offset, cast)
    if residual is not None:
        x = x + residual
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if cast == "llama":
        w = weight if offset == 0 else weight + offset
        y = w * h.to(x.dtype)
    else:
        y = (h * (offset + weight.float())).to(x.dtype)
    return y if residual is None else (y, x)


def check_rope_args(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the argument unless the arguments satisfy the ``rope`` contract."""
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        _check_float(name, t)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-D (B, H, T, D), got {q.dim()} and {k.dim()} dims")
    b, _, t, d = q.shape
    if k.shape[0] != b or k.shape[2] != t or k.shape[3] != d:
        raise ValueError(f"k must match q in B, T and D: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if d % 2:
        raise ValueError(f"the head dim D must be even for rotate_half, got {d}")
    if cos.dim() != 3 or cos.shape[0] not in (1, b) or tuple(cos.shape[1:]) != (t, d):
        raise ValueError(f"cos must have shape (B or 1, T, D) = ({b} or 1, {t}, {d}), got {tuple(cos.shape)}")
    if sin.shape != cos.shape:
        raise ValueError(f"sin must have cos's shape {tuple(cos.shape)}, got {tuple(sin.shape)}")
    if len({q.dtype, k.dtype, cos.dtype, sin.dtype}) != 1:
        raise ValueError(f"q, k, cos, sin must share one dtype (transformers casts cos/sin to q's), got {q.dtype}, "
                         f"{k.dtype}, {cos.dtype}, {sin.dtype}")
    if len({q.device, k.device, cos.device, sin.device}) != 1:
        raise ValueError(f"q, k, cos, sin must be on one device, got {q.device}, {k.device}, {cos.device}, "
                         f"{sin.device}")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb`` (rotate_half convention, ``unsqueeze_dim=1``), op for op:
    ``(q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin)`` with ``cos``/``sin`` ``(B or 1, T, D)``
    broadcast over the heads of ``q`` ``(B, Hq, T, D)`` and ``k`` ``(B, Hkv, T, D)``; every op rounds to the dtype."""
    check_rope_args(q, k, cos, sin)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def check_swiglu_args(gate: torch.Tensor, up: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the argument unless ``gate`` and ``up`` satisfy the ``swiglu`` contract."""
    _check_float("gate", gate)
    _check_float("up", up)
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"gate and up must match in shape, dtype and device: gate {tuple(gate.shape)} {gate.dtype} "
                         f"{gate.device}, up {tuple(up.shape)} {up.dtype} {up.device}")
    if gate.dim() < 1:
        raise ValueError("gate and up must have at least one dimension")


def split_gate_up(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gate, up)``: the two halves of the last dimension of a concatenated ``(..., 2I)`` tensor (views)."""
    _check_float("gate_up", gate_up)
    if gate_up.dim() < 1 or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up must have an even last dimension (gate then up), got shape {tuple(gate_up.shape)}")
    i = gate_up.shape[-1] // 2
    return gate_up[..., :i], gate_up[..., i:]


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` as the Llama-family MLP computes it (``act_fn(gate_proj(x)) * up_proj(x)``): the SiLU is
    computed in fp32 and rounded to the dtype, then multiplied by ``up``."""
    check_swiglu_args(gate, up)
    return torch.nn.functional.silu(gate) * up


def swiglu_fused_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """:func:`swiglu_reference` of the two halves of ``gate_up`` ``(..., 2I)`` (gate first): ``(..., I)``."""
    return swiglu_reference(*split_gate_up(gate_up))


__all__ += ["RMS_NORM_CASTS", "check_rms_norm_args", "rms_norm_dtype", "rms_norm_reference", "check_rope_args",
            "rope_reference", "check_swiglu_args", "split_gate_up", "swiglu_reference", "swiglu_fused_reference"]
