// Gemma4 text-model configuration: the fields of HF's Gemma4TextConfig that change the math, the presets of
// the released models and their tiny structure-faithful variants, and the per-layer values derived from them.
#pragma once
#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace cpharness::model {

enum class LayerType { kSliding, kFull };

// How KV-shared layers obtain their K/V (gemma4-spec §4.3/§4.4). Users compare transformers versions, so both.
enum class KvShareSemantics {
  kSharedKvStates,  // transformers >= 5.5.2: shared layers always reuse their source's K/V and own no k/v weights
  kCacheGated,      // 5.5.0/5.5.1: shared only when a cache (or the share holder) is passed; otherwise shared
                    // layers compute K/V from their own redundant k/v weights, which then exist
};

struct RopeConfig {
  std::string rope_type = "default";  // "default" or "proportional"
  double theta = 10000.0;
  double partial_rotary_factor = 1.0;  // proportional only
  double factor = 1.0;
};

// How vision groups open the mask, by transformers version (gemma4-spec 3.4 is the first):
//   kGroupInsideWindow  >= 5.13: sliding layers (causal OR same group) AND window; full layers causal.
//   kGroupPastWindow    5.5 .. 5.8: sliding layers (causal AND window) OR same group; full layers causal.
//   kGroupOnEveryLayer  5.9 .. 5.12: sliding layers as kGroupPastWindow; full layers causal OR same group
//                       (create_masks_for_generate with block_sequence_ids overlays the group on every layer type).
enum class VisionMask { kGroupInsideWindow, kGroupPastWindow, kGroupOnEveryLayer };

struct ModelConfig {
  std::string name = "custom";
  int64_t vocab_size = 262144;
  int64_t hidden_size = 2304;
  int64_t intermediate_size = 9216;
  int64_t num_hidden_layers = 30;
  int64_t num_attention_heads = 8;
  int64_t num_key_value_heads = 4;
  int64_t head_dim = 256;
  int64_t global_head_dim = 512;
  std::optional<int64_t> num_global_key_value_heads;
  bool attention_k_eq_v = false;
  std::vector<LayerType> layer_types;
  int64_t sliding_window = 512;
  RopeConfig rope_sliding{"default", 10000.0, 1.0, 1.0};
  RopeConfig rope_full{"proportional", 1000000.0, 0.25, 1.0};
  double rms_norm_eps = 1e-6;
  std::optional<double> final_logit_softcapping = 30.0;
  int64_t hidden_size_per_layer_input = 0;  // P; 0 disables per-layer inputs
  int64_t vocab_size_per_layer_input = 262144;
  int64_t num_kv_shared_layers = 0;
  bool use_double_wide_mlp = false;
  std::string use_bidirectional_attention;  // "", "vision" or "all"
  std::optional<int64_t> pad_token_id = 0;  // null in newer transformers' configs: no padding row in the embeddings
  // The id padding positions carry in a CP batch (any id: they are never attended and never a target).
  int64_t pad_fill_id() const { return pad_token_id.value_or(0); }
  bool tie_word_embeddings = true;
  KvShareSemantics kv_share_semantics = KvShareSemantics::kSharedKvStates;
  // Which rule vision groups follow (use_bidirectional_attention "vision"): the transformers version's, see VisionMask.
  VisionMask vision_mask = VisionMask::kGroupInsideWindow;

  // Derived per-layer values (gemma4-spec §1).
  bool is_full(int64_t layer) const { return layer_types.at(layer) == LayerType::kFull; }
  int64_t layer_head_dim(int64_t layer) const { return is_full(layer) ? global_head_dim : head_dim; }
  int64_t layer_kv_heads(int64_t layer) const;
  bool has_v_proj(int64_t layer) const { return !(attention_k_eq_v && is_full(layer)); }
  int64_t first_kv_shared_layer() const { return num_hidden_layers - num_kv_shared_layers; }
  bool is_kv_shared(int64_t layer) const;
  // The layer whose K/V a shared layer reuses: the last earlier non-shared layer of the same type; -1 if none.
  int64_t kv_source_layer(int64_t layer) const;
  // True for the non-shared layers that store their K/V for shared layers (last of their type in the prefix).
  bool stores_full_length_kv(int64_t layer) const;
  // Whether a shared layer owns (redundant) k/v weights: only under cache-gated semantics.
  bool owns_kv_weights(int64_t layer) const;
  int64_t layer_intermediate_size(int64_t layer) const;
  std::optional<int64_t> layer_window(int64_t layer) const;
  bool layer_vision_bidirectional(int64_t layer) const;
  bool has_per_layer_inputs() const { return hidden_size_per_layer_input > 0; }

  // Checks internal consistency; throws io::InputError naming `source` and the offending field.
  // Throws io::InputError naming `source` and the key (prefixed by `key_prefix`, e.g. "model.overrides.") for an
  // inconsistent config, or one larger than the harness runs (per-dimension limits, kMaxParameters).
  void validate(const std::string& source, const std::string& key_prefix = "") const;
  // Weights of the text model (approximate only in the norms' O(L x H) terms).
  int64_t parameter_count() const;
  static constexpr int64_t kMaxParameters = int64_t(200) * 1000 * 1000 * 1000;
  nlohmann::json to_json() const;  // HF config.json form (text config)
};

// Names: e2b, e4b, 31b (gemma4-spec §6) and tiny-e2b, tiny-e4b, tiny-31b. Throws InputError when unknown.
ModelConfig preset_config(const std::string& name);
std::vector<std::string> preset_names();

// An HF config.json object (the top level or its `text_config`). Unknown keys are ignored, as HF does.
ModelConfig config_from_hf_json(const nlohmann::json& j, const std::string& source);
ModelConfig load_hf_config_file(const std::string& path);

// The inline model form of a case file: {"preset": NAME, "overrides": {HF keys...}, "kv_share_semantics": ...}
// or {"config": {HF keys...}}. Unknown keys and wrong types are errors naming the key.
ModelConfig config_from_case_json(const nlohmann::json& j, const std::string& source);

std::string to_string(KvShareSemantics s);
KvShareSemantics kv_share_semantics_from_string(const std::string& s, const std::string& source);

// The case key model.vision_mask and the hf-export provenance hf_vision_mask: "group_inside_window" (transformers
// >= 5.13, the default), "group_past_window" (5.5 .. 5.8) or "group_on_every_layer" (5.9 .. 5.12), as VisionMask.
std::string to_string(VisionMask m);
VisionMask vision_mask_from_string(const std::string& s, const std::string& source, const std::string& key);

}  // namespace cpharness::model
