#include "harness/cli/commands.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <thread>
#include <nlohmann/json.hpp>

#include "cpharness/version.h"
#include "harness/cp/launcher.h"
#include "harness/io/input_error.h"
#include "harness/report/json_report.h"
#include "harness/report/junit.h"
#include "harness/report/compare.h"
#include "harness/report/run_dump.h"
#include "harness/check/hf_parity.h"
#include "harness/runner/golden.h"
#include "harness/runner/hf_golden.h"
#include "harness/runner/selftest.h"
#include "harness/runner/suite.h"
#include "harness/train/case.h"

namespace cpharness::cli {
namespace {

using nlohmann::json;

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

constexpr const char* kUsage =
    "usage: cpharness <verb> [options]\n"
    "  run CASE... [--cp 2,4] [--comm local|mpi] [--nproc N] [--out DIR] [--report F] [--junit F] [--dump-dir D]\n"
    "      [--timeout S]                          --comm mpi: one process per rank, cp = N (--nproc N, or mpirun/srun)\n"
    "        cp 1 reference + cp N candidates, every check; exit 0 pass, 1 a check failed, 2 usage/input error\n"
    "  selftest [--only MUTANT]... [--out DIR]   every check against its known-bad mutant; exit 0 when all caught\n"
    "  golden record CASE -o F.h5 [--force]      write the cp 1 reference of CASE as a golden\n"
    "  golden verify CASE F.h5 [--out DIR]       golden.match: a fresh run against the golden\n"
    "  compare A.h5 B.h5 [--policy SPEC] [--json F] [--rows N|--all]   tensor-by-tensor diff (B is the reference); exit 1 on a difference\n"
    "  compare DIR_A DIR_B [--policy SPEC] [--json F] the same for every *.h5 pair with the same name (two transformers versions)\n"
    "  hf-parity GOLDEN.h5|DIR... [--cp 1,2,4] [--holder|--no-holder] [--report F] [--junit F] [--out DIR]\n"
    "        hf.parity: the C++ model against goldens exported from transformers (golden/export_hf.py)\n"
    "  bisect CASE --golden F.h5                 for git bisect run: 0 good, 1 bad, 125 skip\n"
    "  list [CASE...]                            cases and what they need\n";

struct RunArgs {
  std::vector<std::string> cases;
  std::optional<std::vector<int>> cp;
  std::string comm = "local";
  int nproc = 0;  // --nproc N: launch N ranks on this host (mpi)
  std::string out_dir, report_path, junit_path, dump_dir;
  double timeout_s = 120;
  std::vector<std::string> only;  // selftest: mutant names
  std::optional<bool> holder;     // hf-parity: force the KV-share holder on or off
};

std::vector<int> parse_int_list(const std::string& flag, const std::string& value) {
  std::vector<int> out;
  std::stringstream ss(value);
  for (std::string item; std::getline(ss, item, ',');) {
    try {
      size_t used = 0;
      const int v = std::stoi(item, &used);
      if (used != item.size() || v < 1) throw std::invalid_argument(item);
      out.push_back(v);
    } catch (...) {
      throw UsageError(flag + " expects a comma-separated list of positive integers, got '" + value + "'");
    }
  }
  if (out.empty()) throw UsageError(flag + " needs a value");
  return out;
}

RunArgs parse_run_args(const std::vector<std::string>& args) {
  RunArgs a;
  auto value = [&](size_t& i) -> const std::string& {
    if (i + 1 >= args.size()) throw UsageError(args[i] + " needs a value");
    return args[++i];
  };
  for (size_t i = 0; i < args.size(); ++i) {
    const auto& f = args[i];
    if (f == "--cp") a.cp = parse_int_list(f, value(i));
    else if (f == "--holder" || f == "--no-holder") a.holder = f == "--holder";
    else if (f == "--comm") a.comm = value(i);
    else if (f == "--nproc") a.nproc = parse_int_list(f, value(i)).at(0);
    else if (f == "--out") a.out_dir = value(i);
    else if (f == "--report") a.report_path = value(i);
    else if (f == "--junit") a.junit_path = value(i);
    else if (f == "--dump-dir") a.dump_dir = value(i);
    else if (f == "--only") a.only.push_back(value(i));
    else if (f == "--timeout") {
      try {
        a.timeout_s = std::stod(value(i));
      } catch (...) {
        throw UsageError("--timeout expects seconds");
      }
    } else if (f.rfind("--", 0) == 0) throw UsageError("unknown option " + f);
    else a.cases.push_back(f);
  }
  if (a.comm == "nccl")
    throw UsageError("--comm nccl: the runner does not drive CUDA ranks yet (the nccl Comm backend exists and is tested "
                     "on its own); use --comm local or --comm mpi");
  if (a.comm != "local" && a.comm != "mpi") throw UsageError("--comm must be local or mpi, got '" + a.comm + "'");
  if (a.nproc && a.comm != "mpi") throw UsageError("--nproc launches processes: it needs --comm mpi");
  if (!a.out_dir.empty()) {
    if (a.report_path.empty()) a.report_path = a.out_dir + "/report.json";
    if (a.junit_path.empty()) a.junit_path = a.out_dir + "/report.xml";
  }
  return a;
}

void write_reports(const RunArgs& a, const report::Report& r) {
  if (!a.out_dir.empty()) std::filesystem::create_directories(a.out_dir);
  if (!a.report_path.empty()) report::write_report_json(a.report_path, r);
  if (!a.junit_path.empty()) report::write_junit_xml(a.junit_path, r);
}

// A run that failed as a whole: an error report (never a partial or passing one).
void write_error_report(const RunArgs& a, const std::string& message) {
  report::Report r;
  r.error = message;
  r.environment.device = "cpu";
  r.environment.comm_backend = a.comm;
  try {
    write_reports(a, r);
  } catch (const std::exception& e) {
    std::cerr << "cpharness: could not write the error report: " << e.what() << "\n";
  }
}

// Bad input found before any case ran: exit 2 with an error report.
int input_error_report(const RunArgs& a, const std::string& message) {
  std::cerr << "cpharness: error: " << message << "\n";
  write_error_report(a, message);
  return 2;
}

runner::SuiteOptions suite_options(const RunArgs& a) {
  runner::SuiteOptions o;
  o.cp_sizes = a.cp;
  o.comm = a.comm;
  o.dump_dir = a.dump_dir;
  o.timeout = std::chrono::milliseconds(int64_t(a.timeout_s * 1000));
  return o;
}

}  // namespace

namespace {

std::optional<runner::Fault> fault_from_env() {
  const char* spec = std::getenv("CPHARNESS_INJECT_FAULT");
  if (!spec || !*spec) return std::nullopt;
  try {
    return runner::parse_fault(spec);
  } catch (const std::invalid_argument& e) {
    throw UsageError(std::string("CPHARNESS_INJECT_FAULT: ") + e.what());
  }
}

// --comm mpi outside a launcher: run this command again under mpirun with N ranks. When the job dies without
// rank 0 having written its report (a rank crashed and mpirun stopped the rest), write the error report here.
int launch_mpi_job(const RunArgs& a, const std::vector<std::string>& args) {
  if (a.nproc < 1) throw UsageError("--comm mpi needs --nproc N (or a launch under mpirun/srun)");
  std::vector<std::string> child;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--nproc") ++i;
    else child.push_back(args[i]);
  }
  child.insert(child.begin(), "run");
  const auto started = std::filesystem::file_time_type::clock::now();
  const auto result = cp::relaunch_under_mpirun(a.nproc, cp::self_exe(), child);
  if (result.exit_code == 0 || result.exit_code == 1) return result.exit_code;
  const bool fresh = !a.report_path.empty() && std::filesystem::exists(a.report_path) &&
                     std::filesystem::last_write_time(a.report_path) >= started;
  if (!fresh && !a.report_path.empty()) write_error_report(a, "the rank job failed: " + result.message);
  return 2;
}

}  // namespace

