// Torch bindings of the pure CUDA kernels: the ONLY file that includes torch headers.
//
// Registers the custom op `torch.ops.ouroboros.tree_attention` (schema below) with a CUDA implementation; the fake
// (meta) implementation is registered from Python (ouroboros_kernels/cuda_ops.py) so the op works under
// torch.compile and inside CUDA graphs (it allocates only through the caching allocator and never syncs).
// Built as the Python module `ouroboros_kernels._cuda` by setup.py.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <optional>

#include "ouroboros/tree_attention.cuh"

namespace {

bool aligned_for_kernel(const at::Tensor& t) {
  if (t.stride(-1) != 1) return false;
  for (int i = 0; i < t.dim() - 1; ++i)
    if (t.stride(i) % 8 != 0) return false;
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

int num_sms(const at::Tensor& t) {
  int count = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, t.get_device());
  TORCH_CHECK(err == cudaSuccess, "ouroboros: cannot query the SM count: ", cudaGetErrorString(err));
  return count;
}

// The kernel reads 16-byte chunks along D: keep a view when its layout allows that, else copy.
at::Tensor kernel_layout(const at::Tensor& t) { return aligned_for_kernel(t) ? t : t.contiguous(); }

at::Tensor tree_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t prefix_len,
                               const std::optional<at::Tensor>& tree_mask, double scale, double softcap,
                               int64_t num_splits) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "ouroboros tree_attention: q, k, v must be 4-D (B, H, T/S, D); got ", q.dim(), ", ", k.dim(), ", ",
              v.dim(), " dims");
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda(), "ouroboros tree_attention: q, k, v must be CUDA tensors");
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(),
              "ouroboros tree_attention: q, k, v must be on one device");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "ouroboros tree_attention (cuda): dtype must be float16 or bfloat16, got ", q.scalar_type(),
              " (fp32 runs on the triton/reference backends)");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "ouroboros tree_attention: q, k, v must share one dtype");
  const int64_t b = q.size(0), hq = q.size(1), t = q.size(2), d = q.size(3);
  TORCH_CHECK(k.sizes() == v.sizes(), "ouroboros tree_attention: k and v shapes differ: ", k.sizes(), " vs ",
              v.sizes());
  TORCH_CHECK(k.size(0) == b && k.size(3) == d, "ouroboros tree_attention: k/v batch and head dim must match q: q ",
              q.sizes(), ", k ", k.sizes());
  const int64_t hkv = k.size(1), s = k.size(2);
  TORCH_CHECK(hkv > 0 && hq % hkv == 0, "ouroboros tree_attention: query heads (", hq,
              ") must be a multiple of key/value heads (", hkv, ")");
  TORCH_CHECK(d == 64 || d == 128 || d == 256, "ouroboros tree_attention (cuda): head dim must be 64, 128 or 256, got ",
              d);
  TORCH_CHECK(t >= 1, "ouroboros tree_attention: T must be >= 1");
  TORCH_CHECK(b >= 1 && hq >= 1, "ouroboros tree_attention: empty batch or heads");
  TORCH_CHECK(prefix_len >= 0 && prefix_len + t <= s, "ouroboros tree_attention: prefix_len (", prefix_len,
              ") + T (", t, ") must be within the cache length S (", s, ")");
  TORCH_CHECK(s <= INT32_MAX && b * hkv <= 65535, "ouroboros tree_attention: sizes too large for the kernel");

  at::Tensor mask;
  if (tree_mask.has_value()) {
    const at::Tensor& m = *tree_mask;
    TORCH_CHECK(m.scalar_type() == at::kInt && m.dim() == 2 && m.size(0) == t && m.size(1) == (t + 31) / 32,
                "ouroboros tree_attention: tree_mask must be int32 of shape (T, ceil(T/32)) = (", t, ", ",
                (t + 31) / 32, "), got ", m.scalar_type(), " ", m.sizes());
    TORCH_CHECK(m.device() == q.device(), "ouroboros tree_attention: tree_mask is on ", m.device(), " but q is on ",
                q.device());
    mask = m.contiguous();
  }

  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = kernel_layout(q), kc = kernel_layout(k), vc = kernel_layout(v);
  at::Tensor o = at::empty({b, hq, t, d}, q.options());

  ouroboros::TreeAttentionParams p;
  p.q = qc.data_ptr();
  p.k = kc.data_ptr();
  p.v = vc.data_ptr();
  p.o = o.data_ptr();
  p.tree_mask = mask.defined() ? mask.data_ptr<int32_t>() : nullptr;
  p.q_stride_b = qc.stride(0), p.q_stride_h = qc.stride(1), p.q_stride_t = qc.stride(2);
  p.k_stride_b = kc.stride(0), p.k_stride_h = kc.stride(1), p.k_stride_s = kc.stride(2);
  p.v_stride_b = vc.stride(0), p.v_stride_h = vc.stride(1), p.v_stride_s = vc.stride(2);
  p.o_stride_b = o.stride(0), p.o_stride_h = o.stride(1), p.o_stride_t = o.stride(2);
  p.batch = int(b);
  p.num_q_heads = int(hq);
  p.num_kv_heads = int(hkv);
  p.tree_len = int(t);
  p.cache_len = int(s);
  p.head_dim = int(d);
  p.prefix_len = int(prefix_len);
  p.scale = float(scale);
  p.softcap = float(softcap);
  p.dtype = q.scalar_type() == at::kHalf ? ouroboros::DType::kFloat16 : ouroboros::DType::kBFloat16;
  if (const char* why = ouroboros::tree_attention_check(p)) TORCH_CHECK(false, "ouroboros tree_attention: ", why);

  const int splits = ouroboros::tree_attention_num_splits(p, num_sms(q), int(num_splits));
  const size_t ws_bytes = ouroboros::tree_attention_workspace_bytes(p, splits);
  at::Tensor workspace;
  if (ws_bytes > 0) workspace = at::empty({int64_t(ws_bytes)}, q.options().dtype(at::kByte));
  const cudaError_t err = ouroboros::tree_attention(p, splits, ws_bytes ? workspace.data_ptr() : nullptr, ws_bytes,
                                                    c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "ouroboros tree_attention: kernel launch failed: ", cudaGetErrorString(err));
  return o;
}

