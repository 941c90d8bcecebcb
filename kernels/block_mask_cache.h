// The block-mask cache, as the upstream ring keeps it (cp-reference §2): keyed on geometry scalars only, never
// on tensor addresses; cleared when a new batch (generation) arrives; FIFO eviction above a cap; counters
// that the cache checks read per step. One instance per rank.
#pragma once
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <unordered_map>

#include "kernels/block_mask.h"

namespace cpharness::kernels {

struct BlockMaskKey {
  std::optional<int64_t> window;
  bool causal = true;
  bool vision_bidirectional = false;
  bool vision_group_past_window = false;
  int64_t q_start = 0, kv_start = 0, q_length = 0, kv_length = 0;
  int64_t q_block = 128, kv_block = 128;
  int64_t batch = 1;
  c10::DeviceType device_type = c10::DeviceType::CPU;
  int64_t device_index = -1;

  static BlockMaskKey make(const LayerGeometry& geometry, TokenRange q_range, TokenRange kv_range, int64_t q_block,
                           int64_t kv_block, int64_t batch, const c10::Device& device);
  bool operator==(const BlockMaskKey& o) const;
};

struct BlockMaskKeyHash {
  size_t operator()(const BlockMaskKey& k) const;
};

struct BlockMaskCacheCounters {
  int64_t lookups = 0;    // every request for a mask
  int64_t builds = 0;     // requests that ran the builder (misses, and every request when caching is off)
  int64_t hits = 0;       // requests answered from the cache
  int64_t evictions = 0;  // entries dropped by the FIFO cap
  int64_t resets = 0;     // clears caused by a new generation
  bool operator==(const BlockMaskCacheCounters& o) const {
    return lookups == o.lookups && builds == o.builds && hits == o.hits && evictions == o.evictions &&
           resets == o.resets;
  }
};

class BlockMaskCache {
 public:
  using Builder = std::function<BlockMask()>;
  static constexpr size_t kDefaultCapacity = 256;

  explicit BlockMaskCache(size_t capacity = kDefaultCapacity, bool enabled = true);

  // The mask for `key` in batch `generation`. The generation names the batch the caller is working on (a
  // step counter, a batch id); a generation different from the last one seen clears the cache first and
  // counts one reset (the very first generation too). Same generation, same key: a hit, so forward and
  // backward of one batch share masks. A caller that never changes the generation would get stale masks for
  // a new batch: that is the bug the cache checks must catch. When caching is off, every call builds and
  // nothing is stored (generations are still tracked and counted).
  std::shared_ptr<const BlockMask> lookup(uint64_t generation, const BlockMaskKey& key, const Builder& build);

  // Convenience: key from the arguments, build with build_block_mask() on a miss.
  std::shared_ptr<const BlockMask> lookup(uint64_t generation, const TokenMetadata& q_meta,
                                          const TokenMetadata& kv_meta, TokenRange q_range, TokenRange kv_range,
                                          const LayerGeometry& geometry, int64_t batch, int64_t q_block = 128,
                                          int64_t kv_block = 128, const c10::Device& device = c10::Device("cpu"));

  BlockMaskCacheCounters counters() const;
  // Returns the counters and zeroes them (entries and generation stay): read once per step.
  BlockMaskCacheCounters take_counters();
  void reset_counters();

  void set_enabled(bool enabled);
  bool enabled() const;
  size_t size() const;
  size_t capacity() const { return capacity_; }
  std::optional<uint64_t> generation() const;
  // Drops every entry and forgets the generation; counters untouched.
  void clear();

 private:
  mutable std::mutex mu_;
  size_t capacity_;
  bool enabled_;
  std::optional<uint64_t> generation_;
  std::unordered_map<BlockMaskKey, std::shared_ptr<const BlockMask>, BlockMaskKeyHash> entries_;
  std::deque<BlockMaskKey> order_;  // insertion order, oldest first
  BlockMaskCacheCounters counters_;
};

}  // namespace cpharness::kernels
