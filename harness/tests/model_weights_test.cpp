// Checkpoints: HF safetensors (prefixes, dtypes, sharded, with or without the shared layers' redundant k/v)
// and the harness's HDF5 weights, with errors that name the tensor.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <functional>

#include "harness/io/input_error.h"
#include "harness/io/safetensors.h"
#include "harness/model/weights.h"
#include "model_fixtures.h"

namespace cpharness::model {
namespace {

namespace fs = std::filesystem;
using testing::inputs_of;
using testing::make_model;
using testing::structured_batch;

class ModelWeights : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("cpharness_weights_" + std::to_string(::getpid()) + "_" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }
  fs::path dir_;
};

torch::Tensor logits_of(Gemma4Model& m, const train::Batch& b) {
  EagerAttention eager;
  torch::NoGradGuard ng;
  return m->forward(inputs_of(b), eager);
}

io::TensorMap with_prefix(Gemma4Model& m, const std::string& prefix, torch::ScalarType dtype) {
  io::TensorMap out;
  for (auto& [name, t] : model_tensors(m)) out[prefix + name] = t.to(dtype);
  return out;
}

TEST_F(ModelWeights, SafetensorsRoundTripGivesAnIdenticalForward) {
  for (const std::string prefix : {"model.language_model.", "model."}) {
    auto source = make_model("tiny-e4b", torch::kFloat32, 5);
    auto tensors = with_prefix(source, prefix, torch::kFloat32);
    tensors["lm_head.weight"] = source->embed_tokens->weight.detach();  // tied, as Google writes it
    io::write_safetensors(path("model.safetensors"), tensors);
    auto target = make_model("tiny-e4b", torch::kFloat32, 99);
    auto summary = load_checkpoint(target, dir_.string());
    EXPECT_EQ(summary.loaded, int64_t(model_tensors(target).size()));
    auto b = structured_batch(source->config());
    EXPECT_TRUE(torch::equal(logits_of(source, b), logits_of(target, b))) << prefix;
  }
}

TEST_F(ModelWeights, Bf16CheckpointLoadsIntoAnFp32Model) {
  auto source = make_model("tiny-31b", torch::kBFloat16, 5);
  io::write_safetensors(path("m.safetensors"), with_prefix(source, "model.", torch::kBFloat16));
  auto target = make_model("tiny-31b", torch::kFloat32, 99);
  load_checkpoint(target, path("m.safetensors"));
  EXPECT_TRUE(torch::equal(target->norm->weight, source->norm->weight.to(torch::kFloat32)));
}

TEST_F(ModelWeights, RedundantSharedLayerKvTensorsAreSkipped) {
  // A Google-style checkpoint carries k/v for the shared layers; a shared-kv-states model skips them.
  auto gated_cfg = preset_config("tiny-e2b");
  gated_cfg.kv_share_semantics = KvShareSemantics::kCacheGated;
  auto gated = make_model(gated_cfg, torch::kFloat32, 5);
  io::write_safetensors(path("google.safetensors"), with_prefix(gated, "model.language_model.", torch::kFloat32));
  auto shared = make_model("tiny-e2b", torch::kFloat32, 99);
  auto summary = load_checkpoint(shared, path("google.safetensors"));
  EXPECT_EQ(summary.skipped_redundant.size(), 20u * 3u);  // 20 shared layers x (k_proj, v_proj, k_norm)
  // A cache-gated model owns them but uses them only without the share holder (the dead-K/V path); a checkpoint
  // from transformers >= 5.5.2 lacks them: they keep their initialisation (as transformers does for missing keys),
  // the summary names them, and with the holder the model computes what the checkpoint's model does.
  auto reference = make_model("tiny-e2b", torch::kFloat32, 5);
  io::write_safetensors(path("new.safetensors"), with_prefix(reference, "model.", torch::kFloat32));
  auto gated2 = make_model(gated_cfg, torch::kFloat32, 1);
  const auto init = model_tensors(gated2).at("layers.15.self_attn.k_norm.weight").clone();
  const auto kept = load_checkpoint(gated2, path("new.safetensors"));
  EXPECT_EQ(kept.kept_init.size(), 20u * 3u);
  EXPECT_TRUE(torch::equal(model_tensors(gated2).at("layers.15.self_attn.k_norm.weight"), init));
  const auto batch = structured_batch(reference->config());
  KvShareHolder holder;
  ForwardOptions o;
  o.holder = &holder;
  EagerAttention eager;
  torch::NoGradGuard ng;
  EXPECT_TRUE(torch::allclose(gated2->forward(inputs_of(batch), eager, o), logits_of(reference, batch), 1e-6, 1e-6));
  // Any other missing tensor of a shared layer is still an error.
  auto without_q = with_prefix(reference, "model.", torch::kFloat32);
  without_q.erase("model.layers.15.self_attn.q_proj.weight");
  io::write_safetensors(path("no-q.safetensors"), without_q);
  try {
    load_checkpoint(gated2, path("no-q.safetensors"));
    FAIL() << "missing q_proj not reported";
  } catch (const io::InputError& e) {
    EXPECT_NE(std::string(e.what()).find("layers.15.self_attn.q_proj.weight"), std::string::npos) << e.what();
  }
}

// The shared layers' unused K/V of a Google-style checkpoint are still weights: kvshare's checks build a
// cache-gated model that loads them. A non-float one or one of the wrong shape is refused by the header check (before
// any model is built or any run trains), a NaN one when the model loads, each naming the tensor; a NaN in the
// embeddings of a tied pair is named as the NaN, not as a head that "differs".
TEST_F(ModelWeights, AbsentSharedLayerKvTensorsAreCheckedAsWeightsBeforeAnyRun) {
  auto gated_cfg = preset_config("tiny-e2b");
  gated_cfg.kv_share_semantics = KvShareSemantics::kCacheGated;
  auto gated = make_model(gated_cfg, torch::kFloat32, 5);
  const auto good = with_prefix(gated, "model.language_model.", torch::kFloat32);
  const std::string name = "model.language_model.layers.20.self_attn.k_proj.weight";
  struct Bad {
    std::string what;
    std::function<void(io::TensorMap&)> spoil;
    bool at_header;
  };
  const std::vector<Bad> bad = {
      {"dtype", [&](io::TensorMap& t) { t[name] = t[name].to(torch::kInt8); }, true},
      {"shape", [&](io::TensorMap& t) { t[name] = torch::zeros({7, 3}); }, true},
      {"NaN", [&](io::TensorMap& t) { t[name] = t[name].clone(); t[name].view(-1)[4] = NAN; }, false},
  };
  for (const auto& b : bad) {
    SCOPED_TRACE(b.what);
    auto tensors = good;
    b.spoil(tensors);
    const auto file = path(b.what + ".safetensors");
    io::write_safetensors(file, tensors);
    auto expect_named = [&](const std::function<void()>& f) {
      try {
        f();
        FAIL() << "not refused";
      } catch (const io::InputError& e) {
        EXPECT_NE(std::string(e.what()).find(name), std::string::npos) << e.what();
        EXPECT_NE(std::string(e.what()).find(b.what), std::string::npos) << e.what();
      }
    };
    if (b.at_header) expect_named([&] { check_checkpoint(preset_config("tiny-e2b"), file); });
    auto shared = make_model("tiny-e2b", torch::kFloat32, 99);
    expect_named([&] { load_checkpoint(shared, file); });
  }
  auto tied_source = make_model("tiny-e4b", torch::kFloat32, 5);
  auto tied = with_prefix(tied_source, "model.", torch::kFloat32);
  tied["model.embed_tokens.weight"].view(-1)[3] = NAN;
  tied["lm_head.weight"] = tied["model.embed_tokens.weight"];
  io::write_safetensors(path("nan-tied.safetensors"), tied);
  auto target = make_model("tiny-e4b", torch::kFloat32, 99);
  try {
    load_checkpoint(target, path("nan-tied.safetensors"));
    FAIL() << "not refused";
  } catch (const io::InputError& e) {
    EXPECT_NE(std::string(e.what()).find("NaN"), std::string::npos) << e.what();
    EXPECT_EQ(std::string(e.what()).find("differs"), std::string::npos) << e.what();
  }
}

TEST_F(ModelWeights, ShardedCheckpointThroughTheIndex) {
  auto source = make_model("tiny-31b", torch::kFloat32, 5);
  auto all = with_prefix(source, "model.", torch::kFloat32);
  io::TensorMap a, b;
  nlohmann::json weight_map;
  int i = 0;
  for (auto& [name, t] : all) {
    const bool first = i++ % 2 == 0;
    (first ? a : b)[name] = t;
    weight_map[name] = first ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
  }
  io::write_safetensors(path("model-00001-of-00002.safetensors"), a);
  io::write_safetensors(path("model-00002-of-00002.safetensors"), b);
  std::ofstream(path("model.safetensors.index.json")) << nlohmann::json{{"metadata", {}}, {"weight_map", weight_map}}.dump();
  auto target = make_model("tiny-31b", torch::kFloat32, 99);
  load_checkpoint(target, dir_.string());
  auto batch = structured_batch(source->config());
  EXPECT_TRUE(torch::equal(logits_of(source, batch), logits_of(target, batch)));
}

TEST_F(ModelWeights, MissingAndMisshapenTensorsAreNamed) {
  auto source = make_model("tiny-31b", torch::kFloat32, 5);
  auto tensors = with_prefix(source, "model.", torch::kFloat32);
  tensors.erase("model.layers.7.mlp.up_proj.weight");
  io::write_safetensors(path("missing.safetensors"), tensors);
  auto target = make_model("tiny-31b");
  try {
    load_checkpoint(target, path("missing.safetensors"));
    FAIL();
  } catch (const io::InputError& e) {
    EXPECT_NE(std::string(e.what()).find("layers.7.mlp.up_proj.weight"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("missing.safetensors"), std::string::npos) << e.what();
  }
  tensors = with_prefix(source, "model.", torch::kFloat32);
  tensors["model.layers.2.self_attn.q_proj.weight"] = torch::zeros({3, 3});
  io::write_safetensors(path("shape.safetensors"), tensors);
  try {
    load_checkpoint(target, path("shape.safetensors"));
    FAIL();
  } catch (const io::InputError& e) {
    EXPECT_NE(std::string(e.what()).find("layers.2.self_attn.q_proj.weight has shape [3, 3]"), std::string::npos) << e.what();
  }
  tensors = with_prefix(source, "model.", torch::kFloat32);
  tensors["model.layers.2.self_attn.q_projection.weight"] = torch::zeros({3});
  io::write_safetensors(path("unknown.safetensors"), tensors);
  EXPECT_THROW(load_checkpoint(target, path("unknown.safetensors")), io::InputError);
}

// Gemma4 ties the head: a checkpoint's lm_head.weight is accepted only as the embeddings' own values (as Google's
// converter writes it). Another head (transformers would run it untied) or another shape is an input error naming it.
TEST_F(ModelWeights, AnLmHeadOtherThanTheEmbeddingsIsRefusedNamingIt) {
  auto source = make_model("tiny-e4b", torch::kFloat32, 5);
  auto target = make_model("tiny-e4b");
  auto tensors = with_prefix(source, "model.language_model.", torch::kBFloat16);
  tensors["lm_head.weight"] = tensors.at("model.language_model.embed_tokens.weight").clone();
  io::write_safetensors(path("tied.safetensors"), tensors);
  EXPECT_NO_THROW(load_checkpoint(target, path("tied.safetensors")));
  auto expect_refused = [&](const torch::Tensor& head, const std::string& file, const std::string& why) {
    tensors["lm_head.weight"] = head;
    io::write_safetensors(path(file), tensors);
    try {
      load_checkpoint(target, path(file));
      FAIL() << file;
    } catch (const io::InputError& e) {
      EXPECT_EQ(e.subject().rfind("lm_head.weight", 0), 0u) << e.what();
      EXPECT_NE(std::string(e.what()).find(why), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(file), std::string::npos) << e.what();
    }
  };
  const auto embed = tensors.at("model.language_model.embed_tokens.weight");
  auto one_value = embed.clone();
  one_value.view(-1)[17] += 1;
  expect_refused(one_value, "other-head.safetensors", "differs from embed_tokens.weight");
  expect_refused(embed.narrow(0, 0, 7).clone(), "short-head.safetensors", "has shape");
}

// A NaN or Inf weight, and a weight that is not floating point (an integer, bool or fp8 tensor would be cast
// silently), are bad input naming the tensor, not something for the checks to blame on CP.
TEST_F(ModelWeights, NonFiniteAndNonFloatingWeightsAreInputErrorsNamingTheTensor) {
  auto source = make_model("tiny-31b", torch::kFloat32, 5);
  auto target = make_model("tiny-31b");
  for (const float bad : {NAN, INFINITY}) {
    auto tensors = with_prefix(source, "model.", torch::kFloat32);
    tensors["model.layers.0.self_attn.q_proj.weight"].view(-1)[7] = bad;
    io::write_safetensors(path("nonfinite.safetensors"), tensors);
    try {
      load_checkpoint(target, path("nonfinite.safetensors"));
      FAIL() << "accepted " << bad;
    } catch (const io::InputError& e) {
      EXPECT_NE(std::string(e.what()).find("layers.0.self_attn.q_proj.weight"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("NaN or Inf"), std::string::npos) << e.what();
    }
  }
  for (const auto dtype : {torch::kInt64, torch::kBool, torch::kUInt8, torch::kFloat8_e4m3fn}) {
    auto tensors = with_prefix(source, "model.", torch::kFloat32);
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].to(dtype);
    io::write_safetensors(path("int.safetensors"), tensors);
    try {
      load_checkpoint(target, path("int.safetensors"));
      FAIL() << "accepted " << c10::toString(dtype);
    } catch (const io::InputError& e) {
      EXPECT_NE(std::string(e.what()).find("embed_tokens.weight"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("floating point"), std::string::npos) << e.what();
    }
  }
}

// A config that lies about the geometry is found from the checkpoint's headers, before any model is built (a
// config claiming a huge model over a small checkpoint must not allocate the huge model first).
TEST_F(ModelWeights, CheckCheckpointComparesHeadersWithoutBuildingAModel) {
  auto source = make_model("tiny-31b", torch::kFloat32, 5);
  io::write_safetensors(path("ok.safetensors"), with_prefix(source, "model.", torch::kFloat32));
  EXPECT_NO_THROW(check_checkpoint(source->config(), path("ok.safetensors")));
  auto huge = source->config();
  huge.hidden_size = 16384;
  huge.vocab_size = int64_t(1) << 22;
  try {
    check_checkpoint(huge, path("ok.safetensors"));
    FAIL();
  } catch (const io::InputError& e) {
    EXPECT_NE(std::string(e.what()).find("shape mismatch"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("ok.safetensors"), std::string::npos) << e.what();
  }
}

TEST_F(ModelWeights, TruncatedSafetensorsIsAnInputError) {
  auto source = make_model("tiny-31b");
  io::write_safetensors(path("t.safetensors"), with_prefix(source, "model.", torch::kFloat32));
  fs::resize_file(path("t.safetensors"), fs::file_size(path("t.safetensors")) / 2);
  auto target = make_model("tiny-31b");
  try {
    load_checkpoint(target, path("t.safetensors"));
    FAIL();
  } catch (const io::InputError& e) {
    EXPECT_NE(std::string(e.what()).find("t.safetensors"), std::string::npos) << e.what();
  }
}

TEST_F(ModelWeights, Hdf5WeightsRoundTripBitExactly) {
  for (auto dtype : {torch::kFloat32, torch::kBFloat16}) {
    auto source = make_model("tiny-e2b", dtype, 5);
    save_weights_hdf5(source, path("w.h5"));
    auto target = make_model("tiny-e2b", dtype, 99);
    load_weights_hdf5(target, path("w.h5"));
    auto a = model_tensors(source), b = model_tensors(target);
    for (auto& [name, t] : a) EXPECT_TRUE(torch::equal(t, b[name])) << name;
  }
}

}  // namespace
}  // namespace cpharness::model
