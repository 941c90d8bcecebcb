// Tests of harness/report: the data model's derived statuses, report.json (schema validation with Debian's
// python3-jsonschema, a negative check that the schema rejects drift, read back), report.xml (parsed back with
// python3's xml.etree) and atomic writes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "harness/io/input_error.h"
#include "io_test_util.h"
#include "harness/report/json_report.h"
#include "harness/report/junit.h"
#include "harness/report/report.h"

namespace cpharness::report {
namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

using io::testing::TempDir;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

const std::string kSchema = std::string(CPHARNESS_SOURCE_DIR) + "/reports/schema/report.schema.json";

// ---- helpers ----------------------------------------------------------------------------------------------

struct ProcResult {
  int rc = -1;
  std::string out;
};

// Runs a shell command, capturing stdout and stderr together.
ProcResult run(const std::string& cmd) {
  ProcResult r;
  FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
  if (!p) return r;
  char buf[4096];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) r.out.append(buf, n);
  const int st = ::pclose(p);
  r.rc = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

// Validates each file against the schema (itself checked as a draft 2020-12 schema). Non-JSON constants
// (NaN, Infinity) are rejected too. Output: one line per file, "OK <file>" or "INVALID <file>: <errors>".
constexpr const char* kValidateScript = R"PY(
import json, sys
import jsonschema
schema = json.load(open(sys.argv[1]))
jsonschema.Draft202012Validator.check_schema(schema)
validator = jsonschema.Draft202012Validator(schema)
def no_constants(c):
    raise ValueError("non-JSON constant " + c)
bad = 0
for path in sys.argv[2:]:
    try:
        doc = json.load(open(path, encoding="utf-8"), parse_constant=no_constants)
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        msgs = ["%s: %s" % ("/".join(map(str, e.absolute_path)), e.message) for e in errors]
    except Exception as e:
        msgs = ["unreadable: %r" % e]
    if msgs:
        bad += 1
        print("INVALID", path, "|", " ; ".join(msgs)[:2000])
    else:
        print("OK", path)
sys.exit(1 if bad else 0)
)PY";

// path -> true (valid) / false (invalid); fails the test if python or the schema itself is broken.
std::map<std::string, bool> validate(const TempDir& dir, const std::vector<std::string>& files, std::string* log) {
  const std::string script = dir.file("validate.py");
  write_text(script, kValidateScript);
  std::string cmd = "/usr/bin/python3 " + script + " " + kSchema;
  for (const auto& f : files) cmd += " " + f;
  const ProcResult r = run(cmd);
  *log = r.out;
  std::map<std::string, bool> out;
  std::istringstream lines(r.out);
  std::string line;
  while (std::getline(lines, line)) {
    for (const auto& f : files) {
      if (line == "OK " + f) out[f] = true;
      if (line.rfind("INVALID " + f + " ", 0) == 0) out[f] = false;
    }
  }
  EXPECT_EQ(out.size(), files.size()) << "validator did not answer for every file (rc " << r.rc << "):\n" << r.out;
  return out;
}

// Parses report.xml with python3's xml.etree and returns its structure as JSON.
constexpr const char* kJunitScript = R"PY(
import json, sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
def props(e):
    p = e.find("properties")
    return {} if p is None else {x.get("name"): x.get("value") for x in p.findall("property")}
def outcome(tc, tag):
    e = tc.find(tag)
    return None if e is None else {"message": e.get("message"), "type": e.get("type"), "text": e.text}
out = {"tag": root.tag, "attrs": dict(root.attrib), "suites": []}
for s in root.findall("testsuite"):
    out["suites"].append({"attrs": dict(s.attrib), "props": props(s), "cases": [
        {"attrs": dict(tc.attrib), "props": props(tc), "failure": outcome(tc, "failure"),
         "error": outcome(tc, "error"), "skipped": outcome(tc, "skipped")} for tc in s.findall("testcase")]})
json.dump(out, sys.stdout)
)PY";

json parse_junit(const TempDir& dir, const std::string& xml_path) {
  const std::string script = dir.file("junit.py");
  write_text(script, kJunitScript);
  const ProcResult r = run("/usr/bin/python3 " + script + " " + xml_path);
  EXPECT_EQ(r.rc, 0) << r.out;
  if (r.rc != 0) return json();
  return json::parse(r.out);
}

bool same_double(double a, double b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return a == b && std::signbit(a) == std::signbit(b);
}

bool same_series(const std::vector<double>& a, const std::vector<double>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (!same_double(a[i], b[i])) return false;
  return true;
}

// A message with everything XML and JSON writers must survive: markup, quotes, control characters,
// invalid UTF-8 and real non-ASCII text.
const std::string kNastyText = "a<b & c>d \"dq\" 'sq' tab\there\nline2 bell\x07 esc\x1b bad\xff\xfe utf8 \xc3\xbcnic\xc3\xb8" "de";

