// The analytic block-mask builder: classifies each tile from run summaries instead of evaluating elements.
// Each side is cut into runs of constant metadata (document, vision group, key padding); inside a tile, every
// (q run x kv run) sub-rectangle is either all blocked, or follows the causal/window band (without its causal
// edge inside one vision group),
// whose classification over a rectangle is exact from the range of q - k. A tile costs O(1) in the common case
// (one run per side) and only tiles that straddle a metadata boundary look at more than one sub-rectangle.
// Must equal build_block_mask_brute_force() exactly.
#pragma once
#include "kernels/block_mask.h"

namespace cpharness::kernels {

// Same arguments and result as build_block_mask_brute_force(). Metadata may live on any device; the lists
// are built on the CPU.
BlockMask build_block_mask(const TokenMetadata& q_meta, const TokenMetadata& kv_meta, TokenRange q_range,
                           TokenRange kv_range, const LayerGeometry& geometry, int64_t batch, int64_t q_block = 128,
                           int64_t kv_block = 128);

}  // namespace cpharness::kernels
