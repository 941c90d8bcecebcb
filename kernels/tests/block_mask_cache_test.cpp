#include "kernels/block_mask_cache.h"

#include <gtest/gtest.h>

#include "kernels/block_mask_builder.h"

namespace cpharness::kernels {
namespace {

BlockMaskKey key(int64_t kv_start, std::optional<int64_t> window = std::nullopt) {
  return BlockMaskKey::make(LayerGeometry{true, window, false}, {0, 64}, {kv_start, 64}, 128, 128, 1,
                            c10::Device("cpu"));
}

// A builder that counts its calls and returns a trivially small mask.
struct CountingBuilder {
  int calls = 0;
  BlockMaskCache::Builder operator()() {
    return [this] {
      ++calls;
      return build_block_mask(TokenMetadata{}, TokenMetadata{}, {0, 4}, {0, 4}, LayerGeometry{}, 1, 4, 4);
    };
  }
};

TEST(BlockMaskCache, BuildsOnceThenHits) {
  BlockMaskCache cache;
  CountingBuilder builder;
  auto a = cache.lookup(1, key(0), builder());
  auto b = cache.lookup(1, key(0), builder());
  EXPECT_EQ(a.get(), b.get());
  EXPECT_EQ(builder.calls, 1);
  EXPECT_EQ(cache.counters(), (BlockMaskCacheCounters{2, 1, 1, 0, 1}));
}

TEST(BlockMaskCache, EveryGeometryScalarIsPartOfTheKey) {
  const auto base = key(0);
  std::vector<BlockMaskKey> variants(11, base);
  variants[0].window = 512;
  variants[1].causal = false;
  variants[2].vision_bidirectional = true;
  variants[3].q_start = 64;
  variants[4].kv_start = 64;
  variants[5].q_length = 65;
  variants[6].kv_length = 65;
  variants[7].q_block = 32;
  variants[8].kv_block = 32;
  variants[9].batch = 2;
  variants[10].device_index = 1;
  BlockMaskCache cache;
  CountingBuilder builder;
  cache.lookup(7, base, builder());
  for (const auto& v : variants) {
    EXPECT_FALSE(v == base);
    cache.lookup(7, v, builder());
  }
  EXPECT_EQ(builder.calls, 12);
  EXPECT_EQ(cache.size(), 12u);
  auto cuda = base;
  cuda.device_type = c10::DeviceType::CUDA;
  EXPECT_FALSE(cuda == base);
  EXPECT_EQ(BlockMaskKeyHash()(key(0)), BlockMaskKeyHash()(base));
}

TEST(BlockMaskCache, EvictsOldestInsertedAboveTheCap) {
  BlockMaskCache cache;  // default cap 256
  CountingBuilder builder;
  for (int64_t i = 0; i < 300; ++i) cache.lookup(1, key(i), builder());
  EXPECT_EQ(cache.size(), 256u);
  EXPECT_EQ(cache.counters(), (BlockMaskCacheCounters{300, 300, 0, 44, 1}));
  cache.lookup(1, key(299), builder());  // newest: still there
  cache.lookup(1, key(43), builder());   // 44th oldest: evicted
  EXPECT_EQ(cache.counters(), (BlockMaskCacheCounters{302, 301, 1, 45, 1}));
}

TEST(BlockMaskCache, FifoNotLru) {
  BlockMaskCache cache(3);
  CountingBuilder builder;
  for (int64_t i = 0; i < 3; ++i) cache.lookup(1, key(i), builder());
  cache.lookup(1, key(0), builder());  // a hit does not refresh key 0
  cache.lookup(1, key(3), builder());  // evicts key 0, the oldest inserted
  EXPECT_EQ(builder.calls, 4);
  cache.lookup(1, key(1), builder());
  EXPECT_EQ(builder.calls, 4);
  cache.lookup(1, key(0), builder());
  EXPECT_EQ(builder.calls, 5);
}

TEST(BlockMaskCache, ResetsOnlyOnANewGeneration) {
  BlockMaskCache cache;
  CountingBuilder builder;
  EXPECT_FALSE(cache.generation().has_value());
  cache.lookup(10, key(0), builder());
  cache.lookup(10, key(0), builder());  // same batch, e.g. backward: hit
  EXPECT_EQ(cache.counters().resets, 1);
  EXPECT_EQ(cache.size(), 1u);
  cache.lookup(11, key(0), builder());  // new batch: cleared, rebuilt
  EXPECT_EQ(cache.generation(), std::optional<uint64_t>(11));
  EXPECT_EQ(cache.counters(), (BlockMaskCacheCounters{3, 2, 1, 0, 2}));
  cache.lookup(10, key(0), builder());  // any change counts, also back to an older id
  EXPECT_EQ(cache.counters().resets, 3);
  EXPECT_EQ(builder.calls, 3);
}

// The stale-mask bug is expressible: a caller that keeps the generation across batches gets the old batch's
// mask; a new generation gives the right one.
TEST(BlockMaskCache, SameGenerationAcrossBatchesServesAStaleMask) {
  auto docs = [](std::vector<int64_t> v) {
    TokenMetadata m;
    m.document_ids = torch::tensor(v, torch::kInt64).view({1, -1});
    return m;
  };
  const auto batch1 = docs({1, 1, 1, 1, 2, 2, 2, 2}), batch2 = docs({1, 1, 1, 1, 1, 1, 1, 1});
  const LayerGeometry g{};
  BlockMaskCache cache;
  auto fresh2 = build_block_mask(batch2, batch2, {0, 8}, {0, 8}, g, 1, 4, 4);
  cache.lookup(1, batch1, batch1, {0, 8}, {0, 8}, g, 1, 4, 4);
  auto stale = cache.lookup(1, batch2, batch2, {0, 8}, {0, 8}, g, 1, 4, 4);
  EXPECT_TRUE(block_mask_mismatch(*stale, fresh2).has_value());
  auto right = cache.lookup(2, batch2, batch2, {0, 8}, {0, 8}, g, 1, 4, 4);
  EXPECT_FALSE(block_mask_mismatch(*right, fresh2).has_value());
}

// The upstream E4B count: 42 layers (2 layer types) x 2 ring chunks x 2 passes at cp2 = 168 lookups per
// step and rank; 4 distinct keys -> 4 builds, 164 hits, one reset per step. Uncached: 168 builds.
TEST(BlockMaskCache, ScriptedStepsGiveExactCounters) {
  const int64_t S_loc = 256, rank = 1;
  auto run_step = [&](BlockMaskCache& cache, uint64_t step) {
    for (int pass = 0; pass < 2; ++pass)
      for (int layer = 0; layer < 42; ++layer) {
        const bool sliding = layer % 6 != 5;
        const int64_t block = sliding ? 128 : 32;
        const LayerGeometry g{true, sliding ? std::optional<int64_t>(512) : std::nullopt, false};
        for (int64_t owner : {rank, rank - 1}) {
          auto k = BlockMaskKey::make(g, {rank * S_loc, S_loc}, {owner * S_loc, S_loc}, block, block, 2,
                                      c10::Device("cpu"));
          cache.lookup(step, k, [&] {
            return build_block_mask(TokenMetadata{}, TokenMetadata{}, {rank * S_loc, S_loc}, {owner * S_loc, S_loc},
                                    g, 2, block, block);
          });
        }
      }
  };
  BlockMaskCache cache;
  for (uint64_t step = 0; step < 3; ++step) {
    run_step(cache, step);
    EXPECT_EQ(cache.take_counters(), (BlockMaskCacheCounters{168, 4, 164, 0, 1})) << "step " << step;
  }
  EXPECT_EQ(cache.counters(), BlockMaskCacheCounters{});
  BlockMaskCache off(256, false);
  run_step(off, 0);
  EXPECT_EQ(off.counters(), (BlockMaskCacheCounters{168, 168, 0, 0, 1}));
  EXPECT_EQ(off.size(), 0u);
  off.set_enabled(true);
  run_step(off, 0);
  EXPECT_EQ(off.counters(), (BlockMaskCacheCounters{336, 172, 164, 0, 1}));
  off.reset_counters();
  EXPECT_EQ(off.counters(), BlockMaskCacheCounters{});
  off.clear();
  EXPECT_EQ(off.size(), 0u);
  EXPECT_FALSE(off.generation().has_value());
}

TEST(BlockMaskCache, ConvenienceLookupBuildsTheAnalyticMask) {
  TokenMetadata meta;
  meta.padding = torch::zeros({2, 40}, torch::kBool);
  meta.padding[1].narrow(0, 30, 10).fill_(true);
  BlockMaskCache cache;
  const LayerGeometry g{true, 9, false};
  auto m = cache.lookup(5, meta.slice(20, 20), meta.slice(0, 20), {20, 20}, {0, 20}, g, 2, 8, 8);
  auto expect = build_block_mask_brute_force(meta.slice(20, 20), meta.slice(0, 20), {20, 20}, {0, 20}, g, 2, 8, 8);
  EXPECT_FALSE(block_mask_mismatch(*m, expect).has_value());
}

}  // namespace
}  // namespace cpharness::kernels