// pass, fail (NaN/inf observed), error (check errored; case-level error) and skipped cases.
Report sample_report() {
  Report r;
  r.environment.torch = "2.11.0";
  r.environment.device = "cpu";
  r.environment.comm_backend = "local";
  r.environment.determinism = json{{"use_deterministic_algorithms", true}, {"seed", 1234}, {"cublas", ":4096:8"}};
  r.environment.transformers = "4.57.0";
  r.timestamp = "2025-01-31T12:00:00Z";
  r.duration_s = 42.5;

  CaseReport pass;
  pass.id = "tiny-e2b";
  pass.description = "tiny E2B, packed docs with padding";
  pass.cp_sizes = {2, 4};
  pass.dtype = "fp32";
  pass.duration_s = 10.25;
  pass.checks.push_back(CheckResult::judge("train.loss_parity", 2, std::nullopt, "abs_rel_loss", 3e-7, 1e-5,
                                           Policy::Fp32Relative, json{{"steps", {0, 1, 2}}}));
  auto count = CheckResult::judge("cache.build_count", 2, 1, "count", 4, 4, Policy::Count);
  count.step = 0;
  pass.checks.push_back(count);
  pass.checks.push_back(CheckResult::judge("attention.parity", 4, 3, "max_abs", 0.0, 0.0, Policy::Exact));
  pass.trajectories[1] = Trajectory{{2.5, 2.4, 2.3}, {1.0, 0.9, 0.8}, {10.0, 10.1, 10.2}};
  pass.trajectories[2] = Trajectory{{2.5, 2.4000001, 2.3}, {1.0, 0.9, 0.8}, {10.0, 10.1, 10.2}};
  pass.block_mask_cache[2] = {{{10, 4, 6, 0, 1}, {10, 4, 6, 2, 1}}, {{10, 4, 6, 0, 1}, {10, 4, 6, 0, 1}}};
  pass.ring[2] = RingTrace{{{0, 1}, {1, 0}}, {{"forward", 2, 4096}, {"backward", 4, 8192}}};
  pass.ring[2].passes[0].peak_chunks = 2;  // optional fields: the chunks held and the ring's mode
  pass.ring[2].mode = "stream";
  r.cases.push_back(pass);

  CaseReport fail;
  fail.id = "tiny-e4b";
  fail.description = kNastyText;
  fail.cp_sizes = {2};
  fail.dtype = "bf16";
  fail.duration_s = 5.0;
  fail.checks.push_back(
      CheckResult::judge("train.loss_parity", 2, std::nullopt, "abs_rel_loss", kNaN, 1e-5, Policy::Fp32Relative));
  fail.checks.push_back(
      CheckResult::judge("train.grad_norm_parity", 2, 0, "rel_l2", kInf, 0.02, Policy::Bf16OracleRelative));
  fail.checks.push_back(
      CheckResult::judge("train.param_parity", 2, 1, "rel_l2", -kInf, 0.02, Policy::Bf16OracleRelative));
  fail.checks.push_back(  // an unbounded threshold: passes, written as null + "inf"
      CheckResult::judge("hf.parity", 2, std::nullopt, "rel_l2", 1e-3, kInf, Policy::Bf16OracleRelative));
  auto builds = CheckResult::judge("cache.build_count", 2, 1, "count", 168, 4, Policy::Count,
                                   json{{"first_divergence", {{"layer", 3}, {"tensor", "hidden"}}}});
  builds.step = 2;
  fail.checks.push_back(builds);
  auto nasty = CheckResult::judge("attention.parity", 2, 0, "rel_l2", 0.5, 1e-5, Policy::Fp32Relative);
  nasty.message = kNastyText;
  nasty.details = json{{"note", kNastyText}};
  fail.checks.push_back(nasty);
  fail.trajectories[1] = Trajectory{{2.5, kNaN}, {1.0, kInf}, {10.0, -kInf}};
  r.cases.push_back(fail);

  CaseReport err;
  err.id = "tiny-31b";
  err.description = "k_eq_v, vision groups";
  err.cp_sizes = {4};
  err.dtype = "fp32";
  err.checks.push_back(CheckResult::judge("mask.dense_slice", 4, 0, "count", 0, 0, Policy::Count));
  err.checks.push_back(CheckResult::errored("ring.grad_return", 4, 2, "rank 2 timed out after 60 s"));
  r.cases.push_back(err);

  CaseReport died;
  died.id = "uneven-len";
  died.cp_sizes = {2};
  died.dtype = "fp32";
  died.error = "rank 1 exited with signal 9";
  r.cases.push_back(died);

  CaseReport skip;
  skip.id = "e4b";
  skip.description = "real size";
  skip.cp_sizes = {2, 4};
  skip.dtype = "bf16";
  skip.skip_reason = "requires cuda";
  r.cases.push_back(skip);
  return r;
}

Report pass_only_report() {
  Report r = sample_report();
  Report out = r;
  out.cases = {r.cases[0], r.cases[4]};
  return out;
}

// ---- the data model ---------------------------------------------------------------------------------------

TEST(ReportModel, JudgeAppliesThePolicyAndSaysObservedVsAllowed) {
  auto ok = CheckResult::judge("train.loss_parity", 2, std::nullopt, "abs_rel_loss", 1e-6, 1e-5, Policy::Fp32Relative);
  EXPECT_EQ(ok.status, Status::Pass);
  EXPECT_EQ(ok.message, "observed 1e-06 <= allowed 1e-05 (fp32_relative)");
  auto bad = CheckResult::judge("train.loss_parity", 2, 0, "abs_rel_loss", 3.2e-5, 1e-5, Policy::Fp32Relative);
  EXPECT_EQ(bad.status, Status::Fail);
  EXPECT_EQ(bad.message, "observed 3.2e-05 > allowed 1e-05 (fp32_relative)");
  EXPECT_EQ(bad.rank, 0);
  auto edge = CheckResult::judge("x.y", 1, std::nullopt, "m", 1e-5, 1e-5, Policy::Fp32Relative);
  EXPECT_EQ(edge.status, Status::Pass);
  auto exact = CheckResult::judge("determinism.repeat_bitwise", 1, std::nullopt, "max_abs", 1e-30, 0, Policy::Exact);
  EXPECT_EQ(exact.status, Status::Fail);
  for (double v : {kNaN, kInf, -kInf}) {
    auto nf = CheckResult::judge("x.y", 2, std::nullopt, "rel_l2", v, 1e-5, Policy::Bf16OracleRelative);
    EXPECT_EQ(nf.status, Status::Fail) << v;  // even -inf <= threshold is a failure
    EXPECT_NE(nf.message.find("not finite"), std::string::npos) << nf.message;
  }
  auto c = CheckResult::judge("cache.build_count", 2, 1, "count", 168, 4, Policy::Count);
  EXPECT_EQ(c.status, Status::Fail);
  EXPECT_EQ(c.message, "observed 168 != expected 4 (count)");
  EXPECT_EQ(CheckResult::judge("cache.build_count", 2, 1, "count", 3, 4, Policy::Count).status, Status::Fail);
  EXPECT_EQ(CheckResult::judge("ring.grad_return", 2, 1, "bytes", 123456789, 123456788, Policy::Count).message,
            "observed 123456789 != expected 123456788 (count)");  // counts are never rounded
  EXPECT_EQ(CheckResult::judge("cache.build_count", 2, 1, "count", 4, 4, Policy::Count).status, Status::Pass);
  EXPECT_EQ(CheckResult::errored("a.b", 2, 1, "why").status, Status::Error);
  EXPECT_EQ(CheckResult::skipped("a.b", 2, "why").status, Status::Skipped);
}

