"""Triton (and CUDA, when built) tree attention against the PyTorch reference (SPEC §3 contract v2, §5).

On CPU the Triton kernels run through the interpreter (TRITON_INTERPRET=1, set here without CUDA, before triton is
imported). The interpreter's fp32 matmul is slow (~30 ns per multiply-add), so the grids below are a representative
subsample of T x S x GQA x D x tree shape x prefix kind x window x softcap, sized to keep this file within a few minutes
on two cores; CUDA runs a denser grid. The window rule itself is checked against transformers' own masks.
"""
from __future__ import annotations

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import CUDA, DEVICE, INTERP, needs_triton_device  # noqa: E402  (sets TRITON_INTERPRET first)

pytest.importorskip("triton")

import ouroboros_kernels as ok  # noqa: E402
from ouroboros_kernels import reference, tree  # noqa: E402
from ouroboros_kernels.triton import tree_attention as tt  # noqa: E402

cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def make_parents(kind: str, t: int, gen: torch.Generator) -> list[int]:
    if kind == "chain":
        return [i - 1 for i in range(t)]
    if kind == "star":  # one root, every other node its child
        return [-1] + [0] * (t - 1)
    if kind == "random":
        return [int(torch.randint(-1, i, (1,), generator=gen)) if i else -1 for i in range(t)]
    raise ValueError(kind)


def make_inputs(b, hq, hkv, t, prefix, d, dtype, extra=0, seed=0, q_layout="bhtd"):
    """Fresh random q/k/v; cache entries at or past prefix + t are NaN (they must never be read)."""
    gen = torch.Generator().manual_seed(seed)
    s = prefix + t + extra
    if q_layout == "bthd":  # what transformers hands over: (B, T, H, D) transposed to (B, H, T, D), non-contiguous
        q = torch.randn(b, t, hq, d, generator=gen).transpose(1, 2)
    else:
        q = torch.randn(b, hq, t, d, generator=gen)
    k = torch.randn(b, hkv, s, d, generator=gen)
    v = torch.randn(b, hkv, s, d, generator=gen)
    if extra:
        k[:, :, prefix + t:] = float("nan")
        v[:, :, prefix + t:] = float("nan")
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype), gen


def make_mask(kind, t, gen):
    if kind == "causal":
        return None
    return tree.pack_mask(tree.ancestor_mask(make_parents(kind, t, gen))).to(DEVICE)


def expected(q, k, v, prefix, mask, scale=None, softcap=None):
    """Reference on finite inputs (entries past prefix + T are sliced off by the reference itself)."""
    return reference.tree_attention(q, k, v, prefix, mask, scale, softcap=softcap)


# (B, Hq, Hkv, T, prefix_len, extra static-cache entries, D, tree, softcap, num_splits)
CASES = [
    (1, 4, 1, 1, 17, 0, 64, "causal", None, None),       # decode, GQA 4
    (1, 2, 2, 1, 2047, 0, 128, "causal", None, 4),       # decode over S = 2048, split S
    (1, 8, 1, 7, 37, 5, 64, "random", None, None),       # GQA 8, static cache longer than needed
    (1, 2, 2, 7, 577, 9, 128, "chain", None, 3),         # packed chain mask == causal
    (1, 4, 1, 64, 577, 0, 64, "star", None, 3),          # GQA 4, split
    (1, 2, 2, 64, 17, 0, 64, "causal", None, None),
    (1, 1, 1, 130, 17, 3, 64, "random", None, 2),        # T crosses the 32-bit word boundary
    (1, 8, 2, 130, 37, 0, 128, "causal", 30.0, None),    # softcap (Gemma2), GQA 4
    (1, 1, 1, 256, 1792, 0, 64, "random", None, 2),      # T = 256, S = 2048
    (1, 2, 1, 256, 0, 0, 64, "causal", None, None),      # pure prefill, nothing cached
    (1, 4, 4, 64, 0, 0, 64, "random", None, None),       # a tree with no cached prefix
    (2, 4, 2, 17, 100, 7, 64, "random", 5.0, 2),         # batch 2, softcap, split
    (1, 2, 1, 7, 37, 0, 256, "star", None, None),        # D = 256
    (1, 4, 2, 7, 37, 0, 32, "chain", None, 2),           # D = 32
    (1, 2, 2, 5, 33, 0, 16, "random", None, None),       # D = 16 (tiny test models)
]


