#include "kernels/dense_mask.h"

namespace cpharness::kernels {

TokenMetadata TokenMetadata::slice(int64_t start, int64_t length) const {
  auto cut = [&](const torch::Tensor& t) { return t.defined() ? t.narrow(1, start, length) : t; };
  return {cut(document_ids), cut(padding), cut(vision_group_ids)};
}

bool vision_term_active(const TokenMetadata& q_meta, const TokenMetadata& kv_meta, const LayerGeometry& geometry) {
  return geometry.vision_bidirectional && q_meta.vision_group_ids.defined() && kv_meta.vision_group_ids.defined();
}

bool mask_depends_on_batch(const TokenMetadata& q_meta, const TokenMetadata& kv_meta) {
  return q_meta.document_ids.defined() || q_meta.padding.defined() || q_meta.vision_group_ids.defined() ||
         kv_meta.document_ids.defined() || kv_meta.padding.defined() || kv_meta.vision_group_ids.defined();
}

torch::Tensor dense_mask_at(const TokenMetadata& q_meta, const TokenMetadata& kv_meta, const torch::Tensor& q_index,
                            const torch::Tensor& kv_index, const LayerGeometry& geometry, int64_t batch) {
  const int64_t sq = q_index.numel(), skv = kv_index.numel();
  auto qi = q_index.to(torch::kInt64).view({1, -1, 1});
  auto ki = kv_index.to(qi.device(), torch::kInt64).view({1, 1, -1});
  auto on = [&](const torch::Tensor& t) { return t.to(qi.device()); };  // the mask is built where q_index lives
  auto all = torch::ones({1, sq, skv}, torch::TensorOptions().dtype(torch::kBool).device(qi.device()));
  auto order = geometry.causal ? all & (ki <= qi) : all;
  // q - k < W, written as k > q - W so no [Sq, Skv] int64 difference is materialised.
  auto window = geometry.window ? all & (ki > (qi - *geometry.window)) : all;
  torch::Tensor allowed;
  if (vision_term_active(q_meta, kv_meta, geometry)) {
    // A vision group relaxes causality only, inside the window (transformers >= 5.13, create_masks_for_vision_model:
    // the group is OR'd with causal, then AND'd with the window; gemma4-spec 3.4). 5.5 .. 5.12 OR'd the group after
    // the window, letting a group see itself beyond it (vision_group_past_window). On a full layer (no window) both
    // read causal OR same group.
    auto gq = on(q_meta.vision_group_ids).unsqueeze(2);
    auto gk = on(kv_meta.vision_group_ids).unsqueeze(1);
    auto group = (gq == gk) & (gq >= 0);
    allowed = geometry.vision_group_past_window ? (window & order) | group : window & (order | group);
  } else {
    allowed = (window & order).expand({batch, sq, skv});
  }
  if (q_meta.document_ids.defined() && kv_meta.document_ids.defined()) {
    auto dq = on(q_meta.document_ids).unsqueeze(2);
    auto dk = on(kv_meta.document_ids).unsqueeze(1);
    allowed = allowed & (dq == dk) & (dq > 0);
  }
  if (kv_meta.padding.defined()) allowed = allowed & on(kv_meta.padding).logical_not().unsqueeze(1);
  return allowed.contiguous();
}

torch::Tensor dense_mask(const TokenMetadata& q_meta, const TokenMetadata& kv_meta, TokenRange q_range,
                         TokenRange kv_range, const LayerGeometry& geometry, int64_t batch) {
  // The mask lives where the metadata lives (CPU when there is none), so a CUDA batch gets a CUDA mask.
  auto device = torch::Device(torch::kCPU);
  for (const auto* m : {&q_meta, &kv_meta})
    for (const auto* t : {&m->document_ids, &m->padding, &m->vision_group_ids})
      if (t->defined()) device = t->device();
  auto opts = torch::TensorOptions().dtype(torch::kInt64).device(device);
  return dense_mask_at(q_meta, kv_meta, torch::arange(q_range.start, q_range.end(), opts),
                       torch::arange(kv_range.start, kv_range.end(), opts), geometry, batch);
}

torch::Tensor dense_mask(const TokenMetadata& meta, const LayerGeometry& geometry, int64_t batch, int64_t seq_len) {
  return dense_mask(meta, meta, {0, seq_len}, {0, seq_len}, geometry, batch);
}

}  // namespace cpharness::kernels