// Splits the kernel would use (tests and benchmarks use it to force and report the split path).
int64_t tree_attention_num_splits_for(const at::Tensor& q, const at::Tensor& k, int64_t prefix_len,
                                      int64_t num_splits) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && q.is_cuda() && k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "ouroboros tree_attention_num_splits: expects CUDA q (B, Hq, T, D) and k (B, Hkv, S, D)");
  ouroboros::TreeAttentionParams p;
  p.batch = int(q.size(0));
  p.num_q_heads = int(q.size(1));
  p.tree_len = int(q.size(2));
  p.head_dim = int(q.size(3));
  p.num_kv_heads = int(k.size(1));
  p.cache_len = int(k.size(2));
  p.prefix_len = int(prefix_len);
  return ouroboros::tree_attention_num_splits(p, num_sms(q), int(num_splits));
}

}  // namespace

TORCH_LIBRARY(ouroboros, m) {
  m.def(
      "tree_attention(Tensor q, Tensor k, Tensor v, int prefix_len, Tensor? tree_mask, float scale, "
      "float softcap=0.0, int num_splits=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(ouroboros, CUDA, m) { m.impl("tree_attention", &tree_attention_cuda); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ouroboros CUDA kernels; the ops are torch.ops.ouroboros.* (see ouroboros_kernels.cuda_ops)";
  m.def("tree_attention_num_splits", &tree_attention_num_splits_for, "Key splits tree_attention would use",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("prefix_len"), pybind11::arg("num_splits") = 0);
  m.attr("cuda_version") = CUDART_VERSION;
}
