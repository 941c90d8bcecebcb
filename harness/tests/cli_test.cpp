// The cpharness binary end to end: exit codes and messages for good and bad input.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include <nlohmann/json.hpp>

#include "harness/report/json_report.h"
#include "harness/report/run_dump.h"
#include "harness/tests/run_command.h"
#include "harness/train/device.h"

namespace {

namespace fs = std::filesystem;

using Result = cpharness::testing::CommandResult;

// `env`: VAR=value assignments put before the command.
Result run_cli(const std::string& args, const std::string& env = "") {
  return cpharness::testing::run_command(env + " " + std::string(CPHARNESS_BINARY) + " " + args);
}

class CliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("cpharness_cli_" + std::to_string(::getpid()) + "_" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string write(const std::string& name, const std::string& text) {
    auto p = dir_ / name;
    std::ofstream(p) << text;
    return p.string();
  }
  fs::path dir_;
};

// Validates `out`/report.json against the committed schema (Debian's python3-jsonschema) and parses
// `out`/report.xml with a real XML parser.
void expect_valid_outputs(const fs::path& out) {
  const std::string schema = std::string(CPHARNESS_SOURCE_DIR) + "/reports/schema/report.schema.json";
  const std::string validate =
      "/usr/bin/python3 -c \"import json,sys,jsonschema; s=json.load(open(sys.argv[1])); "
      "jsonschema.Draft202012Validator(s).validate(json.load(open(sys.argv[2]))); "
      "import xml.etree.ElementTree as E; E.parse(sys.argv[3])\" " +
      schema + " " + (out / "report.json").string() + " " + (out / "report.xml").string();
  const auto validated = cpharness::testing::run_command(validate);
  EXPECT_EQ(validated.exit_code, 0) << validated.output;
}

constexpr const char* kGoodCase = R"({"id": "t", "model": {"preset": "tiny-31b"},
  "data": {"seq_len": 24, "padding": 4, "seed": 1}, "steps": 2})";

TEST_F(CliTest, RunPrintsPerStepLossAndWritesOutput) {
  auto c = write("good.json", kGoodCase);
  auto out = dir_ / "out";
  auto r = run_cli("run " + c + " --cp 2 --out " + out.string());
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("[t] cp1 fp32 step 1: loss"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("[t] cp2 fp32 step 1: loss"), std::string::npos) << r.output;
  EXPECT_TRUE(fs::exists(out / "report.json"));
  EXPECT_TRUE(fs::exists(out / "report.xml"));
  expect_valid_outputs(out);
}

// --out writes the HTML page beside report.json; `render` makes it again from the JSON; a missing report is exit 2.
nlohmann::json read_json(const fs::path& p);

// The page's block masks and expected cache counts come from the run: one tile grid per layer geometry, rank and
// ring chunk (tiny-31b: sliding with vision groups, and full), drawn on the page.
TEST_F(CliTest, OutWritesTheHtmlPageAndRenderRemakesIt) {
  auto c = write("good.json", R"({"id": "t", "model": {"preset": "tiny-31b"}, "block_size": 4,
    "data": {"seq_len": 24, "padding": 4, "seed": 1}, "steps": 2})");
  auto out = dir_ / "out";
  auto r = run_cli("run " + c + " --cp 2 --out " + out.string());
  ASSERT_EQ(r.exit_code, 0) << r.output;
  ASSERT_TRUE(fs::exists(out / "report.html")) << r.output;
  const auto report = read_json(out / "report.json");
  const auto& grids = report["cases"][0]["block_masks"]["2"];
  ASSERT_EQ(grids.size(), 8u) << "2 layer geometries x 2 ranks x 2 chunks";
  for (auto& g : grids) {
    EXPECT_EQ(g["q_blocks"], 3);  // 12 tokens per rank in blocks of 4
    EXPECT_EQ(g["kv_blocks"], 3);
    // A rank's own chunk is causal: its first q block against its first kv block is partial, its last kv block
    // is empty for the first q block.
    if (g["rank"] == g["chunk_owner"]) EXPECT_EQ(g["tiles"][0].get<std::string>().substr(1), "EE") << g.dump();
    if (g["rank"] == 0 && g["chunk_owner"] == 1) EXPECT_EQ(g["tiles"], nlohmann::json({"EEE", "EEE", "EEE"})) << g.dump();
  }
  const auto& expected = report["cases"][0]["block_mask_cache_expected"]["2"];
  // tiny-31b: 60 layers x 2 chunks x (forward, backward replay) lookups; 2 geometries x 2 kv offsets built.
  EXPECT_EQ(expected, nlohmann::json({{"lookups", 240}, {"builds", 4}, {"hits", 236}, {"resets", 1}, {"builds_uncached", 240}}));
  {
    std::ifstream in(out / "report.html");
    const std::string page((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    size_t tiles = 0;
    for (size_t at = page.find("<svg class=\"tiles\""); at != std::string::npos; at = page.find("<svg class=\"tiles\"", at + 1)) ++tiles;
    EXPECT_EQ(tiles, 8u);
    EXPECT_EQ(page.find("block-mask tile grids: not in this report"), std::string::npos);
  }
  auto again = run_cli("render " + (out / "report.json").string() + " -o " + (dir_ / "again.html").string());
  EXPECT_EQ(again.exit_code, 0) << again.output;
  std::ifstream in(dir_ / "again.html");
  const std::string html((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_NE(html.find("<svg"), std::string::npos);
  EXPECT_NE(html.find(">t<"), std::string::npos) << "the case id";
  EXPECT_EQ(run_cli("render " + (dir_ / "missing.json").string() + " -o " + (dir_ / "x.html").string()).exit_code, 2);
}

TEST_F(CliTest, MalformedJsonIsExit2NamingTheFile) {
  auto c = write("broken.json", R"({"id": "t", "model": )");
  auto r = run_cli("run " + c + " --out " + (dir_ / "out").string());
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.output.find("broken.json"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("malformed JSON"), std::string::npos) << r.output;
  // An error report, never a partial or passing one.
  std::ifstream in(dir_ / "out" / "report.json");
  ASSERT_TRUE(in) << "the error report is written";
  auto j = nlohmann::json::parse(in);
  EXPECT_EQ(j["status"], "error");
  EXPECT_TRUE(j["cases"].empty());
}

TEST_F(CliTest, UnknownPresetIsExit2NamingTheField) {
  auto c = write("p.json", R"({"id": "t", "model": {"preset": "e3b"}, "data": {"seq_len": 8}})");
  auto r = run_cli("run " + c);
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.output.find("model.preset"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("e3b"), std::string::npos) << r.output;
}

TEST_F(CliTest, UnknownKeyAndWrongTypeAreExit2) {
  auto a = write("a.json", R"({"id": "t", "model": {"preset": "tiny-e2b"}, "data": {"seq_len": 8}, "stpes": 3})");
  auto r = run_cli("run " + a);
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.output.find("stpes: unknown key"), std::string::npos) << r.output;
  auto b = write("b.json", R"({"id": "t", "model": {"preset": "tiny-e2b"}, "data": {"seq_len": "8"}})");
  r = run_cli("run " + b);
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.output.find("data.seq_len: wrong type"), std::string::npos) << r.output;
  auto d = write("d.json", R"({"id": "t", "model": {"preset": "tiny-e2b"}, "data": {"seq_len": 8, "document_lengths": [3, 3]}})");
  r = run_cli("run " + d);
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.output.find("document_lengths"), std::string::npos) << r.output;
}

// A case's model.config_file is read beside the case; a missing or malformed one is exit 2 naming the case's key
// and the file.
TEST_F(CliTest, ABadConfigFileIsExit2NamingTheKeyAndTheFile) {
  auto missing = write("missing.json", R"({"id": "x", "model": {"config_file": "nope/config.json"}, "data": {"seq_len": 8}})");
  auto r = run_cli("run " + missing);
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("model.config_file"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find((dir_ / "nope/config.json").string()), std::string::npos) << r.output;
  write("broken-config.json", "{ not json");
  auto broken = write("broken.json", R"({"id": "x", "model": {"config_file": "broken-config.json"}, "data": {"seq_len": 8}})");
  r = run_cli("run " + broken);
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("malformed JSON"), std::string::npos) << r.output;
}

// nlohmann keeps the last of two equal keys silently: a case or config.json that says two things is refused,
// naming the key's path, before any work.
TEST_F(CliTest, AKeyGivenTwiceIsExit2NamingItsPath) {
  auto c = write("twice.json", R"({"id": "t", "steps": 1, "model": {"preset": "tiny-e2b"}, "data": {"seq_len": 8}, "steps": 3})");
  auto r = run_cli("run " + c + " --out " + (dir_ / "out").string());
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("twice.json: steps: given twice"), std::string::npos) << r.output;
  std::ifstream in(dir_ / "out" / "report.json");
  ASSERT_TRUE(in) << "the error report is written";
  EXPECT_EQ(nlohmann::json::parse(in)["status"], "error");
  write("config-twice.json", R"({"model_type": "gemma4", "text_config": {"model_type": "gemma4_text", "sliding_window": 4, "sliding_window": 8}})");
  auto d = write("d.json", R"({"id": "x", "model": {"config_file": "config-twice.json"}, "data": {"seq_len": 8}})");
  r = run_cli("run " + d);
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("text_config.sliding_window: given twice"), std::string::npos) << r.output;
}

// Settings that said two things, or meant nothing, and were resolved silently: each is exit 2 naming it.
TEST_F(CliTest, SettingsThatWereResolvedSilentlyAreExit2) {
  auto c = write("g.json", kGoodCase);
  for (const char* threads : {"abc", "0", "-1", "99999", "1e3"}) {
    auto r = run_cli("list " + c, std::string("CPHARNESS_INTRA_OP_THREADS=") + threads);
    EXPECT_EQ(r.exit_code, 2) << threads << r.output;
    EXPECT_NE(r.output.find("CPHARNESS_INTRA_OP_THREADS"), std::string::npos) << r.output;
  }
  EXPECT_EQ(run_cli("list " + c, "CPHARNESS_INTRA_OP_THREADS=2").exit_code, 0);
  for (const char* flag : {"--timeout 1e10", "--timeout 1e300", "--job-timeout 1e300"}) {  // overflowed to "timed out"
    auto r = run_cli("run " + c + " " + flag);
    EXPECT_EQ(r.exit_code, 2) << flag << r.output;
    EXPECT_NE(r.output.find("at most a year"), std::string::npos) << r.output;
  }
  auto r = run_cli("run " + c + " --comm mpi --nproc 3 --cp 2");  // ran cp 3 without a word
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("--cp 2 with --comm mpi --nproc 3"), std::string::npos) << r.output;
  auto both = write("both.json", R"({"id": "t", "model": {"preset": "tiny-31b"}, "data": {"seq_len": 24},
    "weights": {"init_seed": 5, "checkpoint": "ckpt"}})");
  r = run_cli("run " + both);
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("weights: give init_seed or checkpoint, not both"), std::string::npos) << r.output;
  const auto hf = std::string(CPHARNESS_SOURCE_DIR) + "/golden/hf-5.24.0";
  r = run_cli("hf-parity " + hf + " " + hf + "/tiny-31b-hf.h5 --cp 1");  // a file and its own directory
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("given twice"), std::string::npos) << r.output;
  r = run_cli("selftest --only ring_rotated_wrong_way --only ring_rotated_wrong_way");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("--only lists ring_rotated_wrong_way twice"), std::string::npos) << r.output;
  // compare: a category given twice; no entry in common is never a pass, even with missing:ok.
  const auto golden = (dir_ / "a.h5").string();
  ASSERT_EQ(run_cli("golden record " + c + " -o " + golden).exit_code, 0);
  r = run_cli("compare " + golden + " " + golden + " --policy fp32,grads:1e-4,grads:1e-3");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("grads is given twice"), std::string::npos) << r.output;
  // A renderer that exits 0 without writing the page has not written it.
  r = run_cli("run " + c + " --html " + (dir_ / "p.html").string(), "CPHARNESS_PYTHON=/bin/true");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("exited 0 without writing it"), std::string::npos) << r.output;
}