int run_command(const std::vector<std::string>& args) {
  const auto a = parse_run_args(args);
  if (a.cases.empty()) throw UsageError("run needs at least one CASE (a file or a directory of *.json)");
  auto options = suite_options(a);
  options.run.fault = fault_from_env();
  std::unique_ptr<cp::Comm> world;
  if (a.comm == "mpi") {
    const auto env = cp::detect_launch_env();
    if (!env.launched()) return launch_mpi_job(a, args);
    world = cp::make_mpi_comm(options.timeout);
    options.world = world.get();
  }
  const bool root = !world || world->rank() == 0;
  std::vector<train::Case> cases;
  try {
    cases = train::load_cases(a.cases);  // validate every case before running any (every rank sees the same files)
  } catch (const io::InputError& e) {
    return root ? input_error_report(a, e.what()) : 2;
  }
  auto r = runner::run_suite(cases, options);
  int code = report::exit_code(r);
  if (root) {
    std::cerr << runner::summary_table(r);
    write_reports(a, r);
  }
  if (!world) return code;
  if (options.world_failed) {
    // Ending the job stops every rank at once: give rank 0 a moment to finish writing its error report first.
    if (!root) std::this_thread::sleep_for(std::chrono::seconds(3));
    // Pinned on the peer this rank was waiting for, so the launcher names the rank that failed or hung.
    const int culprit = options.failed_peer >= 0 ? options.failed_peer : world->rank();
    cp::fail_rank(world.get(), culprit, fmt::format("stopped or unresponsive (seen by rank {})", world->rank()));
  }
  // One rank exiting non-zero ends the job: every rank leaves with rank 0's verdict.
  auto verdict = torch::tensor({int64_t(code)}, torch::kInt64);
  world->broadcast(verdict, 0);
  return int(verdict.item<int64_t>());
}

