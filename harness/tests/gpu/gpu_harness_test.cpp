// The harness on CUDA (GPU build, CTest label `gpu`). Without a CUDA device every test is a GTEST_SKIP naming the
// reason, which CTest reports as skipped, never as passed.
//   * the libtorch-ops chunk attention on CUDA tensors against the same function on the CPU (fp32 <= 1e-5
//     relative), at Gemma4's head dims 256 and 512, on random masks of every kind;
//   * the ring's chunk compute (CUDA kernel path) against the CPU on the same inputs;
//   * whole cases of the default suite run on CUDA through the runner: every selected check passes, and the
//     block-mask cache counts on the GPU equal the CPU's (168 lookups -> 4 builds on E4B at cp 2).
#include <gtest/gtest.h>

#include <random>

#include "harness/cp/chunk_compute.h"
#include "harness/runner/suite.h"
#include "harness/train/case.h"
#include "harness/train/device.h"
#include "kernels/block_mask_builder.h"
#include "kernels/chunk_attention.h"
#include "kernels/tests/test_support.h"

namespace cpharness {
namespace {

using kernels::testing::random_mask_config;

#define SKIP_WITHOUT_CUDA()                                                              \
  do {                                                                                   \
    if (!train::cuda_available()) GTEST_SKIP() << train::cuda_unavailable_reason();      \
  } while (0)

double rel(const torch::Tensor& a, const torch::Tensor& b) {
  const auto d = (a.cpu().to(torch::kFloat64) - b.cpu().to(torch::kFloat64)).norm().item<double>();
  const auto n = b.cpu().to(torch::kFloat64).norm().item<double>();
  return n > 0 ? d / n : d;
}

struct Problem {
  torch::Tensor q, k, v, dout;
  kernels::BlockMask mask;
  double scale;
  std::string what;
};

Problem random_problem(uint64_t seed, int64_t head_dim) {
  auto c = random_mask_config(seed, 300);
  std::mt19937_64 rng(seed * 7 + 1);
  const int64_t hkv = 1 + int64_t(rng() % 2), groups = (rng() % 2) ? 4 : 1;
  torch::manual_seed(int64_t(seed));
  Problem p;
  p.q = torch::randn({c.batch, hkv * groups, c.q_range.length, head_dim});
  p.k = torch::randn({c.batch, hkv, c.kv_range.length, head_dim});
  p.v = torch::randn({c.batch, hkv, c.kv_range.length, head_dim});
  p.dout = torch::randn({c.batch, hkv * groups, c.q_range.length, head_dim});
  p.mask = kernels::build_block_mask(c.meta.slice(c.q_range.start, c.q_range.length),
                                     c.meta.slice(c.kv_range.start, c.kv_range.length), c.q_range, c.kv_range,
                                     c.geometry, c.batch, c.q_block, c.kv_block);
  p.scale = 1.0 / std::sqrt(double(head_dim));
  p.what = c.describe() + " D=" + std::to_string(head_dim) + " heads " + std::to_string(hkv * groups) + ":" +
           std::to_string(hkv) + " seed " + std::to_string(seed);
  return p;
}

// The merged out / LSE of one chunk (a single chunk is its own merge).
void expect_matches_cpu(const Problem& p, bool kernel_path, double tol) {
  const auto dev = torch::Device(torch::kCUDA);
  auto fc = kernels::chunk_attention_forward(p.q, p.k, p.v, p.mask, p.scale);
  auto gc = kernels::chunk_attention_backward(p.q, p.k, p.v, fc.out, fc.lse, p.dout, p.mask, p.scale);
  cp::ChunkCompute compute(kernel_path ? cp::CudaAttentionPath::kKernel : cp::CudaAttentionPath::kOps);
  auto mask = std::make_shared<const kernels::BlockMask>(p.mask);
  auto q = p.q.to(dev), k = p.k.to(dev), v = p.v.to(dev), dout = p.dout.to(dev);
  auto fg = compute.forward(q, k, v, mask, p.scale);
  auto gg = compute.backward(q, k, v, fg.out, fg.lse, dout, mask, p.scale);
  ASSERT_TRUE(fg.out.is_cuda() && gg.dq.is_cuda()) << p.what;
  EXPECT_TRUE(torch::equal(torch::isneginf(fg.lse).cpu(), torch::isneginf(fc.lse))) << p.what << ": empty rows differ";
  auto finite = torch::isfinite(fc.lse);
  EXPECT_LE(rel(fg.lse.cpu().masked_select(finite), fc.lse.masked_select(finite)), tol) << p.what << " lse";
  EXPECT_LE(rel(fg.out, fc.out), tol) << p.what << " out";
  EXPECT_LE(rel(gg.dq, gc.dq), tol) << p.what << " dq";
  EXPECT_LE(rel(gg.dk, gc.dk), tol) << p.what << " dk";
  EXPECT_LE(rel(gg.dv, gc.dv), tol) << p.what << " dv";
  EXPECT_FALSE(torch::isnan(fg.out).any().item<bool>()) << p.what;
}

TEST(GpuChunkAttention, OpsPathOnCudaMatchesTheCpuAtGemma4HeadDims) {
  SKIP_WITHOUT_CUDA();
  for (int64_t d : {256, 512})
    for (uint64_t seed = 1; seed <= 24; ++seed) expect_matches_cpu(random_problem(seed * 31 + uint64_t(d), d), false, 1e-5);
}

TEST(GpuChunkAttention, KernelPathOnCudaMatchesTheCpuAtGemma4HeadDims) {
  SKIP_WITHOUT_CUDA();
  // The kernel sums in another order than the CPU's blocked matmuls; 2e-5 covers rows where dS nearly cancels.
  for (int64_t d : {256, 512})
    for (uint64_t seed = 1; seed <= 24; ++seed) expect_matches_cpu(random_problem(seed * 37 + uint64_t(d), d), true, 2e-5);
}

TEST(GpuChunkAttention, DeviceMaskCopiesAreMadeOncePerMaskAndBatch) {
  SKIP_WITHOUT_CUDA();
  auto p = random_problem(5, 256);
  cp::ChunkCompute compute(cp::CudaAttentionPath::kKernel);
  auto mask = std::make_shared<const kernels::BlockMask>(p.mask);
  const auto dev = torch::Device(torch::kCUDA);
  auto q = p.q.to(dev), k = p.k.to(dev), v = p.v.to(dev);
  auto f = compute.forward(q, k, v, mask, p.scale);
  compute.backward(q, k, v, f.out, f.lse, p.dout.to(dev), mask, p.scale);
  EXPECT_EQ(compute.device_copies(), 1u);
  compute.new_batch();
  EXPECT_EQ(compute.device_copies(), 0u);
}

// A default case run end to end on CUDA through the runner, ranks as threads on one GPU.
report::CaseReport run_on_cuda(const std::string& name, std::optional<std::vector<int>> cps = std::nullopt) {
  auto c = train::load_case(std::string(CPHARNESS_SOURCE_DIR) + "/cases/default/" + name + ".json");
  runner::SuiteOptions o;
  o.device = "cuda";
  o.cp_sizes = cps;
  return runner::run_case(c, o);
}

void expect_every_check_passes(const report::CaseReport& rep) {
  ASSERT_FALSE(rep.error) << *rep.error;
  ASSERT_FALSE(rep.checks.empty());
  for (auto& k : rep.checks)
    EXPECT_TRUE(k.status == report::Status::Pass || k.status == report::Status::Skipped)
        << rep.id << " " << k.name << " cp" << k.cp << ": " << k.message;
  ASSERT_TRUE(rep.performance.count(1));
  EXPECT_EQ(rep.performance.at(1).device, "cuda");
  for (auto& [cp, perf] : rep.performance)
    for (size_t s = 0; s < perf.step_seconds.size(); ++s) {
      EXPECT_GT(perf.step_seconds[s], 0) << "cp" << cp;
      ASSERT_TRUE(perf.peak_allocated_bytes[s].has_value()) << "cp" << cp;
      EXPECT_GT(*perf.peak_allocated_bytes[s], 0) << "cp" << cp;
      EXPECT_GE(*perf.peak_reserved_bytes[s], *perf.peak_allocated_bytes[s]) << "cp" << cp;
    }
}

TEST(GpuCases, E4bPatternPassesOnCudaWithTheCpuCacheCounts) {
  SKIP_WITHOUT_CUDA();
  auto rep = run_on_cuda("e4b-pattern");
  expect_every_check_passes(rep);
  // 42 layers x 2 chunks x 2 passes = 168 lookups per rank and step, 4 builds (2 geometries x 2 kv offsets).
  ASSERT_TRUE(rep.block_mask_cache.count(2));
  for (auto& rank : rep.block_mask_cache.at(2))
    for (auto& step : rank) {
      EXPECT_EQ(step.lookups, 168);
      EXPECT_EQ(step.builds, 4);
    }
}

TEST(GpuCases, EveryDefaultCasePassesOnCuda) {
  SKIP_WITHOUT_CUDA();
  for (const char* name : {"tiny-31b-vision", "tiny-e2b-packed", "tiny-e4b-bf16", "tiny-e4b-odd-length"})
    expect_every_check_passes(run_on_cuda(name));
}

}  // namespace
}  // namespace cpharness