TEST_F(CliTest, UsageErrorsAreExit2) {
  EXPECT_EQ(run_cli("").exit_code, 2);
  for (const std::string verb : {"frobnicate", "golden frob"}) {  // named, not "a subcommand is required"
    auto r = run_cli(verb);
    EXPECT_EQ(r.exit_code, 2) << r.output;
    EXPECT_NE(r.output.find("unknown verb '" + verb.substr(verb.rfind(' ') + 1) + "'"), std::string::npos) << r.output;
  }
  EXPECT_EQ(run_cli("run").exit_code, 2);
  EXPECT_EQ(run_cli("run " + write("g.json", kGoodCase) + " --cp x").exit_code, 2);
  for (const char* t : {"nan", "-1", "0", "inf", "5s", "0x1e", "infinity", "1e", "."}) {
    auto r = run_cli("run " + write("g.json", kGoodCase) + " --timeout " + t);
    EXPECT_EQ(r.exit_code, 2) << t << ": " << r.output;
    EXPECT_NE(r.output.find("--timeout"), std::string::npos) << r.output;
  }
  EXPECT_EQ(run_cli("bisect").exit_code, 125);  // git bisect's "cannot test", never 2
}

TEST_F(CliTest, CasesRequiringCudaAreSkippedWithTheReason) {
  auto c = write("gpu.json", R"({"id": "g", "model": {"preset": "e2b"}, "data": {"seq_len": 8}, "requires": ["cuda"]})");
  auto r = run_cli("run " + c + " --out " + (dir_ / "out").string());
  // Nothing ran is not a pass: a GPU job whose devices vanished must not stay green.
  EXPECT_EQ(r.exit_code, 3) << r.output;
  EXPECT_NE(r.output.find("skipped: requires cuda"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("no check ran"), std::string::npos) << r.output;
  EXPECT_EQ(read_json(dir_ / "out" / "report.json")["status"], "skipped");
  EXPECT_EQ(run_cli("run " + c + " --allow-nothing-ran").exit_code, 0);
  // One case that ran is enough for the run's own verdict.
  EXPECT_EQ(run_cli("run " + c + " " + write("ran.json", kGoodCase) + " --cp 2").exit_code, 0);
}

nlohmann::json read_json(const fs::path& p) {
  std::ifstream in(p);
  return nlohmann::json::parse(in);
}

TEST_F(CliTest, GoldenRecordRefusesToOverwriteWithoutForce) {
  auto c = write("g.json", kGoodCase);
  const auto golden = (dir_ / "g.h5").string();
  ASSERT_EQ(run_cli("golden record " + c + " -o " + golden).exit_code, 0);
  const auto before = fs::last_write_time(golden);
  auto r = run_cli("golden record " + c + " -o " + golden);
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.output.find("--force"), std::string::npos) << r.output;
  EXPECT_EQ(fs::last_write_time(golden), before) << "the golden was rewritten";
  EXPECT_EQ(run_cli("golden record " + c + " -o " + golden + " --force").exit_code, 0);
}

// golden.match's known-bad mutant: a golden whose step-1 loss moved by 1e-4 relative must fail verification.
TEST_F(CliTest, GoldenVerifyPassesAndCatchesAMovedLoss) {
  auto c = write("g.json", kGoodCase);
  const auto golden = (dir_ / "g.h5").string();
  ASSERT_EQ(run_cli("golden record " + c + " -o " + golden).exit_code, 0);
  auto ok = run_cli("golden verify " + c + " " + golden + " --out " + (dir_ / "ok").string());
  EXPECT_EQ(ok.exit_code, 0) << ok.output;
  EXPECT_EQ(read_json(dir_ / "ok" / "report.json")["status"], "pass");

  auto dump = cpharness::report::read_run_dump(golden);
  ASSERT_TRUE(dump.steps.count(1));
  dump.steps[1].loss *= 1 + 1e-4;
  const auto moved = (dir_ / "moved.h5").string();
  cpharness::report::write_run_dump(moved, dump);
  auto bad = run_cli("golden verify " + c + " " + moved + " --out " + (dir_ / "bad").string());
  EXPECT_EQ(bad.exit_code, 1) << bad.output;
  auto j = read_json(dir_ / "bad" / "report.json");
  EXPECT_EQ(j["status"], "fail");
  EXPECT_EQ(j["cases"][0]["checks"][0]["name"], "golden.match");
  EXPECT_EQ(j["cases"][0]["checks"][0]["status"], "fail");
}

// bf16 goldens are judged against the fp32 oracle (their own bf16 error sets the bound): a golden recorded here
// passes, one whose gradient moved far beyond its own bf16 error fails.
TEST_F(CliTest, Bf16GoldenVerifyIsOracleRelativeAndCatchesAMovedGradient) {
  auto c = write("b.json", R"({"id": "b", "model": {"preset": "tiny-e4b"}, "dtype": "bf16",
    "data": {"seq_len": 24, "padding": 4, "seed": 1}, "steps": 2, "tolerances": {"bf16_k": 3}})");
  const auto golden = (dir_ / "b.h5").string();
  ASSERT_EQ(run_cli("golden record " + c + " -o " + golden).exit_code, 0);
  auto ok = run_cli("golden verify " + c + " " + golden);
  EXPECT_EQ(ok.exit_code, 0) << ok.output;
  auto dump = cpharness::report::read_run_dump(golden);
  auto& grads = dump.steps.at(0).grads;
  ASSERT_TRUE(grads.count("embed_tokens.weight"));
  grads["embed_tokens.weight"] = grads["embed_tokens.weight"] * 1.5;
  const auto moved = (dir_ / "moved.h5").string();
  cpharness::report::write_run_dump(moved, dump);
  auto bad = run_cli("golden verify " + c + " " + moved);
  EXPECT_EQ(bad.exit_code, 1) << bad.output;
  EXPECT_NE(bad.output.find("error against today's fp32 oracle: run"), std::string::npos) << bad.output;
  EXPECT_NE(bad.output.find("computes something else than the build that recorded the golden"), std::string::npos) << bad.output;
  // A step-1 loss moved by 2.5 %: bf16's own loss error here is ~1e-3, so the bound (k x that + one bf16 rounding,
  // 2^-8) is under 1 %, and this fails. A floor of 2^-4 (6 %) would have passed it.
  dump = cpharness::report::read_run_dump(golden);
  dump.steps.at(1).loss *= 1.025;
  cpharness::report::write_run_dump(moved, dump);
  bad = run_cli("golden verify " + c + " " + moved);
  EXPECT_EQ(bad.exit_code, 1) << bad.output;
  EXPECT_NE(bad.output.find("steps/1/loss"), std::string::npos) << bad.output;
}

// `git bisect run` reads 0 as good, 1 as bad and 125 as "cannot test this commit".
TEST_F(CliTest, BisectExitCodesAreGoodBadAndSkip) {
  auto c = write("g.json", kGoodCase);
  const auto golden = (dir_ / "g.h5").string();
  ASSERT_EQ(run_cli("golden record " + c + " -o " + golden).exit_code, 0);
  EXPECT_EQ(run_cli("bisect " + c + " --golden " + golden).exit_code, 0);
  auto dump = cpharness::report::read_run_dump(golden);
  dump.steps[0].loss *= 1 + 1e-3;
  const auto moved = (dir_ / "moved.h5").string();
  cpharness::report::write_run_dump(moved, dump);
  EXPECT_EQ(run_cli("bisect " + c + " --golden " + moved).exit_code, 1);
  EXPECT_EQ(run_cli("bisect " + c + " --golden " + (dir_ / "missing.h5").string()).exit_code, 125);
}

// bisect judges what run judges: a CP regression that the cp 1 reference cannot show (gradients averaged over the
// ranks, planted through CPHARNESS_PLANT_BUG) is bad, the good code is good, a case that cannot run is skip.
TEST_F(CliTest, BisectJudgesTheCasesChecksAtItsCpSizes) {
  auto c = write("g.json", R"({"id": "t", "model": {"preset": "tiny-31b"}, "data": {"seq_len": 24, "padding": 4, "seed": 1},
                              "steps": 2, "cp": [2], "checks": ["train."]})");
  EXPECT_EQ(run_cli("bisect " + c).exit_code, 0);
  auto r = run_cli("bisect " + c, "CPHARNESS_PLANT_BUG=cp_gradients_averaged");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("train.grad_norm_parity cp 2"), std::string::npos) << r.output;
  auto cuda = write("cuda.json", R"({"id": "t", "model": {"preset": "tiny-31b"}, "data": {"seq_len": 24}, "steps": 2,
                                     "device": "cuda", "requires": ["cuda"]})");
  if (!cpharness::train::cuda_available()) EXPECT_EQ(run_cli("bisect " + cuda).exit_code, 125);
  EXPECT_EQ(run_cli("bisect " + c, "CPHARNESS_PLANT_BUG=no_such_bug").exit_code, 125);
}

// The README's recipe end to end: a scratch repository with a good commit, a neutral one, the CP regression and
// another neutral one; `git bisect run` with `cpharness bisect CASE --golden G` names the regression.
TEST_F(CliTest, GitBisectRunNamesTheCommitThatBrokeCp) {
  if (cpharness::testing::run_command("git --version").exit_code != 0) GTEST_SKIP() << "git is not installed";
  const auto repo = dir_ / "repo";
  fs::create_directories(repo);
  const std::string git = "git -C " + repo.string() + " -c user.name=t -c user.email=t@example.invalid ";
  std::ofstream(repo / "case.json") << R"({"id": "t", "model": {"preset": "tiny-31b"}, "data": {"seq_len": 24, "padding": 4, "seed": 1},
                                         "steps": 2, "cp": [2], "checks": ["train."]})";
  const auto golden = (dir_ / "good.h5").string();  // outside the work tree, as the README says
  ASSERT_EQ(run_cli("golden record " + (repo / "case.json").string() + " -o " + golden).exit_code, 0);
  // The "code" of this repository: which known bug (if any) the build carries.
  std::ofstream(repo / "check.sh") << "#!/bin/sh\n[ -f planted ] && export CPHARNESS_PLANT_BUG=$(cat planted)\nexec "
                                    << CPHARNESS_BINARY << " bisect case.json --golden " << golden << "\n";
  auto commit = [&](const std::string& msg) {
    return cpharness::testing::run_command(git + "add -A && " + git + "commit -q -m '" + msg + "'").exit_code;
  };
  ASSERT_EQ(cpharness::testing::run_command(git + "init -q").exit_code, 0);
  std::ofstream(repo / "notes.txt") << "v1\n";
  ASSERT_EQ(commit("good"), 0);
  const auto good = cpharness::testing::run_command(git + "rev-parse HEAD").output.substr(0, 40);
  std::ofstream(repo / "notes.txt") << "v2\n";
  ASSERT_EQ(commit("neutral"), 0);
  std::ofstream(repo / "planted") << "cp_gradients_averaged";
  ASSERT_EQ(commit("regression: gradients averaged over the ranks"), 0);
  const auto bad = cpharness::testing::run_command(git + "rev-parse HEAD").output.substr(0, 40);
  std::ofstream(repo / "notes.txt") << "v3\n";
  ASSERT_EQ(commit("neutral after"), 0);
  auto r = cpharness::testing::run_command("cd " + repo.string() + " && git bisect start HEAD " + good +
                                           " >/dev/null && git bisect run sh check.sh");
  EXPECT_NE(r.output.find(bad + " is the first bad commit"), std::string::npos) << r.output;
}

