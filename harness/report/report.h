// The data model of a run's results: what report.json (json_report.h) and report.xml (junit.h) are written from.
// No dependence on the model, the CP runtime or libtorch: checks produce CheckResults, the runner fills CaseReports.
//
// Statuses are derived, never stored: a case's status comes from its skip reason, its error and its checks; the
// report's status from its error and its cases. So a report cannot claim "pass" while holding a failed check.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

namespace cpharness::report {

inline constexpr const char* kSchemaVersion = "1.0";

enum class Status { Pass, Fail, Error, Skipped };
// "pass" | "fail" | "error" | "skipped".
std::string_view to_string(Status s);
// Inverse of to_string; std::nullopt for anything else.
std::optional<Status> parse_status(std::string_view s);

// How a check's threshold was chosen (design.md "Tolerance policy").
//   exact                 observed (a difference) must be <= threshold (normally 0)
//   fp32_relative         observed relative error must be <= threshold
//   bf16_oracle_relative  observed error vs the fp32 oracle must be <= threshold (k x cp1-bf16 error + floor)
//   fp32_oracle_relative  fp32 step-0 gradients where some tensor missed fp32_relative: error vs an fp64 oracle of
//                         the reference must be <= threshold (k x cp1-fp32 error vs that oracle + fp32_relative)
//   fp64_rerun            fp32 final parameters that missed fp32_relative: cp N vs cp 1, both rerun in fp64, must be
//                         <= threshold (fp32_relative)
//   count                 observed count must equal threshold (the expected count)
enum class Policy { Exact, Fp32Relative, Bf16OracleRelative, Fp32OracleRelative, Fp64Rerun, Count, BytesRelative };
std::string_view to_string(Policy p);
std::optional<Policy> parse_policy(std::string_view s);

// Process exit code for a status: 0 pass (and skipped), 1 fail, 2 error.
int exit_code(Status s);

// One check of the catalogue at one cp size (and, where the check is per rank or per step, one rank / step).
struct CheckResult {
  std::string name;            // catalogue name, e.g. "train.loss_parity"
  Status status = Status::Error;
  int cp = 1;
  std::optional<int> rank;     // set when the check is per rank
  std::optional<int> step;     // set when the check is per optimizer step
  std::string metric;          // "rel_l2", "abs_rel_loss", "max_abs", "count", ...
  double observed = 0.0;       // may be NaN/inf: written as null + "observed_nonfinite"
  double threshold = 0.0;      // may be inf: written as null + "threshold_nonfinite"
  Policy policy = Policy::Exact;
  std::string message;         // human: observed vs allowed (or why it errored / was skipped)
  nlohmann::json details = nlohmann::json::object();  // an object; free-form evidence (first divergence, ...)

  // Judges `observed` against `threshold` under `policy` and fills status and message:
  // count: pass iff observed == threshold; otherwise pass iff observed is finite and <= threshold
  // (NaN/inf observed always fails). Message: "observed 3.2e-05 > allowed 1e-05 (fp32_relative)".
  static CheckResult judge(std::string name, int cp, std::optional<int> rank, std::string metric, double observed,
                           double threshold, Policy policy, nlohmann::json details = nlohmann::json::object());
  // A check that could not be evaluated (observed NaN, threshold 0), with the reason as message.
  static CheckResult errored(std::string name, int cp, std::optional<int> rank, std::string reason);
  // A check that was not run (e.g. needs cuda), with the reason as message.
  static CheckResult skipped(std::string name, int cp, std::string reason);
};

// Per optimizer step, one entry each; all three vectors have one value per step recorded.
struct Trajectory {
  std::vector<double> loss;
  std::vector<double> grad_norm;
  std::vector<double> param_norm;
};

// Block-mask cache counters of one rank over one optimizer step.
struct CacheCounters {
  std::int64_t lookups = 0;
  std::int64_t builds = 0;
  std::int64_t hits = 0;
  std::int64_t evictions = 0;
  std::int64_t resets = 0;
};

// Communication of one ring pass ("forward", "backward", ...), summed over the ranks of one optimizer step.
struct RingPass {
  std::string pass;
  std::int64_t comm_ops = 0;
  std::int64_t bytes = 0;
  // Optional: the most K/V chunks one rank held at once in a pass of this kind (any layer, any rank); 0 = not recorded.
  std::int64_t peak_chunks = 0;
};

// The ring trace at one cp size.
struct RingTrace {
  // owners[rank][ring_step]: the rank whose K/V chunk `rank` held at that ring step.
  std::vector<std::vector<int>> owners;
  std::vector<RingPass> passes;
  // Optional: the owners table of each pass ("forward", "backward"), from its first layer's trace.
  std::map<std::string, std::vector<std::vector<int>>> owners_by_pass;
  std::string mode;  // optional: "collect" or "stream" (the ring's mode); empty = not recorded
};

// How fast and how big one run of a case was (the cp 1 reference, or a cp N candidate), one value per step.
struct Performance {
  std::string device;       // "cpu", "cuda:0"
  std::string device_name;  // "cpu", "NVIDIA H200"
  int devices = 1;          // devices the ranks ran on (ranks as threads on one GPU: 1)
  int64_t tokens_per_step = 0;
  std::vector<double> step_seconds;
  // Device peak bytes during each step (null on the CPU): whole device, every rank on it together.
  std::vector<std::optional<int64_t>> peak_allocated_bytes, peak_reserved_bytes;
};

struct CaseReport {
  std::string id;
  std::string description;
  std::vector<int> cp_sizes;
  std::string dtype;                       // dtype lane: "fp32", "bf16"
  std::optional<std::string> skip_reason;  // set: the case was skipped (e.g. it requires cuda)
  std::optional<std::string> error;        // set: the case could not be run (a rank died, bad input, ...)
  std::vector<CheckResult> checks;
  std::map<int, Trajectory> trajectories;  // by cp size
  // block_mask_cache[cp][rank][step]
  std::map<int, std::vector<std::vector<CacheCounters>>> block_mask_cache;
  std::map<int, RingTrace> ring;           // by cp size
  std::map<int, Performance> performance;  // by cp size (1: the reference); optional in report.json
  std::optional<int> reference_cp;         // set when candidates were judged against a cp > 1 run
  // Optional data for the HTML page, kept as report.json holds it (schema: oracle_trajectory, divergence_profile).
  nlohmann::json page = nlohmann::json::object();
  double duration_s = 0.0;

