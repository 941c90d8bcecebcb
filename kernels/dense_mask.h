// The dense mask: the ground truth every other mask form is checked against.
#pragma once
#include "kernels/mask_spec.h"

namespace cpharness::kernels {

// Allowed(q, k) for every q in `q_range` and k in `kv_range` (global token indices), as a bool tensor
// [B, Sq, Skv]. `q_meta` holds the metadata of exactly the q range, `kv_meta` of exactly the kv range.
//   allowed = (k <= q [if causal] OR same vision group >= 0 [if vision_bidirectional])
//             AND q - k < W [if windowed]
//             AND same document > 0 [if document ids exist]
// (transformers >= 5.13; with vision_group_past_window, as 5.5 .. 5.12 built it, the group is OR'd after the window:
//  (k <= q and q - k < W) OR same vision group >= 0.)
//             AND key not padding
// `batch` is the batch size (used when no metadata tensor is defined).
torch::Tensor dense_mask(const TokenMetadata& q_meta, const TokenMetadata& kv_meta, TokenRange q_range,
                         TokenRange kv_range, const LayerGeometry& geometry, int64_t batch);

// The same for one sequence seen whole: q and kv both cover [0, S) of `meta`.
torch::Tensor dense_mask(const TokenMetadata& meta, const LayerGeometry& geometry, int64_t batch, int64_t seq_len);

// The same rule at arbitrary global indices: `q_index` [Sq] and `kv_index` [Skv] (int64) name the global
// token index of each row / column, and `q_meta` / `kv_meta` hold the metadata at exactly those tokens
// ([B, Sq] / [B, Skv]). The range forms above are this with contiguous indices. Chunk attention uses it to
// evaluate the elements of partial blocks only.
torch::Tensor dense_mask_at(const TokenMetadata& q_meta, const TokenMetadata& kv_meta, const torch::Tensor& q_index,
                            const torch::Tensor& kv_index, const LayerGeometry& geometry, int64_t batch);

// Whether the vision-bidirectional term is live for this geometry and these metadata (flag set, group ids on both
// sides; on a sliding or a full layer alike).
bool vision_term_active(const TokenMetadata& q_meta, const TokenMetadata& kv_meta, const LayerGeometry& geometry);

// Whether the mask depends on the batch row at all (some metadata tensor is defined). When it does not, block
// masks keep a single row that serves every batch element (flex attention's B = None).
bool mask_depends_on_batch(const TokenMetadata& q_meta, const TokenMetadata& kv_meta);

}  // namespace cpharness::kernels