TEST_F(CliTest, MissingOrCorruptGoldenIsExit2WithAnErrorReport) {
  auto c = write("g.json", kGoodCase);
  auto missing = run_cli("golden verify " + c + " " + (dir_ / "nope.h5").string() + " --out " + (dir_ / "m").string());
  EXPECT_EQ(missing.exit_code, 2);
  EXPECT_NE(missing.output.find("nope.h5"), std::string::npos) << missing.output;
  EXPECT_EQ(read_json(dir_ / "m" / "report.json")["status"], "error");

  auto corrupt = write("corrupt.h5", "this is not an HDF5 file");
  auto r = run_cli("golden verify " + c + " " + corrupt + " --out " + (dir_ / "c").string());
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.output.find("corrupt.h5"), std::string::npos) << r.output;
  auto j = read_json(dir_ / "c" / "report.json");
  EXPECT_EQ(j["status"], "error");
  for (auto& k : j["cases"]) EXPECT_TRUE(k["checks"].empty()) << "no partial result next to the error";

  // A valid golden of another case is refused, not compared.
  auto other = write("other.json", R"({"id": "t", "model": {"preset": "tiny-31b"}, "data": {"seq_len": 24, "padding": 4, "seed": 2}, "steps": 2})");
  const auto golden = (dir_ / "g.h5").string();
  ASSERT_EQ(run_cli("golden record " + other + " -o " + golden).exit_code, 0);
  r = run_cli("golden verify " + c + " " + golden);
  EXPECT_EQ(r.exit_code, 2) << r.output;
}

// The unmodified save_pretrained checkpoints of the three tiny models and of a 35-layer multimodal E2B-like one
// (weights the harness did not choose, their own config.json, paths relative to the case file, run from another
// directory), 3 AdamW steps in fp32 at cp 2, 3 and 4: every check passes. On these weights AdamW makes some fp32
// final parameters miss 1e-5 against cp 1 (the fixed threshold failed tiny-e2b at cp 3 with 1.49x), so the fp64
// rerun policy must have judged at least one; on the 35-layer one step 0 misses too (cp 1's grad norm 0.87 % from
// fp64), so the fp64 oracle judged some, and the power check still sees its perturbation at every cp.
TEST_F(CliTest, RealCheckpointsPassTheFp32LaneAtCp2To4) {
  const auto out = dir_ / "ck";
  auto r = cpharness::testing::run_command("cd " + dir_.string() + " && " + std::string(CPHARNESS_BINARY) + " run " +
                                           std::string(CPHARNESS_SOURCE_DIR) + "/cases/checkpoints --out " + out.string());
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto j = read_json(out / "report.json");
  ASSERT_EQ(j["cases"].size(), 4u);
  int reruns = 0, against_oracle = 0;
  for (auto& k : j["cases"]) {
    EXPECT_EQ(k["status"], "pass") << k["id"];
    std::set<int> cps, seen;
    for (auto& c : k["checks"]) {
      if (c["name"] == "train.param_parity" && c["step"].is_null()) cps.insert(c["cp"].get<int>());
      if (c["name"] == "power.boundary_label" && c["status"] == "pass") seen.insert(c["cp"].get<int>());
      if (c["policy"] == "fp64_rerun") ++reruns;
      if (c["policy"] == "fp32_oracle_relative" && k["id"] == "e2b35-multimodal-checkpoint") ++against_oracle;
    }
    EXPECT_EQ(cps, (std::set<int>{2, 3, 4})) << k["id"];
    EXPECT_EQ(seen, (std::set<int>{2, 3, 4})) << k["id"];
    // Every weight came from the checkpoint; the multimodal one's towers were skipped, not loaded.
    ASSERT_TRUE(k.contains("weights")) << k["id"];
    EXPECT_GT(k["weights"]["loaded"].get<int>(), 0) << k["id"];
    EXPECT_TRUE(k["weights"]["kept_init"].empty()) << k["id"];
    if (k["id"] == "e2b35-multimodal-checkpoint") EXPECT_GT(k["weights"]["skipped_non_text"].get<int>(), 0);
  }
  EXPECT_GE(reruns, 1);
  EXPECT_GE(against_oracle, 1);
}

// A checkpoint of transformers >= 5.5.2 run as the cache-gated model (5.5.0's semantics): its KV-shared layers own
// K/V weights the checkpoint does not hold, which keep their seeded initialisation, as transformers leaves missing
// keys. The report, stderr and the page name every one of them; a checkpoint case that lacks none says so too.
TEST_F(CliTest, WeightsThatKeepTheirInitAreNamedInTheReport) {
  const fs::path ckpt = fs::path(CPHARNESS_SOURCE_DIR) / "golden/hf-5.24.0/tiny-e2b-hf-checkpoint";
  const auto config = read_json(ckpt / "config.json");
  const auto text = config.contains("text_config") ? config["text_config"] : config;
  const int shared = text["num_kv_shared_layers"].get<int>();
  ASSERT_GT(shared, 0);
  for (const std::string semantics : {"cache-gated", "shared-kv-states"}) {
    SCOPED_TRACE(semantics);
    const auto c = write(semantics + ".json", R"({"id": "kept", "model": {"config_file": ")" + (ckpt / "config.json").string() +
                                                  R"(", "kv_share_semantics": ")" + semantics + R"("}, "weights": {"checkpoint": ")" +
                                                  ckpt.string() + R"("}, "data": {"seq_len": 16, "seed": 1}, "steps": 1,
                                                  "cp": [2], "checks": ["train.loss_parity"]})");
    const auto out = dir_ / semantics;
    auto r = run_cli("run " + c + " --out " + out.string());
    ASSERT_EQ(r.exit_code, 0) << r.output;
    expect_valid_outputs(out);
    const auto w = read_json(out / "report.json")["cases"][0]["weights"];
    EXPECT_EQ(w["checkpoint"], ckpt.string());
    EXPECT_GT(w["loaded"].get<int>(), 0);
    std::ifstream page_file(out / "report.html");
    const std::string page((std::istreambuf_iterator<char>(page_file)), std::istreambuf_iterator<char>());
    if (semantics == "shared-kv-states") {
      EXPECT_TRUE(w["kept_init"].empty());
      EXPECT_EQ(r.output.find("keep their seeded initialisation"), std::string::npos) << r.output;
      EXPECT_NE(page.find("data-weights=\"0\""), std::string::npos);
      continue;
    }
    ASSERT_EQ(w["kept_init"].size(), size_t(3 * shared)) << w.dump();  // k_proj, v_proj, k_norm of each shared layer
    for (auto& name : w["kept_init"]) {
      const auto n = name.get<std::string>();
      EXPECT_TRUE(n.find("k_proj") != std::string::npos || n.find("v_proj") != std::string::npos ||
                  n.find("k_norm") != std::string::npos) << n;
      EXPECT_NE(r.output.find(n), std::string::npos) << "stderr names " << n;
      EXPECT_NE(page.find(n), std::string::npos) << "the page names " << n;
    }
    EXPECT_NE(page.find("data-weights=\"" + std::to_string(3 * shared) + "\""), std::string::npos);
  }
}

// On weights fp32 cannot hold (the 35-layer checkpoint), where results are judged against the fp64 oracle, the gate
// still goes red: a planted bug that drops the power check's perturbation fails it at every cp (its perturbed run is
// judged as the candidate was, on the oracle: without it, noise alone "saw" the perturbation and the plant passed);
// with a tighter fp32_oracle_k (0.5, read by its own name) the correct run fails, and the plant still fails power
// at every cp (a perturbed result counts only where the unperturbed candidate passed it).
TEST_F(CliTest, OnAnIllConditionedCheckpointTheOracleJudgementsCanStillFail) {
  const std::string ckpt = std::string(CPHARNESS_SOURCE_DIR) + "/golden/checkpoints/e2b35-multimodal-5.25.0";
  auto j = read_json(fs::path(CPHARNESS_SOURCE_DIR) / "cases/checkpoints/e2b35-multimodal-checkpoint.json");
  j["model"]["config_file"] = ckpt + "/config.json";
  j["weights"]["checkpoint"] = ckpt;
  auto power_cps = [](const nlohmann::json& report, const std::string& status) {
    std::set<int> cps;
    for (auto& c : report["cases"][0]["checks"])
      if (c["name"] == "power.boundary_label" && c["status"] == status) cps.insert(c["cp"].get<int>());
    return cps;
  };
  for (const double k : {-1.0, 0.5}) {  // -1: the case's own tolerances
    SCOPED_TRACE(k);
    if (k > 0) j["tolerances"] = {{"fp32_oracle_k", k}};
    const auto c = write(k > 0 ? "tight.json" : "plain.json", j.dump());
    const std::string name = k > 0 ? "tight" : "plain";
    auto r = run_cli("run " + c + " --report " + (dir_ / (name + "-planted.json")).string(),
                     "CPHARNESS_PLANT_BUG=power_perturbation_not_applied");
    EXPECT_EQ(r.exit_code, 1) << r.output;
    EXPECT_EQ(power_cps(read_json(dir_ / (name + "-planted.json")), "fail"), (std::set<int>{2, 3, 4}));
    if (k < 0) continue;
    r = run_cli("run " + c + " --report " + (dir_ / (name + "-correct.json")).string());
    EXPECT_EQ(r.exit_code, 1) << r.output;
    int failed_on_oracle = 0;
    const auto correct = read_json(dir_ / (name + "-correct.json"));
    for (auto& check : correct["cases"][0]["checks"])
      if (check["status"] == "fail" && check["policy"] == "fp32_oracle_relative") ++failed_on_oracle;
    EXPECT_GE(failed_on_oracle, 1);
  }
}

