#include "kernels/block_mask.h"

#include <gtest/gtest.h>

#include "kernels/block_mask_builder.h"
#include "kernels/dense_mask.h"
#include "kernels/tests/test_support.h"

namespace cpharness::kernels {
namespace {

BlockMask analytic(const testing::MaskConfig& c) {
  return build_block_mask(c.meta.slice(c.q_range.start, c.q_range.length),
                          c.meta.slice(c.kv_range.start, c.kv_range.length), c.q_range, c.kv_range, c.geometry, c.batch,
                          c.q_block, c.kv_block);
}
BlockMask brute(const testing::MaskConfig& c) {
  return build_block_mask_brute_force(c.meta.slice(c.q_range.start, c.q_range.length),
                                      c.meta.slice(c.kv_range.start, c.kv_range.length), c.q_range, c.kv_range,
                                      c.geometry, c.batch, c.q_block, c.kv_block);
}

TEST(BlockMask, CausalTilesAreFullBelowPartialOnAndEmptyAboveTheDiagonal) {
  auto m = build_block_mask(TokenMetadata{}, TokenMetadata{}, {0, 10}, {0, 10}, LayerGeometry{}, 3, 4, 4);
  EXPECT_EQ(m.batch, 1);  // no metadata: one row serves every batch element
  EXPECT_EQ(m.num_q_blocks(), 3);
  EXPECT_EQ(m.q_block_len(2), 2);
  auto cls = block_classes(m)[0];
  // Row 2 is the short tile [8, 10) against kv tile [8, 10): q - k spans [-1, 1] -> partial.
  auto expect = torch::tensor({1, 0, 0, 2, 1, 0, 2, 2, 1}, torch::kUInt8).view({3, 3});
  EXPECT_TRUE(torch::equal(cls, expect));
  EXPECT_TRUE(torch::equal(m.full_kv_num_blocks[0], torch::tensor({0, 1, 2}, torch::kInt32)));
  EXPECT_TRUE(torch::equal(m.full_kv_indices[0], torch::tensor({0, 0, 0, 0, 0, 1}, torch::kInt32).view({3, 2})));
  EXPECT_TRUE(torch::equal(m.q_num_blocks[0], torch::tensor({1, 1, 1}, torch::kInt32)));
  EXPECT_TRUE(torch::equal(m.full_q_num_blocks[0], torch::tensor({2, 1, 0}, torch::kInt32)));
  EXPECT_TRUE(torch::equal(m.full_q_indices[0], torch::tensor({1, 2, 2, 0, 0, 0}, torch::kInt32).view({3, 2})));
  EXPECT_TRUE(torch::equal(block_classes(m, true), block_classes(m)));
  EXPECT_EQ(computed_score_elements(m), 16 + (16 + 16) + (8 + 8 + 4));
  EXPECT_FALSE(block_mask_mismatch(m, build_block_mask_brute_force(TokenMetadata{}, TokenMetadata{}, {0, 10}, {0, 10},
                                                                    LayerGeometry{}, 3, 4, 4)));
}

TEST(BlockMask, SlidingWindowKeepsABandOfTiles) {
  // S = 16, tiles of 4, W = 5: q tile 3 ([12, 16)) reaches back to key 8 -> kv tiles 2 (partial), 3 (partial).
  auto m = build_block_mask(TokenMetadata{}, TokenMetadata{}, {0, 16}, {0, 16}, LayerGeometry{true, 5, false}, 1, 4, 4);
  auto cls = block_classes(m)[0];
  EXPECT_TRUE(torch::equal(cls[3], torch::tensor({0, 0, 1, 1}, torch::kUInt8)));
  // W = 8: q tile 3 sees [5, 15] and more -> tile 1 partial, tile 2 full, tile 3 partial.
  m = build_block_mask(TokenMetadata{}, TokenMetadata{}, {0, 16}, {0, 16}, LayerGeometry{true, 8, false}, 1, 4, 4);
  EXPECT_TRUE(torch::equal(block_classes(m)[0][3], torch::tensor({0, 1, 2, 1}, torch::kUInt8)));
}

TEST(BlockMask, AllPaddingChunkIsEmptyAndDocumentsSplitTiles) {
  TokenMetadata meta;
  meta.padding = torch::zeros({1, 16}, torch::kBool);
  meta.padding.narrow(1, 8, 8).fill_(true);
  meta.document_ids = torch::tensor({1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2}, torch::kInt64).view({1, -1});
  auto m = build_block_mask(meta.slice(8, 8), meta.slice(8, 8), {8, 8}, {8, 8}, LayerGeometry{}, 1, 4, 4);
  EXPECT_EQ(m.kv_num_blocks.sum().item<int64_t>() + m.full_kv_num_blocks.sum().item<int64_t>(), 0);
  m = build_block_mask(meta.slice(0, 8), meta.slice(0, 8), {0, 8}, {0, 8}, LayerGeometry{}, 1, 4, 4);
  // q tile 1 = docs {1,1,2,2} vs kv tile 0 = doc 1: rows of doc 1 see all of it, rows of doc 2 nothing.
  EXPECT_EQ(block_classes(m)[0][1][0].item<int64_t>(), kPartialBlock);
  EXPECT_EQ(block_classes(m)[0][0][0].item<int64_t>(), kPartialBlock);
}

TEST(BlockMask, VisionGroupMakesFutureTilesFull) {
  TokenMetadata meta;
  meta.vision_group_ids = torch::full({1, 12}, -1, torch::kInt64);
  meta.vision_group_ids.narrow(1, 4, 8).fill_(0);
  auto m = build_block_mask(meta, meta, {0, 12}, {0, 12}, LayerGeometry{true, 2, true}, 1, 4, 4);
  auto cls = block_classes(m)[0];
  EXPECT_EQ(cls[1][2].item<int64_t>(), kFullBlock);  // image tokens see the rest of their image
  EXPECT_EQ(cls[0][1].item<int64_t>(), kEmptyBlock);  // text sees no future
  EXPECT_FALSE(block_mask_mismatch(m, build_block_mask_brute_force(meta, meta, {0, 12}, {0, 12},
                                                                    LayerGeometry{true, 2, true}, 1, 4, 4)));
}

TEST(BlockMask, MismatchNamesTheFirstDifference) {
  auto a = build_block_mask(TokenMetadata{}, TokenMetadata{}, {0, 8}, {0, 8}, LayerGeometry{}, 1, 4, 4);
  auto b = build_block_mask(TokenMetadata{}, TokenMetadata{}, {0, 8}, {0, 8}, LayerGeometry{false, std::nullopt, false},
                            1, 4, 4);
  auto diff = block_mask_mismatch(a, b);
  ASSERT_TRUE(diff.has_value());
  EXPECT_NE(diff->find("kv_num_blocks"), std::string::npos) << *diff;
}

TEST(BlockMask, EmptyRangesGiveEmptyLists) {
  auto m = build_block_mask(TokenMetadata{}, TokenMetadata{}, {0, 0}, {0, 8}, LayerGeometry{}, 1, 4, 4);
  EXPECT_EQ(m.num_q_blocks(), 0);
  EXPECT_EQ(m.kv_num_blocks.numel(), 0);
  EXPECT_EQ(m.q_num_blocks.sizes(), (std::vector<int64_t>{1, 2}));
  EXPECT_FALSE(block_mask_mismatch(
      m, build_block_mask_brute_force(TokenMetadata{}, TokenMetadata{}, {0, 0}, {0, 8}, LayerGeometry{}, 1, 4, 4)));
}

// A block longer than the range is one tile of the whole range: both builders give what a block of exactly the
// range's length gives, without allocating block x block (2^40 overflowed the brute force's tile padding).
TEST(BlockMask, ABlockLongerThanTheRangeIsOneTileOfIt) {
  const int64_t huge = int64_t(1) << 40;
  const LayerGeometry window{true, 3, false};
  auto exact = block_classes(build_block_mask(TokenMetadata{}, TokenMetadata{}, {0, 10}, {0, 7}, window, 1, 10, 7));
  for (const bool brute_force : {false, true}) {
    SCOPED_TRACE(brute_force ? "brute force" : "analytic");
    auto m = brute_force ? build_block_mask_brute_force(TokenMetadata{}, TokenMetadata{}, {0, 10}, {0, 7}, window, 1, huge, huge)
                         : build_block_mask(TokenMetadata{}, TokenMetadata{}, {0, 10}, {0, 7}, window, 1, huge, huge);
    EXPECT_EQ(m.num_q_blocks(), 1);
    EXPECT_EQ(m.q_block_len(0), 10);
    EXPECT_TRUE(torch::equal(block_classes(m), exact));
  }
}

// Property: the analytic builder equals the brute-force builder exactly, lists and transposes, and the
// brute-force classes are the per-tile reduce of the dense mask.
TEST(BlockMask, AnalyticEqualsBruteForce_1500Seeds) {
  int64_t nonempty = 0, with_partial = 0, with_full = 0;
  for (uint64_t seed = 0; seed < 1500; ++seed) {
    auto c = testing::random_mask_config(seed);
    auto a = analytic(c);
    auto b = brute(c);
    auto diff = block_mask_mismatch(a, b);
    ASSERT_FALSE(diff.has_value()) << "seed " << seed << ": " << c.describe() << ": " << *diff;
    ASSERT_TRUE(torch::equal(block_classes(a, true), block_classes(a))) << "seed " << seed;
    nonempty += (a.kv_num_blocks.sum().item<int64_t>() + a.full_kv_num_blocks.sum().item<int64_t>()) > 0;
    with_partial += a.kv_num_blocks.sum().item<int64_t>() > 0;
    with_full += a.full_kv_num_blocks.sum().item<int64_t>() > 0;
  }
  // The generator must exercise every class, not just empty masks.
  EXPECT_GT(nonempty, 800);
  EXPECT_GT(with_partial, 600);
  EXPECT_GT(with_full, 400);
}

// Longer sequences with fewer tokens per tile boundary: exercises the run-skipping and bulk-full paths of the
// analytic builder (tiles of whole runs, band edges) more than the short configurations above.
TEST(BlockMask, AnalyticEqualsBruteForceOnLongSequences_200Seeds) {
  for (uint64_t seed = 0; seed < 200; ++seed) {
    auto c = testing::random_mask_config(30000 + seed, 1200);
    std::mt19937_64 rng(seed);
    if (testing::coin(rng, 0.5)) c.meta.padding = torch::Tensor();
    if (testing::coin(rng, 0.5)) c.meta.vision_group_ids = torch::Tensor();
    c.q_block = 8 << testing::uniform(rng, 0, 4);
    c.kv_block = testing::coin(rng, 0.7) ? c.q_block : 8 << testing::uniform(rng, 0, 4);
    auto diff = block_mask_mismatch(analytic(c), brute(c));
    ASSERT_FALSE(diff.has_value()) << "seed " << seed << ": " << c.describe() << ": " << *diff;
  }
}

TEST(BlockMask, BruteForceClassesAreTheTileReduceOfTheDenseMask) {
  for (uint64_t seed = 0; seed < 300; ++seed) {
    auto c = testing::random_mask_config(50000 + seed, 100);
    auto m = brute(c);
    if (m.batch * m.num_q_blocks() * m.num_kv_blocks() > 200) continue;  // element-wise loop below is slow
    auto dense = dense_mask(c.meta.slice(c.q_range.start, c.q_range.length),
                            c.meta.slice(c.kv_range.start, c.kv_range.length), c.q_range, c.kv_range, c.geometry,
                            c.batch);
    auto cls = block_classes(m);
    for (int64_t b = 0; b < m.batch; ++b)
      for (int64_t i = 0; i < m.num_q_blocks(); ++i)
        for (int64_t j = 0; j < m.num_kv_blocks(); ++j) {
          auto tile = dense[b].narrow(0, i * c.q_block, m.q_block_len(i)).narrow(1, j * c.kv_block, m.kv_block_len(j));
          const int64_t expect = tile.all().item<bool>() ? kFullBlock : tile.any().item<bool>() ? kPartialBlock : kEmptyBlock;
          ASSERT_EQ(cls[b][i][j].item<int64_t>(), expect) << "seed " << seed << " tile " << i << "," << j;
        }
  }
}

}  // namespace
}  // namespace cpharness::kernels