int selftest_command(const std::vector<std::string>& args) {
  const auto a = parse_run_args(args);
  if (!a.cases.empty()) throw UsageError("selftest takes no CASE (it runs its own)");
  auto r = runner::run_selftest(suite_options(a), a.only);
  std::cerr << runner::summary_table(r);
  write_reports(a, r);
  return report::exit_code(r);
}

// golden record CASE -o F.h5 [--force] | golden verify CASE F.h5 [--report F] [--junit F] [--out DIR]
int golden_command(const std::vector<std::string>& args) {
  if (args.empty()) throw UsageError("golden needs a sub-verb: record or verify");
  const std::vector<std::string> rest(args.begin() + 1, args.end());
  if (args[0] == "record") {
    std::string case_path, out_path;
    bool force = false;
    for (size_t i = 0; i < rest.size(); ++i) {
      if ((rest[i] == "-o" || rest[i] == "--output") && i + 1 < rest.size()) out_path = rest[++i];
      else if (rest[i] == "--force") force = true;
      else if (rest[i].rfind("-", 0) == 0) throw UsageError("unknown option " + rest[i]);
      else if (case_path.empty()) case_path = rest[i];
      else throw UsageError("golden record takes one CASE");
    }
    if (case_path.empty() || out_path.empty()) throw UsageError("usage: golden record CASE -o F.h5 [--force]");
    if (std::filesystem::exists(out_path) && !force)
      throw io::InputError(out_path, "golden", "exists; refreshing a golden is explicit: pass --force");
    const auto c = train::load_case(case_path);
    if (!c.requires_features.empty()) throw io::InputError(case_path, "requires", "cannot record a golden here: requires " + c.requires_features.front());
    report::write_run_dump(out_path, runner::reference_dump(c, report::kKindGolden));
    std::cerr << fmt::format("recorded {} ({}, {} steps) -> {}\n", c.id, train::to_string(c.dtype), c.steps, out_path);
    return 0;
  }
  if (args[0] == "verify") {
    std::vector<std::string> positional, flags;
    for (size_t i = 0; i < rest.size(); ++i) {
      if (rest[i].rfind("--", 0) == 0) {
        flags.push_back(rest[i]);
        if (i + 1 < rest.size()) flags.push_back(rest[++i]);
      } else {
        positional.push_back(rest[i]);
      }
    }
    if (positional.size() != 2) throw UsageError("usage: golden verify CASE F.h5 [--report F] [--junit F] [--out DIR]");
    const auto a = parse_run_args(flags);
    report::Report r;
    r.timestamp = report::utc_timestamp_now();
    r.environment.device = "cpu";
    report::CaseReport cr;
    const auto start = std::chrono::steady_clock::now();
    try {
      const auto c = train::load_case(positional[0]);
      cr.id = c.id;
      cr.dtype = train::to_string(c.dtype);
      cr.cp_sizes = {1};
      report::CompareResult cmp;
      cr.checks.push_back(runner::verify_golden(c, positional[1], &cmp));
      std::cerr << report::render_text(cmp, "run", positional[1]);
    } catch (const io::InputError& e) {
      cr.id = cr.id.empty() ? positional[0] : cr.id;
      cr.error = e.what();
      std::cerr << "cpharness: error: " << e.what() << "\n";
    }
    cr.duration_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    r.cases.push_back(cr);
    r.duration_s = cr.duration_s;
    write_reports(a, r);
    std::cerr << runner::summary_table(r);
    return report::exit_code(r);
  }
  throw UsageError("unknown golden sub-verb '" + args[0] + "' (record or verify)");
}

