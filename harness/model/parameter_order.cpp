#include "harness/model/parameter_order.h"

#include <fmt/format.h>

#include <algorithm>
#include <tuple>

namespace cpharness::model {
namespace {


bool has_component(const std::string& name, const std::string& comp) {
  return name.rfind(comp + ".", 0) == 0 || name == comp || name.find("." + comp + ".") != std::string::npos ||
         (name.size() > comp.size() && name.compare(name.size() - comp.size() - 1, std::string::npos, "." + comp) == 0);
}

// Gemma4 decoder-layer parameters in forward order.
const std::vector<std::string>& layer_forward_order() {
  static const std::vector<std::string> v = {
      "input_layernorm",           "self_attn.q_proj",     "self_attn.k_proj",
      "self_attn.v_proj",          "self_attn.q_norm",     "self_attn.k_norm",
      "self_attn.o_proj",          "post_attention_layernorm", "pre_feedforward_layernorm",
      "mlp.gate_proj",             "mlp.up_proj",          "mlp.down_proj",
      "post_feedforward_layernorm", "per_layer_input_gate", "per_layer_projection",
      "post_per_layer_input_norm", "layer_scalar"};
  return v;
}

// Parameters used before the decoder layers, in forward order.
const std::vector<std::string>& pre_layer_forward_order() {
  static const std::vector<std::string> v = {"embed_tokens", "embed_tokens_per_layer", "per_layer_model_projection",
                                             "per_layer_projection_norm"};
  return v;
}

// (group, -layer, known, -rank, name): ascending = backward order.
using BackwardKey = std::tuple<int, std::int64_t, int, int, std::string>;

BackwardKey backward_key(const std::string& name) {
  if (auto layer = layer_index_of(name)) {
    const std::string marker = fmt::format("layers.{}.", *layer);
    const std::size_t pos = name.find(marker);
    const std::string suffix = pos == std::string::npos ? std::string() : name.substr(pos + marker.size());
    const auto& order = layer_forward_order();
    for (std::size_t r = 0; r < order.size(); ++r) {
      const std::string& k = order[r];
      if (suffix == k || suffix.rfind(k + ".", 0) == 0) return {1, -*layer, 0, -static_cast<int>(r), name};
    }
    return {1, -*layer, 1, 0, name};
  }
  const auto& pre = pre_layer_forward_order();
  for (std::size_t r = 0; r < pre.size(); ++r)
    if (has_component(name, pre[r])) return {2, 0, 0, -static_cast<int>(r), name};
  return {0, 0, 0, 0, name};
}

}  // namespace

std::optional<std::int64_t> layer_index_of(const std::string& name) {
  const std::string key = "layers.";
  for (std::size_t pos = name.find(key); pos != std::string::npos; pos = name.find(key, pos + 1)) {
    if (pos != 0 && name[pos - 1] != '.') continue;
    std::size_t i = pos + key.size(), j = i;
    while (j < name.size() && j - i < 18 && name[j] >= '0' && name[j] <= '9') ++j;
    if (j == i || (j < name.size() && name[j] != '.')) continue;
    return std::stoll(name.substr(i, j - i));
  }
  return std::nullopt;
}

std::vector<std::string> grad_backward_order(std::vector<std::string> names) {
  std::vector<std::pair<BackwardKey, std::string>> keyed;
  keyed.reserve(names.size());
  for (auto& n : names) keyed.emplace_back(backward_key(n), std::move(n));
  std::sort(keyed.begin(), keyed.end());
  std::vector<std::string> out;
  out.reserve(keyed.size());
  for (auto& [k, n] : keyed) out.push_back(std::move(n));
  return out;
}

}  // namespace cpharness::model
