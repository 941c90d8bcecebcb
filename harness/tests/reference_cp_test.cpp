// reference_cp: candidates judged against a ring run at a smaller CP size instead of cp 1 (for sequences cp 1
// cannot hold). cp 4 against a cp 2 reference must reach the verdicts cp 4 against cp 1 reaches: both pass on a
// correct ring, the two references agree, and a planted ring bug fails both (the reference never runs the mutant).
#include <gtest/gtest.h>

#include "harness/runner/golden.h"
#include "harness/runner/suite.h"
#include "harness/train/case.h"

namespace cpharness::runner {
namespace {

train::Case make_case(int reference_cp, const std::string& dtype = "fp32") {
  auto j = nlohmann::json::parse(R"({"id": "ref", "model": {"preset": "tiny-31b"},
    "data": {"seq_len": 48, "document_lengths": [20, 16], "padding": 12, "vision_runs": [[6, 8]], "seed": 5},
    "steps": 3, "cp": [4], "optimizer": {"lr": 0.0001},
    "checks": ["train.", "ring.", "cache.", "attention."]})");
  j["dtype"] = dtype;
  j["reference_cp"] = reference_cp;
  return train::case_from_json(j, "ref.json");
}

std::vector<std::string> failed(const report::CaseReport& r) {
  std::vector<std::string> out;
  for (auto& k : r.checks)
    if (k.status == report::Status::Fail || k.status == report::Status::Error) out.push_back(k.name + ": " + k.message);
  return out;
}

TEST(ReferenceCp, Cp4AgainstACp2ReferenceAgreesWithCp4AgainstCp1) {
  SuiteOptions o;
  const auto one = run_case(make_case(1), o);
  const auto two = run_case(make_case(2), o);
  ASSERT_FALSE(one.error) << *one.error;
  ASSERT_FALSE(two.error) << *two.error;
  EXPECT_TRUE(failed(one).empty()) << ::testing::PrintToString(failed(one));
  EXPECT_TRUE(failed(two).empty()) << ::testing::PrintToString(failed(two));
  EXPECT_FALSE(one.reference_cp.has_value());
  ASSERT_EQ(two.reference_cp, 2);
  // The same checks ran, and the two references (cp 1, cp 2) agree to fp32 summation order.
  EXPECT_EQ(one.checks.size(), two.checks.size());
  const auto& r1 = one.trajectories.at(1);
  const auto& r2 = two.trajectories.at(2);
  for (size_t s = 0; s < r1.loss.size(); ++s) {
    EXPECT_NEAR(r2.loss[s], r1.loss[s], 1e-5 * r1.loss[s]);
    EXPECT_NEAR(r2.grad_norm[s], r1.grad_norm[s], 1e-5 * r1.grad_norm[s]);
  }
  // The cp 4 candidate is the same run in both.
  EXPECT_EQ(one.trajectories.at(4).loss, two.trajectories.at(4).loss);
}

TEST(ReferenceCp, APlantedRingBugFailsAgainstEitherReference) {
  for (int reference_cp : {1, 2}) {
    SuiteOptions o;
    o.run.ring.mutation = cp::RingMutation::kDropGradReturn;
    const auto r = run_case(make_case(reference_cp), o);
    ASSERT_FALSE(r.error) << *r.error;
    EXPECT_FALSE(failed(r).empty()) << "reference_cp " << reference_cp << ": the dropped dK/dV return went unseen";
  }
}

// train.param_parity judges the final weights by the update the reference made (final - initial), which a ring
// reference records as cp 1 does: against the weights, a candidate that drops weight decay (3e-6 of the weights
// after three steps, inside 1e-5) passed against a cp 2 reference while it failed against cp 1.
TEST(ReferenceCp, AWrongUpdateFailsAgainstEitherReference) {
  for (int reference_cp : {1, 2}) {
    SuiteOptions o;
    o.run.step_mutation = StepMutation::kCandidatesWithoutWeightDecay;
    const auto r = run_case(make_case(reference_cp), o);
    ASSERT_FALSE(r.error) << *r.error;
    bool params_failed = false;
    for (auto& k : r.checks)
      if (k.name == "train.param_parity" && !k.step && k.status == report::Status::Fail) params_failed = true;
    EXPECT_TRUE(params_failed) << "reference_cp " << reference_cp << ": the dropped weight decay went unseen";
  }
}

TEST(ReferenceCp, IsValidated) {
  auto j = nlohmann::json::parse(R"({"id": "t", "model": {"preset": "tiny-e2b"}, "data": {"seq_len": 8}})");
  j["reference_cp"] = 0;
  EXPECT_THROW(train::case_from_json(j, "c.json"), std::exception);
}

// A golden's case hash covers what moves the reference's numbers: the ring's block size and mask cache only when
// the reference is itself a ring run; the data seed always.
TEST(ReferenceCp, TheGoldenCaseHashCoversTheRingOnlyWhenTheReferenceIsARing) {
  auto with = [](int reference_cp, const char* extra) {
    auto j = make_case(reference_cp).raw;
    j.merge_patch(nlohmann::json::parse(extra));
    return case_hash(train::case_from_json(j, "ref.json"));
  };
  EXPECT_EQ(with(1, "{}"), with(1, R"({"block_size": 8, "block_mask_cache": false})"));
  EXPECT_NE(with(2, "{}"), with(2, R"({"block_size": 8})"));
  EXPECT_NE(with(2, "{}"), with(2, R"({"block_mask_cache": false})"));
  EXPECT_NE(with(1, "{}"), with(1, R"({"data": {"seed": 6}})"));
  EXPECT_EQ(with(1, "{}"), with(1, R"({"description": "another", "cp": [2]})"));
}

}  // namespace
}  // namespace cpharness::runner
