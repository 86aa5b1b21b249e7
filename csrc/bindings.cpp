// Torch bindings of the pure CUDA kernels: the ONLY file that includes torch headers.
//
// Registers the custom ops `torch.ops.ouroboros.tree_attention`, `ngram_lookup` and `ngram_insert` (schemas below)
// with CUDA implementations; the fake (meta) implementations are registered from Python
// (ouroboros_kernels/cuda_ops.py) so the ops work under torch.compile and inside CUDA graphs (they allocate only
// through the caching allocator and never sync). ngram_insert mutates the seven pool tensors in place (Tensor(a!)...),
// ngram_lookup mutates only its optional stats tensor.
// Built as the Python module `ouroboros_kernels._cuda` by setup.py.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <optional>
#include <tuple>

#include "ouroboros/ngram.cuh"
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

// The packed tree mask as the kernel reads it (contract v3): (T, ceil(T/32)) or (1 or B, T, ceil(T/32)) int32 on q's
// device. Returns the tensor whose data the kernel reads (each batch row's (T, W) block contiguous row-major; a view
// when the input already is) and the element stride between batch rows' masks (0: one mask shared by every row: a
// 2-D mask, a (1, T, W) one, or a stride-0 dim 0, which is never materialised B times).
std::tuple<at::Tensor, int64_t> kernel_mask(const at::Tensor& m, const at::Tensor& q, int64_t b, int64_t t) {
  const int64_t w = (t + 31) / 32;
  const bool shape_ok = (m.dim() == 2 && m.size(0) == t && m.size(1) == w) ||
                        (m.dim() == 3 && (m.size(0) == b || m.size(0) == 1) && m.size(1) == t && m.size(2) == w);
  TORCH_CHECK(m.scalar_type() == at::kInt && shape_ok,
              "ouroboros tree_attention: tree_mask must be int32 of shape (T, ceil(T/32)) = (", t, ", ", w,
              ") or (B, T, ceil(T/32)) = (", b, ", ", t, ", ", w, "), got ", m.scalar_type(), " ", m.sizes());
  TORCH_CHECK(m.device() == q.device(), "ouroboros tree_attention: tree_mask is on ", m.device(), " but q is on ",
              q.device());
  if (m.dim() == 2) return {m.contiguous(), 0};
  if (m.size(0) == 1 || m.stride(0) == 0) return {m.select(0, 0).contiguous(), 0};
  if (m.select(0, 0).is_contiguous()) return {m, m.stride(0)};
  const at::Tensor c = m.contiguous();
  return {c, c.stride(0)};
}

// prefix_len_tensor (int32/int64, shape () or (B,), on q's device) when given is read by the kernel (no host sync);
// else the host value prefix_len is used.
at::Tensor tree_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& prefix_len_tensor, int64_t prefix_len,
                               const std::optional<at::Tensor>& tree_mask, double scale, double softcap, int64_t window,
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
  TORCH_CHECK(s <= INT32_MAX && b * hkv <= 65535, "ouroboros tree_attention: sizes too large for the kernel");
  TORCH_CHECK(window >= 0 && window <= INT32_MAX, "ouroboros tree_attention: window must be >= 0 (0: none), got ",
              window);
  at::Tensor prefix_t;
  if (prefix_len_tensor.has_value()) {
    prefix_t = *prefix_len_tensor;
    TORCH_CHECK(prefix_t.scalar_type() == at::kInt || prefix_t.scalar_type() == at::kLong,
                "ouroboros tree_attention: prefix_len must be an int32/int64 tensor, got ", prefix_t.scalar_type());
    TORCH_CHECK(prefix_t.dim() == 0 || (prefix_t.dim() == 1 && prefix_t.size(0) == b),
                "ouroboros tree_attention: prefix_len tensor must have shape () or (B,) = (", b, ",), got ",
                prefix_t.sizes());
    TORCH_CHECK(prefix_t.device() == q.device(), "ouroboros tree_attention: prefix_len is on ", prefix_t.device(),
                " but q is on ", q.device());
    TORCH_CHECK(t <= s, "ouroboros tree_attention: T (", t, ") exceeds the cache length S (", s, ")");
  } else {
    TORCH_CHECK(prefix_len >= 0 && prefix_len + t <= s, "ouroboros tree_attention: prefix_len (", prefix_len,
                ") + T (", t, ") must be within the cache length S (", s, ")");
  }

  at::Tensor mask;
  int64_t mask_stride_b = 0;
  if (tree_mask.has_value()) std::tie(mask, mask_stride_b) = kernel_mask(*tree_mask, q, b, t);

  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = kernel_layout(q), kc = kernel_layout(k), vc = kernel_layout(v);
  at::Tensor o = at::empty({b, hq, t, d}, q.options());

  ouroboros::TreeAttentionParams p;
  p.q = qc.data_ptr();
  p.k = kc.data_ptr();
  p.v = vc.data_ptr();
  p.o = o.data_ptr();
  p.tree_mask = mask.defined() ? mask.data_ptr<int32_t>() : nullptr;
  p.tree_mask_stride_b = mask_stride_b;
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
  p.prefix_len = prefix_t.defined() ? 0 : int(prefix_len);
  if (prefix_t.defined()) {
    p.prefix_len_ptr = prefix_t.data_ptr();
    p.prefix_len_stride = prefix_t.dim() == 1 ? prefix_t.stride(0) : 0;
    p.prefix_len_is_int64 = prefix_t.scalar_type() == at::kLong;
  }
  p.window = int(window);
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

