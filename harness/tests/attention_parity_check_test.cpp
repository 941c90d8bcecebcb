// attention.parity judges each rank on its own rows: padded query rows must come out exactly zero (output and dQ)
// on the ranks that hold them. A check that looked at another rank's padding (rank 0's, which holds none) passed
// a ring that leaves the last rank's padded rows non-zero; the selftest mutant was still caught there, by the
// relative error, so only this test sees which metric fails where.
#include <gtest/gtest.h>

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
  ring.q_block = ring.kv_block = c.block_size;
  for (const auto& r : check_attention_parity(c, 2, ring)) EXPECT_EQ(r.status, report::Status::Pass) << r.metric << ": " << r.message;

  ring.mutation = cp::RingMutation::kPaddedRowsNotZeroed;  // the 6 padded tokens all lie on rank 1
  const auto statuses = padded_rows_status(check_attention_parity(c, 2, ring));
  ASSERT_EQ(statuses.size(), 2u);
  EXPECT_EQ(statuses[0], report::Status::Pass);  // rank 0 holds no padding
  EXPECT_EQ(statuses[1], report::Status::Fail);
}

}  // namespace
}  // namespace cpharness::check