// A run whose loss or gradients are not finite fails, whatever checks the case selects: AdamW at lr 1e30 (valid
// input; the first update takes every weight to ~1e30 and the next forward overflows), with only count checks.
// What would make a run non-finite from its inputs alone (a NaN weight in a real checkpoint, rms_norm_eps -1e30)
// is bad input: exit 2 naming the tensor or the key, before any run.
TEST_F(CliTest, ANonFiniteRunFailsWhateverChecksTheCaseSelects) {
  const fs::path ckpt = dir_ / "nan-checkpoint";
  fs::copy(fs::path(CPHARNESS_SOURCE_DIR) / "golden/hf-5.5.0/tiny-e2b-hf-checkpoint", ckpt);
  {
    // safetensors: an 8-byte little-endian header length, the JSON header, then the data; one float becomes NaN.
    std::fstream f(ckpt / "model.safetensors", std::ios::in | std::ios::out | std::ios::binary);
    std::uint64_t n = 0;
    f.read(reinterpret_cast<char*>(&n), 8);
    std::string header(n, '\0');
    f.read(header.data(), static_cast<std::streamsize>(n));
    const auto h = nlohmann::json::parse(header);
    const auto& t = h.at("model.layers.0.mlp.down_proj.weight");
    ASSERT_EQ(t.at("dtype"), "F32");
    const float nan = std::numeric_limits<float>::quiet_NaN();
    f.seekp(static_cast<std::streamoff>(8 + n + t.at("data_offsets").at(0).get<std::uint64_t>() + 4 * 5));
    f.write(reinterpret_cast<const char*>(&nan), 4);
  }
  const std::string counts_only = R"("checks": ["cache.", "ring.", "mask."], "steps": 2, "cp": [2])";
  const auto nan_case = write("nan.json", R"({"id": "nan-weight", "model": {"config_file": ")" + (ckpt / "config.json").string() +
                                              R"("}, "weights": {"checkpoint": ")" + ckpt.string() +
                                              R"("}, "data": {"seq_len": 24, "seed": 1}, )" + counts_only + "}");
  const auto eps_case = write("eps.json", R"({"id": "negative-eps", "model": {"preset": "tiny-31b", "overrides":
      {"rms_norm_eps": -1e30}}, "data": {"seq_len": 24, "seed": 1}, )" + counts_only + "}");
  for (const auto& [c, named] : {std::pair{nan_case, "layers.0.mlp.down_proj.weight"}, std::pair{eps_case, "rms_norm_eps"}}) {
    SCOPED_TRACE(c);
    auto r = run_cli("run " + c + " --out " + (dir_ / fs::path(c).stem()).string());
    EXPECT_EQ(r.exit_code, 2) << r.output;
    EXPECT_NE(r.output.find(named), std::string::npos) << r.output;
  }
  const auto lr_case = write("lr.json", R"({"id": "huge-lr", "model": {"preset": "tiny-31b"}, "optimizer": {"lr": 1e30},
      "data": {"seq_len": 24, "seed": 1}, )" + counts_only + "}");
  const auto out = dir_ / "lr";
  auto r = run_cli("run " + lr_case + " --out " + out.string());
  ASSERT_EQ(r.exit_code, 1) << r.output;
  const auto j = read_json(out / "report.json");
  EXPECT_EQ(j["status"], "fail");
  int trained_failed = 0;
  for (auto& k : j["cases"][0]["checks"])
    if (k["name"] == "train.trained" && k["status"] == "fail") {
      ++trained_failed;
      EXPECT_NE(k["message"].get<std::string>().find("non-finite"), std::string::npos) << k["message"];
    }
  EXPECT_EQ(trained_failed, 2) << "the cp 1 reference and the cp 2 candidate";
}

// An HF golden without /inputs/document_ids whose position ids restart among the real tokens while
// /inputs/padding marks padding is ambiguous (transformers packs by positions only without a mask): exit 2 naming
// the file and field, and no result for it in the report.
TEST_F(CliTest, AnHfGoldenPackedByPositionsAndPaddedIsExit2NamingTheField) {
  auto dump = cpharness::report::read_run_dump(std::string(CPHARNESS_SOURCE_DIR) + "/golden/hf-5.24.0/tiny-e2b-hf.h5");
  ASSERT_TRUE(dump.inputs.at("padding").any().item<bool>());
  dump.inputs.erase("document_ids");
  const auto path = (dir_ / "packed-and-padded.h5").string();
  cpharness::report::write_run_dump(path, dump);
  auto r = run_cli("hf-parity " + path + " --cp 1 --out " + (dir_ / "o").string());
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("packed-and-padded.h5"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("inputs/document_ids"), std::string::npos) << r.output;
  auto j = read_json(dir_ / "o" / "report.json");
  EXPECT_EQ(j["status"], "error");
  for (auto& k : j["cases"]) EXPECT_TRUE(k["checks"].empty()) << "no partial result next to the error";
}

#ifdef CPHARNESS_TEST_MPI
// Processes whose command line holds `marker` (a path unique to the test), after waiting up to `wait` for them to go.
int processes_left(const std::string& marker, std::chrono::seconds wait) {
  const auto until = std::chrono::steady_clock::now() + wait;
  for (;;) {
    auto r = cpharness::testing::run_command("pgrep -f " + marker + " | grep -v -w $$ | wc -l");
    const int n = std::atoi(r.output.c_str());
    if (n == 0 || std::chrono::steady_clock::now() > until) return n;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
}

// SIGTERM (what CI and `timeout` send) to the launching process of an mpi job: passed on to mpirun and both ranks,
// all reaped (none left running), exit 2 and an error report naming the signal.
TEST_F(CliTest, ASignalToTheLauncherEndsTheWholeMpiJobWithAnErrorReport) {
  auto c = write("g.json", kGoodCase);
  const auto report = dir_ / "signalled-report.json";
  // rank 1 hangs before step 0, so the job is still running when the signal comes.
  const std::string cmd = "CPHARNESS_INJECT_FAULT=hang@1:0 " + std::string(CPHARNESS_BINARY) + " run " + c +
                          " --comm mpi --nproc 2 --timeout 120 --report " + report.string();
  const auto start = std::chrono::steady_clock::now();
  auto r = cpharness::testing::run_command("sh -c '" + cmd + " & pid=$!; sleep 6; kill -TERM $pid; wait $pid; echo EXIT=$?'");
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(40)) << r.output;
  EXPECT_NE(r.output.find("EXIT=2"), std::string::npos) << r.output;
  std::ifstream in(report);
  ASSERT_TRUE(in.good()) << r.output;
  auto j = nlohmann::json::parse(in);
  EXPECT_EQ(j["status"], "error");
  EXPECT_NE(j["error"].get<std::string>().find("SIGTERM"), std::string::npos) << j["error"];
  // Nothing of the job is left: no process still has this test's report path on its command line.
  EXPECT_EQ(processes_left(report.string(), std::chrono::seconds(5)), 0);
}

// Rank 0 frozen (SIGSTOP) during its cp 1 reference: the other ranks wait at most --timeout for it, then the whole
// job ends (the frozen rank included): exit 2 and an error report naming rank 0, nothing left running.
TEST_F(CliTest, ARankFrozenDuringTheReferenceEndsTheJobWithinTheTimeout) {
  auto c = write("g.json", kGoodCase);
  const auto report = dir_ / "frozen-report.json";
  const auto start = std::chrono::steady_clock::now();
  auto r = run_cli("run " + c + " --comm mpi --nproc 2 --timeout 8 --report " + report.string(),
                   "CPHARNESS_INJECT_FAULT=stop@0");
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(60)) << r.output;
  EXPECT_EQ(r.exit_code, 2) << r.output;
  std::ifstream in(report);
  ASSERT_TRUE(in.good()) << r.output;
  auto j = nlohmann::json::parse(in);
  EXPECT_EQ(j["status"], "error");
  EXPECT_NE(j.dump().find("rank 0"), std::string::npos) << j.dump();
  EXPECT_EQ(processes_left(report.string(), std::chrono::seconds(5)), 0);
}

// Rank 0's solo work lasting several times --timeout (its cp 1 reference here; at real sizes it lasts minutes to
// hours) is not a hang: the other ranks wait for it on its signs of life, each within --timeout, and the case passes.
// (Before, they waited --timeout for the whole reference and blamed a healthy rank 0: "stopped or unresponsive".)
// slow@0 makes each reference step idle --timeout while it beats, so the premise holds on a machine of any speed
// (with 20 real steps at --timeout 2 it failed in CI, where a loaded step came near the timeout itself).
TEST_F(CliTest, RankZerosSoloWorkMayOutlastTheTimeoutWhileItShowsSignsOfLife) {
  auto c = write("long-reference.json", R"({"id": "long-reference", "model": {"preset": "tiny-e4b"},
    "data": {"seq_len": 64, "batch": 1, "seed": 1}, "steps": 3, "cp": [2], "checks": ["train.loss_parity"]})");
  const auto report = dir_ / "long-reference.json.report";
  auto r = run_cli("run " + c + " --comm mpi --nproc 2 --timeout 3 --report " + report.string(),
                   "CPHARNESS_INJECT_FAULT=slow@0");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto j = read_json(report);
  EXPECT_EQ(j["status"], "pass");
  double reference_seconds = 0;
  for (auto& s : j["cases"][0]["performance"]["1"]["step_seconds"]) reference_seconds += s.get<double>();
  EXPECT_GT(reference_seconds, 2 * 3.0) << "the reference must outlast the timeout for this test to mean anything";
}

// Every case skipped under --nproc (a CUDA case on a machine without one): the ranks agree that nothing ran, and the
// launcher passes their exit 3 on instead of calling it a failed rank.
TEST_F(CliTest, NothingRanUnderMpiIsExit3NotAFailedRank) {
  if (cpharness::train::cuda_available()) GTEST_SKIP() << "a CUDA device is present";
  auto c = write("g.json", kGoodCase);
  const auto report = dir_ / "skipped.json";
  auto r = run_cli("run " + c + " --device cuda --comm mpi --nproc 2 --report " + report.string());
  EXPECT_EQ(r.exit_code, 3) << r.output;
  EXPECT_EQ(r.output.find("failed or hung"), std::string::npos) << r.output;
  std::ifstream in(report);
  ASSERT_TRUE(in.good()) << r.output;
  EXPECT_EQ(nlohmann::json::parse(in)["status"], "skipped");
}

// --comm mpi: the same case as processes under mpirun gives the same verdicts and, since both backends reduce in
// rank order, bit-identical trajectories.
TEST_F(CliTest, MpiRunMatchesTheLocalRunBitForBit) {
  auto c = write("g.json", kGoodCase);
  auto local = run_cli("run " + c + " --cp 2 --out " + (dir_ / "local").string());
  ASSERT_EQ(local.exit_code, 0) << local.output;
  auto mpi = run_cli("run " + c + " --comm mpi --nproc 2 --out " + (dir_ / "mpi").string());
  ASSERT_EQ(mpi.exit_code, 0) << mpi.output;
  const auto l = read_json(dir_ / "local" / "report.json"), m = read_json(dir_ / "mpi" / "report.json");
  EXPECT_EQ(m["environment"]["comm_backend"], "mpi");
  ASSERT_EQ(l["cases"].size(), 1u);
  ASSERT_EQ(m["cases"].size(), 1u);
  const auto& lc = l["cases"][0];
  const auto& mc = m["cases"][0];
  EXPECT_EQ(mc["status"], "pass");
  EXPECT_EQ(mc["trajectories"], lc["trajectories"]);
  EXPECT_EQ(mc["block_mask_cache"], lc["block_mask_cache"]);
  ASSERT_EQ(mc["checks"].size(), lc["checks"].size());
  for (size_t i = 0; i < lc["checks"].size(); ++i) {
    EXPECT_EQ(mc["checks"][i]["name"], lc["checks"][i]["name"]);
    EXPECT_EQ(mc["checks"][i]["status"], lc["checks"][i]["status"]);
  }
}

