"""Triton tree attention: T tree tokens over a long KV cache (SPEC §3, contract v3), flash-decoding style.

Layout of the work (designed for small T and long S):

* grid = (row blocks, B * Hkv, S splits). A program owns one KV head and BLOCK_M "rows", where row ``r`` of a KV
  head group is (tree token ``r // G``, query head ``hkv * G + r % G``) with ``G = Hq // Hkv``: every query head that
  shares the KV head is in the same program, so each K/V tile is read once per group, never repeated (GQA).
* ``prefix_len`` is a kernel argument or, for a tensor, read by the kernel from device memory (per batch row), so one
  launch (and one captured CUDA graph) serves every prefix length. The program derives its live key range from it:
  ``[prefix_len + d_min - window + 1, prefix_len + T)`` (tile-aligned; without a window from 0), where d_min is the
  smallest depth among its rows; keys outside are never loaded, so the cost follows the live length, not the buffer.
  The live range is cut into ``num_splits`` chunks of whole BLOCK_N tiles (a split with nothing to do writes an empty
  partial); each program runs an online softmax (base 2, ``scale * log2(e)`` folded into the scores) over its chunk.
* The packed tree mask is read at ``MASK + b * stride_mb``: batch row b's own tree (a (B, T, W) mask), or, with
  ``stride_mb = 0``, one tree for every row (a (T, W) mask, a (1, T, W) one or a stride-0 dim 0).
* Tiles wholly inside the cache prefix and above every row's window start are processed with no mask at all; only
  tiles that reach into the tree region or below some row's window start evaluate visibility (packed bit mask or the
  bottom-right causal rule, and the window on true positions: a tree key's depth is the popcount of its mask row).
* With one split, the program writes the output directly; otherwise it writes a normalised partial output and its
  log2-sum-exp to fp32 scratch, and a combine kernel merges the splits.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (set it before triton is imported).
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ..backend import triton_interpret
from ..reference import check_tree_attention_args
from ..tree import mask_batch_stride

__all__ = ["tree_attention", "plan"]

_LOG2E = 1.4426950408889634


@triton.jit
def _popcount(x):
    """Set bits of each int32 lane (SWAR; exact for negative words too, since every shifted term is masked)."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    x = x + (x >> 8)
    x = x + (x >> 16)
    return x & 0x3F


@triton.jit
def _row_depth(MASK, tok, ok, stride_mt, MASK_WORDS: tl.constexpr):
    """Depth of tree tokens ``tok`` (where ``ok``): popcount of their packed mask row - 1."""
    depth = tl.zeros(tok.shape, tl.int32)
    for w in tl.static_range(MASK_WORDS):
        depth += _popcount(tl.load(MASK + tok * stride_mt + w, mask=ok, other=0))
    return depth - 1


