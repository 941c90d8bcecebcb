// train.trained: a run that did not train (dead, frozen or non-finite) fails, whatever the other checks say. And
// two parts of the training checks judged on synthetic runs: the step-0 gradients tensor by tensor, and the bf16
// lane's per-step bound.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <optional>

#include "harness/check/checks.h"
#include "harness/io/input_error.h"
#include "harness/train/case.h"

namespace cpharness::check {
namespace {

report::LaneRun run_of(std::vector<std::pair<double, double>> loss_and_grad_norm, int cp = 2) {
  report::LaneRun r;
  r.cp = cp;
  for (auto [loss, g] : loss_and_grad_norm) r.steps.push_back({loss, g, 1.0, 10});
  return r;
}

TEST(CheckTrained, ARunThatTrainedPasses) {
  EXPECT_EQ(check_trained(run_of({{4.85, 0.3}, {4.80, 0.29}, {4.77, 0.31}})).status, report::Status::Pass);
  EXPECT_EQ(check_trained(run_of({{4.85, 0.3}})).status, report::Status::Pass);  // one step: no movement to ask for
}

// Two dead models agree perfectly: loss ln(vocab) on every step, grad norm exactly 0.
TEST(CheckTrained, ADeadModelFailsSayingWhy) {
  const double ln_vocab = std::log(128.0);
  const auto res = check_trained(run_of({{ln_vocab, 0.0}, {ln_vocab, 0.0}, {ln_vocab, 0.0}}, 4));
  EXPECT_EQ(res.status, report::Status::Fail);
  EXPECT_EQ(res.cp, 4);
  EXPECT_EQ(res.observed, 4.0);  // three zero grad norms and a frozen loss
  EXPECT_NE(res.message.find("did not train"), std::string::npos) << res.message;
  EXPECT_NE(res.message.find("grad norm exactly 0"), std::string::npos) << res.message;
  EXPECT_NE(res.message.find("on all 3 steps"), std::string::npos) << res.message;
}

TEST(CheckTrained, AFrozenLossFailsEvenWithGradients) {
  EXPECT_EQ(check_trained(run_of({{2.5, 0.1}, {2.5, 0.1}})).status, report::Status::Fail);
}

TEST(CheckTrained, NonFiniteLossOrGradNormFails) {
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  EXPECT_EQ(check_trained(run_of({{nan, 0.3}, {4.8, 0.3}})).status, report::Status::Fail);
  const auto res = check_trained(run_of({{4.85, inf}, {4.8, 0.3}}));
  EXPECT_EQ(res.status, report::Status::Fail);
  EXPECT_NE(res.message.find("non-finite"), std::string::npos) << res.message;
}

// A case may waive one part by naming it; the reason is in the message and details. Nothing else is waived, and a
// non-finite run fails whatever is waived.
TEST(CheckTrained, AnExemptionWaivesOnlyThePartItNamesAndShowsTheReason) {
  const std::map<std::string, std::string> frozen_ok = {{"loss_frozen", "lr 0 on one repeated batch"}};
  auto res = check_trained(run_of({{2.5, 0.1}, {2.5, 0.1}}), frozen_ok);
  EXPECT_EQ(res.status, report::Status::Pass) << res.message;
  EXPECT_NE(res.message.find("lr 0 on one repeated batch"), std::string::npos) << res.message;
  EXPECT_EQ(res.details.at("exemptions").at("loss_frozen"), "lr 0 on one repeated batch");
  EXPECT_EQ(check_trained(run_of({{2.5, 0.0}, {2.5, 0.0}}), frozen_ok).status, report::Status::Fail);
  const std::map<std::string, std::string> all = {
      {"loss_frozen", "a"}, {"zero_grad_norm", "b"}, {"output_ignores_input", "c"}};
  EXPECT_EQ(check_trained(run_of({{2.5, 0.0}, {2.5, 0.0}}), all).status, report::Status::Pass);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  EXPECT_EQ(check_trained(run_of({{nan, 0.1}, {2.4, 0.1}}), all).status, report::Status::Fail);
}

TEST(CheckTrained, ACaseNamesItsExemptionsWithAReasonAndCannotWaiveNonFinite) {
  auto parse = [](const std::string& exemptions) {
    return train::case_from_json(nlohmann::json::parse(R"({"id": "t", "model": {"preset": "tiny-e2b"}, "data": {"seq_len": 8},
        "trained_exemptions": )" + exemptions + "}"), "t.json");
  };
  EXPECT_EQ(parse(R"({"loss_frozen": "lr 0"})").trained_exemptions.at("loss_frozen"), "lr 0");
  auto field_of = [&](const std::string& exemptions) {
    try {
      parse(exemptions);
    } catch (const io::InputError& e) {
      return e.subject();
    }
    return std::string("(accepted)");
  };
  EXPECT_EQ(field_of(R"({"nonfinite": "it is fine"})"), "trained_exemptions.nonfinite");
  EXPECT_EQ(field_of(R"({"loss_frozen": ""})"), "trained_exemptions.loss_frozen");
  EXPECT_EQ(field_of(R"({"loss_frozen": true})"), "trained_exemptions.loss_frozen");
  EXPECT_EQ(field_of(R"({"sleepy": "x"})"), "trained_exemptions.sleepy");
  EXPECT_EQ(field_of(R"(["loss_frozen"])"), "trained_exemptions");
}

train::Case tiny_case() {
  return train::case_from_json(nlohmann::json::parse(R"({"id": "t", "model": {"preset": "tiny-e2b"}, "data": {"seq_len": 8}})"),
                               "t.json");
}

std::optional<CheckResult> step0_gradients(const std::vector<CheckResult>& results) {
  for (auto& r : results)
    if (r.metric == "grad_tensors_worst_ratio_step0") return r;
  return std::nullopt;
}

// One tensor of many off by 1e-4 (the fp32 lane allows 1e-5) fails, naming it, though the norm of all of them
// barely moves; a candidate that lacks a gradient fails too.
TEST(StepZeroGradients, OneTensorOutOfToleranceFailsAndIsNamed) {
  torch::manual_seed(3);
  report::LaneRun ref = run_of({{4.8, 1.0}}, 1), cand = run_of({{4.8, 1.0}}, 2);
  for (int i = 0; i < 20; ++i) {
    const auto g = torch::randn({16, 8}, torch::kFloat64);
    ref.grads["w" + std::to_string(i)] = g;
    cand.grads["w" + std::to_string(i)] = i == 7 ? g * (1 + 1e-4) : g.clone();
  }
  const auto c = tiny_case();
  auto res = step0_gradients(check_training(c, Tolerances{}, ref, cand, nullptr, ""));
  ASSERT_TRUE(res.has_value());
  EXPECT_EQ(res->name, "train.grad_norm_parity");
  EXPECT_EQ(res->status, report::Status::Fail);
  EXPECT_NEAR(res->observed, 10.0, 1e-6);  // 1e-4 / 1e-5
  EXPECT_EQ(res->details["worst_tensor"], "w7");
  cand.grads["w7"] = ref.grads["w7"].clone();
  EXPECT_EQ(step0_gradients(check_training(c, Tolerances{}, ref, cand, nullptr, ""))->status, report::Status::Pass);
  cand.grads.erase("w3");
  res = step0_gradients(check_training(c, Tolerances{}, ref, cand, nullptr, ""));
  ASSERT_TRUE(res.has_value());
  EXPECT_EQ(res->status, report::Status::Fail);
  EXPECT_EQ(res->details["worst_tensor"], "w3");
}

// bf16: a step at which cp 1 happens to land near the oracle does not shrink the bound below the error scale the
// earlier steps showed; a candidate above k x that scale still fails.
TEST(Bf16Bound, ALuckyStepKeepsTheErrorScaleOfTheStepsBefore) {
  auto oracle = run_of({{5.0, 1.0}, {4.9, 1.0}}, 1), ref = run_of({{5.0, 1.01}, {4.9, 1.0001}}, 1);
  oracle.lane = train::DtypeLane::kFp32;
  ref.lane = train::DtypeLane::kBf16;
  auto cand = run_of({{5.0, 1.01}, {4.9, 1.02}}, 2);
  cand.lane = train::DtypeLane::kBf16;
  Tolerances tol;
  tol.bf16_k = 3;
  auto step1 = [&](const report::LaneRun& k) {
    for (auto& r : check_training(tiny_case(), tol, ref, k, &oracle, ""))
      if (r.name == "train.grad_norm_parity" && r.step == 1) return r;
    return CheckResult{};
  };
  auto r = step1(cand);
  EXPECT_EQ(r.status, report::Status::Pass) << r.message;  // 0.02 <= 3 x 0.01 + 1e-3, not 3 x 1e-4 + 1e-3
  EXPECT_NEAR(r.threshold, 0.031, 1e-9);
  cand.steps[1].grad_norm = 1.04;
  EXPECT_EQ(step1(cand).status, report::Status::Fail);
}

}  // namespace
}  // namespace cpharness::check
