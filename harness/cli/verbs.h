// One function per cpharness verb, called by the argument parser (app.cpp) with the parsed options. Each returns
// the process exit code: 0 pass, 1 a check failed, 2 usage, input or infrastructure error (bisect: 0 good,
// 1 bad, 125 skip). The work itself lives in the runner and report layers.
#pragma once
#include <optional>
#include <exception>
#include <string>
#include <vector>

#include "harness/runner/hf_suite.h"

namespace cpharness::cli {

// Where a verb writes its report: --out DIR means DIR/report.json and DIR/report.xml unless named one by one.
struct ReportOutputs {
  std::string out_dir, report_path, junit_path, html_path;  // --out DIR also writes DIR/report.html
  ReportOutputs resolved() const;
};

// Usage error (naming the flag) when an output cannot be written: checked before any work.
// Also refuses an output that names one of `inputs` (the command's case, golden or export files).
void check_outputs_writable(const ReportOutputs& outputs, const std::string& dump_dir = "",
                            const std::vector<std::string>& inputs = {});

struct RunArgs {
  std::vector<std::string> cases;
  std::vector<int> cp;               // empty: each case's own sizes
  std::string comm = "local";
  int nproc = 0;                     // --nproc N: launch N ranks on this host (mpi)
  std::string dump_dir;
  double timeout_s = 120;
  bool allow_nothing_ran = false;    // a run in which every case was skipped exits 0 instead of 3
  double job_timeout_s = 6 * 3600;   // --job-timeout: with --nproc, the whole job's deadline
  std::string device;                // --device: overrides each case's "device" (cpu, cuda, cuda:N)
  std::string cuda_attention = "kernel";  // --cuda-attention: the CUDA kernel or the libtorch-ops path
  ReportOutputs outputs;
  std::vector<std::string> argv;     // the verb's own arguments as given (for the mpirun relaunch)
};

struct SelftestArgs {
  std::vector<std::string> only;     // mutant names
  double timeout_s = 120;
  ReportOutputs outputs;
};

struct CompareArgs {
  std::string a, b;                  // files or directories; b is the reference
  std::string policy = "fp32";
  std::string json_path;
  size_t rows = 40;                  // failing entries shown per pair
};

int run_verb(const RunArgs& a);
int selftest_verb(const SelftestArgs& a);
int golden_record_verb(const std::string& case_path, const std::string& out_path, bool force);
int golden_verify_verb(const std::string& case_path, const std::string& golden_path, const ReportOutputs& outputs);
int compare_verb(const CompareArgs& a);
int hf_parity_verb(const runner::HfParityOptions& options, const ReportOutputs& outputs);
int bisect_verb(const std::string& case_path, const std::string& golden_path);
int list_verb(const std::vector<std::string>& cases);
// render REPORT.json -o REPORT.html: the HTML page of a report made earlier or elsewhere.
int render_verb(const std::string& report_path, const std::string& html_path);

// The error report in place of the stand-in a verb wrote before its work (if it is still standing): run_cli's last
// word on an error that ends the verb, whatever it is. False when no stand-in was standing.
bool replace_stand_in(const std::string& why);

// A usage error found before a verb wrote anything (an unknown flag, --cp 0): an older run's report at the paths
// the command line names (--report, --junit, --html, --out) must not stay to be read as this one's. Each that is a
// cpharness report is replaced by the usage error's report (the page removed); any other file is left alone.
void withdraw_older_reports(const std::vector<std::string>& args, const std::string& why);
// The report files the launcher withdrew before this process loaded (older_reports.h), taken from the environment
// (and removed from it) once, first thing in main.
void take_withdrawn_reports_from_environment();

// One line for an error that ended a verb: "PATH: reason" for a path the OS refused (a symlink loop), else
// "internal error: ...".
std::string exception_text(const std::exception& e);

}  // namespace cpharness::cli
