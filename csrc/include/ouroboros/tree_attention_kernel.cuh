// Tree attention: device code (include from .cu files only). See tree_attention.cuh for the contract.
//
// One CTA = 4 warps = one (batch, kv head), one tile of BM query rows (all Hq/Hkv heads of the group, token-major),
// one chunk of the live key range. The prefix length is read on the device (host value or device tensor, per batch
// row); the live range runs from the lowest window start of the CTA's rows (0 without a window) to the end of the
// tree (to the CTA's last token for the causal chain), in whole BN tiles, cut into gridDim.x chunks. Keys outside it
// are never loaded. Per key tile of BN keys:
//   1. K and V tiles arrive by cp.async (rows past the chunk zero-filled, so no NaN garbage reaches P V); the next
//      tile's K is prefetched during softmax and P V, its V during the next Q K^T;
//   2. S = Q K^T on tensor cores (WMMA 16x16x16, fp32 accumulate) into shared memory;
//   3. online softmax in base 2 (fp32), threads-per-row groups reduce with shuffles; the mask is only evaluated on
//      tiles that reach the tree part of the cache, the end of the chunk, or below some row's window start (tree
//      keys' positions come from the popcount of their mask rows): the other cache tiles are unmasked;
//   4. O += P V on tensor cores. Each warp keeps its O fragments in registers for the whole key loop; when a row's
//      running max grows (alpha != 1; rare after the first tiles) the fragments take one trip through shared memory
//      to be rescaled per row, since WMMA accumulator layouts are opaque.
// The epilogue writes o = O / l directly (one split) or fp32 partials + log2-sum-exp for the combine kernel.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <climits>
#include <cstdint>

#include "ouroboros/tree_attention.cuh"

namespace ouroboros {
namespace detail {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;

template <typename T>
struct Cvt;
template <>
struct Cvt<half> {
  static __device__ __forceinline__ half from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ uint32_t bits(float x) { return __half_as_ushort(__float2half_rn(x)); }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ uint32_t bits(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
};

// Two floats -> two 16-bit values in one word (element 0 in the low half, as in memory).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  return Cvt<T>::bits(lo) | (Cvt<T>::bits(hi) << 16);
}

// ex2.approx(-inf) = +0, which the online softmax relies on.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// The prefix length of batch row b: the host value, or the device value clamped into [0, S - T] (so no value can
// send a load out of bounds).
__device__ __forceinline__ int prefix_of(const TreeAttentionParams& p, int b) {
  if (p.prefix_len_ptr == nullptr) return p.prefix_len;
  const int64_t i = int64_t(b) * p.prefix_len_stride;
  const int64_t v = p.prefix_len_is_int64 ? static_cast<const int64_t*>(p.prefix_len_ptr)[i]
                                          : int64_t(static_cast<const int32_t*>(p.prefix_len_ptr)[i]);
  const int64_t hi = int64_t(p.cache_len) - p.tree_len;
  return static_cast<int>(v < 0 ? 0 : (v > hi ? hi : v));
}

// Depth of a tree token: popcount of its packed mask row, minus 1 (the token itself).
__device__ __forceinline__ int mask_row_depth(const uint32_t* row, int words) {
  int n = 0;
  for (int w = 0; w < words; ++w) n += __popc(__ldg(row + w));
  return n - 1;
}

// 16-byte global -> shared copy; when `valid` is false nothing is read and the destination is zero-filled.
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
// Wait until at most N of the most recent commit groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Tile shapes per head dim: BN keys per tile; BM query rows per CTA (kSmallBM for decode-like launches).
template <int D>
struct TileConfig {
  static constexpr int BN = D == 256 ? 32 : 64;
  static constexpr int kLargeBM = D == 256 ? 32 : 64;
  static constexpr int kSmallBM = 16;
};

// Shared memory carve-up (bytes). Leading dims are padded so rows start on distinct banks; every sub-buffer and
// every 16-row fragment start is 32-byte aligned, as WMMA load/store require.
template <int D, int BM, int BN>
struct SmemLayout {
  static constexpr int kLdQK = D + 8;  // 16-bit elements, Q / K / V rows
  static constexpr int kLdS = BN + 4;  // floats, scores
  static constexpr int kLdP = BN + 8;  // 16-bit elements, probabilities
  static constexpr int kLdO = D + 4;   // floats, output accumulator
  static constexpr size_t kQ = 0;
  static constexpr size_t kK = kQ + size_t(BM) * kLdQK * 2;
  static constexpr size_t kV = kK + size_t(BN) * kLdQK * 2;
  static constexpr size_t kS = kV + size_t(BN) * kLdQK * 2;
  static constexpr size_t kP = kS + size_t(BM) * kLdS * 4;
  static constexpr size_t kO = kP + size_t(BM) * kLdP * 2;
  static constexpr size_t kRow = kO + size_t(BM) * kLdO * 4;
  static constexpr size_t kBytes = kRow + size_t(BM) * 2 * 4;
  static_assert(kK % 32 == 0 && kV % 32 == 0 && kS % 32 == 0 && kP % 32 == 0 && kO % 32 == 0 && kRow % 32 == 0,
                "WMMA needs 32-byte aligned tiles");
};

// Grid: (num_splits, B * Hkv, ceil(G * T / BM)); each split takes an equal share of whole BN tiles of the live range.
template <typename T, int D, int BM, int BN>
__global__ void __launch_bounds__(kThreads)
    tree_attention_kernel(const TreeAttentionParams p, float* __restrict__ ws_o, float* __restrict__ ws_lse) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 WMMA and cp.async need sm_80+; the host code never launches this
#else
  namespace wmma = nvcuda::wmma;
  using L = SmemLayout<D, BM, BN>;
  constexpr int kChunksPerRow = D / 8;     // 16-byte chunks per row
  constexpr int kTpr = kThreads / BM;      // softmax threads per query row
  constexpr int kCpt = BN / kTpr;          // score columns per softmax thread
  static_assert(kThreads % BM == 0 && BN % kTpr == 0 && kTpr <= 32, "bad tile shape");
  static_assert(BM % 16 == 0 && BN % 16 == 0 && D % 16 == 0, "WMMA tiles are 16x16x16");

