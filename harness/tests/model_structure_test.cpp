// KV-sharing layout and parameter shapes of the released presets (gemma4-spec §4.1, §6), without allocating.
#include <gtest/gtest.h>

#include <map>
#include <utility>
#include <vector>

#include "harness/io/input_error.h"
#include "harness/model/config.h"
#include "harness/model/weights.h"
#include "model_fixtures.h"

namespace cpharness::model {
namespace {

using Shape = std::vector<int64_t>;

std::map<std::string, Shape> shapes_of(const ModelConfig& c) {
  std::map<std::string, Shape> out;
  for (auto& s : tensor_specs(c)) out[s.name] = s.shape;
  return out;
}

void expect_sources(const ModelConfig& c, int64_t first_shared, int64_t sliding_src, int64_t full_src) {
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    if (i < first_shared) {
      EXPECT_FALSE(c.is_kv_shared(i)) << c.name << " layer " << i;
      EXPECT_EQ(c.kv_source_layer(i), -1);
      EXPECT_EQ(c.stores_full_length_kv(i), i == sliding_src || i == full_src) << c.name << " layer " << i;
    } else {
      EXPECT_TRUE(c.is_kv_shared(i)) << c.name << " layer " << i;
      EXPECT_EQ(c.kv_source_layer(i), c.is_full(i) ? full_src : sliding_src) << c.name << " layer " << i;
    }
  }
}

TEST(ModelStructure, KvShareSourcesOfReleasedPresets) {
  expect_sources(preset_config("e2b"), 15, 13, 14);
  expect_sources(preset_config("e4b"), 24, 22, 23);
  auto b31 = preset_config("31b");
  for (int64_t i = 0; i < 60; ++i) EXPECT_FALSE(b31.is_kv_shared(i));
  // The tiny variants keep the layout.
  expect_sources(preset_config("tiny-e2b"), 15, 13, 14);
  expect_sources(preset_config("tiny-e4b"), 24, 22, 23);
}

TEST(ModelStructure, E2bShapesMatchTheSpecTables) {
  auto s = shapes_of(preset_config("e2b"));
  EXPECT_EQ(s["layers.0.self_attn.q_proj.weight"], (Shape{2048, 1536}));
  EXPECT_EQ(s["layers.0.self_attn.k_proj.weight"], (Shape{256, 1536}));
  EXPECT_EQ(s["layers.0.self_attn.v_proj.weight"], (Shape{256, 1536}));
  EXPECT_EQ(s["layers.0.self_attn.o_proj.weight"], (Shape{1536, 2048}));
  EXPECT_EQ(s["layers.4.self_attn.q_proj.weight"], (Shape{4096, 1536}));
  EXPECT_EQ(s["layers.4.self_attn.k_proj.weight"], (Shape{512, 1536}));
  EXPECT_EQ(s["layers.4.self_attn.o_proj.weight"], (Shape{1536, 4096}));
  EXPECT_EQ(s["embed_tokens_per_layer.weight"], (Shape{262144, 8960}));
  EXPECT_EQ(s["per_layer_model_projection.weight"], (Shape{8960, 1536}));
  EXPECT_EQ(s["layers.14.mlp.gate_proj.weight"], (Shape{6144, 1536}));
  EXPECT_EQ(s["layers.15.mlp.gate_proj.weight"], (Shape{12288, 1536}));  // double-wide on shared layers
  EXPECT_EQ(s["layers.34.mlp.down_proj.weight"], (Shape{1536, 12288}));
  EXPECT_EQ(s.count("layers.15.self_attn.k_proj.weight"), 0u);  // shared layers own no k/v
  EXPECT_EQ(s["embed_tokens.weight"], (Shape{262144, 1536}));
}

TEST(ModelStructure, E4bShapesMatchTheSpecTables) {
  auto s = shapes_of(preset_config("e4b"));
  EXPECT_EQ(s["layers.0.self_attn.q_proj.weight"], (Shape{2048, 2560}));
  EXPECT_EQ(s["layers.0.self_attn.k_proj.weight"], (Shape{512, 2560}));
  EXPECT_EQ(s["layers.5.self_attn.q_proj.weight"], (Shape{4096, 2560}));
  EXPECT_EQ(s["layers.5.self_attn.k_proj.weight"], (Shape{1024, 2560}));
  EXPECT_EQ(s["embed_tokens_per_layer.weight"], (Shape{262144, 10752}));
  EXPECT_EQ(s["layers.24.mlp.gate_proj.weight"], (Shape{10240, 2560}));  // not double-wide
  EXPECT_EQ(s.count("layers.24.self_attn.v_proj.weight"), 0u);
}

TEST(ModelStructure, B31ShapesMatchTheSpecTables) {
  auto s = shapes_of(preset_config("31b"));
  EXPECT_EQ(s["layers.0.self_attn.q_proj.weight"], (Shape{8192, 5376}));
  EXPECT_EQ(s["layers.0.self_attn.k_proj.weight"], (Shape{4096, 5376}));
  EXPECT_EQ(s["layers.0.self_attn.v_proj.weight"], (Shape{4096, 5376}));
  EXPECT_EQ(s["layers.0.self_attn.o_proj.weight"], (Shape{5376, 8192}));
  EXPECT_EQ(s["layers.5.self_attn.q_proj.weight"], (Shape{16384, 5376}));
  EXPECT_EQ(s["layers.5.self_attn.k_proj.weight"], (Shape{2048, 5376}));
  EXPECT_EQ(s.count("layers.5.self_attn.v_proj.weight"), 0u);  // k_eq_v
  EXPECT_EQ(s["layers.5.self_attn.k_norm.weight"], (Shape{512}));
  EXPECT_EQ(s["layers.5.self_attn.o_proj.weight"], (Shape{5376, 16384}));
  EXPECT_EQ(s.count("embed_tokens_per_layer.weight"), 0u);
  EXPECT_EQ(s["layers.59.mlp.up_proj.weight"], (Shape{21504, 5376}));
}

TEST(ModelStructure, TensorSpecsEqualTheConstructedModel) {
  for (const char* name : {"tiny-e2b", "tiny-e4b", "tiny-31b"}) {
    for (auto sem : {KvShareSemantics::kSharedKvStates, KvShareSemantics::kCacheGated}) {
      auto c = preset_config(name);
      c.kv_share_semantics = sem;
      Gemma4Model m(c);
      auto actual = model_tensors(m);
      auto expected = tensor_specs(c);
      ASSERT_EQ(actual.size(), expected.size()) << name;
      for (auto& spec : expected) {
        ASSERT_TRUE(actual.count(spec.name)) << spec.name;
        EXPECT_EQ(actual[spec.name].sizes().vec(), spec.shape) << spec.name;
      }
    }
  }
}

TEST(ModelStructure, TinyPresetsKeepTheStructure) {
  for (auto [real, tiny] : {std::pair{"e2b", "tiny-e2b"}, {"e4b", "tiny-e4b"}, {"31b", "tiny-31b"}}) {
    auto r = preset_config(real), t = preset_config(tiny);
    EXPECT_EQ(r.layer_types, t.layer_types) << tiny;
    EXPECT_EQ(r.num_kv_shared_layers, t.num_kv_shared_layers);
    EXPECT_EQ(r.use_double_wide_mlp, t.use_double_wide_mlp);
    EXPECT_EQ(r.has_per_layer_inputs(), t.has_per_layer_inputs());
    EXPECT_EQ(r.attention_k_eq_v, t.attention_k_eq_v);
    EXPECT_EQ(r.use_bidirectional_attention, t.use_bidirectional_attention);
    for (int64_t i = 0; i < r.num_hidden_layers; ++i)
      EXPECT_EQ(r.num_attention_heads / r.layer_kv_heads(i), t.num_attention_heads / t.layer_kv_heads(i)) << tiny << " layer " << i;
  }
}

TEST(ModelStructure, HfConfigJsonReadsTextConfigAndRoundTrips) {
  auto c = preset_config("tiny-e4b");
  nlohmann::json wrapped = {{"architectures", {"Gemma4ForConditionalGeneration"}}, {"text_config", c.to_json()}};
  auto back = config_from_hf_json(wrapped, "config.json");
  EXPECT_EQ(back.layer_types, c.layer_types);
  EXPECT_EQ(back.hidden_size_per_layer_input, 8);
  EXPECT_EQ(back.num_kv_shared_layers, 18);
  EXPECT_EQ(tensor_specs(back).size(), tensor_specs(c).size());
}

// A multimodal config.json's own tie_word_embeddings unties the whole model's head in transformers, whatever
// text_config says: false there is refused as it is in text_config, each named by its path.
TEST(ModelStructure, AnUntiedHeadIsRefusedAtEitherLevelOfAMultimodalConfig) {
  auto text = preset_config("tiny-e4b").to_json();
  auto key_of = [](const nlohmann::json& j) {
    try {
      config_from_hf_json(j, "config.json");
    } catch (const io::InputError& e) {
      return e.subject();
    }
    return std::string("(accepted)");
  };
  nlohmann::json top = {{"model_type", "gemma4"}, {"text_config", text}, {"tie_word_embeddings", false}};
  EXPECT_EQ(key_of(top), "tie_word_embeddings");
  top["tie_word_embeddings"] = true;
  EXPECT_EQ(key_of(top), "(accepted)");
  top["text_config"]["tie_word_embeddings"] = false;
  EXPECT_EQ(key_of(top), "text_config.tie_word_embeddings");
  text["tie_word_embeddings"] = false;
  EXPECT_EQ(key_of(text), "tie_word_embeddings");
}

// A config.json without layer_types gets transformers' default pattern: every sixth layer full (5, 11, ...), and
// the last layer full.
TEST(ModelStructure, AConfigWithoutLayerTypesGetsTransformersDefaultPattern) {
  auto j = preset_config("tiny-31b").to_json();
  j.erase("layer_types");
  j["num_hidden_layers"] = 14;
  const auto c = config_from_hf_json(j, "config.json");
  std::vector<int64_t> full;
  for (int64_t i = 0; i < c.num_hidden_layers; ++i)
    if (c.layer_types.at(size_t(i)) == LayerType::kFull) full.push_back(i);
  EXPECT_EQ(full, (std::vector<int64_t>{5, 11, 13}));
}

TEST(ModelStructure, BadConfigsNameTheField) {
  auto expect_error = [](const nlohmann::json& j, const std::string& needle) {
    try {
      config_from_case_json(j, "case.json");
      FAIL() << "no error for " << j.dump();
    } catch (const io::InputError& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("case.json"), std::string::npos) << e.what();
    }
  };
  expect_error({{"preset", "e3b"}}, "model.preset");
  expect_error({{"preset", "tiny-e2b"}, {"overrides", {{"hidden_sise", 3}}}}, "model.overrides.hidden_sise");
  expect_error({{"preset", "tiny-e2b"}, {"overrides", {{"hidden_size", "64"}}}}, "model.overrides.hidden_size");
  expect_error({{"preset", "tiny-e2b"}, {"colour", 1}}, "model.colour");
  expect_error({{"preset", "tiny-e2b"}, {"kv_share_semantics", "sometimes"}}, "kv_share_semantics");
  // Sharing semantics for a model that shares nothing would select nothing (as vision_mask without vision groups).
  expect_error({{"preset", "tiny-31b"}, {"kv_share_semantics", "cache-gated"}}, "only meaningful with KV-shared layers");
  expect_error({{"preset", "tiny-e2b"}, {"overrides", {{"num_key_value_heads", 3}}}}, "num_key_value_heads");
  // Values that would make every run NaN, or another model's math, are refused naming the key.
  const nlohmann::json rope_zero = {{"sliding_attention", {{"rope_type", "default"}, {"rope_theta", 0.0}}}};
  expect_error({{"preset", "tiny-e2b"}, {"overrides", {{"rope_parameters", rope_zero}}}}, "sliding_attention.rope_theta");
  const nlohmann::json rope_partial = {{"sliding_attention", {{"rope_type", "default"}, {"partial_rotary_factor", 5.0}}}};
  expect_error({{"preset", "tiny-e2b"}, {"overrides", {{"rope_parameters", rope_partial}}}}, "sliding_attention.partial_rotary_factor");
  const nlohmann::json rope_factor = {{"full_attention", {{"rope_type", "proportional"}, {"factor", 0.0}}}};
  expect_error({{"preset", "tiny-e2b"}, {"overrides", {{"rope_parameters", rope_factor}}}}, "full_attention.factor");
  expect_error({{"preset", "tiny-e2b"}, {"overrides", {{"rms_norm_eps", -1.0}}}}, "rms_norm_eps");
  expect_error({{"preset", "tiny-e2b"}, {"overrides", {{"rms_norm_eps", 1e308}}}}, "rms_norm_eps");
  expect_error({{"preset", "tiny-e2b"}, {"overrides", {{"final_logit_softcapping", 0.0}}}}, "final_logit_softcapping");
  expect_error({{"preset", "tiny-e2b"}, {"overrides", {{"model_type", "llama"}}}}, "model_type");
  expect_error({{"preset", "tiny-e2b"}, {"overrides", {{"hidden_activation", "relu"}}}}, "hidden_activation");
  // In an HF config.json (where unknown keys are ignored, as transformers does) too.
  auto hf = preset_config("tiny-e2b").to_json();
  hf["hidden_activation"] = "relu";
  EXPECT_THROW(config_from_hf_json(hf, "config.json"), io::InputError);
  hf["hidden_activation"] = "gelu_pytorch_tanh";
  hf["model_type"] = "llama";
  EXPECT_THROW(config_from_hf_json(hf, "config.json"), io::InputError);
  hf.erase("model_type");  // any JSON object (a case file, {}) is not a config.json of a default-sized model
  EXPECT_THROW(config_from_hf_json(hf, "config.json"), io::InputError);
  EXPECT_THROW(config_from_hf_json(nlohmann::json::object(), "config.json"), io::InputError);
  auto small_per_layer_vocab = preset_config("tiny-e2b").to_json();
  small_per_layer_vocab["vocab_size_per_layer_input"] = small_per_layer_vocab["vocab_size"].get<int64_t>() / 2;
  EXPECT_THROW(config_from_hf_json(small_per_layer_vocab, "config.json"), io::InputError);
}

