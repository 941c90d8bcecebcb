// memory.activations on synthetic runs and goldens: judged only where both sides measured the same thing, a
// change beyond the tolerance either way fails naming the step, and the metering itself counts a thread's live
// bytes (allocated, then freed by another thread).
#include <gtest/gtest.h>

#include <thread>

#include "harness/check/activation_memory.h"
#include "harness/train/host_memory.h"

namespace cpharness {
namespace {

report::LaneRun run_with(std::vector<int64_t> bytes) {
  report::LaneRun r;
  for (auto b : bytes) {
    report::TrainingStep s;
    s.activation_bytes = b;
    r.steps.push_back(s);
  }
  return r;
}

report::RunDump golden_with(std::vector<std::optional<int64_t>> bytes) {
  report::RunDump d;
  d.provenance = report::base_provenance(report::kKindGolden);
  for (size_t k = 0; k < bytes.size(); ++k) d.steps[int64_t(k)].activation_bytes = bytes[k];
  return d;
}

TEST(ActivationMemory, AChangeBeyondTheToleranceEitherWayFailsNamingTheStep) {
  const auto golden = golden_with({1000, 2000});
  auto r = check::check_activation_memory(run_with({1000, 2000}), golden, "g.h5", 0.01);
  EXPECT_EQ(r.status, report::Status::Pass) << r.message;
  EXPECT_EQ(r.policy, report::Policy::BytesRelative);
  EXPECT_EQ(check::check_activation_memory(run_with({1000, 2019}), golden, "g.h5", 0.01).status, report::Status::Pass);
  r = check::check_activation_memory(run_with({1000, 2300}), golden, "g.h5", 0.01);  // +15 %: a checkpoint skipped
  EXPECT_EQ(r.status, report::Status::Fail);
  EXPECT_NE(r.message.find("step 1"), std::string::npos) << r.message;
  EXPECT_NE(r.message.find("keeps more"), std::string::npos) << r.message;
  EXPECT_DOUBLE_EQ(r.observed, 0.15);
  r = check::check_activation_memory(run_with({500, 2000}), golden, "g.h5", 0.01);
  EXPECT_EQ(r.status, report::Status::Fail);
  EXPECT_NE(r.message.find("keeps less"), std::string::npos) << r.message;
  // A golden of 0 bytes: any byte is a change.
  EXPECT_EQ(check::check_activation_memory(run_with({1}), golden_with({0}), "g.h5", 0.5).status, report::Status::Fail);
}

TEST(ActivationMemory, SkippedWhereTheTwoSidesDidNotMeasureTheSameThing) {
  auto expect_skip = [](const report::CheckResult& r, const std::string& why) {
    EXPECT_EQ(r.status, report::Status::Skipped) << r.message;
    EXPECT_NE(r.message.find(why), std::string::npos) << r.message;
  };
  expect_skip(check::check_activation_memory(run_with({1000}), golden_with({std::nullopt}), "g.h5", 0.01),
              "stores no activation memory");
  expect_skip(check::check_activation_memory(run_with({-1}), golden_with({1000}), "g.h5", 0.01), "not measured");
  auto other_torch = golden_with({5000});
  other_torch.provenance["torch_version"] = "1.0.0";
  expect_skip(check::check_activation_memory(run_with({1000}), other_torch, "g.h5", 0.01), "torch 1.0.0");
}

TEST(ActivationMemory, TheMeterCountsTheAllocatingThreadsLiveBytesUntilFreedByAnyThread) {
  train::enable_host_memory_metering();
  ASSERT_TRUE(train::host_memory_metering_enabled());
  EXPECT_EQ(train::host_bytes_live(), -1) << "counted outside a scope";
  train::HostMemoryScope counted;
  const int64_t before = train::host_bytes_live();
  auto t = torch::empty({1000}, torch::kFloat64);  // 8000 bytes, this thread's
  EXPECT_EQ(train::host_bytes_live() - before, 8000);
  int64_t other_thread_delta = -1;
  std::thread([&] {
    train::HostMemoryScope also_counted;
    const int64_t mine = train::host_bytes_live();
    auto u = torch::empty({10}, torch::kInt64);
    other_thread_delta = train::host_bytes_live() - mine;
    t = torch::Tensor();  // freed here, counted against the thread that allocated it
  }).join();
  EXPECT_EQ(other_thread_delta, 80);
  EXPECT_EQ(train::host_bytes_live(), before);
}

}  // namespace
}  // namespace cpharness
