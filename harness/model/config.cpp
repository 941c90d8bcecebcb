#include "harness/model/config.h"

#include <limits>

#include <fmt/format.h>

#include <cmath>
#include <filesystem>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <set>

#include "harness/io/input_error.h"
#include "harness/io/json_input.h"
#include "harness/io/paths.h"

namespace cpharness::model {
namespace {

std::string layer_type_name(LayerType t) { return t == LayerType::kFull ? "full_attention" : "sliding_attention"; }

using nlohmann::json;
using io::InputError;

std::vector<LayerType> repeat_pattern(int sliding_per_full, int repeats) {
  std::vector<LayerType> types;
  for (int r = 0; r < repeats; ++r) {
    for (int s = 0; s < sliding_per_full; ++s) types.push_back(LayerType::kSliding);
    types.push_back(LayerType::kFull);
  }
  return types;
}

ModelConfig e2b() {
  ModelConfig c;
  c.name = "e2b";
  c.vocab_size = 262144;
  c.hidden_size = 1536;
  c.intermediate_size = 6144;
  c.num_hidden_layers = 35;
  c.layer_types = repeat_pattern(4, 7);
  c.num_attention_heads = 8;
  c.num_key_value_heads = 1;
  c.head_dim = 256;
  c.global_head_dim = 512;
  c.sliding_window = 512;
  c.num_kv_shared_layers = 20;
  c.hidden_size_per_layer_input = 256;
  c.vocab_size_per_layer_input = 262144;
  c.use_double_wide_mlp = true;
  return c;
}

ModelConfig e4b() {
  ModelConfig c = e2b();
  c.name = "e4b";
  c.hidden_size = 2560;
  c.intermediate_size = 10240;
  c.num_hidden_layers = 42;
  c.layer_types = repeat_pattern(5, 7);
  c.num_key_value_heads = 2;
  c.num_kv_shared_layers = 18;
  c.use_double_wide_mlp = false;
  return c;
}

ModelConfig b31() {
  ModelConfig c;
  c.name = "31b";
  c.vocab_size = 262144;
  c.hidden_size = 5376;
  c.intermediate_size = 21504;
  c.num_hidden_layers = 60;
  c.layer_types = repeat_pattern(5, 10);
  c.num_attention_heads = 32;
  c.num_key_value_heads = 16;
  c.num_global_key_value_heads = 4;
  c.attention_k_eq_v = true;
  c.head_dim = 256;
  c.global_head_dim = 512;
  c.sliding_window = 1024;
  c.num_kv_shared_layers = 0;
  c.hidden_size_per_layer_input = 0;
  c.use_bidirectional_attention = "vision";
  return c;
}

// Tiny widths that keep the layer count, layer pattern, KV-sharing layout, double-wide MLP, per-layer inputs,
// GQA ratio, k_eq_v and vision setting of the real model (head counts shrink by the same factor).
ModelConfig tiny(ModelConfig c, int64_t heads, int64_t kv_heads, std::optional<int64_t> global_kv_heads) {
  c.name = "tiny-" + c.name;
  c.vocab_size = 512;
  c.hidden_size = 64;
  c.intermediate_size = 4 * 64;
  c.num_attention_heads = heads;
  c.num_key_value_heads = kv_heads;
  c.num_global_key_value_heads = global_kv_heads;
  c.head_dim = 16;
  c.global_head_dim = 32;
  c.sliding_window = 32;
  if (c.hidden_size_per_layer_input > 0) {
    c.hidden_size_per_layer_input = 8;
    c.vocab_size_per_layer_input = 512;
  }
  return c;
}

template <typename T>
T read_field(const json& j, const std::string& key, const std::string& source, const std::string& prefix) {
  const json& v = j.at(key);
  bool ok = false;
  if constexpr (std::is_same_v<T, bool>) ok = v.is_boolean();
  else if constexpr (std::is_integral_v<T>) ok = v.is_number_integer();
  else if constexpr (std::is_floating_point_v<T>) ok = v.is_number();
  else if constexpr (std::is_same_v<T, std::string>) ok = v.is_string();
  if (!ok) throw InputError(source, prefix + key, fmt::format("wrong type: {}", v.type_name()));
  if constexpr (std::is_same_v<T, int64_t>) return io::json_int64(v, source, prefix + key);
  else return v.get<T>();
}

// `strict` (case files): an unknown key is an error (a typo there silently changed the RoPE); HF files carry keys
// other RoPE types use, ignored as transformers ignores them.
RopeConfig read_rope(const json& j, const std::string& source, const std::string& field, bool strict) {
  if (!j.is_object()) throw InputError(source, field, "expected an object");
  RopeConfig r;
  for (auto& [k, v] : j.items()) {
    if (k == "rope_type") r.rope_type = read_field<std::string>(j, k, source, field + ".");
    else if (k == "rope_theta") r.theta = read_field<double>(j, k, source, field + ".");
    else if (k == "partial_rotary_factor") r.partial_rotary_factor = read_field<double>(j, k, source, field + ".");
    else if (k == "factor") r.factor = read_field<double>(j, k, source, field + ".");
    else if (strict) throw InputError(source, field + "." + k, "unknown key");
  }
  if (r.rope_type != "default" && r.rope_type != "proportional")
    throw InputError(source, field + ".rope_type", "unsupported rope type '" + r.rope_type + "'");
  return r;
}

// Applies HF config keys onto `c`. `strict`: unknown keys are errors (case files); HF files carry many keys
// that do not change the text math (architectures, torch_dtype, token ids of other modalities), so not there.
// per_layer_config: {LAYER: {"head_dim": N, "num_key_value_heads": N}} where LAYER is a layer index (decimal,
// zero-padded or not) or a layer type. The harness's model is homogeneous per layer type, so every entry of one
// type must agree; full layers map to global_head_dim / num_global_key_value_heads, sliding ones to head_dim /
// num_key_value_heads. Any other key must repeat the whole config's value (`top`): the form lists only what differs
// per layer, and a layer's own intermediate_size or sliding_window would be another model than this one builds.
void apply_per_layer_config(ModelConfig& c, const json& v, const json& top, const std::string& source,
                            const std::string& field) {
  if (!v.is_object()) throw InputError(source, field, "expected an object keyed by layer index or layer type");
  std::map<LayerType, std::map<std::string, int64_t>> seen;
  const int64_t base_kv_heads = c.num_key_value_heads;
  for (auto& [key, entry] : v.items()) {
    const std::string where = field + "." + key;
    LayerType type;
    if (key == "full_attention") type = LayerType::kFull;
    else if (key == "sliding_attention") type = LayerType::kSliding;
    else {
      size_t used = 0;
      int64_t index = -1;
      try {
        index = std::stoll(key, &used);
      } catch (...) {
        used = 0;
      }
      if (used != key.size() || index < 0 || index >= int64_t(c.layer_types.size()))
        throw InputError(source, where, "expected a layer index below num_hidden_layers or a layer type");
      type = c.layer_types[size_t(index)];
    }
    if (!entry.is_object()) throw InputError(source, where, "expected an object");
    for (auto& [name, value] : entry.items()) {
      if (name != "head_dim" && name != "num_key_value_heads") {
        if (top.contains(name) && top.at(name) == value) continue;
        throw InputError(source, where + "." + name,
                         fmt::format("a per-layer {} other than the whole config's is not supported (only head_dim and "
                                     "num_key_value_heads may differ per layer type here)",
                                     name.substr(0, 64)));
      }
      const int64_t n = read_field<int64_t>(entry, name, source, where + ".");
      auto [it, inserted] = seen[type].emplace(name, n);
      if (!inserted && it->second != n)
        throw InputError(source, where + "." + name,
                         fmt::format("{} differs between layers of one type ({} vs {}); per-layer heterogeneity is not supported",
                                     name, it->second, n));
      if (type == LayerType::kFull) {
        if (name == "head_dim") c.global_head_dim = n;
        else c.num_global_key_value_heads = n;
      } else {
        if (name == "head_dim") c.head_dim = n;
        else c.num_key_value_heads = n;
      }
    }
  }
  // transformers gives every layer its entry's num_key_value_heads, else the base value, whatever attention_k_eq_v
  // says. This model has one count for sliding layers and another for full ones only under attention_k_eq_v, so a
  // layout it cannot build is refused rather than built otherwise (a different model, silently).
  for (int64_t i = 0; i < int64_t(c.layer_types.size()); ++i) {
    auto it = seen[c.layer_types[size_t(i)]].find("num_key_value_heads");
    const int64_t want = it != seen[c.layer_types[size_t(i)]].end() ? it->second : base_kv_heads;
    if (c.layer_kv_heads(i) != want)
      throw InputError(source, field,
                       fmt::format("gives layer {} ({}) {} KV heads, which this model cannot build next to the other layers' "
                                   "(a full layer's own KV head count needs attention_k_eq_v; sliding layers share one)",
                                   i, layer_type_name(c.layer_types[size_t(i)]), want));
  }
}

void apply_hf_keys(ModelConfig& c, const json& j, const std::string& source, const std::string& prefix, bool strict) {
  if (!j.is_object()) throw InputError(source, prefix.empty() ? "config" : prefix, "expected a JSON object");
  using Setter = std::function<void(const std::string&)>;
  auto i64 = [&](int64_t& dst) { return Setter([&](const std::string& k) { dst = read_field<int64_t>(j, k, source, prefix); }); };
  auto dbl = [&](double& dst) { return Setter([&](const std::string& k) { dst = read_field<double>(j, k, source, prefix); }); };
  auto off_only = [&](const char* name, const char* implemented) {
    return Setter([&, name, implemented](const std::string& k) {
      if (!j.at(k).is_null() && read_field<bool>(j, k, source, prefix))
        throw InputError(source, prefix + k, fmt::format("{} true is not implemented; the model has {}", name, implemented));
    });
  };
  auto bln = [&](bool& dst) { return Setter([&](const std::string& k) { dst = read_field<bool>(j, k, source, prefix); }); };
  bool layer_types_given = false;
  const json* per_layer_config = nullptr;
  const std::map<std::string, Setter> setters = {
      {"vocab_size", i64(c.vocab_size)},
      {"hidden_size", i64(c.hidden_size)},
      {"intermediate_size", i64(c.intermediate_size)},
      {"num_hidden_layers", i64(c.num_hidden_layers)},
      {"num_attention_heads", i64(c.num_attention_heads)},
      {"num_key_value_heads", i64(c.num_key_value_heads)},
      {"head_dim", i64(c.head_dim)},
      {"global_head_dim", i64(c.global_head_dim)},
      {"num_global_key_value_heads",
       [&](const std::string& k) {
         if (j.at(k).is_null()) c.num_global_key_value_heads.reset();
         else c.num_global_key_value_heads = read_field<int64_t>(j, k, source, prefix);
       }},
      {"attention_k_eq_v", bln(c.attention_k_eq_v)},
      {"sliding_window", i64(c.sliding_window)},
      {"rms_norm_eps", dbl(c.rms_norm_eps)},
      {"final_logit_softcapping",
       [&](const std::string& k) {
         if (j.at(k).is_null()) c.final_logit_softcapping.reset();
         else c.final_logit_softcapping = read_field<double>(j, k, source, prefix);
       }},
      {"hidden_size_per_layer_input", i64(c.hidden_size_per_layer_input)},
      {"vocab_size_per_layer_input", i64(c.vocab_size_per_layer_input)},
      {"num_kv_shared_layers", i64(c.num_kv_shared_layers)},
      {"use_double_wide_mlp", bln(c.use_double_wide_mlp)},
      {"pad_token_id",
       [&](const std::string& k) {
         if (j.at(k).is_null()) c.pad_token_id.reset();
         else c.pad_token_id = read_field<int64_t>(j, k, source, prefix);
       }},
      {"tie_word_embeddings", bln(c.tie_word_embeddings)},
      {"use_bidirectional_attention",
       [&](const std::string& k) {
         if (j.at(k).is_null()) c.use_bidirectional_attention.clear();
         else c.use_bidirectional_attention = read_field<std::string>(j, k, source, prefix);
       }},
      {"layer_types",
       [&](const std::string& k) {
         const json& v = j.at(k);
         if (!v.is_array()) throw InputError(source, prefix + k, "expected an array of layer type strings");
         c.layer_types.clear();
         for (size_t i = 0; i < v.size(); ++i) {
           if (v[i] == "sliding_attention") c.layer_types.push_back(LayerType::kSliding);
           else if (v[i] == "full_attention") c.layer_types.push_back(LayerType::kFull);
           else throw InputError(source, fmt::format("{}{}[{}]", prefix, k, i), "expected sliding_attention or full_attention");
         }
         layer_types_given = true;
       }},
      // Keys that name the math itself: only Gemma4's is implemented, and a config naming another must not run as it.
      {"model_type",
       [&](const std::string& k) {
         const auto v = read_field<std::string>(j, k, source, prefix);
         if (v != "gemma4_text" && v != "gemma4")
           throw InputError(source, prefix + k, "\"" + v.substr(0, 64) + "\" is not a Gemma4 text model (gemma4_text)");
       }},
      // Features of the math that are not implemented: accepted at the value that leaves them off (to_json writes
      // attention_bias, so a recorded config reads back), refused otherwise, in config.json files too (ignored there,
      // they would build another model than transformers does).
      {"attention_bias", off_only("attention_bias", "q/k/v/o projections without bias")},
      {"enable_moe_block", off_only("enable_moe_block", "the dense MLP (the 26B's MoE block is not implemented)")},
      {"attention_dropout",
       [&](const std::string& k) {
         if (!j.at(k).is_null() && read_field<double>(j, k, source, prefix) != 0.0)
           throw InputError(source, prefix + k, "attention dropout is not implemented (training steps must be deterministic): use 0");
       }},
      {"hidden_activation",
       [&](const std::string& k) {
         const auto v = read_field<std::string>(j, k, source, prefix);
         if (v != "gelu_pytorch_tanh")
           throw InputError(source, prefix + k, "\"" + v.substr(0, 64) + "\": Gemma4 uses gelu_pytorch_tanh, the only one implemented");
       }},
      {"rope_parameters",
       [&](const std::string& k) {
         const json& v = j.at(k);
         if (!v.is_object()) throw InputError(source, prefix + k, "expected an object keyed by layer type");
         for (auto& [type, r] : v.items()) {
           if (type == "sliding_attention") c.rope_sliding = read_rope(r, source, prefix + k + "." + type, strict);
           else if (type == "full_attention") c.rope_full = read_rope(r, source, prefix + k + "." + type, strict);
           // In HF files too: one RoPE for every layer type (the flat form of other models) is no Gemma4 config;
           // transformers fails on it (KeyError 'full_attention'), and read as the defaults it would run another model.
           else if (strict || !r.is_object())
             throw InputError(source, prefix + k + "." + type,
                              strict ? "unknown layer type"
                                     : "not a layer type: Gemma4 gives rope_parameters per layer type "
                                       "({\"sliding_attention\": {...}, \"full_attention\": {...}})");
         }
       }},
      // The pre-5.0 name of rope_parameters: transformers turns it into one flat RoPE for every layer type, which
      // its Gemma4 cannot build (KeyError 'full_attention'); run as the defaults it would be another model.
      {"rope_scaling",
       [&](const std::string& k) {
         if (!j.at(k).is_null())
           throw InputError(source, prefix + k,
                            "not read by Gemma4, whose RoPE is rope_parameters per layer type: transformers cannot "
                            "build this config either");
       }},
      // Newest transformers (seen in 5.24.0's save_pretrained output) folds global_head_dim and
      // num_global_key_value_heads into per_layer_config, keyed by layer index ("04": {"head_dim": 512}); a
      // layer-type key ("full_attention") is read too. Applied after the loop, once layer_types is known.
      {"per_layer_config", [&](const std::string& k) { per_layer_config = &j.at(k); }},
  };
  for (auto& [key, value] : j.items()) {
    auto it = setters.find(key);
    if (it != setters.end()) it->second(key);
    else if (strict) throw InputError(source, prefix + key, "unknown key");
  }
  if (!layer_types_given && (c.layer_types.empty() || int64_t(c.layer_types.size()) != c.num_hidden_layers)) {
    // HF default: i % 6 == 5 is full, and the last layer is forced to full.
    c.layer_types.clear();
    for (int64_t i = 0; i < c.num_hidden_layers; ++i)
      c.layer_types.push_back(i % 6 == 5 ? LayerType::kFull : LayerType::kSliding);
    if (!c.layer_types.empty()) c.layer_types.back() = LayerType::kFull;
  }
  // transformers forces the last layer to full attention (with a warning) when a config.json says otherwise, and
  // builds that model; a case file that says so is refused by validate() instead, naming the key.
  if (!strict && !c.layer_types.empty()) c.layer_types.back() = LayerType::kFull;
  if (per_layer_config) {
    // That form leaves out what equals the base value (5.16 .. 5.25's save_pretrained): in an HF file, no
    // global_head_dim means head_dim, and no num_global_key_value_heads means num_key_value_heads.
    if (!strict && !j.contains("global_head_dim")) c.global_head_dim = c.head_dim;
    if (!strict && !j.contains("num_global_key_value_heads") && c.attention_k_eq_v)
      c.num_global_key_value_heads = c.num_key_value_heads;
    apply_per_layer_config(c, *per_layer_config, j, source, prefix + "per_layer_config");
  }
}

}  // namespace

int64_t ModelConfig::layer_kv_heads(int64_t layer) const {
  if (attention_k_eq_v && is_full(layer) && num_global_key_value_heads) return *num_global_key_value_heads;
  return num_key_value_heads;
}

bool ModelConfig::is_kv_shared(int64_t layer) const {
  const int64_t first = first_kv_shared_layer();
  return num_kv_shared_layers > 0 && first > 0 && layer >= first;
}

int64_t ModelConfig::kv_source_layer(int64_t layer) const {
  if (!is_kv_shared(layer)) return -1;
  for (int64_t j = first_kv_shared_layer() - 1; j >= 0; --j)
    if (layer_types[j] == layer_types[layer]) return j;
  return -1;
}

bool ModelConfig::stores_full_length_kv(int64_t layer) const {
  if (num_kv_shared_layers <= 0 || is_kv_shared(layer)) return false;
  for (int64_t j = layer + 1; j < first_kv_shared_layer(); ++j)
    if (layer_types[j] == layer_types[layer]) return false;
  return true;
}

bool ModelConfig::owns_kv_weights(int64_t layer) const {
  return !is_kv_shared(layer) || kv_share_semantics == KvShareSemantics::kCacheGated;
}

int64_t ModelConfig::layer_intermediate_size(int64_t layer) const {
  return (use_double_wide_mlp && is_kv_shared(layer)) ? 2 * intermediate_size : intermediate_size;
}

std::optional<int64_t> ModelConfig::layer_window(int64_t layer) const {
  if (is_full(layer)) return std::nullopt;
  return sliding_window;
}

bool ModelConfig::layer_vision_bidirectional(int64_t layer) const {
  return use_bidirectional_attention == "vision" && (!is_full(layer) || vision_mask == VisionMask::kGroupOnEveryLayer);
}

int64_t ModelConfig::parameter_count() const {
  // Exact for the text model's weights up to norms and scalars (which are O(L x H)); saturates instead of overflowing.
  const double H = double(hidden_size), L = double(num_hidden_layers), P = double(hidden_size_per_layer_input);
  double n = double(vocab_size) * H + H;  // embeddings, final norm
  if (P > 0) n += double(vocab_size_per_layer_input) * L * P + H * L * P + P;
  for (int64_t i = 0; i < num_hidden_layers; ++i) {
    const double d = double(is_full(i) ? global_head_dim : head_dim), kv = double(layer_kv_heads(i));
    n += H * double(num_attention_heads) * d * 2 + H * kv * d * 2 + 2 * d;  // q, o; k, v; q/k norms
    n += 3 * H * double(intermediate_size) * (use_double_wide_mlp ? 2 : 1) + 4 * H;
    if (P > 0) n += 2 * H * P + P;
  }
  return n >= 9.0e18 ? std::numeric_limits<int64_t>::max() : int64_t(n);
}

void ModelConfig::validate(const std::string& source, const std::string& key_prefix) const {
  auto key = [&](const char* field) { return key_prefix + field; };
  auto positive = [&](int64_t v, const char* field) {
    if (v <= 0) throw InputError(source, key(field), fmt::format("must be positive, got {}", v));
  };
  // Limits checked before anything is allocated: a size no machine can hold is an input error naming the key,
  // never an allocation failure. Each is far above every Gemma4 model (largest: 31B, vocab 262144).
  auto at_most = [&](int64_t v, int64_t limit, const char* field) {
    if (v > limit) throw InputError(source, key(field), fmt::format("{} is more than this harness allows ({})", v, limit));
  };
  at_most(vocab_size, int64_t(1) << 22, "vocab_size");
  at_most(vocab_size_per_layer_input, int64_t(1) << 22, "vocab_size_per_layer_input");
  at_most(hidden_size, int64_t(1) << 16, "hidden_size");
  at_most(intermediate_size, int64_t(1) << 18, "intermediate_size");
  at_most(num_hidden_layers, 1024, "num_hidden_layers");
  at_most(num_attention_heads, 1024, "num_attention_heads");
  at_most(num_key_value_heads, 1024, "num_key_value_heads");
  at_most(head_dim, 4096, "head_dim");
  at_most(global_head_dim, 4096, "global_head_dim");
  at_most(hidden_size_per_layer_input, int64_t(1) << 14, "hidden_size_per_layer_input");
  positive(vocab_size, "vocab_size");
  positive(hidden_size, "hidden_size");
  positive(intermediate_size, "intermediate_size");
  positive(num_hidden_layers, "num_hidden_layers");
  positive(num_attention_heads, "num_attention_heads");
  positive(num_key_value_heads, "num_key_value_heads");
  positive(head_dim, "head_dim");
  positive(global_head_dim, "global_head_dim");
  positive(sliding_window, "sliding_window");
  if (num_global_key_value_heads) {
    positive(*num_global_key_value_heads, "num_global_key_value_heads");
    at_most(*num_global_key_value_heads, 1024, "num_global_key_value_heads");
  }
  if (head_dim % 2 || global_head_dim % 2) throw InputError(source, key("head_dim"), "head dims must be even for RoPE");
  if (int64_t(layer_types.size()) != num_hidden_layers)
    throw InputError(source, key("layer_types"), fmt::format("has {} entries for {} layers", layer_types.size(), num_hidden_layers));
  for (int64_t i = 0; i < num_hidden_layers; ++i)
    if (num_attention_heads % layer_kv_heads(i))
      throw InputError(source, key("num_key_value_heads"), fmt::format("layer {}: {} heads not a multiple of {} KV heads", i, num_attention_heads, layer_kv_heads(i)));
  if (attention_k_eq_v && !num_global_key_value_heads)
    throw InputError(source, key("num_global_key_value_heads"), "required when attention_k_eq_v is true (transformers before 5.16 fail without it; "
                     "later ones give the full layers num_key_value_heads: write that number for their model)");
  if (!layer_types.empty() && layer_types.back() != LayerType::kFull)
    throw InputError(source, key("layer_types"),
                     fmt::format("the last layer ({}) must be full_attention: transformers forces it so (a config.json saying "
                                 "otherwise is read as transformers reads it)", num_hidden_layers - 1));
  // Every layer shared: no layer computes the K/V they would reuse (transformers refuses such a config too).
  if (num_kv_shared_layers < 0 || num_kv_shared_layers >= num_hidden_layers)
    throw InputError(source, key("num_kv_shared_layers"), fmt::format("{} outside [0, {}]{}", num_kv_shared_layers, num_hidden_layers - 1,
                                 num_kv_shared_layers > 0 ? ": with every layer shared no layer computes the K/V they reuse" : ""));
  for (int64_t i = 0; i < num_hidden_layers; ++i)
    if (is_kv_shared(i) && kv_source_layer(i) < 0)
      throw InputError(source, key("num_kv_shared_layers"), fmt::format("shared layer {} ({}) has no earlier layer of its type", i, layer_type_name(layer_types[i])));
  if (hidden_size_per_layer_input < 0) throw InputError(source, key("hidden_size_per_layer_input"), "must be >= 0");
  if (hidden_size_per_layer_input > 0) positive(vocab_size_per_layer_input, "vocab_size_per_layer_input");
  if (hidden_size_per_layer_input > 0 && vocab_size_per_layer_input < vocab_size)  // every token id indexes both tables
    throw InputError(source, key("vocab_size_per_layer_input"),
                     fmt::format("{} is smaller than vocab_size {}: token ids past it have no per-layer embedding",
                                 vocab_size_per_layer_input, vocab_size));
  if (!use_bidirectional_attention.empty() && use_bidirectional_attention != "vision")
    throw InputError(source, key("use_bidirectional_attention"), "only null or \"vision\" is supported, got \"" + use_bidirectional_attention.substr(0, 64) + "\"");
  if (!tie_word_embeddings) throw InputError(source, key("tie_word_embeddings"), "Gemma4 ties the LM head; false is not supported");
  // Values that would make every run NaN (or silently something else) are bad input, not a training failure.
  for (const auto& [r, type] : {std::pair{&rope_full, "full_attention"}, std::pair{&rope_sliding, "sliding_attention"}}) {
    const std::string at = std::string("rope_parameters.") + type + ".";
    if (!(r->partial_rotary_factor > 0 && r->partial_rotary_factor <= 1))
      throw InputError(source, key((at + "partial_rotary_factor").c_str()), "must be in (0, 1]");
    if (!(std::isfinite(r->theta) && r->theta > 1))
      throw InputError(source, key((at + "rope_theta").c_str()), fmt::format("must be finite and > 1, got {}", r->theta));
    if (!(std::isfinite(r->factor) && r->factor > 0))
      throw InputError(source, key((at + "factor").c_str()), fmt::format("must be finite and > 0, got {}", r->factor));
  }
  if (!(rms_norm_eps > 0 && rms_norm_eps < 1))
    throw InputError(source, key("rms_norm_eps"), fmt::format("must be in (0, 1), got {}", rms_norm_eps));
  if (final_logit_softcapping && !(std::isfinite(*final_logit_softcapping) && *final_logit_softcapping > 0))
    throw InputError(source, key("final_logit_softcapping"),
                     fmt::format("must be null or finite and > 0, got {}", *final_logit_softcapping));
  if (pad_token_id && (*pad_token_id < 0 || *pad_token_id >= vocab_size))
    throw InputError(source, key("pad_token_id"), "outside the vocabulary");
  const int64_t params = parameter_count();
  if (params > kMaxParameters)
    throw InputError(source, key_prefix.empty() ? "config" : key_prefix.substr(0, key_prefix.size() - 1),
                     fmt::format("{:.3g} parameters is more than this harness allows ({:.3g})", double(params), double(kMaxParameters)));
}

json ModelConfig::to_json() const {
  json types = json::array();
  for (auto t : layer_types) types.push_back(layer_type_name(t));
  auto rope = [](const RopeConfig& r) {
    json j = {{"rope_type", r.rope_type}, {"rope_theta", r.theta}};
    if (r.rope_type == "proportional") j["partial_rotary_factor"] = r.partial_rotary_factor;
    if (r.factor != 1.0) j["factor"] = r.factor;
    return j;
  };
  json j = {
      {"model_type", "gemma4_text"},
      {"vocab_size", vocab_size},
      {"hidden_size", hidden_size},
      {"intermediate_size", intermediate_size},
      {"num_hidden_layers", num_hidden_layers},
      {"num_attention_heads", num_attention_heads},
      {"num_key_value_heads", num_key_value_heads},
      {"head_dim", head_dim},
      {"global_head_dim", global_head_dim},
      {"num_global_key_value_heads", num_global_key_value_heads ? json(*num_global_key_value_heads) : json(nullptr)},
      {"attention_k_eq_v", attention_k_eq_v},
      {"layer_types", types},
      {"sliding_window", sliding_window},
      {"rope_parameters", {{"sliding_attention", rope(rope_sliding)}, {"full_attention", rope(rope_full)}}},
      {"rms_norm_eps", rms_norm_eps},
      {"final_logit_softcapping", final_logit_softcapping ? json(*final_logit_softcapping) : json(nullptr)},
      {"hidden_size_per_layer_input", hidden_size_per_layer_input},
      {"vocab_size_per_layer_input", vocab_size_per_layer_input},
      {"num_kv_shared_layers", num_kv_shared_layers},
      {"use_double_wide_mlp", use_double_wide_mlp},
      {"use_bidirectional_attention", use_bidirectional_attention.empty() ? json(nullptr) : json(use_bidirectional_attention)},
      {"hidden_activation", "gelu_pytorch_tanh"},
      {"attention_bias", false},
      {"pad_token_id", pad_token_id ? json(*pad_token_id) : json(nullptr)},
      {"tie_word_embeddings", tie_word_embeddings},
  };
  return j;
}

std::vector<std::string> preset_names() { return {"e2b", "e4b", "31b", "tiny-e2b", "tiny-e4b", "tiny-31b"}; }

ModelConfig preset_config(const std::string& name) {
  if (name == "e2b") return e2b();
  if (name == "e4b") return e4b();
  if (name == "31b") return b31();
  // GQA ratios kept: E2B 8:1, E4B 4:1 (8:2), 31B 8:4 sliding and 8:1 full (32:16, 32:4).
  if (name == "tiny-e2b") return tiny(e2b(), 8, 1, std::nullopt);
  if (name == "tiny-e4b") return tiny(e4b(), 4, 1, std::nullopt);
  if (name == "tiny-31b") return tiny(b31(), 8, 4, 1);
  std::string known;
  for (auto& n : preset_names()) known += (known.empty() ? "" : ", ") + n;
  throw InputError("preset", name, "unknown preset (known: " + known + ")");
}

// What transformers' Gemma4TextConfig gives a key a config leaves out (its class defaults, gemma4-spec [CFG]); they
// differ from ModelConfig's own defaults (the presets' starting point) in two keys.
static ModelConfig transformers_defaults() {
  ModelConfig c;
  c.final_logit_softcapping.reset();
  c.hidden_size_per_layer_input = 256;
  return c;
}

ModelConfig config_from_hf_json(const json& j, const std::string& source) {
  if (!j.is_object()) throw InputError(source, "config", "expected a JSON object");
  const bool nested = j.contains("text_config");
  if (nested && !j["text_config"].is_object()) throw InputError(source, "text_config", "expected an object");
  ModelConfig c = transformers_defaults();
  c.layer_types.clear();
  const json& text = nested ? j["text_config"] : j;
  // transformers' config.json always names its model type; a JSON object without one (a case file, a config of
  // nothing) would otherwise become a default-sized model.
  if (!text.contains("model_type") && !j.contains("model_type"))
    throw InputError(source, "model_type", "missing: not a transformers config.json (expected \"gemma4_text\")");
  apply_hf_keys(c, text, source, nested ? "text_config." : "", /*strict=*/false);
  // A multimodal config's own tie_word_embeddings decides the head of the whole model in transformers: false there
  // unties it whatever text_config says.
  if (nested && j.contains("tie_word_embeddings") && !j["tie_word_embeddings"].is_null() &&
      !read_field<bool>(j, "tie_word_embeddings", source, ""))
    throw InputError(source, "tie_word_embeddings", "Gemma4 ties the LM head; false is not supported");
  c.name = "hf";
  c.validate(source, nested ? "text_config." : "");
  return c;
}

ModelConfig load_hf_config_file(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::exists(path, ec) && !std::filesystem::is_regular_file(path, ec))
    throw InputError(path, "config", "is not a regular file");
  std::ifstream in(path);
  if (!in) throw InputError(path, "config", std::string("cannot open file: ") + std::strerror(errno));  // why: gone, a link loop
  return config_from_hf_json(io::parse_input_json(in, path, "config"), path);
}

