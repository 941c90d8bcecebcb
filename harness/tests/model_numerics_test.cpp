// Hand-computed values for the building blocks of gemma4-spec §3.
#include <gtest/gtest.h>

#include <cmath>

#include "harness/model/attention_backend.h"
#include "harness/model/gemma4.h"
#include "harness/model/rms_norm.h"
#include "harness/model/rope.h"

namespace cpharness::model {
namespace {

TEST(ModelNumerics, RmsNormUsesWeightNotOnePlusWeight) {
  auto x = torch::tensor({1.0f, 2.0f, 3.0f, 4.0f});
  auto w = torch::tensor({1.0f, 2.0f, 0.5f, 0.0f});
  auto y = rms_norm(x, w, 1e-6);
  const double inv = 1.0 / std::sqrt((1 + 4 + 9 + 16) / 4.0 + 1e-6);
  const double expected[] = {1 * inv * 1, 2 * inv * 2, 3 * inv * 0.5, 0.0};
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(y[i].item<double>(), expected[i], 1e-6) << i;
  auto weightless = rms_norm(x, torch::Tensor(), 1e-6);
  EXPECT_NEAR(weightless[3].item<double>(), 4 * inv, 1e-6);
}

TEST(ModelNumerics, RmsNormRoundsOnceAtTheEnd) {
  // In bf16 the weight multiply happens in fp32 before the single cast.
  auto x = torch::randn({3, 16}).to(torch::kBFloat16);
  auto w = (1 + 0.1 * torch::randn({16})).to(torch::kBFloat16);
  auto xf = x.to(torch::kFloat32), wf = w.to(torch::kFloat32);
  auto once = (xf * torch::pow(xf.pow(2).mean(-1, true) + 1e-6, -0.5) * wf).to(torch::kBFloat16);
  EXPECT_TRUE(torch::equal(rms_norm(x, w, 1e-6), once));
}

TEST(ModelNumerics, EmbeddingScaleIsRoundedToBf16) {
  EXPECT_EQ(embedding_multiplier(std::sqrt(1536.0), torch::kBFloat16).item<float>(), 39.25f);
  EXPECT_EQ(embedding_multiplier(std::sqrt(2560.0), torch::kBFloat16).item<float>(), 50.5f);
  EXPECT_EQ(embedding_multiplier(std::sqrt(5376.0), torch::kBFloat16).item<float>(), 73.5f);
  EXPECT_NEAR(embedding_multiplier(std::sqrt(1536.0), torch::kFloat32).item<float>(), 39.19183731f, 1e-5);
}

// Both embeddings are scaled by that bf16-rounded multiplier, as HF's ScaledWordEmbedding does (embed_scale cast to
// the weight dtype). sqrt(P) of the per-layer inputs is no bf16 value (sqrt(8) -> 2.828125): a plain double scale
// there moved bf16 per-layer inputs by 1e-4 and was caught by one noisy entry of one golden only.
TEST(ModelNumerics, Bf16EmbeddingsAreScaledByTheBf16RoundedMultiplier) {
  auto c = preset_config("tiny-e4b");
  ASSERT_TRUE(c.has_per_layer_inputs());
  Gemma4Model m(c);
  m->to(torch::kBFloat16);
  torch::NoGradGuard no_grad;
  m->embed_tokens_per_layer->weight.normal_();  // (a model is built with zero weights; init fills them)
  const int64_t P = c.hidden_size_per_layer_input;
  auto ids = torch::randint(0, c.vocab_size_per_layer_input, {2, 5}, torch::kInt64);
  const auto rounded = torch::tensor(float(std::sqrt(double(P)))).to(torch::kBFloat16);  // the fp32 scale, then bf16
  ASSERT_NE(rounded.item<double>(), std::sqrt(double(P))) << "a P whose root is a bf16 value cannot tell the two apart";
  auto expected = (m->embed_tokens_per_layer->weight.index_select(0, ids.flatten()) * rounded)
                      .reshape({2, 5, c.num_hidden_layers, P});
  EXPECT_TRUE(torch::equal(m->per_layer_token_inputs(ids), expected));
}

TEST(ModelNumerics, DefaultRopeRotatesNonInterleavedPairs) {
  RopeConfig rope{"default", 10000.0, 1.0, 1.0};
  auto inv = rope_inverse_frequencies(rope, 4);  // [1, 1e-2]
  EXPECT_DOUBLE_EQ(inv[0].item<double>(), 1.0);
  EXPECT_NEAR(inv[1].item<double>(), 0.01, 1e-9);
  // transformers' default type never reads "factor" (only the proportional type divides by it).
  EXPECT_TRUE(torch::equal(rope_inverse_frequencies(RopeConfig{"default", 10000.0, 1.0, 2.0}, 4), inv));
  EXPECT_TRUE(torch::equal(rope_inverse_frequencies(RopeConfig{"proportional", 10000.0, 1.0, 2.0}, 4),
                           rope_inverse_frequencies(RopeConfig{"proportional", 10000.0, 1.0, 1.0}, 4) / 2.0));
  const double p = 5.0, a = 0.3, b = -1.2, c = 0.7, d = 2.0;
  auto x = torch::tensor({float(a), float(b), float(c), float(d)}).view({1, 1, 1, 4});
  auto tables = rope_tables(inv, torch::full({1, 1}, int64_t(p)), torch::kFloat32);
  auto out = apply_rope(x, tables).flatten();
  EXPECT_NEAR(out[0].item<double>(), a * std::cos(p) - c * std::sin(p), 1e-5);
  EXPECT_NEAR(out[2].item<double>(), c * std::cos(p) + a * std::sin(p), 1e-5);
  EXPECT_NEAR(out[1].item<double>(), b * std::cos(0.01 * p) - d * std::sin(0.01 * p), 1e-5);
  EXPECT_NEAR(out[3].item<double>(), d * std::cos(0.01 * p) + b * std::sin(0.01 * p), 1e-5);
}

TEST(ModelNumerics, ProportionalRopeRotatesOnlyTheFirstQuarterOfFrequencies) {
  RopeConfig rope{"proportional", 1e6, 0.25, 1.0};
  auto inv = rope_inverse_frequencies(rope, 512);
  ASSERT_EQ(inv.size(0), 256);
  // Denominator is the full head dim 512, not 128.
  EXPECT_NEAR(inv[1].item<double>(), 1.0 / std::pow(1e6, 2.0 / 512), 1e-7);
  EXPECT_GT(inv[63].item<double>(), 0.0);
  EXPECT_EQ(inv.narrow(0, 64, 192).abs().sum().item<double>(), 0.0);
  auto x = torch::randn({1, 1, 1, 512});
  auto out = apply_rope(x, rope_tables(inv, torch::full({1, 1}, int64_t(37)), torch::kFloat32));
  auto changed = (out - x).abs().flatten() > 0;
  for (int64_t j = 0; j < 512; ++j) {
    const bool rotates = j < 64 || (j >= 256 && j < 320);
    EXPECT_EQ(changed[j].item<bool>(), rotates) << "dim " << j;
  }
}

TEST(ModelNumerics, EagerSlidingWindowSeesExactlyWKeys) {
  // Query 20 with W = 8 must depend on the value at key 13 (q - k = 7 < 8) but not at key 12 (q - k = 8).
  const int64_t S = 24, W = 8, q = 20;
  auto Q = torch::randn({1, 1, S, 4}), K = torch::randn({1, 1, S, 4}), V = torch::randn({1, 1, S, 4});
  EagerAttention eager;
  AttentionInputs in{Q, K, V, {true, W, false}, 1.0, 0};
  auto base = eager.attend(in, {});
  for (int64_t k : {12, 13}) {
    auto V2 = V.clone();
    V2[0][0][k] += 10.0;
    AttentionInputs moved{Q, K, V2, {true, W, false}, 1.0, 0};
    const bool changed = !torch::allclose(eager.attend(moved, {})[0][0][q], base[0][0][q]);
    EXPECT_EQ(changed, k == 13) << "key " << k;
  }
}

TEST(ModelNumerics, SoftcapMatchesTanhFormula) {
  auto logits = torch::tensor({-100.0f, -30.0f, 0.0f, 15.0f, 1000.0f});
  auto out = softcap(logits, 30.0);
  const double in[] = {-100, -30, 0, 15, 1000};
  for (int i = 0; i < 5; ++i) EXPECT_NEAR(out[i].item<double>(), 30.0 * std::tanh(in[i] / 30.0), 1e-4);
  EXPECT_LE(out.abs().max().item<double>(), 30.0);
}

TEST(ModelNumerics, LossShiftsLabelsAndIgnoresMinus100) {
  auto labels = torch::tensor({5, 6, -100, 7}, torch::kInt64).view({1, 4});
  auto shifted = shift_labels(labels);
  EXPECT_TRUE(torch::equal(shifted, torch::tensor({6, -100, 7, -100}, torch::kInt64).view({1, 4})));
  // Uniform logits over 4 classes: each counted token costs log(4); position 0 has a certain target.
  auto logits = torch::zeros({1, 4, 4});
  logits[0][0][2] = 1000.0;  // target 6 is out of range below, so make position 0 target 2 instead
  auto targets = torch::tensor({2, -100, 3, -100}, torch::kInt64).view({1, 4});
  auto loss = token_loss(logits, targets);
  EXPECT_EQ(loss.count, 2);
  EXPECT_NEAR(loss.sum.item<double>(), 0.0 + std::log(4.0), 1e-5);
}

}  // namespace
}  // namespace cpharness::model
