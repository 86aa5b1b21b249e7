"""Triton glue kernels (RMSNorm, add+RMSNorm, RoPE, SwiGLU) against their PyTorch twins, plus dispatch and errors.

On CPU the kernels run through the Triton interpreter (TRITON_INTERPRET=1, set here without CUDA, before triton is
imported). The interpreter rounds fp32 -> bf16 by truncation where a GPU rounds to nearest even, so bf16 is compared
within two bf16 ulps (the kernels round where transformers' code rounds; on a GPU they agree with it up to the order
of the variance sum). fp32 is compared tightly. Shapes are odd on purpose: rows 1/3/17, hidden 64/96/200, head dims
whose half is not a power of two, intermediate sizes that cross the SwiGLU block.
"""
from __future__ import annotations

import pytest
import torch
from conftest import CUDA, DEVICE, INTERP, needs_triton_device  # noqa: E402  (sets TRITON_INTERPRET first)

pytest.importorskip("triton")

import ouroboros_kernels as ok  # noqa: E402
from ouroboros_kernels import glue, reference  # noqa: E402
from ouroboros_kernels.triton import glue as tg  # noqa: E402

pytestmark = needs_triton_device

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dtype)


def close(got, want, tol_dtype=None):
    """Equal dtype and shape, values within the tolerance of ``tol_dtype`` (default: the dtype)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), **TOL[tol_dtype or want.dtype])


# ------------------------------------------------------------------------------------------------------------ RMSNorm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 96, 200])
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_rms_norm(rows, hidden, dtype):
    x, w = rand(rows, hidden, dtype=dtype), rand(hidden, dtype=dtype, seed=1)
    y = tg.rms_norm(x, w, 1e-6)
    close(y, reference.rms_norm_reference(x, w, 1e-6))
    assert y.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 96), (2, 17, 200)])
def test_add_rms_norm(shape, dtype):
    """One launch returns (norm(x + residual), x + residual); the sum is rounded to the dtype like the layer's add."""
    x, r, w = rand(*shape, dtype=dtype), rand(*shape, dtype=dtype, seed=2), rand(shape[-1], dtype=dtype, seed=1)
    y, s = tg.rms_norm(x, w, 1e-5, residual=r)
    y_ref, s_ref = reference.rms_norm_reference(x, w, 1e-5, residual=r)
    close(y, y_ref)
    if INTERP and dtype == torch.bfloat16:
        close(s, s_ref)                     # interpreter: bf16 rounds by truncation
    else:
        assert torch.equal(s, s_ref)        # one rounding of an exact fp32 sum, like PyTorch's add


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_gemma_offset(dtype):
    """Gemma's ``(1 + weight)`` in fp32 before the cast, and an offset with Llama's cast order."""
    x, w = rand(3, 96, dtype=dtype), rand(96, dtype=dtype, seed=1, scale=0.1)
    for cast in ("gemma", "llama"):
        close(tg.rms_norm(x, w, 1e-6, offset=1.0, cast=cast),
              reference.rms_norm_reference(x, w, 1e-6, offset=1.0, cast=cast))
    ref = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + w.float())
    close(reference.rms_norm_reference(x, w, 1e-6, offset=1.0, cast="gemma"), ref.to(dtype))


def test_rms_norm_views_and_weight_promotion():
    """Rows addressed by two strides (q heads sliced out of a fused qkv output) are read in place; a fp32 weight on
    bf16 input promotes the output to fp32, like ``weight * x.to(bf16)``."""
    qkv = rand(2, 5, 8 * 24)                           # (B, T, (Hq + 2 Hkv) * D) with Hq = 4, Hkv = 2, D = 24
    q = qkv[..., :96].view(2, 5, 4, 24)
    assert not q.is_contiguous()
    w = rand(24, seed=1)
    close(tg.rms_norm(q, w, 1e-6), reference.rms_norm_reference(q, w, 1e-6))
    r = rand(2, 5, 4, 24, seed=3).transpose(1, 2).contiguous().transpose(1, 2)   # a third row layout
    y, s = tg.rms_norm(q, w, 1e-6, residual=r)
    y_ref, s_ref = reference.rms_norm_reference(q, w, 1e-6, residual=r)
    close(y, y_ref)
    close(s, s_ref)
    xb = rand(3, 64, dtype=torch.bfloat16)
    wf = rand(64, seed=1)
    y = tg.rms_norm(xb, wf, 1e-6)
    assert y.dtype == torch.float32
    close(y, reference.rms_norm_reference(xb, wf, 1e-6), torch.bfloat16)   # x_norm is rounded to bf16 first


