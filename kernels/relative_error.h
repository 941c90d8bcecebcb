// The one definition of relative error used by every check, comparison and test: ‖a − ref‖ / ‖ref‖ in fp64.
// Against a zero reference a relative error is undefined; the absolute ‖a − ref‖ is returned instead (the
// difference measured against a unit scale). A tensor that is zero in exact arithmetic comes out as rounding
// noise in floating point (one allowed key: dS = P (dP − D) = 0 only up to rounding), and that noise must be
// judged by its size, not as an infinite error. Non-finite values give +inf, so a NaN never passes `<=`.
#pragma once
#include <torch/torch.h>

#include <cmath>
#include <limits>

namespace cpharness::kernels {

// From precomputed norms: NaN in either stays NaN (callers that count non-finite values report it themselves).
inline double relative_error_of_norms(double diff_norm, double ref_norm) {
  if (std::isnan(diff_norm) || std::isnan(ref_norm)) return std::numeric_limits<double>::quiet_NaN();
  if (std::isinf(ref_norm)) return std::numeric_limits<double>::infinity();
  return ref_norm > 0.0 ? diff_norm / ref_norm : diff_norm;
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
