// Small helpers shared by the model tests: a seeded tiny model and a structured batch.
#pragma once
#include <string>

#include "harness/model/config.h"
#include "harness/model/gemma4.h"
#include "harness/model/init.h"
#include "harness/train/batch.h"

namespace cpharness::testing {

inline model::Gemma4Model make_model(const model::ModelConfig& config, torch::ScalarType dtype = torch::kFloat32,
                                     uint64_t seed = 7) {
  model::Gemma4Model m(config);
  model::init_weights(m, seed);
  m->to(dtype);
  return m;
}

inline model::Gemma4Model make_model(const std::string& preset, torch::ScalarType dtype = torch::kFloat32, uint64_t seed = 7) {
  return make_model(model::preset_config(preset), dtype, seed);
}

// Two packed documents, tail padding, one vision run: every mask term is active.
inline train::Batch structured_batch(const model::ModelConfig& c, int64_t seq_len = 48, uint64_t seed = 3) {
  train::BatchSpec spec;
  spec.batch = 2;
  spec.seq_len = seq_len;
  spec.layout.padding = 5;
  spec.layout.document_lengths = {seq_len / 2, seq_len - 5 - seq_len / 2};
  spec.layout.vision_runs = {{3, 6}};
  spec.vocab_size = c.vocab_size;
  spec.seed = seed;
  return train::make_batch(spec);
}

inline model::ModelInputs inputs_of(const train::Batch& b) { return {b.input_ids, b.position_ids, b.meta, {}}; }

}  // namespace cpharness::testing