// The fp64 reruns that judge an fp32 candidate's later steps (policy fp64_rerun) run on the candidate's own backend.
// The planted bug copies the summed gradients back on rank 0 only: under --comm local rank 0 steps the weights every
// rank shares, so only process ranks train on their own unsummed gradients. A rerun of ranks as threads never had
// the bug and passed the later steps; a rerun over the same processes has it and fails them.
TEST_F(CliTest, TheFp64RerunsOfAnMpiCandidateRunOnItsProcessesAndKeepABugOfThatBackend) {
  const std::string c = std::string(CPHARNESS_SOURCE_DIR) + "/cases/checkpoints/tiny-e4b-hf-checkpoint.json";
  auto good = run_cli("run " + c + " --comm mpi --nproc 2 --timeout 120 --out " + (dir_ / "good").string());
  ASSERT_EQ(good.exit_code, 0) << good.output;
  auto bad = run_cli("run " + c + " --comm mpi --nproc 2 --timeout 120 --out " + (dir_ / "bad").string(),
                     "CPHARNESS_PLANT_BUG=gradients_reduced_to_rank_zero");
  ASSERT_EQ(bad.exit_code, 1) << bad.output;
  auto later_step_verdicts = [](const nlohmann::json& report) {
    std::map<std::string, std::string> out;  // "name step" -> status, of the checks judged on the reruns
    for (auto& k : report["cases"][0]["checks"])
      if (k["policy"] == "fp64_rerun" && k["step"].is_number() && k["step"].get<int>() >= 1)
        out[k["name"].get<std::string>() + " " + std::to_string(k["step"].get<int>())] = k["status"];
    return out;
  };
  const auto g = later_step_verdicts(read_json(dir_ / "good" / "report.json"));
  const auto b = later_step_verdicts(read_json(dir_ / "bad" / "report.json"));
  ASSERT_FALSE(g.empty()) << "the checkpoint's fp32 figures no longer need the reruns: pick another case";
  for (auto& [what, status] : g) EXPECT_EQ(status, "pass") << what;
  for (const char* what : {"train.loss_parity 1", "train.grad_norm_parity 1", "train.loss_parity 2"}) {
    ASSERT_TRUE(b.count(what)) << what;
    EXPECT_EQ(b.at(what), "fail") << what;
  }
}

// A rank that dies, and one that hangs, end the run within the timeout: exit 2, an error report naming the rank;
// with the streaming ring too, whose exchanges a background thread runs.
TEST_F(CliTest, MpiRunWithAFailingRankIsExit2WithAnErrorReportNamingIt) {
  auto stream = nlohmann::json::parse(kGoodCase);
  stream["ring"] = {{"mode", "stream"}};
  const std::vector<std::pair<std::string, std::string>> cases = {{"collect", write("g.json", kGoodCase)},
                                                                  {"stream", write("s.json", stream.dump())}};
  for (const auto& [mode, c] : cases)
    for (const std::string fault : {"crash@1", "hang@1:1"}) {
      SCOPED_TRACE(mode + " " + fault);
      const auto out = dir_ / (mode + "-" + fault);
      const auto start = std::chrono::steady_clock::now();
      auto r = run_cli("run " + c + " --comm mpi --nproc 2 --timeout 5 --out " + out.string(), "CPHARNESS_INJECT_FAULT=" + fault);
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      EXPECT_EQ(r.exit_code, 2) << r.output;
      EXPECT_LT(seconds, 60) << r.output;
      EXPECT_NE(r.output.find("rank 1"), std::string::npos) << r.output;
      auto j = read_json(out / "report.json");
      EXPECT_EQ(j["status"], "error");
      EXPECT_NE(j.dump().find("rank 1"), std::string::npos) << j.dump(2);
      for (auto& k : j["cases"]) EXPECT_TRUE(k["checks"].empty()) << "no partial result next to the error";
    }
}

// A rank frozen once the verdict is agreed (stop@1:exit) leaves rank 0 in MPI's shutdown, which has no timeout of
// its own: the shutdown is bounded by --timeout, and the pass rank 0 had already written does not survive the
// exit 2 (exit code and report agree).
TEST_F(CliTest, ARankFrozenInMpiShutdownEndsTheJobAndThePassReportDoesNotSurviveIt) {
  auto c = write("g.json", kGoodCase);
  const auto out = dir_ / "frozen-at-exit";
  const auto start = std::chrono::steady_clock::now();
  auto r = run_cli("run " + c + " --comm mpi --nproc 2 --timeout 8 --out " + out.string(),
                   "CPHARNESS_INJECT_FAULT=stop@1:exit");
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(90)) << r.output;
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("MPI shutdown"), std::string::npos) << r.output;
  const auto j = read_json(out / "report.json");
  EXPECT_EQ(j["status"], "error") << j.dump(2);
  // The frozen rank is named, not rank 0, which waited for it in the shutdown and ended itself first.
  EXPECT_NE(j["error"].get<std::string>().find("rank 1 failed or hung"), std::string::npos) << j.dump(2);
  EXPECT_EQ(processes_left(out.string(), std::chrono::seconds(10)), 0);
}

// A report another run writes into the same place while this job runs is not taken for this job's: the job's
// exit 2 leaves its own error report there.
TEST_F(CliTest, AFailedJobNeverLeavesAnotherRunsPassReportInItsPlace) {
  auto c = write("g.json", kGoodCase);
  const auto report = dir_ / "shared-report.json";
  const std::string pass_text = R"({"status": "pass", "note": "written by another run"})";
  write("other-pass.json", pass_text);
  // Rank 1 dies at its second step (mpirun then kills rank 0 before it writes anything); the other run's report
  // lands while the job is still starting.
  const std::string cmd = "CPHARNESS_INJECT_FAULT=crash@1:1 " + std::string(CPHARNESS_BINARY) + " run " + c +
                          " --comm mpi --nproc 2 --timeout 20 --report " + report.string();
  auto r = cpharness::testing::run_command("sh -c '" + cmd + " & pid=$!; sleep 0.3; cp " +
                                           (dir_ / "other-pass.json").string() + " " + report.string() +
                                           "; wait $pid; echo EXIT=$?'");
  EXPECT_NE(r.output.find("EXIT=2"), std::string::npos) << r.output;
  const auto j = read_json(report);
  EXPECT_EQ(j["status"], "error") << j.dump(2);
  EXPECT_FALSE(j.contains("note")) << j.dump(2);
}

// Bad input under --nproc: every rank refuses the run together and rank 0's error report says why; the launcher
// blames no rank (mpirun's banner names the first rank to exit 2, which failed nothing).
TEST_F(CliTest, BadInputUnderMpiIsRefusedByEveryRankBlamingNone) {
  auto bad = write("bad.json", R"({"id": )");
  const auto out = dir_ / "refused";
  auto r = run_cli("run " + bad + " --comm mpi --nproc 2 --timeout 20 --out " + out.string());
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("run refused"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("failed or hung"), std::string::npos) << r.output;
  const auto j = read_json(out / "report.json");
  EXPECT_EQ(j["status"], "error");
  EXPECT_NE(j["error"].get<std::string>().find("bad.json"), std::string::npos) << j.dump(2);
}

// The launching process killed outright (SIGKILL: no handler runs) takes mpirun and the ranks with it.
TEST_F(CliTest, KillingTheLauncherOutrightLeavesNoRankRunning) {
  auto c = write("g.json", kGoodCase);
  const auto report = dir_ / "orphan-report.json";
  const std::string cmd = "CPHARNESS_INJECT_FAULT=hang@1:0 " + std::string(CPHARNESS_BINARY) + " run " + c +
                          " --comm mpi --nproc 2 --timeout 120 --report " + report.string();
  auto r = cpharness::testing::run_command("sh -c '" + cmd + " & pid=$!; sleep 6; kill -KILL $pid; wait $pid; echo EXIT=$?'");
  EXPECT_NE(r.output.find("EXIT=137"), std::string::npos) << r.output;
  EXPECT_EQ(processes_left(report.string(), std::chrono::seconds(10)), 0);
  const auto j = read_json(report);  // what stays: the stand-in written before any work
  EXPECT_EQ(j["status"], "error") << j.dump(2);
  EXPECT_NE(j["error"].get<std::string>().find("run did not finish"), std::string::npos) << j.dump(2);
}
#endif

// Outputs that would lose or destroy something are usage errors before any work: two outputs on one path, an empty
// path (an unset variable), a FIFO or device in place of a report, an output on an input; and so are --cp 0 or a size listed twice, and a selftest mutant that
// does not exist (it used to run nothing and exit 3).
TEST_F(CliTest, OutputsThatWouldLoseOrDestroySomethingAreRefusedBeforeAnyWork) {
  auto c = write("g.json", kGoodCase);
  const auto same = (dir_ / "same").string();
  auto r = run_cli("run " + c + " --report " + same + " --junit " + same);
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("same file"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(same));
  for (const std::string flag : {"--out", "--report", "--junit", "--html"}) {
    r = run_cli("run " + c + " " + flag + " ''");
    EXPECT_EQ(r.exit_code, 2) << flag << r.output;
    EXPECT_NE(r.output.find("empty"), std::string::npos) << flag << r.output;
  }
  const auto fifo = dir_ / "report.fifo";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0644), 0);
  r = run_cli("run " + c + " --report " + fifo.string());
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_TRUE(fs::is_fifo(fifo)) << "the FIFO was replaced";
  r = run_cli("run " + c + " --cp 0");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("whole number >= 1"), std::string::npos) << r.output;
  r = run_cli("run " + c + " --cp 2,3,2 --out " + (dir_ / "twice").string());  // ran and counted twice
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("--cp lists 2 twice"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(dir_ / "twice" / "report.json"));
  r = run_cli("hf-parity " + (dir_ / "none").string() + " --cp 1,1");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("--cp lists 1 twice"), std::string::npos) << r.output;
  r = run_cli("selftest --only no-such-mutant");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("no such mutant"), std::string::npos) << r.output;
  // An output on an input would destroy it: the case under its own report, a golden under compare's JSON.
  const auto case_text = [&] { std::ifstream in(c); return std::string(std::istreambuf_iterator<char>(in), {}); };
  const auto before = case_text();
  for (const std::string flag : {"--report", "--junit", "--html"}) {
    r = run_cli("run " + c + " " + flag + " " + c);
    EXPECT_EQ(r.exit_code, 2) << flag << r.output;
    EXPECT_NE(r.output.find("is an input of this command"), std::string::npos) << flag << r.output;
  }
  r = run_cli("golden record " + c + " -o " + c + " --force");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_EQ(case_text(), before);
  const auto golden = (dir_ / "in.h5").string();
  ASSERT_EQ(run_cli("golden record " + c + " -o " + golden).exit_code, 0);
  r = run_cli("compare " + golden + " " + golden + " --json " + golden);
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_EQ(run_cli("compare " + golden + " " + golden).exit_code, 0) << "the golden survived";
  EXPECT_EQ(case_text(), before);
  const auto report = (dir_ / "rendered" / "report.json").string();
  ASSERT_EQ(run_cli("run " + c + " --out " + (dir_ / "rendered").string()).exit_code, 0);
  r = run_cli("render " + report + " -o " + report);
  EXPECT_EQ(r.exit_code, 2) << r.output;
  std::ifstream in(report);
  EXPECT_EQ(nlohmann::json::parse(in)["status"], "pass") << "the report survived";
}