std::string to_string(KvShareSemantics s) {
  return s == KvShareSemantics::kCacheGated ? "cache-gated" : "shared-kv-states";
}

KvShareSemantics kv_share_semantics_from_string(const std::string& s, const std::string& source) {
  if (s == "shared-kv-states") return KvShareSemantics::kSharedKvStates;
  if (s == "cache-gated") return KvShareSemantics::kCacheGated;
  throw InputError(source, "kv_share_semantics", "expected \"shared-kv-states\" or \"cache-gated\", got \"" + s + "\"");
}

std::string to_string(VisionMask m) {
  switch (m) {
    case VisionMask::kGroupPastWindow: return "group_past_window";
    case VisionMask::kGroupOnEveryLayer: return "group_on_every_layer";
    case VisionMask::kGroupInsideWindow: break;
  }
  return "group_inside_window";
}

VisionMask vision_mask_from_string(const std::string& s, const std::string& source, const std::string& key) {
  for (VisionMask m : {VisionMask::kGroupInsideWindow, VisionMask::kGroupPastWindow, VisionMask::kGroupOnEveryLayer})
    if (s == to_string(m)) return m;
  throw InputError(source, key,
                   "expected \"group_inside_window\" (transformers >= 5.13), \"group_past_window\" (5.5 .. 5.8) or "
                   "\"group_on_every_layer\" (5.9 .. 5.12), got \"" + s.substr(0, 64) + "\"");
}