// What newer transformers' save_pretrained writes (seen from 5.16 to 5.25): pad_token_id null (no padding row), and
// per_layer_config leaving out values equal to the base ones: no global_head_dim (= head_dim), no
// num_global_key_value_heads under attention_k_eq_v (= num_key_value_heads). Each is read as transformers reads it.
TEST(ModelStructure, NewerTransformersConfigsLeaveOutWhatEqualsTheBaseValue) {
  auto j = preset_config("tiny-31b").to_json();
  j["pad_token_id"] = nullptr;
  j.erase("global_head_dim");
  j.erase("num_global_key_value_heads");
  j["head_dim"] = 8;
  j["num_key_value_heads"] = 2;
  j["per_layer_config"] = nlohmann::json::object();
  ASSERT_TRUE(j.value("attention_k_eq_v", false));
  const auto c = config_from_hf_json(j, "config.json");
  EXPECT_FALSE(c.pad_token_id.has_value());
  EXPECT_EQ(c.global_head_dim, 8);
  ASSERT_TRUE(c.num_global_key_value_heads.has_value());
  EXPECT_EQ(*c.num_global_key_value_heads, 2);
  // A per-layer entry still says what it says.
  j["per_layer_config"] = {{"full_attention", {{"head_dim", 16}, {"num_key_value_heads", 1}}}};
  const auto d = config_from_hf_json(j, "config.json");
  EXPECT_EQ(d.global_head_dim, 16);
  EXPECT_EQ(*d.num_global_key_value_heads, 1);
  // And the model runs without a padding row (HF's nn.Embedding(padding_idx=None)).
  EXPECT_NO_THROW({ Gemma4Model m(c); });
}