// compare and bisect find what they cannot do before the work: an unwritable --json, a negative --rows, a missing
// golden (bisect: 125 at once, not after training the case).
TEST_F(CliTest, CompareAndBisectRefuseWhatTheyCannotDoBeforeTheWork) {
  const auto golden = (dir_ / "g.h5").string();
  auto c = write("g.json", kGoodCase);
  ASSERT_EQ(run_cli("golden record " + c + " -o " + golden).exit_code, 0);
  auto r = run_cli("compare " + golden + " " + golden + " --json " + (dir_ / "missing-dir" / "c.json").string());
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_EQ(r.output.find("PASS"), std::string::npos) << "compared before refusing: " << r.output;
  r = run_cli("compare " + golden + " " + golden + " --rows -1");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_EQ(run_cli("compare " + golden + " " + golden + " --rows 0").exit_code, 0);
  r = run_cli("bisect " + c + " --golden " + (dir_ / "missing.h5").string());
  EXPECT_EQ(r.exit_code, 125) << r.output;
  EXPECT_EQ(r.output.find("step 0"), std::string::npos) << "trained before skipping: " << r.output;
}

// An older comparison's --json never stays to be read as this one's: a compare that fails on bad input (or is
// killed) leaves none.
TEST_F(CliTest, ACompareThatFailsLeavesNoOlderJson) {
  const auto golden = (dir_ / "g.h5").string();
  auto c = write("g.json", kGoodCase);
  ASSERT_EQ(run_cli("golden record " + c + " -o " + golden).exit_code, 0);
  const auto json = dir_ / "diff.json";
  ASSERT_EQ(run_cli("compare " + golden + " " + golden + " --json " + json.string()).exit_code, 0);
  ASSERT_TRUE(fs::exists(json));
  const auto truncated = dir_ / "truncated.h5";
  fs::copy_file(golden, truncated);
  fs::resize_file(truncated, fs::file_size(truncated) / 2);
  auto r = run_cli("compare " + golden + " " + truncated.string() + " --json " + json.string());
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_FALSE(fs::exists(json)) << "the older comparison's JSON stayed";
}

// A usage error found before any work (an unknown flag, --cp 0) left an older run's pass at --out / --report to be
// read as this command's: it is replaced by the usage error's report and the page goes. A file there that is no
// report of ours (here: the case itself, named as the report) is never touched.
TEST_F(CliTest, AUsageErrorLeavesNoOlderRunsReport) {
  auto c = write("g.json", kGoodCase);
  const auto out = dir_ / "out", older = dir_ / "older";
  ASSERT_EQ(run_cli("run " + c + " --cp 2 --out " + older.string()).exit_code, 0);
  ASSERT_EQ(read_json(older / "report.json")["status"], "pass");
  ASSERT_TRUE(fs::exists(older / "report.html"));
  for (const std::string bad : {"--cp 0", "--no-such-flag", "--timeout -1"}) {
    SCOPED_TRACE(bad);
    // The older run's reports, as that run left them (one run, copied: the run itself is not what is tested).
    fs::remove_all(out);
    fs::copy(older, out, fs::copy_options::recursive);
    auto r = run_cli("run " + c + " " + bad + " --out " + out.string());
    EXPECT_EQ(r.exit_code, 2) << r.output;
    const auto j = read_json(out / "report.json");
    EXPECT_EQ(j["status"], "error") << j.dump(2);
    EXPECT_NE(j["error"].get<std::string>().find("usage error"), std::string::npos) << j.dump(2);
    EXPECT_FALSE(fs::exists(out / "report.html"));
  }
  auto text_of = [](const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  };
  const std::string case_text = text_of(c);
  EXPECT_EQ(run_cli("run " + c + " --cp 0 --report " + c).exit_code, 2);
  EXPECT_EQ(text_of(c), case_text) << "the case named as the report was touched";
}

// `git bisect run` aborts the bisection on an exit code above 127: a commit whose run crashes is bad (1), one killed
// outright (an out-of-memory killer) cannot be judged (125). The judging runs in a child of the bisect process.
TEST_F(CliTest, BisectCallsACrashBadAndAKillASkipNeverAnAbort) {
  // Long enough (hundreds of steps) that the child is still judging when the signal reaches it.
  auto c = write("slow.json", R"({"id": "slow", "model": {"preset": "tiny-31b"}, "data": {"seq_len": 96, "seed": 1}, "steps": 400})");
  for (const auto& [sig, code, says] : std::vector<std::tuple<std::string, int, std::string>>{
           {"SEGV", 1, "bisect: bad (the run crashed"}, {"ABRT", 1, "bisect: bad (the run crashed"},
           {"KILL", 125, "bisect: skip"}}) {
    SCOPED_TRACE(sig);
    const std::string cmd = std::string(CPHARNESS_BINARY) + " bisect " + c;
    const std::string child = "$(pgrep -P $pid | head -1)";
    auto r = cpharness::testing::run_command("sh -c '" + cmd + " & pid=$!; for i in $(seq 300); do [ -n \"" + child +
                                             "\" ] && break; sleep 0.1; done; sleep 1; kill -" + sig + " " + child +
                                             "; wait $pid; echo EXIT=$?' 2>&1");
    EXPECT_NE(r.output.find("EXIT=" + std::to_string(code)), std::string::npos) << r.output;
    EXPECT_NE(r.output.find(says), std::string::npos) << r.output;
  }
}

// golden verify on a case that cannot be read: exit 2 and an error report with no case in it (as run's).
TEST_F(CliTest, GoldenVerifyOfAnUnreadableCaseReportsNoCase) {
  auto bad = write("bad.json", "{\"id\": ");
  const auto report = dir_ / "verify.json";
  auto r = run_cli("golden verify " + bad + " " + (dir_ / "none.h5").string() + " --report " + report.string());
  EXPECT_EQ(r.exit_code, 2) << r.output;
  const auto j = read_json(report);
  EXPECT_EQ(j["status"], "error");
  EXPECT_TRUE(j["cases"].empty()) << j.dump(2);
}

// Every case's checkpoint is checked when the cases are loaded: a truncated one, or a config.json lying about the
// geometry, is exit 2 naming the case key before any case trains (not after the good cases ran for hours).
TEST_F(CliTest, ABadCheckpointIsRefusedBeforeAnyCaseRuns) {
  const fs::path ckpt = fs::path(CPHARNESS_SOURCE_DIR) / "golden" / "hf-5.5.0" / "tiny-e2b-hf-checkpoint";
  for (const std::string spoil : {"truncated", "geometry"}) {
    SCOPED_TRACE(spoil);
    const auto copy = dir_ / ("ckpt-" + spoil);
    fs::create_directories(copy);
    fs::copy(ckpt, copy, fs::copy_options::recursive | fs::copy_options::overwrite_existing);
    if (spoil == "truncated") {
      fs::resize_file(copy / "model.safetensors", fs::file_size(copy / "model.safetensors") / 2);
    } else {
      auto config = read_json(copy / "config.json");
      auto& text = config.contains("text_config") ? config["text_config"] : config;
      text["hidden_size"] = 1024;
      text["intermediate_size"] = 4096;
      std::ofstream(copy / "config.json") << config.dump();
    }
    const auto cases = dir_ / ("cases-" + spoil);
    fs::create_directories(cases);
    std::ofstream(cases / "a-good.json") << kGoodCase;
    nlohmann::json bad = {{"id", "b-bad"},
                          {"model", {{"config_file", (copy / "config.json").string()}}},
                          {"weights", {{"checkpoint", copy.string()}}},
                          {"data", {{"seq_len", 24}, {"seed", 1}}},
                          {"steps", 1}};
    std::ofstream(cases / "b-bad.json") << bad.dump();
    const auto start = std::chrono::steady_clock::now();
    auto r = run_cli("run " + cases.string() + " --cp 2 --out " + (dir_ / ("out-" + spoil)).string());
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(30)) << r.output;
    EXPECT_EQ(r.exit_code, 2) << r.output;
    EXPECT_NE(r.output.find("weights.checkpoint"), std::string::npos) << r.output;
    const auto j = read_json(dir_ / ("out-" + spoil) / "report.json");
    EXPECT_EQ(j["status"], "error");
    EXPECT_TRUE(j["cases"].empty()) << "no case ran: " << j["cases"].dump();
  }
}

// `out` holding an older run's passing report, XML and page (what a stopped or killed run must not leave standing).
fs::path with_an_older_runs_reports(const fs::path& out) {
  fs::create_directories(out);
  std::ofstream(out / "report.json") << R"({"status": "pass", "note": "an older run"})";
  std::ofstream(out / "report.xml") << "<testsuites/>";
  std::ofstream(out / "report.html") << "<html>an older run</html>";
  return out;
}

// A local run stopped by SIGTERM or SIGINT (CI cancelling the job, Ctrl-C): exit 2, the error report naming the
// signal in place of the reports (an older run's included), no page of the older run, no temp file.
TEST_F(CliTest, ASignalStoppingALocalRunLeavesTheErrorReportNotAnOlderOne) {
  auto c = write("g.json", kGoodCase);
  for (const std::string sig : {"TERM", "INT"}) {
    SCOPED_TRACE(sig);
    const auto out = with_an_older_runs_reports(dir_ / ("out-" + sig));
    // rank 1 hangs before step 0, so the run is still going when the signal comes. A background job of a script
    // starts with SIGINT ignored (POSIX), which cpharness keeps ignored: env gives it the default, as a foreground
    // run at a terminal has it.
    const std::string cmd = "CPHARNESS_INJECT_FAULT=hang@1:0 env --default-signal=INT " + std::string(CPHARNESS_BINARY) +
                            " run " + c + " --cp 2 --timeout 120 --out " + out.string();
    auto r = cpharness::testing::run_command("sh -c '" + cmd + " & pid=$!; sleep 4; kill -" + sig +
                                             " $pid; wait $pid; echo EXIT=$?'");
    EXPECT_NE(r.output.find("EXIT=2"), std::string::npos) << r.output;
    EXPECT_NE(r.output.find("SIG" + sig), std::string::npos) << r.output;
    const auto j = read_json(out / "report.json");
    EXPECT_EQ(j["status"], "error") << j.dump(2);
    EXPECT_NE(j["error"].get<std::string>().find("SIG" + sig), std::string::npos) << j.dump(2);
    std::ifstream xml(out / "report.xml");
    const std::string xml_text((std::istreambuf_iterator<char>(xml)), std::istreambuf_iterator<char>());
    EXPECT_NE(xml_text.find("SIG" + sig), std::string::npos) << xml_text;
    EXPECT_FALSE(fs::exists(out / "report.html"));
    for (const auto& e : fs::directory_iterator(out))
      EXPECT_EQ(e.path().filename().string().find(".tmp-"), std::string::npos) << e.path();
  }
}

