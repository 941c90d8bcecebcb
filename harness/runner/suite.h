// Runs cases end to end: reference and candidates (case_runner), every requested check, and the report data
// (report::CaseReport). Progress goes to stderr: one line per case and step, a summary table at the end.
#pragma once
#include <optional>
#include <string>
#include <vector>

#include "harness/check/checks.h"
#include "harness/report/report.h"
#include "harness/runner/case_runner.h"
#include "harness/train/case.h"

namespace cpharness::runner {

struct SuiteOptions {
  std::optional<std::vector<int>> cp_sizes;  // overrides each case's cp list
  std::string comm = "local";
  std::string dump_dir;                      // first-divergence tensors land here
  std::chrono::milliseconds timeout{120000};
  bool has_cuda = false;
  // Selftest mutations, applied to every candidate.
  RunOptions run;
  check::BlockMaskMutation block_mask_mutation = check::BlockMaskMutation::kNone;
  bool perturb_repeat_seed = false;          // determinism mutant: the repeat run uses another init seed
};

// True when `check` is requested by the case (exact name or a prefix ending in '.').
bool wants_check(const train::Case& c, const std::string& check);

report::CaseReport run_case(const train::Case& c, const SuiteOptions& options);
report::Report run_suite(const std::vector<train::Case>& cases, const SuiteOptions& options);

// The table printed at the end of a run.
std::string summary_table(const report::Report& r);

}  // namespace cpharness::runner
