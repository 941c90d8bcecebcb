// The launcher's blame from a failed job's stderr, on recorded and constructed mpirun output: who died, who hung,
// who merely reported, glued lines, and the verdict exits that are not failures.
#include <gtest/gtest.h>

#include "harness/cp/stderr_scanner.h"

namespace cpharness::cp {
namespace {

int blamed(const std::vector<std::string>& lines) {
  StderrScanner scan;
  for (auto& l : lines) scan.line(l);
  return scan.culprit() ? scan.culprit()->rank : -1;
}

TEST(StderrScanner, ARankMpirunSawDieIsBlamedBeforeAnyReport) {
  EXPECT_EQ(blamed({"cpharness: rank 0: ring_exchange: timed out waiting for rank 1 [culprit: rank 1]",
                    "mpirun noticed that process rank 2 with PID 4242 on node x exited on signal 9 (Killed)."}),
            2);
  StderrScanner scan;
  scan.line("Process name: [[51234,1],3]");
  scan.line("Exit code:    134");
  ASSERT_NE(scan.culprit(), nullptr);
  EXPECT_EQ(scan.culprit()->rank, 3);
  EXPECT_TRUE(scan.hard_failure());
}

TEST(StderrScanner, ARankBlamedByPeersThatNeverReportedHungAndIsBlamed) {
  // Ranks 0 and 2 time out waiting for rank 1, which says nothing: rank 1 hung.
  EXPECT_EQ(blamed({"cpharness: rank 0: exchange: timed out after 20 s [culprit: rank 1]",
                    "cpharness: rank 2: ring_exchange: timed out after 20 s [culprit: rank 1]"}),
            1);
  // A rank that reported its own failure outranks a blamed rank that reported too.
  EXPECT_EQ(blamed({"cpharness: rank 1: injected fault: an unexpected exception",
                    "cpharness: rank 0: ring_exchange: peer failed [culprit: rank 1]"}),
            1);
}

TEST(StderrScanner, GluedMessagesAndTrailingBannersAreReadPerRank) {
  // Rank 1's blame of rank 0 and rank 0's own report glued into one line, an mpirun banner glued behind.
  EXPECT_EQ(blamed({"cpharness: rank 1: exchange: timed out [culprit: rank 0]cpharness: rank 0: hdf5 write failed"
                    "--------------------------------------------------------------------------"}),
            0);
  EXPECT_EQ(blamed({"cpharness: rank 2: timed out [culprit: rank 3]-----mpirun detected that one or more processes"}), 3);
}

TEST(StderrScanner, VerdictExitsAreNotFailures) {
  for (const char* code : {"1", "3"}) {
    StderrScanner scan;
    scan.line(std::string("Exit code:    ") + code);
    EXPECT_FALSE(scan.hard_failure()) << code;
    EXPECT_EQ(scan.culprit(), nullptr);
  }
  StderrScanner scan;
  scan.line("MPI_ABORT was invoked on rank 0 in communicator MPI_COMM_WORLD with errorcode 2");
  EXPECT_TRUE(scan.hard_failure());
  StderrScanner quiet;
  quiet.line("[selftest] cp2 fp32 step 0: loss 7.7 grad_norm 3.1 ok");
  EXPECT_FALSE(quiet.hard_failure());
  EXPECT_EQ(quiet.culprit(), nullptr);
}

}  // namespace
}  // namespace cpharness::cp