// Configs on which the harness and transformers (5.25) built different models, found by exporting random
// geometries: each is now read as transformers reads it, or refused naming the key where the harness cannot build it.
TEST(ModelStructure, ConfigsAreReadAsTransformersReadsThemOrRefused) {
  // A config.json whose last layer is sliding: transformers forces it to full (with a warning) and builds that.
  auto last_sliding = preset_config("tiny-e2b").to_json();
  last_sliding["layer_types"].back() = "sliding_attention";
  EXPECT_TRUE(config_from_hf_json(last_sliding, "config.json").is_full(last_sliding["num_hidden_layers"].get<int64_t>() - 1));
  // In a case file it is refused, naming the key.
  try {
    config_from_case_json({{"preset", "tiny-e2b"}, {"overrides", {{"layer_types", last_sliding["layer_types"]}}}}, "case.json");
    ADD_FAILURE() << "a last sliding layer was accepted";
  } catch (const io::InputError& e) {
    EXPECT_NE(std::string(e.what()).find("model.overrides.layer_types"), std::string::npos) << e.what();
  }
  // Keys a config.json leaves out take transformers' class defaults, not the presets' (no softcap, per-layer width 256).
  auto missing = preset_config("tiny-e4b").to_json();
  missing.erase("final_logit_softcapping");
  missing.erase("hidden_size_per_layer_input");
  const auto c = config_from_hf_json(missing, "config.json");
  EXPECT_FALSE(c.final_logit_softcapping.has_value());
  EXPECT_EQ(c.hidden_size_per_layer_input, 256);
  // Every layer KV-shared: no layer computes the K/V (transformers refuses it).
  auto all_shared = preset_config("tiny-e2b").to_json();
  all_shared["num_kv_shared_layers"] = all_shared["num_hidden_layers"];
  EXPECT_THROW(config_from_hf_json(all_shared, "config.json"), io::InputError);
  // Features not implemented are refused in a config.json too (ignored, they built another model); their "off"
  // values, which the harness writes itself, read back.
  for (const char* key : {"attention_bias", "enable_moe_block"}) {
    auto on = preset_config("tiny-e2b").to_json();
    on[key] = true;
    EXPECT_THROW(config_from_hf_json(on, "config.json"), io::InputError) << key;
  }
  auto dropout = preset_config("tiny-e2b").to_json();
  dropout["attention_dropout"] = 0.1;
  EXPECT_THROW(config_from_hf_json(dropout, "config.json"), io::InputError);
  EXPECT_NO_THROW(config_from_case_json({{"config", preset_config("tiny-e2b").to_json()}}, "case.json"));
  // per_layer_config giving sliding layers their own KV head count: transformers keeps the base count on full layers,
  // which this model (one count for both without attention_k_eq_v) cannot build: refused, not built otherwise.
  auto kv = preset_config("tiny-e4b").to_json();
  ASSERT_FALSE(kv.value("attention_k_eq_v", false));
  kv["per_layer_config"] = {{"sliding_attention", {{"num_key_value_heads", 1}}}};
  if (kv["num_key_value_heads"].get<int64_t>() != 1) {
    EXPECT_THROW(config_from_hf_json(kv, "config.json"), io::InputError);
  }
  kv["per_layer_config"] = {{"full_attention", {{"num_key_value_heads", kv["num_key_value_heads"].get<int64_t>() * 2}}}};
  EXPECT_THROW(config_from_hf_json(kv, "config.json"), io::InputError);
  // Any other per-layer key that differs from the whole config's (a layer's own MLP width or window) is another model
  // than this one builds: refused naming the entry, not ignored. Repeating the whole config's value is harmless.
  auto other = preset_config("tiny-e2b").to_json();
  const int64_t width = other["intermediate_size"].get<int64_t>();
  other["per_layer_config"] = {{"1", {{"intermediate_size", width}}}};
  EXPECT_NO_THROW(config_from_hf_json(other, "config.json"));
  for (const auto& [key, value] : std::vector<std::pair<std::string, nlohmann::json>>{
           {"intermediate_size", width * 2}, {"sliding_window", other["sliding_window"].get<int64_t>() + 1}, {"made_up", 1}}) {
    other["per_layer_config"] = {{"1", {{key, value}}}};
    try {
      config_from_hf_json(other, "config.json");
      ADD_FAILURE() << "a per-layer " << key << " was ignored";
    } catch (const io::InputError& e) {
      EXPECT_NE(std::string(e.what()).find("per_layer_config.1." + key), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace cpharness::model