  extern __shared__ __align__(128) unsigned char smem[];
  T* q_s = reinterpret_cast<T*>(smem + L::kQ);
  T* k_s = reinterpret_cast<T*>(smem + L::kK);
  T* v_s = reinterpret_cast<T*>(smem + L::kV);
  float* s_s = reinterpret_cast<float*>(smem + L::kS);
  T* p_s = reinterpret_cast<T*>(smem + L::kP);
  float* o_s = reinterpret_cast<float*>(smem + L::kO);
  float* row_m = reinterpret_cast<float*>(smem + L::kRow);  // also holds the per-row rescale factor in the loop
  float* row_l = row_m + BM;

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int split = blockIdx.x;
  const int num_splits = gridDim.x;
  const int b = blockIdx.y / p.num_kv_heads;
  const int hkv = blockIdx.y % p.num_kv_heads;
  const int group = p.num_q_heads / p.num_kv_heads;
  const int rows = group * p.tree_len;
  const int row0 = blockIdx.z * BM;
  const bool causal = p.tree_mask == nullptr;
  const bool windowed = p.window > 0;
  const int prefix_len = prefix_of(p, b);

  // Softmax ownership: kTpr consecutive threads (same warp) own one row; columns are interleaved between them.
  const int my_row = tid / kTpr;
  const int my_part = tid % kTpr;
  const int my_t = min((row0 + my_row) / group, p.tree_len - 1);
  const int mask_words = (p.tree_len + 31) / 32;
  // This batch row's tree (stride 0: one tree for every row); never offset a null pointer.
  const uint32_t* mask_base =
      causal ? nullptr : reinterpret_cast<const uint32_t*>(p.tree_mask) + int64_t(b) * p.tree_mask_stride_b;
  const uint32_t* mask_row = causal ? nullptr : mask_base + int64_t(my_t) * mask_words;
  // Position of this thread's row: prefix_len + my_depth (needed only with a window).
  const int my_depth = causal ? my_t : (windowed ? mask_row_depth(mask_row, mask_words) : 0);

