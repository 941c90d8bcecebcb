// train.grad_reduction: the summed gradients against the ranks' own, element by element, within the rounding the
// summation is allowed (checks.h says why the parity checks cannot see a reduction that rounds too often).
#include <fmt/format.h>

#include <cmath>
#include <limits>

#include "harness/check/checks.h"

namespace cpharness::check {

namespace {

using torch::Tensor;

// Significand bits (with the implicit one) and the smallest spacing (a subnormal's) of a floating dtype.
std::pair<int, double> precision_of(torch::ScalarType dtype) {
  switch (dtype) {
    case torch::kBFloat16: return {8, std::ldexp(1.0, -133)};
    case torch::kHalf: return {11, std::ldexp(1.0, -24)};
    case torch::kFloat32: return {24, std::ldexp(1.0, -149)};
    case torch::kFloat64: return {53, std::numeric_limits<double>::denorm_min()};
    default: throw std::invalid_argument(fmt::format("reduction_error: {} is not a floating dtype", c10::toString(dtype)));
  }
}

}  // namespace

ReductionError reduction_error(const std::vector<Tensor>& locals, const Tensor& reduced, torch::ScalarType dtype) {
  if (locals.empty()) throw std::invalid_argument("reduction_error: no rank's gradients");
  const auto got = reduced.to(torch::kFloat64).reshape({-1});
  auto sum = torch::zeros_like(got), magnitude = torch::zeros_like(got);
  for (const auto& local : locals) {
    if (local.numel() != got.numel())
      throw std::invalid_argument(fmt::format("reduction_error: a rank's gradient has {} elements, the sum {}",
                                              local.numel(), got.numel()));
    const auto x = local.to(torch::kFloat64).reshape({-1});
    sum += x;
    magnitude += x.abs();
  }
  const auto [bits, min_spacing] = precision_of(dtype);
  // The buckets sum in fp32 (fp64 when a gradient is fp64), in any order: (cp - 1) additions, each within u of the
  // running sum, so within (cp - 1) u of the sum of magnitudes; the oracle's own fp64 sum likewise (1 % for the
  // second-order term). Then one rounding to the gradients' dtype: half its spacing at the value.
  const double accumulation = dtype == torch::kFloat64 ? std::ldexp(1.0, -53) : std::ldexp(1.0, -24);
  const auto summation = magnitude * (1.01 * double(locals.size() - 1) * (accumulation + std::ldexp(1.0, -53)));
  const auto largest = sum.abs() + summation;  // the fp32 sum, whose spacing is rounded to, is at most this large
  const auto exponent = std::get<1>(torch::frexp(largest));  // largest = m 2^e, m in [0.5, 1): spacing 2^(e - bits)
  auto spacing = torch::pow(2.0, (exponent - bits).to(torch::kFloat64)).clamp_min(min_spacing);
  spacing = torch::where(largest > 0, spacing, torch::zeros_like(spacing));  // all ranks 0: the sum is exactly 0
  const auto bound = summation + 0.5 * spacing;
  const auto error = (got - sum).abs();
  // A non-finite sum agrees only with itself (the same infinity, or NaN for NaN).
  const auto same_nonfinite = ~torch::isfinite(sum) & ((got == sum) | (torch::isnan(got) & torch::isnan(sum)));
  const auto beyond = (~(error <= bound) | ~torch::isfinite(sum)) & ~same_nonfinite;
  auto ratio = torch::where(bound > 0, error / bound,
                            torch::where(error > 0, torch::full_like(error, INFINITY), torch::zeros_like(error)));
  ratio = torch::where(same_nonfinite, torch::zeros_like(ratio), torch::nan_to_num(ratio, INFINITY, INFINITY));
  ReductionError out;
  out.elements = got.numel();
  out.beyond = beyond.sum().item<int64_t>();
  if (out.elements > 0) {
    out.worst_index = ratio.argmax().item<int64_t>();
    out.worst = ratio[out.worst_index].item<double>();
  }
  return out;
}

std::vector<CheckResult> check_grad_reduction(const report::LaneRun& cand) {
  const std::string name = "train.grad_reduction";
  if (cand.local_grads.empty())  // said, not passed
    return {CheckResult::skipped(name, cand.cp, "the ranks' own gradients were not recorded (\"record_tensors\": false)")};
  if (int(cand.local_grads.size()) != cand.cp)
    return {CheckResult::errored(name, cand.cp, std::nullopt,
                                 fmt::format("{} of {} ranks recorded their own gradients", cand.local_grads.size(), cand.cp))};
  const auto dtype = train::lane_dtype(cand.lane);
  ReductionError total;
  std::string worst_tensor;
  for (const auto& [tensor, reduced] : cand.grads) {
    std::vector<Tensor> locals;
    for (int r = 0; r < cand.cp; ++r) {
      const auto& mine = cand.local_grads[size_t(r)];
      const auto it = mine.find(tensor);
      if (it == mine.end())
        return {CheckResult::errored(name, cand.cp, std::nullopt, fmt::format("rank {} recorded no gradient of {}", r, tensor))};
      locals.push_back(it->second);
    }
    const auto e = reduction_error(locals, reduced, dtype);
    total.elements += e.elements;
    total.beyond += e.beyond;
    if (worst_tensor.empty() || e.worst > total.worst) total.worst = e.worst, total.worst_index = e.worst_index, worst_tensor = tensor;
  }
  if (total.elements == 0) return {CheckResult::errored(name, cand.cp, std::nullopt, "no gradient was recorded")};
  return {CheckResult::judge(name, cand.cp, std::nullopt, "elements_beyond_one_rounding", double(total.beyond), 0,
                             report::Policy::Count,
                             {{"elements", total.elements}, {"gradient_dtype", c10::toString(dtype)},
                              {"worst_error_over_bound", total.worst}, {"worst_tensor", worst_tensor},
                              {"worst_index", total.worst_index},
                              {"what", "step-0 gradients after the all-reduce (rank 0) against the exact sum of every "
                                       "rank's own: each element within one rounding to the gradients' dtype plus the "
                                       "fp32 summation's bound, (cp - 1) u of the sum of magnitudes"}})};
}

}  // namespace cpharness::check