ModelConfig config_from_case_json(const json& j, const std::string& source) {
  if (!j.is_object()) throw InputError(source, "model", "expected an object");
  ModelConfig c;
  const bool has_preset = j.contains("preset"), has_config = j.contains("config"), has_file = j.contains("config_file");
  if (int(has_preset) + int(has_config) + int(has_file) != 1)
    throw InputError(source, "model", "give exactly one of \"preset\", \"config\" or \"config_file\"");
  std::string prefix = "model.";  // where a bad value came from, for the validation's messages
  for (auto& [key, value] : j.items()) {
    static const std::set<std::string> known = {"preset", "config", "config_file", "overrides", "kv_share_semantics",
                                                "vision_mask"};
    if (!known.count(key)) throw InputError(source, "model." + key, "unknown key");
  }
  if (has_file) {
    // A checkpoint's own config.json (save_pretrained), read as transformers writes it: keys the model does not
    // use (architectures, dtype, ...) are ignored there, as the HF loader does.
    if (!j["config_file"].is_string()) throw InputError(source, "model.config_file", "wrong type: expected a string");
    if (j.contains("overrides")) throw InputError(source, "model.overrides", "only allowed with \"preset\"");
    const auto file = io::resolve_beside(source, j["config_file"].get<std::string>());
    try {
      c = load_hf_config_file(file);
    } catch (const InputError& e) {  // named from the case too: which key pointed at the bad file
      throw InputError(source, "model.config_file", e.what());
    }
    prefix = "model.config_file.";
  } else if (has_preset) {
    if (!j["preset"].is_string()) throw InputError(source, "model.preset", "wrong type: expected a string");
    try {
      c = preset_config(j["preset"].get<std::string>());
    } catch (const InputError& e) {
      throw InputError(source, "model.preset", e.what());
    }
    if (j.contains("overrides")) apply_hf_keys(c, j["overrides"], source, "model.overrides.", /*strict=*/true);
    prefix = j.contains("overrides") ? "model.overrides." : "model.";
  } else {
    if (j.contains("overrides")) throw InputError(source, "model.overrides", "only allowed with \"preset\"");
    // An inline config gives the geometry itself: defaults for it would be a 2.6 B-parameter model nobody asked for.
    if (j["config"].is_object())
      for (const char* k : {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                            "num_key_value_heads", "head_dim", "layer_types"})
        if (!j["config"].contains(k)) throw InputError(source, std::string("model.config.") + k, "missing required key");
    c = transformers_defaults();
    c.layer_types.clear();
    apply_hf_keys(c, j["config"], source, "model.config.", /*strict=*/true);
    c.name = "inline";
    prefix = "model.config.";
  }
  if (j.contains("kv_share_semantics")) {
    if (!j["kv_share_semantics"].is_string()) throw InputError(source, "model.kv_share_semantics", "wrong type: expected a string");
    c.kv_share_semantics = kv_share_semantics_from_string(j["kv_share_semantics"].get<std::string>(), source);
    // As for vision_mask: semantics of sharing no layer does would select nothing and say otherwise.
    if (c.num_kv_shared_layers == 0)
      throw InputError(source, "model.kv_share_semantics",
                       "only meaningful with KV-shared layers (this model's num_kv_shared_layers is 0)");
  }
  if (j.contains("vision_mask")) {
    if (!j["vision_mask"].is_string()) throw InputError(source, "model.vision_mask", "wrong type: expected a string");
    c.vision_mask = vision_mask_from_string(j["vision_mask"].get<std::string>(), source, "model.vision_mask");
    // A rule for groups no layer has would select nothing and say otherwise.
    if (c.use_bidirectional_attention != "vision")
      throw InputError(source, "model.vision_mask",
                       "only meaningful with use_bidirectional_attention \"vision\" (this model has no vision groups)");
  }
  c.validate(source, prefix);
  return c;
}

}  // namespace cpharness::model
