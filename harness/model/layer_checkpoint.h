// Whole-decoder-layer activation checkpointing: a layer keeps only its inputs in forward, and its backward recomputes
// the layer (attention included, so a CP backend runs its forward ring again) and backpropagates through the
// recompute (the reentrant style). KV sharing makes it subtle: a source layer's K/V are read by later layers, so
// they must leave the checkpoint with their graph. Two ways, so that the harness can show which one is right:
//
//   kKvHolder   the shared K/V cross the checkpoint boundary through the share holder, as the source layer's outputs
//               and the consumer layers' inputs: their gradient reaches the source's k/v projections.
//   kLayerOnly  only the hidden state and the per-layer input cross it (torch.utils.checkpoint(use_reentrant=True)
//               around each layer): a source stores K/V computed without a graph, and the gradient of every layer that
//               reads them is lost to the source's projections.
#pragma once
#include <torch/torch.h>

#include <optional>
#include <string>

#include "harness/model/attention_backend.h"
#include "harness/model/kv_share.h"
#include "kernels/mask_spec.h"

namespace cpharness::model {

class Gemma4DecoderLayerImpl;
using KvStore = std::map<int64_t, KvPair>;

enum class ActivationCheckpointing { kOff, kKvHolder, kLayerOnly };

// "off", "kv_holder", "layer_only", and back (std::nullopt for another name).
const char* to_string(ActivationCheckpointing mode);
std::optional<ActivationCheckpointing> activation_checkpointing_from_string(const std::string& name);

// One decoder layer under `mode` (not kOff). `store` is the forward's K/V store (null: no sharing); `source` the layer
// whose K/V this one reads (-1: none) and `stores_kv` whether this layer's K/V are shared. Returns the layer's output.
torch::Tensor checkpointed_layer(ActivationCheckpointing mode, Gemma4DecoderLayerImpl& layer, int64_t index,
                                 const torch::Tensor& h, const torch::Tensor& cos, const torch::Tensor& sin,
                                 const torch::Tensor& per_layer_input, const kernels::TokenMetadata& meta,
                                 AttentionBackend& backend, KvStore* store, int64_t source, bool stores_kv);

}  // namespace cpharness::model
