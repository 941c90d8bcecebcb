// train.grad_reduction's bound: sound for every correct reduction (any order of fp32 or fp64 additions, then one
// rounding to the gradients' dtype), and tight enough that one step of the dtype off the correctly rounded sum, a
// predivide factor, sums in bf16, a lost rank or a mean all fail.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>

#include "harness/check/checks.h"
#include "harness/train/case.h"

namespace cpharness::check {
namespace {

using torch::Tensor;

torch::ScalarType bucket_dtype(torch::ScalarType dtype) { return dtype == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32; }

// What all_reduce_gradients does: the ranks' gradients summed in the bucket's dtype in `order`, then copied back.
Tensor reduce_in_order(const std::vector<Tensor>& locals, const std::vector<int>& order, torch::ScalarType dtype) {
  auto sum = locals[size_t(order[0])].to(bucket_dtype(dtype));
  for (size_t i = 1; i < order.size(); ++i) sum = sum + locals[size_t(order[i])].to(bucket_dtype(dtype));
  return sum.to(dtype);
}

// Pairwise, as a tree reduction adds: ((0 + 1) + (2 + 3)) + ...
Tensor reduce_as_tree(std::vector<Tensor> parts, torch::ScalarType dtype) {
  for (auto& p : parts) p = p.to(bucket_dtype(dtype));
  while (parts.size() > 1) {
    std::vector<Tensor> next;
    for (size_t i = 0; i + 1 < parts.size(); i += 2) next.push_back(parts[i] + parts[i + 1]);
    if (parts.size() % 2) next.push_back(parts.back());
    parts = next;
  }
  return parts.front().to(dtype);
}

std::vector<Tensor> in_fp64(const std::vector<Tensor>& locals) {
  std::vector<Tensor> out;
  for (auto& l : locals) out.push_back(l.to(torch::kFloat64));
  return out;
}

// cp ranks' gradients of `n` elements in `dtype`: values spread over 2^spread in magnitude, random signs, some exact
// zeros, and (when `cancel`) elements where two ranks cancel exactly.
std::vector<Tensor> random_gradients(std::mt19937& rng, int cp, int64_t n, torch::ScalarType dtype, int spread, bool cancel) {
  torch::manual_seed(rng());
  std::vector<Tensor> out;
  for (int r = 0; r < cp; ++r) {
    auto scale = torch::pow(2.0, torch::randint(-spread / 2, spread / 2 + 1, {n}, torch::kFloat64));
    auto g = torch::randn({n}, torch::kFloat64) * scale;
    g = torch::where(torch::rand({n}) < 0.05, torch::zeros_like(g), g);
    out.push_back(g.to(dtype));
  }
  if (cancel) {
    auto where = torch::rand({n}) < 0.1;
    out[1] = torch::where(where, -out[0], out[1]);
  }
  return out;
}

TEST(GradReduction, EveryCorrectReductionOrderPassesInEveryLane) {
  std::mt19937 rng(20261207);
  const torch::ScalarType dtypes[] = {torch::kBFloat16, torch::kHalf, torch::kFloat32, torch::kFloat64};
  for (int trial = 0; trial < 300; ++trial) {
    const auto dtype = dtypes[trial % 4];
    const int cp = 2 + int(rng() % 15);
    const int spread = dtype == torch::kHalf ? 8 : int(rng() % 40);  // fp16 overflows past about 2^15
    const auto locals = random_gradients(rng, cp, 512, dtype, spread, trial % 3 == 0);
    std::vector<int> order(static_cast<size_t>(cp));
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    for (const auto& reduced : {reduce_in_order(locals, order, dtype), reduce_as_tree(locals, dtype)}) {
      const auto e = reduction_error(in_fp64(locals), reduced.to(torch::kFloat64), dtype);
      ASSERT_EQ(e.beyond, 0) << "trial " << trial << " " << c10::toString(dtype) << " cp " << cp << " spread " << spread
                             << ": worst " << e.worst << " at " << e.worst_index;
      EXPECT_LE(e.worst, 1.0);
      EXPECT_EQ(e.elements, 512);
    }
  }
}

// The bf16 value next to the correctly rounded sum, on the side away from the exact sum (upward when it is exact).
Tensor one_bf16_step_away(const Tensor& exact) {
  const auto rounded = exact.to(torch::kBFloat16);
  auto bits = rounded.view(torch::kInt16).to(torch::kInt32);  // positive values: +1 is the next larger
  const auto up = exact <= rounded.to(torch::kFloat64);
  bits = torch::where(up, bits + 1, bits - 1);
  return bits.to(torch::kInt16).view(torch::kBFloat16).to(torch::kFloat64);
}

// Positive gradients within 2^4 of each other: no cancellation, so the summation's own bound is far below the
// inputs' granularity and one bf16 step off the correctly rounded sum is always beyond it.
TEST(GradReduction, OneBf16StepOffTheCorrectlyRoundedSumAlwaysFails) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 40; ++trial) {
    const int cp = 2 + int(rng() % 7);
    torch::manual_seed(rng());
    std::vector<Tensor> locals;
    for (int r = 0; r < cp; ++r)
      locals.push_back((torch::rand({1024}, torch::kFloat64) * 15 + 1).mul(std::ldexp(1.0, int(rng() % 20) - 10))
                           .to(torch::kBFloat16).to(torch::kFloat64));
    auto exact = locals[0].clone();
    for (int r = 1; r < cp; ++r) exact += locals[size_t(r)];
    // The reduction done right passes; one step off fails everywhere.
    EXPECT_EQ(reduction_error(locals, exact.to(torch::kBFloat16).to(torch::kFloat64), torch::kBFloat16).beyond, 0);
    const auto e = reduction_error(locals, one_bf16_step_away(exact), torch::kBFloat16);
    EXPECT_EQ(e.beyond, 1024) << "trial " << trial << " cp " << cp;
    EXPECT_GT(e.worst, 1.0);
  }
}

