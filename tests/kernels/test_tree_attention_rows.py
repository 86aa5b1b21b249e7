"""Tree attention contract v3: a packed tree mask per batch row, ``(B, T, ceil(T/32))``, on every backend.

Each backend is checked against a dense per-row attention computed here from the parents alone (ancestor walks and
depths, not the package's mask helpers) and against the reference run one row at a time with that row's 2-D mask,
over odd sizes: T = 1, T not a multiple of the key block, T > 32 (2 mask words), GQA, a long cache, sliding windows
that cut inside the prefix and the tree, softcap, per-row prefix lengths (one of them 0), B in {1, 3}. A 3-D mask
shared by every row ((1, T, W), or an expanded (B, T, W) with stride 0) gives exactly the 2-D answer; bad shapes raise
ValueError naming ``tree_mask``. Triton runs on CPU tensors under TRITON_INTERPRET=1; the CUDA kernel only on a GPU.
"""
from __future__ import annotations

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from conftest import CUDA, DEVICE, INTERP  # noqa: E402  (sets TRITON_INTERPRET first)
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

pytest.importorskip("triton")

import ouroboros_kernels as ok  # noqa: E402
from ouroboros_kernels import custom_ops, reference, tree  # noqa: E402
from ouroboros_kernels.triton import tree_attention as tt  # noqa: E402

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
CPU_BACKENDS = ["reference"] + (["triton"] if CUDA or INTERP else [])


def row_parents(b: int, t: int, seed: int) -> list[list[int]]:
    """A different tree for every row: random, chain, star, random, ... (each random one from its own seed)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(b):
        kind = ("random", "chain", "star")[i % 3]
        if kind == "chain":
            out.append([j - 1 for j in range(t)])
        elif kind == "star":
            out.append([-1] + [0] * (t - 1))
        else:
            out.append([int(torch.randint(-1, j, (1,), generator=gen)) if j else -1 for j in range(t)])
    return out


def packed_rows(parents: list[list[int]]) -> torch.Tensor:
    """(B, T, W) int32: row b's ancestor-or-self mask, packed."""
    return tree.pack_mask(torch.stack([tree.ancestor_mask(p) for p in parents])).to(DEVICE)


def row_lengths(kind: str, prefix: int, b: int):
    """``prefix_len`` as passed (a Python int, a 0-d tensor, or a (B,) int32 tensor whose rows differ, the last one
    possibly 0) and the per-row lengths it means."""
    if kind == "int":
        return prefix, [prefix] * b
    if kind == "0d":
        return torch.tensor(prefix, device=DEVICE), [prefix] * b
    rows = [prefix, prefix * 2 // 3, prefix // 5][:b]
    return torch.tensor(rows, dtype=torch.int32, device=DEVICE), rows


def make_qkv(b, hq, hkv, t, s, d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, t, d, generator=gen)
    k = torch.randn(b, hkv, s, d, generator=gen)
    v = torch.randn(b, hkv, s, d, generator=gen)
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype)


def dense_rows(q, k, v, rows, parents, window=None, softcap=None):
    """Float64 attention, one row at a time, with a visibility matrix built from the parents: token i of row b (at
    position p_b + depth_i) sees the p_b cache entries and its ancestors-or-self, and with a window only keys at
    positions > its own - window. SDPA without softcap; scores capped by hand with it."""
    out = []
    for b, (p, par) in enumerate(zip(rows, parents)):
        t = len(par)
        depth = torch.tensor(tree.depths(par), dtype=torch.int64)
        k_pos = torch.cat([torch.arange(p), p + depth])
        vis = torch.zeros(t, p + t, dtype=torch.bool)
        for i in range(t):
            vis[i, :p] = True
            vis[i, [p + a for a in tree.path_to(par, i)]] = True
            if window is not None:
                vis[i] &= k_pos > p + depth[i] - window
        g = q.shape[1] // k.shape[1]
        qb = q[b:b + 1].double().cpu()
        kb = k[b:b + 1, :, :p + t].double().cpu().repeat_interleave(g, dim=1)
        vb = v[b:b + 1, :, :p + t].double().cpu().repeat_interleave(g, dim=1)
        if softcap is None:
            o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=vis)
        else:
            s = torch.matmul(qb, kb.transpose(-1, -2)) * qb.shape[-1] ** -0.5
            s = (softcap * torch.tanh(s / softcap)).masked_fill(~vis, float("-inf"))
            o = torch.matmul(torch.softmax(s, dim=-1), vb)
        out.append(o)
    return torch.cat(out).to(q.device, torch.float32)


def poison(k, v, rows, t):
    """NaN into every cache entry at or past each row's prefix + T: no backend may read them."""
    for i, p in enumerate(rows):
        k[i, :, p + t:] = float("nan")
        v[i, :, p + t:] = float("nan")


