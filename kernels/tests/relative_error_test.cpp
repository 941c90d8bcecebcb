// The one relative error every check, comparison and test uses: its zero-reference and non-finite behaviour.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "kernels/relative_error.h"

namespace cpharness::kernels {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

TEST(RelativeError, IsTheL2NormOfTheDifferenceOverTheReference) {
  const auto ref = torch::tensor({3.0, 4.0});  // norm 5
  EXPECT_DOUBLE_EQ(relative_error(torch::tensor({3.0, 4.5}), ref), 0.5 / 5.0);
  EXPECT_DOUBLE_EQ(relative_error(ref.to(torch::kFloat32), ref), 0.0);
  EXPECT_DOUBLE_EQ(relative_error(2.5, 2.0), 0.25);
  EXPECT_DOUBLE_EQ(relative_error(-2.5, -2.0), 0.25);
}

TEST(RelativeError, AgainstAZeroReferenceIsTheAbsoluteDifference) {
  const auto zero = torch::zeros({4}, torch::kFloat64);
  EXPECT_EQ(relative_error(zero, zero), 0.0);
  EXPECT_NEAR(relative_error(torch::tensor({0.0, 3e-9, 0.0, 4e-9}, torch::kFloat64), zero), 5e-9, 1e-20);  // rounding noise stays small
  EXPECT_DOUBLE_EQ(relative_error(torch::tensor({0.0, 3.0, 0.0, 4.0}), zero), 5.0);      // a real difference does not
  EXPECT_EQ(relative_error(0.0, 0.0), 0.0);
  EXPECT_DOUBLE_EQ(relative_error(1e-3, 0.0), 1e-3);
  EXPECT_DOUBLE_EQ(relative_error_of_norms(2.0, 0.0), 2.0);
}

TEST(RelativeError, NonFiniteIsInfinitySoNoThresholdPasses) {
  const auto ref = torch::tensor({1.0, 2.0});
  EXPECT_EQ(relative_error(torch::tensor({kNaN, 2.0}), ref), kInf);
  EXPECT_EQ(relative_error(torch::tensor({kInf, 2.0}), ref), kInf);
  EXPECT_EQ(relative_error(ref, torch::tensor({kNaN, 2.0})), kInf);
  EXPECT_EQ(relative_error(kNaN, 1.0), kInf);
  EXPECT_EQ(relative_error(1.0, kInf), kInf);
  EXPECT_FALSE(relative_error(kNaN, kNaN) <= 1e300);
  // From norms, NaN stays NaN for callers that count non-finite entries themselves; NaN fails `<=` too.
  EXPECT_TRUE(std::isnan(relative_error_of_norms(kNaN, 1.0)));
  EXPECT_EQ(relative_error_of_norms(1.0, kInf), kInf);
}

}  // namespace
}  // namespace cpharness::kernels
