// A case that names its golden ("golden": "file.h5", beside the case file): `run` adds golden.match for the cp 1
// reference. cp N against cp 1 cannot see a bug both runs share (a mask rule, the RoPE, a norm); the stored
// reference can. A golden that moved fails the case, naming the tensor; a golden of another case, or a missing
// file, is bad input.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <hdf5.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "harness/io/input_error.h"
#include "harness/report/run_dump.h"
#include "harness/runner/case_runner.h"
#include "harness/runner/golden.h"
#include "harness/runner/suite.h"
#include "harness/tests/io_test_util.h"
#include "harness/train/case.h"

namespace cpharness::runner {
namespace {

using io::testing::TempDir;

nlohmann::json case_json(const std::string& extra = "{}") {
  auto j = nlohmann::json::parse(R"({"id": "g", "model": {"preset": "tiny-31b"},
    "data": {"seq_len": 24, "document_lengths": [10, 9], "padding": 5, "seed": 4}, "steps": 2, "cp": [2]})");
  j.merge_patch(nlohmann::json::parse(extra));
  return j;
}

// Writes the case file into `dir` and returns its path.
std::string write_case(const TempDir& dir, const nlohmann::json& j) {
  const std::string path = dir.file("case.json");
  std::ofstream(path) << j.dump(2);
  return path;
}

// The case's golden as `golden record` writes it, with `edit` applied to the dump first.
void record_golden(const std::string& case_path, const std::string& golden_path,
                   const std::function<void(report::RunDump&)>& edit = {}) {
  auto dump = reference_dump(train::load_case(case_path), report::kKindGolden);
  if (edit) edit(dump);
  report::write_run_dump(golden_path, dump);
}

std::vector<const report::CheckResult*> golden_checks(const report::CaseReport& r) {
  std::vector<const report::CheckResult*> out;
  for (auto& k : r.checks)
    if (k.name == "golden.match") out.push_back(&k);
  return out;
}

// The case run as `run` runs it, and its one golden.match (absent, with the failure recorded, when the case errored
// or did not report exactly one).
struct GoldenRun {
  report::CaseReport report;
  std::optional<report::CheckResult> golden;
};

GoldenRun run_with_golden(const std::string& case_path) {
  GoldenRun g{run_case(train::load_case(case_path), SuiteOptions{}), std::nullopt};
  if (g.report.error) {
    ADD_FAILURE() << *g.report.error;
    return g;
  }
  const auto found = golden_checks(g.report);
  if (found.size() != 1) {
    ADD_FAILURE() << found.size() << " golden.match results, expected 1";
    return g;
  }
  g.golden = *found[0];
  return g;
}

// An fp64 golden is judged at the lane's own tolerance: a loss 1e-8 off (one more fp32 rounding in code cp 1 and
// cp N share, as RoPE frequencies computed in fp64 and rounded to fp32: 6e-8) fails there, and fp64 rounding
// (1e-13) does not; the fp32 lane's 1e-5 lets the same 1e-8 through.
TEST(CaseGolden, AnFp64GoldenIsJudgedAtTheLanesOwnTolerance) {
  TempDir dir;
  auto nudge = [](double by) {
    return [by](report::RunDump& d) { d.steps.at(0).loss *= 1.0 + by; };
  };
  struct Want {
    const char* lane;
    double by;
    bool passes;
  };
  for (const Want& w : {Want{"fp64", 1e-8, false}, Want{"fp64", 1e-13, true}, Want{"fp32", 1e-8, true}}) {
    SCOPED_TRACE(std::string(w.lane) + " nudged by " + fmt::format("{:g}", w.by));
    auto j = case_json(R"({"golden": "g.h5"})");
    j["dtype"] = w.lane;
    if (std::string(w.lane) == "fp64") j["tolerances"] = {{"fp32_relative", 1e-10}};
    const auto path = write_case(dir, j);
    record_golden(path, dir.file("g.h5"), nudge(w.by));
    const auto g = run_with_golden(path);
    ASSERT_TRUE(g.golden.has_value());
    EXPECT_EQ(g.golden->status == report::Status::Pass, w.passes) << g.golden->message;
  }
}

// A bf16 step figure's error against the oracle is one draw that swings tenfold between steps: it is scaled by the
// largest that figure showed up to its step, per figure; tensors keep their own; a NaN stays NaN (and fails).
TEST(Bf16GoldenScale, StepFiguresTakeTheirLargestErrorSoFarAndNothingElseMoves) {
  const double nan = std::nan("");
  const auto scaled = per_step_figures_at_their_largest({{"steps/0/grad_norm", 3.7e-3}, {"steps/1/grad_norm", 1.0e-2},
                                                          {"steps/2/grad_norm", 3.1e-4}, {"steps/10/grad_norm", 2e-3},
                                                          {"steps/0/loss", 1e-3}, {"steps/1/loss", nan}, {"steps/2/loss", 5e-4},
                                                          {"steps/0/grads/w", 0.05}, {"steps/1/param_norm", 7e-4}});
  EXPECT_EQ(scaled.at("steps/0/grad_norm"), 3.7e-3);
  EXPECT_EQ(scaled.at("steps/1/grad_norm"), 1.0e-2);
  EXPECT_EQ(scaled.at("steps/2/grad_norm"), 1.0e-2);   // the lucky draw
  EXPECT_EQ(scaled.at("steps/10/grad_norm"), 1.0e-2);  // steps in numeric order, not as strings sort
  EXPECT_TRUE(std::isnan(scaled.at("steps/1/loss")));
  EXPECT_EQ(scaled.at("steps/2/loss"), 1e-3);          // the loss's own history, not the grad norm's
  EXPECT_EQ(scaled.at("steps/0/grads/w"), 0.05);
  EXPECT_EQ(scaled.at("steps/1/param_norm"), 7e-4);
  EXPECT_EQ(scaled.size(), 9u);
}

TEST(CaseGolden, ACaseThatNamesItsGoldenIsCheckedAgainstItByRun) {
  TempDir dir;
  const std::string case_path = write_case(dir, case_json(R"({"golden": "g.h5"})"));
  record_golden(case_path, dir.file("g.h5"));
  const auto g = run_with_golden(case_path);
  ASSERT_TRUE(g.golden);
  EXPECT_EQ(g.golden->status, report::Status::Pass) << g.golden->message;
  EXPECT_EQ(g.golden->cp, 1);
  EXPECT_EQ(g.report.status(), report::Status::Pass);

  // Without the key there is no golden.match (nothing to compare with), and the case's hash ignores the key, so
  // the same golden still names the case.
  const auto plain = run_case(train::case_from_json(case_json(), case_path), SuiteOptions{});
  EXPECT_TRUE(golden_checks(plain).empty());
  EXPECT_EQ(case_hash(train::case_from_json(case_json(), case_path)), case_hash(train::load_case(case_path)));
}

// Under the chunked loss no [S, V] logits exist: the golden holds everything else, and run matches it.
TEST(CaseGolden, AChunkedLossCaseIsRecordedWithoutLogitsAndMatched) {
  TempDir dir;
  const std::string case_path = write_case(dir, case_json(R"({"golden": "g.h5", "loss_chunk_tokens": 7})"));
  record_golden(case_path, dir.file("g.h5"));
  const auto stored = report::read_run_dump(dir.file("g.h5"));
  ASSERT_EQ(stored.steps.size(), 2u);
  EXPECT_FALSE(stored.steps.at(0).logits.defined());
  EXPECT_FALSE(stored.steps.at(0).grads.empty());
  const auto g = run_with_golden(case_path);
  ASSERT_TRUE(g.golden);
  EXPECT_EQ(g.golden->status, report::Status::Pass) << g.golden->message;
}

// A CP step that forms whole logits although the case asks for the chunked loss gives the same numbers (only the
// summation order moves), so no parity check can see it: the run refuses it instead of spending the memory unseen.
TEST(CaseGolden, CandidatesThatFormWholeLogitsUnderTheChunkedLossAreAnError) {
  auto c = train::case_from_json(case_json(R"({"loss_chunk_tokens": 7})"), "g.json");
  RunOptions options;
  EXPECT_NO_THROW(run_cp(c, train::DtypeLane::kFp32, 2, options));
  options.step_mutation = StepMutation::kChunkedLossIgnored;
  try {
    run_cp(c, train::DtypeLane::kFp32, 2, options);
    ADD_FAILURE() << "accepted";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("the chunked loss was not applied"), std::string::npos) << e.what();
  }
}