// compare DIR_A DIR_B: the *.h5 files of both directories paired by name (two transformers versions' goldens:
// golden/hf-5.5.2 golden/hf-5.8.1), each pair compared as two files; files on one side only are listed. Exit 0
// when every pair passes and nothing is unpaired.
static int compare_directories(const std::string& dir_a, const std::string& dir_b, const report::ComparePolicy& policy,
                               const std::string& json_path, size_t rows) {
  auto list = [](const std::string& dir) {
    std::vector<std::string> names;
    for (auto& e : std::filesystem::directory_iterator(dir))
      if (e.is_regular_file() && e.path().extension() == ".h5") names.push_back(e.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
  };
  const auto na = list(dir_a), nb = list(dir_b);
  std::vector<std::string> all = na;
  for (auto& n : nb)
    if (!std::binary_search(na.begin(), na.end(), n)) all.push_back(n);
  std::sort(all.begin(), all.end());
  if (all.empty()) throw io::InputError(dir_a, "", "no *.h5 files in either directory");
  bool passed = true;
  nlohmann::json doc = {{"a", dir_a}, {"b", dir_b}, {"pairs", nlohmann::json::array()}, {"only_in_a", nlohmann::json::array()},
                        {"only_in_b", nlohmann::json::array()}};
  std::vector<std::string> summary;
  for (auto& n : all) {
    const bool in_a = std::binary_search(na.begin(), na.end(), n), in_b = std::binary_search(nb.begin(), nb.end(), n);
    if (!in_a || !in_b) {
      passed = false;
      doc[in_a ? "only_in_a" : "only_in_b"].push_back(n);
      summary.push_back(fmt::format("{:<28} only in {}", n, in_a ? dir_a : dir_b));
      continue;
    }
    const auto fa = (std::filesystem::path(dir_a) / n).string(), fb = (std::filesystem::path(dir_b) / n).string();
    const auto result = report::compare_dumps(report::read_run_dump(fa), report::read_run_dump(fb), policy);
    std::cout << "=== " << n << "\n" << report::render_text(result, fa, fb, rows) << "\n";
    passed = passed && result.passed;
    auto j = report::to_json(result);
    j["file"] = n;
    doc["pairs"].push_back(j);
    std::string first = "-";
    if (result.first_divergence) {
      const auto& e = result.entries[*result.first_divergence];
      first = fmt::format("first divergence {} ({} rel {:.3g})", e.path, to_string(e.status), e.rel_diff);
    }
    size_t differing = 0;
    for (auto& e : result.entries) differing += e.differs() ? 1 : 0;
    summary.push_back(fmt::format("{:<28} {}: {} of {} entries differ: {} beyond tolerance, {} on one side only; {}", n,
                                  result.status(), differing, result.entries.size(),
                                  result.counts.out_of_tolerance + result.counts.nonfinite + result.counts.shape_mismatch,
                                  result.counts.missing, first));
  }
  std::cout << fmt::format("=== {} vs {} (reference): {}\n", dir_a, dir_b, passed ? "pass" : "fail");
  for (auto& line : summary) std::cout << "  " << line << "\n";
  doc["status"] = passed ? "pass" : "fail";
  if (!json_path.empty()) report::write_file_atomically(json_path, doc.dump(2) + "\n");
  return passed ? 0 : 1;
}

// compare A.h5 B.h5 [--policy SPEC] [--json F]: B is the reference.
int compare_command(const std::vector<std::string>& args) {
  std::vector<std::string> files;
  std::string policy_spec = "fp32", json_path;
  size_t rows = 40;  // failing entries shown per pair (--rows N, --all)
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--policy" && i + 1 < args.size()) policy_spec = args[++i];
    else if (args[i] == "--json" && i + 1 < args.size()) json_path = args[++i];
    else if (args[i] == "--rows" && i + 1 < args.size()) rows = size_t(parse_int_list("--rows", args[++i]).at(0));
    else if (args[i] == "--all") rows = SIZE_MAX;
    else if (args[i].rfind("--", 0) == 0) throw UsageError("unknown option " + args[i]);
    else files.push_back(args[i]);
  }
  if (files.size() != 2) throw UsageError("usage: compare A.h5 B.h5|DIR_A DIR_B [--policy fp32|exact|rel:X[,CATEGORY:X...]] [--json F]");
  report::ComparePolicy policy;
  try {
    policy = report::ComparePolicy::parse(policy_spec);
  } catch (const std::invalid_argument& e) {
    throw UsageError(std::string("--policy: ") + e.what());
  }
  if (std::filesystem::is_directory(files[0]) || std::filesystem::is_directory(files[1])) {
    if (!std::filesystem::is_directory(files[0]) || !std::filesystem::is_directory(files[1]))
      throw UsageError("compare: give two files or two directories");
    return compare_directories(files[0], files[1], policy, json_path, rows);
  }
  const auto a = report::read_run_dump(files[0]);
  const auto b = report::read_run_dump(files[1]);
  const auto result = report::compare_dumps(a, b, policy);
  std::cout << report::render_text(result, files[0], files[1], rows);
  if (!json_path.empty()) report::write_file_atomically(json_path, report::to_json(result).dump(2) + "\n");
  return result.passed ? 0 : 1;
}

