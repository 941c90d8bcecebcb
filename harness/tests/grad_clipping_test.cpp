// Gradient clipping (optimizer.max_grad_norm): the gradients are scaled to the global norm before the update, the
// norm is recorded before clipping, and cp N stays in parity with cp 1 while clipping is active.
#include <gtest/gtest.h>

#include "harness/io/input_error.h"
#include "harness/runner/case_runner.h"
#include "harness/runner/suite.h"
#include "harness/train/case.h"
#include "harness/train/trainer.h"

namespace cpharness {
namespace {

TEST(GradClipping, ScalesGradientsToTheMaxNormOnlyWhenAbove) {
  auto p = torch::zeros({4}, torch::kFloat64).requires_grad_();
  p.mutable_grad() = torch::tensor({6.0, 8.0, 0.0, 0.0}, torch::kFloat64);  // norm 10
  train::OptimizerOptions o;
  o.lr = 0;
  o.max_grad_norm = 20;
  auto adamw = train::make_adamw({p}, o);
  train::optimizer_step(*adamw, o, 10.0);
  EXPECT_TRUE(torch::equal(p.grad(), torch::tensor({6.0, 8.0, 0.0, 0.0}, torch::kFloat64)));
  o.max_grad_norm = 1;
  train::optimizer_step(*adamw, o, 10.0);
  EXPECT_NEAR(p.grad().norm().item<double>(), 1.0, 1e-6);
  EXPECT_NEAR(p.grad()[0].item<double>() / p.grad()[1].item<double>(), 0.75, 1e-12);  // direction kept
}

train::Case make_case(std::optional<double> max_grad_norm) {
  auto j = nlohmann::json::parse(R"({"id": "clip", "model": {"preset": "tiny-31b"},
    "data": {"seq_len": 32, "document_lengths": [14, 14], "padding": 4, "seed": 8}, "steps": 3, "cp": [2, 4],
    "optimizer": {"lr": 0.001}, "checks": ["train.", "ring."]})");
  if (max_grad_norm) j["optimizer"]["max_grad_norm"] = *max_grad_norm;
  return train::case_from_json(j, "clip.json");
}

TEST(GradClipping, CpStaysInParityWhileClippingIsActive) {
  const auto clipped = runner::run_case(make_case(0.5), runner::SuiteOptions{});
  ASSERT_FALSE(clipped.error) << *clipped.error;
  for (auto& k : clipped.checks)
    EXPECT_EQ(k.status, report::Status::Pass) << k.name << " cp " << k.cp << ": " << k.message;
  // Clipping was active (the step-0 norm is well above 0.5) and took effect: the runs part from the unclipped
  // ones after step 0, whose recorded norm (taken before clipping) is the same.
  const auto a = runner::run_reference(make_case(0.5), train::DtypeLane::kFp32);
  const auto b = runner::run_reference(make_case(std::nullopt), train::DtypeLane::kFp32);
  ASSERT_GT(b.steps.at(0).grad_norm, 2 * 0.5);
  EXPECT_EQ(a.steps.at(0).grad_norm, b.steps.at(0).grad_norm);
  EXPECT_NE(a.steps.at(1).loss, b.steps.at(1).loss);
  EXPECT_NE(a.steps.at(0).param_norm, b.steps.at(0).param_norm);
}

TEST(GradClipping, ANonPositiveMaxIsAnInputErrorNamingTheKey) {
  for (double bad : {0.0, -1.0}) {
    try {
      make_case(bad);
      ADD_FAILURE() << bad << " accepted";
    } catch (const io::InputError& e) {
      EXPECT_EQ(e.subject(), "optimizer.max_grad_norm");
    }
  }
}

}  // namespace
}  // namespace cpharness
