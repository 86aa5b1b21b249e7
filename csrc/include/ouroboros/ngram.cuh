// N-gram phrase pool: host API of the pure CUDA kernels (no torch headers; safe to include from a host-only .cpp).
//
// Contract and layout: the module docstring of ouroboros_kernels/ngram.py (the reference implementation is
// ouroboros_kernels/reference.py). In short, all pool arrays are contiguous int32 on one device:
//   key_to_slot (V)      slot of key v or -1          slot_key (S)   key held by slot s (s < num_keys)
//   counts (S)           phrases of slot s, 0..G      phrases (S, G, P)  row j < counts[s] = j-th OLDEST phrase
//   lru_prev / lru_next (S + 1)  doubly linked list of the occupied slots in key recency order, sentinel S:
//                        lru_next[S] = least recently inserted-into slot, lru_prev[S] = most recent
//   num_keys (1)         occupied slots, exactly 0..num_keys-1
//
// ngram_lookup: for each key b, out_phrases[b, i] (int64, P tokens) = phrases[s, counts[s] - 1 - i] (newest first)
//   and out_valid[b, i] = true for i < min(counts[s], k), s = key_to_slot[keys[b]]; every other row is 0 / false.
//   Keys outside [0, V) or absent find nothing. stats (int64 (2,), optional) += (#keys >= 0, #of those with a phrase).
// ngram_insert: equal to applying items b = 0..B-1 one by one (keys outside [0, V) are skipped): the key moves to the
//   newest end of the key LRU (a new key takes slot num_keys, or evicts the oldest key when the pool is full), then
//   phrases[b] is inserted (an existing equal row moves to the newest end; a full list drops its oldest row), or,
//   with `old`, replace(old[b] -> phrases[b]) as the contract describes.
//
// Both launches are asynchronous on `stream`, never synchronize and never touch host memory, so they can be captured
// in a CUDA graph (fixed batch size and k). Inputs may use any of the integer types below (converted on the fly);
// tokens are stored as int32 (two's-complement truncation, like the reference's `.to(torch.int32)`).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace ouroboros {

enum class IntType : int { kInt8 = 0, kUInt8 = 1, kInt16 = 2, kInt32 = 3, kInt64 = 4 };

// Device pointers and sizes of a pool (see the layout above).
struct NgramPool {
  int32_t* key_to_slot = nullptr;  // (V)
  int32_t* slot_key = nullptr;     // (S)
  int32_t* counts = nullptr;       // (S)
  int32_t* phrases = nullptr;      // (S, G, P)
  int32_t* lru_prev = nullptr;     // (S + 1)
  int32_t* lru_next = nullptr;     // (S + 1)
  int32_t* num_keys = nullptr;     // (1)
  int vocab_size = 0;              // V
  int num_slots = 0;               // S (<= V)
  int guess_set = 0;               // G
  int phrase_len = 0;              // P
};

// nullptr when the sizes of `pool` suit both kernels, else a static message naming the first problem (pointers are
// not checked here: lookup needs key_to_slot, counts and phrases; insert needs all of them).
// (Sizes >= 1, S <= V, and the insert kernel keeps one slot's (G, P) tile plus two phrases in 48 KiB of shared
// memory: (G + 2) * P <= 12288.)
const char* ngram_pool_check(const NgramPool& pool);

// Lookup (read-only on the pool). keys: (batch) of key_type; out_phrases: (batch, k, P) int64; out_valid: (batch, k)
// bytes (0/1, torch.bool); stats: int64 (2) or nullptr. batch * k * P must fit in int64, k * P in int32.
// Returns cudaErrorInvalidValue on bad arguments, else the launch error (cudaSuccess when queued; batch 0 is a no-op).
cudaError_t ngram_lookup(const NgramPool& pool, const void* keys, IntType key_type, int64_t batch, int k,
                         int64_t* out_phrases, bool* out_valid, int64_t* stats, cudaStream_t stream);

// Bytes of device workspace ngram_insert needs for `batch` items (2 int32 per item).
size_t ngram_insert_workspace_bytes(int64_t batch);

// Insert (old == nullptr) or replace a batch in place. keys: (batch); phrases, old: (batch, P) row-major.
// batch must be < 2^31. Two launches: a one-warp kernel that resolves the key LRU in order (item -> slot, fresh), then
// one warp per item, where the first item of each slot applies all of that slot's items in order.
cudaError_t ngram_insert(const NgramPool& pool, const void* keys, IntType key_type, const void* phrases,
                         IntType phrase_type, const void* old, IntType old_type, int64_t batch, void* workspace,
                         size_t workspace_bytes, cudaStream_t stream);

}  // namespace ouroboros
