#include "kernels/chunk_attention.h"

#include <gtest/gtest.h>

#include <cmath>

#include "kernels/block_mask_builder.h"
#include "kernels/dense_mask.h"
#include "kernels/lse_merge.h"
#include "kernels/tests/test_support.h"

namespace cpharness::kernels {
namespace {

using testing::MaskConfig;

struct Heads {
  int64_t hq, hkv, d;
};

struct Inputs {
  torch::Tensor q, k, v, dout;
};

Inputs random_inputs(const MaskConfig& c, Heads h, torch::ScalarType dtype, uint64_t seed) {
  torch::manual_seed(seed);
  auto o = torch::TensorOptions().dtype(dtype);
  return {torch::randn({c.batch, h.hq, c.q_range.length, h.d}, o), torch::randn({c.batch, h.hkv, c.kv_range.length, h.d}, o),
          torch::randn({c.batch, h.hkv, c.kv_range.length, h.d}, o),
          torch::randn({c.batch, h.hq, c.q_range.length, h.d}, o)};
}

BlockMask mask_of(const MaskConfig& c, TokenRange kv_range) {
  return build_block_mask(c.meta.slice(c.q_range.start, c.q_range.length), c.meta.slice(kv_range.start, kv_range.length),
                          c.q_range, kv_range, c.geometry, c.batch, c.q_block, c.kv_block);
}

torch::Tensor allowed_of(const MaskConfig& c, TokenRange kv_range) {
  return dense_mask(c.meta.slice(c.q_range.start, c.q_range.length), c.meta.slice(kv_range.start, kv_range.length),
                    c.q_range, kv_range, c.geometry, c.batch);
}

bool finite_or_neg_inf(const torch::Tensor& t) { return !torch::isnan(t).any().item<bool>() && !torch::isposinf(t).any().item<bool>(); }

// |a - b| for the LSE: -inf exactly where the reference has -inf, finite values within tol (absolute).
void expect_lse_close(const torch::Tensor& lse, const torch::Tensor& ref, double tol, const std::string& what) {
  auto inf_a = torch::isinf(lse), inf_b = torch::isinf(ref);
  ASSERT_TRUE(torch::equal(inf_a, inf_b)) << what << ": -inf pattern of the LSE differs";
  auto fa = lse.masked_select(inf_a.logical_not()), fb = ref.masked_select(inf_b.logical_not());
  EXPECT_LE(testing::max_abs_error(fa, fb), tol) << what;
}

// Compares one chunk's forward and backward (with its own out/LSE as the merged ones) with the reference.
void check_chunk(const MaskConfig& c, Heads h, torch::ScalarType dtype, uint64_t seed, double scale) {
  const std::string what = "seed " + std::to_string(seed) + " " + c.describe() + " heads " + std::to_string(h.hq) +
                           "/" + std::to_string(h.hkv) + (dtype == torch::kFloat64 ? " fp64" : " fp32");
  auto in = random_inputs(c, h, dtype, seed);
  auto mask = mask_of(c, c.kv_range);
  AttentionWork work;
  auto fwd = chunk_attention_forward(in.q, in.k, in.v, mask, scale, &work);
  auto allowed = allowed_of(c, c.kv_range);
  auto ref = testing::reference_attention(in.q, in.k, in.v, allowed, scale, in.dout);
  auto grads = chunk_attention_backward(in.q, in.k, in.v, fwd.out, fwd.lse, in.dout, mask, scale);
  const auto acc = accumulation_dtype(dtype);
  ASSERT_EQ(fwd.out.scalar_type(), acc);
  ASSERT_EQ(fwd.lse.scalar_type(), acc);
  for (const auto& t : {fwd.out, grads.dq, grads.dk, grads.dv}) ASSERT_TRUE(torch::isfinite(t).all().item<bool>()) << what;
  ASSERT_TRUE(finite_or_neg_inf(fwd.lse)) << what;
  if (dtype == torch::kFloat64) {
    EXPECT_LE(testing::max_abs_error(fwd.out, ref.out), 1e-10) << what;
    EXPECT_LE(testing::max_abs_error(grads.dq, ref.dq), 1e-10) << what;
    EXPECT_LE(testing::max_abs_error(grads.dk, ref.dk), 1e-10) << what;
    EXPECT_LE(testing::max_abs_error(grads.dv, ref.dv), 1e-10) << what;
    expect_lse_close(fwd.lse, ref.lse, 1e-10, what);
  } else {
    EXPECT_LE(testing::rel_error(fwd.out, ref.out), 1e-5) << what;
    EXPECT_LE(testing::rel_error(grads.dq, ref.dq), 1e-5) << what;
    EXPECT_LE(testing::rel_error(grads.dk, ref.dk), 1e-5) << what;
    EXPECT_LE(testing::rel_error(grads.dv, ref.dv), 1e-5) << what;
    auto finite = ref.lse.masked_select(torch::isfinite(ref.lse));
    expect_lse_close(fwd.lse, ref.lse, 1e-5 * std::max(1.0, finite.numel() ? finite.abs().max().item<double>() : 0.0), what);
  }
  // Empty rows: exact zeros in out and dq (every head), -inf LSE.
  auto empty = allowed.any(-1).logical_not().expand({c.batch, c.q_range.length});  // [B, Sq]
  auto empty4 = empty.unsqueeze(1).unsqueeze(-1).expand_as(fwd.out);
  EXPECT_TRUE(fwd.out.masked_select(empty4).eq(0).all().item<bool>()) << what;
  EXPECT_TRUE(grads.dq.masked_select(empty4).eq(0).all().item<bool>()) << what;
  EXPECT_TRUE(torch::isneginf(fwd.lse.masked_select(empty.unsqueeze(1).expand_as(fwd.lse))).all().item<bool>()) << what;
  // Keys nobody may see: exact zero dk, dv.
  auto unseen = allowed.any(1).logical_not().expand({c.batch, c.kv_range.length});
  auto unseen4 = unseen.unsqueeze(1).unsqueeze(-1).expand_as(grads.dk);
  EXPECT_TRUE(grads.dk.masked_select(unseen4).eq(0).all().item<bool>()) << what;
  EXPECT_TRUE(grads.dv.masked_select(unseen4).eq(0).all().item<bool>()) << what;
  // Work: exactly the non-empty tiles, for every query head and batch element.
  const int64_t bcast = mask.batch == 1 ? c.batch : 1;
  EXPECT_EQ(work.score_elements, computed_score_elements(mask) * h.hq * bcast) << what;
}

// The mask kinds by name, on a global sequence of 48 tokens with q = shard 1 of 3.
MaskConfig named(const std::string& kind, int64_t q_block, int64_t kv_block, TokenRange kv_range) {
  MaskConfig c;
  c.batch = 2;
  c.seq_len = 48;
  c.q_range = {16, 16};
  c.kv_range = kv_range;
  c.q_block = q_block;
  c.kv_block = kv_block;
  auto docs = [&] {
    auto ids = torch::ones({2, 48}, torch::kInt64);
    ids[0].narrow(0, 20, 28).fill_(2);   // documents [0, 20), [20, 48)
    ids[1].narrow(0, 10, 8).fill_(2);    // [0, 10), [10, 18), pad doc [18, 24), [24, 48)
    ids[1].narrow(0, 18, 6).fill_(0);
    ids[1].narrow(0, 24, 24).fill_(3);
    return ids;
  };
  if (kind == "causal") {
  } else if (kind == "sliding_small") {
    c.geometry.window = 5;
  } else if (kind == "sliding_large") {
    c.geometry.window = 40;
  } else if (kind == "documents") {
    c.meta.document_ids = docs();
  } else if (kind == "padding") {
    c.meta.padding = torch::zeros({2, 48}, torch::kBool);
    c.meta.padding[0].narrow(0, 40, 8).fill_(true);  // tail padding
    c.meta.padding[1].narrow(0, 0, 16).fill_(true);  // a whole shard of padding
  } else if (kind == "vision") {
    c.geometry.window = 4;
    c.geometry.vision_bidirectional = true;
    c.meta.vision_group_ids = torch::full({2, 48}, -1, torch::kInt64);
    c.meta.vision_group_ids[0].narrow(0, 12, 14).fill_(0);
    c.meta.vision_group_ids[1].narrow(0, 20, 6).fill_(0);
    c.meta.vision_group_ids[1].narrow(0, 30, 10).fill_(1);
  } else if (kind == "non_causal") {
    c.geometry.causal = false;
  } else if (kind == "combined") {
    c.geometry.window = 9;
    c.geometry.vision_bidirectional = true;
    c.meta.document_ids = docs();
    c.meta.padding = torch::zeros({2, 48}, torch::kBool);
    c.meta.padding[0].narrow(0, 44, 4).fill_(true);
    c.meta.vision_group_ids = torch::full({2, 48}, -1, torch::kInt64);
    c.meta.vision_group_ids[0].narrow(0, 14, 12).fill_(0);
    c.meta.vision_group_ids[1].narrow(0, 26, 10).fill_(0);
  }
  return c;
}

TEST(ChunkAttention, EveryMaskKindMatchesTheDenseReference) {
  const std::vector<std::string> kinds = {"causal", "sliding_small", "sliding_large", "documents",
                                          "padding", "vision", "non_causal", "combined"};
  const std::vector<Heads> heads = {{4, 2, 8}, {4, 4, 8}, {6, 1, 16}};
  const std::vector<TokenRange> kv_ranges = {{0, 48}, {0, 16}, {16, 16}, {32, 16}, {5, 30}};
  uint64_t seed = 0;
  for (const auto& kind : kinds)
    for (auto [qb, kb] : std::vector<std::pair<int64_t, int64_t>>{{8, 8}, {5, 7}, {16, 3}})
      for (const auto& kv : kv_ranges)
        for (auto dtype : {torch::kFloat64, torch::kFloat32}) {
          const Heads h = heads[seed % heads.size()];
          check_chunk(named(kind, qb, kb, kv), h, dtype, seed, seed % 2 ? 1.0 : 1.0 / std::sqrt(double(h.d)));
          ++seed;
          if (HasFailure()) return;
        }
}

TEST(ChunkAttention, RandomConfigurationsMatchTheDenseReference_300) {
  const std::vector<Heads> heads = {{2, 1, 8}, {4, 2, 4}, {3, 3, 8}, {8, 2, 8}};
  for (uint64_t seed = 0; seed < 300; ++seed) {
    auto c = testing::random_mask_config(90000 + seed, 64);
    check_chunk(c, heads[seed % heads.size()], seed % 2 ? torch::kFloat32 : torch::kFloat64, seed, 1.0);
    if (HasFailure()) return;
  }
}

// Splitting the keys into chunks, running each chunk, and merging by LSE equals attention over all keys;
// the backward of every chunk with the merged out/LSE sums (dq) and concatenates (dk, dv) to the full one.
TEST(ChunkAttention, SplitKeysAndMergeEqualsAllKeys_120Seeds) {
  for (uint64_t seed = 0; seed < 120; ++seed) {
    auto c = testing::random_mask_config(70000 + seed, 72);
    std::mt19937_64 rng(seed);
    c.kv_range = {0, c.seq_len};
    const Heads h{4, 2, 8};
    const auto dtype = seed % 3 == 0 ? torch::kFloat32 : torch::kFloat64;
    auto in = random_inputs(c, h, dtype, seed);
    // Random chunk boundaries (some chunks fully masked for the q range, e.g. the future under causal).
    std::vector<int64_t> cuts{0, c.seq_len};
    for (int64_t n = testing::uniform(rng, 0, 4); n > 0; --n) cuts.push_back(testing::uniform(rng, 1, std::max<int64_t>(1, c.seq_len - 1)));
    std::sort(cuts.begin(), cuts.end());
    cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
    std::vector<AttentionPartial> parts;
    std::vector<BlockMask> masks;
    for (size_t i = 0; i + 1 < cuts.size(); ++i) {
      masks.push_back(mask_of(c, {cuts[i], cuts[i + 1] - cuts[i]}));
      parts.push_back(chunk_attention_forward(in.q, in.k.narrow(2, cuts[i], cuts[i + 1] - cuts[i]),
                                              in.v.narrow(2, cuts[i], cuts[i + 1] - cuts[i]), masks.back(), 1.0));
    }
    auto merged = lse_merge(parts);
    auto whole = chunk_attention_forward(in.q, in.k, in.v, mask_of(c, c.kv_range), 1.0);
    auto ref = testing::reference_attention(in.q, in.k, in.v, allowed_of(c, c.kv_range), 1.0, in.dout);
    const double tol = dtype == torch::kFloat64 ? 1e-10 : 1e-5;
    const std::string what = "seed " + std::to_string(seed) + " chunks " + std::to_string(cuts.size() - 1) + " " + c.describe();
    ASSERT_TRUE(torch::isfinite(merged.out).all().item<bool>()) << what;
    ASSERT_TRUE(finite_or_neg_inf(merged.lse)) << what;
    EXPECT_LE(testing::rel_error(merged.out, whole.out), tol) << what;
    EXPECT_LE(testing::rel_error(merged.out, ref.out), tol) << what;
    expect_lse_close(merged.lse, whole.lse, dtype == torch::kFloat64 ? 1e-10 : 1e-4, what);
    torch::Tensor dq = torch::zeros_like(merged.out);
    std::vector<torch::Tensor> dks, dvs;
    for (size_t i = 0; i < masks.size(); ++i) {
      auto g = chunk_attention_backward(in.q, in.k.narrow(2, cuts[i], cuts[i + 1] - cuts[i]),
                                        in.v.narrow(2, cuts[i], cuts[i + 1] - cuts[i]), merged.out, merged.lse, in.dout,
                                        masks[i], 1.0);
      dq = dq + g.dq;
      dks.push_back(g.dk);
      dvs.push_back(g.dv);
    }
    EXPECT_LE(testing::rel_error(dq, ref.dq), tol) << what;
    EXPECT_LE(testing::rel_error(torch::cat(dks, 2), ref.dk), tol) << what;
    EXPECT_LE(testing::rel_error(torch::cat(dvs, 2), ref.dv), tol) << what;
    if (HasFailure()) return;
  }
}

TEST(ChunkAttention, AllPaddingQueryShardGivesExactZerosAndNoNaN) {
  MaskConfig c;
  c.batch = 1;
  c.seq_len = 32;
  c.meta.document_ids = torch::ones({1, 32}, torch::kInt64);
  c.meta.document_ids.narrow(1, 16, 16).fill_(0);  // the second shard is all padding (document 0)
  c.meta.padding = c.meta.document_ids.eq(0);
  c.q_range = {16, 16};
  c.kv_range = {0, 32};
  c.q_block = c.kv_block = 8;
  auto mask = mask_of(c, c.kv_range);
  EXPECT_EQ(computed_score_elements(mask), 0);
  auto in = random_inputs(c, {4, 2, 8}, torch::kFloat32, 3);
  auto fwd = chunk_attention_forward(in.q, in.k, in.v, mask, 1.0);
  EXPECT_TRUE(fwd.out.eq(0).all().item<bool>());
  EXPECT_TRUE(torch::isneginf(fwd.lse).all().item<bool>());
  auto g = chunk_attention_backward(in.q, in.k, in.v, fwd.out, fwd.lse, in.dout, mask, 1.0);
  EXPECT_TRUE(g.dq.eq(0).all().item<bool>());
  EXPECT_TRUE(g.dk.eq(0).all().item<bool>());
  EXPECT_TRUE(g.dv.eq(0).all().item<bool>());
}

TEST(ChunkAttention, FullTilesNeverEvaluateTheMask) {
  // Declare every non-empty tile of a causal mask full: the kernel must then attend to every element of
  // those tiles (future keys included), proving it does not look at the mask inside full tiles.
  MaskConfig c;
  c.batch = 1;
  c.seq_len = 16;
  c.q_range = c.kv_range = {0, 16};
  c.q_block = c.kv_block = 4;
  auto mask = mask_of(c, c.kv_range);
  auto classes = block_classes(mask);
  fill_block_lists(mask, torch::where(classes == kPartialBlock, int64_t(kFullBlock), classes.to(torch::kInt64)).to(torch::kUInt8));
  auto in = random_inputs(c, {2, 1, 8}, torch::kFloat64, 11);
  AttentionWork work;
  auto fwd = chunk_attention_forward(in.q, in.k, in.v, mask, 1.0, &work);
  EXPECT_EQ(work.mask_elements, 0);
  EXPECT_EQ(work.partial_blocks, 0);
  EXPECT_EQ(work.full_blocks, 10);
  auto tiles = torch::ones({4, 4}, torch::kBool).tril().repeat_interleave(4, 0).repeat_interleave(4, 1).unsqueeze(0);
  auto ref = testing::reference_attention(in.q, in.k, in.v, tiles, 1.0, in.dout);
  EXPECT_LE(testing::max_abs_error(fwd.out, ref.out), 1e-12);
}

TEST(ChunkAttention, WorkCountsAndSlidingWindowEfficiency) {
  // W = 32 over tiles of 8 at S = 256: each q tile needs 5 kv tiles (40 keys) for 32 allowed -> 1.25.
  MaskConfig c;
  c.batch = 1;
  c.seq_len = 256;
  c.q_range = c.kv_range = {0, 256};
  c.q_block = c.kv_block = 8;
  c.geometry.window = 32;
  auto mask = mask_of(c, c.kv_range);
  const double allowed = double(allowed_of(c, c.kv_range).sum().item<int64_t>());
  const double computed = double(computed_score_elements(mask));
  EXPECT_LE(computed / allowed, 1.5);
  EXPECT_GE(computed / allowed, 1.0);
  EXPECT_GT(256.0 * 256.0 / allowed, 6.0);  // what dense attention would compute
  auto in = random_inputs(c, {2, 1, 4}, torch::kFloat32, 5);
  AttentionWork work;
  chunk_attention_forward(in.q, in.k, in.v, mask, 1.0, &work);
  EXPECT_EQ(work.score_elements, int64_t(computed) * 2);
  // Partial tiles only: the diagonal and the far edge of the band, 8 x 8 each.
  int64_t partial_area = 0;
  auto n = mask.kv_num_blocks.accessor<int32_t, 2>();
  for (int64_t i = 0; i < mask.num_q_blocks(); ++i) partial_area += n[0][i] * 64;
  EXPECT_EQ(work.mask_elements, partial_area);
  EXPECT_EQ(work.partial_blocks + work.full_blocks,
            mask.kv_num_blocks.sum().item<int64_t>() + mask.full_kv_num_blocks.sum().item<int64_t>());
}

TEST(ChunkAttention, Bf16InputsAccumulateInFp32) {
  auto c = named("combined", 8, 8, {0, 48});
  auto in = random_inputs(c, {4, 2, 8}, torch::kFloat32, 21);
  auto mask = mask_of(c, c.kv_range);
  auto fwd = chunk_attention_forward(in.q.to(torch::kBFloat16), in.k.to(torch::kBFloat16), in.v.to(torch::kBFloat16), mask, 1.0);
  EXPECT_EQ(fwd.out.scalar_type(), torch::kFloat32);
  auto ref = testing::reference_attention(in.q.to(torch::kBFloat16), in.k.to(torch::kBFloat16), in.v.to(torch::kBFloat16),
                                          allowed_of(c, c.kv_range), 1.0, in.dout);
  EXPECT_LE(testing::rel_error(fwd.out, ref.out), 1e-5);  // same rounded inputs, fp32 accumulation
}

TEST(LseMerge, FullyMaskedSideHasWeightZero) {
  torch::manual_seed(0);
  AttentionPartial a{torch::randn({2, 3, 5, 4}, torch::kFloat64), torch::randn({2, 3, 5}, torch::kFloat64)};
  AttentionPartial empty{torch::zeros({2, 3, 5, 4}, torch::kFloat64),
                         torch::full({2, 3, 5}, -std::numeric_limits<double>::infinity(), torch::kFloat64)};
  for (const auto& m : {lse_merge(a, empty), lse_merge(empty, a)}) {
    EXPECT_TRUE(torch::equal(m.out, a.out));
    EXPECT_TRUE(torch::equal(m.lse, a.lse));
  }
  auto both = lse_merge(empty, empty);
  EXPECT_TRUE(both.out.eq(0).all().item<bool>());
  EXPECT_TRUE(torch::isneginf(both.lse).all().item<bool>());
}

TEST(LseMerge, MatchesTheSoftmaxOverTheUnionAndNoRescaleDoesNot) {
  // One query, keys split 2 + 3 (the upstream merge test), fp64.
  torch::manual_seed(1);
  auto s = torch::randn({1, 1, 1, 5}, torch::kFloat64) * 3, v = torch::randn({1, 1, 5, 4}, torch::kFloat64);
  auto part = [&](int64_t from, int64_t len) {
    auto ss = s.narrow(3, from, len);
    return AttentionPartial{torch::matmul(torch::softmax(ss, -1), v.narrow(2, from, len)), torch::logsumexp(ss, -1)};
  };
  auto full_out = torch::matmul(torch::softmax(s, -1), v);
  auto merged = lse_merge({part(0, 2), part(2, 3)});
  EXPECT_LE(testing::max_abs_error(merged.out, full_out), 1e-14);
  EXPECT_LE(testing::max_abs_error(merged.lse, torch::logsumexp(s, -1)), 1e-14);
  auto buggy = lse_merge({part(0, 2), part(2, 3)}, LseMergeMode::kNoRescale);
  EXPECT_GT(testing::max_abs_error(buggy.out, full_out), 1e-3);
}

// Partials whose LSEs lie far apart (a gap of 100 or 1000: exp overflows fp32 past 88 and fp64 past 709) merge to
// the heavier one, in fp32 as in fp64, with no inf or NaN: the merge must shift by the larger LSE, not by either
// side's own (a shift by a.lse alone rounds the same at everyday gaps and overflows here).
TEST(LseMerge, FarApartLsesMergeWithoutOverflow) {
  for (const auto dtype : {torch::kFloat32, torch::kFloat64}) {
    for (const double gap : {100.0, 1000.0}) {
      SCOPED_TRACE(std::to_string(gap) + (dtype == torch::kFloat32 ? " fp32" : " fp64"));
      torch::manual_seed(3);
      AttentionPartial low{torch::randn({1, 2, 3, 4}, dtype), torch::full({1, 2, 3}, -gap / 2, dtype)};
      AttentionPartial high{torch::randn({1, 2, 3, 4}, dtype), torch::full({1, 2, 3}, gap / 2, dtype)};
      for (const auto& m : {lse_merge(low, high), lse_merge(high, low)}) {
        EXPECT_TRUE(torch::isfinite(m.out).all().item<bool>());
        EXPECT_TRUE(torch::allclose(m.out, high.out));
        EXPECT_TRUE(torch::allclose(m.lse, high.lse));
      }
    }
  }
}

}  // namespace
}  // namespace cpharness::kernels