// hf-parity GOLDEN.h5|DIR... [--cp 1,2,4] [--holder|--no-holder] [--report F] [--junit F] [--out DIR]
// One report case per golden. The KV-sharing semantics follow the golden's kv_share_mechanism; the holder follows
// what HF did (a cache-gated export made without a cache runs without it) unless --holder/--no-holder say otherwise.
// For such an export (5.5.0/5.5.1 use_cache=False) kvshare.bug_detected also shows that its loss is not the
// correct, sharing one.
int hf_parity_command(const std::vector<std::string>& args) {
  const auto a = parse_run_args(args);
  if (a.cases.empty()) throw UsageError("hf-parity needs at least one GOLDEN.h5 or a directory of them");
  const std::vector<int> cps = a.cp.value_or(std::vector<int>{1, 2, 4});
  std::vector<std::string> files;
  for (auto& p : a.cases) {
    if (std::filesystem::is_directory(p)) {
      std::vector<std::string> in_dir;
      for (auto& e : std::filesystem::directory_iterator(p))
        if (e.is_regular_file() && e.path().extension() == ".h5") in_dir.push_back(e.path().string());
      std::sort(in_dir.begin(), in_dir.end());
      if (in_dir.empty()) return input_error_report(a, p + ": no *.h5 goldens in this directory");
      files.insert(files.end(), in_dir.begin(), in_dir.end());
    } else if (std::filesystem::exists(p)) {
      files.push_back(p);
    } else {
      return input_error_report(a, p + ": no such file or directory");
    }
  }
  report::Report r;
  r.timestamp = report::utc_timestamp_now();
  r.environment.device = "cpu";
  r.environment.comm_backend = "local";
  std::vector<std::string> versions;
  const auto start = std::chrono::steady_clock::now();
  for (auto& path : files) {
    report::CaseReport cr;
    cr.id = std::filesystem::path(path).parent_path().filename().string() + "/" + std::filesystem::path(path).stem().string();
    cr.dtype = "fp32";
    cr.cp_sizes = cps;
    const auto case_start = std::chrono::steady_clock::now();
    try {
      const auto g = runner::load_hf_golden(path);
      cr.description = fmt::format("{} exported by transformers {} ({}, use_cache={})", g.id(), g.transformers_version,
                                   g.mechanism, g.hf_use_cache ? "true" : "false");
      if (std::find(versions.begin(), versions.end(), g.transformers_version) == versions.end())
        versions.push_back(g.transformers_version);
      const bool holder = a.holder.value_or(g.hf_shared_kv());
      for (int cp : cps) {
        const auto run = runner::run_on_hf_golden(g, cp, holder);
        auto checks = check::check_hf_parity(g, run);
        bool ok = true;
        for (auto& c : checks) {
          ok = ok && c.status == report::Status::Pass;
          cr.checks.push_back(c);
        }
        std::cerr << fmt::format("{} cp {}: loss {:.9g} (transformers {:.9g}) {}\n", cr.id, cp, run.loss, g.loss(),
                                 ok ? "pass" : "FAIL");
      }
      if (g.shares_kv() && !g.hf_shared_kv()) {
        const auto correct = runner::run_on_hf_golden(g, 1, true);  // cache-gated with the holder: sharing
        cr.checks.push_back(check::check_hf_kvshare_bug_detected(g, correct));
      }
    } catch (const io::InputError& e) {
      cr.error = e.what();
      std::cerr << "cpharness: error: " << e.what() << "\n";
    }
    cr.duration_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - case_start).count();
    r.cases.push_back(cr);
  }
  if (!versions.empty()) r.environment.transformers = fmt::format("{}", fmt::join(versions, ", "));
  r.duration_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::cerr << runner::summary_table(r);
  write_reports(a, r);
  return report::exit_code(r);
}

