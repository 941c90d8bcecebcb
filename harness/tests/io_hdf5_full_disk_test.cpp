// HDF5 writes on a full disk (here: a file size limit): the error names the file and says why on one line (HDF5's
// OS error text spans lines). Run in a child process: the limit must not reach the rest of the suite, and HDF5's
// library shutdown after a failed close is not what this test is about (the child ends with _Exit).
#include <gtest/gtest.h>
#include <sys/resource.h>

#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "harness/io/hdf5_tensors.h"
#include "harness/tests/io_test_util.h"

namespace cpharness::io {
namespace {

// 0 when writing past the limit fails with a one-line InputError naming `path` and the OS reason.
int write_past_a_file_size_limit(const std::string& path) {
  ::signal(SIGXFSZ, SIG_IGN);  // the write fails with EFBIG instead of the process dying
  rlimit limit{16384, 16384};
  ::setrlimit(RLIMIT_FSIZE, &limit);
  try {
    Hdf5Writer w(path);
    w.write("big", torch::ones({1 << 16}));  // 256 KiB
    w.commit();
  } catch (const InputError& e) {
    const std::string m = e.what();
    return m.find('\n') == std::string::npos && m.find(path) != std::string::npos && m.find("File too large") != std::string::npos ? 0 : 1;
  }
  return 2;
}

TEST(IoHdf5FullDisk, AFailedWriteIsAOneLineErrorNamingTheFileAndTheReason) {
  testing::TempDir dir;
  const auto path = (dir.path() / "full.h5").string();
  EXPECT_EXIT(std::_Exit(write_past_a_file_size_limit(path)), ::testing::ExitedWithCode(0), "");
}

// The process that hit the error then ends normally, exit handlers and static destructors included: HDF5's own
// shutdown crashed there (SIGSEGV, exit 139, after the right error message) on the file whose close had failed.
// Nothing is left in the directory.
TEST(IoHdf5FullDisk, TheProcessEndsNormallyAfterAFailedWriteAndLeavesNoFile) {
  testing::TempDir dir;
  const auto path = (dir.path() / "full.h5").string();
  EXPECT_EXIT(std::exit(write_past_a_file_size_limit(path)), ::testing::ExitedWithCode(0), "");
  EXPECT_TRUE(std::filesystem::is_empty(dir.path()));
}

}  // namespace
}  // namespace cpharness::io