// Splits the kernel would use (tests and benchmarks use it to force and report the split path); device_prefix: the
// prefix length lives in a tensor (the host then bounds the live keys by S, or window + T).
int64_t tree_attention_num_splits_for(const at::Tensor& q, const at::Tensor& k, int64_t prefix_len,
                                      int64_t num_splits, int64_t window, bool device_prefix) {
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
  p.window = int(window);
  static const int32_t kDummy = 0;
  if (device_prefix) p.prefix_len_ptr = &kDummy;  // only its presence matters to the split count
  return ouroboros::tree_attention_num_splits(p, num_sms(q), int(num_splits));
}

// ---- n-gram phrase pool (contract and layout: ouroboros_kernels/ngram.py) -------------------------------------------
// The raw ops validate every argument here, before any pointer is taken or kernel queued, so a bad call raises a
// Python RuntimeError (TORCH_CHECK) and never faults: devices (CUDA, one device for all), dtypes (pool int32, tokens
// any integer type, stats int64), shapes (the layout follows from key_to_slot (V), counts (S) and phrases (S, G, P);
// keys (B), phrases / old (B, P), stats (2)), contiguity (the pool and stats are written in place: they must be
// contiguous; token inputs are copied when they are not), capacities (sizes >= 1 and < 2^31, S <= V, the insert
// kernel's shared-memory tile (G + 2) * P <= 12288, B < 2^31, k * P < 2^31) and negative counts (k < 0).
// The pool's CONTENT (slot ids, counts, links) is trusted: checking it needs a device -> host copy, which these
// graph-capturable ops must not make; only these ops (and the reference/Triton twins) write it.
constexpr int64_t kMaxInt32 = INT32_MAX;

ouroboros::IntType int_type(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kChar: return ouroboros::IntType::kInt8;
    case at::kByte: return ouroboros::IntType::kUInt8;
    case at::kShort: return ouroboros::IntType::kInt16;
    case at::kInt: return ouroboros::IntType::kInt32;
    case at::kLong: return ouroboros::IntType::kInt64;
    default:
      TORCH_CHECK(false, "ouroboros ", op, ": ", name,
                  " must be an integer tensor (int8/uint8/int16/int32/int64), got ", t.scalar_type());
  }
  return ouroboros::IntType::kInt64;  // unreachable
}

