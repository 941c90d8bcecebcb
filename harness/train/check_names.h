#pragma once
// The names of the check catalogue (design.md), which a case's "checks" may select: a whole name, or a prefix
// ending in '.' that some name starts with. Kept here, below the checks themselves, so that a case file is
// validated when it is read: a misspelt name is an input error, never a selection that silently runs nothing.
// The runner refuses to report a check missing from this list (wants_check), so the two cannot drift apart.
#include <array>
#include <string_view>

namespace cpharness::train {

inline constexpr std::array<std::string_view, 24> kCheckNames = {
    "mask.dense_slice",       "mask.block_classification", "attention.parity",       "ring.rotation_order",
    "ring.grad_return",       "ring.hop_limit",            "ring.chunks_held",       "shard.layout",
    "kvshare.loss_parity",    "kvshare.bug_detected",      "cache.build_count",      "cache.hit_count",
    "cache.generation_reset", "train.loss_parity",         "train.grad_norm_parity", "train.param_parity",
    "train.trained",          "determinism.repeat_bitwise", "golden.match",          "hf.parity",
    "power.boundary_label",   "memory.activations",        "train.rank_agreement",   "train.grad_reduction"};

inline bool is_check_name(std::string_view name) {
  for (auto n : kCheckNames)
    if (n == name) return true;
  return false;
}

// Whether a case's `checks` entry picks `check`: its full name, or a prefix of it ending in '.' ("cache.").
inline bool selector_matches(std::string_view selector, std::string_view check) {
  return selector == check || (!selector.empty() && selector.back() == '.' && check.substr(0, selector.size()) == selector);
}

// A name of the catalogue, or a prefix ending in '.' of at least one.
inline bool is_check_selector(std::string_view s) {
  for (auto n : kCheckNames)
    if (selector_matches(s, n)) return true;
  return false;
}

}  // namespace cpharness::train
