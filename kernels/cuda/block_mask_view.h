// The raw kernel's view of a BlockMask (block_sparse_attention.h), described once: host staging and the libtorch
// adapter differ only in where the list and metadata pointers come from.
#pragma once
#include "kernels/block_mask.h"
#include "kernels/cuda/block_sparse_attention.h"

namespace cpharness::kernels::cuda {

// `list(num, indices)` gives each BlockList; `meta(tensor, dtype)` the device pointer of a metadata tensor in
// `dtype` (int64 ids, uint8 padding), or nullptr when the mask has none.
template <typename List, typename Meta>
BlockMaskView block_mask_view(const BlockMask& m, List&& list, Meta&& meta) {
  BlockMaskView v;
  v.q_start = m.q_range.start;
  v.q_len = m.q_range.length;
  v.kv_start = m.kv_range.start;
  v.kv_len = m.kv_range.length;
  v.q_block = int32_t(m.q_block);
  v.kv_block = int32_t(m.kv_block);
  v.batch = int32_t(m.batch);
  v.partial_kv = list(m.kv_num_blocks, m.kv_indices);
  v.full_kv = list(m.full_kv_num_blocks, m.full_kv_indices);
  v.partial_q = list(m.q_num_blocks, m.q_indices);
  v.full_q = list(m.full_q_num_blocks, m.full_q_indices);
  v.causal = m.geometry.causal;
  v.has_window = m.geometry.window.has_value();
  v.window = m.geometry.window.value_or(0);
  v.vision_bidirectional = m.geometry.vision_bidirectional;
  v.vision_group_past_window = m.geometry.vision_group_past_window;
  v.q_document_ids = static_cast<const int64_t*>(meta(m.q_meta.document_ids, torch::kInt64));
  v.kv_document_ids = static_cast<const int64_t*>(meta(m.kv_meta.document_ids, torch::kInt64));
  v.kv_padding = static_cast<const uint8_t*>(meta(m.kv_meta.padding, torch::kUInt8));
  v.q_vision_group_ids = static_cast<const int64_t*>(meta(m.q_meta.vision_group_ids, torch::kInt64));
  v.kv_vision_group_ids = static_cast<const int64_t*>(meta(m.kv_meta.vision_group_ids, torch::kInt64));
  return v;
}

}  // namespace cpharness::kernels::cuda
