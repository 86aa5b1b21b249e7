// N-gram phrase pool: host launchers (pure CUDA runtime, no torch). See include/ouroboros/ngram.cuh.
#include <climits>
#include <cstdint>

#include "ouroboros/ngram.cuh"
#include "ouroboros/ngram_kernel.cuh"

namespace ouroboros {
namespace {

bool valid_type(IntType t) { return int(t) >= int(IntType::kInt8) && int(t) <= int(IntType::kInt64); }

}  // namespace

const char* ngram_pool_check(const NgramPool& p) {
  if (p.vocab_size < 1 || p.num_slots < 1 || p.guess_set < 1 || p.phrase_len < 1)
    return "pool sizes (V, S, G, P) must all be >= 1";
  if (p.num_slots > p.vocab_size) return "num_slots (S) must be <= vocab_size (V)";
  if (p.num_slots == INT32_MAX) return "num_slots (S) must be < 2^31 - 1 (the list sentinel is S)";
  if ((int64_t(p.guess_set) + 2) * p.phrase_len > ngram_detail::kMaxTileInts)  // int64: no overflow at G ~ 2^31
    return "(guess_set + 2) * phrase_len must be <= 12288 (one slot's phrases live in 48 KiB of shared memory)";
  if (int64_t(p.num_slots) * p.guess_set * p.phrase_len > INT64_MAX / 8) return "pool too large";
  return nullptr;
}

cudaError_t ngram_lookup(const NgramPool& pool, const void* keys, IntType key_type, int64_t batch, int k,
                         int64_t* out_phrases, bool* out_valid, int64_t* stats, cudaStream_t stream) {
  if (ngram_pool_check(pool) != nullptr || batch < 0 || k < 0 || !valid_type(key_type))
    return cudaErrorInvalidValue;
  if (int64_t(k) * pool.phrase_len > INT32_MAX) return cudaErrorInvalidValue;
  const int64_t blocks = (batch + ngram_detail::kLookupWarps - 1) / ngram_detail::kLookupWarps;
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  if (batch == 0) return cudaSuccess;
  if (keys == nullptr || pool.key_to_slot == nullptr || pool.counts == nullptr || pool.phrases == nullptr ||
      (k > 0 && (out_phrases == nullptr || out_valid == nullptr)))
    return cudaErrorInvalidValue;
  ngram_detail::ngram_lookup_kernel<<<unsigned(blocks), ngram_detail::kLookupWarps * 32, 0, stream>>>(
      pool.key_to_slot, pool.counts, pool.phrases, pool.vocab_size, pool.guess_set, pool.phrase_len, keys, key_type,
      batch, k, out_phrases, out_valid, reinterpret_cast<unsigned long long*>(stats));
  return cudaGetLastError();
}

size_t ngram_insert_workspace_bytes(int64_t batch) { return batch > 0 ? size_t(batch) * 2 * sizeof(int32_t) : 0; }

cudaError_t ngram_insert(const NgramPool& pool, const void* keys, IntType key_type, const void* phrases,
                         IntType phrase_type, const void* old, IntType old_type, int64_t batch, void* workspace,
                         size_t workspace_bytes, cudaStream_t stream) {
  if (ngram_pool_check(pool) != nullptr || batch < 0 || batch > INT32_MAX || !valid_type(key_type) ||
      !valid_type(phrase_type) || (old != nullptr && !valid_type(old_type)))
    return cudaErrorInvalidValue;
  if (batch == 0) return cudaSuccess;
  if (keys == nullptr || phrases == nullptr || workspace == nullptr ||
      workspace_bytes < ngram_insert_workspace_bytes(batch))
    return cudaErrorInvalidValue;
  if (!pool.key_to_slot || !pool.slot_key || !pool.counts || !pool.phrases || !pool.lru_prev || !pool.lru_next ||
      !pool.num_keys)
    return cudaErrorInvalidValue;
  int32_t* item_slot = static_cast<int32_t*>(workspace);
  int32_t* item_fresh = item_slot + batch;
  ngram_detail::ngram_resolve_kernel<<<1, 32, 0, stream>>>(pool.key_to_slot, pool.slot_key, pool.lru_prev,
                                                           pool.lru_next, pool.num_keys, pool.vocab_size,
                                                           pool.num_slots, keys, key_type, batch, item_slot,
                                                           item_fresh);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const size_t smem = size_t(pool.guess_set + 2) * pool.phrase_len * sizeof(int32_t);
  ngram_detail::ngram_apply_kernel<<<unsigned(batch), 32, smem, stream>>>(
      pool.counts, pool.phrases, pool.guess_set, pool.phrase_len, phrases, phrase_type, old, old_type, batch,
      item_slot, item_fresh);
  return cudaGetLastError();
}

}  // namespace ouroboros
