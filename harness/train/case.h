// A case file (cases/*.json, schema in cases/README.md): which model, which weights, which data, which lane,
// how many steps, which CP sizes. Validated on load: unknown keys and wrong types are errors naming the key.
#pragma once
#include <nlohmann/json.hpp>

#include <optional>
#include <string>
#include <vector>

#include "harness/model/config.h"
#include "harness/train/batch.h"
#include "harness/train/trainer.h"

namespace cpharness::train {

enum class DtypeLane { kFp32, kBf16 };

struct Case {
  std::string id;
  std::string path;
  std::string description;
  model::ModelConfig model;
  uint64_t init_seed = 0;
  std::string checkpoint;  // HF safetensors file/dir; empty: seeded init
  BatchSpec data;
  DtypeLane dtype = DtypeLane::kFp32;
  int64_t steps = 3;
  OptimizerOptions optimizer;
  std::vector<int64_t> cp_sizes = {2};
  std::vector<std::string> requires_features;  // e.g. "cuda"
  nlohmann::json raw;                          // the file as read, for provenance
};

Case case_from_json(const nlohmann::json& j, const std::string& path);
Case load_case(const std::string& path);
// A file, or every *.json in a directory (sorted by name).
std::vector<Case> load_cases(const std::vector<std::string>& paths);

std::string to_string(DtypeLane lane);

}  // namespace cpharness::train
