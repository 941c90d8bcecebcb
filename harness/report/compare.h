// compare_dumps: step-by-step, tensor-by-tensor diff of two RunDumps (two runs, two goldens, a golden and a
// foreign export), with a tolerance policy, the first divergence, a JSON form and a short text table.
//
// A is the candidate, B the reference: relative differences are taken against B (‖A − B‖ / ‖B‖, |a − b| / |b|).
// All arithmetic is fp64, whatever the stored dtypes (an fp32 tensor may be compared with a bf16 one; differing
// dtypes are reported, not failed).
//
// Entry order (the order of CompareResult::entries, and the order that defines the first divergence) follows the
// data flow, so that the first divergence localises the bug:
//   1. inputs (by name), 2. initial weights (by name),
//   3. then per step, ascending:
//      hidden states by index ascending (0 = embedding output, i + 1 = after layer i: forward order),
//      logits, loss,
//      gradients in backward order (see model::grad_backward_order), grad_norm, param_norm.
// The first divergence is the first entry whose status is out_of_tolerance, nonfinite or shape_mismatch.
// Entries present in only one dump (missing_in_a / missing_in_b) are reported and fail the comparison when
// policy.missing_is_failure (the default) but are not candidates for the first divergence.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "harness/report/run_dump.h"

namespace cpharness::report {

// One tolerance: exact (values equal in fp64; NaN never equal), or relative: diff ≤ rel · ref + abs, where for a
// tensor diff = ‖a − b‖₂ and ref = ‖b‖₂, for a scalar diff = |a − b| and ref = |b|.
struct Tolerance {
  enum class Kind { kExact, kRelative };
  Kind kind = Kind::kRelative;
  double rel = 1e-5;
  double abs = 0.0;

  static Tolerance exact() { return {Kind::kExact, 0.0, 0.0}; }
  static Tolerance relative(double rel, double abs = 0.0) { return {Kind::kRelative, rel, abs}; }
  std::string to_string() const;  // "exact" | "rel 1e-05" | "rel 1e-05 + abs 1e-08"
};

// Per-category tolerances. Default: the fp32 lane of design.md (relative 1e-5 everywhere), inputs exact.
struct ComparePolicy {
  Tolerance inputs = Tolerance::exact();
  Tolerance weights = Tolerance::relative(1e-5);
  Tolerance hidden = Tolerance::relative(1e-5);
  Tolerance logits = Tolerance::relative(1e-5);
  Tolerance loss = Tolerance::relative(1e-5);
  Tolerance grads = Tolerance::relative(1e-5);
  Tolerance grad_norm = Tolerance::relative(1e-5);
  Tolerance param_norm = Tolerance::relative(1e-5);
  bool missing_is_failure = true;  // an entry present in only one dump fails the comparison

  static ComparePolicy fp32() { return {}; }
  static ComparePolicy exact();  // every category exact
  static ComparePolicy relative(double rel);  // every category but inputs relative REL
  // Parses the CLI form: a base ("fp32", "exact", "rel:X") followed by comma-separated overrides
  // "CATEGORY:exact" | "CATEGORY:X" | "CATEGORY:X+ABS" (categories: inputs weights hidden logits loss grads
  // grad_norm param_norm) and "missing:ok" | "missing:fail". Example: "fp32,grads:1e-4". Throws std::invalid_argument.
  static ComparePolicy parse(const std::string& spec);
};

enum class EntryKind { kInput, kWeight, kHidden, kLogits, kLoss, kGrad, kGradNorm, kParamNorm };
enum class EntryStatus { kPass, kOutOfTolerance, kNonFinite, kShapeMismatch, kMissingInA, kMissingInB };

const char* to_string(EntryKind k);    // "input" "weight" "hidden" "logits" "loss" "grad" "grad_norm" "param_norm"
const char* to_string(EntryStatus s);  // "pass" "out_of_tolerance" "nonfinite" "shape_mismatch" "missing_in_a" ...

struct CompareEntry {
  std::optional<std::int64_t> step;  // none for inputs and weights
  EntryKind kind = EntryKind::kLoss;
  std::string name;        // input/weight/param name; the layer index for hidden; "logits", "loss", ...
  std::string path;        // the HDF5 path of the entry ("steps/0/hidden/3")
  std::optional<std::int64_t> layer;  // hidden index, or the decoder layer index parsed from a grad/weight name
  EntryStatus status = EntryStatus::kPass;
  bool is_scalar = false;
  // Numbers (fp64). For scalars: a, b, abs_diff = |a − b|, rel_diff = |a − b| / |b|.
  // For tensors: abs_diff = ‖a − b‖₂, rel_diff = ‖a − b‖₂ / ‖b‖₂, max_abs_diff = max |a − b|, ref_norm = ‖b‖₂.
  // rel_diff is +inf when the reference is zero and the difference is not; NaN when not computable.
  double a = 0.0, b = 0.0;
  double abs_diff = 0.0, rel_diff = 0.0, max_abs_diff = 0.0, ref_norm = 0.0;
  std::int64_t nonfinite_a = 0, nonfinite_b = 0;  // count of NaN/Inf elements
  std::vector<std::int64_t> shape_a, shape_b;
  std::string dtype_a, dtype_b;
  Tolerance tolerance;
  std::string message;  // one line, human readable

  bool failed() const { return status != EntryStatus::kPass; }
  // Failed, or passed with a nonzero difference.
  bool differs() const { return failed() || abs_diff != 0.0 || max_abs_diff != 0.0; }
};

struct CompareCounts {
  std::size_t entries = 0, passed = 0, differing_within_tolerance = 0, out_of_tolerance = 0, nonfinite = 0,
              shape_mismatch = 0, missing = 0;
};

struct ProvenanceDiff {
  std::string key;
  std::optional<std::string> a, b;  // none when absent on that side
};

struct CompareResult {
  bool passed = false;
  std::vector<CompareEntry> entries;             // every compared entry, in the documented order
  std::optional<std::size_t> first_divergence;   // index into entries
  CompareCounts counts;
  std::vector<ProvenanceDiff> provenance_diffs;  // informational, never a failure
  ComparePolicy policy;
  // (batch row, position) pairs marked padding in /inputs/padding, left out of every hidden-state and logits entry.
  std::int64_t padded_positions_excluded = 0;

  const char* status() const { return passed ? "pass" : "fail"; }
};

CompareResult compare_dumps(const RunDump& a, const RunDump& b, const ComparePolicy& policy = ComparePolicy{});

// Recomputes counts, first divergence and the verdict from the entries' statuses (after a caller re-judged
// entries by a rule of its own).
void recount(CompareResult& result);

nlohmann::json to_json(const Tolerance& t);
nlohmann::json to_json(const ComparePolicy& p);
nlohmann::json to_json(const CompareEntry& e);
// status, counts, policy, first_divergence (the entry, or null), entries (the differing ones: failed or nonzero
// difference; all entries with include_all), provenance_diffs. Non-finite numbers are written as strings
// ("nan", "inf", "-inf") so the document stays valid JSON.
nlohmann::json to_json(const CompareResult& r, bool include_all = false);

// A short human rendering for the CLI: a headline (status, counts), the first divergence, and a table of the
// failing entries (at most max_rows; the first divergence is marked with '>'), plus the largest within-tolerance
// difference. A_LABEL / B_LABEL name the two sides (e.g. the file names).
std::string render_text(const CompareResult& r, const std::string& a_label = "A", const std::string& b_label = "B",
                        std::size_t max_rows = 40);

}  // namespace cpharness::report