def test_rms_norm_matches_transformers():
    """The reference is LlamaRMSNorm op for op (bit-exact in fp32 and bf16)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    for dtype in (torch.float32, torch.bfloat16):
        norm = LlamaRMSNorm(200, eps=1e-5).to(DEVICE, dtype)
        with torch.no_grad():
            norm.weight.copy_(rand(200, seed=4))
            x = rand(3, 7, 200, dtype=dtype)
            assert torch.equal(reference.rms_norm_reference(x, norm.weight, 1e-5), norm(x))


# --------------------------------------------------------------------------------------------------------------- RoPE
def hf_cos_sin(b, t, d, dtype, offset=0):
    """cos/sin exactly as transformers' default rotary embedding returns them: (B, T, D) in the model dtype."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float) / d))
    pos = torch.arange(offset, offset + t, dtype=torch.float)[None].expand(b, t)
    emb = torch.cat([pos[..., None] * inv_freq] * 2, dim=-1)
    return emb.cos().to(DEVICE, dtype), emb.sin().to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b, hq, hkv, t, d, cos_b", [
    (1, 4, 1, 1, 64, 1),      # decode, GQA 4
    (1, 4, 2, 7, 24, 1),      # D/2 = 12: not a power of two
    (2, 3, 3, 5, 16, 2),      # MHA, per-batch cos/sin
    (1, 8, 2, 3, 128, 1),
])
def test_rope(b, hq, hkv, t, d, cos_b, dtype):
    """q and k as transposed views of one qkv GEMM output (what a fused attention hands over)."""
    qkv = rand(b, t, (hq + 2 * hkv) * d, dtype=dtype)
    q = qkv[..., :hq * d].view(b, t, hq, d).transpose(1, 2)
    k = qkv[..., hq * d:(hq + hkv) * d].view(b, t, hkv, d).transpose(1, 2)
    cos, sin = hf_cos_sin(cos_b, t, d, dtype, offset=11)
    qo, ko = tg.rope(q, k, cos, sin)
    qr, kr = reference.rope_reference(q, k, cos, sin)
    close(qo, qr)
    close(ko, kr)


def test_rope_matches_transformers():
    """The reference is transformers' apply_rotary_pos_emb op for op."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    for dtype in (torch.float32, torch.bfloat16):
        q, k = rand(1, 4, 5, 32, dtype=dtype), rand(1, 2, 5, 32, dtype=dtype, seed=1)
        cos, sin = hf_cos_sin(1, 5, 32, dtype)
        for got, want in zip(reference.rope_reference(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
            assert torch.equal(got, want)


# ------------------------------------------------------------------------------------------------------------- SwiGLU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 37), (3, 5, 96), (17, 1500)])
def test_swiglu(shape, dtype):
    gate, up = rand(*shape, dtype=dtype, scale=3.0), rand(*shape, dtype=dtype, seed=1)
    close(tg.swiglu(gate, up), reference.swiglu_reference(gate, up))
    gate_up = torch.cat([gate, up], dim=-1)            # one GEMM's output: gate then up
    out = tg.swiglu_fused(gate_up)
    close(out, reference.swiglu_fused_reference(gate_up))
    assert out.shape == shape and out.is_contiguous()


def test_swiglu_matches_transformers():
    """The reference is the Llama MLP's ``act_fn(gate) * up`` op for op."""
    from transformers.activations import ACT2FN
    for dtype in (torch.float32, torch.bfloat16):
        gate, up = rand(3, 96, dtype=dtype, scale=3.0), rand(3, 96, dtype=dtype, seed=1)
        assert torch.equal(reference.swiglu_reference(gate, up), ACT2FN["silu"](gate) * up)


