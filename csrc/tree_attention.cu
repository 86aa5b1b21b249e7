// Tree attention: host launchers (pure CUDA runtime, no torch). See include/ouroboros/tree_attention.cuh.
#include <algorithm>
#include <cstdint>

#include "ouroboros/tree_attention.cuh"
#include "ouroboros/tree_attention_kernel.cuh"

namespace ouroboros {
namespace {

using detail::TileConfig;

int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

int block_rows(const TreeAttentionParams& p, int small_bm, int large_bm) {
  const int64_t rows = int64_t(p.num_q_heads / p.num_kv_heads) * p.tree_len;
  return rows <= small_bm ? small_bm : large_bm;
}

// (BM, BN) the launch uses for p.head_dim.
void tile_shape(const TreeAttentionParams& p, int* bm, int* bn) {
  switch (p.head_dim) {
    case 64:
      *bn = TileConfig<64>::BN;
      *bm = block_rows(p, TileConfig<64>::kSmallBM, TileConfig<64>::kLargeBM);
      break;
    case 128:
      *bn = TileConfig<128>::BN;
      *bm = block_rows(p, TileConfig<128>::kSmallBM, TileConfig<128>::kLargeBM);
      break;
    default:
      *bn = TileConfig<256>::BN;
      *bm = block_rows(p, TileConfig<256>::kSmallBM, TileConfig<256>::kLargeBM);
      break;
  }
}

// The host's bound on the keys one CTA may need: prefix_len + T less what the window cuts for a host prefix length;
// for a device one, the buffer S (or window + T).
int64_t live_key_bound(const TreeAttentionParams& p) {
  if (p.prefix_len_ptr != nullptr)
    return p.window > 0 ? std::min<int64_t>(p.cache_len, int64_t(p.window) + p.tree_len) : p.cache_len;
  int64_t n = int64_t(p.prefix_len) + p.tree_len;
  if (p.window > 0) n -= std::max<int64_t>(0, int64_t(p.prefix_len) - p.window + 1);
  return n;
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

template <typename T, int D, int BM, int BN>
cudaError_t launch(const TreeAttentionParams& p, int num_splits, float* ws_o, float* ws_lse, cudaStream_t stream) {
  using L = detail::SmemLayout<D, BM, BN>;
  auto* kernel = detail::tree_attention_kernel<T, D, BM, BN>;
  const size_t smem = L::kBytes;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return err;
  const int rows = (p.num_q_heads / p.num_kv_heads) * p.tree_len;
  const dim3 grid(num_splits, p.batch * p.num_kv_heads, ceil_div(rows, BM));
  kernel<<<grid, detail::kThreads, smem, stream>>>(p, ws_o, ws_lse);
  err = cudaGetLastError();
  if (err != cudaSuccess || num_splits == 1) return err;
  const int64_t out_rows = int64_t(p.batch) * p.num_q_heads * p.tree_len;
  const int combine_blocks = ceil_div(out_rows, detail::kWarps);
  detail::tree_attention_combine_kernel<T, D><<<combine_blocks, detail::kThreads, 0, stream>>>(p, num_splits, ws_o,
                                                                                               ws_lse);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_dim(const TreeAttentionParams& p, int bm, int num_splits, float* ws_o, float* ws_lse,
                       cudaStream_t stream) {
  using C = TileConfig<D>;
  if (bm == C::kSmallBM) return launch<T, D, C::kSmallBM, C::BN>(p, num_splits, ws_o, ws_lse, stream);
  return launch<T, D, C::kLargeBM, C::BN>(p, num_splits, ws_o, ws_lse, stream);
}

template <typename T>
cudaError_t launch_type(const TreeAttentionParams& p, int bm, int num_splits, float* ws_o, float* ws_lse,
                        cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return launch_dim<T, 64>(p, bm, num_splits, ws_o, ws_lse, stream);
    case 128: return launch_dim<T, 128>(p, bm, num_splits, ws_o, ws_lse, stream);
    default: return launch_dim<T, 256>(p, bm, num_splits, ws_o, ws_lse, stream);
  }
}

}  // namespace

void tree_attention_set_contiguous_strides(TreeAttentionParams& p) {
  const int64_t d = p.head_dim;
  p.q_stride_t = d;
  p.q_stride_h = d * p.tree_len;
  p.q_stride_b = p.q_stride_h * p.num_q_heads;
  p.k_stride_s = d;
  p.k_stride_h = d * p.cache_len;
  p.k_stride_b = p.k_stride_h * p.num_kv_heads;
  p.v_stride_s = p.k_stride_s;
  p.v_stride_h = p.k_stride_h;
  p.v_stride_b = p.k_stride_b;
  p.o_stride_t = p.q_stride_t;
  p.o_stride_h = p.q_stride_h;
  p.o_stride_b = p.q_stride_b;
}

const char* tree_attention_check(const TreeAttentionParams& p) {
  if (p.q == nullptr || p.k == nullptr || p.v == nullptr || p.o == nullptr) return "q, k, v and o must be non-null";
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) return "dtype must be fp16 or bf16";
  if (p.head_dim != 64 && p.head_dim != 128 && p.head_dim != 256) return "head_dim must be 64, 128 or 256";
  if (p.batch < 1 || p.num_q_heads < 1 || p.num_kv_heads < 1) return "batch and head counts must be >= 1";
  if (p.num_q_heads % p.num_kv_heads != 0) return "num_q_heads must be a multiple of num_kv_heads";
  if (p.batch * int64_t(p.num_kv_heads) > 65535) return "batch * num_kv_heads must be <= 65535";
  if (p.tree_len < 1) return "tree_len (T) must be >= 1";
  if (p.tree_len > p.cache_len) return "T must be within the cache length S";
  if (p.prefix_len_ptr == nullptr && (p.prefix_len < 0 || int64_t(p.prefix_len) + p.tree_len > p.cache_len))
    return "prefix_len + T must be within the cache length S";
  if (p.prefix_len_ptr != nullptr &&
      (reinterpret_cast<uintptr_t>(p.prefix_len_ptr) & (p.prefix_len_is_int64 ? 7u : 3u)) != 0)
    return "prefix_len_ptr must be aligned to its element size";
  if (p.prefix_len_ptr != nullptr && p.prefix_len_stride < 0) return "prefix_len_stride must be >= 0";
  if (p.window < 0) return "window must be >= 0 (0: no window)";
  if (!aligned16(p.q) || !aligned16(p.k) || !aligned16(p.v) || !aligned16(p.o))
    return "q, k, v and o must be 16-byte aligned";
  const int64_t strides[] = {p.q_stride_b, p.q_stride_h, p.q_stride_t, p.k_stride_b, p.k_stride_h, p.k_stride_s,
                             p.v_stride_b, p.v_stride_h, p.v_stride_s, p.o_stride_b, p.o_stride_h, p.o_stride_t};
  for (int64_t s : strides)
    if (s % 8 != 0) return "strides of q, k, v, o (in elements) must be multiples of 8 with a contiguous last dim";
  if (p.tree_mask != nullptr && (reinterpret_cast<uintptr_t>(p.tree_mask) & 3u) != 0)
    return "tree_mask must be 4-byte aligned";
  if (p.tree_mask != nullptr && p.tree_mask_stride_b < 0) return "tree_mask_stride_b must be >= 0";
  return nullptr;
}

int tree_attention_num_splits(const TreeAttentionParams& p, int num_sms, int requested) {
  int bm = 0, bn = 0;
  tile_shape(p, &bm, &bn);
  const int key_tiles = std::max(1, ceil_div(live_key_bound(p), bn));
  int want = requested;
  if (want <= 0) {
    // Enough CTAs for ~2 waves of the SMs, each split keeping at least 2 key tiles (the combine pass costs a write
    // and a read of an fp32 row per split), at most 64 splits.
    const int64_t rows = int64_t(p.num_q_heads / p.num_kv_heads) * p.tree_len;
    const int64_t base = int64_t(p.batch) * p.num_kv_heads * ceil_div(rows, bm);
    const int64_t target = 2 * int64_t(std::max(num_sms, 1));
    // Round down: more CTAs than ~2 per SM would spill into a partial extra wave.
    want = static_cast<int>(std::min<int64_t>(std::max<int64_t>(target / base, 1), 64));
    want = std::min(want, std::max(1, key_tiles / 2));
  }
  return std::max(1, std::min(want, key_tiles));
}

size_t tree_attention_workspace_bytes(const TreeAttentionParams& p, int num_splits) {
  if (num_splits <= 1) return 0;
  const size_t rows = size_t(p.batch) * p.num_q_heads * p.tree_len * num_splits;
  return rows * (size_t(p.head_dim) + 1) * sizeof(float);
}

cudaError_t tree_attention(const TreeAttentionParams& p, int num_splits, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream) {
  if (tree_attention_check(p) != nullptr) return cudaErrorInvalidValue;
  int bm = 0, bn = 0;
  tile_shape(p, &bm, &bn);
  const int splits = std::max(1, num_splits);
  float* ws_o = nullptr;
  float* ws_lse = nullptr;
  if (splits > 1) {
    if (workspace == nullptr || workspace_bytes < tree_attention_workspace_bytes(p, splits) ||
        (reinterpret_cast<uintptr_t>(workspace) & 15u) != 0)
      return cudaErrorInvalidValue;
    ws_o = static_cast<float*>(workspace);
    ws_lse = ws_o + size_t(p.batch) * p.num_q_heads * p.tree_len * splits * p.head_dim;
  }
  if (p.dtype == DType::kFloat16) return launch_type<half>(p, bm, splits, ws_o, ws_lse, stream);
  return launch_type<__nv_bfloat16>(p, bm, splits, ws_o, ws_lse, stream);
}

}  // namespace ouroboros
