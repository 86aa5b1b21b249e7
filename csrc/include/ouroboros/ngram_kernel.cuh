// N-gram phrase pool: device code (include from .cu files only). Host API and contract: ngram.cuh.
//
// The sequential logic is written once, in __host__ __device__ functions, so the self-test can also run it on the
// CPU (csrc/tests/ngram_selftest.cu --host) against an independent host model:
//   * resolve_chunk: the key-level walk (contract step 2) of one thread over a chunk of items;
//   * apply_item:    one item's phrase-list update (contract step 3) on a slot's (G, P) tile, parametrised by a
//                    "lanes" policy: WarpLanes (32 lanes, __ballot_sync / __syncwarp) on the GPU, SerialLanes on the
//                    host.
// The kernels themselves are compiled only where OUROBOROS_NGRAM_LOGIC_ONLY is not defined (ngram.cu).
#pragma once

#include <cstdint>

#include "ouroboros/ngram.cuh"

#if defined(__CUDACC__)
#define OUROBOROS_HD __host__ __device__ __forceinline__
#else
#define OUROBOROS_HD inline
#endif

namespace ouroboros {
namespace ngram_detail {

constexpr int kResolveChunk = 1024;  // keys staged in shared memory per step of the resolve walk
constexpr int kLookupWarps = 4;      // keys per lookup CTA (one warp per key)
constexpr int kMaxTileInts = 12288;  // (G + 2) * P int32 of shared memory per insert CTA (48 KiB)

OUROBOROS_HD int64_t load_int(const void* p, IntType t, int64_t i) {
  switch (t) {
    case IntType::kInt8: return static_cast<const int8_t*>(p)[i];
    case IntType::kUInt8: return static_cast<const uint8_t*>(p)[i];
    case IntType::kInt16: return static_cast<const int16_t*>(p)[i];
    case IntType::kInt32: return static_cast<const int32_t*>(p)[i];
    default: return static_cast<const int64_t*>(p)[i];
  }
}

// Two's-complement truncation to int32 (what `.to(torch.int32)` does).
OUROBOROS_HD int32_t to_i32(int64_t x) { return static_cast<int32_t>(static_cast<uint32_t>(static_cast<uint64_t>(x))); }

struct WalkState {
  int32_t n;     // num_keys
  int32_t head;  // lru_next[S]: oldest slot (S when empty)
  int32_t tail;  // lru_prev[S]: newest slot (S when empty)
};

// Key-level step of items item0 .. item0 + count - 1, in order, by ONE thread. ks[i] is the item's key already checked
// against [0, V) (-1: skip the item). Writes item_slot[item] (-1 when skipped) and item_fresh[item] (1 when the item
// starts a new key in its slot, whose phrase list must then restart empty). The pool arrays are read and written by
// this thread only (plain loads/stores: program order makes its own stores visible to its later loads).
//
// Latency: key_to_slot of the NEXT item is loaded before this item's stores and patched in registers when this item
// adds or evicts that key, so each item costs at most one dependent global round trip (the moved slot's list links),
// and none for a key that is new with free slots or already the newest.
OUROBOROS_HD WalkState resolve_chunk(WalkState st, const int32_t* ks, int count, int64_t item0, int32_t* key_to_slot,
                                     int32_t* slot_key, int32_t* lru_prev, int32_t* lru_next, int32_t num_slots,
                                     int32_t* item_slot, int32_t* item_fresh) {
  const int32_t S = num_slots;
  if (count <= 0) return st;
  int32_t kn = ks[0];
  int32_t sn = kn >= 0 ? key_to_slot[kn] : -1;
  for (int i = 0; i < count; ++i) {
    const int32_t key = kn, s0 = sn;
    if (i + 1 < count) {  // prefetch the next item's slot (patched below if this item changes it)
      kn = ks[i + 1];
      sn = kn >= 0 ? key_to_slot[kn] : -1;
    }
    const int64_t item = item0 + i;
    if (key < 0) {
      item_slot[item] = -1;
      item_fresh[item] = 0;
      continue;
    }
    int32_t slot;
    bool is_new = false, evict = false;
    if (s0 >= 0) {
      slot = s0;
    } else if (st.n < S) {
      slot = st.n;
      st.n += 1;
      is_new = true;
    } else {
      slot = st.head;  // the oldest key loses its slot
      is_new = true;
      evict = true;
    }
    const bool move = evict || (s0 >= 0 && slot != st.tail);  // a present key that is already the newest stays
    if (move) {                                                // unlink the slot
      const int32_t prv = lru_prev[slot];
      const int32_t nxt = lru_next[slot];
      if (evict) {
        const int32_t old_key = slot_key[slot];
        key_to_slot[old_key] = -1;
        if (kn == old_key) sn = -1;
      }
      lru_next[prv] = nxt;
      lru_prev[nxt] = prv;
      if (slot == st.head) st.head = nxt;
      if (slot == st.tail) st.tail = prv;
    }
    if (move || is_new) {  // append at the newest end (for an empty list tail == S: lru_next[S] = slot sets the head)
      lru_next[st.tail] = slot;
      lru_prev[slot] = st.tail;
      lru_next[slot] = S;
      lru_prev[S] = slot;
      if (st.head == S) st.head = slot;
      st.tail = slot;
    }
    if (is_new) {
      key_to_slot[key] = slot;
      slot_key[slot] = key;
      if (kn == key) sn = slot;
    }
    item_slot[item] = slot;
    item_fresh[item] = is_new ? 1 : 0;
  }
  return st;
}

// Lanes policy for the host (one lane, sequential loops). The device one (WarpLanes) is below.
struct SerialLanes {
  // smallest r < n with pred(r), else -1
  template <class Pred>
  OUROBOROS_HD int first_match(int n, Pred pred) const {
    for (int r = 0; r < n; ++r)
      if (pred(r)) return r;
    return -1;
  }
  // t[e] = t[e + d] for e = a .. b-1 in increasing order (a shift towards lower indices)
  OUROBOROS_HD void shift_down(int32_t* t, int a, int b, int d) const {
    for (int e = a; e < b; ++e) t[e] = t[e + d];
  }
  OUROBOROS_HD void copy(int32_t* dst, const int32_t* src, int n) const {
    for (int i = 0; i < n; ++i) dst[i] = src[i];
  }
  OUROBOROS_HD void sync() const {}
};

// One item's phrase-list update (contract step 3) on a slot's tile (G rows of P int32; rows < c are the list, oldest
// first). nb = new phrase, ob = old phrase or nullptr (plain insert). Returns the new count.
template <class Lanes>
OUROBOROS_HD int32_t apply_item(const Lanes& lanes, int32_t* tile, int32_t c, int G, int P, const int32_t* nb,
                                const int32_t* ob) {
  const int mn = lanes.first_match(c, [&](int r) {
    for (int j = 0; j < P; ++j)
      if (tile[r * P + j] != nb[j]) return false;
    return true;
  });
  int mo = -1;
  bool same = false;
  if (ob != nullptr) {
    mo = lanes.first_match(c, [&](int r) {
      for (int j = 0; j < P; ++j)
        if (tile[r * P + j] != ob[j]) return false;
      return true;
    });
    same = lanes.first_match(P, [&](int j) { return ob[j] != nb[j]; }) < 0;
  }
  // rows lo .. hi-1 take row r + 1; row w (if >= 0) takes the new phrase; the count becomes cn
  int lo = 0, hi = 0, w = -1;
  int32_t cn = c;
  if (mo < 0) {  // plain insert
    if (mn >= 0) {  // already there: move it to the newest end
      lo = mn;
      hi = c - 1;
    } else if (c < G) {  // room: append
      lo = hi = c;
      cn = c + 1;
    } else {  // full: drop the oldest
      lo = 0;
      hi = G - 1;
    }
    w = hi;
  } else if (!same) {
    if (mn >= 0) {  // the new phrase is already there: delete the old one
      lo = mo;
      hi = c - 1;
      cn = c - 1;
    } else {  // overwrite the old one in place (it keeps its recency)
      w = mo;
    }
  }
  lanes.sync();  // every lane's matching reads of the tile happen before any lane writes it
  if (hi > lo) lanes.shift_down(tile, lo * P, hi * P, P);
  if (w >= 0) lanes.copy(tile + w * P, nb, P);
  lanes.sync();
  return cn;
}

// The kernels (defined once, in ngram.cu; a file that only wants the logic above defines OUROBOROS_NGRAM_LOGIC_ONLY).
#if defined(__CUDACC__) && !defined(OUROBOROS_NGRAM_LOGIC_ONLY)

struct WarpLanes {
  int lane;
  template <class Pred>
  __device__ __forceinline__ int first_match(int n, Pred pred) const {
    for (int r0 = 0; r0 < n; r0 += 32) {  // n is warp-uniform: every lane runs the same trip count
      const int r = r0 + lane;
      const unsigned m = __ballot_sync(0xffffffffu, r < n && pred(r));
      if (m != 0u) return r0 + __ffs(static_cast<int>(m)) - 1;
    }
    return -1;
  }
  __device__ __forceinline__ void shift_down(int32_t* t, int a, int b, int d) const {
    // Reads of step e0 come from [e0 + d, e0 + d + 32), never written by an earlier step (those wrote below e0);
    // the __syncwarp between the reads and the writes of a step handles the overlap inside it (d < 32).
    for (int e0 = a; e0 < b; e0 += 32) {
      const int e = e0 + lane;
      const int32_t v = e < b ? t[e + d] : 0;
      __syncwarp();
      if (e < b) t[e] = v;
      __syncwarp();
    }
  }
  __device__ __forceinline__ void copy(int32_t* dst, const int32_t* src, int n) const {
    for (int i = lane; i < n; i += 32) dst[i] = src[i];
  }
  __device__ __forceinline__ void sync() const { __syncwarp(); }
};

// One warp per key (kLookupWarps keys per CTA).
__global__ void __launch_bounds__(kLookupWarps * 32)
    ngram_lookup_kernel(const int32_t* __restrict__ key_to_slot, const int32_t* __restrict__ counts,
                        const int32_t* __restrict__ phrases, int32_t V, int32_t G, int32_t P, const void* keys,
                        IntType key_type, int64_t batch, int32_t k, int64_t* __restrict__ out,
                        bool* __restrict__ valid, unsigned long long* stats) {
  __shared__ unsigned int tally[kLookupWarps][2];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t b = int64_t(blockIdx.x) * kLookupWarps + warp;
  unsigned int counted = 0, hit = 0;
  if (b < batch) {
    const int64_t key = load_int(keys, key_type, b);
    int32_t slot = -1, c = 0;
    if (key >= 0 && key < V) {
      slot = key_to_slot[key];
      if (slot >= 0) c = counts[slot];
    }
    const int32_t n = c < k ? c : k;
    const int32_t kp = k * P;
    int64_t* o = out + b * int64_t(kp);
    const int64_t newest = (int64_t(slot) * G + (c - 1)) * P;  // index of the newest row (used only when n > 0)
    for (int32_t e = lane; e < kp; e += 32) {
      const int32_t i = e / P, j = e - i * P;
      o[e] = i < n ? int64_t(phrases[newest - int64_t(i) * P + j]) : int64_t(0);
    }
    for (int32_t i = lane; i < k; i += 32) valid[b * k + i] = i < n;
    counted = key >= 0 ? 1u : 0u;
    hit = (key >= 0 && c > 0) ? 1u : 0u;
  }
  if (stats != nullptr) {  // one pair of atomics per CTA
    if (lane == 0) {
      tally[warp][0] = counted;
      tally[warp][1] = hit;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned long long sc = 0, sh = 0;
      for (int w = 0; w < kLookupWarps; ++w) {
        sc += tally[w][0];
        sh += tally[w][1];
      }
      if (sc) atomicAdd(stats, sc);
      if (sh) atomicAdd(stats + 1, sh);
    }
  }
}

// Insert phase 1: ONE warp. Lanes stage a chunk of keys (converted, range-checked) in shared memory, lane 0 walks it.
__global__ void __launch_bounds__(32)
    ngram_resolve_kernel(int32_t* key_to_slot, int32_t* slot_key, int32_t* lru_prev, int32_t* lru_next,
                         int32_t* num_keys, int32_t V, int32_t S, const void* keys, IntType key_type, int64_t batch,
                         int32_t* item_slot, int32_t* item_fresh) {
  __shared__ int32_t ks[kResolveChunk];
  const int lane = threadIdx.x;
  WalkState st{0, 0, 0};
  if (lane == 0) st = WalkState{num_keys[0], lru_next[S], lru_prev[S]};
  for (int64_t base = 0; base < batch; base += kResolveChunk) {
    const int count = int(batch - base < kResolveChunk ? batch - base : kResolveChunk);
    __syncwarp();  // lane 0 is done with the previous chunk
    for (int i = lane; i < count; i += 32) {
      const int64_t key = load_int(keys, key_type, base + i);
      ks[i] = (key >= 0 && key < V) ? int32_t(key) : -1;
    }
    __syncwarp();
    if (lane == 0)
      st = resolve_chunk(st, ks, count, base, key_to_slot, slot_key, lru_prev, lru_next, S, item_slot, item_fresh);
  }
  if (lane == 0) num_keys[0] = st.n;
}

// Insert phase 2: one warp per item; the FIRST item of each slot loads the slot's tile into shared memory, applies
// every item of the batch that landed in that slot, in order, and writes the list back. Other warps exit at once.
// Dynamic shared memory: (G + 2) * P int32.
__global__ void __launch_bounds__(32)
    ngram_apply_kernel(int32_t* __restrict__ counts, int32_t* __restrict__ phrases, int32_t G, int32_t P,
                       const void* new_phrases, IntType new_type, const void* old_phrases, IntType old_type,
                       int64_t batch, const int32_t* __restrict__ item_slot,
                       const int32_t* __restrict__ item_fresh) {
  extern __shared__ int32_t smem[];
  const int lane = threadIdx.x;
  const int64_t b = blockIdx.x;
  const int32_t slot = item_slot[b];
  if (slot < 0) return;
  for (int64_t j0 = 0; j0 < b; j0 += 32) {  // an earlier item in the same slot owns it
    const int64_t j = j0 + lane;
    if (__any_sync(0xffffffffu, j < b && item_slot[j] == slot)) return;
  }
  int32_t* tile = smem;
  int32_t* nb = smem + G * P;
  int32_t* ob = nb + P;
  const bool has_old = old_phrases != nullptr;
  int32_t* gtile = phrases + int64_t(slot) * G * P;
  int32_t c = counts[slot];
  for (int e = lane; e < c * P; e += 32) tile[e] = gtile[e];  // rows >= c are garbage: never read
  __syncwarp();
  const WarpLanes lanes{lane};
  for (int64_t j0 = b; j0 < batch; j0 += 32) {
    const int64_t j = j0 + lane;
    unsigned m = __ballot_sync(0xffffffffu, j < batch && item_slot[j] == slot);
    while (m != 0u) {
      const int64_t it = j0 + __ffs(static_cast<int>(m)) - 1;
      m &= m - 1u;
      if (item_fresh[it] != 0) c = 0;
      for (int i = lane; i < P; i += 32) {
        nb[i] = to_i32(load_int(new_phrases, new_type, it * P + i));
        if (has_old) ob[i] = to_i32(load_int(old_phrases, old_type, it * P + i));
      }
      __syncwarp();
      c = apply_item(lanes, tile, c, G, P, nb, has_old ? ob : nullptr);  // ends with __syncwarp
    }
  }
  for (int e = lane; e < c * P; e += 32) gtile[e] = tile[e];
  if (lane == 0) counts[slot] = c;
}

#endif  // __CUDACC__ && !OUROBOROS_NGRAM_LOGIC_ONLY

}  // namespace ngram_detail
}  // namespace ouroboros
