#include "kernels/dense_mask.h"

#include <gtest/gtest.h>

#include "kernels/tests/test_support.h"

namespace cpharness::kernels {
namespace {

torch::Tensor ids(std::vector<int64_t> v) { return torch::tensor(v, torch::kInt64).view({1, -1}); }

TEST(DenseMask, SlidingWindowKeepsWKeysIncludingSelf) {
  // W = 3: query 5 sees keys 3, 4, 5 and nothing earlier (q - k < W, strict).
  auto m = dense_mask(TokenMetadata{}, LayerGeometry{true, 3, false}, 1, 8);
  EXPECT_TRUE(m[0][5][3].item<bool>());
  EXPECT_TRUE(m[0][5][5].item<bool>());
  EXPECT_FALSE(m[0][5][2].item<bool>());
  EXPECT_FALSE(m[0][5][6].item<bool>());
  EXPECT_EQ(m[0][5].sum().item<int64_t>(), 3);
}

TEST(DenseMask, CausalIsLowerTriangleWithDiagonal) {
  auto m = dense_mask(TokenMetadata{}, LayerGeometry{}, 2, 4);
  EXPECT_EQ(m.sizes(), (std::vector<int64_t>{2, 4, 4}));
  EXPECT_TRUE(torch::equal(m[1], torch::ones({4, 4}, torch::kBool).tril()));
}

TEST(DenseMask, NonCausalAllowsEverything) {
  auto m = dense_mask(TokenMetadata{}, LayerGeometry{false, std::nullopt, false}, 1, 5);
  EXPECT_TRUE(m.all().item<bool>());
}

TEST(DenseMask, GlobalOffsetsShiftTheCausalTerm) {
  // q start 4, kv start 0, 2 x 2: every key precedes every query.
  auto m = dense_mask(TokenMetadata{}, TokenMetadata{}, {4, 2}, {0, 2}, LayerGeometry{}, 1);
  EXPECT_TRUE(m.all().item<bool>());
  // q start 0, kv start 4: every key is in the future.
  m = dense_mask(TokenMetadata{}, TokenMetadata{}, {0, 2}, {4, 2}, LayerGeometry{}, 1);
  EXPECT_FALSE(m.any().item<bool>());
}

TEST(DenseMask, DocumentsBlockCrossDocumentAndPadDocRows) {
  TokenMetadata meta;
  meta.document_ids = ids({1, 1, 2, 2, 0});
  auto m = dense_mask(meta, LayerGeometry{}, 1, 5);
  EXPECT_TRUE(m[0][1][0].item<bool>());
  EXPECT_FALSE(m[0][2][1].item<bool>());  // other document
  EXPECT_TRUE(m[0][3][2].item<bool>());
  EXPECT_FALSE(m[0][4].any().item<bool>());  // document 0: an empty row
}

TEST(DenseMask, KeyPaddingBlocksColumnsOnly) {
  TokenMetadata meta;
  meta.padding = torch::tensor({false, true, false}, torch::kBool).view({1, -1});
  auto m = dense_mask(meta, LayerGeometry{}, 1, 3);
  EXPECT_FALSE(m.select(2, 1).any().item<bool>());
  EXPECT_TRUE(m[0][1][0].item<bool>());  // a padding query still sees earlier real keys (no query term)
  EXPECT_TRUE(m[0][2][2].item<bool>());
}

// transformers >= 5.13 (gemma4-spec 3.4): (causal OR same group) AND window; 5.5 .. 5.12 let a group see itself beyond
// the window (a golden from those versions with a group longer than W disagrees with this rule, by version). The flag
// is the layer's: on a layer with no window it reads causal OR same group (transformers 5.9 .. 5.12's full layers);
// Gemma4's own full layers stay causal because the model does not set it there (model::layer_geometry).
TEST(DenseMask, VisionGroupsSeeEachOtherWhereTheFlagIsSetAndWithinDocuments) {
  TokenMetadata meta;
  meta.vision_group_ids = ids({-1, 0, 0, 0, -1});
  auto sliding = dense_mask(meta, LayerGeometry{true, 2, true}, 1, 5);
  EXPECT_TRUE(sliding[0][1][3].item<bool>());   // future key of the same image, W or more ahead
  EXPECT_FALSE(sliding[0][3][1].item<bool>());  // W back, same image: the group relaxes causality, not the window
  EXPECT_TRUE(sliding[0][3][2].item<bool>());
  EXPECT_FALSE(sliding[0][0][1].item<bool>());  // text never sees ahead
  auto global = dense_mask(meta, LayerGeometry{true, std::nullopt, true}, 1, 5);
  EXPECT_TRUE(global[0][1][3].item<bool>());   // no window: the group sees ahead at any distance
  EXPECT_TRUE(global[0][3][1].item<bool>());
  EXPECT_FALSE(global[0][0][1].item<bool>());  // text stays causal
  EXPECT_FALSE(global[0][3][4].item<bool>());
  EXPECT_FALSE(dense_mask(meta, LayerGeometry{true, std::nullopt, false}, 1, 5)[0][1][3].item<bool>());
  auto flag_off = dense_mask(meta, LayerGeometry{true, 2, false}, 1, 5);
  EXPECT_FALSE(flag_off[0][1][3].item<bool>());
  meta.document_ids = ids({1, 1, 1, 2, 2});
  auto docs = dense_mask(meta, LayerGeometry{true, 2, true}, 1, 5);
  EXPECT_FALSE(docs[0][1][3].item<bool>());  // image edges never cross documents
  EXPECT_TRUE(docs[0][1][2].item<bool>());
}

// The 5.5 .. 5.12 rule (vision_group_past_window): (causal AND window) OR same group, so a group sees itself at any
// distance, while text keeps the window; with no window it reads as the other rule.
TEST(DenseMask, VisionGroupsPastTheWindowFollowTheOlderRule) {
  TokenMetadata meta;
  meta.vision_group_ids = ids({-1, 0, 0, 0, 0, -1});
  LayerGeometry older{true, 2, true};
  older.vision_group_past_window = true;
  auto sliding = dense_mask(meta, older, 1, 6);
  EXPECT_TRUE(sliding[0][4][1].item<bool>());   // 3 back, same image: past the window under this rule
  EXPECT_TRUE(sliding[0][1][4].item<bool>());   // ahead, same image
  EXPECT_FALSE(sliding[0][5][2].item<bool>());  // text 3 back: the window holds
  EXPECT_TRUE(sliding[0][5][4].item<bool>());
  EXPECT_FALSE(sliding[0][0][1].item<bool>());  // text never sees ahead
  LayerGeometry older_full{true, std::nullopt, true};
  older_full.vision_group_past_window = true;
  LayerGeometry newer_full{true, std::nullopt, true};
  EXPECT_TRUE(torch::equal(dense_mask(meta, older_full, 1, 6), dense_mask(meta, newer_full, 1, 6)));
  meta.document_ids = ids({1, 1, 1, 2, 2, 2});
  EXPECT_FALSE(dense_mask(meta, older, 1, 6)[0][4][1].item<bool>());  // never across documents
}

TEST(DenseMask, AtArbitraryIndicesMatchesTheRangeForm) {
  auto c = testing::random_mask_config(7);
  auto full = dense_mask(c.meta, c.geometry, c.batch, c.seq_len);
  auto qi = torch::tensor({int64_t(0), c.seq_len - 1, c.seq_len / 2}, torch::kInt64);
  auto ki = torch::tensor({c.seq_len / 3, int64_t(0), c.seq_len - 1}, torch::kInt64);
  auto gather = [](const TokenMetadata& m, const torch::Tensor& i) {
    auto g = [&](const torch::Tensor& t) { return t.defined() ? t.index_select(1, i) : t; };
    return TokenMetadata{g(m.document_ids), g(m.padding), g(m.vision_group_ids)};
  };
  auto at = dense_mask_at(gather(c.meta, qi), gather(c.meta, ki), qi, ki, c.geometry, c.batch);
  EXPECT_TRUE(torch::equal(at, full.index_select(1, qi).index_select(2, ki)));
}

// Property: the mask of any (q range, kv range) with sliced metadata is that slice of the global mask.
TEST(DenseMask, AnyRangePairIsTheSliceOfTheGlobalMask_1200Seeds) {
  for (uint64_t seed = 0; seed < 1200; ++seed) {
    auto c = testing::random_mask_config(1000 + seed, 200);
    auto global = dense_mask(c.meta, c.geometry, c.batch, c.seq_len);
    auto local = dense_mask(c.meta.slice(c.q_range.start, c.q_range.length),
                            c.meta.slice(c.kv_range.start, c.kv_range.length), c.q_range, c.kv_range, c.geometry,
                            c.batch);
    auto expect = global.narrow(1, c.q_range.start, c.q_range.length).narrow(2, c.kv_range.start, c.kv_range.length);
    ASSERT_TRUE(torch::equal(local, expect)) << "seed " << seed << ": " << c.describe();
  }
}

TEST(DenseMask, MetadataSliceKeepsUndefinedTensors) {
  TokenMetadata meta;
  meta.document_ids = ids({1, 1, 2, 2});
  auto s = meta.slice(1, 2);
  EXPECT_TRUE(torch::equal(s.document_ids, ids({1, 2})));
  EXPECT_FALSE(s.padding.defined());
  EXPECT_FALSE(s.vision_group_ids.defined());
  EXPECT_FALSE(mask_depends_on_batch(TokenMetadata{}, TokenMetadata{}));
  EXPECT_TRUE(mask_depends_on_batch(meta, TokenMetadata{}));
}

}  // namespace
}  // namespace cpharness::kernels