// What a bug shared by cp 1 and cp N looks like from the golden's side: the stored reference differs from the run.
// cp N still agrees with cp 1, so golden.match is the one check that fails, and it names the tensor.
TEST(CaseGolden, AGoldenTheRunNoLongerMatchesFailsTheCaseNamingTheTensor) {
  TempDir dir;
  const std::string case_path = write_case(dir, case_json(R"({"golden": "g.h5"})"));
  record_golden(case_path, dir.file("g.h5"), [](report::RunDump& d) { d.steps.at(1).loss *= 1.0 + 1e-4; });
  const auto g = run_with_golden(case_path);
  ASSERT_TRUE(g.golden);
  EXPECT_EQ(g.golden->status, report::Status::Fail);
  EXPECT_NE(g.golden->message.find("steps/1/loss"), std::string::npos) << g.golden->message;
  EXPECT_EQ(g.report.status(), report::Status::Fail);
  for (auto& k : g.report.checks)
    if (k.name.rfind("train.", 0) == 0) EXPECT_EQ(k.status, report::Status::Pass) << k.name << ": " << k.message;

  record_golden(case_path, dir.file("g.h5"), [](report::RunDump& d) { d.steps.at(0).logits.mul_(1.001); });
  EXPECT_EQ(run_case(train::load_case(case_path), SuiteOptions{}).status(), report::Status::Fail);
}

