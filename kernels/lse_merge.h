// Merging partial attention results over disjoint key sets by their log-sum-exp (cp-reference §1.5).
#pragma once
#include <vector>

#include <torch/torch.h>

namespace cpharness::kernels {

// One attention result over some keys: out [B, Hq, Sq, D] normalised over those keys, lse [B, Hq, Sq]
// (natural log; -inf for rows with no allowed key, whose out rows are 0).
struct AttentionPartial {
  torch::Tensor out;
  torch::Tensor lse;
};

enum class LseMergeMode {
  kStable,     // lse = logaddexp(a, b); out = out_a * exp(a - lse) + out_b * exp(b - lse)
  kNoRescale,  // KNOWN-BAD, for selftest mutants only: out = out_a + out_b, lse as kStable
};

// Merges b into a. Stable against -inf on either or both sides: a fully masked side has weight 0, a row
// empty on both sides stays out = 0, lse = -inf, never NaN. Works in the dtype of the inputs.
AttentionPartial lse_merge(const AttentionPartial& a, const AttentionPartial& b,
                           LseMergeMode mode = LseMergeMode::kStable);

// Left fold over `parts` (at least one).
AttentionPartial lse_merge(const std::vector<AttentionPartial>& parts, LseMergeMode mode = LseMergeMode::kStable);

}  // namespace cpharness::kernels
