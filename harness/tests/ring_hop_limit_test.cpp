// The sliding-window hop limit (case key ring.hop_limit): sliding layers without vision groups fetch only the chunks
// their window reaches. The chunks it skips have no allowed pair, so the run is bitwise the one without the limit,
// with fewer exchanges; every check passes with it on, and ring.hop_limit counts the exchanges per layer type. The
// ring checks read the trace of every rank.
#include <gtest/gtest.h>

#include <algorithm>
#include <vector>

#include "harness/check/checks.h"
#include "harness/runner/case_runner.h"
#include "harness/runner/suite.h"
#include "harness/tests/case_report_expectations.h"
#include "harness/train/case.h"

namespace cpharness::runner {
namespace {

train::Case make_case(bool hop_limit) {
  auto j = nlohmann::json::parse(R"({"id": "hops", "model": {"preset": "tiny-e4b", "overrides": {"sliding_window": 12}},
    "data": {"seq_len": 64, "document_lengths": [30, 30], "padding": 4, "seed": 3}, "steps": 2, "cp": [4, 8],
    "block_size": 4})");
  j["ring"] = {{"hop_limit", hop_limit}};
  return train::case_from_json(j, "hops.json");
}

TEST(RingHopLimit, StepsFollowTheWindowOnSlidingLayersOnly) {
  const auto c = make_case(true);
  int sliding = 0;
  for (int64_t l = 0; l < c.model.num_hidden_layers; ++l) {
    const bool limited = c.model.layer_window(l).has_value() && !c.model.layer_vision_bidirectional(l);
    sliding += limited;
    // cp 8: S_loc 8, ceil(12 / 8) = 2; cp 4: S_loc 16, ceil(12 / 16) = 1; full layers: cp - 1.
    EXPECT_EQ(check::expected_ring_steps(c, l, 8), limited ? 2 : 7) << l;
    EXPECT_EQ(check::expected_ring_steps(c, l, 4), limited ? 1 : 3) << l;
    EXPECT_EQ(check::expected_ring_steps(make_case(false), l, 8), 7) << l;
  }
  EXPECT_GT(sliding, 0);
}

TEST(RingHopLimit, TheRunIsBitwiseTheOneWithoutTheLimitWithFewerExchanges) {
  for (int cp : {4, 8}) {
    SCOPED_TRACE(cp);
    RunOptions with, without;
    with.ring.hop_limit = true;
    with.ring.q_block = with.ring.kv_block = without.ring.q_block = without.ring.kv_block = 4;
    const auto a = run_cp(make_case(true), train::DtypeLane::kFp32, cp, with);
    const auto b = run_cp(make_case(false), train::DtypeLane::kFp32, cp, without);
    ASSERT_EQ(a.steps.size(), b.steps.size());
    for (size_t s = 0; s < a.steps.size(); ++s) {
      EXPECT_EQ(a.steps[s].loss, b.steps[s].loss) << s;
      EXPECT_EQ(a.steps[s].grad_norm, b.steps[s].grad_norm) << s;
    }
    for (auto& [name, g] : b.grads) EXPECT_TRUE(torch::equal(a.grads.at(name), g)) << name;
    for (auto& [name, p] : b.final_params) EXPECT_TRUE(torch::equal(a.final_params.at(name), p)) << name;
    for (int r = 0; r < cp; ++r) {
      EXPECT_LT(a.comm_step0.at(size_t(r)).ops(cp::CommOp::RingExchange), b.comm_step0.at(size_t(r)).ops(cp::CommOp::RingExchange));
      EXPECT_LT(a.comm_step0.at(size_t(r)).bytes(cp::CommOp::Exchange), b.comm_step0.at(size_t(r)).bytes(cp::CommOp::Exchange));
    }
  }
}

TEST(RingHopLimit, EveryCheckPassesWithTheLimit) {
  const auto rep = run_case(make_case(true), SuiteOptions{});
  ASSERT_FALSE(rep.error) << *rep.error;
  testing::expect_no_failed_check(rep);
  EXPECT_EQ(testing::results_of(rep, "ring.hop_limit").size(), 4u + 8u);  // one per rank
}

// The ring checks judge every rank, the last one too: a cp 4 run passes ring.rotation_order on all four ranks, and
// one pass of the last rank whose chunks came in the wrong order fails it there and only there. Guards against a
// loop over the ranks that stops one short (the last rank's trace never read).
TEST(RingChecks, EveryRankIsJudgedTheLastOneToo) {
  const auto c = make_case(false);
  RunOptions o;
  o.ring.q_block = o.ring.kv_block = 4;
  auto run = run_cp(c, train::DtypeLane::kFp32, 4, o);
  auto rotation_order = [&](const LaneRun& r) {
    std::vector<report::Status> out;
    for (auto& k : check::check_ring(c, r))
      if (k.name == "ring.rotation_order") out.push_back(k.status);
    return out;
  };
  const auto pass = report::Status::Pass, fail = report::Status::Fail;
  EXPECT_EQ(rotation_order(run), (std::vector<report::Status>{pass, pass, pass, pass}));
  auto& last = run.traces.at(3);
  ASSERT_FALSE(last.empty());
  ASSERT_GT(last[0].owners.size(), 1u);
  std::reverse(last[0].owners.begin(), last[0].owners.end());
  EXPECT_EQ(rotation_order(run), (std::vector<report::Status>{pass, pass, pass, fail}));
}

}  // namespace
}  // namespace cpharness::runner
