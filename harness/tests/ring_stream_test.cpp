// The streaming ring as a case option ("ring": {"mode": "stream"}): whole training runs give bitwise the collect
// mode's losses, gradients and parameters (fp64 and fp32 lanes, both layouts, with the hop limit and micro-batches),
// every check passes, and the case key is validated.
#include <gtest/gtest.h>

#include "harness/io/input_error.h"
#include "harness/runner/case_runner.h"
#include "harness/runner/selftest.h"
#include "harness/runner/suite.h"
#include "harness/tests/case_report_expectations.h"
#include "harness/train/case.h"

namespace cpharness::runner {
namespace {

void expect_bitwise_equal(const LaneRun& a, const LaneRun& b) {
  ASSERT_EQ(a.steps.size(), b.steps.size());
  for (size_t s = 0; s < a.steps.size(); ++s) {
    EXPECT_EQ(a.steps[s].loss, b.steps[s].loss) << s;
    EXPECT_EQ(a.steps[s].grad_norm, b.steps[s].grad_norm) << s;
  }
  ASSERT_EQ(a.grads.size(), b.grads.size());
  for (auto& [name, g] : a.grads) EXPECT_TRUE(torch::equal(g, b.grads.at(name))) << name;
  for (auto& [name, p] : a.final_params) EXPECT_TRUE(torch::equal(p, b.final_params.at(name))) << name;
}

TEST(StreamRing, WholeRunsAreBitwiseTheCollectModes) {
  struct Variant {
    std::string variant;
    train::DtypeLane lane;
    int cp;
  };
  for (const auto& v : std::vector<Variant>{{"default", train::DtypeLane::kFp64, 3},
                                            {"default", train::DtypeLane::kFp32, 4},
                                            {"zigzag", train::DtypeLane::kFp64, 2},
                                            {"micro_batches", train::DtypeLane::kFp64, 3}}) {
    SCOPED_TRACE(v.variant + " " + train::to_string(v.lane) + " cp " + std::to_string(v.cp));
    const auto c = selftest_case(v.variant);
    RunOptions collect;
    collect.ring.q_block = c.q_block;
    collect.ring.kv_block = c.kv_block;
    collect.ring.hop_limit = c.ring_hop_limit;
    collect.sharding = c.sharding == "zigzag" ? cp::Sharding::kZigzag : cp::Sharding::kContiguous;
    auto stream = collect;
    stream.ring.mode = cp::RingMode::kStream;
    const auto a = run_cp(c, v.lane, v.cp, collect), b = run_cp(c, v.lane, v.cp, stream);
    expect_bitwise_equal(a, b);
    for (int r = 0; r < v.cp; ++r)
      for (auto& e : b.traces.at(size_t(r))) EXPECT_LE(e.peak_chunks, 2) << e.layer << " " << e.pass;
  }
}

TEST(StreamRing, EveryCheckPassesInTheStreamingMode) {
  auto c = selftest_case("stream");
  c.cp_sizes = {2, 3, 4};
  const auto rep = run_case(c, SuiteOptions{});
  ASSERT_FALSE(rep.error) << *rep.error;
  testing::expect_no_failed_check(rep);
  const auto held = testing::results_of(rep, "ring.chunks_held");
  for (auto& k : held) EXPECT_LE(k.details.at("peak_chunks").get<int>(), 2);
  EXPECT_EQ(held.size(), 2u + 3u + 4u);
}

TEST(StreamRing, TheModeKeyIsValidated) {
  auto j = nlohmann::json::parse(R"({"id": "m", "model": {"preset": "tiny-e2b"}, "data": {"seq_len": 32}})");
  j["ring"] = {{"mode", "stream"}};
  EXPECT_EQ(train::case_from_json(j, "m.json").ring_mode, "stream");
  j["ring"] = {{"mode", "async"}};
  try {
    train::case_from_json(j, "m.json");
    ADD_FAILURE() << "accepted ring.mode async";
  } catch (const io::InputError& e) {
    EXPECT_EQ(e.subject(), "ring.mode");
    EXPECT_NE(std::string(e.what()).find("'async'"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace cpharness::runner
