// The launcher's blame when the rank that failed says nothing: MPI's shutdown watchdog cannot tell which peer it
// waited for, and mpirun's non-zero-exit banner names the first rank to exit, often the one that saw the failure.
#include <gtest/gtest.h>

#include "harness/cp/stderr_scanner.h"

namespace cpharness::cp {
namespace {

TEST(StderrScannerBlame, ARankFrozenInMpiShutdownIsBlamedNotTheRankThatWaitedForIt) {
  // Rank 1 froze after the verdict; rank 0's shutdown watchdog ended it, so mpirun's banner names rank 0.
  StderrScanner scan(2);
  scan.line("cpharness: rank 0: MPI shutdown (MPI_Finalize) did not complete within 8 s: another rank or mpirun is "
            "stopped or unresponsive (exit 2)");
  scan.line("mpirun detected that one or more processes exited with non-zero status, thus causing");
  scan.line("  Process name: [[7633,1],0]");
  scan.line("  Exit code:    2");
  ASSERT_NE(scan.culprit(), nullptr);
  EXPECT_EQ(scan.culprit()->rank, 1);
  EXPECT_NE(scan.culprit()->line.find("MPI shutdown"), std::string::npos) << scan.culprit()->line;
}

TEST(StderrScannerBlame, TheFirstRankToExitIsBlamedOnlyWhenItSaidNothing) {
  // Rank 0 timed out waiting for rank 1 and ended itself first: rank 1, blamed and silent, hung.
  StderrScanner reported(2);
  reported.line("cpharness: rank 0: CommError: broadcast timed out [culprit: rank 1]");
  reported.line("  Process name: [[1,1],0]");
  reported.line("  Exit code:    2");
  ASSERT_NE(reported.culprit(), nullptr);
  EXPECT_EQ(reported.culprit()->rank, 1);
  // A rank that exited 2 without a word is the one that failed.
  StderrScanner silent(3);
  silent.line("cpharness: rank 0: CommError: exchange: aborted [culprit: rank 2]");
  silent.line("  Process name: [[1,1],2]");
  silent.line("  Exit code:    2");
  ASSERT_NE(silent.culprit(), nullptr);
  EXPECT_EQ(silent.culprit()->rank, 2);
}

TEST(StderrScannerBlame, ANonZeroExitAloneIsNoRankFailure) {
  // Every rank refused bad input with exit 2: mpirun reports it, no rank failed.
  StderrScanner refused(2);
  refused.line("  Process name: [[1,1],1]");
  refused.line("  Exit code:    2");
  EXPECT_TRUE(refused.hard_failure());
  EXPECT_FALSE(refused.rank_failure());
  StderrScanner failed(2);
  failed.line("cpharness: rank 1: injected fault: an unexpected exception");
  EXPECT_TRUE(failed.rank_failure());
}

}  // namespace
}  // namespace cpharness::cp
