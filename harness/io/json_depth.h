// How deep a JSON value from an input file nests, measured without recursion. nlohmann parses and destroys any
// depth without recursing, but copying, comparing or dumping a value recurses once per level: a hostile file nested
// 100000 deep would overflow the stack (SIGSEGV) in whatever reads it next. Input files are refused past a depth
// no real one comes near, before anything else touches them.
#pragma once

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "harness/io/input_error.h"

namespace cpharness::io {

inline constexpr int kMaxJsonDepth = 64;

// The nesting depth of `v` (a scalar 0, [1] 1, {"a": [1]} 2), counted no further than `limit` + 1.
template <class Json>
int json_depth(const Json& v, int limit = kMaxJsonDepth) {
  int deepest = 0;
  std::vector<std::pair<const Json*, int>> todo{{&v, 0}};
  while (!todo.empty()) {
    const auto [node, depth] = todo.back();
    todo.pop_back();
    if (!node->is_structured()) continue;
    deepest = std::max(deepest, depth + 1);
    if (deepest > limit) return deepest;
    for (const auto& child : *node) todo.push_back({&child, depth + 1});
  }
  return deepest;
}

// InputError naming `file` and `what` when `v` nests deeper than kMaxJsonDepth.
template <class Json>
void require_json_depth(const Json& v, const std::string& file, const std::string& what) {
  if (json_depth(v) > kMaxJsonDepth)
    throw InputError(file, what, "JSON nested more than " + std::to_string(kMaxJsonDepth) +
                                     " levels deep (refused: no real input nests that far)");
}

}  // namespace cpharness::io
