// train.trained: a run that did not train (dead, frozen or non-finite) fails, whatever the other checks say.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "harness/check/checks.h"

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

}  // namespace
}  // namespace cpharness::check
