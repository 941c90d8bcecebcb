// The order in which Gemma4's parameters are used, by name: what "first divergence" means for gradients. One
// definition, shared by the training checks (run) and dump comparison (compare), so both name the same tensor.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace cpharness::model {

// Backward order of parameter names (for gradients): parameters used after the decoder layers first
// (norm.weight, lm_head.weight and any other non-layer name, by name), then decoder layers by index descending
// (a "layers.<i>." component anywhere in the name, so HF prefixes like "model.language_model." are fine; within a
// layer the reverse of Gemma4's forward order: layer_scalar, per-layer-input gate/projection/norm, post-feedforward
// norm, mlp down/up/gate, pre-feedforward and post-attention norms, o_proj, k_norm, q_norm, v_proj, k_proj, q_proj,
// input_layernorm, then unknown names by name), then the parameters used before the layers, last:
// per_layer_projection_norm, per_layer_model_projection, embed_tokens_per_layer, embed_tokens.
// Returns NAMES sorted in that order.
std::vector<std::string> grad_backward_order(std::vector<std::string> names);
// The decoder layer index in a parameter name ("model.layers.12.mlp.up_proj.weight" -> 12), if any.
std::optional<std::int64_t> layer_index_of(const std::string& param_name);


}  // namespace cpharness::model