def run(backend, q, k, v, prefix_len, mask, window=None, softcap=None, splits=None):
    if backend == "triton":
        return tt.tree_attention(q, k, v, prefix_len, mask, window=window, softcap=softcap, num_splits=splits)
    return ok.tree_attention(q, k, v, prefix_len, mask, window=window, softcap=softcap, backend=backend)


# (B, Hq, Hkv, T, prefix_len, extra slots, D, window, softcap, prefix kind, num_splits)
ROW_CASES = [
    (1, 2, 1, 1, 40, 3, 64, None, None, "b", None),         # T = 1, B = 1
    (3, 4, 2, 1, 100, 5, 64, 10, None, "b", 2),             # T = 1 decode per row, window in the prefix
    (3, 4, 1, 37, 120, 5, 64, None, None, "b", None),       # 2 mask words, GQA 4, per-row prefixes (one is 24)
    (3, 2, 2, 19, 60, 0, 32, 6, None, "b", 3),              # T not a block multiple; window cuts the chain row's tree
    (3, 8, 2, 45, 700, 9, 64, 300, 20.0, "b", 4),           # long L, window + softcap, split over S
    (1, 4, 2, 70, 33, 2, 64, None, 30.0, "0d", None),       # B = 1 with a 3-D mask, softcap, 3 words
    (3, 2, 1, 33, 50, 0, 16, 5, None, "int", None),         # int prefix, one length, three trees
    (3, 2, 2, 8, 0, 4, 64, 3, None, "0d", None),            # nothing cached: the trees alone
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("b,hq,hkv,t,prefix,extra,d,window,softcap,pkind,splits", ROW_CASES)
def test_per_row_masks_match_dense_and_rows_alone(backend, b, hq, hkv, t, prefix, extra, d, window, softcap, pkind,
                                                  splits):
    q, k, v = make_qkv(b, hq, hkv, t, prefix + t + extra, d, torch.float32, seed=t * 31 + prefix + b)
    parents = row_parents(b, t, seed=t + b)
    mask = packed_rows(parents)
    prefix_len, rows = row_lengths(pkind, prefix, b)
    want = dense_rows(q, k, v, rows, parents, window, softcap)
    alone = torch.cat([reference.tree_attention(q[i:i + 1], k[i:i + 1, :, :p + t], v[i:i + 1, :, :p + t], p, mask[i],
                                                window=window, softcap=softcap) for i, p in enumerate(rows)])
    torch.testing.assert_close(alone, want, **TOL[torch.float32])
    poison(k, v, rows, t)
    got = run(backend, q, k, v, prefix_len, mask, window, softcap, splits)
    assert got.shape == q.shape and not torch.isnan(got).any()
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    torch.testing.assert_close(got, alone, **TOL[torch.float32])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("b,t", [(1, 1), (1, 37), (3, 19)])
def test_shared_3d_mask_equals_2d(backend, b, t):
    """(1, T, W), and (B, T, W) expanded from it (stride 0 on dim 0), are the shared 2-D mask: the same output."""
    q, k, v = make_qkv(b, 4, 2, t, 80 + t, 64, torch.float32, seed=b + t)
    flat = tree.pack_mask(tree.ancestor_mask(row_parents(1, t, seed=t)[0])).to(DEVICE)
    prefix_len = torch.tensor([80, 41, 0][:b], dtype=torch.int64, device=DEVICE)
    two_d = run(backend, q, k, v, prefix_len, flat, window=17)
    for three_d in (flat[None], flat[None].expand(b, -1, -1)):
        assert torch.equal(run(backend, q, k, v, prefix_len, three_d, window=17), two_d)
    copies = flat[None].repeat(b, 1, 1)                   # B real copies of one tree: row-for-row the same answer
    torch.testing.assert_close(run(backend, q, k, v, prefix_len, copies, window=17), two_d, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_per_row_masks(backend):
    """Per-row masks that are views (a slice of wider rows, rows of a bigger batch) are read through their strides."""
    b, t = 3, 40
    q, k, v = make_qkv(b, 2, 1, t, 90, 64, torch.float32, seed=4)
    parents = row_parents(b, t, seed=9)
    mask = packed_rows(parents)
    wide = torch.zeros(2 * b, t, 5, dtype=torch.int32, device=DEVICE)
    wide[::2, :, 1:3] = mask
    view = wide[::2, :, 1:3]
    assert not view.is_contiguous()
    rows = [50, 12, 33]
    prefix_len = torch.tensor(rows, device=DEVICE)
    want = dense_rows(q, k, v, rows, parents, window=9)
    torch.testing.assert_close(run(backend, q, k, v, prefix_len, view, window=9), want, **TOL[torch.float32])


def test_tree_visibility_per_row_rule():
    """``reference.tree_visibility`` with a (B, T, W) mask is each row's own 2-D visibility."""
    parents = row_parents(3, 35, seed=3)
    mask = packed_rows(parents).cpu()
    prefix = torch.tensor([20, 0, 7])
    got = reference.tree_visibility(prefix, 60, 35, mask, 6)
    for i in range(3):
        assert torch.equal(got[i], reference.tree_visibility(prefix[i:i + 1], 60, 35, mask[i], 6)[0])


def test_pack_unpack_batched_round_trip():
    gen = torch.Generator().manual_seed(0)
    for t in (1, 31, 33, 70):
        dense = torch.rand(3, t, t, generator=gen) < 0.5
        packed = tree.pack_mask(dense)
        assert packed.dtype == torch.int32 and tuple(packed.shape) == (3, t, (t + 31) // 32)
        assert torch.equal(tree.unpack_mask(packed), dense)
        assert all(torch.equal(packed[i], tree.pack_mask(dense[i])) for i in range(3))
    with pytest.raises(ValueError):
        tree.pack_mask(torch.ones(2, 3, 4, dtype=torch.bool))
    with pytest.raises(ValueError):
        tree.pack_mask(torch.ones(1, 2, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError):
        tree.unpack_mask(torch.zeros(1, 2, 3, 1, dtype=torch.int32))


def bad_masks(b: int, t: int) -> list[torch.Tensor]:
    w = (t + 31) // 32
    i32 = dict(dtype=torch.int32, device=DEVICE)
    return [torch.zeros(b - 1, t, w, **i32), torch.zeros(b + 1, t, w, **i32), torch.zeros(b, t, w + 1, **i32),
            torch.zeros(b, t + 1, w, **i32), torch.zeros(b, t - 1, w, **i32), torch.zeros(1, b, t, w, **i32),
            torch.zeros(b, t, w, dtype=torch.int64, device=DEVICE), torch.zeros(b, t, w, dtype=torch.int32,
                                                                                   device="meta")]


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["public", "custom_op"])
def test_bad_mask_shapes_name_tree_mask(backend):
    b, t = 3, 33
    q, k, v = make_qkv(b, 4, 2, t, 60, 64, torch.float32, seed=0)
    for mask in bad_masks(b, t):
        with pytest.raises(ValueError, match="tree_mask"):
            if backend == "custom_op":
                custom_ops.tree_attention(q, k, v, 20, mask)
            elif backend == "public":
                ok.tree_attention(q, k, v, 20, mask)
            else:
                run(backend, q, k, v, 20, mask)


def test_custom_op_takes_per_row_masks_eager_and_fake():
    """The torch custom op runs a (B, T, W) mask and its fake impl gives the output's shape (so it traces)."""
    b, t = 3, 35
    q, k, v = make_qkv(b, 4, 2, t, 90, 64, torch.float32, seed=5)
    parents = row_parents(b, t, seed=5)
    mask = packed_rows(parents)
    prefix_len = torch.tensor([55, 3, 20], device=DEVICE)
    got = custom_ops.tree_attention(q, k, v, prefix_len, mask, window=12, backend="reference")
    torch.testing.assert_close(got, dense_rows(q, k, v, [55, 3, 20], parents, window=12), **TOL[torch.float32])
    with FakeTensorMode() as mode:
        fq, fk, fv, fm, fp = (mode.from_tensor(x) for x in (q, k, v, mask, prefix_len))
        out = custom_ops.tree_attention(fq, fk, fv, fp, fm, window=12)
        assert out.shape == q.shape and out.dtype == q.dtype
        with pytest.raises(ValueError, match="tree_mask"):
            custom_ops.tree_attention(fq, fk, fv, fp, fm[:2], window=12)


# ---------------------------------------------------------------------------------------------------------------- CUDA
GPU_BACKENDS = [name for name in ("triton", "cuda") if name in ok.available_backends()] if CUDA else ["cuda"]
CUDA_ROW_GRID = [(b, t, hq, hkv, d, window, softcap)
                 for b in (1, 3)
                 for t in (1, 19, 37, 130)
                 for hq, hkv, d in ((12, 2, 128), (14, 2, 64), (8, 4, 256))
                 for window, softcap in ((None, None), (100, None), (8, 30.0))]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,t,hq,hkv,d,window,softcap", CUDA_ROW_GRID)
def test_gpu_per_row_masks(backend, dtype, b, t, hq, hkv, d, window, softcap):
    """Per-row trees on the GPU backends: device per-row prefix lengths, a static buffer with NaN past the live part."""
    if backend not in ok.available_backends():
        pytest.skip(f"backend {backend} is not available: {ok.backend_status()[backend]}")
    q, k, v = make_qkv(b, hq, hkv, t, 1500 + t + 600, d, dtype, seed=b + t + d)
    parents = row_parents(b, t, seed=t)
    mask = packed_rows(parents)
    prefix_len, rows = row_lengths("b", 1500, b)
    want = dense_rows(q, k, v, rows, parents, window, softcap)
    poison(k, v, rows, t)
    got = ok.tree_attention(q, k, v, prefix_len, mask, window=window, softcap=softcap, backend=backend)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.float(), want, **TOL[dtype])
