// Load-balanced (zigzag) sharding as a case option ("sharding": "zigzag"): 2 cp sub-chunks, rank r holds r and
// 2cp-1-r. The case key is validated, the fp64 lane gives cp 1's loss and gradients under both layouts, every check
// passes under zigzag (shard.layout among them), and a batch laid out in the wrong order is caught.
#include <gtest/gtest.h>

#include "harness/check/checks.h"
#include "harness/io/input_error.h"
#include "harness/runner/case_runner.h"
#include "harness/runner/selftest.h"
#include "harness/runner/suite.h"
#include "harness/tests/case_report_expectations.h"
#include "harness/train/case.h"

namespace cpharness::runner {
namespace {

nlohmann::json base_case() {
  return nlohmann::json::parse(R"({"id": "zz", "model": {"preset": "tiny-e2b"},
    "data": {"seq_len": 50, "document_lengths": [20, 24], "padding": 6, "seed": 4}, "steps": 2, "cp": [2, 3],
    "block_size": 4})");
}

TEST(ZigzagSharding, TheCaseKeyIsValidatedWithFieldAndReason) {
  auto j = base_case();
  j["sharding"] = "zigzag";
  EXPECT_EQ(check::case_sharding(train::case_from_json(j, "zz.json")), cp::Sharding::kZigzag);
  EXPECT_EQ(check::case_sharding(train::case_from_json(base_case(), "zz.json")), cp::Sharding::kContiguous);
  auto expect_error = [](const nlohmann::json& bad, const std::string& field, const std::string& reason) {
    try {
      train::case_from_json(bad, "zz.json");
      ADD_FAILURE() << "accepted: " << bad.dump();
    } catch (const io::InputError& e) {
      EXPECT_EQ(e.subject(), field);
      EXPECT_NE(std::string(e.what()).find(reason), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("zz.json"), std::string::npos) << e.what();
    }
  };
  j["sharding"] = "striped";
  expect_error(j, "sharding", "unknown layout 'striped'");
  j["sharding"] = 2;
  expect_error(j, "sharding", "expected a string");
  j["sharding"] = "zigzag";
  j["ring"] = {{"hop_limit", true}};
  expect_error(j, "ring.hop_limit", "contiguous");
}

TEST(ZigzagSharding, Fp64LossAndGradientsEqualCp1UnderBothLayouts) {
  auto j = base_case();
  const auto contiguous = train::case_from_json(j, "zz.json");
  j["sharding"] = "zigzag";
  const auto zigzag = train::case_from_json(j, "zz.json");
  RunOptions o;
  o.ring.q_block = o.ring.kv_block = 4;
  const auto ref = run_reference(contiguous, train::DtypeLane::kFp64, o);
  for (int cp : {2, 3, 4}) {
    for (auto sharding : {cp::Sharding::kContiguous, cp::Sharding::kZigzag}) {
      SCOPED_TRACE(std::to_string(cp) + " " + cp::to_string(sharding));
      o.sharding = sharding;
      const auto run = run_cp(sharding == cp::Sharding::kZigzag ? zigzag : contiguous, train::DtypeLane::kFp64, cp, o);
      ASSERT_EQ(run.steps.size(), ref.steps.size());
      for (size_t s = 0; s < run.steps.size(); ++s)
        EXPECT_NEAR(run.steps[s].loss, ref.steps[s].loss, 1e-12 * std::abs(ref.steps[s].loss)) << s;
      for (auto& [name, g] : ref.grads) {
        const double denom = g.norm().item<double>();
        const double err = (run.grads.at(name) - g).norm().item<double>();
        EXPECT_LE(denom > 0 ? err / denom : err, 1e-10) << name;
      }
      // Logits come back in global order whatever the layout (real tokens: padded rows are not the model's output).
      EXPECT_LE((run.logits - ref.logits).narrow(1, 0, 44).abs().max().item<double>(), 1e-10);
    }
  }
}

TEST(ZigzagSharding, EveryCheckPassesAndTheLayoutCheckJudgesEveryRank) {
  auto c = selftest_case("zigzag");
  c.cp_sizes = {2, 3, 4};
  const auto rep = run_case(c, SuiteOptions{});
  ASSERT_FALSE(rep.error) << *rep.error;
  testing::expect_no_failed_check(rep);
  const auto layout = testing::results_of(rep, "shard.layout");
  for (auto& k : layout) EXPECT_EQ(k.details.at("sharding"), "zigzag");
  EXPECT_EQ(layout.size(), 2u + 3u + 4u);  // one per rank
}

TEST(ZigzagSharding, SwappedSubChunksAreCaughtByTheLayoutAndTheParityChecks) {
  auto c = selftest_case("zigzag");
  c.checks = {"shard.layout", "train.loss_parity"};
  SuiteOptions o;
  o.run.step_mutation = StepMutation::kSwapZigzagHalves;
  const auto rep = run_case(c, o);
  ASSERT_FALSE(rep.error) << *rep.error;
  int layout_failures = 0, loss_failures = 0;
  for (auto& k : rep.checks) {
    layout_failures += k.name == "shard.layout" && k.status == report::Status::Fail;
    loss_failures += k.name == "train.loss_parity" && k.status == report::Status::Fail;
  }
  EXPECT_EQ(layout_failures, 3);  // every rank of cp 3
  EXPECT_GT(loss_failures, 0);    // and the numbers show it: the ring attended the wrong tokens
}

// Under zigzag a chunk with work holds sub-chunk pairs without any: at ring step 0 a rank's early queries against its
// own late keys. Skipping them moves no number; computing them is waste the chunk-level skip cannot see, so
// ring.hop_limit counts the attentions the chunk compute actually ran, by their global ranges.
TEST(ZigzagSharding, SubChunkPairsWithoutWorkAreSkippedAndComputingThemIsCaught) {
  const auto c = selftest_case("zigzag");
  RunOptions o;
  o.ring.q_block = o.ring.kv_block = 4;
  o.sharding = cp::Sharding::kZigzag;
  auto wasted_of = [&](const report::LaneRun& run) {
    int64_t wasted = 0, checked = 0;
    for (auto& k : check::check_ring(c, run))
      if (k.name == "ring.hop_limit" && k.metric == "chunks_computed_without_work") wasted += int64_t(k.observed), ++checked;
    EXPECT_EQ(checked, run.cp);  // one per rank
    return wasted;
  };
  const auto right = run_cp(c, train::DtypeLane::kFp64, 3, o);
  int64_t segments = 0, chunks_with_work = 0;
  for (auto& trace : right.traces)
    for (auto& e : trace) {
      for (auto& [q, ql, kv, kl] : e.segments) EXPECT_LT(kv, q + ql) << "layer " << e.layer << " " << e.pass;
      segments += int64_t(e.segments.size());
      for (bool w : e.computed) chunks_with_work += w;
    }
  EXPECT_GT(chunks_with_work, 0);
  EXPECT_LT(segments, 4 * chunks_with_work);  // some pairs of chunks with work were skipped
  EXPECT_EQ(wasted_of(right), 0);

  o.ring.mutation = cp::RingMutation::kComputesEmptySegmentPairs;
  const auto wasteful = run_cp(c, train::DtypeLane::kFp64, 3, o);
  EXPECT_GT(wasted_of(wasteful), 0);
  for (size_t s = 0; s < right.steps.size(); ++s) EXPECT_EQ(wasteful.steps[s].loss, right.steps[s].loss);  // bitwise
  for (auto& [name, g] : right.grads) EXPECT_TRUE(torch::equal(wasteful.grads.at(name), g)) << name;
}

}  // namespace
}  // namespace cpharness::runner
