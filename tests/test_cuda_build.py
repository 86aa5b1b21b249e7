"""The CUDA kernels in csrc/: the torch-free CMake build compiles (CPU machines with nvcc: CI), and, where the
extension ``ouroboros_kernels._cuda`` is built and a GPU exists, the op's binding-level behaviour (strided inputs,
forced key splits, torch.compile, CUDA-graph capture). Kernel-vs-reference accuracy over the shape grid lives in
test_tree_attention.py, which runs the "cuda" backend when it is available.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import ouroboros_kernels as ok
from ouroboros_kernels import reference
from ouroboros_kernels.tree import ancestor_mask, pack_mask

ROOT = Path(__file__).resolve().parents[1]
HAVE_TOOLS = shutil.which("cmake") is not None and shutil.which("nvcc") is not None
HAVE_EXT = importlib.util.find_spec("ouroboros_kernels._cuda") is not None
needs_ext = pytest.mark.skipif(not (HAVE_EXT and torch.cuda.is_available()),
                               reason="needs the built extension ouroboros_kernels._cuda and a CUDA device")


@pytest.mark.skipif(not HAVE_TOOLS, reason="cmake and nvcc must be on PATH")
def test_cmake_build_compiles(tmp_path):
    """Configure + build the pure CUDA library and self-test (compile only; one arch keeps it quick)."""
    arch = os.environ.get("OUROBOROS_TEST_CUDA_ARCH", "80")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), *gen, f"-DCMAKE_CUDA_ARCHITECTURES={arch}"],
                   check=True, capture_output=True, text=True, timeout=120)
    done = subprocess.run(["cmake", "--build", str(build), "--parallel", "2"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    exe = build / "ouroboros_selftest"
    assert exe.exists()
    if not torch.cuda.is_available():  # without a GPU the self-test must refuse clearly, with status 2
        run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 2 and "no usable CUDA device" in run.stderr


def _inputs(b, hq, hkv, t, s, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, hq, t, d, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(b, hkv, s, d, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(b, hkv, s, d, device="cuda", dtype=dtype, generator=g)
    return q, k, v


def _tree_mask(t, seed=0):
    g = torch.Generator().manual_seed(seed)
    parents = [int(torch.randint(-1, i, (1,), generator=g)) if i else -1 for i in range(t)]
    return pack_mask(ancestor_mask(parents)).cuda()


def _tol(dtype):
    return dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=4e-3, rtol=4e-3)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 3, 0])
def test_forced_splits_and_strided_query(dtype, splits):
    from ouroboros_kernels import cuda_ops

    b, hq, hkv, t, s, d = 2, 8, 2, 37, 577, 128
    q, k, v = _inputs(b, hq, hkv, t, s, d, dtype)
    q_bthd = q.transpose(1, 2).contiguous().transpose(1, 2)  # the (B, T, H, D) buffer HF hands over, as a view
    prefix = s - t - 3
    mask = _tree_mask(t)
    want = reference.tree_attention(q, k, v, prefix, mask)
    got = cuda_ops.tree_attention(q_bthd, k, v, prefix, mask, num_splits=splits)
    torch.testing.assert_close(got, want, **_tol(dtype))
    assert cuda_ops.tree_attention_num_splits(q, k, prefix, splits) >= 1


@needs_ext
def test_rejects_unsupported_inputs():
    from ouroboros_kernels import cuda_ops

    q, k, v = _inputs(1, 4, 2, 7, 64, 96, torch.float16)
    with pytest.raises(ValueError, match="head dims"):
        cuda_ops.tree_attention(q, k, v, 10, None)
    q, k, v = _inputs(1, 4, 2, 7, 64, 64, torch.float32)
    with pytest.raises(ValueError, match="float16/bfloat16"):
        cuda_ops.tree_attention(q, k, v, 10, None)


@needs_ext
def test_torch_compile_and_cuda_graph():
    from ouroboros_kernels import cuda_ops

    q, k, v = _inputs(1, 8, 2, 16, 300, 64, torch.bfloat16)
    mask = _tree_mask(16)
    want = reference.tree_attention(q, k, v, 200, mask)

    compiled = torch.compile(lambda q, k, v, m: cuda_ops.tree_attention(q, k, v, 200, m), fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, mask), want, **_tol(torch.bfloat16))

    static_q = q.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        cuda_ops.tree_attention(static_q, k, v, 200, mask)  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cuda_ops.tree_attention(static_q, k, v, 200, mask)
    static_q.copy_(q)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, want, **_tol(torch.bfloat16))


def test_backend_status_names_the_cuda_reason():
    status = ok.backend_status()["cuda"]
    if not HAVE_EXT:
        assert "not built" in status
    else:
        assert status in ("available", "extension built but no CUDA device")
