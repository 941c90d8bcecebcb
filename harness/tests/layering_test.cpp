// ci/check-layering.py: the committed tree has no upward include, and a planted one fails naming the file.
#include <gtest/gtest.h>
#include <filesystem>
#include <fstream>
#include <string>

#include "harness/tests/run_command.h"

namespace {

namespace fs = std::filesystem;

cpharness::testing::CommandResult check_layering(const fs::path& root) {
  return cpharness::testing::run_command("/usr/bin/python3 " + std::string(CPHARNESS_SOURCE_DIR) +
                                         "/ci/check-layering.py --root " + root.string());
}

class Layering : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::temp_directory_path() / ("cpharness_layering_" + std::to_string(::getpid()) + "_" +
                                         ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(root_ / "harness");
    fs::copy_file(fs::path(CPHARNESS_SOURCE_DIR) / "harness" / "layers.txt", root_ / "harness" / "layers.txt");
  }
  void TearDown() override { fs::remove_all(root_); }
  void write(const std::string& rel, const std::string& text) {
    fs::create_directories((root_ / rel).parent_path());
    std::ofstream(root_ / rel) << text;
  }
  fs::path root_;
};

TEST(LayeringOfTheTree, HasNoUpwardInclude) {
  const auto r = check_layering(CPHARNESS_SOURCE_DIR);
  EXPECT_EQ(r.exit_code, 0) << r.output;
}

TEST_F(Layering, DownwardAndSameLayerIncludesPass) {
  write("harness/check/a.cpp", "#include \"harness/check/a.h\"\n#include \"harness/report/report.h\"\n#include <vector>\n");
  write("kernels/k.cpp", "#include \"kernels/k.h\"\n");
  write("harness/tests/t.cpp", "#include \"harness/cli/app.h\"\n");  // tests may include any layer
  const auto r = check_layering(root_);
  EXPECT_EQ(r.exit_code, 0) << r.output;
}

TEST_F(Layering, PlantedUpwardIncludeFailsNamingFileLineAndLayers) {
  write("harness/check/checks.h", "#pragma once\n\n#include \"harness/runner/case_runner.h\"\n");
  const auto r = check_layering(root_);
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("harness/check/checks.h:3: check includes harness/runner/case_runner.h of layer runner"),
            std::string::npos) << r.output;
}

TEST_F(Layering, KernelsMayIncludeNoHarnessLayer) {
  write("kernels/chunk.h", "#include \"harness/model/config.h\"\n");
  const auto r = check_layering(root_);
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("kernels/chunk.h:1: kernels includes harness/model/config.h"), std::string::npos) << r.output;
}

TEST_F(Layering, ALayerNamingOneAboveItIsRefused) {
  write("harness/layers.txt", "io:\nmodel: io report\nreport: io model\n");
  const auto r = check_layering(root_);
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("layer 'model' names 'report'"), std::string::npos) << r.output;
}

}  // namespace
