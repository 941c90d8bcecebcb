#include "kernels/block_mask_cache.h"

#include "kernels/block_mask_builder.h"

namespace cpharness::kernels {

BlockMaskKey BlockMaskKey::make(const LayerGeometry& geometry, TokenRange q_range, TokenRange kv_range,
                                int64_t q_block, int64_t kv_block, int64_t batch, const c10::Device& device) {
  BlockMaskKey k;
  k.window = geometry.window;
  k.causal = geometry.causal;
  k.vision_bidirectional = geometry.vision_bidirectional;
  k.vision_group_past_window = geometry.vision_group_past_window;
  k.q_start = q_range.start;
  k.kv_start = kv_range.start;
  k.q_length = q_range.length;
  k.kv_length = kv_range.length;
  k.q_block = q_block;
  k.kv_block = kv_block;
  k.batch = batch;
  k.device_type = device.type();
  k.device_index = device.has_index() ? device.index() : -1;
  return k;
}

bool BlockMaskKey::operator==(const BlockMaskKey& o) const {
  return window == o.window && causal == o.causal && vision_bidirectional == o.vision_bidirectional &&
         vision_group_past_window == o.vision_group_past_window &&
         q_start == o.q_start && kv_start == o.kv_start && q_length == o.q_length && kv_length == o.kv_length &&
         q_block == o.q_block && kv_block == o.kv_block && batch == o.batch && device_type == o.device_type &&
         device_index == o.device_index;
}

size_t BlockMaskKeyHash::operator()(const BlockMaskKey& k) const {
  size_t h = 0;
  auto mix = [&](uint64_t v) { h ^= std::hash<uint64_t>()(v) + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2); };
  mix(k.window ? uint64_t(*k.window) : ~uint64_t(0));
  mix(uint64_t(k.causal) | uint64_t(k.vision_bidirectional) << 1 | uint64_t(k.vision_group_past_window) << 2);
  for (int64_t v : {k.q_start, k.kv_start, k.q_length, k.kv_length, k.q_block, k.kv_block, k.batch,
                    int64_t(k.device_type), k.device_index})
    mix(uint64_t(v));
  return h;
}

BlockMaskCache::BlockMaskCache(size_t capacity, bool enabled) : capacity_(capacity), enabled_(enabled) {
  TORCH_CHECK(capacity > 0, "block-mask cache capacity must be positive");
}

std::shared_ptr<const BlockMask> BlockMaskCache::lookup(uint64_t generation, const BlockMaskKey& key,
                                                        const Builder& build) {
  std::unique_lock<std::mutex> lock(mu_);
  ++counters_.lookups;
  if (generation_ != generation) {
    entries_.clear();
    order_.clear();
    generation_ = generation;
    ++counters_.resets;
  }
  if (enabled_) {
    auto it = entries_.find(key);
    if (it != entries_.end()) {
      ++counters_.hits;
      return it->second;
    }
  }
  ++counters_.builds;
  auto mask = std::make_shared<const BlockMask>(build());
  if (!enabled_) return mask;
  while (entries_.size() >= capacity_) {
    entries_.erase(order_.front());
    order_.pop_front();
    ++counters_.evictions;
  }
  entries_.emplace(key, mask);
  order_.push_back(key);
  return mask;
}

std::shared_ptr<const BlockMask> BlockMaskCache::lookup(uint64_t generation, const TokenMetadata& q_meta,
                                                        const TokenMetadata& kv_meta, TokenRange q_range,
                                                        TokenRange kv_range, const LayerGeometry& geometry,
                                                        int64_t batch, int64_t q_block, int64_t kv_block,
                                                        const c10::Device& device) {
  const auto key = BlockMaskKey::make(geometry, q_range, kv_range, q_block, kv_block, batch, device);
  return lookup(generation, key, [&] {
    return build_block_mask(q_meta, kv_meta, q_range, kv_range, geometry, batch, q_block, kv_block);
  });
}

BlockMaskCacheCounters BlockMaskCache::counters() const {
  std::lock_guard<std::mutex> lock(mu_);
  return counters_;
}

BlockMaskCacheCounters BlockMaskCache::take_counters() {
  std::lock_guard<std::mutex> lock(mu_);
  auto c = counters_;
  counters_ = {};
  return c;
}

void BlockMaskCache::reset_counters() {
  std::lock_guard<std::mutex> lock(mu_);
  counters_ = {};
}

void BlockMaskCache::set_enabled(bool enabled) {
  std::lock_guard<std::mutex> lock(mu_);
  enabled_ = enabled;
  if (!enabled_) {
    entries_.clear();
    order_.clear();
  }
}

bool BlockMaskCache::enabled() const {
  std::lock_guard<std::mutex> lock(mu_);
  return enabled_;
}

size_t BlockMaskCache::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return entries_.size();
}

std::optional<uint64_t> BlockMaskCache::generation() const {
  std::lock_guard<std::mutex> lock(mu_);
  return generation_;
}

void BlockMaskCache::clear() {
  std::lock_guard<std::mutex> lock(mu_);
  entries_.clear();
  order_.clear();
  generation_.reset();
}

}  // namespace cpharness::kernels
