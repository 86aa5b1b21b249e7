// Tree attention: host API of the pure CUDA kernel (no torch headers; safe to include from a host-only .cpp).
//
// Contract (SPEC §3, v3): q (B, Hq, T, D) holds the T tree tokens; k, v (B, Hkv, S, D) hold the cache whose entries
// [prefix_len, prefix_len + T) are the tree tokens; entries at or past prefix_len + T are never read (a static cache
// is longer than its live part). prefix_len is a host value or, when prefix_len_ptr is set, read by the kernel from
// device memory (int32 or int64, one value or one per batch row, clamped into [0, S - T]): one captured CUDA graph then
// replays correctly for every prefix length. Token i sees every one of the first prefix_len entries plus tree entry
// prefix_len + j iff bit (j % 32) of word (j / 32) in row i of batch row b's packed int32 mask (T, ceil(T / 32)) is
// set: the mask at tree_mask + b * tree_mask_stride_b (stride 0: one tree shared by every batch row); a null mask
// means a plain causal chain (bottom-right causal). Tree token i of batch row b sits at position prefix_len + depth_i
// (depth_i = popcount(row i of its mask) - 1; i for the causal chain), cache entry j at position j; with window w > 0,
// token i sees a key only if the key's position is > position_i - w (transformers' sliding-window rule).
// o (B, Hq, T, D) = softmax(mask(softcap(scale * q k^T))) v, computed in fp32, stored in the input dtype.
//
// Layout requirements (checked by tree_attention_check):
//   * the last dim of q, k, v, o is contiguous (stride 1); the other strides are given in ELEMENTS and must be
//     multiples of 8; every base pointer is 16-byte aligned (the kernel moves 16-byte chunks with cp.async);
//   * tree_mask, when given, is a device int32 array holding, for each batch row, a contiguous row-major
//     (T, ceil(T / 32)) mask; tree_mask_stride_b >= 0 (elements between batch rows' masks; 0: one shared mask);
//   * D in {64, 128, 256}; dtype fp16 or bf16; Hq % Hkv == 0; 1 <= T <= S; for a host prefix_len,
//     0 <= prefix_len, prefix_len + T <= S; prefix_len_ptr, when set, aligned to its element size; window >= 0;
//   * the kernels need sm_80 or newer (bf16 tensor cores, cp.async).
//
// Work split: one CTA owns one (batch, kv head) pair, a tile of query rows made of ALL the query heads of that KV group
// (rows ordered token-major: row = t * (Hq / Hkv) + g), so each K/V tile is read from memory once per group, and one
// contiguous chunk of its live key range (flash-decoding split over S): the range [window start, end of the tree) is
// computed in the kernel from the prefix length, so the cost follows the live length, and cut into num_splits chunks
// of whole key tiles (a split left with no keys writes an empty partial). With more than one split the CTAs write
// fp32 partial outputs + log-sum-exp to a workspace and a combine kernel merges them.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace ouroboros {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1 };

struct TreeAttentionParams {
  const void* q = nullptr;            // (B, Hq, T, D)
  const void* k = nullptr;            // (B, Hkv, S, D)
  const void* v = nullptr;            // (B, Hkv, S, D)
  const int32_t* tree_mask = nullptr; // (T, ceil(T / 32)) packed bits per batch row, or nullptr for causal
  void* o = nullptr;                  // (B, Hq, T, D), written

  // Strides in elements (the last dim is contiguous).
  int64_t q_stride_b = 0, q_stride_h = 0, q_stride_t = 0;
  int64_t k_stride_b = 0, k_stride_h = 0, k_stride_s = 0;
  int64_t v_stride_b = 0, v_stride_h = 0, v_stride_s = 0;
  int64_t o_stride_b = 0, o_stride_h = 0, o_stride_t = 0;
  // Elements from batch row b's (T, ceil(T / 32)) mask to row b + 1's; 0: every row shares one mask (contract v2).
  int64_t tree_mask_stride_b = 0;

  int batch = 0;
  int num_q_heads = 0;   // Hq
  int num_kv_heads = 0;  // Hkv
  int tree_len = 0;      // T
  int cache_len = 0;     // S
  int head_dim = 0;      // D
  int prefix_len = 0;    // host prefix length, used when prefix_len_ptr is null

  // Device prefix length (null: use prefix_len): element b * prefix_len_stride is batch row b's prefix length
  // (stride 0: one value for every row); int64 when prefix_len_is_int64, else int32.
  const void* prefix_len_ptr = nullptr;
  int64_t prefix_len_stride = 0;
  bool prefix_len_is_int64 = false;

  int window = 0;        // > 0: sliding window on positions (key position > query position - window); 0: none
  float scale = 0.f;     // multiplies q.k (1/sqrt(D) for the usual attention)
  float softcap = 0.f;   // > 0: scores = softcap * tanh(scores / softcap) before masking (Gemma2); <= 0: off
  DType dtype = DType::kFloat16;
};

// Fill the strides of contiguous (B, H, L, D) tensors.
void tree_attention_set_contiguous_strides(TreeAttentionParams& p);

// nullptr when the kernel supports `p`, else a static message naming the first problem.
const char* tree_attention_check(const TreeAttentionParams& p);

// Number of key-range splits the launch will use, from what the host knows of the live key range (prefix_len + T
// less what the window cuts; for a device prefix length, S or window + T). requested > 0 forces (capped at the key
// tiles of that bound); requested <= 0 picks one from the SM count so the grid fills the GPU.
int tree_attention_num_splits(const TreeAttentionParams& p, int num_sms, int requested);

// Bytes of device workspace the launch needs for `num_splits` (0 when num_splits <= 1).
size_t tree_attention_workspace_bytes(const TreeAttentionParams& p, int num_splits);

// Enqueue the attention (and the combine kernel when num_splits > 1) on `stream`. Does not synchronize and does no
// host<->device traffic, so it can be captured in a CUDA graph, which with prefix_len_ptr replays for any prefix
// length written there. Returns cudaErrorInvalidValue when tree_attention_check fails or the workspace is too small,
// else the launch error (cudaSuccess when queued).
cudaError_t tree_attention(const TreeAttentionParams& p, int num_splits, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream);

}  // namespace ouroboros
