// Writers of the same directory take turns (io::DirectoryLocks): a second writer waits while the first holds the
// directory, goes on as soon as it is released, and gives up waiting (writing without the lock) after its patience.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <future>
#include <thread>

#include "harness/io/directory_lock.h"
#include "harness/tests/io_test_util.h"

namespace {

using cpharness::io::DirectoryLocks;
using cpharness::io::testing::TempDir;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

TEST(DirectoryLocks, ASecondWriterOfTheSameDirectoryWaitsForTheFirst) {
  TempDir dir;
  const std::string report = dir.file("report.json"), page = dir.file("report.html");
  auto first = std::make_unique<DirectoryLocks>(std::vector<std::string>{report, page});
  std::atomic<bool> second_has_it{false};
  auto second = std::async(std::launch::async, [&] {
    DirectoryLocks lock({dir.file("report.xml")}, std::chrono::seconds(60));
    second_has_it = true;
  });
  std::this_thread::sleep_for(milliseconds(400));
  EXPECT_FALSE(second_has_it) << "the second writer did not wait";
  const auto released = Clock::now();
  first.reset();
  ASSERT_EQ(second.wait_for(std::chrono::seconds(10)), std::future_status::ready);
  EXPECT_TRUE(second_has_it);
  EXPECT_LT(Clock::now() - released, std::chrono::seconds(2));
}

TEST(DirectoryLocks, WritersOfOtherDirectoriesDoNotWait) {
  TempDir a, b;
  DirectoryLocks first({a.file("report.json")});
  const auto t0 = Clock::now();
  DirectoryLocks second({b.file("report.json"), "relative-name.json"}, milliseconds(5000));
  EXPECT_LT(Clock::now() - t0, milliseconds(1000));
}

TEST(DirectoryLocks, AWriterThatNeverLetsGoIsWaitedForOnlyAsLongAsThePatience) {
  TempDir dir;
  DirectoryLocks holder({dir.file("report.json")});
  const auto t0 = Clock::now();
  DirectoryLocks late({dir.file("report.json")}, milliseconds(300));
  const auto waited = Clock::now() - t0;
  EXPECT_GE(waited, milliseconds(300));
  EXPECT_LT(waited, milliseconds(3000));
}

}  // namespace