  // The CTA's depth range: its first and last token (causal chain), or the min/max over its rows' mask popcounts.
  const int t_hi = (min(row0 + BM, rows) - 1) / group;
  int d_lo = row0 / group, d_hi = t_hi;
  if (!causal && windowed) {
    __shared__ int s_depth[2];
    if (tid == 0) s_depth[0] = INT_MAX, s_depth[1] = 0;
    __syncthreads();
    if (my_part == 0 && row0 + my_row < rows) {
      atomicMin(&s_depth[0], my_depth);
      atomicMax(&s_depth[1], my_depth);
    }
    __syncthreads();
    d_lo = s_depth[0];
    d_hi = s_depth[1];
  }
  // Live keys of this CTA: [key_lo, key_hi). Keys below win_end may lie below some row's window start.
  const int key_hi = causal ? prefix_len + t_hi + 1 : prefix_len + p.tree_len;
  const int key_lo = windowed ? max(0, prefix_len + d_lo - p.window + 1) : 0;
  const int win_end = windowed ? max(0, prefix_len + d_hi - p.window + 1) : 0;
  // This split's equal share of the live range's whole tiles (empty when the range has fewer tiles than splits).
  const int lo_tile = key_lo / BN * BN;
  const int tiles = (key_hi - lo_tile + BN - 1) / BN;
  const int per_split = (tiles + num_splits - 1) / num_splits;
  const int key_begin = lo_tile + split * per_split * BN;
  const int key_stop = min(key_begin + per_split * BN, key_hi);

  // Q tile: rows past the end are zero-filled (their results are never stored).
  const T* q_base = static_cast<const T*>(p.q) + int64_t(b) * p.q_stride_b;
  for (int c = tid; c < BM * kChunksPerRow; c += kThreads) {
    const int i = c / kChunksPerRow, cc = c % kChunksPerRow;
    const int r = row0 + i;
    const bool valid = r < rows;
    const int t = valid ? r / group : 0, g = valid ? r % group : 0;
    const T* src = q_base + int64_t(hkv * group + g) * p.q_stride_h + int64_t(t) * p.q_stride_t + cc * 8;
    cp_async16(q_s + i * L::kLdQK + cc * 8, src, valid);
  }
  cp_async_commit();

  // O accumulator: warp w owns output fragments w, w + kWarps, ... (16x16 each) for the whole key loop.
  constexpr int kFragD = D / 16;
  constexpr int kOwn = (BM / 16) * kFragD / kWarps;
  static_assert((BM / 16) * kFragD % kWarps == 0, "O fragments must split evenly between warps");
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> o_frag[kOwn];
#pragma unroll
  for (int i = 0; i < kOwn; ++i) wmma::fill_fragment(o_frag[i], 0.f);

  const bool use_softcap = p.softcap > 0.f;
  const float score_mul = use_softcap ? p.scale / p.softcap : p.scale * kLog2e;
  const float cap_mul = p.softcap * kLog2e;
  float m_run = -INFINITY;  // running max, log2 units
  float l_run = 0.f;        // running sum of exp2(x - m_run)

  const T* k_base = static_cast<const T*>(p.k) + int64_t(b) * p.k_stride_b + int64_t(hkv) * p.k_stride_h;
  const T* v_base = static_cast<const T*>(p.v) + int64_t(b) * p.v_stride_b + int64_t(hkv) * p.v_stride_h;

  // One commit group per K or V tile; the next tile's K streams in during softmax and P V, its V during the next
  // Q K^T (no extra shared memory). A tile past the chunk commits an empty group so the group count stays regular.
  auto load_tile = [&](T* dst, const T* base, int64_t stride, int n0) {
    if (n0 < key_stop) {
      for (int c = tid; c < BN * kChunksPerRow; c += kThreads) {
        const int j = c / kChunksPerRow, cc = c % kChunksPerRow;
        const int s = n0 + j;
        const bool valid = s < key_stop && s >= key_lo;  // others zero-filled: no NaN garbage reaches P V
        const int64_t sv = valid ? s : 0;
        cp_async16(dst + j * L::kLdQK + cc * 8, base + sv * stride + cc * 8, valid);
      }
    }
    cp_async_commit();
  };
  load_tile(k_s, k_base, p.k_stride_s, key_begin);
  load_tile(v_s, v_base, p.v_stride_s, key_begin);

  for (int n0 = key_begin; n0 < key_stop; n0 += BN) {
    // 1. Wait for Q (first tile) and this tile's K; its V may still be in flight.
    cp_async_wait<1>();
    __syncthreads();

    // 2. S = Q K^T.
    constexpr int kFragM = BM / 16, kFragN = BN / 16;
    for (int f = warp; f < kFragM * kFragN; f += kWarps) {
      const int fi = f / kFragN, fj = f % kFragN;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int kk = 0; kk < D; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bt;
        wmma::load_matrix_sync(a, q_s + fi * 16 * L::kLdQK + kk, L::kLdQK);
        wmma::load_matrix_sync(bt, k_s + fj * 16 * L::kLdQK + kk, L::kLdQK);
        wmma::mma_sync(acc, a, bt, acc);
      }
      wmma::store_matrix_sync(s_s + fi * 16 * L::kLdS + fj * 16, acc, L::kLdS, wmma::mem_row_major);
    }
    __syncthreads();
    load_tile(k_s, k_base, p.k_stride_s, n0 + BN);  // K tile no longer read: prefetch the next one

