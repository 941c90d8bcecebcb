// Runs cases end to end: reference and candidates (case_runner), every requested check, and the report data
// (report::CaseReport). Progress goes to stderr: one line per case and step, a summary table at the end.
#pragma once
#include <optional>
#include <string>
#include <vector>

#include "harness/check/checks.h"
#include "harness/cp/comm.h"
#include "harness/report/report.h"
#include "harness/runner/case_runner.h"
#include "harness/train/case.h"
#include "harness/train/device.h"

namespace cpharness::runner {

struct SuiteOptions {
  std::optional<std::vector<int>> cp_sizes;  // overrides each case's cp list
  std::string comm = "local";
  std::string dump_dir;                      // first-divergence tensors land here
  std::chrono::milliseconds timeout{120000};
  bool has_cuda = train::cuda_available();
  std::optional<std::string> device;         // overrides each case's "device" (--device)
  // Selftest mutations, applied to every candidate.
  RunOptions run;
  check::BlockMaskMutation block_mask_mutation = check::BlockMaskMutation::kNone;
  bool perturb_repeat_seed = false;          // determinism mutant: the repeat run uses another init seed
  bool power_not_perturbed = false;          // power mutant: the "perturbed" run carries no perturbation
  std::string planted_bug;                   // the mutant applied through CPHARNESS_PLANT_BUG (report environment)
  // A process backend's world (mpi): the cp size is its size; rank 0 runs references and checks, every rank
  // its part of the candidates. Null: the local backend, ranks as threads of this process.
  cp::Comm* world = nullptr;
  // How long ranks wait for a sign of life from rank 0 while it works alone (root_wait.h; run sets it to --timeout).
  std::chrono::milliseconds root_wait{std::chrono::minutes(30)};
  mutable bool world_failed = false;         // set when a candidate failed under `world`: no further case can run
  mutable int failed_peer = -1;              // the rank a failed communication was waiting for (-1 unknown)
};

// True when `check` is requested by the case (exact name or a prefix ending in '.').
bool wants_check(const train::Case& c, const std::string& check);

// Why the case cannot run as configured (checked before any work), or nullopt: a cp size the sequence cannot be
// sharded into, or reference_cp > 1 under a process backend.
std::optional<std::string> unsupported_configuration(const train::Case& c, const SuiteOptions& options);

report::CaseReport run_case(const train::Case& c, const SuiteOptions& options);
report::Report run_suite(const std::vector<train::Case>& cases, const SuiteOptions& options);

// The table printed at the end of a run.
std::string summary_table(const report::Report& r);

}  // namespace cpharness::runner