// A tensor the run records and the golden lacks is no match: golden.match counts it and fails, naming it.
TEST(CaseGolden, AGoldenLackingATensorTheRunRecordsFails) {
  TempDir dir;
  const std::string case_path = write_case(dir, case_json(R"({"golden": "g.h5"})"));
  std::string dropped;
  record_golden(case_path, dir.file("g.h5"), [&](report::RunDump& d) {
    auto& grads = d.steps.at(0).grads;
    dropped = std::prev(grads.end())->first;
    grads.erase(std::prev(grads.end()));
  });
  const auto g = run_with_golden(case_path);
  ASSERT_TRUE(g.golden);
  EXPECT_EQ(g.golden->status, report::Status::Fail) << g.golden->message;
  EXPECT_GE(g.golden->observed, 1.0);
  EXPECT_NE(g.golden->message.find(dropped), std::string::npos) << g.golden->message;
}

// The bf16 lane judges the golden against the case's fp32 oracle (the suite's own oracle run is reused).
TEST(CaseGolden, ABf16CaseMatchesItsGoldenAgainstTheOracle) {
  TempDir dir;
  const std::string case_path = write_case(dir, case_json(R"({"golden": "g.h5", "dtype": "bf16"})"));
  record_golden(case_path, dir.file("g.h5"));
  const auto g = run_with_golden(case_path);
  ASSERT_TRUE(g.golden);
  EXPECT_EQ(g.golden->status, report::Status::Pass) << g.golden->message;
  EXPECT_EQ(g.golden->policy, report::Policy::Count);

  // Every logit 50 % off: far beyond k x the run's own error against the oracle (bf16 logits here are ~3 % from
  // fp32, so the lane cannot tell 5 % from rounding; a golden that moved by that much passes by design).
  record_golden(case_path, dir.file("g.h5"), [](report::RunDump& d) { d.steps.at(0).logits.mul_(1.5); });
  const auto moved = run_with_golden(case_path);
  ASSERT_TRUE(moved.golden);
  EXPECT_EQ(moved.golden->status, report::Status::Fail);
}

// The bf16 floor of golden.match, from its definition (golden.cpp, judge_bf16_against_oracle): an entry passes while
// neither the golden nor the run is more than bf16_k x the other's error against the fp32 oracle + max(bf16_floor,
// 2^-8). With the defaults (k 2, bf16_floor 1e-3) the floor is 2^-8 = 0.39 %: a golden loss 0.3 % beyond 2 x the
// run's own error (its largest up to that step) passes, 0.5 % or 3 % beyond fails. Guards the floor itself: at 2^-4 (6.25 %) a golden loss that
// moved by 3 % past the lane's error passed.
TEST(CaseGolden, ABf16GoldenMayExceedKTimesTheRunsErrorByOneBf16RoundingAndNoMore) {
  TempDir dir;
  const std::string case_path = write_case(dir, case_json(R"({"golden": "g.h5", "dtype": "bf16"})"));
  const auto c = train::load_case(case_path);
  ASSERT_EQ(c.tolerances.bf16_k, 2.0);
  ASSERT_LT(c.tolerances.bf16_floor, 1.0 / 256);
  auto oracle_case = c;
  oracle_case.dtype = train::DtypeLane::kFp32;
  const auto run = run_reference(c, train::DtypeLane::kBf16), oracle = run_reference(oracle_case, train::DtypeLane::kFp32);
  const double truth = oracle.steps.at(1).loss;
  // A step's loss is scaled by the largest error the loss showed up to that step (per_step_figures_at_their_largest).
  double run_error = 0;
  for (size_t s = 0; s <= 1; ++s)
    run_error = std::max(run_error, std::abs(run.steps.at(s).loss - oracle.steps.at(s).loss) / std::abs(oracle.steps.at(s).loss));
  // The golden's step-1 loss `beyond` past 2 x the run's error from the oracle; every other entry is the run's own.
  auto verdict = [&](double beyond) {
    auto golden = reference_dump(c, run, report::kKindGolden);
    golden.steps.at(1).loss = truth * (1 + 2 * run_error + beyond);
    report::write_run_dump(dir.file("g.h5"), golden);
    return verify_golden(c, dir.file("g.h5"), nullptr, &run, &oracle);
  };
  EXPECT_EQ(verdict(0.0).status, report::Status::Pass) << verdict(0.0).message;
  EXPECT_EQ(verdict(0.003).status, report::Status::Pass) << verdict(0.003).message;  // 0.3 % < 2^-8
  const auto just_past = verdict(0.005);                                               // 0.5 % > 2^-8
  EXPECT_EQ(just_past.status, report::Status::Fail);
  EXPECT_NE(just_past.message.find("steps/1/loss"), std::string::npos) << just_past.message;
  EXPECT_EQ(verdict(0.03).status, report::Status::Fail);
}