    // 3. Online softmax of this thread's columns; mask only where the tile reaches tree tokens, the chunk end or
    // below some row's window start.
    const bool need_mask = n0 + BN > prefix_len || n0 + BN > key_stop || n0 < win_end;
    // Pass 1 writes the scaled, capped, masked logits back in place (own columns only) and takes the max; pass 2
    // exponentiates them (keeping them in shared memory rather than registers leaves room for the O fragments).
    float* s_row = s_s + my_row * L::kLdS;
    float tile_max = -INFINITY;
#pragma unroll
    for (int c = 0; c < kCpt; ++c) {
      const int col = c * kTpr + my_part;
      float val = s_row[col] * score_mul;
      if (use_softcap) val = cap_mul * tanhf(val);
      if (need_mask) {
        const int s = n0 + col;
        bool visible = s < key_stop && s >= key_lo;
        int pos = s;  // key position: cache entry s sits at s, tree token j at prefix_len + depth_j
        if (visible && s >= prefix_len) {
          const int j = s - prefix_len;
          visible = causal ? j <= my_t : ((__ldg(mask_row + (j >> 5)) >> (j & 31)) & 1u) != 0u;
          if (visible && windowed)
            pos = prefix_len + (causal ? j : mask_row_depth(mask_base + int64_t(j) * mask_words, mask_words));
        }
        if (visible && windowed) visible = pos > prefix_len + my_depth - p.window;
        if (!visible) val = -INFINITY;
      }
      s_row[col] = val;
      tile_max = fmaxf(tile_max, val);
    }
#pragma unroll
    for (int off = kTpr / 2; off > 0; off >>= 1) tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, off));
    const float m_new = fmaxf(m_run, tile_max);
    const float m_use = m_new == -INFINITY ? 0.f : m_new;  // keeps exp2 arguments finite-or--inf (never NaN)
    const float alpha = fast_exp2(m_run - m_use);
    float tile_sum = 0.f;
#pragma unroll
    for (int c = 0; c < kCpt; ++c) {
      const float pr = fast_exp2(s_row[c * kTpr + my_part] - m_use);
      tile_sum += pr;
      p_s[my_row * L::kLdP + c * kTpr + my_part] = Cvt<T>::from_float(pr);
    }
#pragma unroll
    for (int off = kTpr / 2; off > 0; off >>= 1) tile_sum += __shfl_xor_sync(0xffffffffu, tile_sum, off);
    l_run = l_run * alpha + tile_sum;
    // A row whose max was -inf has O == 0 (every earlier p was 0): no rescale needed, whatever alpha says.
    const bool rescale = m_run != -INFINITY && alpha != 1.f;
    m_run = m_new;
    if (my_part == 0) row_m[my_row] = alpha;
    cp_async_wait<1>();  // this tile's V has landed (the next K may still be in flight)
    if (__syncthreads_or(rescale)) {  // barrier: P, alpha and V are visible to every warp
#pragma unroll
      for (int i = 0; i < kOwn; ++i) {
        const int f = warp + i * kWarps, fi = f / kFragD, fj = f % kFragD;
        wmma::store_matrix_sync(o_s + fi * 16 * L::kLdO + fj * 16, o_frag[i], L::kLdO, wmma::mem_row_major);
      }
      __syncthreads();
      for (int e = tid; e < BM * D; e += kThreads) o_s[(e / D) * L::kLdO + e % D] *= row_m[e / D];
      __syncthreads();
#pragma unroll
      for (int i = 0; i < kOwn; ++i) {
        const int f = warp + i * kWarps, fi = f / kFragD, fj = f % kFragD;
        wmma::load_matrix_sync(o_frag[i], o_s + fi * 16 * L::kLdO + fj * 16, L::kLdO, wmma::mem_row_major);
      }
    }

    // 4. O += P V.
#pragma unroll
    for (int i = 0; i < kOwn; ++i) {
      const int f = warp + i * kWarps, fi = f / kFragD, fj = f % kFragD;
#pragma unroll
      for (int kk = 0; kk < BN; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bv;
        wmma::load_matrix_sync(a, p_s + fi * 16 * L::kLdP + kk, L::kLdP);
        wmma::load_matrix_sync(bv, v_s + kk * L::kLdQK + fj * 16, L::kLdQK);
        wmma::mma_sync(o_frag[i], a, bv, o_frag[i]);
      }
    }
    __syncthreads();
    load_tile(v_s, v_base, p.v_stride_s, n0 + BN);
  }
  cp_async_wait_all();  // copies may still be pending when this CTA had no keys

  // O fragments -> shared memory for the epilogue.
