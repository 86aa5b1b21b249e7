// Self-test of the pure CUDA n-gram pool kernels against an independent host model of the contract (no torch).
//
// The host model (Model) keeps each slot's phrase list as a vector and the key recency as a vector of slots, oldest
// first: nothing in it is shared with the kernels. Random sequences of batched inserts / replaces (repeated keys and
// phrases inside a batch, padding keys -1 and >= V, evictions inside a batch, every integer input type, batches that
// span several resolve chunks) and lookups (with stats) are applied to both, and after every batch the whole pool
// layout is compared: num_keys, key_to_slot, slot_key, counts, list rows < counts, and the LRU links.
//
// Usage: ngram_selftest [--host] [--quick] [--verbose] [--bench]
//   --host:  only the CPU run of the kernels' own sequential logic (ngram_kernel.cuh's resolve_chunk / apply_item
//            with one lane) against the model; needs no GPU (ctest: ngram_selftest_host).
//   default: the host run, then the GPU kernels (eager and CUDA-graph replays) against the model;
//   --quick: fewer steps (for compute-sanitizer); --bench: after passing, time insert + lookup (kernel only).
// Exit status: 0 all passed, 1 a case failed, 2 no usable GPU (after the host run passed).
#include "cuda_check.cuh"
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "ouroboros/ngram.cuh"
#define OUROBOROS_NGRAM_LOGIC_ONLY  // the host-callable logic only; the kernels come from the library
#include "ouroboros/ngram_kernel.cuh"

using ouroboros::IntType;
using ouroboros::NgramPool;

namespace {


using Phrase = std::vector<int32_t>;

int32_t trunc32(int64_t x) { return static_cast<int32_t>(static_cast<uint32_t>(static_cast<uint64_t>(x))); }

// ---- the host model ------------------------------------------------------------------------------------------------
struct Model {
  int V, S, G, P;
  int n = 0;
  std::vector<int32_t> key_to_slot, slot_key;
  std::vector<std::vector<Phrase>> lists;  // per slot, oldest first
  std::vector<int32_t> order;              // occupied slots, least recently inserted-into first
  int64_t lookups = 0, hits = 0;

  Model(int v, int s, int g, int p) : V(v), S(s), G(g), P(p), key_to_slot(v, -1), slot_key(s, -1), lists(s) {}

  static int find(const std::vector<Phrase>& l, const Phrase& x) {
    for (size_t i = 0; i < l.size(); ++i)
      if (l[i] == x) return int(i);
    return -1;
  }

  void apply(int64_t key, const Phrase& nw, const Phrase* old) {
    if (key < 0 || key >= V) return;
    int32_t slot = key_to_slot[key];
    if (slot >= 0) {
      order.erase(std::find(order.begin(), order.end(), slot));
    } else {
      if (n < S) {
        slot = n++;
      } else {
        slot = order.front();
        order.erase(order.begin());
        key_to_slot[slot_key[slot]] = -1;
      }
      key_to_slot[key] = slot;
      slot_key[slot] = int32_t(key);
      lists[slot].clear();
    }
    order.push_back(slot);
    std::vector<Phrase>& l = lists[slot];
    const int mo = old ? find(l, *old) : -1;
    const int mn = find(l, nw);
    if (mo < 0) {
      if (mn >= 0) l.erase(l.begin() + mn);
      else if (int(l.size()) == G) l.erase(l.begin());
      l.push_back(nw);
    } else if (*old == nw) {
      // nothing
    } else if (mn >= 0) {
      l.erase(l.begin() + mo);
    } else {
      l[mo] = nw;
    }
  }