// A missing golden is refused before any case runs (run and bisect ask unsupported_configuration first); the case
// still loads, so that `golden record` can write the golden it names.
TEST(CaseGolden, AMissingOrForeignGoldenIsBadInput) {
  TempDir dir;
  const std::string case_path = write_case(dir, case_json(R"({"golden": "missing.h5"})"));
  const auto why = unsupported_configuration(train::load_case(case_path), SuiteOptions{});
  ASSERT_TRUE(why);
  EXPECT_NE(why->find("golden: no such file: " + dir.file("missing.h5")), std::string::npos) << *why;
  EXPECT_NE(why->find("golden record"), std::string::npos) << *why;
  EXPECT_THROW((void)train::case_from_json(case_json(R"({"golden": ""})"), case_path), io::InputError);
  EXPECT_THROW((void)train::case_from_json(case_json(R"({"golden": 3})"), case_path), io::InputError);

  // A golden recorded from another version of the case (another data seed): refused before any work (the run used
  // to train the reference to find out), and the case errors with no verdict.
  const std::string other_path = dir.file("other.json");
  std::ofstream(other_path) << case_json(R"({"data": {"seed": 5}})").dump();
  record_golden(other_path, dir.file("g.h5"));
  write_case(dir, case_json(R"({"golden": "g.h5"})"));
  const auto before = unsupported_configuration(train::load_case(case_path), SuiteOptions{});
  ASSERT_TRUE(before);
  EXPECT_NE(before->find("another version of case 'g'"), std::string::npos) << *before;
  const auto r = run_case(train::load_case(case_path), SuiteOptions{});
  ASSERT_TRUE(r.error);
  EXPECT_NE(r.error->find("another version of case 'g'"), std::string::npos) << *r.error;
  EXPECT_TRUE(r.checks.empty());
  // A directory, or a path that loops, is named for what it is (both were "no such file").
  std::filesystem::create_directories(dir.file("a-dir.h5"));
  std::filesystem::create_symlink(dir.file("loop.h5"), dir.file("loop.h5"));
  for (const auto& [golden, says] : std::vector<std::pair<std::string, std::string>>{
           {"a-dir.h5", "is not a regular file"}, {"loop.h5", "symbolic links"}}) {
    write_case(dir, case_json(nlohmann::json{{"golden", golden}}.dump()));
    const auto why_not = unsupported_configuration(train::load_case(case_path), SuiteOptions{});
    ASSERT_TRUE(why_not) << golden;
    EXPECT_NE(why_not->find(says), std::string::npos) << *why_not;
  }
}

// A golden whose header and provenance are sound but whose content is not (here a dataset the layout does not
// allow, as a writer's typo or a damaged object would leave) is refused before any work, naming the object; the
// run used to train the whole reference first and find it at the comparison.
TEST(CaseGolden, AGoldenDamagedPastItsHeaderIsRefusedBeforeAnyWork) {
  TempDir dir;
  const std::string case_path = write_case(dir, case_json(R"({"golden": "g.h5"})"));
  record_golden(case_path, dir.file("g.h5"));
  ASSERT_FALSE(unsupported_configuration(train::load_case(case_path), SuiteOptions{}));
  {
    const hid_t file = H5Fopen(dir.file("g.h5").c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    ASSERT_GE(file, 0);
    const hid_t space = H5Screate(H5S_SCALAR);
    const hid_t set = H5Dcreate2(file, "/steps/1/lozz", H5T_NATIVE_DOUBLE, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    ASSERT_GE(set, 0);
    H5Dclose(set);
    H5Sclose(space);
    H5Fclose(file);
  }
  ASSERT_NO_THROW(report::read_run_dump_provenance(dir.file("g.h5")));  // the header still reads
  const auto why = unsupported_configuration(train::load_case(case_path), SuiteOptions{});
  ASSERT_TRUE(why);
  EXPECT_NE(why->find("/steps/1/lozz"), std::string::npos) << *why;
  const auto r = run_case(train::load_case(case_path), SuiteOptions{});
  ASSERT_TRUE(r.error);
  EXPECT_TRUE(r.checks.empty());
}

}  // namespace
}  // namespace cpharness::runner
