// Rotary position embeddings (gemma4-spec §3.3): default RoPE on sliding layers, proportional RoPE on full
// layers (only the first partial_rotary_factor * head_dim / 2 frequencies are non-zero; denominator head_dim).
#pragma once
#include <torch/torch.h>

#include "harness/model/config.h"

namespace cpharness::model {

// inv_freq [head_dim / 2], fp32, computed on CPU the way HF does.
torch::Tensor rope_inverse_frequencies(const RopeConfig& rope, int64_t head_dim);

struct RopeTables {
  torch::Tensor cos;  // [B, S, head_dim], model dtype
  torch::Tensor sin;
};

// cos/sin for `position_ids` [B, S]: fp32 products and trig, then cast to `dtype`.
RopeTables rope_tables(const torch::Tensor& inv_freq, const torch::Tensor& position_ids, torch::ScalarType dtype);

// x [B, S, heads, head_dim]: x * cos + rotate_half(x) * sin (non-interleaved, element j pairs with j + d/2).
torch::Tensor apply_rope(const torch::Tensor& x, const RopeTables& tables);

}  // namespace cpharness::model
