#include "kernels/dense_mask.h"

namespace cpharness::kernels {

TokenMetadata TokenMetadata::slice(int64_t start, int64_t length) const {
  auto cut = [&](const torch::Tensor& t) { return t.defined() ? t.narrow(1, start, length) : t; };
  return {cut(document_ids), cut(padding), cut(vision_group_ids)};
}

torch::Tensor dense_mask(const TokenMetadata& q_meta, const TokenMetadata& kv_meta, TokenRange q_range,
                         TokenRange kv_range, const LayerGeometry& geometry, int64_t batch) {
  auto opts = torch::TensorOptions().dtype(torch::kInt64);
  auto qi = torch::arange(q_range.start, q_range.end(), opts).view({1, -1, 1});
  auto ki = torch::arange(kv_range.start, kv_range.end(), opts).view({1, 1, -1});
  auto allowed = torch::ones({1, q_range.length, kv_range.length}, torch::kBool);
  if (geometry.causal) allowed = allowed & (ki <= qi);
  if (geometry.window) allowed = allowed & ((qi - ki) < *geometry.window);
  allowed = allowed.expand({batch, q_range.length, kv_range.length});
  const bool vision = geometry.vision_bidirectional && geometry.window.has_value() &&
                      q_meta.vision_group_ids.defined() && kv_meta.vision_group_ids.defined();
  if (vision) {
    auto gq = q_meta.vision_group_ids.unsqueeze(2);
    auto gk = kv_meta.vision_group_ids.unsqueeze(1);
    allowed = allowed | ((gq == gk) & (gq >= 0));
  }
  if (q_meta.document_ids.defined() && kv_meta.document_ids.defined()) {
    auto dq = q_meta.document_ids.unsqueeze(2);
    auto dk = kv_meta.document_ids.unsqueeze(1);
    allowed = allowed & (dq == dk) & (dq > 0);
  }
  if (kv_meta.padding.defined()) allowed = allowed & kv_meta.padding.logical_not().unsqueeze(1);
  return allowed.contiguous();
}

torch::Tensor dense_mask(const TokenMetadata& meta, const LayerGeometry& geometry, int64_t batch, int64_t seq_len) {
  return dense_mask(meta, meta, {0, seq_len}, {0, seq_len}, geometry, batch);
}

}  // namespace cpharness::kernels