  // error if error or any check errored; else fail if any check failed; else skipped if skip_reason;
  // else error if there are no checks at all (a case that checked nothing must not pass);
  // else pass if any check passed; else (every check skipped) skipped.
  // A skipped case normally carries no checks; a failed or errored one among them still counts.
  Status status() const;
  // error, else a synthesized message when status() is error (e.g. "2 checks errored"), else nullopt.
  std::optional<std::string> error_reason() const;
  // skip_reason, else a synthesized one when status() is skipped ("all 3 checks were skipped"), else nullopt.
  std::optional<std::string> skip_reason_text() const;
};

struct Tool {
  std::string name;
  std::string version;
  std::string git_sha;
};
// This build's name, version and git sha (from the generated cpharness/version.h).
Tool this_tool();

struct Environment {
  std::string torch;                        // e.g. "2.11.0"
  std::optional<std::string> cuda;          // null on a CPU build
  std::optional<std::string> nccl;
  std::string device;                       // "cpu", "NVIDIA H100 80GB HBM3", ...
  std::optional<std::string> comm_backend;  // "local" | "mpi" | "nccl"; null where no ring ran (compare)
  nlohmann::json determinism = nlohmann::json::object();  // flag -> bool | number | string
  std::optional<std::string> transformers;  // version of the transformers that exported a golden used
  std::optional<std::string> planted_bug;   // a selftest mutant planted on purpose (CPHARNESS_PLANT_BUG); else absent
};

struct Summary {
  int cases = 0, passed = 0, failed = 0, errors = 0, skipped = 0;  // cases by status
  int checks_total = 0, checks_passed = 0, checks_failed = 0, checks_errors = 0, checks_skipped = 0;
  double duration_s = 0.0;
};

struct Report {
  std::string schema_version = kSchemaVersion;
  Tool tool = this_tool();
  Environment environment;
  std::optional<std::string> timestamp;  // start of the run, UTC ISO 8601 ("2025-01-31T12:00:00Z")
  std::optional<std::string> error;      // set: the run failed outside any case (usage, bad case file, ...)
  std::vector<CaseReport> cases;
  double duration_s = 0.0;               // wall time of the whole run

  // error if error or any case errored; else fail if any case failed; else skipped when not one check ran (every
  // case skipped: a CI job whose GPUs vanished must not stay green); else pass.
  Status status() const;
  Summary summary() const;
};

// Exit code of a run in which no check ran (status skipped), unless the user allowed it.
inline constexpr int kExitNothingRan = 3;

// 0 pass, 1 fail, 2 error, 3 nothing ran (0 with `allow_nothing_ran`).
int exit_code(const Report& r, bool allow_nothing_ran = false);

// `s` with every invalid UTF-8 sequence replaced by U+FFFD (so JSON and XML writers never fail on it).
std::string sanitize_utf8(std::string_view s);

// UTC now as ISO 8601 with seconds, e.g. "2025-01-31T12:00:00Z".
std::string utc_timestamp_now();

// Writes `contents` to `path` atomically: a temp file in the same directory, fsync, rename over `path`.
// Never leaves a partial `path` or a temp file behind; throws io::InputError naming `path` on failure
// (e.g. the directory does not exist), having created nothing.
void write_file_atomically(const std::string& path, std::string_view contents);

}  // namespace cpharness::report