# -------------------------------------------------------------------------------------------------- dispatch, errors
def test_dispatch_and_launch_counter(monkeypatch):
    monkeypatch.delenv("OUROBOROS_BACKEND", raising=False)
    x, w = rand(3, 64), rand(64, seed=1)
    expected = "triton" if CUDA else "reference"
    assert glue.resolve_glue_backend(x) == expected           # CPU tensors: never the interpreter unless asked
    assert glue.resolve_glue_backend(x, "triton") == "triton"
    monkeypatch.setenv("OUROBOROS_BACKEND", "cuda")           # steers tree attention; glue takes its own choice
    assert glue.resolve_glue_backend(x) == expected
    monkeypatch.setenv("OUROBOROS_BACKEND", "triton")
    assert glue.resolve_glue_backend(x) == "triton"
    xg = x.clone().requires_grad_()                           # no backward in Triton: the reference takes over
    before = glue.launches.total
    ok.rms_norm(xg, w, 1e-6).sum().backward()
    assert glue.launches.total == before and xg.grad is not None
    with pytest.raises(ValueError, match="no backward"):
        ok.rms_norm(xg, w, 1e-6, backend="triton")
    monkeypatch.delenv("OUROBOROS_BACKEND")
    with pytest.raises(ValueError, match="cuda"):
        ok.rms_norm(x, w, 1e-6, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        ok.rms_norm(x, w, 1e-6, backend="fast")

    before = glue.launches.total
    y = ok.rms_norm(x, w, 1e-6, backend="triton")
    q, k = rand(1, 2, 3, 16), rand(1, 1, 3, 16)
    cos, sin = hf_cos_sin(1, 3, 16, torch.float32)
    ok.rope(q, k, cos, sin, backend="triton")
    ok.swiglu_fused(rand(3, 64), backend="triton")
    ok.rms_norm(x, w, 1e-6, backend="reference")              # not a launch
    assert glue.launches.total - before == 3 and glue.launches.active == 0
    close(y, ok.rms_norm(x, w, 1e-6, backend="reference"))


def test_custom_ops_fake_shapes():
    """The torch.compile custom ops give outputs of the right shape and dtype without running (fake tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x, w = torch.empty(2, 5, 96, dtype=torch.bfloat16), torch.empty(96)
        assert torch.ops.ouroboros_kernels.rms_norm(x, w, 1e-6, 0.0, "llama", None).dtype == torch.float32
        y, s = torch.ops.ouroboros_kernels.add_rms_norm(x, x, w, 1e-6, 1.0, "gemma", None)
        assert y.dtype == s.dtype == torch.bfloat16 and y.shape == s.shape == x.shape
        q, k, cos = torch.empty(1, 4, 5, 16), torch.empty(1, 2, 5, 16), torch.empty(1, 5, 16)
        qo, ko = torch.ops.ouroboros_kernels.rope(q, k, cos, cos, None)
        assert qo.shape == q.shape and ko.shape == k.shape
        assert torch.ops.ouroboros_kernels.swiglu(x, x, None).shape == x.shape
    got = torch.ops.ouroboros_kernels.add_rms_norm(rand(3, 64), rand(3, 64, seed=2), rand(64, seed=1), 1e-6, 0.0,
                                                   "llama", "reference")
    for g, want in zip(got, reference.rms_norm_reference(rand(3, 64), rand(64, seed=1), 1e-6, rand(3, 64, seed=2))):
        assert torch.equal(g, want)


def _bad_calls():
    x, w = rand(3, 64), rand(64)
    q, k = rand(1, 4, 5, 16), rand(1, 2, 5, 16)
    cos, sin = hf_cos_sin(1, 5, 16, torch.float32)
    return [
        ("weight", lambda f: f.rms_norm(x, rand(63), 1e-6)),
        ("weight", lambda f: f.rms_norm(x, torch.empty(64, device="meta"), 1e-6)),
        ("x must be fp16/bf16/fp32", lambda f: f.rms_norm(x.double(), w, 1e-6)),
        ("residual", lambda f: f.rms_norm(x, w, 1e-6, residual=rand(3, 65))),
        ("residual", lambda f: f.rms_norm(x, w, 1e-6, residual=x.half())),
        ("eps", lambda f: f.rms_norm(x, w, -1.0)),
        ("offset", lambda f: f.rms_norm(x, w, 1e-6, offset=float("nan"))),
        ("cast", lambda f: f.rms_norm(x, w, 1e-6, cast="t5")),
        ("even", lambda f: f.rope(rand(1, 4, 5, 15), rand(1, 2, 5, 15), cos[..., :15], sin[..., :15])),
        ("cos", lambda f: f.rope(q, k, cos[:, :4], sin[:, :4])),
        ("sin", lambda f: f.rope(q, k, cos, sin[..., :8])),
        ("k must match q", lambda f: f.rope(q, rand(1, 2, 4, 16), cos, sin)),
        ("4-D", lambda f: f.rope(q[0], k[0], cos, sin)),
        ("dtype", lambda f: f.rope(q, k, cos.half(), sin.half())),
        ("device", lambda f: f.rope(q, k.to("meta"), cos, sin)),
        ("gate and up", lambda f: f.swiglu(x, rand(3, 63))),
        ("gate and up", lambda f: f.swiglu(x, x.half())),
        ("gate_up", lambda f: f.swiglu_fused(rand(3, 63))),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_raises(case):
    """Every backend raises ValueError naming the problem (checked before any launch)."""
    match, call = _bad_calls()[case]
    for impl in (tg, ok):
        with pytest.raises(ValueError, match=match):
            call(impl)