@needs_triton_device
@pytest.mark.parametrize("b,hq,hkv,t,prefix,extra,d,kind,softcap,splits", CASES)
def test_triton_matches_reference_fp32(b, hq, hkv, t, prefix, extra, d, kind, softcap, splits):
    q, k, v, gen = make_inputs(b, hq, hkv, t, prefix, d, torch.float32, extra, seed=t * 1000 + prefix)
    mask = make_mask(kind, t, gen)
    out = torch.full((b, hq, t, d), float("nan"), dtype=q.dtype, device=DEVICE)
    got = tt.tree_attention(q, k, v, prefix, mask, None, softcap=softcap, num_splits=splits, out=out)
    assert got.data_ptr() == out.data_ptr()
    want = expected(q, k, v, prefix, mask, None, softcap)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@needs_triton_device
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind,splits", [("random", None), ("causal", 2)])
def test_triton_half_precision(dtype, kind, splits):
    q, k, v, gen = make_inputs(1, 4, 2, 33, 95, 64, dtype, extra=3, seed=7)
    mask = make_mask(kind, 33, gen)
    out = torch.full_like(q, float("nan")).contiguous()
    got = tt.tree_attention(q, k, v, 95, mask, num_splits=splits, out=out)
    torch.testing.assert_close(got.float(), expected(q, k, v, 95, mask).float(), **TOL[dtype])


@needs_triton_device
def test_chain_mask_equals_causal_and_custom_scale():
    """The packed chain mask must give the causal (mask=None) answer; an explicit scale is honoured."""
    q, k, v, _ = make_inputs(1, 4, 1, 37, 577, 64, torch.float32, seed=3)
    chain = tree.causal_packed_mask(37).to(DEVICE)
    a = tt.tree_attention(q, k, v, 577, chain, 0.3)
    c = tt.tree_attention(q, k, v, 577, None, 0.3)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, expected(q, k, v, 577, chain, 0.3), **TOL[torch.float32])


@needs_triton_device
def test_non_contiguous_q_and_split_counts_agree():
    """q as transformers hands it over (a transposed view); every split count gives the same answer."""
    q, k, v, gen = make_inputs(1, 4, 2, 9, 300, 64, torch.float32, seed=11, q_layout="bthd")
    assert not q.is_contiguous()
    mask = make_mask("random", 9, gen)
    want = expected(q, k, v, 300, mask)
    for splits in (1, 2, 3):
        got = tt.tree_attention(q, k, v, 300, mask, num_splits=splits, block_n=64)
        torch.testing.assert_close(got, want, **TOL[torch.float32])


@needs_triton_device
def test_public_dispatch_triton():
    q, k, v, gen = make_inputs(1, 4, 1, 7, 37, 64, torch.float32, extra=2, seed=5)
    mask = make_mask("random", 7, gen)
    got = ok.tree_attention(q, k, v, 37, mask, backend="triton")
    torch.testing.assert_close(got, expected(q, k, v, 37, mask), **TOL[torch.float32])


def test_argument_errors():
    q, k, v, _ = make_inputs(1, 4, 2, 7, 10, 64, torch.float32)
    bad_mask = torch.zeros(7, 2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="tree_mask"):
        tt.tree_attention(q, k, v, 10, bad_mask)
    with pytest.raises(ValueError, match="prefix_len"):
        tt.tree_attention(q, k, v, 11, None)
    with pytest.raises(ValueError, match="multiple"):
        tt.tree_attention(q[:, :3], k, v, 10, None)
    with pytest.raises(ValueError, match="softcap"):
        tt.tree_attention(q, k, v, 10, None, None, softcap=-1.0)
    with pytest.raises(ValueError):
        tt.tree_attention(q, k.half(), v, 10, None)


