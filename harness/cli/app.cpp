#include "harness/cli/app.h"

#include "harness/train/device.h"

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <iostream>
#include <regex>

#include "harness/cli/older_reports.h"
#include "harness/cli/usage_error.h"
#include "harness/cli/verbs.h"
#include "harness/io/error_text.h"
#include "harness/io/input_error.h"

namespace cpharness::cli {
namespace {

// Seconds: a number > 0 and at most a year (nan, inf, 0, negatives and 1e10, which overflowed the milliseconds
// every wait counts in and timed out at once blaming a rank, are usage errors).
const CLI::Validator kSeconds(
    [](std::string& value) -> std::string {
      try {
        // Decimal only: stod also takes " 5", "0x1e" (30 s, not 1e0) and "infinity".
        static const std::regex decimal(R"(([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?)");
        size_t used = 0;
        const double v = std::regex_match(value, decimal) ? std::stod(value, &used) : -1;
        // From a millisecond (waits are counted in them: less would be 0 and time out at once, blaming a rank).
        if (used == value.size() && std::isfinite(v) && v >= 0.001 && v <= 366.0 * 86400) return "";
      } catch (const std::exception&) {
      }
      return "expects a number of seconds of at least 0.001 and at most a year (31622400), got '" + value + "'";
    },
    "SECONDS");

// A whole number >= `least` (CLI::PositiveNumber accepts 2.5 and words its refusal of 0 as a range to 1e308).
CLI::Validator whole_number_at_least(long long least) {
  return CLI::Validator(
      [least](std::string& value) -> std::string {
        try {
          size_t used = 0;
          const long long v = std::stoll(value, &used);
          if (used == value.size() && v >= least) return "";
        } catch (const std::exception&) {
        }
        return "expects a whole number >= " + std::to_string(least) + ", got '" + value + "'";
      },
      "N");
}
const CLI::Validator kPositiveInteger = whole_number_at_least(1);  // counts: cp sizes, ranks
const CLI::Validator kCount = whole_number_at_least(0);            // rows to show (a negative one used to be accepted)

// An output path: an empty one (an unset variable in a CI script) would silently write nothing.
const CLI::Validator kPath(
    [](std::string& value) -> std::string { return value.empty() ? "expects a path, got an empty string" : ""; }, "PATH");

void add_report_outputs(CLI::App* verb, ReportOutputs& o) {
  verb->add_option("--out", o.out_dir, "write DIR/report.json and DIR/report.xml")->check(kPath)->type_name("DIR");
  verb->add_option("--report", o.report_path, "report.json path (JSON Schema: reports/schema)")->check(kPath)->type_name("F");
  verb->add_option("--junit", o.junit_path, "JUnit XML path")->check(kPath)->type_name("F");
  verb->add_option("--html", o.html_path, "self-contained HTML page of the report")->check(kPath)->type_name("F");
}

// The parser of every verb; `run` is set to the chosen verb's call.
struct Verbs {
  RunArgs run;
  SelftestArgs selftest;
  std::string golden_case, golden_file, golden_out;
  bool force = false;
  ReportOutputs verify_outputs, hf_outputs;
  CompareArgs compare;
  bool compare_all = false;
  runner::HfParityOptions hf;
  bool holder = false, no_holder = false;
  std::string bisect_case, bisect_golden;
  std::vector<std::string> list_cases;
  std::string render_in, render_out;
};

void add_run(CLI::App& app, Verbs& v) {
  auto* run = app.add_subcommand("run", "cp 1 reference + cp N candidates of each case, every selected check "
                                        "(exit 0 pass, 1 a check failed, 2 usage/input/infrastructure error)");
  run->add_option("cases", v.run.cases, "case files or directories of *.json")->required()->type_name("CASE");
  run->add_option("--cp", v.run.cp, "cp sizes, overriding each case's (e.g. 2,4)")
      ->delimiter(',')->check(kPositiveInteger)->type_name("N,...");
  run->add_option("--comm", v.run.comm, "local (ranks as threads) or mpi (one process per rank)")
      ->check(CLI::IsMember({"local", "mpi", "nccl"}));
  run->add_option("--nproc", v.run.nproc, "with --comm mpi: launch N ranks on this host through mpirun")
      ->check(kPositiveInteger)->type_name("N");
  run->add_option("--dump-dir", v.run.dump_dir, "first-divergence tensors land here")->type_name("DIR");
  run->add_flag("--allow-nothing-ran", v.run.allow_nothing_ran,
                "exit 0 when every case is skipped (default: exit 3, status skipped: no check ran is not a pass)");
  run->add_option("--timeout", v.run.timeout_s, "seconds any rank may wait for another: for its message, or for a sign of life while rank 0 works alone (default 120)")->check(kSeconds);
  run->add_option("--job-timeout", v.run.job_timeout_s,
                  "with --nproc: seconds the whole rank job may run before it is killed (exit 2; default 21600)")
      ->check(kSeconds);
  run->add_option("--device", v.run.device, "where every run trains, overriding each case's \"device\" (cpu, cuda, cuda:N)")
      ->check(CLI::Validator(
          [](std::string& s) {
            try {
              train::parse_device(s);
              return std::string();
            } catch (const std::invalid_argument& e) {
              return std::string(e.what());
            }
          },
          "DEVICE"))
      ->type_name("DEVICE");
  run->add_option("--cuda-attention", v.run.cuda_attention,
                  "on CUDA: the block-sparse kernels (default; bf16/fp16 on tensor cores), kernel-fp32 (bf16/fp16 on "
                  "the fp32 CUDA-core kernels) or the libtorch-ops chunk attention (reference, fallback)")
      ->check(CLI::IsMember({"kernel", "kernel-fp32", "ops"}));
  add_report_outputs(run, v.run.outputs);
}

void add_selftest(CLI::App& app, Verbs& v) {
  auto* selftest = app.add_subcommand("selftest", "every check against its known-bad mutant (exit 0 when all are caught)");
  selftest->add_option("--only", v.selftest.only, "run only this mutant (repeatable)")->type_name("MUTANT");
  selftest->add_option("--timeout", v.selftest.timeout_s, "seconds any rank may wait for another")->check(kSeconds);
  add_report_outputs(selftest, v.selftest.outputs);
}

void add_golden(CLI::App& app, Verbs& v) {
  auto* golden = app.add_subcommand("golden", "record or verify a golden (the cp 1 reference of a case)");
  golden->require_subcommand(1);
  auto* record = golden->add_subcommand("record", "write the cp 1 reference of CASE as a golden");
  record->add_option("case", v.golden_case, "case file")->required()->type_name("CASE");
  record->add_option("-o,--output", v.golden_out, "golden file to write")->required()->type_name("F.h5");
  record->add_flag("--force", v.force, "replace an existing golden");
  auto* verify = golden->add_subcommand("verify", "golden.match: a fresh cp 1 run of CASE against the golden");
  verify->add_option("case", v.golden_case, "case file")->required()->type_name("CASE");
  verify->add_option("golden", v.golden_file, "golden file")->required()->type_name("F.h5");
  add_report_outputs(verify, v.verify_outputs);
}

void add_compare(CLI::App& app, Verbs& v) {
  auto* compare = app.add_subcommand("compare", "tensor-by-tensor diff of two dumps or goldens, or of two directories "
                                                "of them paired by name (B is the reference; exit 1 on a difference)");
  compare->add_option("a", v.compare.a, "dump, golden or directory")->required()->type_name("A");
  compare->add_option("b", v.compare.b, "the reference: dump, golden or directory")->required()->type_name("B");
  compare->add_option("--policy", v.compare.policy, "fp32 | exact | rel:X[,CATEGORY:X...]")->type_name("SPEC");
  compare->add_option("--json", v.compare.json_path, "write the comparison as JSON")->check(kPath)->type_name("F");
  compare->add_option("--rows", v.compare.rows, "failing entries shown per pair (default 40)")
      ->check(kCount)->type_name("N");
  compare->add_flag("--all", v.compare_all, "show every failing entry");
}

void add_hf_parity(CLI::App& app, Verbs& v) {
  auto* hf = app.add_subcommand("hf-parity", "hf.parity: the C++ model against goldens exported from transformers");
  hf->add_option("goldens", v.hf.paths, "GOLDEN.h5 files or directories of them")->required()->type_name("GOLDEN");
  hf->add_option("--cp", v.hf.cp_sizes, "cp sizes (default 1,2,4)")->delimiter(',')->check(kPositiveInteger)->type_name("N,...");
  auto* with = hf->add_flag("--holder", v.holder, "force the KV-share holder on");
  hf->add_flag("--no-holder", v.no_holder, "force the KV-share holder off")->excludes(with);
  add_report_outputs(hf, v.hf_outputs);
}

void add_bisect(CLI::App& app, Verbs& v) {
  auto* bisect = app.add_subcommand("bisect", "for git bisect run: the case's checks at its cp sizes (+ golden.match): 0 good, 1 bad, 125 skip");
  bisect->add_option("case", v.bisect_case, "case file")->required()->type_name("CASE");
  bisect->add_option("--golden", v.bisect_golden, "also judge golden.match against this golden (keep it outside the work tree)")
      ->type_name("F.h5");
}

void add_render(CLI::App& app, Verbs& v) {
  auto* render = app.add_subcommand("render", "the HTML page of a report.json made earlier or elsewhere");
  render->add_option("report", v.render_in, "report.json")->required()->type_name("REPORT.json");
  render->add_option("-o,--output", v.render_out, "HTML file to write")->required()->type_name("F.html");
}

void add_list(CLI::App& app, Verbs& v) {
  auto* list = app.add_subcommand("list", "cases and what they need");
  list->add_option("cases", v.list_cases, "case files or directories (default cases/default)")->type_name("CASE");
}

// A value listed twice (a cp size, a selftest mutant) would be run twice and its checks counted twice.
template <class T>
void require_listed_once(const std::vector<T>& values, const char* flag) {
  for (size_t i = 0; i < values.size(); ++i)
    for (size_t k = 0; k < i; ++k)
      if (values[k] == values[i]) throw UsageError(fmt::format("{} lists {} twice", flag, values[i]));
}

// The chosen verb's call, after a successful parse.
int call_verb(CLI::App& app, Verbs& v, const std::vector<std::string>& args) {
  auto* chosen = app.get_subcommands().at(0);
  const std::string verb = chosen->get_name();
  if (verb == "run") {
    if (v.run.nproc && v.run.comm != "mpi") throw UsageError("--nproc launches processes: it needs --comm mpi");
    require_listed_once(v.run.cp, "--cp");
    // One process per rank: the world size is the cp size, so another --cp would be ignored without a word.
    if (v.run.comm == "mpi" && v.run.nproc && !v.run.cp.empty() && (v.run.cp.size() != 1 || v.run.cp[0] != v.run.nproc))
      throw UsageError(fmt::format("--cp {} with --comm mpi --nproc {}: one process per rank runs cp {} (the world size); "
                                   "leave --cp out or give --cp {}", fmt::join(v.run.cp, ","), v.run.nproc, v.run.nproc, v.run.nproc));
    v.run.argv.assign(args.begin() + 1, args.end());
    return run_verb(v.run);
  }
  if (verb == "selftest") {
    require_listed_once(v.selftest.only, "--only");
    return selftest_verb(v.selftest);
  }
  if (verb == "golden") {
    if (chosen->got_subcommand("record")) return golden_record_verb(v.golden_case, v.golden_out, v.force);
    return golden_verify_verb(v.golden_case, v.golden_file, v.verify_outputs);
  }
  if (verb == "compare") {
    if (v.compare_all) v.compare.rows = SIZE_MAX;
    return compare_verb(v.compare);
  }
  if (verb == "hf-parity") {
    if (v.holder || v.no_holder) v.hf.holder = v.holder;
    require_listed_once(v.hf.cp_sizes, "--cp");
    return hf_parity_verb(v.hf, v.hf_outputs);
  }
  if (verb == "bisect") return bisect_verb(v.bisect_case, v.bisect_golden);
  if (verb == "render") return render_verb(v.render_in, v.render_out);
  return list_verb(v.list_cases);
}

}  // namespace

int refuse_before_parsing(const std::vector<std::string>& args, const std::string& why) {
  if (verb_writes_reports(args)) withdraw_older_reports(args, "usage error: " + why);
  std::cerr << "cpharness: " << why << "\n";
  return !args.empty() && args[0] == "bisect" ? 125 : 2;
}

int run_cli(const std::vector<std::string>& args) {
  CLI::App app{"cpharness: numerical parity of context-parallel Gemma4 training (cp N against cp 1 and goldens)",
               "cpharness"};
  app.require_subcommand(1);
  Verbs v;
  add_run(app, v);
  add_selftest(app, v);
  add_golden(app, v);
  add_compare(app, v);
  add_hf_parity(app, v);
  add_bisect(app, v);
  add_render(app, v);
  add_list(app, v);
  const bool bisecting = !args.empty() && args[0] == "bisect";
  const bool writes_reports = verb_writes_reports(args);
  try {
    std::vector<std::string> reversed(args.rbegin(), args.rend());  // CLI11 parses a vector from the back
    app.parse(reversed);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    auto* verb = &app;  // the innermost verb parsed ("golden" in "golden frob")
    while (!verb->get_subcommands().empty()) verb = verb->get_subcommands().front();
    std::string why = e.what();
    if (const auto left = verb->remaining(); !verb->get_subcommands({}).empty() && !left.empty() &&
                                             left.front().rfind("-", 0) != 0 && why == "A subcommand is required")
      why = "unknown verb '" + left.front() + "'" + (verb == &app ? "" : " of " + verb->get_name());
    if (writes_reports) withdraw_older_reports(args, "usage error: " + why);
    std::cerr << "cpharness: " << why << "\n";
    std::cerr << verb->help();
    return bisecting ? 125 : 2;
  }
  try {
    return call_verb(app, v, args);
  } catch (const UsageError& e) {
    if (!replace_stand_in(std::string("usage error: ") + e.what()) && writes_reports)
      withdraw_older_reports(args, std::string("usage error: ") + e.what());
    std::cerr << "cpharness: " << e.what() << "\n" << app.get_subcommands().front()->help();
    return bisecting ? 125 : 2;
  } catch (const io::InputError& e) {
    replace_stand_in(e.what());
    std::cerr << "cpharness: error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    const std::string why = exception_text(e);
    replace_stand_in(why);
    std::cerr << "cpharness: " << (why.rfind("internal error", 0) == 0 ? "" : "error: ") << why << "\n";
    return 2;
  }
}

}  // namespace cpharness::cli