#pragma unroll
  for (int i = 0; i < kOwn; ++i) {
    const int f = warp + i * kWarps, fi = f / kFragD, fj = f % kFragD;
    wmma::store_matrix_sync(o_s + fi * 16 * L::kLdO + fj * 16, o_frag[i], L::kLdO, wmma::mem_row_major);
  }
  if (my_part == 0) {
    row_m[my_row] = m_run;
    row_l[my_row] = l_run;
  }
  __syncthreads();

  // Epilogue: 8 outputs (one 16-byte store) per step.
  for (int c = tid; c < BM * kChunksPerRow; c += kThreads) {
    const int i = c / kChunksPerRow, cc = c % kChunksPerRow;
    const int r = row0 + i;
    if (r >= rows) continue;
    const int t = r / group, h = hkv * group + r % group;
    const float l = row_l[i];
    const float* src = o_s + i * L::kLdO + cc * 8;
    if (num_splits == 1) {
      // l == 0 only when a row sees nothing at all: 0/0 = NaN, like softmax over all -inf in the reference.
      const float inv = 1.f / l;
      const uint4 pack = make_uint4(pack2<T>(src[0] * inv, src[1] * inv), pack2<T>(src[2] * inv, src[3] * inv),
                                    pack2<T>(src[4] * inv, src[5] * inv), pack2<T>(src[6] * inv, src[7] * inv));
      T* dst = static_cast<T*>(p.o) + int64_t(b) * p.o_stride_b + int64_t(h) * p.o_stride_h +
               int64_t(t) * p.o_stride_t + cc * 8;
      *reinterpret_cast<uint4*>(dst) = pack;
    } else {
      const int64_t out_row = (int64_t(b) * p.num_q_heads + h) * p.tree_len + t;
      const int64_t ws_row = int64_t(split) * p.batch * p.num_q_heads * p.tree_len + out_row;
      const float inv = l > 0.f ? 1.f / l : 0.f;
      float4* dst = reinterpret_cast<float4*>(ws_o + ws_row * D + cc * 8);
      dst[0] = make_float4(src[0] * inv, src[1] * inv, src[2] * inv, src[3] * inv);
      dst[1] = make_float4(src[4] * inv, src[5] * inv, src[6] * inv, src[7] * inv);
      if (cc == 0) ws_lse[ws_row] = l > 0.f ? row_m[i] + __log2f(l) : -INFINITY;
    }
  }
#endif
}

// Merge the per-split partials: one warp per output row (b, h, t).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    tree_attention_combine_kernel(const TreeAttentionParams p, const int num_splits, const float* __restrict__ ws_o,
                                  const float* __restrict__ ws_lse) {
  constexpr int kPerLane = D / 32;
  const int lane = threadIdx.x % 32;
  const int64_t total_rows = int64_t(p.batch) * p.num_q_heads * p.tree_len;
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= total_rows) return;

  float mx = -INFINITY;
  for (int s = lane; s < num_splits; s += 32) mx = fmaxf(mx, ws_lse[s * total_rows + row]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  const float m_use = mx == -INFINITY ? 0.f : mx;

  float acc[kPerLane];
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) acc[e] = 0.f;
  float wsum = 0.f;
  for (int s = 0; s < num_splits; ++s) {
    const float w = fast_exp2(ws_lse[s * total_rows + row] - m_use);
    if (w == 0.f) continue;  // empty split (lse = -inf)
    wsum += w;
    const float* src = ws_o + (s * total_rows + row) * D;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) acc[e] += w * src[lane + 32 * e];
  }
  const float inv = 1.f / wsum;  // 0 only when the row sees nothing: NaN, like the reference
  const int t = int(row % p.tree_len);
  const int64_t bh = row / p.tree_len;
  const int h = int(bh % p.num_q_heads);
  const int b = int(bh / p.num_q_heads);
  T* dst = static_cast<T*>(p.o) + int64_t(b) * p.o_stride_b + int64_t(h) * p.o_stride_h + int64_t(t) * p.o_stride_t;
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) dst[lane + 32 * e] = Cvt<T>::from_float(acc[e] * inv);
}

}  // namespace detail
}  // namespace ouroboros