// Stop signals back to back (timeout signals the child and then its group; Ctrl-C, then CI cancelling) reach
// different threads at once: one handler writes the error report, whole, and no temp file is left behind.
TEST_F(CliTest, StopSignalsBackToBackLeaveOneWholeErrorReport) {
  auto c = write("g.json", kGoodCase);
  for (int trial = 0; trial < 4; ++trial) {
    SCOPED_TRACE(trial);
    const auto out = with_an_older_runs_reports(dir_ / ("out-" + std::to_string(trial)));
    const std::string cmd = "CPHARNESS_INJECT_FAULT=hang@1:0 env --default-signal=INT " + std::string(CPHARNESS_BINARY) +
                            " run " + c + " --cp 2 --timeout 120 --out " + out.string();
    const std::string wait_for_stand_in = "for i in $(seq 600); do grep -q \"did not finish\" " +
                                          (out / "report.json").string() + " && break; sleep 0.1; done";
    auto r = cpharness::testing::run_command("sh -c '" + cmd + " & pid=$!; " + wait_for_stand_in +
                                             "; sleep 1; kill -TERM $pid; kill -INT $pid; kill -HUP $pid; kill -TERM "
                                             "$pid; wait $pid; echo EXIT=$?'");
    EXPECT_NE(r.output.find("EXIT=2"), std::string::npos) << r.output;
    const auto j = read_json(out / "report.json");
    EXPECT_EQ(j["status"], "error") << j.dump(2);
    EXPECT_NE(j["error"].get<std::string>().find("stopped: received SIG"), std::string::npos) << j.dump(2);
    std::ifstream xml(out / "report.xml");
    const std::string xml_text((std::istreambuf_iterator<char>(xml)), std::istreambuf_iterator<char>());
    EXPECT_NE(xml_text.find("stopped: received SIG"), std::string::npos) << xml_text;
    EXPECT_NE(xml_text.find("</testsuites>"), std::string::npos) << xml_text;
    for (const auto& e : fs::directory_iterator(out))
      EXPECT_EQ(e.path().filename().string().find(".tmp-"), std::string::npos) << e.path();
  }
}

// A process killed outright (SIGKILL from an out-of-memory killer or a job's time limit) runs no handler, and one
// that crashes (SIGSEGV, SIGABRT) none of cpharness's: the report files then hold the stand-in written before any
// work, an error saying the run did not finish, never an older run's pass; the older page is gone.
TEST_F(CliTest, AProcessKilledOutrightOrCrashedLeavesTheUnfinishedErrorNotAnOlderPass) {
  auto c = write("g.json", kGoodCase);
  for (const std::string sig : {"KILL", "SEGV", "ABRT"}) {
    SCOPED_TRACE(sig);
    const auto out = with_an_older_runs_reports(dir_ / ("killed-" + sig));
    // rank 1 hangs before step 0: the run is under way when the signal comes (once the stand-in is in place).
    const std::string cmd = "CPHARNESS_INJECT_FAULT=hang@1:0 " + std::string(CPHARNESS_BINARY) + " run " + c +
                            " --cp 2 --timeout 120 --out " + out.string();
    const std::string wait_for_stand_in = "for i in $(seq 600); do grep -q \"did not finish\" " +
                                          (out / "report.json").string() + " && break; sleep 0.1; done";
    auto r = cpharness::testing::run_command("sh -c '" + cmd + " & pid=$!; " + wait_for_stand_in + "; sleep 1; kill -" +
                                             sig + " $pid; wait $pid; echo EXIT=$?'");
    EXPECT_EQ(r.output.find("EXIT=0"), std::string::npos) << r.output;
    const auto j = read_json(out / "report.json");
    EXPECT_EQ(j["status"], "error") << j.dump(2);
    EXPECT_FALSE(j.contains("note")) << j.dump(2);
    EXPECT_NE(j["error"].get<std::string>().find("run did not finish"), std::string::npos) << j.dump(2);
    std::ifstream xml(out / "report.xml");
    const std::string xml_text((std::istreambuf_iterator<char>(xml)), std::istreambuf_iterator<char>());
    EXPECT_NE(xml_text.find("did not finish"), std::string::npos) << xml_text;
    EXPECT_FALSE(fs::exists(out / "report.html"));
  }
  // A run that ends replaces the stand-in with its verdict.
  const auto out = dir_ / "finished";
  auto r = run_cli("run " + c + " --cp 2 --out " + out.string());
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(read_json(out / "report.json")["status"], "pass");
}

// Before the stand-in there is the half second and more in which libtorch loads: `cpharness` (which links none)
// removes an older run's reports and only then execs cpharness-core, so a command killed while the core loads leaves
// no report, never the older pass. The kill comes the moment the process is the core's (its /proc/PID/exe changed).
TEST_F(CliTest, AProcessKilledWhileItsLibrariesLoadLeavesNoOlderPass) {
  auto c = write("g.json", kGoodCase);
  const auto older = dir_ / "older";  // a real run's reports: the launcher removes only reports of ours
  ASSERT_EQ(run_cli("run " + c + " --cp 2 --out " + older.string()).exit_code, 0);
  ASSERT_TRUE(fs::exists(older / "report.html"));
  const std::string launcher = fs::canonical(CPHARNESS_BINARY).string();
  const std::string core = fs::canonical(fs::path(launcher).parent_path() / "cpharness-core").string();
  for (const std::string outputs : {"--out", "--report"}) {
    SCOPED_TRACE(outputs);
    const auto out = dir_ / ("loading" + outputs);
    fs::copy(older, out, fs::copy_options::recursive);
    const std::string flags = outputs == "--out" ? "--out " + out.string()
                                                 : "--report " + (out / "report.json").string() + " --junit " +
                                                       (out / "report.xml").string() + " --html " + (out / "report.html").string();
    const std::string cmd = launcher + " run " + c + " --cp 2 " + flags;
    // Until the process is the core: before the launcher's exec it is still the forked shell (waiting only while it
    // was the launcher killed that shell, and the older pass stayed: a race on a loaded machine).
    auto r = cpharness::testing::run_command("sh -c '" + cmd + " & pid=$!; while [ -e /proc/$pid ] && [ \"$(readlink /proc/$pid/exe)\" != " +
                                             core + " ]; do :; done; kill -KILL $pid; wait $pid; echo EXIT=$?'");
    EXPECT_NE(r.output.find("EXIT=137"), std::string::npos) << r.output;
    if (fs::exists(out / "report.json")) {
      EXPECT_EQ(read_json(out / "report.json")["status"], "error");
    }
    if (fs::exists(out / "report.xml")) {
      std::ifstream xml(out / "report.xml");
      const std::string xml_text((std::istreambuf_iterator<char>(xml)), std::istreambuf_iterator<char>());
      EXPECT_NE(xml_text.find("did not finish"), std::string::npos) << xml_text;
    }
    EXPECT_FALSE(fs::exists(out / "report.html"));
  }
}

// A usage error found once the core runs leaves its error report where the launcher removed the older one.
TEST_F(CliTest, AUsageErrorAfterTheLauncherStillLeavesItsErrorReport) {
  auto c = write("g.json", kGoodCase);
  const auto out = dir_ / "usage";
  ASSERT_EQ(run_cli("run " + c + " --cp 2 --out " + out.string()).exit_code, 0);
  ASSERT_EQ(read_json(out / "report.json")["status"], "pass");
  auto r = run_cli("run " + c + " --cp 0 --out " + out.string());
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_EQ(read_json(out / "report.json")["status"], "error");
  EXPECT_FALSE(fs::exists(out / "report.html"));
}

// Without its core beside it, `cpharness` says what is missing (exit 2) instead of running something else.
TEST_F(CliTest, TheLauncherWithoutItsCoreSaysWhatIsMissing) {
  fs::copy_file(CPHARNESS_BINARY, dir_ / "cpharness");
  auto r = cpharness::testing::run_command((dir_ / "cpharness").string() + " list");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("cpharness-core"), std::string::npos) << r.output;
}

// Under a launcher (torchrun, srun, mpirun) the reports are rank 0's: the launcher of any other rank leaves them
// alone (rank 0 may already have put its stand-in or its verdict there), as the core does.
TEST_F(CliTest, TheLauncherOfARankOtherThanZeroLeavesTheReportsAlone) {
  auto c = write("g.json", kGoodCase);
  const auto out = dir_ / "ranks";
  ASSERT_EQ(run_cli("run " + c + " --cp 2 --out " + out.string()).exit_code, 0);
  auto text_of = [](const fs::path& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  };
  const std::string older_page = text_of(out / "report.html");
  const std::string rendezvous = "WORLD_SIZE=2 LOCAL_RANK=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29733";
  auto r = run_cli("run " + c + " --comm nccl --timeout 2 --out " + out.string(), "RANK=1 " + rendezvous);
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_EQ(read_json(out / "report.json")["status"], "pass");
  EXPECT_EQ(text_of(out / "report.html"), older_page);
  // Rank 0 of the same job owns them: the older pass goes (its error verdict may have a page of its own).
  r = run_cli("run " + c + " --comm nccl --timeout 2 --out " + out.string(),
              "RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29733");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_EQ(read_json(out / "report.json")["status"], "error");
  EXPECT_NE(text_of(out / "report.html"), older_page);
}

TEST_F(CliTest, ARunThatEndsReplacesTheStandInWithItsVerdict) {
  auto c = write("g.json", kGoodCase);
  const auto out = dir_ / "finished";
  auto r = run_cli("run " + c + " --cp 2 --out " + out.string());
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(read_json(out / "report.json")["status"], "pass");
}

}  // namespace

// ---- Devices: --device, the case key "device", --comm nccl outside a launcher (this machine has no GPU) ----