@triton.jit
def _tile(q, k_ptrs, v_ptrs, m_ptrs, MASK, start, stride_ks, stride_vs, stride_mt, offs_n, d_ok, tok, row_ok,
          depth_q, m_i, l_i, acc, prefix_len, lo_live, hi, window, qk_scale, softcap,
          MASKED: tl.constexpr, HAS_MASK: tl.constexpr, WINDOW: tl.constexpr, MASK_WORDS: tl.constexpr,
          SOFTCAP: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, EVEN_D: tl.constexpr):
    """Fold the BLOCK_N keys ``start + offs_n`` into the online-softmax state (m_i, l_i, acc), all in base 2.

    MASKED=False: a tile wholly inside the cache prefix and above every row's window start; every row sees every
    key, no mask work at all. MASKED=True: any other tile: keys outside ``[lo_live, hi)`` are neither loaded nor
    seen, tree keys are kept per the packed bit mask (HAS_MASK) or the bottom-right causal rule, and with a WINDOW a
    key is seen only if its position exceeds the row's position - window. ``k_ptrs``/``v_ptrs`` point at key 0 of the
    tile's layout; ``m_ptrs`` at the mask row of each query row.
    """
    n = start + offs_n
    if MASKED:
        n_ok = (n < hi) & (n >= lo_live)
        if EVEN_D:
            k = tl.load(k_ptrs + start * stride_ks, mask=n_ok[None, :], other=0.0)
            v = tl.load(v_ptrs + start * stride_vs, mask=n_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs + start * stride_ks, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
            v = tl.load(v_ptrs + start * stride_vs, mask=d_ok[None, :] & n_ok[:, None], other=0.0)
    elif EVEN_D:  # no mask at all: a mask over the head dim would defeat vectorised loads
        k = tl.load(k_ptrs + start * stride_ks)
        v = tl.load(v_ptrs + start * stride_vs)
    else:
        k = tl.load(k_ptrs + start * stride_ks, mask=d_ok[:, None], other=0.0)
        v = tl.load(v_ptrs + start * stride_vs, mask=d_ok[None, :], other=0.0)
    if UPCAST:  # interpreter: numpy has no bf16 matmul
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    if IEEE:
        s = tl.dot(q, k, input_precision="ieee")
    else:
        s = tl.dot(q, k)
    if SOFTCAP:
        # softcap * tanh(scale * qk / softcap), with tanh(x) = 2 sigmoid(2x) - 1; log2(e) applied after the cap.
        s = (softcap * 1.4426950408889634) * (2.0 * tl.sigmoid(s * (2.0 * qk_scale / softcap)) - 1.0)
    else:
        s = s * qk_scale  # scale * log2(e)
    if MASKED:
        j = n - prefix_len  # index of the key inside the tree (negative: cache prefix)
        in_tree = (j >= 0) & n_ok
        jj = tl.where(in_tree, j, 0)
        if HAS_MASK:
            words = tl.load(m_ptrs[:, None] + (jj // 32)[None, :], mask=row_ok[:, None] & in_tree[None, :], other=0)
            tree_ok = ((words >> (jj % 32)[None, :]) & 1) != 0
        else:
            tree_ok = j[None, :] <= tok[:, None]
        visible = ((j < 0) & n_ok)[None, :] | (in_tree[None, :] & tree_ok)
        if WINDOW:
            if HAS_MASK:
                depth_k = _row_depth(MASK, jj, in_tree, stride_mt, MASK_WORDS)
            else:
                depth_k = jj
            pos_k = tl.where(in_tree, prefix_len + depth_k, n)
            visible = visible & (pos_k[None, :] > (prefix_len + depth_q - window)[:, None])
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no key yet keeps m = -inf; shift by 0 then, so exp2 gives 0 and never NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["prefix_val", "num_splits", "window"])
def tree_attn_split_kernel(
    Q, K, V, MASK, PREFIX, O, MID_O, MID_L,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_mb, stride_mt, stride_pb, stride_ob, stride_oh, stride_ot, stride_od,
    prefix_val, T, S, HKV, D, num_splits, window,
    qk_scale, softcap,
    G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_WORDS: tl.constexpr, PREFIX_PTR: tl.constexpr, WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr, IEEE: tl.constexpr, SPLIT: tl.constexpr,
    INTERP: tl.constexpr, UPCAST: tl.constexpr, EVEN_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bh // HKV).to(tl.int64)  # 64-bit base offsets: B * Hkv * S * D can pass 2**31 for long static caches
    hkv = (pid_bh % HKV).to(tl.int64)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // G
    head = hkv * G + rows % G
    row_ok = tok < T
    tok_c = tl.where(row_ok, tok, 0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_n = tl.arange(0, BLOCK_N)
    MASK = MASK + b * stride_mb  # this batch row's tree (stride 0: one tree for every row)

    if PREFIX_PTR:  # the device length, clamped so that no value can send a load out of bounds
        prefix_len = tl.load(PREFIX + b * stride_pb).to(tl.int32)
        prefix_len = tl.minimum(tl.maximum(prefix_len, 0), S - T)
    else:
        prefix_len = prefix_val

    q_ptrs = Q + b * stride_qb + head[:, None] * stride_qh + tok[:, None] * stride_qt + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_ptrs = K + b * stride_kb + hkv * stride_kh + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd
    v_ptrs = V + b * stride_vb + hkv * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd
    m_ptrs = MASK + tok_c * stride_mt

    # Depths of this program's rows (position = prefix_len + depth) and the key range they need. Bounds are built
    # with tl.minimum/maximum (no reassignment inside runtime `if`s) so they stay tensors whatever Triton specialises.
    if HAS_MASK:
        depth_q = _row_depth(MASK, tok_c, row_ok, stride_mt, MASK_WORDS)
        d_min = tl.min(tl.where(row_ok, depth_q, T), 0)
        d_max = tl.max(tl.where(row_ok, depth_q, 0), 0)
        hi_live = prefix_len + T
    else:
        depth_q = tok
        d_min = tl.minimum(pid_m * BLOCK_M // G, T - 1)
        d_max = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // G, T - 1)
        hi_live = prefix_len + d_max + 1  # bottom-right causal: nothing past the block's last token
    if WINDOW:
        lo_live = tl.maximum(prefix_len + d_min - window + 1, 0)
        # Keys below the highest window start of the rows need the mask; tiles from there to the prefix do not.
        win_end = tl.maximum(prefix_len + d_max - window + 1, 0)
    else:
        lo_live = prefix_len * 0
        win_end = prefix_len * 0
    lo_tile = (lo_live // BLOCK_N) * BLOCK_N
    n_tiles = (hi_live - lo_tile + BLOCK_N - 1) // BLOCK_N
    per_split = (n_tiles + num_splits - 1) // num_splits
    lo = lo_tile + pid_s * per_split * BLOCK_N
    hi = tl.minimum(lo + per_split * BLOCK_N, hi_live)
    # [lo, a_end): masked (below some row's window start); [a_end, full_end): no mask; [full_end, hi): masked.
    a_end = tl.minimum(tl.maximum(((win_end + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, lo), tl.maximum(hi, lo))
    full_end = tl.maximum(tl.minimum(hi, (prefix_len // BLOCK_N) * BLOCK_N), a_end)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # Under TRITON_INTERPRET=1 (triton 3.6, numpy >= 2.4) `range` over runtime bounds fails: the interpreter calls
    # int() on a 1-element array. The interpreter walks the tiles with `while`; compiled code keeps `for`, which
    # Triton software-pipelines.
    if INTERP:
        start = lo
        while start < a_end:
            m_i, l_i, acc = _tile(q, k_ptrs, v_ptrs, m_ptrs, MASK, start, stride_ks, stride_vs, stride_mt, offs_n,
                                  d_ok, tok, row_ok, depth_q, m_i, l_i, acc, prefix_len, lo_live, hi, window,
                                  qk_scale, softcap, True, HAS_MASK, WINDOW, MASK_WORDS, SOFTCAP, IEEE, UPCAST, EVEN_D)
            start += BLOCK_N
        while start < full_end:
            m_i, l_i, acc = _tile(q, k_ptrs, v_ptrs, m_ptrs, MASK, start, stride_ks, stride_vs, stride_mt, offs_n,
                                  d_ok, tok, row_ok, depth_q, m_i, l_i, acc, prefix_len, lo_live, hi, window,
                                  qk_scale, softcap, False, HAS_MASK, WINDOW, MASK_WORDS, SOFTCAP, IEEE, UPCAST,
                                  EVEN_D)
            start += BLOCK_N
        while start < hi:
            m_i, l_i, acc = _tile(q, k_ptrs, v_ptrs, m_ptrs, MASK, start, stride_ks, stride_vs, stride_mt, offs_n,
                                  d_ok, tok, row_ok, depth_q, m_i, l_i, acc, prefix_len, lo_live, hi, window,
                                  qk_scale, softcap, True, HAS_MASK, WINDOW, MASK_WORDS, SOFTCAP, IEEE, UPCAST, EVEN_D)
            start += BLOCK_N
    else:
        for start in range(lo, a_end, BLOCK_N):
            m_i, l_i, acc = _tile(q, k_ptrs, v_ptrs, m_ptrs, MASK, start, stride_ks, stride_vs, stride_mt, offs_n,
                                  d_ok, tok, row_ok, depth_q, m_i, l_i, acc, prefix_len, lo_live, hi, window,
                                  qk_scale, softcap, True, HAS_MASK, WINDOW, MASK_WORDS, SOFTCAP, IEEE, UPCAST, EVEN_D)
        for start in range(a_end, full_end, BLOCK_N):
            m_i, l_i, acc = _tile(q, k_ptrs, v_ptrs, m_ptrs, MASK, start, stride_ks, stride_vs, stride_mt, offs_n,
                                  d_ok, tok, row_ok, depth_q, m_i, l_i, acc, prefix_len, lo_live, hi, window,
                                  qk_scale, softcap, False, HAS_MASK, WINDOW, MASK_WORDS, SOFTCAP, IEEE, UPCAST,
                                  EVEN_D)
        for start in range(full_end, hi, BLOCK_N):
            m_i, l_i, acc = _tile(q, k_ptrs, v_ptrs, m_ptrs, MASK, start, stride_ks, stride_vs, stride_mt, offs_n,
                                  d_ok, tok, row_ok, depth_q, m_i, l_i, acc, prefix_len, lo_live, hi, window,
                                  qk_scale, softcap, True, HAS_MASK, WINDOW, MASK_WORDS, SOFTCAP, IEEE, UPCAST, EVEN_D)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    if SPLIT:
        # Partial result of this split: normalised output and log2-sum-exp (-inf when the split saw no key).
        lse = tl.where(l_i > 0.0, m_i + tl.math.log2(l_safe), float("-inf"))
        mid_row = ((b * (HKV * G) + head) * T + tok) * num_splits + pid_s
        tl.store(MID_O + mid_row[:, None] * BLOCK_D + offs_d[None, :], out, mask=row_ok[:, None])
        tl.store(MID_L + mid_row, lse, mask=row_ok)
    else:
        o_ptrs = O + b * stride_ob + head[:, None] * stride_oh + tok[:, None] * stride_ot + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def tree_attn_combine_kernel(
    MID_O, MID_L, O,
    stride_ob, stride_oh, stride_ot, stride_od,
    n_rows, HQ, T, D, num_splits,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Merge the per-split partial outputs of BLOCK_R rows (row = (b * HQ + h) * T + t) by their log2-sum-exp."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < n_rows
    t = rows % T
    bh = rows // T
    h = bh % HQ
    b = bh // HQ
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = r_ok[:, None] & (offs_s < num_splits)[None, :]
    slot = rows[:, None] * num_splits + offs_s[None, :]  # (R, S)
    lse = tl.load(MID_L + slot, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m_safe[:, None])  # (R, S); 0 for splits that saw nothing
    denom = tl.sum(w, 1)
    denom = tl.where(denom > 0.0, denom, 1.0)
    parts = tl.load(MID_O + slot[:, :, None] * BLOCK_D + offs_d[None, None, :], mask=s_ok[:, :, None], other=0.0)
    out = tl.sum(parts * w[:, :, None], 1) / denom[:, None]
    o_ptrs = O + b[:, None] * stride_ob + h[:, None] * stride_oh + t[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=r_ok[:, None] & (offs_d < D)[None, :])


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def plan(b: int, hq: int, hkv: int, t: int, n_keys: int, d: int, device: torch.device,
         num_splits: int | None = None, block_m: int | None = None, block_n: int | None = None,
         dtype: torch.dtype = torch.bfloat16) -> dict:
    """Launch parameters: block sizes, warps and the number of key-range splits.

    ``n_keys`` is the host's bound on the keys one program may need (``prefix_len + T``, less what a window cuts,
    when ``prefix_len`` is an int; the buffer length S, or window + T, for a device length). The kernel cuts its live
    key range into ``num_splits`` whole-tile chunks itself, so the split count (like any captured graph) does not
    depend on the device length.
    """
    g = hq // hkv
    block_d = max(16, triton.next_power_of_2(d))
    rows = t * g
    cpu = device.type == "cpu"
    if block_m is None:
        # tl.dot needs M >= 16. On the GPU, 128-row blocks (8 warps) once there are enough rows, as in flash
        # attention's forward; the interpreter pays per op, not per row, so it takes up to 64 rows of any D.
        if not cpu and rows >= 128 and block_d <= 128 and dtype != torch.float32:  # fp32: keep shared memory small
            block_m = 128
        else:
            block_m = min(64, max(16, triton.next_power_of_2(rows)))
    if block_n is None:
        if cpu:
            block_n = 128  # interpreter: bigger tiles, fewer Python-level iterations
        else:
            # D = 256: narrower key tiles keep q + double-buffered K/V within shared memory (fp32 most of all).
            block_n = 64 if block_d < 256 else (16 if dtype == torch.float32 else 32)
    num_warps = 8 if (block_m * block_d >= 128 * 128 or block_d >= 256) else 4
    m_blocks = triton.cdiv(rows, block_m)
    n_tiles = triton.cdiv(max(n_keys, 1), block_n)
    if num_splits is None:
        if device.type == "cuda":
            # Enough programs for ~2 waves, but keep at least 4 tiles per split so the combine stays cheap.
            want = triton.cdiv(2 * _num_sms(device.index if device.index is not None else torch.cuda.current_device()),
                               m_blocks * b * hkv)
            num_splits = max(1, min(want, n_tiles // 4 if n_tiles >= 4 else 1))
        else:
            num_splits = 1
    num_splits = max(1, min(num_splits, n_tiles))
    return dict(block_m=block_m, block_n=block_n, block_d=block_d, m_blocks=m_blocks,
                num_splits=num_splits, g=g, num_warps=num_warps)


def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int | torch.Tensor,
                   tree_mask: torch.Tensor | None, scale: float | None = None, *, window: int | None = None,
                   softcap: float | None = None, num_splits: int | None = None, block_m: int | None = None,
                   block_n: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of :func:`ouroboros_kernels.reference.tree_attention` (contract v3, same arguments).

    Parameters
    ----------
    q : (B, Hq, T, D) queries of the tree tokens (any strides).
    k, v : (B, Hkv, S, D) cache after the update; entries at or beyond ``prefix_len + T`` are never read.
    prefix_len : Python int, or int32/int64 tensor of shape () or (B,) on q's device, read by the kernel (no host
        sync; clamped into ``[0, S - T]``).
    tree_mask : packed int32 (T, ceil(T/32)) visibility bits among tree tokens, shared by every batch row, or
        (B, T, ceil(T/32)) with row b's tree in ``tree_mask[b]`` (B may be 1, dim 0 may have stride 0: read in place),
        or None for a causal chain.
    scale : score scale, default ``1/sqrt(D)``.
    window : sliding window w >= 1 on true positions (prefix_len + depth), or None.
    softcap : Gemma2 logit soft-capping (``softcap * tanh(score / softcap)``), or None.
    num_splits, block_m, block_n : tuning overrides (tests use them to exercise the split/combine path; a split
        count above what the live range fills leaves splits empty, which is correct, only wasteful).
    out : optional (B, Hq, T, D) output tensor (any strides) to write into.

    Returns
    -------
    o : (B, Hq, T, D) in ``q``'s dtype.
    """
    check_tree_attention_args(q, k, v, prefix_len, tree_mask, window, softcap)
    if q.device.type != "cuda" and not triton_interpret():
        raise ValueError(f"triton tree_attention runs on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1 set "
                         f"before triton is imported; got {q.device} tensors")
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    if d > 256:
        raise ValueError(f"triton tree_attention supports head dim up to 256, got {d}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    on_device = isinstance(prefix_len, torch.Tensor)
    if on_device:
        n_keys = s if window is None else min(s, window + t)
    else:
        n_keys = prefix_len + t - (max(0, prefix_len - window + 1) if window is not None else 0)
    p = plan(b, hq, hkv, t, n_keys, d, q.device, num_splits, block_m, block_n, q.dtype)
    if out is None:
        out = torch.empty(b, hq, t, d, dtype=q.dtype, device=q.device)
    elif tuple(out.shape) != (b, hq, t, d) or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must be {(b, hq, t, d)} {q.dtype} on {q.device}, got {tuple(out.shape)} {out.dtype}")
    if b == 0 or t == 0 or hq == 0:
        return out
    split = p["num_splits"] > 1
    if split:
        mid_o = torch.empty(b, hq, t, p["num_splits"], p["block_d"], dtype=torch.float32, device=q.device)
        mid_l = torch.empty(b, hq, t, p["num_splits"], dtype=torch.float32, device=q.device)
    else:
        mid_o = mid_l = out  # unused
    mask = tree_mask if tree_mask is not None else out  # dummy pointer when there is no mask
    if tree_mask is not None and tree_mask.stride(-1) != 1:
        mask = tree_mask = tree_mask.contiguous()
    stride_mb = mask_batch_stride(tree_mask) if tree_mask is not None else 0
    stride_mt = tree_mask.stride(-2) if tree_mask is not None else 0
    prefix_arg = prefix_len if on_device else out  # dummy pointer when prefix_len is a host int
    stride_pb = (prefix_len.stride(0) if prefix_len.dim() == 1 else 0) if on_device else 0
    qk_scale = scale if softcap is not None else scale * _LOG2E
    ieee = q.dtype == torch.float32
    grid = (p["m_blocks"], b * hkv, p["num_splits"])
    tree_attn_split_kernel[grid](
        q, k, v, mask, prefix_arg, out, mid_o, mid_l,
        *q.stride(), *k.stride(), *v.stride(),
        stride_mb, stride_mt, stride_pb, *out.stride(),
        0 if on_device else int(prefix_len), t, s, hkv, d, p["num_splits"], window if window is not None else 1,
        qk_scale, float(softcap) if softcap is not None else 1.0,
        G=p["g"], BLOCK_M=p["block_m"], BLOCK_N=p["block_n"], BLOCK_D=p["block_d"],
        HAS_MASK=tree_mask is not None, MASK_WORDS=(t + 31) // 32 if tree_mask is not None else 1,
        PREFIX_PTR=on_device, WINDOW=window is not None, SOFTCAP=softcap is not None, IEEE=ieee, SPLIT=split,
        INTERP=q.device.type == "cpu", UPCAST=q.device.type == "cpu" and q.dtype == torch.bfloat16,
        EVEN_D=d == p["block_d"],
        num_warps=p["num_warps"], num_stages=2,
    )
    if split:
        n_rows = b * hq * t
        block_s = max(2, triton.next_power_of_2(p["num_splits"]))
        # The interpreter pays per program: merge 64 rows per program there, 4 on the GPU.
        block_r = min(64 if q.device.type == "cpu" else 4, max(2, triton.next_power_of_2(n_rows)))
        tree_attn_combine_kernel[(triton.cdiv(n_rows, block_r),)](
            mid_o, mid_l, out, *out.stride(), n_rows, hq, t, d, p["num_splits"],
            BLOCK_R=block_r, BLOCK_S=block_s, BLOCK_D=p["block_d"],
            num_warps=4 if p["block_d"] >= 128 else 2,
        )
    return out