TEST(ReportModel, StatusesAreDerivedErrorOverFailOverPass) {
  const Report r = sample_report();
  ASSERT_EQ(r.cases.size(), 5u);
  EXPECT_EQ(r.cases[0].status(), Status::Pass);
  EXPECT_EQ(r.cases[1].status(), Status::Fail);
  EXPECT_EQ(r.cases[2].status(), Status::Error);
  EXPECT_EQ(r.cases[2].error_reason(), "1 check errored");
  EXPECT_EQ(r.cases[3].status(), Status::Error);
  EXPECT_EQ(r.cases[3].error_reason(), "rank 1 exited with signal 9");
  EXPECT_EQ(r.cases[4].status(), Status::Skipped);
  EXPECT_EQ(r.status(), Status::Error);
  EXPECT_EQ(exit_code(r), 2);

  const Summary s = r.summary();
  EXPECT_EQ(s.cases, 5);
  EXPECT_EQ(s.passed, 1);
  EXPECT_EQ(s.failed, 1);
  EXPECT_EQ(s.errors, 2);
  EXPECT_EQ(s.skipped, 1);
  EXPECT_EQ(s.checks_total, 11);
  EXPECT_EQ(s.checks_passed, 5);
  EXPECT_EQ(s.checks_failed, 5);
  EXPECT_EQ(s.checks_errors, 1);
  EXPECT_EQ(s.checks_skipped, 0);
  EXPECT_EQ(s.duration_s, 42.5);

  Report f = sample_report();
  f.cases.erase(f.cases.begin() + 2, f.cases.begin() + 4);  // drop the errored ones
  EXPECT_EQ(f.status(), Status::Fail);
  EXPECT_EQ(exit_code(f), 1);
  EXPECT_EQ(exit_code(pass_only_report()), 0);
  EXPECT_EQ(pass_only_report().status(), Status::Pass);

  Report skipped_only;
  skipped_only.cases = {sample_report().cases[4]};
  EXPECT_EQ(skipped_only.status(), Status::Skipped);  // not one check ran: not a pass
  EXPECT_EQ(exit_code(skipped_only), kExitNothingRan);
  EXPECT_EQ(exit_code(skipped_only, /*allow_nothing_ran=*/true), 0);
  EXPECT_EQ(skipped_only.summary().skipped, 1);
  EXPECT_EQ(skipped_only.summary().passed, 0);

  Report run_error = pass_only_report();
  run_error.error = "cases/bad.json: steps: expected an integer";
  EXPECT_EQ(run_error.status(), Status::Error);

  CaseReport empty;  // a case that checked nothing never passes
  empty.id = "e";
  EXPECT_EQ(empty.status(), Status::Error);
  EXPECT_EQ(empty.error_reason(), "the case produced no check results");
  CaseReport all_skipped;
  all_skipped.checks = {CheckResult::skipped("a.b", 2, "needs cuda"), CheckResult::skipped("a.c", 2, "needs cuda")};
  EXPECT_EQ(all_skipped.status(), Status::Skipped);
  EXPECT_EQ(all_skipped.skip_reason_text(), "all 2 checks were skipped");
  CaseReport skipped_but_failed = sample_report().cases[4];  // a failed check is never hidden by a skip
  skipped_but_failed.checks = {sample_report().cases[1].checks[0]};
  EXPECT_EQ(skipped_but_failed.status(), Status::Fail);

  EXPECT_EQ(parse_status("pass"), Status::Pass);
  EXPECT_EQ(parse_status("passed"), std::nullopt);
  EXPECT_EQ(parse_policy("bf16_oracle_relative"), Policy::Bf16OracleRelative);
  EXPECT_EQ(parse_policy("relative"), std::nullopt);
  EXPECT_EQ(this_tool().name, "cpharness");
  EXPECT_FALSE(this_tool().git_sha.empty());
}

