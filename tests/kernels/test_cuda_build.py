"""The CUDA kernels in csrc/: the torch-free CMake build compiles (CPU machines with nvcc: CI), the torch binding
(csrc/bindings.cpp) compiles against the installed torch headers, and, where the extension ``ouroboros_kernels._cuda``
is built and a GPU exists, the op's binding-level behaviour (strided inputs, forced key splits, device prefix lengths,
per-row tree masks (contract v3), torch.compile, one CUDA graph replayed at several prefix lengths). Kernel-vs-reference
accuracy over the shape grid lives in test_tree_attention.py and test_tree_attention_rows.py, which run the "cuda"
backend when it is available.
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

ROOT = Path(__file__).resolve().parents[2]
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


def _binding_compile_command(shim: Path) -> list[str] | None:
    """g++ -fsyntax-only over csrc/bindings.cpp with torch's headers (None when a header set is missing). A CPU-only
    torch wheel ships c10/cuda but not its generated cuda_cmake_macros.h: ``shim`` provides that one file."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which("g++") or shutil.which("c++")
    nvcc = shutil.which("nvcc")
    homes = [os.environ.get("CUDA_HOME"), nvcc and str(Path(nvcc).resolve().parents[1]), "/usr/local/cuda"]
    cuda_home = next((h for h in homes if h and (Path(h) / "include" / "cuda_runtime_api.h").exists()), None)
    torch_inc = [Path(p) for p in include_paths()]
    if cxx is None or cuda_home is None or not any((p / "c10" / "cuda" / "CUDAGuard.h").exists() for p in torch_inc):
        return None
    if not any((p / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists() for p in torch_inc):
        (shim / "c10" / "cuda" / "impl").mkdir(parents=True)
        (shim / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text(
            "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    incs = [shim, ROOT / "csrc" / "include", *torch_inc, Path(sysconfig.get_paths()["include"]),
            Path(cuda_home) / "include"]
    return [cxx, "-std=c++20", "-fsyntax-only", "-w", "-DTORCH_EXTENSION_NAME=_cuda", "-DTORCH_API_INCLUDE_EXTENSION_H",
            *[f"-I{p}" for p in incs], str(ROOT / "csrc" / "bindings.cpp")]


@pytest.mark.skipif(HAVE_EXT, reason="the extension is built here: its build already compiled the binding")
def test_torch_binding_compiles(tmp_path):
    """csrc/bindings.cpp (the op schemas and their argument checks) compiles against this torch's headers, also on a
    CPU-only machine (syntax and types only; the CUDA kernels themselves are compiled by test_cmake_build_compiles)."""
    cmd = _binding_compile_command(tmp_path)
    if cmd is None:
        pytest.skip("needs g++, the CUDA toolkit headers and torch's c10/cuda headers")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


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
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_device_prefix_len_window_and_softcap(dtype):
    """prefix_len as a device tensor (0-d and per batch row), with a window and softcap; NaN past the live part."""
    from ouroboros_kernels import cuda_ops

    b, hq, hkv, t, s, d = 2, 12, 2, 16, 700, 128
    q, k, v = _inputs(b, hq, hkv, t, s, d, torch.bfloat16, seed=3)
    mask = _tree_mask(t, seed=3)
    rows = [600, 250]
    for i, p in enumerate(rows):
        k[i, :, p + t:] = float("nan")
        v[i, :, p + t:] = float("nan")
    per_row = torch.tensor(rows, dtype=dtype, device="cuda")
    got = cuda_ops.tree_attention(q, k, v, per_row, mask, window=64, softcap=30.0)
    for i, p in enumerate(rows):
        want = reference.tree_attention(q[i:i + 1], k[i:i + 1, :, :p + t], v[i:i + 1, :, :p + t], p, mask, window=64,
                                        softcap=30.0)
        torch.testing.assert_close(got[i:i + 1], want, **_tol(torch.bfloat16))
    scalar = torch.tensor(250, dtype=dtype, device="cuda")
    got = cuda_ops.tree_attention(q[1:], k[1:], v[1:], scalar, mask, window=64, softcap=30.0)
    torch.testing.assert_close(got, reference.tree_attention(q[1:], k[1:], v[1:], 250, mask, window=64,
                                                             softcap=30.0), **_tol(torch.bfloat16))
    assert cuda_ops.tree_attention_num_splits(q, k, per_row, 0, window=64) >= 1


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 3])
def test_per_row_tree_masks(dtype, splits):
    """Contract v3 at the binding: a (B, T, W) mask (row b's tree), as a contiguous tensor, as a strided view, and a
    shared mask as (1, T, W) or an expanded stride-0 (B, T, W) (exactly the 2-D answer); device per-row prefix lengths
    with a window and softcap, NaN past each row's live part; a mask of the wrong batch raises naming tree_mask."""
    from ouroboros_kernels import cuda_ops

    b, hq, hkv, t, s, d = 3, 12, 2, 37, 900, 128
    q, k, v = _inputs(b, hq, hkv, t, s, d, dtype, seed=6)
    masks = torch.stack([_tree_mask(t, seed=10 + i) for i in range(b)])        # (B, T, 2): three different trees
    rows = [800, 301, 0]
    for i, p in enumerate(rows):
        k[i, :, p + t:] = float("nan")
        v[i, :, p + t:] = float("nan")
    prefix = torch.tensor(rows, dtype=torch.int32, device="cuda")
    wide = torch.zeros(b, t, 4, dtype=torch.int32, device="cuda")
    wide[:, :, 1:3] = masks
    for mask in (masks, wide[:, :, 1:3]):
        got = cuda_ops.tree_attention(q, k, v, prefix, mask, window=200, softcap=30.0, num_splits=splits)
        for i, p in enumerate(rows):
            want = reference.tree_attention(q[i:i + 1], k[i:i + 1, :, :p + t], v[i:i + 1, :, :p + t], p, masks[i],
                                            window=200, softcap=30.0)
            torch.testing.assert_close(got[i:i + 1], want, **_tol(dtype))
    shared = cuda_ops.tree_attention(q, k, v, prefix, masks[0], window=200, num_splits=splits)
    for mask in (masks[:1], masks[:1].expand(b, -1, -1)):
        assert torch.equal(cuda_ops.tree_attention(q, k, v, prefix, mask, window=200, num_splits=splits), shared)
    with pytest.raises(ValueError, match="tree_mask"):
        cuda_ops.tree_attention(q, k, v, prefix, masks[:2])


@needs_ext
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_one_graph_replays_at_three_prefix_lengths(backend):
    """One CUDA graph captured once (device length 0), replayed after writing three prefix lengths: each replay
    matches the reference at its length (the kernel reads the length; no recapture, no host sync)."""
    b, hq, hkv, t, s, d = 1, 14, 2, 16, 1100, 64
    q, k_clean, v_clean = _inputs(b, hq, hkv, t, s, d, torch.bfloat16, seed=4)
    mask = _tree_mask(t, seed=4)
    k, v = k_clean.clone(), v_clean.clone()
    prefix = torch.zeros((), dtype=torch.int64, device="cuda")

    def step():
        return ok.tree_attention(q, k, v, prefix, mask, window=300, softcap=None, backend=backend)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm up (autotune, workspace) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for length in (50, 517, 1000):
        k.copy_(k_clean)
        v.copy_(v_clean)
        k[:, :, length + t:] = float("nan")
        v[:, :, length + t:] = float("nan")
        prefix.fill_(length)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        want = reference.tree_attention(q, k_clean, v_clean, length, mask, window=300)
        torch.testing.assert_close(out, want, **_tol(torch.bfloat16), msg=lambda m: f"prefix {length}: {m}")


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
