// Self-test of the pure CUDA tree-attention kernel against a C++ float reference (no torch).
//
// Random inputs, odd sizes (T = 1, 7, 64, 130, 256; S = 17, 37, 577; GQA 1/4/8; D 64/128/256), causal (null mask),
// random trees, a packed causal mask (must equal the null-mask path), forced key splits, softcap, a strided query
// (the (B, T, H, D) layout Hugging Face hands over), NaN in the cache past prefix_len + T (must be ignored) and a
// NaN-poisoned output; contract v2: the prefix length read from device memory (int32 scalar, int64 per batch row),
// sliding windows cutting inside the cache and inside the tree, and one CUDA graph captured once and replayed at three
// prefix lengths written after the capture. Usage: selftest [--quick] [--verbose] [--bench]
//   --quick: a subset (for compute-sanitizer); --bench: after passing, time the SPEC §4 shapes (kernel only).
// Exit status: 0 all passed, 1 a case failed, 2 no usable GPU (the test needs one; CI only compiles it).
#include "cuda_check.cuh"
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "ouroboros/tree_attention.cuh"

using ouroboros::DType;
using ouroboros::TreeAttentionParams;

namespace {

enum class MaskKind { kCausalNull, kCausalPacked, kRandomTree, kStar };
// Where the prefix length comes from: the host value, a device int32 scalar, or a device int64 value per batch row.
enum class PrefixMode { kHost, kDeviceScalar32, kDevicePerRow64 };

struct Case {
  DType dtype;
  int batch, hq, hkv, t, s, d, prefix;
  MaskKind mask;
  float softcap;
  int splits;          // 0 = auto
  bool strided_q;      // q stored as (B, T, Hq, D)
  float q_amp;         // query amplitude (sharper softmax when larger)
  int window = 0;      // sliding window (0: none)
  PrefixMode prefix_mode = PrefixMode::kHost;
};

// Batch row b's prefix length: c.prefix, less 3 per row when the device tensor has one value per row.
std::vector<int> row_prefixes(const Case& c) {
  std::vector<int> rows(c.batch, c.prefix);
  if (c.prefix_mode == PrefixMode::kDevicePerRow64)
    for (int b = 0; b < c.batch; ++b) rows[b] = std::max(0, c.prefix - 3 * b);
  return rows;
}

const char* mask_name(MaskKind m) {
  switch (m) {
    case MaskKind::kCausalNull: return "causal(null)";
    case MaskKind::kCausalPacked: return "causal(packed)";
    case MaskKind::kRandomTree: return "random-tree";
    default: return "star";
  }
}


uint16_t to_bits(float x, DType dt) {
  if (dt == DType::kFloat16) {
    __half h = __float2half_rn(x);
    uint16_t u;
    std::memcpy(&u, &h, 2);
    return u;
  }
  __nv_bfloat16 h = __float2bfloat16_rn(x);
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}

float from_bits(uint16_t u, DType dt) {
  if (dt == DType::kFloat16) {
    __half h;
    std::memcpy(&h, &u, 2);
    return __half2float(h);
  }
  __nv_bfloat16 h;
  std::memcpy(&h, &u, 2);
  return __bfloat162float(h);
}

// Dense visibility of tree tokens (T x T) for a mask kind; parents come before children.
std::vector<uint8_t> tree_visibility(MaskKind kind, int t, std::mt19937& rng) {
  std::vector<uint8_t> vis(size_t(t) * t, 0);
  std::vector<int> parent(t, -1);
  for (int i = 0; i < t; ++i) {
    if (kind == MaskKind::kCausalNull || kind == MaskKind::kCausalPacked) parent[i] = i - 1;
    else if (kind == MaskKind::kStar) parent[i] = -1;
    else parent[i] = int(rng() % uint32_t(i + 1)) - 1;  // -1 .. i-1
    if (parent[i] >= 0) std::memcpy(&vis[size_t(i) * t], &vis[size_t(parent[i]) * t], size_t(t));
    vis[size_t(i) * t + i] = 1;
  }
  return vis;
}

// A case's inputs: values rounded to the dtype (the reference uses the rounded values), q in logical (B, Hq, T, D)
// order in qf and in device layout in qh ((B, T, Hq, D) when strided_q), the tree's dense and packed visibility.
struct Inputs {
  std::vector<float> qf, kf, vf;
  std::vector<uint16_t> qh, kh, vh;
  std::vector<uint8_t> vis;
  std::vector<int32_t> packed;
};

Inputs make_inputs(const Case& c, std::mt19937& rng) {
  const size_t q_elems = size_t(c.batch) * c.hq * c.t * c.d;
  const size_t kv_elems = size_t(c.batch) * c.hkv * c.s * c.d;
  std::uniform_real_distribution<float> uni(-1.f, 1.f);
  Inputs in;
  in.qf.resize(q_elems);
  in.qh.resize(q_elems);
  for (size_t i = 0; i < q_elems; ++i) in.qf[i] = from_bits(to_bits(c.q_amp * uni(rng), c.dtype), c.dtype);
  for (int b = 0; b < c.batch; ++b)
    for (int h = 0; h < c.hq; ++h)
      for (int t = 0; t < c.t; ++t) {
        const size_t logical = ((size_t(b) * c.hq + h) * c.t + t) * c.d;
        const size_t stored = c.strided_q ? ((size_t(b) * c.t + t) * c.hq + h) * c.d : logical;
        for (int e = 0; e < c.d; ++e) in.qh[stored + e] = to_bits(in.qf[logical + e], c.dtype);
      }
  in.kh.resize(kv_elems);
  in.vh.resize(kv_elems);
  in.kf.resize(kv_elems);
  in.vf.resize(kv_elems);
  for (size_t i = 0; i < kv_elems; ++i) {
    in.kh[i] = to_bits(uni(rng), c.dtype);
    in.vh[i] = to_bits(uni(rng), c.dtype);
    in.kf[i] = from_bits(in.kh[i], c.dtype);
    in.vf[i] = from_bits(in.vh[i], c.dtype);
  }
  in.vis = tree_visibility(c.mask, c.t, rng);
  const int words = (c.t + 31) / 32;
  in.packed.assign(size_t(c.t) * words, 0);
  for (int i = 0; i < c.t; ++i)
    for (int j = 0; j < c.t; ++j)
      if (in.vis[size_t(i) * c.t + j]) in.packed[size_t(i) * words + j / 32] |= int32_t(uint32_t(1) << (j % 32));
  return in;
}

// Upload K and V with NaN in every slot at or past each row's prefix + T (stale static-cache slots: never read).
void upload_kv(const Case& c, const Inputs& in, const std::vector<int>& prefixes, void* dk, void* dv) {
  std::vector<uint16_t> kh = in.kh, vh = in.vh;
  for (size_t i = 0; i < kh.size(); ++i) {
    const int pos = int((i / c.d) % c.s);
    const int b = int(i / (size_t(c.hkv) * c.s * c.d));
    if (pos >= prefixes[b] + c.t) kh[i] = vh[i] = 0xFFFF;
  }
  CUDA_OK(cudaMemcpy(dk, kh.data(), kh.size() * 2, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(dv, vh.data(), vh.size() * 2, cudaMemcpyHostToDevice));
}

// The contract in plain loops (fp32 scores, double softmax sums), per batch row's prefix length.
std::vector<float> reference(const Case& c, const Inputs& in, const std::vector<int>& prefixes) {
  const int g = c.hq / c.hkv;
  const float scale = 1.f / std::sqrt(float(c.d));
  std::vector<int> depth(c.t, 0);
  for (int i = 0; i < c.t; ++i)
    for (int j = 0; j < c.t; ++j) depth[i] += in.vis[size_t(i) * c.t + j];
  for (int& d : depth) d -= 1;
  std::vector<float> ref(in.qf.size());
  for (int b = 0; b < c.batch; ++b) {
    const int prefix = prefixes[b], kv_len = prefix + c.t;
    std::vector<float> sc(kv_len);
    for (int h = 0; h < c.hq; ++h) {
      const int hk = h / g;
      for (int t = 0; t < c.t; ++t) {
        const float* qr = &in.qf[((size_t(b) * c.hq + h) * c.t + t) * c.d];
        float mx = -INFINITY;
        for (int s = 0; s < kv_len; ++s) {
          bool visible = s < prefix || in.vis[size_t(t) * c.t + (s - prefix)];
          const int pos = s < prefix ? s : prefix + depth[s - prefix];
          if (c.window > 0) visible = visible && pos > prefix + depth[t] - c.window;
          if (!visible) {
            sc[s] = -INFINITY;
            continue;
          }
          const float* kr = &in.kf[((size_t(b) * c.hkv + hk) * c.s + s) * c.d];
          float acc = 0.f;
          for (int e = 0; e < c.d; ++e) acc += qr[e] * kr[e];
          acc *= scale;
          if (c.softcap > 0.f) acc = c.softcap * std::tanh(acc / c.softcap);
          sc[s] = acc;
          mx = std::fmax(mx, acc);
        }
        double denom = 0.0;
        std::vector<double> out(c.d, 0.0);
        for (int s = 0; s < kv_len; ++s) {
          if (sc[s] == -INFINITY) continue;
          const double w = std::exp(double(sc[s]) - mx);
          denom += w;
          const float* vr = &in.vf[((size_t(b) * c.hkv + hk) * c.s + s) * c.d];
          for (int e = 0; e < c.d; ++e) out[e] += w * vr[e];
        }
        float* dst = &ref[((size_t(b) * c.hq + h) * c.t + t) * c.d];
        for (int e = 0; e < c.d; ++e) dst[e] = float(out[e] / denom);
      }
    }
  }
  return ref;
}

// Compare the device output (read back from dout) with the reference; fills why/max_err; true when within tolerance.
bool compare(const Case& c, const void* dout, const std::vector<float>& ref, std::string* why, double* max_err) {
  std::vector<uint16_t> outh(ref.size());
  CUDA_OK(cudaMemcpy(outh.data(), dout, outh.size() * 2, cudaMemcpyDeviceToHost));
  const float tol = c.dtype == DType::kFloat16 ? 4e-3f : 2.5e-2f;
  size_t bad = 0, first_bad = 0;
  *max_err = 0.0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const float got = from_bits(outh[i], c.dtype);
    const double err = std::fabs(double(got) - ref[i]);
    if (!(err <= tol + tol * std::fabs(ref[i]))) {  // also catches NaN
      if (bad++ == 0) first_bad = i;
    }
    if (err > *max_err || std::isnan(err)) *max_err = std::isnan(err) ? INFINITY : err;
  }
  if (bad) {
    char buf[160];
    std::snprintf(buf, sizeof(buf), "%zu bad outputs, first at %zu: got %g want %g", bad, first_bad,
                  from_bits(outh[first_bad], c.dtype), ref[first_bad]);
    *why = buf;
  }
  return bad == 0;
}

// Device buffers of one case; the prefix tensor is int32 (scalar) or int64 (per row) per the case's mode.
struct Device {
  void *q = nullptr, *k = nullptr, *v = nullptr, *o = nullptr, *ws = nullptr, *prefix = nullptr;
  int32_t* mask = nullptr;
  size_t ws_bytes = 0;
  Device() = default;
  Device(const Device&) = delete;  // owns its buffers: a copy would free them twice
  Device& operator=(const Device&) = delete;
  Device(Device&& other) noexcept
      : q(std::exchange(other.q, nullptr)), k(std::exchange(other.k, nullptr)), v(std::exchange(other.v, nullptr)),
        o(std::exchange(other.o, nullptr)), ws(std::exchange(other.ws, nullptr)),
        prefix(std::exchange(other.prefix, nullptr)), mask(std::exchange(other.mask, nullptr)),
        ws_bytes(other.ws_bytes) {}
  ~Device() {
    for (void* ptr : {q, k, v, o, ws, prefix, static_cast<void*>(mask)})
      if (ptr) cudaFree(ptr);
  }
};

// Params for the case's device buffers (prefix from the host or from d.prefix).
TreeAttentionParams make_params(const Case& c, const Device& d) {
  TreeAttentionParams p;
  p.q = d.q;
  p.k = d.k;
  p.v = d.v;
  p.o = d.o;
  p.tree_mask = d.mask;
  p.batch = c.batch;
  p.num_q_heads = c.hq;
  p.num_kv_heads = c.hkv;
  p.tree_len = c.t;
  p.cache_len = c.s;
  p.head_dim = c.d;
  p.prefix_len = c.prefix;
  if (c.prefix_mode != PrefixMode::kHost) {
    p.prefix_len = -1;  // must not be used
    p.prefix_len_ptr = d.prefix;
    p.prefix_len_is_int64 = c.prefix_mode == PrefixMode::kDevicePerRow64;
    p.prefix_len_stride = p.prefix_len_is_int64 ? 1 : 0;
  }
  p.window = c.window;
  p.scale = 1.f / std::sqrt(float(c.d));
  p.softcap = c.softcap;
  p.dtype = c.dtype;
  ouroboros::tree_attention_set_contiguous_strides(p);
  if (c.strided_q) {
    p.q_stride_b = int64_t(c.t) * c.hq * c.d;
    p.q_stride_t = int64_t(c.hq) * c.d;
    p.q_stride_h = c.d;
  }
  return p;
}

void write_prefixes(const Case& c, const Device& d, const std::vector<int>& prefixes, cudaStream_t stream) {
  if (c.prefix_mode == PrefixMode::kDeviceScalar32) {
    const int32_t v = prefixes[0];
    CUDA_OK(cudaMemcpyAsync(d.prefix, &v, 4, cudaMemcpyHostToDevice, stream));
  } else if (c.prefix_mode == PrefixMode::kDevicePerRow64) {
    std::vector<int64_t> v(prefixes.begin(), prefixes.end());
    CUDA_OK(cudaMemcpyAsync(d.prefix, v.data(), v.size() * 8, cudaMemcpyHostToDevice, stream));
  }
  CUDA_OK(cudaStreamSynchronize(stream));
}

Device alloc_device(const Case& c, const Inputs& in, int num_sms, int* splits, std::string* why) {
  Device d;
  const size_t q_bytes = in.qf.size() * 2, kv_bytes = in.kf.size() * 2;
  CUDA_OK(cudaMalloc(&d.q, q_bytes));
  CUDA_OK(cudaMalloc(&d.k, kv_bytes));
  CUDA_OK(cudaMalloc(&d.v, kv_bytes));
  CUDA_OK(cudaMalloc(&d.o, q_bytes));
  CUDA_OK(cudaMalloc(&d.prefix, size_t(c.batch) * 8));
  CUDA_OK(cudaMemcpy(d.q, in.qh.data(), q_bytes, cudaMemcpyHostToDevice));
  if (c.mask != MaskKind::kCausalNull) {
    CUDA_OK(cudaMalloc(reinterpret_cast<void**>(&d.mask), in.packed.size() * 4));
    CUDA_OK(cudaMemcpy(d.mask, in.packed.data(), in.packed.size() * 4, cudaMemcpyHostToDevice));
  }
  const TreeAttentionParams p = make_params(c, d);
  if (const char* msg = ouroboros::tree_attention_check(p)) *why = std::string("check failed: ") + msg;
  *splits = ouroboros::tree_attention_num_splits(p, num_sms, c.splits);
  d.ws_bytes = ouroboros::tree_attention_workspace_bytes(p, *splits);
  if (d.ws_bytes > 0) {
    CUDA_OK(cudaMalloc(&d.ws, d.ws_bytes));
    CUDA_OK(cudaMemset(d.ws, 0xFF, d.ws_bytes));
  }
  return d;
}

void print_case(const Case& c, bool ok, int splits, double max_err, const std::string& why, const char* extra) {
  static const char* modes[] = {"host", "dev-i32", "dev-i64-rows"};
  std::printf("%s %s B=%d Hq=%d Hkv=%d T=%d S=%d D=%d prefix=%d(%s) mask=%s window=%d softcap=%g splits=%d%s%s: "
              "max err %.3g %s\n",
              ok ? "ok  " : "FAIL", c.dtype == DType::kFloat16 ? "fp16" : "bf16", c.batch, c.hq, c.hkv, c.t, c.s, c.d,
              c.prefix, modes[int(c.prefix_mode)], mask_name(c.mask), c.window, c.softcap, splits,
              c.strided_q ? " strided-q" : "", extra, max_err, why.c_str());
}

bool run_case(const Case& c, int num_sms, std::mt19937& rng, bool verbose) {
  const Inputs in = make_inputs(c, rng);
  const std::vector<int> prefixes = row_prefixes(c);
  int splits = 0;
  std::string why;
  Device d = alloc_device(c, in, num_sms, &splits, &why);
  upload_kv(c, in, prefixes, d.k, d.v);
  write_prefixes(c, d, prefixes, nullptr);
  CUDA_OK(cudaMemset(d.o, 0xFF, in.qf.size() * 2));  // NaN poison
  bool ok = why.empty();
  double max_err = 0.0;
  if (ok) {
    CUDA_OK(ouroboros::tree_attention(make_params(c, d), splits, d.ws, d.ws_bytes, nullptr));
    CUDA_OK(cudaDeviceSynchronize());
    ok = compare(c, d.o, reference(c, in, prefixes), &why, &max_err);
  }
  if (!ok || verbose) print_case(c, ok, splits, max_err, why, "");
  return ok;
}

// One CUDA graph captured once (device prefix length 0 at capture time), then replayed after writing three other
// prefix lengths (and the matching NaN-poisoned caches): each replay must match the reference at its length.
bool run_graph_replay(const Case& c, const std::vector<int>& lengths, int num_sms, std::mt19937& rng, bool verbose) {
  const Inputs in = make_inputs(c, rng);
  int splits = 0;
  std::string why;
  Device d = alloc_device(c, in, num_sms, &splits, &why);
  if (!why.empty()) {
    print_case(c, false, splits, 0.0, why, " graph");
    return false;
  }
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  write_prefixes(c, d, std::vector<int>(c.batch, 0), stream);
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  const cudaError_t launched = ouroboros::tree_attention(make_params(c, d), splits, d.ws, d.ws_bytes, stream);
  CUDA_OK(cudaStreamEndCapture(stream, &graph));
  CUDA_OK(launched);
  CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
  bool ok = true;
  for (int length : lengths) {
    Case at = c;
    at.prefix = length;
    const std::vector<int> prefixes = row_prefixes(at);
    upload_kv(at, in, prefixes, d.k, d.v);
    write_prefixes(at, d, prefixes, stream);
    CUDA_OK(cudaMemset(d.o, 0xFF, in.qf.size() * 2));
    CUDA_OK(cudaGraphLaunch(exec, stream));
    CUDA_OK(cudaStreamSynchronize(stream));
    double max_err = 0.0;
    std::string msg;
    const bool good = compare(at, d.o, reference(at, in, prefixes), &msg, &max_err);
    if (!good || verbose) print_case(at, good, splits, max_err, msg, " graph-replay");
    ok = ok && good;
  }
  CUDA_OK(cudaGraphExecDestroy(exec));
  CUDA_OK(cudaGraphDestroy(graph));
  CUDA_OK(cudaStreamDestroy(stream));
  return ok;
}

std::vector<Case> make_cases(bool quick) {
  std::vector<Case> cases;
  const DType dtypes[] = {DType::kFloat16, DType::kBFloat16};
  const int ts[] = {1, 7, 64, 130};
  const int ss[] = {17, 37, 577};
  const int groups[] = {1, 4, 8};
  const int dims[] = {64, 128};
  int n = 0;
  for (DType dt : dtypes)
    for (int d : dims)
      for (int grp : groups)
        for (int t : ts)
          for (int s : ss) {
            if (t > s) continue;
            const int slack = std::min(5, (s - t) / 2);  // cache slots past prefix + T (NaN-filled)
            const int prefix = s - t - slack;
            for (MaskKind m : {MaskKind::kCausalNull, MaskKind::kRandomTree}) {
              ++n;
              if (quick && n % 9 != 0) continue;
              cases.push_back({dt, 1, 2 * grp, 2, t, s, d, prefix, m, 0.f, 0, false, 4.f});
            }
          }
  // Packed causal mask == null mask path; star tree; forced splits; softcap; batch 2 with 3 KV heads; strided q;
  // head dim 256; T = 256 prefill (prefix 0); a one-token cache.
  std::vector<Case> extra = {
      {DType::kFloat16, 1, 4, 4, 64, 577, 128, 513, MaskKind::kCausalPacked, 0.f, 0, false, 4.f},
      {DType::kBFloat16, 1, 8, 1, 130, 577, 64, 447, MaskKind::kCausalPacked, 0.f, 0, false, 4.f},
      {DType::kFloat16, 1, 8, 2, 37, 577, 128, 540, MaskKind::kStar, 0.f, 0, false, 4.f},
      {DType::kFloat16, 1, 8, 2, 7, 577, 128, 570, MaskKind::kRandomTree, 0.f, 1, false, 4.f},
      {DType::kFloat16, 1, 8, 2, 7, 577, 128, 570, MaskKind::kRandomTree, 0.f, 3, false, 4.f},
      {DType::kBFloat16, 1, 8, 2, 64, 577, 128, 500, MaskKind::kCausalNull, 0.f, 7, false, 4.f},
      {DType::kFloat16, 1, 8, 2, 64, 577, 64, 500, MaskKind::kRandomTree, 5.f, 0, false, 8.f},
      {DType::kBFloat16, 1, 4, 1, 1, 577, 128, 576, MaskKind::kCausalNull, 5.f, 0, false, 8.f},
      {DType::kFloat16, 2, 12, 3, 7, 37, 64, 29, MaskKind::kRandomTree, 0.f, 0, false, 4.f},
      {DType::kBFloat16, 2, 12, 3, 64, 577, 128, 513, MaskKind::kRandomTree, 0.f, 0, true, 4.f},
      {DType::kFloat16, 1, 32, 8, 1, 577, 128, 570, MaskKind::kCausalNull, 0.f, 0, true, 4.f},
      {DType::kFloat16, 1, 4, 2, 7, 577, 256, 560, MaskKind::kRandomTree, 0.f, 0, false, 4.f},
      {DType::kBFloat16, 1, 8, 1, 64, 577, 256, 513, MaskKind::kCausalNull, 0.f, 0, false, 4.f},
      {DType::kFloat16, 1, 2, 2, 1, 577, 256, 576, MaskKind::kCausalNull, 0.f, 0, false, 4.f},
      {DType::kFloat16, 1, 4, 1, 256, 256, 128, 0, MaskKind::kRandomTree, 0.f, 0, false, 4.f},
      {DType::kBFloat16, 1, 2, 2, 256, 300, 64, 0, MaskKind::kCausalNull, 0.f, 0, false, 4.f},
      {DType::kFloat16, 1, 4, 4, 1, 1, 64, 0, MaskKind::kCausalNull, 0.f, 0, false, 4.f},
      // Contract v2: device prefix lengths (int32 scalar, int64 per row), windows cutting inside the cache and the
      // tree (chains deeper than the window), the real pair's shapes (12/2 x 128, 14/2 x 64), a device length much
      // shorter than the buffer (splits left empty), prefill with a window.
      {DType::kBFloat16, 1, 8, 2, 7, 577, 128, 560, MaskKind::kRandomTree, 0.f, 0, false, 4.f, 100,
       PrefixMode::kDeviceScalar32},
      {DType::kFloat16, 2, 12, 2, 64, 577, 128, 500, MaskKind::kCausalPacked, 0.f, 3, false, 4.f, 20,
       PrefixMode::kDevicePerRow64},
      {DType::kBFloat16, 1, 14, 2, 16, 1100, 64, 1000, MaskKind::kCausalNull, 0.f, 0, false, 4.f, 7,
       PrefixMode::kDeviceScalar32},
      {DType::kFloat16, 1, 4, 1, 1, 2048, 128, 2047, MaskKind::kCausalNull, 0.f, 0, false, 4.f, 1,
       PrefixMode::kDevicePerRow64},
      {DType::kBFloat16, 1, 8, 4, 130, 700, 256, 500, MaskKind::kRandomTree, 30.f, 2, false, 8.f, 50,
       PrefixMode::kHost},
      {DType::kFloat16, 2, 12, 2, 1, 4096, 128, 1000, MaskKind::kCausalNull, 0.f, 0, false, 4.f, 0,
       PrefixMode::kDevicePerRow64},
      {DType::kBFloat16, 1, 8, 2, 33, 577, 64, 0, MaskKind::kCausalNull, 0.f, 0, false, 4.f, 9, PrefixMode::kHost},
      {DType::kFloat16, 1, 14, 2, 64, 2100, 64, 2000, MaskKind::kStar, 0.f, 0, true, 4.f, 0,
       PrefixMode::kDeviceScalar32},
  };
  for (size_t i = 0; i < extra.size(); ++i)
    if (!quick || i % 3 == 0) cases.push_back(extra[i]);
  return cases;
}

// Kernel-only timing (CUDA events) of the SPEC §4 attention shapes: bf16, D=128, H=32 (MHA and GQA 4), L (=prefix)
// 2048/4096, T=1 (causal) and T=64 (random tree), and the real pair's shapes (12/2 x 128, 14/2 x 64) at L=1024. The K/V cache is rotated over enough copies (>= 256 MiB) that
// L2 does not hold it between iterations. GB/s counts the bytes read (K/V up to prefix + T, q, mask) and written (o).
void bench(int num_sms) {
  std::printf("\n%-34s %7s %10s %10s\n", "bench (bf16, B=1)", "splits", "us", "GB/s");
  struct Shape { int hq, hkv, t, prefix, d; };
  const Shape shapes[] = {{32, 32, 1, 2048, 128}, {32, 32, 64, 2048, 128}, {32, 8, 64, 2048, 128},
                          {32, 32, 1, 4096, 128}, {32, 32, 64, 4096, 128}, {32, 8, 64, 4096, 128},
                          {12, 2, 1, 1024, 128},  {12, 2, 64, 1024, 128},  {14, 2, 1, 1024, 64},
                          {14, 2, 64, 1024, 64}};
  std::mt19937 rng(7);
  for (const Shape& sh : shapes) {
    const int d = sh.d, s = sh.prefix + sh.t;
    const size_t q_bytes = size_t(sh.hq) * sh.t * d * 2, kv_bytes = size_t(sh.hkv) * s * d * 2;
    const int copies = int(std::max<size_t>(1, (size_t(256) << 20) / (2 * kv_bytes) + 1));
    void *dq, *dout, *dkv, *dws = nullptr;
    int32_t* dmask = nullptr;
    CUDA_OK(cudaMalloc(&dq, q_bytes));
    CUDA_OK(cudaMalloc(&dout, q_bytes));
    CUDA_OK(cudaMalloc(&dkv, 2 * kv_bytes * copies));
    CUDA_OK(cudaMemset(dq, 0x3C, q_bytes));          // bf16 0x3C3C ~ 0.0115
    CUDA_OK(cudaMemset(dkv, 0x3C, 2 * kv_bytes * copies));
    const int words = (sh.t + 31) / 32;
    if (sh.t > 1) {
      const std::vector<uint8_t> vis = tree_visibility(MaskKind::kRandomTree, sh.t, rng);
      std::vector<int32_t> packed(size_t(sh.t) * words, 0);
      for (int i = 0; i < sh.t; ++i)
        for (int j = 0; j < sh.t; ++j)
          if (vis[size_t(i) * sh.t + j]) packed[size_t(i) * words + j / 32] |= int32_t(uint32_t(1) << (j % 32));
      CUDA_OK(cudaMalloc(&dmask, packed.size() * 4));
      CUDA_OK(cudaMemcpy(dmask, packed.data(), packed.size() * 4, cudaMemcpyHostToDevice));
    }
    TreeAttentionParams p;
    p.q = dq;
    p.o = dout;
    p.tree_mask = dmask;
    p.batch = 1;
    p.num_q_heads = sh.hq;
    p.num_kv_heads = sh.hkv;
    p.tree_len = sh.t;
    p.cache_len = s;
    p.head_dim = d;
    p.prefix_len = sh.prefix;
    p.scale = 1.f / std::sqrt(float(d));
    p.dtype = DType::kBFloat16;
    ouroboros::tree_attention_set_contiguous_strides(p);
    const int splits = ouroboros::tree_attention_num_splits(p, num_sms, 0);
    const size_t ws_bytes = ouroboros::tree_attention_workspace_bytes(p, splits);
    if (ws_bytes) CUDA_OK(cudaMalloc(&dws, ws_bytes));
    auto run = [&](int i) {
      char* base = static_cast<char*>(dkv) + size_t(i % copies) * 2 * kv_bytes;
      p.k = base;
      p.v = base + kv_bytes;
      CUDA_OK(ouroboros::tree_attention(p, splits, dws, ws_bytes, nullptr));
    };
    for (int i = 0; i < 10; ++i) run(i);
    cudaEvent_t start, stop;
    CUDA_OK(cudaEventCreate(&start));
    CUDA_OK(cudaEventCreate(&stop));
    const int iters = 200;
    CUDA_OK(cudaEventRecord(start));
    for (int i = 0; i < iters; ++i) run(i);
    CUDA_OK(cudaEventRecord(stop));
    CUDA_OK(cudaEventSynchronize(stop));
    float ms = 0.f;
    CUDA_OK(cudaEventElapsedTime(&ms, start, stop));
    const double us = 1e3 * ms / iters;
    const double bytes = double(kv_bytes) * 2 + 2.0 * q_bytes + (dmask ? 4.0 * sh.t * words : 0.0);
    char name[64];
    std::snprintf(name, sizeof(name), "Hq=%d Hkv=%d D=%d T=%d L=%d", sh.hq, sh.hkv, d, sh.t, sh.prefix);
    std::printf("%-34s %7d %10.2f %10.0f\n", name, splits, us, bytes / (us * 1e3));
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    cudaFree(dq);
    cudaFree(dout);
    cudaFree(dkv);
    if (dmask) cudaFree(dmask);
    if (dws) cudaFree(dws);
  }
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false, verbose = false, do_bench = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) quick = true;
    else if (std::strcmp(argv[i], "--verbose") == 0) verbose = true;
    else if (std::strcmp(argv[i], "--bench") == 0) do_bench = true;
    else {
      std::fprintf(stderr, "usage: %s [--quick] [--verbose] [--bench]\n", argv[0]);
      return 2;
    }
  }
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    std::fprintf(stderr, "selftest: no usable CUDA device (%s); this test needs a GPU (sm_80+), CI only compiles it\n",
                 err != cudaSuccess ? cudaGetErrorString(err) : "device count is 0");
    return 2;
  }
  cudaDeviceProp prop;
  CUDA_OK(cudaGetDeviceProperties(&prop, 0));
  if (prop.major < 8) {
    std::fprintf(stderr, "selftest: %s is sm_%d%d; the kernels need sm_80 or newer\n", prop.name, prop.major,
                 prop.minor);
    return 2;
  }
  std::printf("selftest: %s (sm_%d%d, %d SMs)%s\n", prop.name, prop.major, prop.minor, prop.multiProcessorCount,
              quick ? ", quick subset" : "");
  std::mt19937 rng(1234);
  const std::vector<Case> cases = make_cases(quick);
  int failed = 0;
  for (const Case& c : cases)
    if (!run_case(c, prop.multiProcessorCount, rng, verbose)) ++failed;
  // One graph per case, captured once, replayed at three prefix lengths (the device length is read by the kernel).
  const Case graph_cases[] = {
      {DType::kBFloat16, 1, 12, 2, 16, 1024, 128, 0, MaskKind::kRandomTree, 0.f, 0, false, 4.f, 300,
       PrefixMode::kDeviceScalar32},
      {DType::kFloat16, 2, 14, 2, 1, 1024, 64, 0, MaskKind::kCausalNull, 0.f, 0, false, 4.f, 0,
       PrefixMode::kDevicePerRow64},
  };
  for (const Case& c : graph_cases)
    if (!run_graph_replay(c, {50, 517, 1000}, prop.multiProcessorCount, rng, verbose)) ++failed;
  std::printf("selftest: %zu cases + %zu graph replays, %d failed\n", cases.size(), std::size(graph_cases), failed);
  if (do_bench && !failed) bench(prop.multiProcessorCount);
  return failed ? 1 : 0;
}