// The sha a report names is the commit the binary was built from, even when the build tree was configured at an
// older commit (a `cmake --build` after a checkout, as `git bisect run` does): it is stamped at every build.
TEST(ReportModel, TheToolsGitShaIsTheCommitOfTheSourceTree) {
  const std::string command = std::string("git -C '") + CPHARNESS_SOURCE_DIR + "' rev-parse --short=12 HEAD 2>/dev/null";
  std::FILE* pipe = popen(command.c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  char line[64] = {};
  const bool read = std::fgets(line, sizeof line, pipe) != nullptr;
  const int status = pclose(pipe);
  if (!read || status != 0) GTEST_SKIP() << "the source tree is not a git checkout";
  std::string head(line);
  while (!head.empty() && (head.back() == '\n' || head.back() == '\r')) head.pop_back();
  const std::string sha = this_tool().git_sha;
  EXPECT_EQ(sha.substr(0, head.size()), head) << "this binary was built at another commit: rebuild after a commit or checkout";
  EXPECT_TRUE(sha.size() == head.size() || sha.substr(head.size()) == "-dirty") << sha;
}

// ---- report.json ------------------------------------------------------------------------------------------

TEST(ReportJson, WrittenReportsValidateAgainstTheSchema) {
  TempDir dir;
  Report skipped_only;
  skipped_only.cases = {sample_report().cases[4]};
  Report run_error;
  run_error.error = "cases/bad.json: steps: expected an integer";
  const std::vector<std::pair<std::string, Report>> reports = {
      {dir.file("mixed.json"), sample_report()},
      {dir.file("pass.json"), pass_only_report()},
      {dir.file("skipped.json"), skipped_only},
      {dir.file("run_error.json"), run_error},
      {dir.file("empty.json"), Report{}},
  };
  std::vector<std::string> files;
  for (const auto& [path, r] : reports) {
    write_report_json(path, r);
    files.push_back(path);
  }
  std::string log;
  const auto valid = validate(dir, files, &log);
  for (const auto& f : files) EXPECT_TRUE(valid.count(f) && valid.at(f)) << f << "\n" << log;

  // What was written: nulls and tags for the non-finite values, no NaN/Infinity tokens.
  const std::string text = read_file(dir.file("mixed.json"));
  EXPECT_EQ(text.find("NaN"), std::string::npos);
  EXPECT_EQ(text.find("Infinity"), std::string::npos);
  const json j = json::parse(text);
  EXPECT_EQ(j["schema_version"], "1.0");
  EXPECT_EQ(j["status"], "error");
  const json& nan_check = j["cases"][1]["checks"][0];
  EXPECT_TRUE(nan_check["observed"].is_null());
  EXPECT_EQ(nan_check["observed_nonfinite"], "nan");
  EXPECT_EQ(j["cases"][1]["checks"][1]["observed_nonfinite"], "inf");
  EXPECT_EQ(j["cases"][1]["checks"][2]["observed_nonfinite"], "-inf");
  EXPECT_TRUE(j["cases"][1]["checks"][3]["threshold"].is_null());
  EXPECT_EQ(j["cases"][1]["checks"][3]["threshold_nonfinite"], "inf");
  EXPECT_FALSE(j["cases"][0]["checks"][0].contains("observed_nonfinite"));
  EXPECT_EQ(j["cases"][1]["trajectories"]["1"]["loss"], json::array({2.5, "nan"}));
  EXPECT_EQ(j["cases"][1]["trajectories"]["1"]["param_norm"], json::array({10.0, "-inf"}));
  EXPECT_EQ(j["cases"][0]["block_mask_cache"]["2"][0][1]["evictions"], 2);
  EXPECT_EQ(j["cases"][0]["ring"]["2"]["owners"], json::parse("[[0,1],[1,0]]"));
  EXPECT_EQ(j["cases"][4]["skip_reason"], "requires cuda");
  EXPECT_EQ(j["cases"][2]["error"], "1 check errored");
  EXPECT_EQ(j["summary"]["checks_failed"], 5);
  EXPECT_EQ(j["environment"]["cuda"], nullptr);
  EXPECT_EQ(j["environment"]["determinism"]["use_deterministic_algorithms"], true);
}

// The schema can fail: drifted reports must be rejected.
TEST(ReportJson, SchemaRejectsDriftedReports) {
  TempDir dir;
  const json good = json::parse(to_json(sample_report()).dump());
  std::vector<std::pair<std::string, json>> mutants;
  auto mutate = [&](const std::string& name, auto&& f) {
    json m = good;
    f(m);
    mutants.emplace_back(dir.file(name + ".json"), m);
  };
  mutate("status_passed", [](json& m) { m["status"] = "passed"; });
  mutate("report_status_skipped", [](json& m) { m["status"] = "skipped"; });
  mutate("missing_summary", [](json& m) { m.erase("summary"); });
  mutate("missing_check_metric", [](json& m) { m["cases"][0]["checks"][0].erase("metric"); });
  mutate("unknown_top_key", [](json& m) { m["extra"] = 1; });
  mutate("unknown_check_key", [](json& m) { m["cases"][0]["checks"][0]["observed_text"] = "x"; });
  mutate("policy_unknown", [](json& m) { m["cases"][0]["checks"][0]["policy"] = "relative"; });
  mutate("null_without_tag", [](json& m) { m["cases"][1]["checks"][0].erase("observed_nonfinite"); });
  mutate("tag_with_number", [](json& m) { m["cases"][0]["checks"][0]["observed_nonfinite"] = "nan"; });
  mutate("observed_string", [](json& m) { m["cases"][0]["checks"][0]["observed"] = "1e-5"; });
  mutate("cp_zero", [](json& m) { m["cases"][0]["checks"][0]["cp"] = 0; });
  mutate("count_negative", [](json& m) { m["summary"]["checks_total"] = -1; });
  mutate("count_float", [](json& m) { m["cases"][0]["block_mask_cache"]["2"][0][0]["builds"] = 4.5; });
  mutate("cp_key_bad", [](json& m) { m["cases"][0]["trajectories"]["cp2"] = m["cases"][0]["trajectories"]["2"]; });
  mutate("series_bad_tag", [](json& m) { m["cases"][1]["trajectories"]["1"]["loss"][1] = "NaN"; });
  mutate("case_pass_with_failed_check", [](json& m) { m["cases"][1]["status"] = "pass"; });
  mutate("report_pass_with_error_case", [](json& m) { m["status"] = "pass"; });
  mutate("skipped_without_reason", [](json& m) { m["cases"][4]["skip_reason"] = nullptr; });
  mutate("check_name_bad", [](json& m) { m["cases"][0]["checks"][0]["name"] = "Loss Parity"; });
  std::vector<std::string> files;
  for (const auto& [path, m] : mutants) {
    write_text(path, m.dump(1));
    files.push_back(path);
  }
  const std::string control = dir.file("control.json");  // the unmutated report passes in the same run
  write_text(control, good.dump(1));
  files.push_back(control);
  std::string log;
  const auto valid = validate(dir, files, &log);
  for (const auto& [path, m] : mutants) EXPECT_TRUE(valid.count(path) && !valid.at(path)) << path << " accepted\n" << log;
  EXPECT_TRUE(valid.count(control) && valid.at(control)) << log;
}

TEST(ReportJson, ReadBackEqualsWhatWasWritten) {
  TempDir dir;
  const Report r = sample_report();
  const std::string path = dir.file("report.json");
  write_report_json(path, r);
  const Report b = read_report_json(path);

  EXPECT_EQ(b.schema_version, "1.0");
  EXPECT_EQ(b.tool.name, r.tool.name);
  EXPECT_EQ(b.tool.git_sha, r.tool.git_sha);
  EXPECT_EQ(b.environment.torch, "2.11.0");
  EXPECT_EQ(b.environment.cuda, std::nullopt);
  EXPECT_EQ(b.environment.comm_backend, "local");
  EXPECT_EQ(b.environment.transformers, "4.57.0");
  EXPECT_EQ(b.environment.determinism, r.environment.determinism);
  EXPECT_EQ(b.timestamp, r.timestamp);
  EXPECT_EQ(b.duration_s, 42.5);
  EXPECT_EQ(b.status(), Status::Error);
  ASSERT_EQ(b.cases.size(), r.cases.size());
  for (std::size_t i = 0; i < r.cases.size(); ++i) {
    const CaseReport& x = r.cases[i];
    const CaseReport& y = b.cases[i];
    SCOPED_TRACE(x.id);
    EXPECT_EQ(y.id, x.id);
    EXPECT_EQ(y.cp_sizes, x.cp_sizes);
    EXPECT_EQ(y.dtype, x.dtype);
    EXPECT_EQ(y.status(), x.status());
    EXPECT_EQ(y.skip_reason, x.skip_reason_text());
    EXPECT_EQ(y.error, x.error_reason());
    EXPECT_EQ(y.duration_s, x.duration_s);
    ASSERT_EQ(y.checks.size(), x.checks.size());
    for (std::size_t k = 0; k < x.checks.size(); ++k) {
      const CheckResult& p = x.checks[k];
      const CheckResult& q = y.checks[k];
      SCOPED_TRACE(p.name);
      EXPECT_EQ(q.name, p.name);
      EXPECT_EQ(q.status, p.status);
      EXPECT_EQ(q.cp, p.cp);
      EXPECT_EQ(q.rank, p.rank);
      EXPECT_EQ(q.step, p.step);
      EXPECT_EQ(q.metric, p.metric);
      EXPECT_TRUE(same_double(q.observed, p.observed)) << q.observed << " vs " << p.observed;
      EXPECT_TRUE(same_double(q.threshold, p.threshold)) << q.threshold << " vs " << p.threshold;
      EXPECT_EQ(q.policy, p.policy);
      if (p.message.find('\xff') == std::string::npos) {
        EXPECT_EQ(q.message, p.message);
        EXPECT_EQ(q.details, p.details);
      } else {  // invalid UTF-8 is replaced by U+FFFD when written; everything else survives
        EXPECT_NE(q.message.find("\xef\xbf\xbd"), std::string::npos);
        EXPECT_NE(q.message.find("a<b & c>d \"dq\" 'sq' tab\there\nline2 bell\x07"), std::string::npos);
        EXPECT_NE(q.details.at("note").get<std::string>().find("\xef\xbf\xbd"), std::string::npos);
      }
    }
    ASSERT_EQ(y.trajectories.size(), x.trajectories.size());
    for (const auto& [cp, t] : x.trajectories) {
      ASSERT_TRUE(y.trajectories.count(cp));
      EXPECT_TRUE(same_series(y.trajectories.at(cp).loss, t.loss));
      EXPECT_TRUE(same_series(y.trajectories.at(cp).grad_norm, t.grad_norm));
      EXPECT_TRUE(same_series(y.trajectories.at(cp).param_norm, t.param_norm));
    }
    ASSERT_EQ(y.block_mask_cache.size(), x.block_mask_cache.size());
    for (const auto& [cp, ranks] : x.block_mask_cache) {
      const auto& yr = y.block_mask_cache.at(cp);
      ASSERT_EQ(yr.size(), ranks.size());
      for (std::size_t rk = 0; rk < ranks.size(); ++rk) {
        ASSERT_EQ(yr[rk].size(), ranks[rk].size());
        for (std::size_t s = 0; s < ranks[rk].size(); ++s) {
          EXPECT_EQ(yr[rk][s].lookups, ranks[rk][s].lookups);
          EXPECT_EQ(yr[rk][s].builds, ranks[rk][s].builds);
          EXPECT_EQ(yr[rk][s].hits, ranks[rk][s].hits);
          EXPECT_EQ(yr[rk][s].evictions, ranks[rk][s].evictions);
          EXPECT_EQ(yr[rk][s].resets, ranks[rk][s].resets);
        }
      }
    }
    ASSERT_EQ(y.ring.size(), x.ring.size());
    for (const auto& [cp, t] : x.ring) {
      EXPECT_EQ(y.ring.at(cp).owners, t.owners);
      EXPECT_EQ(y.ring.at(cp).mode, t.mode);
      ASSERT_EQ(y.ring.at(cp).passes.size(), t.passes.size());
      for (std::size_t i2 = 0; i2 < t.passes.size(); ++i2) {
        EXPECT_EQ(y.ring.at(cp).passes[i2].pass, t.passes[i2].pass);
        EXPECT_EQ(y.ring.at(cp).passes[i2].comm_ops, t.passes[i2].comm_ops);
        EXPECT_EQ(y.ring.at(cp).passes[i2].bytes, t.passes[i2].bytes);
        EXPECT_EQ(y.ring.at(cp).passes[i2].peak_chunks, t.passes[i2].peak_chunks);
      }
    }
  }
  // Writing what was read gives the same bytes.
  const std::string again = dir.file("again.json");
  write_report_json(again, b);
  EXPECT_EQ(read_file(again), read_file(path));
}

TEST(ReportJson, ReadingRejectsBadReportsNamingTheKey) {
  TempDir dir;
  const json good = json::parse(to_json(sample_report()).dump());
  auto expect_rejected = [&](const json& m, const std::string& subject, const std::string& reason_part) {
    try {
      from_json(m, "r.json");
      ADD_FAILURE() << "accepted; expected an error at " << subject;
    } catch (const io::InputError& e) {
      EXPECT_EQ(e.file(), "r.json");
      EXPECT_EQ(e.subject(), subject) << e.what();
      EXPECT_NE(e.reason().find(reason_part), std::string::npos) << e.what();
    }
  };
  {
    json m = good;
    m["cases"][0]["checks"][1].erase("metric");
    expect_rejected(m, "cases[0].checks[1].metric", "missing");
  }
  {
    json m = good;
    m["cases"][0]["extra"] = true;
    expect_rejected(m, "cases[0].extra", "unknown key");
  }
  for (const json& bad : {json("async"), json(3)}) {  // the ring's optional mode
    json m = good;
    m["cases"][0]["ring"]["2"]["mode"] = bad;
    try {
      from_json(m, "r.json");
      ADD_FAILURE() << "accepted ring mode " << bad.dump();
    } catch (const io::InputError& e) {
      EXPECT_NE(e.subject().find("mode"), std::string::npos) << e.what();
    }
  }
  {
    json m = good;
    m["status"] = "passed";
    expect_rejected(m, "status", "unknown status");
  }
  {
    json m = good;
    m["status"] = "pass";
    expect_rejected(m, "status", "disagrees");
  }
  {
    json m = good;
    m["cases"][1]["status"] = "pass";
    expect_rejected(m, "cases[1].status", "disagrees");
  }
  {
    json m = good;
    m["summary"]["checks_failed"] = 0;
    expect_rejected(m, "summary.checks_failed", "cases give 5");
  }
  {
    json m = good;
    m["cases"][1]["checks"][0].erase("observed_nonfinite");
    expect_rejected(m, "cases[1].checks[0].observed_nonfinite", "missing");
  }
  {
    json m = good;
    m["cases"][1]["trajectories"]["1"]["loss"][1] = "NaN";
    expect_rejected(m, "cases[1].trajectories.1.loss[1]", "expected");
  }
  {
    json m = good;
    m["cases"][0]["block_mask_cache"]["2"][0][0]["builds"] = -1;
    expect_rejected(m, "cases[0].block_mask_cache.2[0][0].builds", ">= 0");
  }
  {
    json m = good;
    m["schema_version"] = "2.0";
    expect_rejected(m, "schema_version", "unsupported");
  }
  // Files: missing, malformed.
  EXPECT_THROW(read_report_json(dir.file("absent.json")), io::InputError);
  write_text(dir.file("trunc.json"), good.dump().substr(0, 100));
  try {
    read_report_json(dir.file("trunc.json"));
    ADD_FAILURE() << "a truncated report was accepted";
  } catch (const io::InputError& e) {
    EXPECT_EQ(e.file(), dir.file("trunc.json"));
    EXPECT_NE(e.reason().find("malformed JSON"), std::string::npos) << e.what();
  }
}

// ---- report.xml -------------------------------------------------------------------------------------------

TEST(ReportJunit, ParsesBackWithCountsNamesPropertiesAndMessages) {
  TempDir dir;
  const Report r = sample_report();
  const std::string path = dir.file("report.xml");
  write_junit_xml(path, r);
  const json x = parse_junit(dir, path);
  ASSERT_TRUE(x.is_object());
  EXPECT_EQ(x["tag"], "testsuites");
  // 11 checks + a "case" testcase for the case-level error and one for the skipped case.
  EXPECT_EQ(x["attrs"]["tests"], "13");
  EXPECT_EQ(x["attrs"]["failures"], "5");
  EXPECT_EQ(x["attrs"]["errors"], "2");
  EXPECT_EQ(x["attrs"]["skipped"], "1");
  EXPECT_EQ(x["attrs"]["time"], "42.500");
  EXPECT_EQ(x["attrs"]["timestamp"], "2025-01-31T12:00:00Z");
  ASSERT_EQ(x["suites"].size(), 5u);

  const json& s0 = x["suites"][0];
  EXPECT_EQ(s0["attrs"]["name"], "tiny-e2b");
  EXPECT_EQ(s0["attrs"]["tests"], "3");
  EXPECT_EQ(s0["attrs"]["failures"], "0");
  EXPECT_EQ(s0["attrs"]["time"], "10.250");
  EXPECT_EQ(s0["props"]["dtype"], "fp32");
  EXPECT_EQ(s0["props"]["cp_sizes"], "2,4");
  EXPECT_EQ(s0["props"]["status"], "pass");
  ASSERT_EQ(s0["cases"].size(), 3u);
  EXPECT_EQ(s0["cases"][0]["attrs"]["name"], "train.loss_parity[cp=2]");
  EXPECT_EQ(s0["cases"][0]["attrs"]["classname"], "cpharness.tiny-e2b");
  EXPECT_EQ(s0["cases"][0]["props"]["observed"], "3e-07");
  EXPECT_EQ(s0["cases"][0]["props"]["threshold"], "1e-05");
  EXPECT_EQ(s0["cases"][0]["props"]["metric"], "abs_rel_loss");
  EXPECT_EQ(s0["cases"][0]["props"]["policy"], "fp32_relative");
  EXPECT_EQ(s0["cases"][0]["props"]["cp"], "2");
  EXPECT_FALSE(s0["cases"][0]["props"].contains("rank"));
  EXPECT_TRUE(s0["cases"][0]["failure"].is_null());
  EXPECT_EQ(s0["cases"][1]["attrs"]["name"], "cache.build_count[cp=2,rank=1,step=0]");
  EXPECT_EQ(s0["cases"][1]["props"]["rank"], "1");
  EXPECT_EQ(s0["cases"][1]["props"]["step"], "0");
  EXPECT_EQ(s0["cases"][2]["attrs"]["name"], "attention.parity[cp=4,rank=3]");

  const json& s1 = x["suites"][1];
  EXPECT_EQ(s1["attrs"]["name"], "tiny-e4b");
  EXPECT_EQ(s1["attrs"]["tests"], "6");
  EXPECT_EQ(s1["attrs"]["failures"], "5");
  EXPECT_EQ(s1["attrs"]["errors"], "0");
  const json& nan_case = s1["cases"][0];
  EXPECT_EQ(nan_case["props"]["observed"], "nan");
  ASSERT_TRUE(nan_case["failure"].is_object());
  EXPECT_EQ(nan_case["failure"]["message"], "observed nan is not finite; allowed 1e-05 (fp32_relative)");
  EXPECT_EQ(nan_case["failure"]["type"], "fail");
  EXPECT_EQ(s1["cases"][1]["props"]["observed"], "inf");
  EXPECT_EQ(s1["cases"][2]["props"]["observed"], "-inf");
  EXPECT_EQ(s1["cases"][3]["props"]["threshold"], "inf");
  EXPECT_TRUE(s1["cases"][3]["failure"].is_null());
  const json& count_case = s1["cases"][4];
  EXPECT_EQ(count_case["attrs"]["name"], "cache.build_count[cp=2,rank=1,step=2]");
  EXPECT_EQ(count_case["failure"]["message"], "observed 168 != expected 4 (count)");
  EXPECT_NE(count_case["failure"]["text"].get<std::string>().find("\"first_divergence\""), std::string::npos);
  EXPECT_NE(count_case["failure"]["text"].get<std::string>().find("\"layer\": 3"), std::string::npos);

  const json& s2 = x["suites"][2];
  EXPECT_EQ(s2["attrs"]["errors"], "1");
  EXPECT_EQ(s2["attrs"]["tests"], "2");
  EXPECT_EQ(s2["cases"][1]["attrs"]["name"], "ring.grad_return[cp=4,rank=2]");
  EXPECT_EQ(s2["cases"][1]["error"]["message"], "rank 2 timed out after 60 s");
  EXPECT_EQ(s2["cases"][1]["error"]["type"], "error");

  const json& s3 = x["suites"][3];
  ASSERT_EQ(s3["cases"].size(), 1u);
  EXPECT_EQ(s3["cases"][0]["attrs"]["name"], "case");
  EXPECT_EQ(s3["cases"][0]["error"]["message"], "rank 1 exited with signal 9");

  const json& s4 = x["suites"][4];
  EXPECT_EQ(s4["attrs"]["skipped"], "1");
  EXPECT_EQ(s4["cases"][0]["skipped"]["message"], "requires cuda");
}

TEST(ReportJunit, EscapesMarkupQuotesControlCharsAndBadUtf8) {
  TempDir dir;
  Report r = sample_report();
  r.cases[1].id = "id&<\"'>";
  const std::string path = dir.file("report.xml");
  write_junit_xml(path, r);
  const json x = parse_junit(dir, path);  // fails the test if python cannot parse it
  ASSERT_TRUE(x.is_object());
  const json& s1 = x["suites"][1];
  EXPECT_EQ(s1["attrs"]["name"], "id&<\"'>");
  EXPECT_EQ(s1["cases"][0]["attrs"]["classname"], "cpharness.id&<\"'>");
  // Control characters and invalid bytes become U+FFFD; markup, quotes, tab and newline survive in attributes.
  const std::string want =
      "a<b & c>d \"dq\" 'sq' tab\there\nline2 bell\xef\xbf\xbd esc\xef\xbf\xbd bad\xef\xbf\xbd\xef\xbf\xbd utf8 "
      "\xc3\xbcnic\xc3\xb8" "de";
  EXPECT_EQ(s1["props"]["description"], want);
  EXPECT_EQ(s1["cases"][5]["failure"]["message"], want);
  EXPECT_EQ(s1["cases"][5]["failure"]["text"].get<std::string>().substr(0, want.size()), want);

  EXPECT_EQ(xml_escape("a&b<c>d\"e'f"), "a&amp;b&lt;c&gt;d&quot;e&apos;f");
  EXPECT_EQ(xml_escape("x\ny\tz\r"), "x&#10;y&#9;z&#13;");
  EXPECT_EQ(xml_escape("x\ny", false), "x\ny");
  EXPECT_EQ(xml_escape(std::string("n\0l", 3)), "n\xef\xbf\xbdl");
  EXPECT_EQ(xml_escape("\xed\xa0\x80"), "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");  // a UTF-16 surrogate
  EXPECT_EQ(xml_escape("\xc0\xaf"), "\xef\xbf\xbd\xef\xbf\xbd");                    // overlong '/'
  EXPECT_EQ(xml_escape("\xe2\x82\xac\xf0\x9f\x98\x80"), "\xe2\x82\xac\xf0\x9f\x98\x80");  // euro, emoji

  // JSON: the same invalid bytes are replaced, so dump() never throws; valid text (and control chars) stay.
  EXPECT_EQ(sanitize_utf8("ok\xff\x07\xe2\x82\xac\xed\xa0\x80"), "ok\xef\xbf\xbd\x07\xe2\x82\xac\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");
  EXPECT_NO_THROW(to_json(r).dump());
  EXPECT_NO_THROW(to_json(r.cases[1].checks[5]).dump());
}

TEST(ReportJunit, RepeatedNamesStayDistinctAndRunErrorsShow) {
  TempDir dir;
  Report r = pass_only_report();
  r.cases[0].checks.push_back(r.cases[0].checks[0]);  // the same check twice
  r.error = "cases/bad.json: steps: expected an integer";
  const std::string path = dir.file("report.xml");
  write_junit_xml(path, r);
  const json x = parse_junit(dir, path);
  ASSERT_TRUE(x.is_object());
  EXPECT_EQ(x["attrs"]["errors"], "1");
  EXPECT_EQ(x["suites"][0]["attrs"]["name"], "cpharness");
  EXPECT_EQ(x["suites"][0]["cases"][0]["attrs"]["name"], "run");
  EXPECT_EQ(x["suites"][0]["cases"][0]["error"]["message"], "cases/bad.json: steps: expected an integer");
  const json& s = x["suites"][1];
  EXPECT_EQ(s["cases"][0]["attrs"]["name"], "train.loss_parity[cp=2]");
  EXPECT_EQ(s["cases"][3]["attrs"]["name"], "train.loss_parity[cp=2] #2");
}

// ---- atomic writes ----------------------------------------------------------------------------------------

TEST(ReportAtomicWrite, ReplacesWholeFilesAndLeavesNoTempFiles) {
  TempDir dir;
  const std::string json_path = dir.file("report.json");
  const std::string xml_path = dir.file("report.xml");
  write_text(json_path, "old contents that are longer than nothing");
  write_report_json(json_path, pass_only_report());
  write_junit_xml(xml_path, pass_only_report());
  write_report_json(json_path, sample_report());  // overwrite
  write_junit_xml(xml_path, sample_report());
  EXPECT_EQ(dir.entries(), (std::vector<std::string>{"report.json", "report.xml"}));
  EXPECT_EQ(read_file(json_path),
            to_json(sample_report()).dump(2, ' ', false, nlohmann::ordered_json::error_handler_t::replace) + "\n");
  EXPECT_EQ(read_file(xml_path), to_junit_xml(sample_report()));
  EXPECT_EQ(read_report_json(json_path).cases.size(), 5u);
}

TEST(ReportAtomicWrite, FailuresThrowInputErrorAndCreateNothing) {
  TempDir dir;
  const std::string missing_dir = dir.file("no/such/dir");
  for (const std::string name : {"report.json", "report.xml"}) {
    const std::string path = missing_dir + "/" + name;
    try {
      if (name == "report.json") write_report_json(path, sample_report());
      else write_junit_xml(path, sample_report());
      ADD_FAILURE() << "wrote into a directory that does not exist";
    } catch (const io::InputError& e) {
      EXPECT_EQ(e.file(), path);
      EXPECT_NE(e.reason().find("does not exist"), std::string::npos) << e.what();
    }
  }
  EXPECT_FALSE(fs::exists(dir.file("no")));
  EXPECT_TRUE(dir.entries().empty());

  // The target is a non-empty directory: the rename fails, the directory is untouched, no temp file remains.
  fs::create_directory(dir.file("taken"));
  write_text(dir.file("taken/keep"), "x");
  EXPECT_THROW(write_report_json(dir.file("taken"), sample_report()), io::InputError);
  EXPECT_THROW(write_junit_xml(dir.file("taken"), sample_report()), io::InputError);
  EXPECT_EQ(dir.entries(), std::vector<std::string>{"taken"});
  EXPECT_TRUE(fs::is_directory(dir.file("taken")));
  EXPECT_EQ(read_file(dir.file("taken/keep")), "x");

  // An existing report survives a failed write unchanged (never a partial file).
  const std::string json_path = dir.file("report.json");
  write_report_json(json_path, pass_only_report());
  const std::string before = read_file(json_path);
  ASSERT_EQ(::chmod(dir.path().c_str(), 0500), 0);
  const bool root_ignores_modes = ::access(dir.path().c_str(), W_OK) == 0;
  if (!root_ignores_modes) {
    EXPECT_THROW(write_report_json(json_path, sample_report()), io::InputError);
  }
  ::chmod(dir.path().c_str(), 0700);
  if (!root_ignores_modes) {
    EXPECT_EQ(read_file(json_path), before);
  }
  EXPECT_EQ(dir.entries(), (std::vector<std::string>{"report.json", "taken"}));
}

}  // namespace
}  // namespace cpharness::report
