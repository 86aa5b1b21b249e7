// Self-test of the pure CUDA tree-attention kernel against a C++ float reference (no torch).
//
// Random inputs, odd sizes (T = 1, 7, 64, 130, 256; S = 17, 37, 577; GQA 1/4/8; D 64/128/256), causal (null mask),
// random trees, a packed causal mask (must equal the null-mask path), forced key splits, softcap, a strided query
// (the (B, T, H, D) layout Hugging Face hands over), NaN in the cache past prefix_len + T (must be ignored) and a
// NaN-poisoned output. Usage: selftest [--quick] [--verbose] [--bench]
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
#include <vector>

#include "ouroboros/tree_attention.cuh"

using ouroboros::DType;
using ouroboros::TreeAttentionParams;

namespace {

enum class MaskKind { kCausalNull, kCausalPacked, kRandomTree, kStar };

struct Case {
  DType dtype;
  int batch, hq, hkv, t, s, d, prefix;
  MaskKind mask;
  float softcap;
  int splits;          // 0 = auto
  bool strided_q;      // q stored as (B, T, Hq, D)
  float q_amp;         // query amplitude (sharper softmax when larger)
};

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

bool run_case(const Case& c, int num_sms, std::mt19937& rng, bool verbose) {
  const int g = c.hq / c.hkv;
  const size_t q_elems = size_t(c.batch) * c.hq * c.t * c.d;
  const size_t kv_elems = size_t(c.batch) * c.hkv * c.s * c.d;
  std::uniform_real_distribution<float> uni(-1.f, 1.f);

  // Inputs rounded to the dtype; the reference uses the rounded values. q is stored in logical (B, Hq, T, D) order
  // in qf; the device copy is laid out (B, T, Hq, D) when strided_q.
  std::vector<float> qf(q_elems), kf(kv_elems), vf(kv_elems);
  std::vector<uint16_t> qh(q_elems), kh(kv_elems), vh(kv_elems);
  const uint16_t nan_bits = 0xFFFF;
  for (size_t i = 0; i < q_elems; ++i) {
    const float x = c.q_amp * uni(rng);
    const uint16_t u = to_bits(x, c.dtype);
    qf[i] = from_bits(u, c.dtype);
  }
  for (int b = 0; b < c.batch; ++b)
    for (int h = 0; h < c.hq; ++h)
      for (int t = 0; t < c.t; ++t) {
        const size_t logical = ((size_t(b) * c.hq + h) * c.t + t) * c.d;
        const size_t stored = c.strided_q ? ((size_t(b) * c.t + t) * c.hq + h) * c.d : logical;
        for (int e = 0; e < c.d; ++e) qh[stored + e] = to_bits(qf[logical + e], c.dtype);
      }
  const int kv_len = c.prefix + c.t;
  for (size_t i = 0; i < kv_elems; ++i) {
    const int pos = int((i / c.d) % c.s);
    if (pos >= kv_len) {  // stale static-cache slots: must never be read into the result
      kh[i] = vh[i] = nan_bits;
      kf[i] = vf[i] = NAN;
      continue;
    }
    kh[i] = to_bits(uni(rng), c.dtype);
    vh[i] = to_bits(uni(rng), c.dtype);
    kf[i] = from_bits(kh[i], c.dtype);
    vf[i] = from_bits(vh[i], c.dtype);
  }
  const std::vector<uint8_t> vis = tree_visibility(c.mask, c.t, rng);
  const int words = (c.t + 31) / 32;
  std::vector<int32_t> packed(size_t(c.t) * words, 0);
  for (int i = 0; i < c.t; ++i)
    for (int j = 0; j < c.t; ++j)
      if (vis[size_t(i) * c.t + j]) packed[size_t(i) * words + j / 32] |= int32_t(uint32_t(1) << (j % 32));

  // Reference (fp32 scores, double accumulation of the softmax sums).
  const float scale = 1.f / std::sqrt(float(c.d));
  std::vector<float> ref(q_elems);
  std::vector<float> sc(kv_len);
  for (int b = 0; b < c.batch; ++b)
    for (int h = 0; h < c.hq; ++h) {
      const int hk = h / g;
      for (int t = 0; t < c.t; ++t) {
        const float* qr = &qf[((size_t(b) * c.hq + h) * c.t + t) * c.d];
        float mx = -INFINITY;
        for (int s = 0; s < kv_len; ++s) {
          const bool visible = s < c.prefix || vis[size_t(t) * c.t + (s - c.prefix)];
          if (!visible) {
            sc[s] = -INFINITY;
            continue;
          }
          const float* kr = &kf[((size_t(b) * c.hkv + hk) * c.s + s) * c.d];
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
          const float* vr = &vf[((size_t(b) * c.hkv + hk) * c.s + s) * c.d];
          for (int e = 0; e < c.d; ++e) out[e] += w * vr[e];
        }
        float* dst = &ref[((size_t(b) * c.hq + h) * c.t + t) * c.d];
        for (int e = 0; e < c.d; ++e) dst[e] = float(out[e] / denom);
      }
    }

  // Device run.
  void *dq, *dk, *dv, *dout, *dws = nullptr;
  int32_t* dmask = nullptr;
  CUDA_OK(cudaMalloc(&dq, q_elems * 2));
  CUDA_OK(cudaMalloc(&dk, kv_elems * 2));
  CUDA_OK(cudaMalloc(&dv, kv_elems * 2));
  CUDA_OK(cudaMalloc(&dout, q_elems * 2));
  CUDA_OK(cudaMemcpy(dq, qh.data(), q_elems * 2, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(dk, kh.data(), kv_elems * 2, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(dv, vh.data(), kv_elems * 2, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemset(dout, 0xFF, q_elems * 2));  // NaN poison
  if (c.mask != MaskKind::kCausalNull) {
    CUDA_OK(cudaMalloc(&dmask, packed.size() * 4));
    CUDA_OK(cudaMemcpy(dmask, packed.data(), packed.size() * 4, cudaMemcpyHostToDevice));
  }

  TreeAttentionParams p;
  p.q = dq;
  p.k = dk;
  p.v = dv;
  p.o = dout;
  p.tree_mask = dmask;
  p.batch = c.batch;
  p.num_q_heads = c.hq;
  p.num_kv_heads = c.hkv;
  p.tree_len = c.t;
  p.cache_len = c.s;
  p.head_dim = c.d;
  p.prefix_len = c.prefix;
  p.scale = scale;
  p.softcap = c.softcap;
  p.dtype = c.dtype;
  ouroboros::tree_attention_set_contiguous_strides(p);
  if (c.strided_q) {
    p.q_stride_b = int64_t(c.t) * c.hq * c.d;
    p.q_stride_t = int64_t(c.hq) * c.d;
    p.q_stride_h = c.d;
  }
  bool ok = true;
  std::string why;
  if (const char* msg = ouroboros::tree_attention_check(p)) {
    ok = false;
    why = std::string("check failed: ") + msg;
  }
  const int splits = ouroboros::tree_attention_num_splits(p, num_sms, c.splits);
  const size_t ws_bytes = ouroboros::tree_attention_workspace_bytes(p, splits);
  if (ws_bytes > 0) {
    CUDA_OK(cudaMalloc(&dws, ws_bytes));
    CUDA_OK(cudaMemset(dws, 0xFF, ws_bytes));
  }
  if (ok) {
    CUDA_OK(ouroboros::tree_attention(p, splits, dws, ws_bytes, nullptr));
    CUDA_OK(cudaDeviceSynchronize());
  }
  std::vector<uint16_t> outh(q_elems);
  CUDA_OK(cudaMemcpy(outh.data(), dout, q_elems * 2, cudaMemcpyDeviceToHost));

  const float tol = c.dtype == DType::kFloat16 ? 4e-3f : 2.5e-2f;
  double max_err = 0.0;
  size_t bad = 0, first_bad = 0;
  for (size_t i = 0; ok && i < q_elems; ++i) {
    const float got = from_bits(outh[i], c.dtype);
    const double err = std::fabs(double(got) - ref[i]);
    if (!(err <= tol + tol * std::fabs(ref[i]))) {  // also catches NaN
      if (bad++ == 0) first_bad = i;
    }
    if (err > max_err || std::isnan(err)) max_err = std::isnan(err) ? INFINITY : err;
  }
  if (ok && bad) {
    ok = false;
    char buf[160];
    std::snprintf(buf, sizeof(buf), "%zu bad outputs, first at %zu: got %g want %g", bad, first_bad,
                  from_bits(outh[first_bad], c.dtype), ref[first_bad]);
    why = buf;
  }
  if (!ok || verbose) {
    std::printf("%s %s B=%d Hq=%d Hkv=%d T=%d S=%d D=%d prefix=%d mask=%s softcap=%g splits=%d%s: max err %.3g %s\n",
                ok ? "ok  " : "FAIL", c.dtype == DType::kFloat16 ? "fp16" : "bf16", c.batch, c.hq, c.hkv, c.t, c.s,
                c.d, c.prefix, mask_name(c.mask), c.softcap, splits, c.strided_q ? " strided-q" : "", max_err,
                why.c_str());
  }
  cudaFree(dq);
  cudaFree(dk);
  cudaFree(dv);
  cudaFree(dout);
  if (dmask) cudaFree(dmask);
  if (dws) cudaFree(dws);
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
  };
  for (size_t i = 0; i < extra.size(); ++i)
    if (!quick || i % 3 == 0) cases.push_back(extra[i]);
  return cases;
}

// Kernel-only timing (CUDA events) of the SPEC §4 attention shapes: bf16, D=128, H=32 (MHA and GQA 4), L (=prefix)
// 2048/4096, T=1 (causal) and T=64 (random tree). The K/V cache is rotated over enough copies (>= 256 MiB) that
// L2 does not hold it between iterations. GB/s counts the bytes read (K/V up to prefix + T, q, mask) and written (o).
void bench(int num_sms) {
  std::printf("\n%-34s %7s %10s %10s\n", "bench (bf16, D=128, B=1)", "splits", "us", "GB/s");
  struct Shape { int hq, hkv, t, prefix; };
  const Shape shapes[] = {{32, 32, 1, 2048}, {32, 32, 64, 2048}, {32, 8, 64, 2048},
                          {32, 32, 1, 4096}, {32, 32, 64, 4096}, {32, 8, 64, 4096}};
  std::mt19937 rng(7);
  for (const Shape& sh : shapes) {
    const int d = 128, s = sh.prefix + sh.t;
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
    std::snprintf(name, sizeof(name), "Hq=%d Hkv=%d T=%d L=%d", sh.hq, sh.hkv, sh.t, sh.prefix);
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
  std::printf("selftest: %zu cases, %d failed\n", cases.size(), failed);
  if (do_bench && !failed) bench(prop.multiProcessorCount);
  return failed ? 1 : 0;
}
