// Two directories of dumps or goldens compared pair by pair (two transformers versions' goldens:
// golden/hf-5.5.2 against golden/hf-5.8.1): *.h5 files paired by name, each pair through compare_dumps, files
// found on one side only listed, and failing the comparison as a missing entry does (unless "missing:ok").
#pragma once
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "harness/report/compare.h"

namespace cpharness::report {

struct DirectoryComparison {
  bool passed = true;                 // every pair passed and nothing is unpaired (or missing:ok)
  std::string text;                   // each pair's table (render_text), then the directory summary
  nlohmann::json doc;                 // a, b, pairs[], only_in_a[], only_in_b[], status
};

// `b_dir` is the reference. `rows`: failing entries shown per pair. An io::InputError when neither directory
// holds a *.h5 file.
DirectoryComparison compare_directories(const std::string& a_dir, const std::string& b_dir, const ComparePolicy& policy,
                                        size_t rows);

}  // namespace cpharness::report
