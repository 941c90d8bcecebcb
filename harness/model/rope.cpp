#include "harness/model/rope.h"

namespace cpharness::model {

torch::Tensor rope_inverse_frequencies(const RopeConfig& rope, int64_t head_dim) {
  auto f32 = torch::TensorOptions().dtype(torch::kFloat32);
  const int64_t half = head_dim / 2;
  int64_t rotating = half;
  if (rope.rope_type == "proportional") rotating = int64_t(rope.partial_rotary_factor * double(head_dim) / 2.0);
  // 1 / (base ** (arange(0, 2 * rotating, 2) / head_dim)): pow(double, fp32 tensor) then a reciprocal.
  auto exponents = torch::arange(0, 2 * rotating, 2, torch::TensorOptions().dtype(torch::kInt64)).to(torch::kFloat32) / double(head_dim);
  auto inv_freq = 1.0 / torch::pow(rope.theta, exponents);
  if (rotating < half) inv_freq = torch::cat({inv_freq, torch::zeros({half - rotating}, f32)});
  // Only the proportional type scales by `factor`; transformers' default type never reads it (a "factor" there is
  // ignored with a warning).
  return rope.rope_type == "proportional" ? inv_freq / rope.factor : inv_freq;
}

RopeTables rope_tables(const torch::Tensor& inv_freq, const torch::Tensor& position_ids, torch::ScalarType dtype) {
  auto positions = position_ids.to(torch::kFloat32).unsqueeze(-1);  // [B, S, 1]
  auto freqs = positions * inv_freq.to(position_ids.device()).view({1, 1, -1});  // one exact fp32 product
  auto emb = torch::cat({freqs, freqs}, -1);
  return {emb.cos().to(dtype), emb.sin().to(dtype)};
}

torch::Tensor apply_rope(const torch::Tensor& x, const RopeTables& tables) {
  const int64_t half = x.size(-1) / 2;
  auto rotated = torch::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
  auto cos = tables.cos.unsqueeze(2), sin = tables.sin.unsqueeze(2);
  return x * cos + rotated * sin;
}

}  // namespace cpharness::model