def test_plan_split_counts():
    """The split count never exceeds the key tiles of the host's bound, and a forced count is honoured up to it."""
    for n_keys in (1, 17, 128, 129, 2048, 8448):
        for want in (1, 2, 3, 7, 64):
            p = tt.plan(1, 32, 8, 64, n_keys, 128, torch.device("cpu"), num_splits=want)
            tiles = -(-n_keys // p["block_n"])
            assert p["num_splits"] == max(1, min(want, tiles))


# ------------------------------------------------------------------------------------------------------ contract v2
def v2_prefix(kind: str, prefix: int, b: int):
    """``prefix_len`` as passed to the kernels (a Python int, a 0-d tensor, or a (B,) int32 tensor whose rows differ)
    and the per-row prefix lengths it means."""
    if kind == "int":
        return prefix, [prefix] * b
    if kind == "0d":
        return torch.tensor(prefix, device=DEVICE), [prefix] * b
    rows = [max(0, prefix - 37 * i) for i in range(b)]
    return torch.tensor(rows, dtype=torch.int32, device=DEVICE), rows


def poison_past_live(k, v, rows, t):
    """NaN into every cache entry at or past each row's prefix + T: the kernels must never read them."""
    for i, p in enumerate(rows):
        k[i, :, p + t:] = float("nan")
        v[i, :, p + t:] = float("nan")


def per_row_reference(q, k, v, rows, mask, window=None, softcap=None):
    """The reference with an int prefix, one batch row at a time, on the live keys only."""
    t = q.shape[2]
    return torch.cat([reference.tree_attention(q[i:i + 1], k[i:i + 1, :, :p + t], v[i:i + 1, :, :p + t], p, mask,
                                               window=window, softcap=softcap) for i, p in enumerate(rows)])


# (B, Hq, Hkv, T, prefix_len, extra slots, D, tree, window, softcap, prefix kind, num_splits); windows are chosen to
# cut inside the cache prefix, inside the tree (chains and causal prefill deeper than the window), or both.
V2_CASES = [
    (1, 4, 1, 1, 2047, 0, 64, "causal", 100, None, "0d", 4),       # decode over S = 2048, window in the prefix
    (2, 8, 1, 7, 300, 9, 128, "chain", 5, None, "b", 3),           # GQA 8, per-row prefixes, cut inside the tree
    (1, 2, 2, 64, 500, 0, 64, "chain", 40, None, "int", 2),        # chain deeper than the window
    (1, 4, 1, 130, 37, 3, 64, "random", 20, 30.0, "0d", None),     # 2 mask words, softcap + window
    (1, 2, 1, 7, 60, 0, 256, "star", 30, 50.0, "int", None),       # D = 256
    (2, 2, 1, 33, 600, 5, 128, "random", None, None, "b", 4),      # device prefix, no window
    (1, 2, 2, 130, 0, 0, 64, "causal", 48, None, "int", None),     # prefill: T = prompt length, window cuts
    (2, 4, 4, 1, 200, 50, 64, "causal", 1, None, "b", 2),          # window 1: each token sees only itself
    (1, 8, 1, 64, 1900, 84, 64, "random", 1000, None, "0d", 3),    # S = 2048, window over half the prefix
    (1, 4, 2, 17, 90, 0, 128, "random", None, 5.0, "int", None),   # softcap alone
]


@needs_triton_device
@pytest.mark.parametrize("b,hq,hkv,t,prefix,extra,d,kind,window,softcap,pkind,splits", V2_CASES)
def test_v2_triton_and_reference(b, hq, hkv, t, prefix, extra, d, kind, window, softcap, pkind, splits):
    q, k, v, gen = make_inputs(b, hq, hkv, t, prefix, d, torch.float32, extra, seed=t * 7 + prefix)
    mask = make_mask(kind, t, gen)
    prefix_len, rows = v2_prefix(pkind, prefix, b)
    want = per_row_reference(q, k, v, rows, mask, window, softcap)
    poison_past_live(k, v, rows, t)
    ref = reference.tree_attention(q, k, v, prefix_len, mask, window=window, softcap=softcap)
    torch.testing.assert_close(ref, want, atol=1e-6, rtol=1e-6)
    out = torch.full((b, hq, t, d), float("nan"), dtype=q.dtype, device=DEVICE)
    got = tt.tree_attention(q, k, v, prefix_len, mask, window=window, softcap=softcap, num_splits=splits, out=out)
    assert got.data_ptr() == out.data_ptr() and not torch.isnan(got).any()
    torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_v2_cases_cut_where_they_claim():
    """The windows of V2_CASES really cut: inside the cache prefix and/or inside the tree, as their comments say."""
    gen = torch.Generator().manual_seed(0)
    for _, _, _, t, prefix, _, _, kind, window, _, _, _ in V2_CASES:
        if window is None:
            continue
        mask = None if kind == "causal" else tree.pack_mask(tree.ancestor_mask(make_parents(kind, t, gen)))
        p = torch.tensor([prefix])
        cut = ~reference.tree_visibility(p, prefix + t, t, mask, window)[0] & \
            reference.tree_visibility(p, prefix + t, t, mask, None)[0]
        assert cut[:, :prefix].any() or cut[:, prefix:].any()
    chain = tree.causal_packed_mask(64)
    cut = ~reference.tree_visibility(torch.tensor([500]), 564, 64, chain, 40)[0]
    assert cut[:, 500:].tril().any() and cut[:, :500].any()      # case 3: both regions


def test_tree_visibility_brute_force():
    """``reference.tree_visibility`` against the rule spelled out per (row, token, key) on true positions."""
    gen = torch.Generator().manual_seed(5)
    t, window = 40, 7
    parents = [i - 1 if i % 3 else int(torch.randint(-1, i, (1,), generator=gen)) if i else -1 for i in range(t)]
    depth = tree.depths(parents)
    mask = tree.pack_mask(tree.ancestor_mask(parents))
    prefixes = torch.tensor([25, 3])
    n = 25 + t + 4
    got = reference.tree_visibility(prefixes, n, t, mask, window)
    for b, p in enumerate(prefixes.tolist()):
        for i in range(t):
            ancestors = set(tree.path_to(parents, i))
            for j in range(n):
                if j < p:
                    seen, pos = True, j
                elif j < p + t:
                    seen, pos = j - p in ancestors, p + depth[j - p]
                else:
                    seen, pos = False, j
                assert bool(got[b, i, j]) == (seen and pos > p + depth[i] - window), (b, i, j)


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3"])
@pytest.mark.parametrize("cached,t", [(0, 13), (20, 1), (20, 5)])   # prefill (T = prompt), decode, a chain
def test_window_rule_matches_transformers_masks(family, cached, t):
    """Our visibility for a causal chain equals transformers' own sliding-window mask (eager, materialised)."""
    import transformers
    from transformers import DynamicCache
    from transformers.masking_utils import create_sliding_window_causal_mask

    cls = {"mistral": "MistralConfig", "gemma2": "Gemma2Config", "gemma3": "Gemma3TextConfig"}[family]
    extra = {} if family == "mistral" else {"head_dim": 16}
    config = getattr(transformers, cls)(vocab_size=32, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, sliding_window=6, **extra)
    config._attn_implementation = "eager"
    cache = DynamicCache()
    for layer in range(config.num_hidden_layers if cached else 0):
        cache.update(torch.zeros(1, 2, cached, 16), torch.zeros(1, 2, cached, 16), layer)
    hf = create_sliding_window_causal_mask(config=config, inputs_embeds=torch.zeros(1, t, 64), attention_mask=None,
                                           cache=cache, position_ids=torch.arange(cached, cached + t)[None])
    hf_visible = hf[0, 0] == 0 if hf.dtype.is_floating_point else hf[0, 0]
    ours = reference.tree_visibility(torch.tensor([cached]), cached + t, t, None, config.sliding_window)[0]
    assert torch.equal(ours, hf_visible)
    assert (~ours).any() or cached + t <= config.sliding_window          # the window does cut here
    chain = reference.tree_visibility(torch.tensor([cached]), cached + t, t, tree.causal_packed_mask(t), 6)[0]
    assert torch.equal(chain, ours)                                       # a chain mask gives the same positions


@pytest.mark.parametrize("backend", ["reference"] + (["triton"] if CUDA or INTERP else []))
def test_v2_argument_errors(backend):
    fn = reference.tree_attention if backend == "reference" else tt.tree_attention
    q, k, v, _ = make_inputs(2, 4, 2, 7, 10, 64, torch.float32)
    cases = [
        (dict(window=0), "window"), (dict(window=2.5), "window"), (dict(window=True), "window"),
        (dict(softcap=0.0), "softcap"), (dict(softcap=-3.0), "softcap"),
        (dict(prefix_len=torch.tensor(3.0, device=DEVICE)), "prefix_len"),
        (dict(prefix_len=torch.tensor([3, 4, 5], device=DEVICE)), "prefix_len"),
        (dict(prefix_len=torch.zeros(2, 1, dtype=torch.long, device=DEVICE)), "prefix_len"),
        (dict(prefix_len=torch.tensor(3, device="meta")), "prefix_len"),
        (dict(prefix_len=3.0), "prefix_len"), (dict(prefix_len=-1), "prefix_len"), (dict(prefix_len=11), "prefix_len"),
        (dict(tree_mask=torch.zeros(7, 2, dtype=torch.int32, device=DEVICE)), "tree_mask"),
        (dict(tree_mask=torch.zeros(7, 1, dtype=torch.int64, device=DEVICE)), "tree_mask"),
    ]
    for change, name in cases:
        args = {"prefix_len": 10, "tree_mask": None, **change}
        with pytest.raises(ValueError, match=name):
            fn(q, k, v, args.pop("prefix_len"), args.pop("tree_mask"), **args)
    with pytest.raises(ValueError, match="dtype|fp16"):
        fn(q, k.double(), v, 10, None)
    with pytest.raises(ValueError, match="shape"):
        fn(q, k, v[:, :, :-1], 10, None)


def test_public_op_v2_keywords_and_cpu_default():
    """The public op takes window/softcap as keywords; on CPU tensors "auto" runs the reference (never the
    interpreter), and a named backend is honoured."""
    q, k, v, gen = make_inputs(1, 4, 2, 9, 50, 64, torch.float32, extra=3, seed=9)
    mask = make_mask("random", 9, gen)
    prefix_len = torch.tensor(50, device=DEVICE)
    want = reference.tree_attention(q, k, v, 50, mask, 0.2, window=8, softcap=20.0)
    if not CUDA:
        assert ok.attention.resolve_backend(q) == "reference"
    for backend in [None] + (["triton"] if CUDA or INTERP else []):
        got = ok.tree_attention(q, k, v, prefix_len, mask, 0.2, window=8, softcap=20.0, backend=backend)
        torch.testing.assert_close(got, want, **TOL[torch.float32])
    with pytest.raises(TypeError):
        ok.tree_attention(q, k, v, 50, mask, None, 8)   # window is keyword-only


@needs_triton_device
def test_more_splits_than_live_tiles():
    """A device length shorter than the buffer leaves some splits empty: still exact (and no NaN from empty ones)."""
    q, k, v, gen = make_inputs(1, 4, 1, 5, 40, 64, torch.float32, extra=600, seed=13)
    mask = make_mask("random", 5, gen)
    want = reference.tree_attention(q, k, v, 40, mask, window=30)
    for splits in (1, 5, 9):
        got = tt.tree_attention(q, k, v, torch.tensor(40, device=DEVICE), mask, window=30, num_splits=splits)
        torch.testing.assert_close(got, want, **TOL[torch.float32])


# ---------------------------------------------------------------------------------------------------------------- CUDA
CUDA_GRID = [(t, prefix, hq, hkv, d, kind)
             for t in (1, 7, 64, 130, 256)
             for prefix, hq, hkv, d in ((17, 32, 32, 128), (577, 32, 8, 128), (2047, 8, 1, 64), (4000, 16, 2, 256))
             for kind in ("chain", "random", "causal")]


@cuda_only
@pytest.mark.parametrize("backend", [name for name in ("triton", "cuda") if name in ok.available_backends()])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32] if CUDA else [torch.float16])
@pytest.mark.parametrize("t,prefix,hq,hkv,d,kind", CUDA_GRID if CUDA else CUDA_GRID[:1])
def test_cuda_backends_match_reference(backend, dtype, t, prefix, hq, hkv, d, kind):
    if backend == "cuda" and dtype == torch.float32:
        pytest.skip("the CUDA backend is fp16/bf16 only (SPEC §3)")
    q, k, v, gen = make_inputs(1, hq, hkv, t, prefix, d, dtype, extra=5, seed=t + prefix)
    mask = make_mask(kind, t, gen)
    got = ok.tree_attention(q, k, v, prefix, mask, backend=backend)
    torch.testing.assert_close(got.float(), expected(q, k, v, prefix, mask).float(), **TOL[dtype])