namespace device_cli {

TEST_F(CliTest, ACaseOnCudaIsSkippedWithTheReasonWhereThereIsNone) {
  if (cpharness::train::cuda_available()) GTEST_SKIP() << "a CUDA device is present";
  auto c = write("good.json", kGoodCase);
  auto out = dir_ / "r.json";
  auto r = run_cli("run " + c + " --cp 2 --device cuda --report " + out.string());
  EXPECT_EQ(r.exit_code, 3) << r.output;  // nothing ran is not a pass
  EXPECT_NE(r.output.find("skipped: device cuda:"), std::string::npos) << r.output;
  std::ifstream in(out);
  auto j = nlohmann::json::parse(in);
  EXPECT_EQ(j["status"], "skipped");
  EXPECT_NE(j["cases"][0]["skip_reason"].get<std::string>().find("device cuda"), std::string::npos);
}

TEST_F(CliTest, ABadDeviceIsAUsageErrorOrAnInputErrorNamingTheKey) {
  auto c = write("good.json", kGoodCase);
  auto r = run_cli("run " + c + " --device gpu0");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("--device"), std::string::npos) << r.output;
  auto bad = write("bad.json", R"({"id": "t", "model": {"preset": "tiny-31b"}, "data": {"seq_len": 24}, "device": "tpu"})");
  r = run_cli("run " + bad);
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("bad.json"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("device"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("\"cuda\""), std::string::npos) << r.output;  // says what is accepted
}

TEST_F(CliTest, CpuRunsReportTheirStepTimesAndNoDeviceMemory) {
  auto c = write("good.json", kGoodCase);
  auto out = dir_ / "r.json";
  auto r = run_cli("run " + c + " --cp 2 --report " + out.string());
  ASSERT_EQ(r.exit_code, 0) << r.output;
  std::ifstream in(out);
  auto j = nlohmann::json::parse(in);
  const auto& perf = j["cases"][0]["performance"];
  for (const char* cp : {"1", "2"}) {
    ASSERT_TRUE(perf.contains(cp)) << perf.dump();
    EXPECT_EQ(perf[cp]["device"], "cpu");
    EXPECT_EQ(perf[cp]["tokens_per_step"], 24);
    ASSERT_EQ(perf[cp]["step_seconds"].size(), 2u);
    for (auto& s : perf[cp]["step_seconds"]) EXPECT_GT(s.get<double>(), 0);
    for (auto& b : perf[cp]["peak_allocated_bytes"]) EXPECT_TRUE(b.is_null());
    for (size_t s = 0; s < 2; ++s)
      EXPECT_NEAR(perf[cp]["tokens_per_s_per_device"][s].get<double>(), 24 / perf[cp]["step_seconds"][s].get<double>(),
                  1e-6 * perf[cp]["tokens_per_s_per_device"][s].get<double>());
  }
  // The page's data: every hidden state (embeddings + 60 layers of tiny-31b) and gradient against its threshold,
  // and the owners of each ring pass; the strict reader takes them back.
  const auto& profile = j["cases"][0]["divergence_profile"]["2"];
  EXPECT_EQ(profile["hidden"].size(), 61u);
  EXPECT_GT(profile["grads"].size(), 100u);
  EXPECT_EQ(profile["hidden"][0]["name"], "embeddings");
  EXPECT_EQ(j["cases"][0]["ring"]["2"]["owners_by_pass"]["backward"], j["cases"][0]["ring"]["2"]["owners"]);
  const auto back = cpharness::report::read_report_json(out.string());
  EXPECT_EQ(back.cases.at(0).ring.at(2).owners_by_pass.size(), 2u);
  EXPECT_TRUE(back.cases.at(0).page.contains("divergence_profile"));
}

// Found once the run's stand-in report is in place: the report says the usage error, not "did not finish".
TEST_F(CliTest, NcclOutsideALauncherIsAUsageError) {
  auto c = write("good.json", kGoodCase);
  const auto out = dir_ / "nccl-outside.json";
  auto r = run_cli("run " + c + " --comm nccl --report " + out.string(),
                   "env -u RANK -u WORLD_SIZE -u OMPI_COMM_WORLD_RANK -u SLURM_PROCID");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("torchrun"), std::string::npos) << r.output;
  const auto j = read_json(out);
  EXPECT_EQ(j["status"], "error");
  EXPECT_NE(j["error"].get<std::string>().find("usage error: --comm nccl"), std::string::npos) << j["error"];
}

TEST_F(CliTest, NcclWithoutAGpuEndsWithAnErrorReport) {
  if (cpharness::train::cuda_available()) GTEST_SKIP() << "a CUDA device is present";
  auto c = write("good.json", kGoodCase);
  auto out = dir_ / "r.json";
  auto r = run_cli("run " + c + " --comm nccl --report " + out.string(),
                   "RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29731");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  std::ifstream in(out);
  ASSERT_TRUE(in.good()) << r.output;
  auto j = nlohmann::json::parse(in);
  EXPECT_EQ(j["status"], "error");
  EXPECT_NE(j["error"].get<std::string>().find("nccl"), std::string::npos) << j["error"];
}

}  // namespace device_cli

// ---- Hostile inputs: refused on load with exit 2, naming the file and the key, before anything is allocated ----

namespace hostile_inputs {

void expect_clean_input_error(const Result& r, const std::string& file, const std::string& key) {
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find(file), std::string::npos) << r.output;
  EXPECT_NE(r.output.find(key), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("frame #"), std::string::npos) << "a C++ backtrace: " << r.output;
  EXPECT_EQ(r.output.find("internal error"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("allocate"), std::string::npos) << r.output;
}

TEST_F(CliTest, SizesNoMachineCanHoldAreInputErrorsNamingTheKey) {
  struct Bad { const char* name; const char* json; const char* key; };
  const Bad bad[] = {
      {"vocab.json", R"({"id": "t", "model": {"preset": "tiny-31b", "overrides": {"vocab_size": 1000000000000}}, "data": {"seq_len": 24}})", "model.overrides.vocab_size"},
      {"hidden.json", R"({"id": "t", "model": {"preset": "tiny-31b", "overrides": {"hidden_size": 1099511627776}}, "data": {"seq_len": 24}})", "model.overrides.hidden_size"},
      {"layers.json", R"({"id": "t", "model": {"preset": "tiny-31b", "overrides": {"intermediate_size": 200000, "hidden_size": 60000}}, "data": {"seq_len": 24}})", "model.overrides"},
      {"seq.json", R"({"id": "t", "model": {"preset": "tiny-31b"}, "data": {"seq_len": 100000000000}})", "data.seq_len"},
      {"batch.json", R"({"id": "t", "model": {"preset": "tiny-31b"}, "data": {"seq_len": 2000000, "batch": 1000}})", "data"},
      {"docs.json", R"({"id": "t", "model": {"preset": "tiny-31b"}, "data": {"seq_len": 96, "document_lengths": [9223372036854775807, 9223372036854775807]}})", "data.document_lengths[0]"},
      {"cp.json", R"({"id": "t", "model": {"preset": "tiny-31b"}, "data": {"seq_len": 96}, "cp": [2, 1000]})", "cp[1]"},
  };
  for (const auto& b : bad) {
    const auto path = write(b.name, b.json);
    const auto start = std::chrono::steady_clock::now();
    expect_clean_input_error(run_cli("run " + path), b.name, b.key);
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(20)) << b.name;
  }
}

TEST_F(CliTest, ACpOverrideLargerThanTheSequenceIsRefusedBeforeAnyWork) {
  auto c = write("good.json", kGoodCase);
  auto out = dir_ / "r.json";
  const auto start = std::chrono::steady_clock::now();
  auto r = run_cli("run " + c + " --cp 1000 --report " + out.string());
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("cp 1000 is more than seq_len 24"), std::string::npos) << r.output;
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(20));
  std::ifstream in(out);
  ASSERT_TRUE(in.good());
  EXPECT_EQ(nlohmann::json::parse(in)["status"], "error");
}

TEST_F(CliTest, EchoedValuesAreCutToAFewHundredCharacters) {
  const std::string key(1 << 20, 'k');
  auto c = write("long.json", R"({"id": "t", "model": {"preset": "tiny-31b"}, "data": {"seq_len": 24}, ")" + key + R"(": 1})");
  auto out = dir_ / "r.json";
  auto r = run_cli("run " + c + " --report " + out.string());
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_LT(r.output.size(), 4000u) << r.output.substr(0, 500);
  EXPECT_NE(r.output.find("more characters"), std::string::npos) << r.output.substr(0, 500);
  EXPECT_LT(std::filesystem::file_size(out), 8000u);
  // A newline in a file name is written as \n: the error stays one line.
  auto broken = write("two\nlines.json", "{");
  r = run_cli("run '" + broken + "'");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("two\\nlines.json: case: malformed JSON"), std::string::npos) << r.output;
}

TEST_F(CliTest, FileNamesBuiltFromCaseIdsStayInTheirDirectory) {
  // A tolerance no run can meet, so the first-divergence dump is written.
  auto c = write("esc.json", R"({"id": "../../escape", "model": {"preset": "tiny-31b"}, "data": {"seq_len": 24, "seed": 1},
    "steps": 1, "tolerances": {"fp32_relative": 1e-30}})");
  const auto dumps = dir_ / "a" / "b" / "dumps";
  auto r = run_cli("run " + c + " --cp 2 --dump-dir " + dumps.string());
  EXPECT_EQ(r.exit_code, 1) << r.output;
  int inside = 0;
  for (auto& e : fs::recursive_directory_iterator(dir_)) {
    if (e.path().extension() != ".h5") continue;
    EXPECT_EQ(e.path().parent_path(), dumps) << e.path();
    ++inside;
  }
  EXPECT_GE(inside, 1) << r.output;
}

TEST_F(CliTest, UnwritableOutputsAreFoundBeforeTheRun) {
  auto c = write("good.json", kGoodCase);
  auto file = write("plain-file", "x");
  for (const std::string& flag : {"--out " + file + "/sub", "--report " + (dir_ / "missing" / "r.json").string(),
                                  "--junit " + (dir_ / "missing" / "r.xml").string(), "--dump-dir " + file + "/d",
                                  // a directory that takes no new file (to root too): the run used to end unreported
                                  std::string("--report /proc/version"), std::string("--junit /proc/r.xml")}) {
    const auto start = std::chrono::steady_clock::now();
    auto r = run_cli("run " + c + " --cp 2 " + flag);
    EXPECT_EQ(r.exit_code, 2) << flag << "\n" << r.output;
    EXPECT_NE(r.output.find(flag.substr(0, flag.find(' '))), std::string::npos) << r.output;
    EXPECT_EQ(r.output.find("step 0"), std::string::npos) << flag << ": the run started: " << r.output;
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10)) << flag;
  }
}

TEST_F(CliTest, TheProgressLineOfACaseInErrorSaysWhy) {
  auto c = write("good.json", kGoodCase);
  auto r = run_cli("run " + c + " --cp 2", "CPHARNESS_INJECT_FAULT=throw@0");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  const auto line = r.output.find("[t] error in ");
  ASSERT_NE(line, std::string::npos) << r.output;
  const auto text = r.output.substr(line, r.output.find('\n', line) - line);
  EXPECT_NE(text.find("injected fault: an unexpected exception"), std::string::npos) << text;
}

TEST_F(CliTest, AnUnexpectedExceptionEndsInAnErrorReportWithAOneLineCause) {
  auto c = write("good.json", kGoodCase);
  auto out = dir_ / "out";
  auto r = run_cli("run " + c + " --cp 2 --out " + out.string(), "CPHARNESS_INJECT_FAULT=throw@0");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  std::ifstream in(out / "report.json");
  ASSERT_TRUE(in.good()) << r.output;
  auto j = nlohmann::json::parse(in);
  EXPECT_EQ(j["status"], "error");
  const auto error = j["cases"][0]["error"].get<std::string>();
  EXPECT_NE(error.find("injected fault: an unexpected exception"), std::string::npos) << error;
  EXPECT_EQ(error.find('\n'), std::string::npos) << error;
  EXPECT_EQ(error.find("second line"), std::string::npos) << error;
}

// ci/setup.sh's pip: the resolver's complaints about the CUDA wheels left out on purpose are not shown; pip's other
// output and its exit status are.
TEST_F(CliTest, SetupKeepsPipsRealErrorsAndDropsItsExpectedComplaints) {
  auto fake = write("fake-pip", "#!/bin/sh\n"
                                "echo \"ERROR: pip's dependency resolver does not currently take into account all the packages\" >&2\n"
                                "echo 'torch 2.11.0 requires triton==3.6.0; platform_system == \"Linux\", which is not installed.' >&2\n"
                                "echo 'ERROR: No matching distribution found for torch==9.9' >&2\n"
                                "exit 3\n");
  fs::permissions(fake, fs::perms::owner_all);
  auto r = cpharness::testing::run_command(std::string(CPHARNESS_SOURCE_DIR) + "/ci/pip-quiet.sh " + fake + " install x");
  EXPECT_EQ(r.exit_code, 3) << r.output;
  EXPECT_NE(r.output.find("No matching distribution"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("which is not installed"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("dependency resolver"), std::string::npos) << r.output;
}

}  // namespace hostile_inputs
