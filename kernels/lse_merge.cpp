#include "kernels/lse_merge.h"

#include <limits>

namespace cpharness::kernels {

AttentionPartial lse_merge(const AttentionPartial& a, const AttentionPartial& b, LseMergeMode mode) {
  TORCH_CHECK(a.out.sizes() == b.out.sizes() && a.lse.sizes() == b.lse.sizes(), "lse_merge: shape mismatch");
  // Shift by the finite max (0 where both are -inf) so exp never sees -inf - -inf.
  auto m = torch::maximum(a.lse, b.lse);
  auto shift = torch::where(torch::isinf(m), torch::zeros_like(m), m);
  auto wa = torch::exp(a.lse - shift), wb = torch::exp(b.lse - shift);
  auto sum = wa + wb;
  auto lse = shift + torch::log(sum);  // log(0) = -inf for rows empty on both sides
  if (mode == LseMergeMode::kNoRescale) return {a.out + b.out, lse};
  auto denom = torch::where(sum > 0, sum, torch::ones_like(sum));
  auto out = (a.out * (wa / denom).unsqueeze(-1)) + (b.out * (wb / denom).unsqueeze(-1));
  return {out, lse};
}

AttentionPartial lse_merge(const std::vector<AttentionPartial>& parts, LseMergeMode mode) {
  TORCH_CHECK(!parts.empty(), "lse_merge: nothing to merge");
  AttentionPartial acc = parts.front();
  for (size_t i = 1; i < parts.size(); ++i) acc = lse_merge(acc, parts[i], mode);
  return acc;
}

}  // namespace cpharness::kernels
