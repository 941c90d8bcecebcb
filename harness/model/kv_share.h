// K/V sharing between layers (gemma4-spec §4). Source layers store their post-norm, post-RoPE K and post-v_norm
// V for one forward; shared layers read them.
#pragma once
#include <torch/torch.h>

#include <map>
#include <utility>

namespace cpharness::model {

using KvPair = std::pair<torch::Tensor, torch::Tensor>;

// The cache-free share holder (NeMo's _Gemma4KVShareHolder): passed where transformers 5.5 expects a cache so
// that the cache-gated sharing fires without accumulating anything. A new holder per forward.
class KvShareHolder {
 public:
  std::map<int64_t, KvPair> shared_layers;  // source layer index -> (K, V)
  // A cache update that stores nothing: returns its inputs unchanged.
  KvPair update(const torch::Tensor& k, const torch::Tensor& v) const { return {k, v}; }
  int64_t seq_length() const { return 0; }
};

}  // namespace cpharness::model