  std::vector<Phrase> lookup(int64_t key, int k) {
    std::vector<Phrase> out;
    if (key >= 0) ++lookups;
    if (key < 0 || key >= V || key_to_slot[key] < 0) return out;
    const std::vector<Phrase>& l = lists[key_to_slot[key]];
    if (!l.empty()) ++hits;
    for (int i = 0; i < k && i < int(l.size()); ++i) out.push_back(l[l.size() - 1 - i]);
    return out;
  }
};

// The pool layout on the host (the arrays of ouroboros_kernels/ngram.py).
struct Arrays {
  int V, S, G, P;
  std::vector<int32_t> key_to_slot, slot_key, counts, phrases, lru_prev, lru_next, num_keys;
  Arrays(int v, int s, int g, int p)
      : V(v), S(s), G(g), P(p), key_to_slot(v, -1), slot_key(s, -1), counts(s, 0), phrases(size_t(s) * g * p, 0),
        lru_prev(s + 1, s), lru_next(s + 1, s), num_keys(1, 0) {}
};

std::string compare(const Model& m, const Arrays& a) {
  char buf[256];
  if (a.num_keys[0] != m.n) {
    std::snprintf(buf, sizeof buf, "num_keys %d != %d", a.num_keys[0], m.n);
    return buf;
  }
  for (int v = 0; v < m.V; ++v)
    if (a.key_to_slot[v] != m.key_to_slot[v]) {
      std::snprintf(buf, sizeof buf, "key_to_slot[%d] %d != %d", v, a.key_to_slot[v], m.key_to_slot[v]);
      return buf;
    }
  for (int s = 0; s < m.n; ++s) {
    if (a.slot_key[s] != m.slot_key[s]) {
      std::snprintf(buf, sizeof buf, "slot_key[%d] %d != %d", s, a.slot_key[s], m.slot_key[s]);
      return buf;
    }
    if (a.counts[s] != int(m.lists[s].size())) {
      std::snprintf(buf, sizeof buf, "counts[%d] %d != %zu", s, a.counts[s], m.lists[s].size());
      return buf;
    }
    for (int r = 0; r < a.counts[s]; ++r)
      for (int j = 0; j < m.P; ++j)
        if (a.phrases[(size_t(s) * m.G + r) * m.P + j] != m.lists[s][r][j]) {
          std::snprintf(buf, sizeof buf, "phrases[%d][%d][%d] %d != %d", s, r, j,
                        a.phrases[(size_t(s) * m.G + r) * m.P + j], m.lists[s][r][j]);
          return buf;
        }
  }
  const int S = m.S;
  const int first = m.order.empty() ? S : m.order.front(), last = m.order.empty() ? S : m.order.back();
  if (a.lru_next[S] != first || a.lru_prev[S] != last) {
    std::snprintf(buf, sizeof buf, "list ends (next[S]=%d, prev[S]=%d) != (%d, %d)", a.lru_next[S], a.lru_prev[S],
                  first, last);
    return buf;
  }
  for (size_t i = 0; i < m.order.size(); ++i) {
    const int s = m.order[i];
    const int want_prev = i == 0 ? S : m.order[i - 1];
    const int want_next = i + 1 == m.order.size() ? S : m.order[i + 1];
    if (a.lru_prev[s] != want_prev || a.lru_next[s] != want_next) {
      std::snprintf(buf, sizeof buf, "links of slot %d (prev %d, next %d) != (%d, %d)", s, a.lru_prev[s],
                    a.lru_next[s], want_prev, want_next);
      return buf;
    }
  }
  return "";
}

// ---- random operations ---------------------------------------------------------------------------------------------
struct Op {
  bool lookup = false;
  std::vector<int64_t> keys;                // (B)
  std::vector<int64_t> phrases, old;        // (B, P); old empty = plain insert
  IntType key_type = IntType::kInt64, phrase_type = IntType::kInt64, old_type = IntType::kInt64;
  int k = 0;                                // lookups
};

struct Config {
  const char* name;
  int V, S, G, P, alphabet, max_batch, steps;
};

int64_t range_of(IntType t) {
  switch (t) {
    case IntType::kInt8: return 127;
    case IntType::kUInt8: return 255;
    case IntType::kInt16: return 32767;
    default: return INT32_MAX;
  }
}

IntType random_type(std::mt19937& rng, int64_t needed_max, bool need_negative) {
  static const IntType all[] = {IntType::kInt8, IntType::kUInt8, IntType::kInt16, IntType::kInt32, IntType::kInt64};
  for (;;) {
    const IntType t = rng() % 3 == 0 ? all[rng() % 5] : (rng() % 2 ? IntType::kInt64 : IntType::kInt32);
    if (range_of(t) >= needed_max && !(need_negative && t == IntType::kUInt8)) return t;
  }
}

std::vector<Op> random_ops(const Config& c, uint32_t seed, int steps) {
  std::mt19937 rng(seed);
  auto uni = [&](int lo, int hi) { return lo + int(rng() % uint32_t(hi - lo + 1)); };  // [lo, hi]
  std::vector<Op> ops;
  for (int s = 0; s < steps; ++s) {
    Op op;
    const int b = uni(1, c.max_batch);
    if (rng() % 5 == 0) {  // a lookup over keys incl. padding / out of range
      op.lookup = true;
      op.k = uni(0, c.G + 2);
      for (int i = 0; i < b; ++i) op.keys.push_back(rng() % 8 == 0 ? (rng() % 2 ? -1 : c.V) : uni(0, c.V - 1));
      op.key_type = random_type(rng, c.V, true);
      ops.push_back(op);
      continue;
    }
    for (int i = 0; i < b; ++i) op.keys.push_back(uni(0, c.V - 1));
    if (rng() % 10 < 3)  // repeat keys inside the batch
      for (int i = 0; i < b; ++i) op.keys[i] = op.keys[uni(0, b / 2)];
    if (rng() % 10 < 2)  // padding
      for (int i = 0; i < b; ++i)
        if (rng() % 4 == 0) op.keys[i] = rng() % 3 == 0 ? c.V + int64_t(rng() % 5) : -1 - int64_t(rng() % 3);
    for (int i = 0; i < b * c.P; ++i) op.phrases.push_back(uni(0, c.alphabet - 1));
    if (rng() % 10 < 3)  // repeat phrases inside the batch
      for (int i = 0; i < b; ++i) {
        const int src = uni(0, b / 2);
        for (int j = 0; j < c.P; ++j) op.phrases[size_t(i) * c.P + j] = op.phrases[size_t(src) * c.P + j];
      }
    if (rng() % 3 == 0) {  // replace: old = a random phrase or one of the batch's
      for (int i = 0; i < b; ++i) {
        const bool copy = rng() % 2 == 0;
        const int src = uni(0, b - 1);
        for (int j = 0; j < c.P; ++j)
          op.old.push_back(copy ? op.phrases[size_t(src) * c.P + j] : uni(0, c.alphabet - 1));
      }
    }
    op.key_type = random_type(rng, c.V + 5, true);
    op.phrase_type = random_type(rng, c.alphabet, false);
    op.old_type = random_type(rng, c.alphabet, false);
    if (op.phrase_type == IntType::kInt64 && rng() % 4 == 0)  // high bits are dropped: 2^32 + x stores x
      for (auto& x : op.phrases) x += int64_t(1) << 32;
    ops.push_back(op);
  }
  return ops;
}

// Input buffer of `type` holding `vals` (host bytes).
std::vector<uint8_t> pack(const std::vector<int64_t>& vals, IntType t) {
  const size_t w = t == IntType::kInt64 ? 8 : t == IntType::kInt32 ? 4 : t == IntType::kInt16 ? 2 : 1;
  std::vector<uint8_t> out(vals.size() * w + 8);
  for (size_t i = 0; i < vals.size(); ++i) {
    const int64_t v = vals[i];
    switch (t) {
      case IntType::kInt8: { int8_t x = int8_t(v); std::memcpy(&out[i], &x, 1); break; }
      case IntType::kUInt8: { uint8_t x = uint8_t(v); std::memcpy(&out[i], &x, 1); break; }
      case IntType::kInt16: { int16_t x = int16_t(v); std::memcpy(&out[i * 2], &x, 2); break; }
      case IntType::kInt32: { int32_t x = int32_t(v); std::memcpy(&out[i * 4], &x, 4); break; }
      default: std::memcpy(&out[i * 8], &v, 8); break;
    }
  }
  return out;
}

// The model's view of an input (what the kernel sees after the type conversion).
int64_t as_typed(int64_t v, IntType t) {
  switch (t) {
    case IntType::kInt8: return int8_t(v);
    case IntType::kUInt8: return uint8_t(v);
    case IntType::kInt16: return int16_t(v);
    case IntType::kInt32: return int32_t(v);
    default: return v;
  }
}

void apply_model(Model& m, const Op& op) {
  for (size_t i = 0; i < op.keys.size(); ++i) {
    Phrase nw(m.P), old(m.P);
    for (int j = 0; j < m.P; ++j) {
      nw[j] = trunc32(as_typed(op.phrases[i * m.P + j], op.phrase_type));
      if (!op.old.empty()) old[j] = trunc32(as_typed(op.old[i * m.P + j], op.old_type));
    }
    m.apply(as_typed(op.keys[i], op.key_type), nw, op.old.empty() ? nullptr : &old);
  }
}

// ---- the kernels' logic on the host (one lane) ---------------------------------------------------------------------
void host_insert(Arrays& a, const Op& op) {
  namespace d = ouroboros::ngram_detail;
  const int64_t B = int64_t(op.keys.size());
  const std::vector<uint8_t> kb = pack(op.keys, op.key_type), pb = pack(op.phrases, op.phrase_type),
                             ob = pack(op.old, op.old_type);
  std::vector<int32_t> item_slot(B), item_fresh(B), ks(d::kResolveChunk);
  d::WalkState st{a.num_keys[0], a.lru_next[a.S], a.lru_prev[a.S]};
  for (int64_t base = 0; base < B; base += d::kResolveChunk) {
    const int count = int(std::min<int64_t>(B - base, d::kResolveChunk));
    for (int i = 0; i < count; ++i) {
      const int64_t key = d::load_int(kb.data(), op.key_type, base + i);
      ks[i] = key >= 0 && key < a.V ? int32_t(key) : -1;
    }
    st = d::resolve_chunk(st, ks.data(), count, base, a.key_to_slot.data(), a.slot_key.data(), a.lru_prev.data(),
                          a.lru_next.data(), a.S, item_slot.data(), item_fresh.data());
  }
  a.num_keys[0] = st.n;
  const int G = a.G, P = a.P;
  std::vector<int32_t> tile(size_t(G) * P), nb(P), obuf(P);
  for (int64_t b = 0; b < B; ++b) {
    const int32_t slot = item_slot[b];
    if (slot < 0 || std::find(item_slot.begin(), item_slot.begin() + b, slot) != item_slot.begin() + b) continue;
    int32_t* g = &a.phrases[size_t(slot) * G * P];
    int32_t c = a.counts[slot];
    std::copy(g, g + size_t(c) * P, tile.begin());
    for (int64_t it = b; it < B; ++it) {
      if (item_slot[it] != slot) continue;
      if (item_fresh[it]) c = 0;
      for (int j = 0; j < P; ++j) {
        nb[j] = d::to_i32(d::load_int(pb.data(), op.phrase_type, it * P + j));
        if (!op.old.empty()) obuf[j] = d::to_i32(d::load_int(ob.data(), op.old_type, it * P + j));
      }
      c = d::apply_item(d::SerialLanes{}, tile.data(), c, G, P, nb.data(), op.old.empty() ? nullptr : obuf.data());
    }
    std::copy(tile.begin(), tile.begin() + size_t(c) * P, g);
    a.counts[slot] = c;
  }
}

const Config kConfigs[] = {
    // name, V, S, G, P, alphabet, max_batch, steps
    {"evicting", 10, 4, 3, 2, 3, 6, 400},
    {"roomy", 8, 8, 4, 3, 2, 5, 300},
    {"g1", 6, 3, 1, 1, 3, 4, 300},
    {"one-slot", 5, 1, 2, 2, 2, 4, 300},
    {"engine", 1000, 50, 20, 6, 4, 160, 200},
    {"wide", 64, 16, 40, 37, 2, 40, 150},
    {"long-batch", 5000, 300, 5, 3, 3, 2600, 12},
};

bool run_host(bool quick, bool verbose) {
  bool ok = true;
  uint32_t seed = 1;
  for (const Config& c : kConfigs) {
    const int steps = quick ? std::max(4, c.steps / 10) : c.steps;
    Model m(c.V, c.S, c.G, c.P);
    Arrays a(c.V, c.S, c.G, c.P);
    int step = 0;
    std::string why;
    for (const Op& op : random_ops(c, seed++, steps)) {
      ++step;
      if (op.lookup) continue;  // lookups are a pure gather: checked on the GPU
      apply_model(m, op);
      host_insert(a, op);
      why = compare(m, a);
      if (!why.empty()) break;
    }
    std::printf("host  %-11s V=%d S=%d G=%d P=%d: %s%s\n", c.name, c.V, c.S, c.G, c.P, why.empty() ? "ok" : "FAIL ",
                why.empty() ? "" : (why + " at step " + std::to_string(step)).c_str());
    ok = ok && why.empty();
    (void)verbose;
  }
  return ok;
}

// ---- the GPU kernels -----------------------------------------------------------------------------------------------
struct DevicePool {
  NgramPool p;
  int V, S, G, P;
  DevicePool(int v, int s, int g, int pl) : V(v), S(s), G(g), P(pl) {
    Arrays a(v, s, g, pl);
    upload(a);
  }
  template <class T>
  static T* dup(const std::vector<T>& h) {
    T* d = nullptr;
    CUDA_OK(cudaMalloc(&d, h.size() * sizeof(T)));
    CUDA_OK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
    return d;
  }
  void upload(Arrays& a) {
    p.key_to_slot = dup(a.key_to_slot);
    p.slot_key = dup(a.slot_key);
    p.counts = dup(a.counts);
    p.phrases = dup(a.phrases);
    p.lru_prev = dup(a.lru_prev);
    p.lru_next = dup(a.lru_next);
    p.num_keys = dup(a.num_keys);
    p.vocab_size = V, p.num_slots = S, p.guess_set = G, p.phrase_len = P;
  }
  Arrays download() const {
    Arrays a(V, S, G, P);
    auto get = [](std::vector<int32_t>& h, const int32_t* d) {
      CUDA_OK(cudaMemcpy(h.data(), d, h.size() * sizeof(int32_t), cudaMemcpyDeviceToHost));
    };
    get(a.key_to_slot, p.key_to_slot);
    get(a.slot_key, p.slot_key);
    get(a.counts, p.counts);
    get(a.phrases, p.phrases);
    get(a.lru_prev, p.lru_prev);
    get(a.lru_next, p.lru_next);
    get(a.num_keys, p.num_keys);
    return a;
  }
  ~DevicePool() {
    cudaFree(p.key_to_slot), cudaFree(p.slot_key), cudaFree(p.counts), cudaFree(p.phrases);
    cudaFree(p.lru_prev), cudaFree(p.lru_next), cudaFree(p.num_keys);
  }
};

void* dev_bytes(const std::vector<uint8_t>& h) {
  void* d = nullptr;
  CUDA_OK(cudaMalloc(&d, std::max<size_t>(h.size(), 1)));
  CUDA_OK(cudaMemcpy(d, h.data(), h.size(), cudaMemcpyHostToDevice));
  return d;
}

std::string check_lookup(Model& m, const Op& op, const std::vector<int64_t>& out, const std::vector<uint8_t>& valid) {
  const int P = m.P, k = op.k;
  for (size_t b = 0; b < op.keys.size(); ++b) {
    const std::vector<Phrase> want = m.lookup(as_typed(op.keys[b], op.key_type), k);
    for (int i = 0; i < k; ++i) {
      const bool v = i < int(want.size());
      if (bool(valid[b * k + i]) != v) return "valid[" + std::to_string(b) + "][" + std::to_string(i) + "]";
      for (int j = 0; j < P; ++j)
        if (out[(b * k + i) * P + j] != (v ? want[i][j] : 0))
          return "phrases[" + std::to_string(b) + "][" + std::to_string(i) + "][" + std::to_string(j) + "]";
    }
  }
  return "";
}

bool run_device(bool quick, bool verbose) {
  bool ok = true;
  uint32_t seed = 1;
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  int64_t* d_stats = nullptr;
  CUDA_OK(cudaMalloc(&d_stats, 2 * sizeof(int64_t)));
  for (const Config& c : kConfigs) {
    const int steps = quick ? std::max(4, c.steps / 10) : c.steps;
    Model m(c.V, c.S, c.G, c.P);
    DevicePool dp(c.V, c.S, c.G, c.P);
    CUDA_OK(cudaMemset(d_stats, 0, 2 * sizeof(int64_t)));
    int step = 0;
    std::string why;
    for (const Op& op : random_ops(c, seed++, steps)) {
      ++step;
      const int64_t B = int64_t(op.keys.size());
      void* keys = dev_bytes(pack(op.keys, op.key_type));
      if (op.lookup) {
        int64_t* out = nullptr;
        bool* valid = nullptr;
        CUDA_OK(cudaMalloc(&out, std::max<size_t>(size_t(B) * op.k * c.P, 1) * sizeof(int64_t)));
        CUDA_OK(cudaMalloc(&valid, std::max<size_t>(size_t(B) * op.k, 1)));
        CUDA_OK(cudaMemsetAsync(out, 0x7f, std::max<size_t>(size_t(B) * op.k * c.P, 1) * sizeof(int64_t), stream));
        CUDA_OK(ouroboros::ngram_lookup(dp.p, keys, op.key_type, B, op.k, out, valid, d_stats, stream));
        CUDA_OK(cudaStreamSynchronize(stream));
        std::vector<int64_t> h_out(size_t(B) * op.k * c.P);
        std::vector<uint8_t> h_valid(size_t(B) * op.k);
        CUDA_OK(cudaMemcpy(h_out.data(), out, h_out.size() * sizeof(int64_t), cudaMemcpyDeviceToHost));
        CUDA_OK(cudaMemcpy(h_valid.data(), valid, h_valid.size(), cudaMemcpyDeviceToHost));
        why = check_lookup(m, op, h_out, h_valid);
        int64_t st[2];
        CUDA_OK(cudaMemcpy(st, d_stats, sizeof st, cudaMemcpyDeviceToHost));
        if (why.empty() && (st[0] != m.lookups || st[1] != m.hits))
          why = "stats (" + std::to_string(st[0]) + ", " + std::to_string(st[1]) + ") != (" +
                std::to_string(m.lookups) + ", " + std::to_string(m.hits) + ")";
        cudaFree(out), cudaFree(valid);
      } else {
        void* ph = dev_bytes(pack(op.phrases, op.phrase_type));
        void* old = op.old.empty() ? nullptr : dev_bytes(pack(op.old, op.old_type));
        const size_t ws_bytes = ouroboros::ngram_insert_workspace_bytes(B);
        void* ws = nullptr;
        CUDA_OK(cudaMalloc(&ws, ws_bytes));
        CUDA_OK(ouroboros::ngram_insert(dp.p, keys, op.key_type, ph, op.phrase_type, old, op.old_type, B, ws,
                                        ws_bytes, stream));
        CUDA_OK(cudaStreamSynchronize(stream));
        apply_model(m, op);
        why = compare(m, dp.download());
        cudaFree(ph), cudaFree(ws);
        if (old) cudaFree(old);
      }
      cudaFree(keys);
      if (!why.empty()) break;
    }
    std::printf("gpu   %-11s V=%d S=%d G=%d P=%d: %s%s\n", c.name, c.V, c.S, c.G, c.P, why.empty() ? "ok" : "FAIL ",
                why.empty() ? "" : (why + " at step " + std::to_string(step)).c_str());
    ok = ok && why.empty();
  }
  (void)verbose;
  CUDA_OK(cudaFree(d_stats));
  CUDA_OK(cudaStreamDestroy(stream));
  return ok;
}

// One drafting step captured in a CUDA graph (insert a fixed batch of W n-grams, then look up one key), replayed
// with new inputs copied into the captured buffers.
bool run_graph(bool quick) {
  const int V = 1000, S = 50, G = 20, P = 6, W = 20, replays = quick ? 10 : 60;
  DevicePool dp(V, S, G, P);
  Model m(V, S, G, P);
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  int64_t *keys, *phrases, *look, *out, *stats;
  bool* valid;
  void* ws;
  const size_t ws_bytes = ouroboros::ngram_insert_workspace_bytes(W);
  CUDA_OK(cudaMalloc(&keys, W * sizeof(int64_t)));
  CUDA_OK(cudaMalloc(&phrases, W * P * sizeof(int64_t)));
  CUDA_OK(cudaMalloc(&look, sizeof(int64_t)));
  CUDA_OK(cudaMalloc(&out, G * P * sizeof(int64_t)));
  CUDA_OK(cudaMalloc(&stats, 2 * sizeof(int64_t)));
  CUDA_OK(cudaMalloc(&valid, G));
  CUDA_OK(cudaMalloc(&ws, ws_bytes));
  CUDA_OK(cudaMemset(stats, 0, 2 * sizeof(int64_t)));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  CUDA_OK(ouroboros::ngram_insert(dp.p, keys, IntType::kInt64, phrases, IntType::kInt64, nullptr, IntType::kInt64, W,
                                  ws, ws_bytes, stream));
  CUDA_OK(ouroboros::ngram_lookup(dp.p, look, IntType::kInt64, 1, G, out, valid, stats, stream));
  CUDA_OK(cudaStreamEndCapture(stream, &graph));
  CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
  std::mt19937 rng(99);
  std::string why;
  for (int r = 0; r < replays && why.empty(); ++r) {
    std::vector<int64_t> hk(W), hp(W * P), hl(1);
    for (auto& x : hk) x = rng() % 120;
    for (auto& x : hp) x = rng() % 4;
    hl[0] = hk[rng() % W];
    CUDA_OK(cudaMemcpyAsync(keys, hk.data(), W * sizeof(int64_t), cudaMemcpyHostToDevice, stream));
    CUDA_OK(cudaMemcpyAsync(phrases, hp.data(), W * P * sizeof(int64_t), cudaMemcpyHostToDevice, stream));
    CUDA_OK(cudaMemcpyAsync(look, hl.data(), sizeof(int64_t), cudaMemcpyHostToDevice, stream));
    CUDA_OK(cudaGraphLaunch(exec, stream));
    CUDA_OK(cudaStreamSynchronize(stream));
    Op op;
    op.keys = hk, op.phrases = hp;
    apply_model(m, op);
    std::vector<int64_t> h_out(G * P);
    std::vector<uint8_t> h_valid(G);
    CUDA_OK(cudaMemcpy(h_out.data(), out, h_out.size() * sizeof(int64_t), cudaMemcpyDeviceToHost));
    CUDA_OK(cudaMemcpy(h_valid.data(), valid, G, cudaMemcpyDeviceToHost));
    Op lk;
    lk.lookup = true, lk.keys = hl, lk.k = G;
    why = check_lookup(m, lk, h_out, h_valid);
    if (why.empty()) why = compare(m, dp.download());
  }
  int64_t st[2];
  CUDA_OK(cudaMemcpy(st, stats, sizeof st, cudaMemcpyDeviceToHost));
  if (why.empty() && (st[0] != m.lookups || st[1] != m.hits)) why = "stats";
  std::printf("graph insert(W=%d)+lookup, %d replays: %s%s\n", W, replays, why.empty() ? "ok" : "FAIL ", why.c_str());
  CUDA_OK(cudaGraphExecDestroy(exec));
  CUDA_OK(cudaGraphDestroy(graph));
  cudaFree(keys), cudaFree(phrases), cudaFree(look), cudaFree(out), cudaFree(stats), cudaFree(valid), cudaFree(ws);
  CUDA_OK(cudaStreamDestroy(stream));
  return why.empty();
}

// Kernel-only timings of one drafting step (SPEC §4 settings: G=20, N=7; V=152064, S=16384), pool pre-filled.
void bench() {
  const int V = 152064, S = 16384, G = 20, P = 6;
  DevicePool dp(V, S, G, P);
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  std::mt19937 rng(5);
  const int max_b = 4096;
  int64_t *keys, *phrases, *out, *stats;
  bool* valid;
  void* ws;
  CUDA_OK(cudaMalloc(&keys, max_b * sizeof(int64_t)));
  CUDA_OK(cudaMalloc(&phrases, size_t(max_b) * P * sizeof(int64_t)));
  CUDA_OK(cudaMalloc(&out, size_t(G) * P * sizeof(int64_t)));
  CUDA_OK(cudaMalloc(&valid, G));
  CUDA_OK(cudaMalloc(&stats, 2 * sizeof(int64_t)));
  CUDA_OK(cudaMalloc(&ws, ouroboros::ngram_insert_workspace_bytes(max_b)));
  std::vector<int64_t> hk(max_b), hp(size_t(max_b) * P);
  auto zipf = [&]() { return int64_t(std::min<double>(V - 1, std::pow(double(rng() % 1000000 + 1) / 1e6, -1.2))); };
  for (int fill = 0; fill < 60; ++fill) {  // pre-fill: 60 x 4096 Zipf-ish n-grams
    for (auto& x : hk) x = zipf();
    for (auto& x : hp) x = zipf();
    CUDA_OK(cudaMemcpy(keys, hk.data(), hk.size() * 8, cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemcpy(phrases, hp.data(), hp.size() * 8, cudaMemcpyHostToDevice));
    CUDA_OK(ouroboros::ngram_insert(dp.p, keys, IntType::kInt64, phrases, IntType::kInt64, nullptr, IntType::kInt64,
                                    max_b, ws, ouroboros::ngram_insert_workspace_bytes(max_b), stream));
  }
  CUDA_OK(cudaStreamSynchronize(stream));
  cudaEvent_t e0, e1;
  CUDA_OK(cudaEventCreate(&e0));
  CUDA_OK(cudaEventCreate(&e1));
  for (int b : {1, 20, 160, 1024}) {
    for (int mode = 0; mode < 3; ++mode) {  // 0: insert, 1: lookup (k = G), 2: both in a graph
      auto step = [&]() {
        if (mode != 1)
          CUDA_OK(ouroboros::ngram_insert(dp.p, keys, IntType::kInt64, phrases, IntType::kInt64, nullptr,
                                          IntType::kInt64, b, ws, ouroboros::ngram_insert_workspace_bytes(b), stream));
        if (mode != 0) CUDA_OK(ouroboros::ngram_lookup(dp.p, keys, IntType::kInt64, 1, G, out, valid, stats, stream));
      };
      cudaGraphExec_t exec = nullptr;
      cudaGraph_t graph = nullptr;
      if (mode == 2) {
        CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
        step();
        CUDA_OK(cudaStreamEndCapture(stream, &graph));
        CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
      }
      const int iters = 200;
      auto run_once = [&]() {
        if (mode == 2) CUDA_OK(cudaGraphLaunch(exec, stream));
        else step();
      };
      for (int w = 0; w < 10; ++w) run_once();
      CUDA_OK(cudaEventRecord(e0, stream));
      for (int i = 0; i < iters; ++i) run_once();
      CUDA_OK(cudaEventRecord(e1, stream));
      CUDA_OK(cudaEventSynchronize(e1));
      float ms = 0.f;
      CUDA_OK(cudaEventElapsedTime(&ms, e0, e1));
      static const char* names[] = {"insert", "lookup(k=20)", "insert+lookup graph"};
      std::printf("bench (ngram) B=%-5d %-20s %8.2f us/step\n", b, names[mode], 1000.f * ms / iters);
      if (exec) {
        CUDA_OK(cudaGraphExecDestroy(exec));
        CUDA_OK(cudaGraphDestroy(graph));
      }
    }
  }
  CUDA_OK(cudaEventDestroy(e0));
  CUDA_OK(cudaEventDestroy(e1));
  cudaFree(keys), cudaFree(phrases), cudaFree(out), cudaFree(valid), cudaFree(stats), cudaFree(ws);
  CUDA_OK(cudaStreamDestroy(stream));
}

}  // namespace

int main(int argc, char** argv) {
  bool host_only = false, quick = false, verbose = false, do_bench = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--host") == 0) host_only = true;
    else if (std::strcmp(argv[i], "--quick") == 0) quick = true;
    else if (std::strcmp(argv[i], "--verbose") == 0) verbose = true;
    else if (std::strcmp(argv[i], "--bench") == 0) do_bench = true;
    else {
      std::fprintf(stderr, "usage: %s [--host] [--quick] [--verbose] [--bench]\n", argv[0]);
      return 2;
    }
  }
  const bool host_ok = run_host(quick, verbose);
  std::printf("ngram_selftest: host run of the kernel logic %s\n", host_ok ? "passed" : "FAILED");
  if (host_only || !host_ok) return host_ok ? 0 : 1;
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    std::fprintf(stderr, "ngram_selftest: no usable CUDA device (%s); the GPU part needs one (--host runs without)\n",
                 err != cudaSuccess ? cudaGetErrorString(err) : "device count is 0");
    return 2;
  }
  cudaDeviceProp prop;
  CUDA_OK(cudaGetDeviceProperties(&prop, 0));
  std::printf("ngram_selftest: %s (sm_%d%d)%s\n", prop.name, prop.major, prop.minor, quick ? ", quick subset" : "");
  bool ok = run_device(quick, verbose);
  ok = run_graph(quick) && ok;
  std::printf("ngram_selftest: GPU run %s\n", ok ? "passed" : "FAILED");
  if (do_bench && ok) bench();
  return ok ? 0 : 1;
}
