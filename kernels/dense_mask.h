// The dense mask: the ground truth every other mask form is checked against.
#pragma once
#include "kernels/mask_spec.h"

namespace cpharness::kernels {

// Allowed(q, k) for every q in `q_range` and k in `kv_range` (global token indices), as a bool tensor
// [B, Sq, Skv]. `q_meta` holds the metadata of exactly the q range, `kv_meta` of exactly the kv range.
//   allowed = (k <= q [if causal] and q - k < W [if windowed])
//             OR (same vision group >= 0 [if vision_bidirectional and windowed])
//             AND same document > 0 [if document ids exist]
//             AND key not padding
// `batch` is the batch size (used when no metadata tensor is defined).
torch::Tensor dense_mask(const TokenMetadata& q_meta, const TokenMetadata& kv_meta, TokenRange q_range,
                         TokenRange kv_range, const LayerGeometry& geometry, int64_t batch);

// The same for one sequence seen whole: q and kv both cover [0, S) of `meta`.
torch::Tensor dense_mask(const TokenMetadata& meta, const LayerGeometry& geometry, int64_t batch, int64_t seq_len);

}  // namespace cpharness::kernels
