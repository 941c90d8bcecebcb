// The one narrow interface between the model and whatever computes attention. The model hands over roped,
// normed Q/K/V in its local frame plus the per-token metadata it was given; a backend may be the dense eager
// reference below or the CP ring, which the model never knows about.
#pragma once
#include <torch/torch.h>

#include "kernels/mask_spec.h"

namespace cpharness::model {

struct AttentionInputs {
  torch::Tensor q;  // [B, Hq, S, D]
  torch::Tensor k;  // [B, Hkv, S_kv, D]; Hq is a multiple of Hkv (GQA)
  torch::Tensor v;  // [B, Hkv, S_kv, D]
  kernels::LayerGeometry geometry;
  double scale = 1.0;
  int64_t layer_index = 0;  // for traces and counters only
};

class AttentionBackend {
 public:
  virtual ~AttentionBackend() = default;
  // Returns the attention output [B, Hq, S, D] in q's dtype.
  virtual torch::Tensor attend(const AttentionInputs& in, const kernels::TokenMetadata& meta) = 0;
};

// HF eager attention, mirrored op for op (gemma4-spec §3.6): repeat_kv by expand + reshape, scores in the
// model dtype, additive finfo.min mask, fp32 softmax cast back, then P·V. A row with every key blocked gets a
// uniform softmax, exactly as HF does (such rows carry no loss).
class EagerAttention : public AttentionBackend {
 public:
  torch::Tensor attend(const AttentionInputs& in, const kernels::TokenMetadata& meta) override;
};

}  // namespace cpharness::model