@cuda_only
@pytest.mark.parametrize("backend", [name for name in ("triton", "cuda") if name in ok.available_backends()])
def test_cuda_softcap(backend):
    q, k, v, gen = make_inputs(1, 8, 4, 64, 1000, d=128, dtype=torch.bfloat16, seed=1)
    mask = make_mask("random", 64, gen)
    try:
        got = ok.tree_attention(q, k, v, 1000, mask, None, softcap=50.0, backend=backend)
    except ValueError as e:  # a backend may refuse softcap, but clearly
        assert "softcap" in str(e)
        return
    torch.testing.assert_close(got.float(), expected(q, k, v, 1000, mask, None, 50.0).float(), **TOL[torch.bfloat16])


# (T, Hq, Hkv, D) x (window, softcap, prefix kind): the real pair's shapes (12/2 x 128, 14/2 x 64) among them.
CUDA_V2_GRID = [(t, hq, hkv, d, window, softcap, pkind)
                for t in (1, 16, 64, 130)
                for hq, hkv, d in ((12, 2, 128), (14, 2, 64), (32, 8, 128), (8, 4, 256))
                for window, softcap, pkind in ((None, None, "0d"), (100, None, "b"), (8, 30.0, "int"))]


@cuda_only
@pytest.mark.parametrize("backend", [name for name in ("triton", "cuda") if name in ok.available_backends()])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t,hq,hkv,d,window,softcap,pkind", CUDA_V2_GRID)
def test_cuda_v2_matches_reference(backend, dtype, t, hq, hkv, d, window, softcap, pkind):
    """Contract v2 on the GPU backends: device prefix lengths (0-d, per row), windows, softcap, a static buffer longer
    than the live part (NaN there), poisoned outputs checked for NaN."""
    b = 2 if pkind == "b" else 1
    q, k, v, gen = make_inputs(b, hq, hkv, t, 1500, d, dtype, extra=600, seed=t + hq + d)
    mask = make_mask("random", t, gen) if t > 1 else None
    prefix_len, rows = v2_prefix(pkind, 1500, b)
    want = per_row_reference(q, k, v, rows, mask, window, softcap)
    poison_past_live(k, v, rows, t)
    got = ok.tree_attention(q, k, v, prefix_len, mask, window=window, softcap=softcap, backend=backend)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])
