// The block form of a mask, as flex attention's BlockMask: the (q range x kv range) rectangle is cut into
// q_block x kv_block tiles (the last tile of each side may be shorter), and every tile is empty (no allowed
// element), full (every element allowed) or partial. Forward walks q-major lists, backward the kv-major
// transposes. Also the brute-force builder (dense mask, then per-block reduce): the oracle for the analytic
// builder in block_mask_builder.h.
#pragma once
#include <optional>
#include <string>

#include "kernels/mask_spec.h"

namespace cpharness::kernels {

struct BlockMask {
  TokenRange q_range;
  TokenRange kv_range;
  int64_t q_block = 128;
  int64_t kv_block = 128;
  // Rows of the block structure: the batch size when the mask depends on metadata, else 1 (one row serves
  // every batch element, as flex attention's B = None).
  int64_t batch = 1;

  // q-major (forward), int32. Counts [batch, nQ]; indices [batch, nQ, Wq] with Wq = the largest count over
  // all rows (partial and full lists separately), kv block indices ascending, entries past the count are 0.
  torch::Tensor kv_num_blocks, kv_indices;            // partial kv blocks of each q block
  torch::Tensor full_kv_num_blocks, full_kv_indices;  // full kv blocks of each q block
  // kv-major transposes (backward), int32. Counts [batch, nKV]; indices [batch, nKV, Wkv], same conventions.
  torch::Tensor q_num_blocks, q_indices;
  torch::Tensor full_q_num_blocks, full_q_indices;

  // What partial tiles evaluate element by element (dense_mask_at): the geometry and the metadata of exactly
  // the q and kv ranges. A cached mask keeps the metadata of the batch it was built for.
  LayerGeometry geometry;
  TokenMetadata q_meta;
  TokenMetadata kv_meta;

  int64_t num_q_blocks() const { return (q_range.length + q_block - 1) / q_block; }
  int64_t num_kv_blocks() const { return (kv_range.length + kv_block - 1) / kv_block; }
  // Token length of q block i / kv block j (the last one may be short).
  int64_t q_block_len(int64_t i) const { return std::min(q_block, q_range.length - i * q_block); }
  int64_t kv_block_len(int64_t j) const { return std::min(kv_block, kv_range.length - j * kv_block); }
};

enum BlockClass : uint8_t { kEmptyBlock = 0, kPartialBlock = 1, kFullBlock = 2 };

// Per-tile classes [batch, nQ, nKV] (uint8, BlockClass) read from the q-major lists, or from the kv-major
// transposes when `from_transposes` (then transposed back to [batch, nQ, nKV]).
torch::Tensor block_classes(const BlockMask& mask, bool from_transposes = false);

// A mask with its ranges, block sizes, batch rows (1 unless the metadata differs by batch row), geometry and
// metadata set and no lists yet: what both builders start from.
BlockMask block_mask_frame(const TokenMetadata& q_meta, const TokenMetadata& kv_meta, TokenRange q_range,
                           TokenRange kv_range, const LayerGeometry& geometry, int64_t batch, int64_t q_block,
                           int64_t kv_block);

// Builds every list and transpose from per-tile classes [batch, nQ, nKV] (uint8, BlockClass), with tensor ops.
void fill_block_lists(BlockMask& mask, const torch::Tensor& classes);

// The oracle: dense_mask() over the ranges, then per tile any / all. `batch` is the batch size of the data.
BlockMask build_block_mask_brute_force(const TokenMetadata& q_meta, const TokenMetadata& kv_meta, TokenRange q_range,
                                       TokenRange kv_range, const LayerGeometry& geometry, int64_t batch,
                                       int64_t q_block = 128, int64_t kv_block = 128);

// nullopt when a and b have identical shapes, sizes and lists (q-major and transposes); else the first
// difference in words (which tensor, batch row, block).
std::optional<std::string> block_mask_mismatch(const BlockMask& a, const BlockMask& b);

// Score elements a block-sparse kernel computes for one head: the sum of tile areas over non-empty tiles,
// summed over the mask's batch rows. Dense attention over the same rectangle computes q_len * kv_len per row.
int64_t computed_score_elements(const BlockMask& mask);

}  // namespace cpharness::kernels
