"""Triton glue kernels of a Llama-family decoder layer: RMSNorm (optionally fused with the residual add), rotary
embedding of q and k, and SwiGLU. One launch per call, any number of rows, any hidden size (not only powers of two),
fp32/bf16/fp16 with fp32 arithmetic.

Each kernel rounds where transformers' PyTorch code rounds (an elementwise op on bf16 tensors computes in fp32 and
rounds its result to bf16), so in bf16/fp16 the fused ops reproduce the unfused ones up to the order of the variance
sum; in fp32 they agree to a few ulps. (The Triton interpreter rounds fp32 -> bf16 by truncation, so on CPU tensors
bf16 results differ from a GPU's by up to an ulp per rounding.)

Every function here validates its arguments with the reference's checks (``ValueError`` naming the argument), returns
fresh outputs and makes exactly one kernel launch (none for an empty input). No backward pass. Runs on CUDA tensors, or on CPU tensors under
``TRITON_INTERPRET=1`` (set it before triton is imported).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import (check_rms_norm_args, check_rope_args, check_swiglu_args, rms_norm_dtype,
                         split_gate_up)

__all__ = ["rms_norm", "rope", "swiglu", "swiglu_fused"]

# Elements one program keeps in registers: a tile of BLOCK_M rows x BLOCK_N columns (RMSNorm) or of all heads x D/2
# (RoPE). Larger tiles spill registers on sm80/sm90 at 4-8 warps.
_TILE = 4096


def _warps(elements: int) -> int:
    return 4 if elements <= 2048 else 8 if elements <= 8192 else 16


# ------------------------------------------------------------------------------------------------------------ RMSNorm
@triton.jit
def _rms_norm_kernel(X, R, W, Y, S, n_rows, M2, N, sx1, sx2, sr1, sr2, eps, offset,
                     HAS_RES: tl.constexpr, GEMMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows ``pid * BLOCK_M ..``: row r of x sits at ``X + (r // M2) * sx1 + (r % M2) * sx2`` (two strides cover any
    view whose leading dims merge into two, e.g. q heads ``(B, T, H, D)`` sliced out of a fused qkv GEMM output);
    outputs Y (and S = x + residual) are contiguous ``(n_rows, N)``."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ok = (rows < n_rows)[:, None] & col_ok[None, :]
    r1, r2 = rows // M2, rows % M2
    x = tl.load(X + (r1 * sx1 + r2 * sx2)[:, None] + cols[None, :], mask=ok, other=0.0)
    out_off = rows[:, None] * N + cols[None, :]
    if HAS_RES:
        r = tl.load(R + (r1 * sr1 + r2 * sr2)[:, None] + cols[None, :], mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)   # the residual add, rounded like HF's
        tl.store(S + out_off, x, mask=ok)
    xf = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=1) / N + eps)
    xn = xf * rstd[:, None]
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    if GEMMA:   # (x32 * (offset + w32)).to(x.dtype)
        y = xn * (w + offset)[None, :]
    else:       # (w + offset) * x32.to(x.dtype), the weight term in the weight's dtype
        w = (w + offset).to(W.dtype.element_ty).to(tl.float32)
        y = xn.to(X.dtype.element_ty).to(tl.float32) * w[None, :]
    tl.store(Y + out_off, y.to(Y.dtype.element_ty), mask=ok)


def _two_level_rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """``(x', M2, s1, s2)``: row r of ``x'`` (``x`` itself when possible, else a contiguous copy) starts at element
    ``(r // M2) * s1 + (r % M2) * s2``, and its last dimension has stride 1."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    dims = [(n, s) for n, s in zip(x.shape[:-1], x.stride()[:-1]) if n != 1]
    merged: list[list[int]] = []
    for n, s in dims:                   # outer to inner: merge a dim into the previous one when it continues it
        if merged and merged[-1][1] == n * s:
            merged[-1] = [merged[-1][0] * n, s]
        else:
            merged.append([n, s])
    if len(merged) > 2:
        x = x.contiguous()
        return x, 1, x.shape[-1], 0
    while len(merged) < 2:
        merged.insert(0, [1, 0])
    (_, s1), (m2, s2) = merged
    return x, m2, s1, s2


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, *,
             offset: float = 0.0, cast: str = "llama") -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`ouroboros_kernels.reference.rms_norm_reference` in one launch (with ``residual``: the add and the norm in
    the same launch). Outputs are contiguous with ``x``'s shape."""
    check_rms_norm_args(x, weight, eps, residual, offset, cast)
    shape, n = x.shape, x.shape[-1]
    x, m2, sx1, sx2 = _two_level_rows(x)
    n_rows = x.numel() // n
    y = torch.empty(shape, dtype=rms_norm_dtype(x, weight, cast), device=x.device)
    has_res = residual is not None
    s = torch.empty(shape, dtype=x.dtype, device=x.device) if has_res else y
    if has_res:
        residual, r_m2, sr1, sr2 = _two_level_rows(residual)
        if r_m2 != m2:   # a different row layout: read the residual contiguously in x's row order
            residual = residual.contiguous()
            sr1, sr2 = m2 * n, n
    else:
        residual, sr1, sr2 = x, 0, 0
    block_n = triton.next_power_of_2(n)
    block_m = max(1, min(triton.next_power_of_2(max(n_rows, 1)), _TILE // block_n, 64))
    if n_rows:
        _rms_norm_kernel[(triton.cdiv(n_rows, block_m),)](
            x, residual, weight, y, s, n_rows, m2, n, sx1, sx2, sr1, sr2, float(eps), float(offset),
            HAS_RES=has_res, GEMMA=cast == "gemma", BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=_warps(block_m * block_n))
    return (y, s) if has_res else y


# --------------------------------------------------------------------------------------------------------------- RoPE
@triton.jit
def _rope_heads(X, O, b, t, T, H, sxb, sxh, sxt, sxd, c1, c2, s1, s2, d, d_ok, HALF,
                BLOCK_H: tl.constexpr):
    """All H heads of token (b, t): HF's ``x * cos + rotate_half(x) * sin``, each product and the sum rounded to the
    dtype; the output is ``(B, T, H, D)`` contiguous."""
    h = tl.arange(0, BLOCK_H)
    ok = (h < H)[:, None] & d_ok[None, :]
    src = X + b * sxb + t * sxt + h[:, None] * sxh
    x1 = tl.load(src + d[None, :] * sxd, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + (d[None, :] + HALF) * sxd, mask=ok, other=0.0).to(tl.float32)
    ty = X.dtype.element_ty
    o1 = (x1 * c1[None, :]).to(ty).to(tl.float32) - (x2 * s1[None, :]).to(ty).to(tl.float32)
    o2 = (x2 * c2[None, :]).to(ty).to(tl.float32) + (x1 * s2[None, :]).to(ty).to(tl.float32)
    dst = O + ((b * T + t) * H + h[:, None]) * (2 * HALF)
    tl.store(dst + d[None, :], o1.to(ty), mask=ok)
    tl.store(dst + d[None, :] + HALF, o2.to(ty), mask=ok)


@triton.jit
def _rope_kernel(Q, K, C, S, QO, KO, T, HQ, HK,
                 sqb, sqh, sqt, sqd, skb, skh, skt, skd, scb, sct, scd, ssb, sst, ssd, HALF,
                 BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per token (b, t): loads its cos/sin row once and rotates every q head and every k head."""
    pid = tl.program_id(0).to(tl.int64)
    b, t = pid // T, pid % T
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HALF
    c_row, s_row = C + b * scb + t * sct, S + b * ssb + t * sst
    c1 = tl.load(c_row + d * scd, mask=d_ok, other=0.0).to(tl.float32)
    c2 = tl.load(c_row + (d + HALF) * scd, mask=d_ok, other=0.0).to(tl.float32)
    s1 = tl.load(s_row + d * ssd, mask=d_ok, other=0.0).to(tl.float32)
    s2 = tl.load(s_row + (d + HALF) * ssd, mask=d_ok, other=0.0).to(tl.float32)
    _rope_heads(Q, QO, b, t, T, HQ, sqb, sqh, sqt, sqd, c1, c2, s1, s2, d, d_ok, HALF, BLOCK_HQ)
    _rope_heads(K, KO, b, t, T, HK, skb, skh, skt, skd, c1, c2, s1, s2, d, d_ok, HALF, BLOCK_HK)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ouroboros_kernels.reference.rope_reference` for q and k in one launch. ``q``, ``k`` may have any strides
    (e.g. transposed views of a qkv GEMM output); the outputs are ``(B, H, T, D)`` views of fresh ``(B, T, H, D)``
    contiguous tensors (the layout transformers' own RoPE produces from those views)."""
    check_rope_args(q, k, cos, sin)
    b, hq, t, d = q.shape
    hk = k.shape[1]
    qo = torch.empty((b, t, hq, d), dtype=q.dtype, device=q.device)
    ko = torch.empty((b, t, hk, d), dtype=k.dtype, device=k.device)
    half = d // 2
    block_d = triton.next_power_of_2(half)
    block_hq, block_hk = triton.next_power_of_2(hq), triton.next_power_of_2(hk)
    scb = cos.stride(0) if cos.shape[0] > 1 else 0
    ssb = sin.stride(0) if sin.shape[0] > 1 else 0
    if b * t:
        _rope_kernel[(b * t,)](
            q, k, cos, sin, qo, ko, t, hq, hk, *q.stride(), *k.stride(), scb, cos.stride(1), cos.stride(2),
            ssb, sin.stride(1), sin.stride(2), half, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_D=block_d,
            num_warps=_warps((block_hq + block_hk) * block_d))
    return qo.transpose(1, 2), ko.transpose(1, 2)


# ------------------------------------------------------------------------------------------------------------- SwiGLU
@triton.jit
def _swiglu_kernel(G, U, O, n_cols, sg, su, BLOCK: tl.constexpr):
    """Row ``program_id(0)``, columns of block ``program_id(1)``: ``silu(g)`` rounded to the dtype (as F.silu does),
    times ``u``, rounded; the output is contiguous ``(rows, n_cols)``."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    g = tl.load(G + row * sg + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + row * su + cols, mask=ok, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(G.dtype.element_ty).to(tl.float32)
    tl.store(O + row * n_cols + cols, (act * u).to(O.dtype.element_ty), mask=ok)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a 2-D ``(rows, n)`` tensor with unit column stride and one row stride (a view when possible)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.reshape(-1, x.shape[-1])


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """:func:`ouroboros_kernels.reference.swiglu_reference` in one launch; contiguous output of ``gate``'s shape."""
    check_swiglu_args(gate, up)
    shape = gate.shape
    out = torch.empty(shape, dtype=gate.dtype, device=gate.device)
    n = shape[-1]
    if out.numel():
        g2, u2 = _rows(gate), _rows(up)
        block = min(triton.next_power_of_2(n), 1024)
        _swiglu_kernel[(g2.shape[0], triton.cdiv(n, block))](g2, u2, out, n, g2.stride(0), u2.stride(0),
                                                             BLOCK=block, num_warps=4)
    return out


def swiglu_fused(gate_up: torch.Tensor) -> torch.Tensor:
    """:func:`swiglu` of the halves of ``gate_up`` ``(..., 2I)`` (gate first, as one GEMM over the concatenated
    gate/up weight produces them): ``(..., I)``, one launch, no copies of the input."""
    return swiglu(*split_gate_up(gate_up))
