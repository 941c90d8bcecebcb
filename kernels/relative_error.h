// The one definition of relative error used by every check, comparison and test: ‖a − ref‖ / ‖ref‖ in fp64.
// Against a zero reference a relative error is undefined: it is 0 when the other side is zero too, and +inf
// otherwise (any difference from an exact zero is a real difference, never "small"). Non-finite values give
// +inf, so a NaN can never pass a `<=` threshold.
#pragma once
#include <torch/torch.h>

#include <cmath>
#include <limits>

namespace cpharness::kernels {

// From precomputed norms: NaN in either stays NaN (callers that count non-finite values report it themselves).
inline double relative_error_of_norms(double diff_norm, double ref_norm) {
  if (std::isnan(diff_norm) || std::isnan(ref_norm)) return std::numeric_limits<double>::quiet_NaN();
  if (ref_norm > 0.0 && std::isfinite(ref_norm)) return diff_norm / ref_norm;
  if (std::isinf(ref_norm)) return std::numeric_limits<double>::infinity();
  return diff_norm == 0.0 ? 0.0 : std::numeric_limits<double>::infinity();
}

// Tensors (any dtype, same shape): ‖a − ref‖₂ / ‖ref‖₂ in fp64; +inf when anything is non-finite.
inline double relative_error(const torch::Tensor& a, const torch::Tensor& ref) {
  const auto ad = a.to(torch::kFloat64), rd = ref.to(torch::kFloat64);
  const double diff = (ad - rd).norm().item<double>();
  const double r = relative_error_of_norms(diff, rd.norm().item<double>());
  return std::isfinite(r) ? r : std::numeric_limits<double>::infinity();
}

// Scalars: |a − ref| / |ref|, same conventions.
inline double relative_error(double a, double ref) {
  if (!std::isfinite(a) || !std::isfinite(ref)) return std::numeric_limits<double>::infinity();
  return relative_error_of_norms(std::abs(a - ref), std::abs(ref));
}

}  // namespace cpharness::kernels
