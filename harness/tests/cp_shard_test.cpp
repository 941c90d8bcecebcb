// Sharding properties with random lengths and cp sizes: padding rules, the label shift on the full sequence,
// 4D per-layer inputs, and exact unshard(shard(x)) == x through the global-index map.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>

#include "harness/cp/shard_plan.h"

namespace cpharness::cp {
namespace {

// Where local token i of rank r belongs, written from the layouts' definitions (not from the plan).
int64_t layout_oracle(Sharding sharding, int r, int cp, int64_t local_len, int64_t i) {
  if (sharding == Sharding::kContiguous) return r * local_len + i;
  const int64_t half = local_len / 2;  // 2 cp sub-chunks; rank r holds r and 2 cp - 1 - r
  return i < half ? r * half + i : (2 * cp - 1 - r) * half + i - half;
}

TEST(CpShardPlan, GeometryForRandomLengthsAndCpSizes) {
  std::mt19937 rng(7);
  for (int iter = 0; iter < 300; ++iter) {
    const int cp = 1 + static_cast<int>(rng() % 8);
    const int64_t s = 1 + static_cast<int64_t>(rng() % 300);
    const int64_t block = (iter % 3 == 0) ? 1 + static_cast<int64_t>(rng() % 64) : 1;
    const auto sharding = iter % 2 ? Sharding::kZigzag : Sharding::kContiguous;
    const ShardPlan p(s, cp, sharding, block);
    EXPECT_EQ(p.padded_len() % (2 * cp), 0);
    EXPECT_EQ(p.padded_len() % block, 0);
    EXPECT_GE(p.padded_len(), s);
    EXPECT_LT(p.pad_len(), std::lcm(static_cast<int64_t>(2 * cp), block));
    EXPECT_EQ(p.local_len() * cp, p.padded_len());
    int64_t valid = 0;
    std::vector<int> holders(static_cast<size_t>(p.padded_len()), 0);
    for (int r = 0; r < cp; ++r) {
      const auto index = p.global_indices(r);
      ASSERT_EQ(index.numel(), p.local_len());
      int64_t real = 0;
      for (int64_t i = 0; i < p.local_len(); ++i) {
        const int64_t g = layout_oracle(sharding, r, cp, p.local_len(), i);
        EXPECT_EQ(index[i].item<int64_t>(), g);
        EXPECT_EQ(p.global_index(r, i), g);
        EXPECT_EQ(p.owner(g), r);
        ++holders[static_cast<size_t>(g)];
        real += g < s;
      }
      EXPECT_EQ(p.valid_tokens(r), real);
      valid += p.valid_tokens(r);
    }
    EXPECT_EQ(valid, s);
    EXPECT_EQ(std::count(holders.begin(), holders.end(), 1), p.padded_len());  // every token on exactly one rank
  }
  // The upstream rule: pad to a multiple of 2*cp, not of the block size.
  EXPECT_EQ(ShardPlan(10, 4).padded_len(), 16);
  EXPECT_EQ(ShardPlan(16, 4).padded_len(), 16);
  EXPECT_EQ(ShardPlan(10, 4, Sharding::kContiguous, 3).padded_len(), 24);
  EXPECT_EQ(ShardPlan(10, 4, Sharding::kZigzag).padded_len(), 16);
  // A rank whose shard is all padding.
  const ShardPlan tiny(3, 4);
  EXPECT_EQ(tiny.local_len(), 2);
  EXPECT_EQ(tiny.valid_tokens(1), 1);
  EXPECT_EQ(tiny.valid_tokens(2), 0);
  EXPECT_EQ(tiny.valid_tokens(3), 0);
  EXPECT_THROW(ShardPlan(0, 2), std::invalid_argument);
  EXPECT_THROW(ShardPlan(5, 0), std::invalid_argument);
}

TEST(CpShardPlan, ShiftLabels) {
  const auto labels = at::tensor({10, 11, 12, 13, 14, 15}, at::kLong).view({2, 3});
  const auto t = shift_labels(labels);
  EXPECT_TRUE(at::equal(t, at::tensor({11, 12, -100, 14, 15, -100}, at::kLong).view({2, 3})));
  EXPECT_TRUE(at::equal(shift_labels(at::tensor({5}, at::kLong).view({1, 1})), at::full({1, 1}, -100, at::kLong)));
}

// A random batch: B rows, S tokens, packed documents, a vision run, per-layer inputs [B, S, L, P].
TokenBatch random_batch(std::mt19937& rng, int64_t b, int64_t s, int64_t layers, int64_t p) {
  auto g = at::detail::createCPUGenerator(rng());
  TokenBatch x;
  x.input_ids = at::randint(1, 1000, {b, s}, g, at::kLong);
  x.labels = at::randint(1, 1000, {b, s}, g, at::kLong);
  x.labels.index_put_({0, 0}, -100);
  x.padding_mask = at::zeros({b, s}, at::kBool);
  x.padding_mask.index_put_({b - 1, s - 1}, true);  // tail padding inside the original sequence
  x.document_ids = at::randint(1, 4, {b, s}, g, at::kLong).cumsum(1).clamp_max(9);
  x.vision_group_ids = at::full({b, s}, -1, at::kLong);
  x.token_type_ids = at::zeros({b, s}, at::kLong);
  if (s >= 4) {
    x.vision_group_ids.narrow(1, 1, 2).fill_(0);
    x.token_type_ids.narrow(1, 1, 2).fill_(1);
  }
  x.position_ids = at::arange(s, at::kLong).remainder(7).unsqueeze(0).expand({b, s}).contiguous() + 3;
  x.loss_mask = at::ones({b, s}, at::kFloat);
  x.per_layer_inputs = at::randn({b, s, layers, p}, g, at::TensorOptions().dtype(at::kFloat));
  x.inputs_embeds = at::randn({b, s, 5}, g, at::TensorOptions().dtype(at::kDouble));
  return x;
}

TEST(CpShardPlan, PadValuesShardAndUnshardExactly) {
  std::mt19937 rng(11);
  for (int iter = 0; iter < 60; ++iter) {
    const int cp = 1 + static_cast<int>(rng() % 5);
    const int64_t s = 1 + static_cast<int64_t>(rng() % 40);
    const int64_t b = 1 + static_cast<int64_t>(rng() % 2);
    const auto sharding = iter % 2 ? Sharding::kZigzag : Sharding::kContiguous;
    const ShardPlan plan(s, cp, sharding);
    const auto x = random_batch(rng, b, s, 3, 4);
    const int64_t pad_id = iter % 2 == 0 ? 0 : 7;
    const auto p = prepare_cp_batch(x, plan, pad_id);
    const int64_t sp = plan.padded_len(), np = plan.pad_len();
    SCOPED_TRACE("cp=" + std::to_string(cp) + " S=" + std::to_string(s) + " " + to_string(sharding));

    // The original part is untouched (labels: shifted), the pad tail has the pad values.
    auto head = [&](const at::Tensor& t) { return t.narrow(1, 0, s); };
    auto tail = [&](const at::Tensor& t) { return t.narrow(1, s, np); };
    ASSERT_EQ(p.input_ids.size(1), sp);
    EXPECT_TRUE(at::equal(head(p.input_ids), x.input_ids));
    EXPECT_TRUE(at::equal(head(p.labels), shift_labels(x.labels)));
    EXPECT_TRUE(p.labels_shifted);
    EXPECT_TRUE(at::equal(head(p.padding_mask), x.padding_mask));
    EXPECT_TRUE(at::equal(head(p.per_layer_inputs), x.per_layer_inputs));
    if (np > 0) {
      EXPECT_TRUE((tail(p.input_ids) == pad_id).all().item<bool>());
      EXPECT_TRUE((tail(p.labels) == -100).all().item<bool>());
      EXPECT_TRUE(tail(p.padding_mask).all().item<bool>());
      EXPECT_TRUE((tail(p.document_ids) == 0).all().item<bool>());
      EXPECT_TRUE((tail(p.vision_group_ids) == -1).all().item<bool>());
      EXPECT_TRUE((tail(p.token_type_ids) == 0).all().item<bool>());
      EXPECT_TRUE((tail(p.loss_mask) == 0).all().item<bool>());
      EXPECT_TRUE((tail(p.per_layer_inputs) == 0).all().item<bool>());
      EXPECT_TRUE((tail(p.inputs_embeds) == 0).all().item<bool>());
      // Position ids continue: last+1, last+2, ...
      const auto last = x.position_ids.narrow(1, s - 1, 1);
      EXPECT_TRUE(at::equal(tail(p.position_ids), last + at::arange(1, np + 1, at::kLong).unsqueeze(0)));
    }
    // The target of the last real token is -100; the label shift happened before padding.
    EXPECT_TRUE((p.labels.select(1, s - 1) == -100).all().item<bool>());

    // Shard every field, then put every field back exactly.
    std::vector<TokenBatch> shards;
    for (int r = 0; r < cp; ++r) shards.push_back(shard_batch(p, plan, r));
    auto field_back = [&](at::Tensor TokenBatch::*f) {
      std::vector<at::Tensor> parts;
      for (const auto& sh : shards) {
        EXPECT_EQ((sh.*f).size(1), plan.local_len());
        EXPECT_TRUE((sh.*f).is_contiguous());
        parts.push_back(sh.*f);
      }
      EXPECT_TRUE(at::equal(plan.unshard(parts, 1, /*crop=*/false), p.*f));
      return plan.unshard(parts);
    };
    EXPECT_TRUE(at::equal(field_back(&TokenBatch::input_ids), x.input_ids));
    EXPECT_TRUE(at::equal(field_back(&TokenBatch::per_layer_inputs), x.per_layer_inputs));  // 4D [B, S, L, P]
    EXPECT_TRUE(at::equal(field_back(&TokenBatch::inputs_embeds), x.inputs_embeds));
    EXPECT_TRUE(at::equal(field_back(&TokenBatch::vision_group_ids), x.vision_group_ids));
    EXPECT_TRUE(at::equal(field_back(&TokenBatch::position_ids), x.position_ids));
    EXPECT_TRUE(at::equal(field_back(&TokenBatch::labels), shift_labels(x.labels)));
    for (int r = 0; r < cp; ++r)
      for (int64_t t = 0; t < plan.local_len(); ++t)
        EXPECT_TRUE(at::equal(shards[static_cast<size_t>(r)].per_layer_inputs.select(1, t),
                              p.per_layer_inputs.select(1, layout_oracle(sharding, r, cp, plan.local_len(), t))));

    // Label shift at the shard edges: every local position keeps its true global target.
    for (int r = 0; r < cp; ++r)
      for (int64_t t = 0; t < plan.local_len(); ++t) {
        const int64_t g = plan.global_index(r, t);
        const auto got = shards[static_cast<size_t>(r)].labels.select(1, t);
        const auto want = g + 1 < s ? x.labels.select(1, g + 1) : at::full({b}, -100, at::kLong);
        EXPECT_TRUE(at::equal(got, want)) << "rank " << r << " local " << t << " global " << g;
      }
  }
}

TEST(CpShardPlan, DefaultsAreSynthesized) {
  const ShardPlan plan(5, 2);  // S_pad 8
  TokenBatch x;
  x.input_ids = at::arange(5, at::kLong).view({1, 5}) + 1;
  const auto p = prepare_cp_batch(x, plan);
  EXPECT_TRUE(at::equal(p.position_ids, at::arange(8, at::kLong).view({1, 8})));
  EXPECT_TRUE(at::equal(p.padding_mask, at::tensor({0, 0, 0, 0, 0, 1, 1, 1}, at::kLong).to(at::kBool).view({1, 8})));
  EXPECT_TRUE(at::equal(p.document_ids, at::tensor({1, 1, 1, 1, 1, 0, 0, 0}, at::kLong).view({1, 8})));
  EXPECT_FALSE(p.labels.defined());
  EXPECT_FALSE(p.per_layer_inputs.defined());
  EXPECT_FALSE(shard_batch(p, plan, 1).vision_group_ids.defined());
  // Already-shifted labels are not shifted twice.
  x.labels = at::tensor({7, 8, 9, 10, -100}, at::kLong).view({1, 5});
  x.labels_shifted = true;
  EXPECT_TRUE(at::equal(prepare_cp_batch(x, plan).labels,
                        at::tensor({7, 8, 9, 10, -100, -100, -100, -100}, at::kLong).view({1, 8})));
  // mRoPE-style [3, B, S] positions pad and shard on dim 2.
  const auto pos3 = at::arange(15, at::kLong).view({3, 1, 5});
  const auto padded = plan.pad_positions(pos3, 2);
  EXPECT_TRUE(at::equal(padded.select(2, 7), pos3.select(2, 4) + 3));
  EXPECT_TRUE(at::equal(plan.unshard(plan.shard_all(padded, 2), 2), pos3));
  // Wrong lengths are errors, not silent reshapes.
  EXPECT_THROW(plan.shard(at::zeros({1, 5}), 0), std::invalid_argument);
  EXPECT_THROW(plan.unshard({at::zeros({1, 4})}), std::invalid_argument);
}

}  // namespace
}  // namespace cpharness::cp
