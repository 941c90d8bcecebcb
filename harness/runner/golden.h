// Goldens: the cp 1 reference of a case as a RunDump (golden/README.md), and checking a run against one.
#pragma once
#include <map>
#include <optional>
#include <string>

#include "harness/report/compare.h"
#include "harness/report/report.h"
#include "harness/report/run_dump.h"
#include "harness/runner/case_runner.h"

namespace cpharness::runner {

// A stable hash (hex) of what in the case file decides the cp 1 reference (not its description, tolerances, checks
// or cp sizes), so a golden names exactly the case it was recorded from.
std::string case_hash(const train::Case& c);

// The reference run of `c` as a dump: provenance, step-0 inputs, per-step loss / grad norm / param norm, step-0
// logits and hidden states, and the step-0 gradients of the global tensors and of the first and last layers.
report::RunDump reference_dump(const train::Case& c, const std::string& kind);
// The same from a reference run already made (with its tensors recorded).
report::RunDump reference_dump(const train::Case& c, const LaneRun& run, const std::string& kind);

// The policy a golden of the case is verified with: fp32 relative 1e-5; fp64 the case's own fp32_relative (its lane's
// tolerance, 1e-10 in tiny-e4b-fp64); bf16 compares structure
// and inputs only, and verify_golden then judges every value against the fp32 oracle of the case (bf16 rounding
// moves with the CPU's kernels: a fixed bound would fail on another machine or hide a real regression).
report::ComparePolicy golden_policy(const train::Case& c);

// The bf16 golden judgement's scale of each entry's error against the fp32 oracle (path -> error): a step's loss,
// grad norm and parameter norm ("steps/S/grad_norm") take the largest error that figure showed at steps <= S; every
// other entry keeps its own.
std::map<std::string, double> per_step_figures_at_their_largest(std::map<std::string, double> errors);

// golden verify: one report case holding golden.match (or the input error that stopped it).
report::Report run_golden_verify(const std::string& case_path, const std::string& golden_path);

// golden.match: the reference run of `c` against `golden_path`. Errors in the golden (missing, corrupt, wrong
// layout, another case or another version of the case) are io::InputError. `reference` (and, for a bf16 case, its
// fp32 `oracle`), when given, are cp 1 runs of the case already made with their tensors recorded; else they are run.
// Why the golden at `golden_path` cannot be the golden of `c` (not a run dump, a damaged header, another case,
// another version of the case, another lane, a tensor damaged further in), or nothing: asked before any work, so
// that a run does not train to find out. The whole file is read once per version of it (path, size, mtime).
std::optional<std::string> case_golden_problem(const train::Case& c, const std::string& golden_path);

report::CheckResult verify_golden(const train::Case& c, const std::string& golden_path, report::CompareResult* result = nullptr,
                                  const LaneRun* reference = nullptr, const LaneRun* oracle = nullptr);

// memory.activations: the activation memory of `reference` (a cp 1 CPU run of `c`) against the golden's
// (check/activation_memory.h). Golden errors as for verify_golden.
report::CheckResult verify_golden_memory(const train::Case& c, const std::string& golden_path, const LaneRun& reference);

}  // namespace cpharness::runner