// The known-bad reductions, each on standard-normal bf16 gradients.
class KnownBadReduction : public ::testing::Test {
 protected:
  std::vector<Tensor> locals_bf16(int cp) {
    torch::manual_seed(11);
    std::vector<Tensor> out;
    for (int r = 0; r < cp; ++r) out.push_back(torch::randn({4096}).to(torch::kBFloat16));
    return out;
  }
  int64_t beyond(const std::vector<Tensor>& locals, const Tensor& reduced, torch::ScalarType dtype) {
    return reduction_error(in_fp64(locals), reduced.to(torch::kFloat64), dtype).beyond;
  }
};

TEST_F(KnownBadReduction, APredivideFactorInBf16Fails) {
  const auto locals = locals_bf16(3);
  std::vector<Tensor> divided;
  for (auto& l : locals) divided.push_back(l / 3.0);  // bf16 / scalar stays bf16: rounded
  const auto reduced = reduce_in_order(divided, {0, 1, 2}, torch::kBFloat16) * 3.0;
  EXPECT_GT(beyond(locals, reduced, torch::kBFloat16), 100);
  EXPECT_EQ(beyond(locals, reduce_in_order(locals, {0, 1, 2}, torch::kBFloat16), torch::kBFloat16), 0);
}

TEST_F(KnownBadReduction, SumsInBf16Fail) {
  const auto locals = locals_bf16(4);
  auto reduced = locals[0];
  for (int r = 1; r < 4; ++r) reduced = reduced + locals[size_t(r)];  // bf16 + bf16 rounds each time
  EXPECT_GT(beyond(locals, reduced, torch::kBFloat16), 100);
}

TEST_F(KnownBadReduction, ALostRankOrAMeanFailsInFp32) {
  std::vector<Tensor> locals;
  for (auto& l : locals_bf16(3)) locals.push_back(l.to(torch::kFloat32));
  EXPECT_GT(beyond(locals, reduce_in_order(locals, {0, 1}, torch::kFloat32), torch::kFloat32), 4000);
  EXPECT_GT(beyond(locals, reduce_in_order(locals, {0, 1, 2}, torch::kFloat32) / 3.0, torch::kFloat32), 4000);
}

TEST(GradReduction, NonFiniteSumsAgreeOnlyWithThemselves) {
  const double inf = INFINITY, nan = NAN;
  const std::vector<Tensor> locals = {torch::tensor({inf, nan, 1.0, 0.0}, torch::kFloat64),
                                      torch::tensor({1.0, 1.0, 2.0, 0.0}, torch::kFloat64)};
  EXPECT_EQ(reduction_error(locals, torch::tensor({inf, nan, 3.0, 0.0}, torch::kFloat64), torch::kFloat32).beyond, 0);
  const auto e = reduction_error(locals, torch::tensor({-inf, 0.0, 3.0, 1e-45}, torch::kFloat64), torch::kFloat32);
  EXPECT_EQ(e.beyond, 3);  // -inf for inf, a number for NaN, anything but 0 for an all-zero sum
}

report::LaneRun run_with(const std::vector<Tensor>& locals, const Tensor& reduced, train::DtypeLane lane) {
  report::LaneRun run;
  run.cp = int(locals.size());
  run.lane = lane;
  run.grads["w"] = reduced.to(torch::kFloat64);
  for (auto& l : locals) run.local_grads.push_back(std::map<std::string, Tensor>{{"w", l.to(torch::kFloat64)}});
  return run;
}

TEST(GradReduction, TheCheckJudgesTheRunsTensorsAndSaysWhatItCouldNot) {
  torch::manual_seed(3);
  std::vector<Tensor> locals;
  for (int r = 0; r < 3; ++r) locals.push_back(torch::randn({64}).to(torch::kBFloat16));
  const auto right = reduce_in_order(locals, {0, 1, 2}, torch::kBFloat16);
  auto pass = check_grad_reduction(run_with(locals, right, train::DtypeLane::kBf16));
  ASSERT_EQ(pass.size(), 1u);
  EXPECT_EQ(pass[0].name, "train.grad_reduction");
  EXPECT_EQ(pass[0].status, report::Status::Pass) << pass[0].message;
  EXPECT_EQ(pass[0].details.at("elements"), 64);

  auto fail = check_grad_reduction(run_with(locals, right * 1.01, train::DtypeLane::kBf16));
  EXPECT_EQ(fail[0].status, report::Status::Fail);
  EXPECT_EQ(fail[0].details.at("worst_tensor"), "w");

  auto missing_rank = run_with(locals, right, train::DtypeLane::kBf16);
  missing_rank.local_grads.pop_back();
  EXPECT_EQ(check_grad_reduction(missing_rank)[0].status, report::Status::Error);
  auto missing_tensor = run_with(locals, right, train::DtypeLane::kBf16);
  missing_tensor.local_grads[1].clear();
  const auto error = check_grad_reduction(missing_tensor);
  EXPECT_EQ(error[0].status, report::Status::Error);
  EXPECT_NE(error[0].message.find("rank 1"), std::string::npos) << error[0].message;

  report::LaneRun unrecorded;
  unrecorded.cp = 2;
  EXPECT_EQ(check_grad_reduction(unrecorded)[0].status, report::Status::Skipped);
}

}  // namespace
}  // namespace cpharness::check