// bisect CASE --golden F.h5: for `git bisect run`: 0 good, 1 bad, 125 when the run could not be made.
int bisect_command(const std::vector<std::string>& args) {
  std::string case_path, golden;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--golden" && i + 1 < args.size()) golden = args[++i];
    else if (case_path.empty() && args[i].rfind("--", 0) != 0) case_path = args[i];
    else {
      std::cerr << "usage: cpharness bisect CASE --golden F.h5\n";
      return 125;
    }
  }
  if (case_path.empty() || golden.empty()) {
    std::cerr << "usage: cpharness bisect CASE --golden F.h5\n";
    return 125;
  }
  try {
    const auto c = train::load_case(case_path);
    report::CompareResult cmp;
    const auto check = runner::verify_golden(c, golden, &cmp);
    std::cerr << report::render_text(cmp, "run", golden);
    std::cerr << fmt::format("bisect: {} ({})\n", check.status == report::Status::Pass ? "good" : "bad", check.message);
    return check.status == report::Status::Pass ? 0 : 1;
  } catch (const std::exception& e) {
    std::cerr << "bisect: skip (the run could not be made): " << e.what() << "\n";
    return 125;
  }
}

int list_command(const std::vector<std::string>& args) {
  auto cases = train::load_cases(args.empty() ? std::vector<std::string>{"cases/default"} : args);
  for (auto& c : cases)
    std::cout << fmt::format("{:<28} {:<10} {:<5} steps {} cp {} {}\n", c.id, c.model.name, train::to_string(c.dtype), c.steps,
                             fmt::join(c.cp_sizes, ","), c.requires_features.empty() ? "" : "requires " + c.requires_features.front());
  return 0;
}

int dispatch(const std::vector<std::string>& args) {
  try {
    if (args.empty() || args[0] == "--help" || args[0] == "-h") {
      std::cout << kUsage;
      return args.empty() ? 2 : 0;
    }
    const std::vector<std::string> rest(args.begin() + 1, args.end());
    if (args[0] == "run") return run_command(rest);
    if (args[0] == "list") return list_command(rest);
    if (args[0] == "selftest") return selftest_command(rest);
    if (args[0] == "golden") return golden_command(rest);
    if (args[0] == "compare") return compare_command(rest);
    if (args[0] == "bisect") return bisect_command(rest);
    if (args[0] == "hf-parity") return hf_parity_command(rest);
    throw UsageError("unknown verb '" + args[0] + "'");
  } catch (const UsageError& e) {
    std::cerr << "cpharness: " << e.what() << "\n" << kUsage;
    return 2;
  } catch (const io::InputError& e) {
    std::cerr << "cpharness: error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "cpharness: internal error: " << e.what() << "\n";
    return 2;
  }
}

}  // namespace cpharness::cli
