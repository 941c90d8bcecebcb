// The cpharness binary end to end: exit codes and messages for good and bad input.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

namespace {

namespace fs = std::filesystem;

struct Result {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};

Result run_cli(const std::string& args) {
  const std::string cmd = std::string(CPHARNESS_BINARY) + " " + args + " 2>&1";
  Result r;
  FILE* pipe = popen(cmd.c_str(), "r");
  std::array<char, 4096> buf{};
  while (fgets(buf.data(), buf.size(), pipe)) r.output += buf.data();
  const int status = pclose(pipe);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
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
  // The produced report validates against the committed schema (Debian's python3-jsonschema), and the JUnit
  // file parses with a real XML parser.
  const std::string schema = std::string(CPHARNESS_SOURCE_DIR) + "/reports/schema/report.schema.json";
  const std::string validate =
      "/usr/bin/python3 -c \"import json,sys,jsonschema; s=json.load(open(sys.argv[1])); "
      "jsonschema.Draft202012Validator(s).validate(json.load(open(sys.argv[2]))); "
      "import xml.etree.ElementTree as E; E.parse(sys.argv[3])\" " +
      schema + " " + (out / "report.json").string() + " " + (out / "report.xml").string() + " 2>&1";
  FILE* pipe = popen(validate.c_str(), "r");
  std::string text;
  std::array<char, 4096> buf{};
  while (fgets(buf.data(), buf.size(), pipe)) text += buf.data();
  EXPECT_EQ(pclose(pipe), 0) << text;
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

TEST_F(CliTest, UsageErrorsAreExit2) {
  EXPECT_EQ(run_cli("").exit_code, 2);
  EXPECT_EQ(run_cli("frobnicate").exit_code, 2);
  EXPECT_EQ(run_cli("run").exit_code, 2);
  EXPECT_EQ(run_cli("run " + write("g.json", kGoodCase) + " --cp x").exit_code, 2);
}

TEST_F(CliTest, CasesRequiringCudaAreSkippedWithTheReason) {
  auto c = write("gpu.json", R"({"id": "g", "model": {"preset": "e2b"}, "data": {"seq_len": 8}, "requires": ["cuda"]})");
  auto r = run_cli("run " + c);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("skipped: requires cuda"), std::string::npos) << r.output;
}

}  // namespace
