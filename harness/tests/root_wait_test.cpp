// How the other ranks wait for rank 0's solo work (root_wait.h): on signs of life, each within the wait, so a rank 0
// that works far longer than the wait is never taken for a hung one, and one that falls silent is found.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "harness/cp/comm.h"
#include "harness/runner/root_wait.h"

namespace cpharness::runner {
namespace {

using std::chrono::milliseconds;

TEST(RootWait, WorkFarLongerThanTheWaitIsWaitedForWhileRankZeroBeats) {
  const milliseconds wait(200);
  for (int ranks : {2, 3}) {
    SCOPED_TRACE(ranks);
    std::atomic<int64_t> received_sum{0}, beats{0}, worked_ms{0};
    cp::run_local(ranks, [&](cp::Comm& comm) {
      if (comm.rank() == 0) {
        const auto start = std::chrono::steady_clock::now();
        RootHeartbeat heartbeat(comm, wait);
        for (int step = 0; step < 40; ++step) {  // 40 x 20 ms of work: four times the wait
          std::this_thread::sleep_for(milliseconds(20));
          heartbeat.beat();
        }
        beats = heartbeat.beats_sent();
        worked_ms = std::chrono::duration_cast<milliseconds>(std::chrono::steady_clock::now() - start).count();
      }
      received_sum += wait_for_root(comm, 7, wait);
    }, milliseconds(5000));
    EXPECT_EQ(received_sum.load(), 7 * ranks);
    // At most one beat per quarter of the wait, however long the sleeps took on a loaded machine: 800 ms of work
    // sends about 800 / 50 of them, not one per step.
    EXPECT_GE(beats.load(), 8);
    EXPECT_LE(beats.load(), worked_ms.load() / 50 + 1) << worked_ms.load() << " ms";
  }
}

TEST(RootWait, ARankZeroThatFallsSilentIsFoundWithinTheWait) {
  const milliseconds wait(200);
  std::atomic<int> peer_named{-2};
  std::atomic<int64_t> found_after_ms{-1};
  const auto start = std::chrono::steady_clock::now();
  try {
    cp::run_local(2, [&](cp::Comm& comm) {
      if (comm.rank() == 0) {
        RootHeartbeat heartbeat(comm, wait);
        for (int step = 0; step < 5; ++step) {
          std::this_thread::sleep_for(milliseconds(60));
          heartbeat.beat();
        }
        std::this_thread::sleep_for(milliseconds(1500));  // silent: stopped, or a step longer than the wait
        wait_for_root(comm, 1, wait);
        return;
      }
      try {
        wait_for_root(comm, 0, wait);
      } catch (const cp::CommError& e) {
        peer_named = e.peer();
        found_after_ms = std::chrono::duration_cast<milliseconds>(std::chrono::steady_clock::now() - start).count();
        throw;
      }
    }, milliseconds(5000));
    FAIL() << "rank 1 should have stopped waiting";
  } catch (const cp::CommError&) {
  }
  EXPECT_EQ(peer_named.load(), 0);
  // Found about one wait after the last beat (~300 ms in), long before rank 0's silence ends (~1800 ms in).
  EXPECT_GE(found_after_ms.load(), 300);
  EXPECT_LT(found_after_ms.load(), 1200);
}

TEST(RootWait, EveryRankGetsRankZerosValueWhateverItsOwn) {
  std::atomic<int> agreed{0};
  cp::run_local(4, [&](cp::Comm& comm) {
    if (wait_for_root(comm, comm.rank() == 0 ? 42 : comm.rank(), milliseconds(2000)) == 42) ++agreed;
  });
  EXPECT_EQ(agreed.load(), 4);
}

}  // namespace
}  // namespace cpharness::runner