// One pool tensor: on `device`, int32, exactly `shape`, contiguous (the kernels index it densely and write it).
void check_pool_tensor(const at::Tensor& t, const char* op, const char* name, at::IntArrayRef shape,
                       const at::Device& device) {
  TORCH_CHECK(t.is_cuda() && t.device() == device, "ouroboros ", op, ": pool.", name, " must be on ", device,
              ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kInt, "ouroboros ", op, ": pool.", name, " must be int32, got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "ouroboros ", op, ": pool.", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "ouroboros ", op, ": pool.", name, " must be contiguous (it is written in place)");
}

// A token input (keys (B) or phrases / old (B, P)) on the pool's device, of an integer dtype; contiguous copy if not.
at::Tensor token_input(const at::Tensor& t, const char* op, const char* name, at::IntArrayRef shape,
                       const at::Device& device) {
  TORCH_CHECK(t.device() == device, "ouroboros ", op, ": ", name, " must be on the pool's device ", device, ", got ",
              t.device());
  int_type(t, op, name);
  TORCH_CHECK(t.sizes() == shape, "ouroboros ", op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  return t.contiguous();
}

// The pool's sizes from key_to_slot (V), counts (S) and phrases (S, G, P), checked against the kernels' limits
// (dims first, so no size is read from a tensor of the wrong rank).
ouroboros::NgramPool pool_sizes(const at::Tensor& key_to_slot, const at::Tensor& counts, const at::Tensor& phrases,
                                const char* op) {
  TORCH_CHECK(key_to_slot.is_cuda(), "ouroboros ", op, ": the pool must be on a CUDA device, got ",
              key_to_slot.device());
  TORCH_CHECK(key_to_slot.dim() == 1 && counts.dim() == 1 && phrases.dim() == 3, "ouroboros ", op,
              ": pool.key_to_slot (V), pool.counts (S) and pool.phrases (S, G, P) have the wrong number of dims: ",
              key_to_slot.sizes(), ", ", counts.sizes(), ", ", phrases.sizes());
  TORCH_CHECK(key_to_slot.size(0) < kMaxInt32 && counts.size(0) < kMaxInt32 && phrases.size(1) < kMaxInt32 &&
                  phrases.size(2) < kMaxInt32,
              "ouroboros ", op, ": pool sizes must be < 2^31 - 1, got V = ", key_to_slot.size(0), ", S = ",
              counts.size(0), ", (G, P) = (", phrases.size(1), ", ", phrases.size(2), ")");
  ouroboros::NgramPool p;
  p.vocab_size = int(key_to_slot.size(0));
  p.num_slots = int(counts.size(0));
  p.guess_set = int(phrases.size(1));
  p.phrase_len = int(phrases.size(2));
  if (const char* why = ouroboros::ngram_pool_check(p)) TORCH_CHECK(false, "ouroboros ", op, ": ", why);
  return p;
}

std::tuple<at::Tensor, at::Tensor> ngram_lookup_cuda(const at::Tensor& key_to_slot, const at::Tensor& counts,
                                                     const at::Tensor& phrases, const at::Tensor& keys, int64_t k,
                                                     const std::optional<at::Tensor>& stats) {
  const char* op = "ngram_lookup";
  ouroboros::NgramPool p = pool_sizes(key_to_slot, counts, phrases, op);
  const at::Device dev = key_to_slot.device();
  const int64_t s = p.num_slots, g = p.guess_set, pl = p.phrase_len;
  check_pool_tensor(key_to_slot, op, "key_to_slot", {int64_t(p.vocab_size)}, dev);
  check_pool_tensor(counts, op, "counts", {s}, dev);
  check_pool_tensor(phrases, op, "phrases", {s, g, pl}, dev);
  TORCH_CHECK(keys.dim() == 1, "ouroboros ngram_lookup: keys must be 1-D (B), got shape ", keys.sizes());
  const int64_t b = keys.size(0);
  TORCH_CHECK(b < kMaxInt32, "ouroboros ngram_lookup: batch must be < 2^31, got ", b);
  const at::Tensor kc = token_input(keys, op, "keys", {b}, dev);
  TORCH_CHECK(k >= 0, "ouroboros ngram_lookup: k must be >= 0, got ", k);
  TORCH_CHECK(k <= kMaxInt32 / pl, "ouroboros ngram_lookup: k * P must be < 2^31, got k = ", k, ", P = ", pl);
  int64_t* stats_ptr = nullptr;
  if (stats.has_value()) {
    const at::Tensor& st = *stats;
    TORCH_CHECK(st.device() == dev && st.scalar_type() == at::kLong && st.dim() == 1 && st.size(0) == 2 &&
                    st.is_contiguous(),
                "ouroboros ngram_lookup: stats must be a contiguous int64 (2,) tensor on ", dev, ", got ",
                st.scalar_type(), " ", st.sizes(), " on ", st.device(), st.is_contiguous() ? "" : " (not contiguous)");
    stats_ptr = st.data_ptr<int64_t>();
  }
  const c10::cuda::CUDAGuard guard(dev);
  at::Tensor out = at::empty({b, k, pl}, keys.options().dtype(at::kLong));
  at::Tensor valid = at::empty({b, k}, keys.options().dtype(at::kBool));
  p.key_to_slot = key_to_slot.data_ptr<int32_t>();
  p.counts = counts.data_ptr<int32_t>();
  p.phrases = phrases.data_ptr<int32_t>();
  const cudaError_t err =
      ouroboros::ngram_lookup(p, kc.data_ptr(), int_type(kc, op, "keys"), b, int(k), out.data_ptr<int64_t>(),
                              valid.data_ptr<bool>(), stats_ptr, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "ouroboros ngram_lookup: kernel launch failed: ", cudaGetErrorString(err));
  return {out, valid};
}

void ngram_insert_cuda(const at::Tensor& key_to_slot, const at::Tensor& slot_key, const at::Tensor& counts,
                       const at::Tensor& phrases, const at::Tensor& lru_prev, const at::Tensor& lru_next,
                       const at::Tensor& num_keys, const at::Tensor& keys, const at::Tensor& new_phrases,
                       const std::optional<at::Tensor>& old) {
  const char* op = "ngram_insert";
  ouroboros::NgramPool p = pool_sizes(key_to_slot, counts, phrases, op);
  const at::Device dev = key_to_slot.device();
  const int64_t s = p.num_slots, g = p.guess_set, pl = p.phrase_len;
  check_pool_tensor(key_to_slot, op, "key_to_slot", {int64_t(p.vocab_size)}, dev);
  check_pool_tensor(slot_key, op, "slot_key", {s}, dev);
  check_pool_tensor(counts, op, "counts", {s}, dev);
  check_pool_tensor(phrases, op, "phrases", {s, g, pl}, dev);
  check_pool_tensor(lru_prev, op, "lru_prev", {s + 1}, dev);
  check_pool_tensor(lru_next, op, "lru_next", {s + 1}, dev);
  check_pool_tensor(num_keys, op, "num_keys", {1}, dev);
  TORCH_CHECK(keys.dim() == 1, "ouroboros ngram_insert: keys must be 1-D (B), got shape ", keys.sizes());
  const int64_t b = keys.size(0);
  TORCH_CHECK(b < kMaxInt32, "ouroboros ngram_insert: batch must be < 2^31, got ", b);
  const at::Tensor kc = token_input(keys, op, "keys", {b}, dev);
  const at::Tensor nc = token_input(new_phrases, op, "phrases", {b, pl}, dev);
  at::Tensor oc;
  if (old.has_value()) oc = token_input(*old, op, "old", {b, pl}, dev);
  if (b == 0) return;
  const c10::cuda::CUDAGuard guard(dev);
  const size_t ws_bytes = ouroboros::ngram_insert_workspace_bytes(b);
  at::Tensor workspace = at::empty({int64_t(ws_bytes)}, keys.options().dtype(at::kByte));
  p.key_to_slot = key_to_slot.data_ptr<int32_t>();
  p.slot_key = slot_key.data_ptr<int32_t>();
  p.counts = counts.data_ptr<int32_t>();
  p.phrases = phrases.data_ptr<int32_t>();
  p.lru_prev = lru_prev.data_ptr<int32_t>();
  p.lru_next = lru_next.data_ptr<int32_t>();
  p.num_keys = num_keys.data_ptr<int32_t>();
  const cudaError_t err = ouroboros::ngram_insert(
      p, kc.data_ptr(), int_type(kc, op, "keys"), nc.data_ptr(), int_type(nc, op, "phrases"),
      oc.defined() ? oc.data_ptr() : nullptr, oc.defined() ? int_type(oc, op, "old") : ouroboros::IntType::kInt64, b,
      workspace.data_ptr(), ws_bytes, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "ouroboros ngram_insert: kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY(ouroboros, m) {
  m.def(
      "tree_attention(Tensor q, Tensor k, Tensor v, Tensor? prefix_len_tensor, int prefix_len, Tensor? tree_mask, "
      "float scale, float softcap=0.0, int window=0, int num_splits=0) -> Tensor");
  m.def(
      "ngram_lookup(Tensor key_to_slot, Tensor counts, Tensor phrases, Tensor keys, int k, Tensor(a!)? stats=None) "
      "-> (Tensor, Tensor)");
  m.def(
      "ngram_insert(Tensor(a!) key_to_slot, Tensor(b!) slot_key, Tensor(c!) counts, Tensor(d!) phrases, "
      "Tensor(e!) lru_prev, Tensor(f!) lru_next, Tensor(g!) num_keys, Tensor keys, Tensor new_phrases, "
      "Tensor? old=None) -> ()");
}

TORCH_LIBRARY_IMPL(ouroboros, CUDA, m) {
  m.impl("tree_attention", &tree_attention_cuda);
  m.impl("ngram_lookup", &ngram_lookup_cuda);
  m.impl("ngram_insert", &ngram_insert_cuda);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ouroboros CUDA kernels; the ops are torch.ops.ouroboros.* (see ouroboros_kernels.cuda_ops)";
  m.def("tree_attention_num_splits", &tree_attention_num_splits_for, "Key splits tree_attention would use",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("prefix_len"), pybind11::arg("num_splits") = 0,
        pybind11::arg("window") = 0, pybind11::arg("device_prefix") = false);
  m.attr("cuda_version") = CUDART_VERSION;
}
