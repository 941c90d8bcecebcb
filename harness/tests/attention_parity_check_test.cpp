// attention.parity judges each rank on its own rows: padded query rows must come out exactly zero (output and dQ)
// on the ranks that hold them. A check that looked at another rank's padding (rank 0's, which holds none) passed
// a ring that leaves the last rank's padded rows non-zero; the selftest mutant was still caught there, by the
// relative error, so only this test sees which metric fails where.
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <cmath>

#include "harness/check/checks.h"
#include "harness/train/case.h"

namespace cpharness::check {
namespace {

train::Case padded_case() {
  return train::case_from_json(nlohmann::json::parse(R"({"id": "pad", "model": {"preset": "tiny-e4b"},
    "data": {"seq_len": 32, "padding": 6, "seed": 3}, "steps": 1, "cp": [2], "block_size": 4})"), "pad.json");
}

// The padded-rows metric of each rank, in rank order.
std::vector<report::Status> padded_rows_status(const std::vector<report::CheckResult>& results) {
  std::vector<report::Status> out;
  for (const auto& r : results)
    if (r.metric == "padded_rows_max_abs") out.push_back(r.status);
  return out;
}

TEST(AttentionParityCheck, PaddedRowsAreJudgedOnTheRanksThatHoldThem) {
  const auto c = padded_case();
  cp::RingOptions ring;
  ring.q_block = c.q_block;
  ring.kv_block = c.kv_block;
  for (const auto& r : check_attention_parity(c, 2, ring)) EXPECT_EQ(r.status, report::Status::Pass) << r.metric << ": " << r.message;

  ring.mutation = cp::RingMutation::kPaddedRowsNotZeroed;  // the 6 padded tokens all lie on rank 1
  const auto statuses = padded_rows_status(check_attention_parity(c, 2, ring));
  ASSERT_EQ(statuses.size(), 2u);
  EXPECT_EQ(statuses[0], report::Status::Pass);  // rank 0 holds no padding
  EXPECT_EQ(statuses[1], report::Status::Fail);
}

// attention.parity judges the backward too: rings whose forward is exact but whose dK/dV go astray (never sent home,
// or sent to the mirror rank) fail its fp64 metric on dK or dV, on some rank, at cp 3. (A check that compared only
// out and LSE passed both; the selftest's mutants for them are caught by ring.grad_return, not here.)
TEST(AttentionParityCheck, ABackwardThatMisplacesDkDvFailsOnDkOrDv) {
  const auto c = padded_case();
  for (auto mutation : {cp::RingMutation::kDropGradReturn, cp::RingMutation::kGradReturnToWrongRank}) {
    SCOPED_TRACE(int(mutation));
    cp::RingOptions ring;
    ring.q_block = c.q_block;
    ring.kv_block = c.kv_block;
    ring.mutation = mutation;
    int failed_on_grads = 0;
    for (const auto& r : check_attention_parity(c, 3, ring)) {
      if (r.metric != "rel_l2_fp64" || r.status == report::Status::Pass) continue;
      const auto tensor = r.details.at("worst").at("tensor").get<std::string>();
      EXPECT_TRUE(tensor == "dk" || tensor == "dv") << tensor << ": " << r.message;
      ++failed_on_grads;
    }
    EXPECT_GT(failed_on_grads, 0);
  }
}

// The bf16 metric is a ratio to one rounding of the exact result: a correct ring sits near 1 on every rank (never
// 0, which is what a ratio measured on the candidate itself would read, passing anything), and a ring that sums the
// returned dK/dV in bf16 rounds once per ring step and exceeds the bound at cp 3 (its only guard besides the selftest).
TEST(AttentionParityCheck, TheBf16RatioIsNearOneForACorrectRingAndAboveTheBoundForABf16Sum) {
  const auto c = padded_case();
  cp::RingOptions ring;
  ring.q_block = c.q_block;
  ring.kv_block = c.kv_block;
  auto ratios = [&](const cp::RingOptions& options) {
    std::vector<report::CheckResult> out;
    for (const auto& r : check_attention_parity(c, 3, options))
      if (r.metric == "bf16_error_over_one_rounding") out.push_back(r);
    return out;
  };
  const auto correct = ratios(ring);
  ASSERT_EQ(correct.size(), 3u);
  for (const auto& r : correct) {
    EXPECT_EQ(r.status, report::Status::Pass) << r.message;
    EXPECT_GT(r.observed, 0.5) << "rank " << r.rank.value_or(-1) << ": not a ratio to one rounding";
  }
  ring.mutation = cp::RingMutation::kInputDtypeGradAccumulation;
  int failed = 0;
  for (const auto& r : ratios(ring)) failed += r.status == report::Status::Fail;
  EXPECT_GT(failed, 0);
}

// The metric itself, on random tensors: it sees a non-zero value of the output or of dQ in any padded row, and
// nothing outside them (a NaN there is the relative error's to catch). The ring test above only exercises the
// output: no known-bad ring leaves padded dQ non-zero with a zero output.
TEST(AttentionParityCheck, PaddedRowsMetricSeesOutputAndDqOfPaddedRowsOnly) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(7);
  for (int trial = 0; trial < 50; ++trial) {
    SCOPED_TRACE(trial);
    const int64_t B = 1 + trial % 3, H = 1 + trial % 4, L = 2 + trial % 9, D = 1 + trial % 5;
    auto padding = torch::rand({B, L}, gen) < 0.4;
    padding.index_put_({trial % B, trial % L}, true);  // at least one padded row
    const auto keep = (~padding).unsqueeze(1).unsqueeze(-1);
    auto out = torch::randn({B, H, L, D}, gen, torch::kFloat64) * keep, dq = torch::randn({B, H, L, D}, gen, torch::kFloat64) * keep;
    out.index_put_({torch::indexing::Slice(), torch::indexing::Slice(), torch::indexing::Slice(), 0},
                   torch::where(keep.squeeze(-1), std::nan(""), 0.0).expand({B, H, L}));  // NaN only in real rows
    EXPECT_EQ(padded_rows_max_abs(out, dq, padding), 0.0);
    // One padded element of one tensor made non-zero: the metric is exactly its magnitude.
    const auto rows = padding.nonzero();
    const auto pick = rows[trial % rows.size(0)];
    const int64_t b = pick[0].item<int64_t>(), l = pick[1].item<int64_t>(), h = trial % H, d = trial % D;
    const double value = -(1 + trial) * 1e-7;
    auto& spoiled = trial % 2 ? dq : out;
    spoiled.index_put_({b, h, l, d}, value);
    EXPECT_EQ(padded_rows_max_abs(out, dq, padding), -value) << (trial % 2 ? "dq" : "out");
  }
  EXPECT_EQ(padded_rows_max_abs(torch::ones({1, 1, 2, 1}), torch::ones({1, 1, 2, 1}), torch::Tensor()), 0.0);
}

}  // namespace
}  // namespace cpharness::check
